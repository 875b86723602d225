//! `pagewire-bench tls`: plain against TLS and a pre-shared key at 1 and 2 channels,
//! interleaved, and the one-core seal rates.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use pagewire::pipeline::compress::Compression;
use pagewire::synth::{fill, Content};
use pagewire::tls::{certs, TlsClient, TlsServer};
use pagewire::{GuestMemory, RegionSpec, ZeroCopy};
use serde::Serialize;

use crate::measure::{machine, pagewire_run, summarize, Run, Security, Summary};

#[derive(clap::Args)]
pub(crate) struct TlsBenchArgs {
    /// Memory to move (random pages), e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = pagewire::units::parse_size)]
    size: u64,
    /// Repetitions of each transfer (interleaved plain, TLS).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[command(flatten)]
    net: crate::measure::Net,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct TlsRow {
    channels: u16,
    plain: Summary,
    tls: Summary,
    tls_over_plain: f64,
    /// Plaintext authenticated and protected with a pre-shared key.
    psk: Summary,
    psk_over_plain: f64,
}

#[derive(Serialize)]
struct TlsReport {
    machine: String,
    content: &'static str,
    reps: usize,
    rows: Vec<TlsRow>,
    seal: crate::seal::SealRates,
    pagewire_seal_over_rustls_encrypt: f64,
}

pub(crate) fn run(a: TlsBenchArgs) -> Result<()> {
    if a.reps == 0 {
        bail!("--reps must be positive");
    }
    a.net.check()?;
    pagewire::probe_uring().context("pagewire needs io_uring")?;
    let say = |s: &str| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    let dir = tempfile::tempdir()?;
    certs::generate(&certs::CertOptions::default())?.write(dir.path())?;
    let pki = (
        TlsClient::new(certs::client_files(dir.path()).load()?, "localhost")?,
        TlsServer::new(certs::server_files(dir.path()).load()?)?,
    );
    let psk = pagewire::auth::Psk::generate();
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let src = Arc::new(GuestMemory::anonymous(&spec)?);
    fill(&src, Content::Random, 17);
    let bytes = src.total_bytes();
    let mut rows = Vec::new();
    for channels in [1u16, 2] {
        let (mut plain, mut sealed, mut keyed) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..a.reps {
            for mode in 0..3 {
                let dst = Arc::new(GuestMemory::anonymous_populated(&spec)?);
                let security = match mode {
                    0 => Security::Plain,
                    1 => Security::Tls(&pki),
                    _ => Security::Psk(&psk),
                };
                let (run, _) = pagewire_run(
                    src.clone(),
                    dst.clone(),
                    channels,
                    ZeroCopy::Auto,
                    &a.net,
                    security,
                    Compression::None,
                )?;
                if rep == 0 && src.first_difference(&dst).is_some() {
                    bail!("destination differs from the source (mode {mode})");
                }
                [&mut plain, &mut sealed, &mut keyed][mode].push(run);
            }
            let rate = |r: &Run| bytes as f64 / (1u64 << 30) as f64 / r.seconds;
            say(&format!(
                "{channels} channel(s), rep {}/{}: plain {:.2} GiB/s, TLS {:.2} GiB/s, pre-shared key {:.2} GiB/s",
                rep + 1,
                a.reps,
                rate(&plain[rep]),
                rate(&sealed[rep]),
                rate(&keyed[rep])
            ));
        }
        let plain = summarize("plain", bytes, &plain);
        let tls = summarize("tls", bytes, &sealed);
        let psk_row = summarize("psk", bytes, &keyed);
        rows.push(TlsRow {
            channels,
            psk_over_plain: psk_row.gib_per_s_median / plain.gib_per_s_median,
            psk: psk_row,
            tls_over_plain: tls.gib_per_s_median / plain.gib_per_s_median,
            plain,
            tls,
        });
    }
    say("measuring one-core seal rates ...");
    let seal = crate::seal::seal_rates(&src)?;
    let report = TlsReport {
        machine: machine(),
        content: "random",
        reps: a.reps,
        rows,
        pagewire_seal_over_rustls_encrypt: seal.pagewire_seal_gib_s / seal.rustls_encrypt_gib_s,
        seal,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("machine: {}", report.machine);
    println!(
        "{} MiB of random memory, {} interleaved reps (median [min..max]), suite {}",
        a.size >> 20,
        report.reps,
        report.seal.suite
    );
    println!(
        "{:<12} {:>22} {:>22} {:>10}   CPU-s/GiB send/recv: plain | TLS",
        "channels", "plain GiB/s", "TLS GiB/s", "TLS/plain"
    );
    for r in &report.rows {
        println!(
            "{:<12} {:>6.2} [{:.2}..{:.2}] {:>6.2} [{:.2}..{:.2}] {:>10.2}   {:.3}/{:.3} | {:.3}/{:.3}",
            r.channels,
            r.plain.gib_per_s_median,
            r.plain.gib_per_s_min,
            r.plain.gib_per_s_max,
            r.tls.gib_per_s_median,
            r.tls.gib_per_s_min,
            r.tls.gib_per_s_max,
            r.tls_over_plain,
            r.plain.sender_cpu_s_per_gib,
            r.plain.receiver_cpu_s_per_gib,
            r.tls.sender_cpu_s_per_gib,
            r.tls.receiver_cpu_s_per_gib
        );
        println!(
            "{:<12} pre-shared key {:.2} GiB/s [{:.2}..{:.2}], {:.2}× plain, CPU-s/GiB {:.3}/{:.3}",
            "",
            r.psk.gib_per_s_median,
            r.psk.gib_per_s_min,
            r.psk.gib_per_s_max,
            r.psk_over_plain,
            r.psk.sender_cpu_s_per_gib,
            r.psk.receiver_cpu_s_per_gib
        );
    }
    println!("one core, GiB/s of plaintext:");
    println!(
        "  AEAD alone, in cache (ceiling)      {:>6.2}",
        report.seal.aead_in_cache_gib_s
    );
    println!(
        "  pagewire copy + seal in place       {:>6.2}",
        report.seal.pagewire_seal_gib_s
    );
    println!(
        "  rustls WriteTraffic::encrypt        {:>6.2}",
        report.seal.rustls_encrypt_gib_s
    );
    println!(
        "  pagewire / rustls = {:.2}",
        report.pagewire_seal_over_rustls_encrypt
    );
    Ok(())
}
