//! `pagewire-bench transfer`.
//!
//! `transfer` measures, interleaved A B A B over `--reps` repetitions (these machines drift):
//! (a) raw TCP: the same bytes through the same number of plain loopback sockets, 1 MiB blocking
//!     writes from the source memory and `MSG_WAITALL` reads into the destination memory;
//! (b) pagewire over loopback with the same channel count, source and destination;
//! (c) all-zero memory (written zero pages, so DRAM is really read) sent by pagewire, against a
//!     one-core read scan of the same buffer with the engine's zero scanner.
//! The destinations of (a) and (b) are pre-faulted fresh for every run of either engine, so
//! page faults are not measured; (c)'s is fresh and untouched, which costs nothing, since zero
//! pages into fresh memory are skipped. Reported: median and spread of throughput, the ratios, and CPU-seconds per GiB on
//! each side.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use pagewire::pipeline::compress::Compression;
use pagewire::synth::{fill, Content};
use pagewire::{GuestMemory, RegionSpec, ZeroCopy};
use serde::Serialize;

use crate::measure::{machine, pagewire_run, raw_tcp, scan_run, summarize, Summary};

#[derive(clap::Args)]
pub(crate) struct TransferArgs {
    /// Memory for the raw-TCP comparison, e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = pagewire::units::parse_size)]
    size: u64,
    /// Memory for the zero-page comparison, e.g. 4GiB.
    #[arg(long, default_value = "4GiB", value_parser = pagewire::units::parse_size)]
    zero_size: u64,
    /// Channels (pagewire) and streams (raw TCP).
    #[arg(long, default_value_t = 2)]
    channels: u16,
    /// Content for the raw-TCP comparison.
    #[arg(long, default_value = "random")]
    content: Content,
    /// Repetitions of each measurement (interleaved).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Zero-copy policy for pagewire.
    #[arg(long, default_value_t = ZeroCopy::Auto)]
    zero_copy: ZeroCopy,
    #[command(flatten)]
    net: crate::measure::Net,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    channels: u16,
    content: &'static str,
    reps: usize,
    /// Threads and shards were pinned (no `--no-pin`).
    pinned: bool,
    /// Where each stream's receiver ran relative to its sender (`--receiver-placement`).
    receiver_placement: crate::measure::ReceiverPlacement,
    raw_tcp: Summary,
    pagewire: Summary,
    pagewire_over_raw_tcp: f64,
    zero_pagewire: Summary,
    zero_one_core_scan: Summary,
    zero_pagewire_over_scan: f64,
    zero_copy_fallbacks: u64,
}

pub(crate) fn run(a: TransferArgs) -> Result<()> {
    if a.reps == 0 || a.channels == 0 {
        bail!("--reps and --channels must be positive");
    }
    a.net.check()?;
    pagewire::probe_uring().context("pagewire needs io_uring")?;
    let say = |s: &str| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let src = Arc::new(GuestMemory::anonymous(&spec)?);
    fill(&src, a.content, 11);
    let bytes = src.total_bytes();
    let mut raw = Vec::new();
    let mut pw = Vec::new();
    let mut fallbacks = 0;
    for rep in 0..a.reps {
        // A B A B: drift hits both engines alike.
        let dst = GuestMemory::anonymous_populated(&spec)?;
        raw.push(raw_tcp(&src, &dst, usize::from(a.channels), &a.net)?);
        drop(dst);
        let dst = Arc::new(GuestMemory::anonymous_populated(&spec)?);
        let (run, stats) = pagewire_run(
            src.clone(),
            dst.clone(),
            a.channels,
            a.zero_copy,
            &a.net,
            None,
            Compression::None,
        )?;
        if rep == 0 && src.first_difference(&dst).is_some() {
            bail!("pagewire's destination differs from the source");
        }
        fallbacks = stats.zero_copy.fallbacks;
        pw.push(run);
        say(&format!(
            "rep {}/{}: raw TCP {:.2} GiB/s, pagewire {:.2} GiB/s",
            rep + 1,
            a.reps,
            bytes as f64 / (1u64 << 30) as f64 / raw[rep].seconds,
            bytes as f64 / (1u64 << 30) as f64 / pw[rep].seconds
        ));
    }
    drop(src);
    let zspec = [RegionSpec {
        gpa: 0,
        len: a.zero_size,
    }];
    let zsrc = Arc::new(GuestMemory::anonymous(&zspec)?);
    fill(&zsrc, Content::Zero, 0); // written zeros: real pages, not the shared zero page
    let zbytes = zsrc.total_bytes();
    let mut zpw = Vec::new();
    let mut zscan = Vec::new();
    for rep in 0..a.reps {
        zscan.push(scan_run(&zsrc));
        let dst = Arc::new(GuestMemory::anonymous(&zspec)?);
        zpw.push(
            pagewire_run(
                zsrc.clone(),
                dst,
                a.channels,
                a.zero_copy,
                &a.net,
                None,
                Compression::None,
            )?
            .0,
        );
        say(&format!(
            "rep {}/{}: zero memory: one-core scan {:.2} GiB/s, pagewire {:.2} GiB/s",
            rep + 1,
            a.reps,
            zbytes as f64 / (1u64 << 30) as f64 / zscan[rep].seconds,
            zbytes as f64 / (1u64 << 30) as f64 / zpw[rep].seconds
        ));
    }
    let raw = summarize("raw-tcp", bytes, &raw);
    let pw = summarize("pagewire", bytes, &pw);
    let zpw = summarize("pagewire", zbytes, &zpw);
    let zscan = summarize("one-core-scan", zbytes, &zscan);
    let report = Report {
        machine: machine(),
        channels: a.channels,
        content: a.content.name(),
        reps: a.reps,
        pinned: !a.net.no_pin,
        receiver_placement: a.net.receiver_placement,
        pagewire_over_raw_tcp: pw.gib_per_s_median / raw.gib_per_s_median,
        zero_pagewire_over_scan: zpw.gib_per_s_median / zscan.gib_per_s_median,
        raw_tcp: raw,
        pagewire: pw,
        zero_pagewire: zpw,
        zero_one_core_scan: zscan,
        zero_copy_fallbacks: fallbacks,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("machine: {}", report.machine);
    println!(
        "{} channel(s), {} MiB of {} memory, {} interleaved reps (median [min..max])",
        report.channels,
        a.size >> 20,
        report.content,
        report.reps
    );
    println!(
        "{:<34} {:>22} {:>14} {:>14}",
        "", "GiB/s", "send CPU-s/GiB", "recv CPU-s/GiB"
    );
    let row = |name: &str, s: &Summary| {
        println!(
            "{:<34} {:>6.2} [{:.2}..{:.2}] {:>14.3} {:>14.3}",
            name,
            s.gib_per_s_median,
            s.gib_per_s_min,
            s.gib_per_s_max,
            s.sender_cpu_s_per_gib,
            s.receiver_cpu_s_per_gib
        );
    };
    row("(a) raw TCP, same streams", &report.raw_tcp);
    row("(b) pagewire", &report.pagewire);
    println!(
        "    pagewire / raw TCP = {:.2}",
        report.pagewire_over_raw_tcp
    );
    row(
        &format!("(c) pagewire, {} MiB zero", a.zero_size >> 20),
        &report.zero_pagewire,
    );
    row(
        "    one-core read scan, same buffer",
        &report.zero_one_core_scan,
    );
    println!(
        "    pagewire / one-core scan = {:.2}",
        report.zero_pagewire_over_scan
    );
    Ok(())
}
