//! `pagewire-bench matrix`: every combination of the chosen axes, repeated and interleaved
//! (A B A B, because these machines drift), with the machine's ceilings measured in the same run:
//! raw TCP with the same streams and bytes, a one-core DRAM read scan and memcpy, one-core AEAD,
//! pagewire-seal and rustls-encrypt rates, and a one-core zstd rate. Writes `results.json`,
//! `results.csv`, `report.md` and three SVG plots (throughput, CPU-s/GiB and the ratio to raw TCP,
//! by channel count) to `--out`.
//!
//! Each cell's throughput is end to end: from the sender's connect until the receiver has
//! confirmed every page, into a pre-faulted destination (faults are not measured).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pagewire::pipeline::compress::{Codec, Compression, Compressor};
use pagewire::pipeline::zero::ZeroScanner;
use pagewire::synth::{fill, Content};
use pagewire::tls::{certs, TlsClient, TlsServer};
use pagewire::{GuestMemory, RegionSpec, ZeroCopy};
use serde::Serialize;

use crate::measure::{pagewire_run, raw_tcp, summarize, Run, Summary};

/// Options of one matrix run.
#[derive(clap::Args)]
pub struct MatrixArgs {
    /// A short preset (well under a minute on a 2-core machine): 512 MiB, channels 1,2, 3 reps,
    /// the other axes as given.
    #[arg(long)]
    quick: bool,
    /// Guest memory per cell.
    #[arg(long, default_value = "2GiB", value_parser = pagewire::units::parse_size)]
    size: u64,
    /// Channel counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    channels: Vec<u16>,
    /// Memory contents: zero, random, mixed, text, blend, or file:PATH (a RAM image; the run then
    /// takes its size from the file).
    #[arg(long, value_delimiter = ',', default_value = "zero,random,mixed,text", value_parser = parse_content)]
    content: Vec<ContentSpec>,
    /// TLS: off, on.
    #[arg(long, value_delimiter = ',', default_value = "off")]
    tls: Vec<OnOff>,
    /// Compression: none, zstd, zlib, auto.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    compress: Vec<Compression>,
    /// Zero-copy policy: auto, on, off.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    zero_copy: Vec<ZeroCopy>,
    /// Repetitions of every cell (interleaved).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Directory for results.json, results.csv and report.md.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Print the results as one JSON object on stdout too.
    #[arg(long)]
    json: bool,
    /// Do not pin threads.
    #[arg(long)]
    no_pin: bool,
    /// Run QEMU's multifd migration of the same content side by side (same channels, TLS and
    /// compression; needs qemu-system-x86, /dev/kvm and root, skipped with a reason otherwise).
    #[arg(long)]
    with_qemu: bool,
    /// Live rows after the static cells: migrations of a running guest (the tiny KVM guest, or
    /// the software dirtier without /dev/kvm) at these dirty rates × the channels × TLS, with
    /// QEMU side by side under --with-qemu. Written to `live.json` in --out (see `pagewire-bench
    /// live` for more settings).
    #[arg(long, value_delimiter = ',', value_parser = pagewire::units::parse_rate)]
    live: Vec<u64>,
    /// The live rows' working set (default: a quarter of memory).
    #[arg(long, value_parser = pagewire::units::parse_size)]
    live_working_set: Option<u64>,
    /// Run against `pagewire-bench serve` on another host (HOST:PORT of its control listener):
    /// receivers, raw TCP included, run there, across the real network.
    #[arg(long)]
    peer: Option<String>,
}

/// An on/off axis value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    /// Off.
    Off,
    /// On.
    On,
}

/// A content axis value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentSpec {
    /// Generated, seeded.
    Synthetic(Content),
    /// A RAM image read from a file.
    File(PathBuf),
}

impl ContentSpec {
    fn name(&self) -> String {
        match self {
            ContentSpec::Synthetic(c) => c.name().to_string(),
            ContentSpec::File(p) => format!("file:{}", p.display()),
        }
    }
}

fn parse_content(text: &str) -> Result<ContentSpec, String> {
    match text.strip_prefix("file:") {
        Some(path) => Ok(ContentSpec::File(PathBuf::from(path))),
        None => text.parse().map(ContentSpec::Synthetic),
    }
}

/// One cell of the matrix, with its repetitions summarized.
#[derive(Debug, Clone, Serialize)]
struct Cell {
    content: String,
    channels: u16,
    tls: OnOff,
    compress: Compression,
    zero_copy: ZeroCopy,
    pagewire: Summary,
    raw_tcp_gib_per_s: f64,
    pagewire_over_raw_tcp: f64,
    wire_bytes: u64,
    zero_copy_copied_by_kernel: bool,
    /// QEMU multifd on the same memory and settings (`--with-qemu`), its own counters.
    qemu: Option<QemuCell>,
    /// pagewire's median throughput over QEMU's.
    pagewire_over_qemu: Option<f64>,
    /// pagewire between the RAM files QEMU used (`--with-qemu`): its source file to a fresh
    /// destination file on the same huge-page tmpfs.
    pagewire_files: Option<Summary>,
    /// RAM files over QEMU's median throughput.
    files_over_qemu: Option<f64>,
    /// RAM files over pagewire's in-memory median throughput on the same content.
    files_over_memory: Option<f64>,
}

/// QEMU's side of a cell.
#[derive(Debug, Clone, Serialize)]
struct QemuCell {
    summary: Summary,
    transferred: u64,
    duplicate: u64,
    normal: u64,
}

/// One-core ceilings, GiB/s.
#[derive(Debug, Clone, Serialize)]
struct Ceilings {
    dram_read_scan_gib_s: f64,
    memcpy_gib_s: f64,
    /// Every allowed core copying its share of the memory at once: the host's memory bandwidth
    /// (GiB copied per second, each read once and written once), the ceiling many shards meet.
    memcpy_all_cores_gib_s: (usize, f64),
    aead_seal_in_cache_gib_s: f64,
    pagewire_seal_gib_s: f64,
    rustls_encrypt_gib_s: f64,
    zstd1_text_gib_s: f64,
    raw_tcp_gib_s_by_channels: Vec<(u16, f64)>,
}

#[derive(Serialize)]
struct Results {
    machine: String,
    /// The destination, when it was another host.
    peer: Option<String>,
    size_bytes: u64,
    reps: usize,
    ceilings: Ceilings,
    cells: Vec<Cell>,
}

/// Runs the matrix.
pub fn run(mut a: MatrixArgs) -> Result<()> {
    if a.with_qemu && a.peer.is_some() {
        bail!("--with-qemu runs both QEMUs on this host: it cannot be combined with --peer");
    }
    let with_qemu = a.with_qemu
        && match crate::qemu::unavailable() {
            Some(why) => {
                eprintln!("SKIPPED: the QEMU rows: {why}");
                false
            }
            None => true,
        };
    if a.quick {
        a.size = 512 << 20;
        a.channels = vec![1, 2];
        a.reps = 3;
    }
    if a.reps == 0 || a.channels.is_empty() || a.content.is_empty() {
        bail!("--reps, --channels and --content need at least one value");
    }
    // A RAM image sets the size of every cell, so all engines and contents move the same bytes.
    let files: Vec<&PathBuf> = a
        .content
        .iter()
        .filter_map(|c| match c {
            ContentSpec::File(p) => Some(p),
            ContentSpec::Synthetic(_) => None,
        })
        .collect();
    if let Some(first) = files.first() {
        let len = std::fs::metadata(first)
            .with_context(|| format!("reading the size of {}", first.display()))?
            .len();
        for f in &files[1..] {
            if std::fs::metadata(f).map(|m| m.len()).ok() != Some(len) {
                bail!("RAM images given with --content file: must all have the same size");
            }
        }
        if len == 0 || len % 4096 != 0 {
            bail!(
                "{} is {len} bytes; a RAM image must be a positive multiple of 4096 bytes",
                first.display()
            );
        }
        a.size = len;
    }
    pagewire::probe_uring().context("pagewire needs io_uring")?;
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];

    // Certificates when a TLS axis is on.
    let cert_dir = tempfile::tempdir()?;
    let pki = if a.tls.contains(&OnOff::On) {
        let set = certs::generate(&certs::CertOptions::default())?;
        set.write(cert_dir.path())?;
        Some((
            TlsClient::new(certs::client_files(cert_dir.path()).load()?, "localhost")?,
            TlsServer::new(certs::server_files(cert_dir.path()).load()?)?,
            set,
        ))
    } else {
        None
    };
    let local_pki = pki.as_ref().map(|p| (p.0.clone(), p.1.clone()));
    // Two hosts: the destination runs `pagewire-bench serve`; every receiver is started there.
    let mut peer = match &a.peer {
        Some(addr) => Some(crate::remote::Peer::connect(addr)?),
        None => None,
    };

    // Memory, generated once per content and shared by every engine.
    let mut memories = Vec::new();
    for c in &a.content {
        let m = Arc::new(GuestMemory::anonymous(&spec)?);
        match c {
            ContentSpec::Synthetic(content) => fill(&m, *content, 11),
            ContentSpec::File(path) => load_image(&m, path)?,
        }
        memories.push((c.clone(), m));
    }

    // Every cell, in a fixed order that each repetition walks through (interleaving).
    let mut cells = Vec::new();
    for (ci, _) in memories.iter().enumerate() {
        for &ch in &a.channels {
            for &t in &a.tls {
                for &comp in &a.compress {
                    for &zc in &a.zero_copy {
                        cells.push((ci, ch, t, comp, zc));
                    }
                }
            }
        }
    }
    let qemu_cells = if with_qemu {
        cells.iter().filter(|c| c.3 != Compression::Auto).count()
    } else {
        0
    };
    let runs_total = (cells.len() + 2 * qemu_cells + a.channels.len()) * a.reps;
    let ram = if with_qemu {
        Some(crate::qemu::RamDir::new(a.size)?)
    } else {
        None
    };
    let mut qemu_runs: Vec<Vec<crate::qemu::QemuRun>> = vec![Vec::new(); cells.len()];
    let mut file_runs: Vec<Vec<Run>> = vec![Vec::new(); cells.len()];
    let bar = ProgressBar::new(runs_total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix("matrix");
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); cells.len()];
    let mut wire = vec![0u64; cells.len()];
    let mut copied = vec![true; cells.len()];
    let mut raw: Vec<Vec<Run>> = vec![Vec::new(); a.channels.len()];
    for _rep in 0..a.reps {
        for (k, &ch) in a.channels.iter().enumerate() {
            bar.set_message(format!("raw TCP, {ch} stream(s)"));
            let run = match peer.as_mut() {
                Some(p) => p.raw(&memories[0].1, ch)?,
                None => {
                    let dst = GuestMemory::anonymous_populated(&spec)?;
                    raw_tcp(&memories[0].1, &dst, usize::from(ch), a.no_pin)?
                }
            };
            raw[k].push(run);
            bar.inc(1);
        }
        for (i, &(ci, ch, t, comp, zc)) in cells.iter().enumerate() {
            let (content, src) = &memories[ci];
            let content = content.name();
            bar.set_message(format!(
                "{content} ch={ch} tls={t:?} compress={comp} zero-copy={zc}"
            ));
            if let Some(p) = peer.as_mut() {
                // Remote cells: the receiver's confirmation says every page was placed; the
                // bytes themselves stay on the other host.
                let tls = if t == OnOff::On { pki.as_ref() } else { None };
                let (run, stats) = p.pagewire(src.clone(), ch, zc, tls, comp)?;
                runs[i].push(run);
                wire[i] = stats.transferred_bytes;
                copied[i] &= stats.zero_copy.completed == stats.zero_copy.copied;
                bar.inc(1);
                continue;
            }
            let dst = Arc::new(GuestMemory::anonymous_populated(&spec)?);
            let tls = if t == OnOff::On {
                local_pki.as_ref()
            } else {
                None
            };
            let (run, stats) = pagewire_run(src.clone(), dst.clone(), ch, zc, a.no_pin, tls, comp)?;
            if runs[i].is_empty() && src.first_difference(&dst).is_some() {
                bail!("destination differs from the source in cell {i}");
            }
            runs[i].push(run);
            wire[i] = stats.transferred_bytes;
            copied[i] &= stats.zero_copy.completed == stats.zero_copy.copied;
            bar.inc(1);
            // QEMU multifd on the same memory with the same settings, right after (A B A B).
            if let (Some(ram), true) = (ram.as_ref(), comp != Compression::Auto) {
                bar.set_message(format!(
                    "QEMU multifd: {content} ch={ch} tls={t:?} compress={comp}"
                ));
                let set = if t == OnOff::On {
                    pki.as_ref().map(|p| &p.2)
                } else {
                    None
                };
                qemu_runs[i].push(crate::qemu::migrate(ram, src, ch, comp, set)?);
                bar.inc(1);
                // pagewire between the same RAM files, right after.
                bar.set_message(format!(
                    "pagewire RAM files: {content} ch={ch} tls={t:?} compress={comp}"
                ));
                let (fsrc, fdst) = ram.pagewire_files()?;
                let (run, _) =
                    pagewire_run(fsrc.clone(), fdst.clone(), ch, zc, a.no_pin, tls, comp)?;
                if file_runs[i].is_empty() && fsrc.first_difference(&fdst).is_some() {
                    bail!("the destination RAM file differs from the source in cell {i}");
                }
                file_runs[i].push(run);
                bar.inc(1);
            }
        }
    }
    bar.set_message("one-core ceilings");
    let ceilings = measure_ceilings(&a, &memories, &raw)?;
    bar.finish_and_clear();

    let mut out_cells = Vec::new();
    for (i, &(ci, ch, t, comp, zc)) in cells.iter().enumerate() {
        let s = summarize("pagewire", a.size, &runs[i]);
        let k = a.channels.iter().position(|&c| c == ch).unwrap_or(0);
        let raw_med = ceilings.raw_tcp_gib_s_by_channels[k].1;
        let qemu = qemu_runs[i].last().map(|last| {
            let as_runs: Vec<Run> = qemu_runs[i]
                .iter()
                .map(|q| Run {
                    seconds: q.seconds,
                    sender_cpu_s: q.source_cpu_s,
                    receiver_cpu_s: q.destination_cpu_s,
                })
                .collect();
            QemuCell {
                summary: summarize("qemu-multifd", a.size, &as_runs),
                transferred: last.transferred,
                duplicate: last.duplicate,
                normal: last.normal,
            }
        });
        let pagewire_over_qemu = qemu
            .as_ref()
            .map(|q| s.gib_per_s_median / q.summary.gib_per_s_median);
        let files = (!file_runs[i].is_empty())
            .then(|| summarize("pagewire-ram-files", a.size, &file_runs[i]));
        let files_over_qemu = files
            .as_ref()
            .zip(qemu.as_ref())
            .map(|(f, q)| f.gib_per_s_median / q.summary.gib_per_s_median);
        let files_over_memory = files
            .as_ref()
            .map(|f| f.gib_per_s_median / s.gib_per_s_median);
        out_cells.push(Cell {
            qemu,
            pagewire_over_qemu,
            pagewire_files: files,
            files_over_qemu,
            files_over_memory,
            content: memories[ci].0.name(),
            channels: ch,
            tls: t,
            compress: comp,
            zero_copy: zc,
            pagewire_over_raw_tcp: s.gib_per_s_median / raw_med,
            raw_tcp_gib_per_s: raw_med,
            pagewire: s,
            wire_bytes: wire[i],
            zero_copy_copied_by_kernel: copied[i],
        });
    }
    let results = Results {
        machine: crate::measure::machine(),
        peer: a.peer.clone(),
        size_bytes: a.size,
        reps: a.reps,
        ceilings,
        cells: out_cells,
    };
    write_results(&a.out, &results)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", markdown(&results));
        println!(
            "\nwrote results.json, results.csv, report.md, throughput.svg, cpu.svg and ratio.svg to {}",
            a.out.display()
        );
    }
    if !a.live.is_empty() {
        if a.peer.is_some() {
            bail!("--live runs both sides on this host: it cannot be combined with --peer");
        }
        let tls = a
            .tls
            .iter()
            .map(|t| match t {
                OnOff::Off => "off".to_string(),
                OnOff::On => "on".to_string(),
            })
            .collect();
        crate::live::run(crate::live::LiveArgs::for_matrix(
            a.size,
            a.live.clone(),
            a.live_working_set,
            a.channels.clone(),
            tls,
            a.reps,
            with_qemu,
            a.out.join("live.json"),
        ))?;
    }
    Ok(())
}

fn measure_ceilings(
    a: &MatrixArgs,
    memories: &[(ContentSpec, Arc<GuestMemory>)],
    raw: &[Vec<Run>],
) -> Result<Ceilings> {
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let gib = a.size as f64 / (1u64 << 30) as f64;
    // DRAM read scan: written zero pages, read whole by the zero scanner.
    let zero = match memories
        .iter()
        .find(|(c, _)| *c == ContentSpec::Synthetic(Content::Zero))
    {
        Some((_, m)) => m.clone(),
        None => {
            let m = Arc::new(GuestMemory::anonymous(&spec)?);
            fill(&m, Content::Zero, 0);
            m
        }
    };
    let scanner = ZeroScanner::detect();
    let r = &zero.regions()[0];
    let t = Instant::now();
    let zeros = (0..r.pages())
        .filter(|&p| r.page_is_zero(&scanner, p))
        .count() as u64;
    let scan = gib / t.elapsed().as_secs_f64();
    if zeros != r.pages() {
        bail!("the zero memory did not scan as zero");
    }
    // memcpy: the source copied out in 64 MiB pieces into one buffer.
    let src = &memories[0].1.regions()[0];
    // Buffers are written before timing, so first-touch page faults are not measured.
    let mut buf = vec![1u8; (64 << 20).min(a.size as usize)];
    let t = Instant::now();
    let mut at = 0u64;
    while at < src.len() {
        let n = (buf.len() as u64).min(src.len() - at) as usize;
        src.read(at, &mut buf[..n]);
        at += n as u64;
    }
    let memcpy = gib / t.elapsed().as_secs_f64();
    let memcpy_all = memcpy_all_cores(src)?;
    // Seal rates on the first content's memory.
    let seal = crate::seal::seal_rates(&memories[0].1)?;
    // zstd level 1 on text-like memory, 512 KiB blocks.
    let text = match memories
        .iter()
        .find(|(c, _)| *c == ContentSpec::Synthetic(Content::Text))
    {
        Some((_, m)) => m.clone(),
        None => {
            let m = Arc::new(GuestMemory::anonymous(&spec)?);
            fill(&m, Content::Text, 11);
            m
        }
    };
    let mut comp = Compressor::new(1)?;
    let mut block = vec![1u8; 512 << 10];
    let mut packed = vec![1u8; 512 << 10];
    let tr = &text.regions()[0];
    let t = Instant::now();
    let mut at = 0u64;
    while at < tr.len() {
        let n = (block.len() as u64).min(tr.len() - at) as usize;
        tr.read(at, &mut block[..n]);
        let _ = comp.compress(Codec::Zstd, &block[..n], &mut packed);
        at += n as u64;
    }
    let zstd = gib / t.elapsed().as_secs_f64();
    Ok(Ceilings {
        dram_read_scan_gib_s: scan,
        memcpy_gib_s: memcpy,
        memcpy_all_cores_gib_s: memcpy_all,
        aead_seal_in_cache_gib_s: seal.aead_in_cache_gib_s,
        pagewire_seal_gib_s: seal.pagewire_seal_gib_s,
        rustls_encrypt_gib_s: seal.rustls_encrypt_gib_s,
        zstd1_text_gib_s: zstd,
        raw_tcp_gib_s_by_channels: a
            .channels
            .iter()
            .zip(raw)
            .map(|(&ch, runs)| (ch, summarize("raw-tcp", a.size, runs).gib_per_s_median))
            .collect(),
    })
}

/// Every allowed core copies its slice of `src` into a 64 MiB buffer of its own (written before
/// timing), as the one-core memcpy ceiling does, all at once: (cores, GiB/s in all).
fn memcpy_all_cores(src: &pagewire::Region) -> Result<(usize, f64)> {
    let cores = crate::measure::cores(false);
    let n = cores.len().max(1);
    let slice = (src.len() / n as u64) & !4095;
    let barrier = std::sync::Barrier::new(n + 1);
    let seconds = std::thread::scope(|scope| {
        let joins: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, cores) = (&barrier, &cores);
                scope.spawn(move || {
                    crate::measure::pin(cores, i, false);
                    let mut buf = vec![1u8; (64 << 20).min(slice as usize).max(4096)];
                    barrier.wait();
                    let t = Instant::now();
                    let mut at = i as u64 * slice;
                    let end = at + slice;
                    while at < end {
                        let len = (buf.len() as u64).min(end - at) as usize;
                        src.read(at, &mut buf[..len]);
                        at += len as u64;
                    }
                    std::hint::black_box(&buf);
                    t.elapsed().as_secs_f64()
                })
            })
            .collect();
        barrier.wait();
        joins
            .into_iter()
            .map(|j| j.join().unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max)
    });
    let bytes = slice * n as u64;
    Ok((n, bytes as f64 / (1u64 << 30) as f64 / seconds))
}

/// Copies the RAM image at `path` into `m` (region 0, same size).
fn load_image(m: &GuestMemory, path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let region = &m.regions()[0];
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0u64;
    while at < region.len() {
        let n = (buf.len() as u64).min(region.len() - at) as usize;
        f.read_exact(&mut buf[..n])
            .with_context(|| format!("reading {}", path.display()))?;
        region.write(at, &buf[..n]);
        at += n as u64;
    }
    Ok(())
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# pagewire matrix\n\nmachine: {}\n\n{} MiB per cell, {} interleaved repetitions; throughput is guest memory end to end, median [min..max].\n\n",
        r.machine,
        r.size_bytes >> 20,
        r.reps
    ));
    let c = &r.ceilings;
    s.push_str("| ceiling (one core unless said) | GiB/s |\n|---|---|\n");
    for (k, v) in [
        ("DRAM read scan", c.dram_read_scan_gib_s),
        ("memcpy", c.memcpy_gib_s),
        ("AEAD seal, in cache", c.aead_seal_in_cache_gib_s),
        ("pagewire copy + seal", c.pagewire_seal_gib_s),
        (
            &format!("memcpy, all {} cores at once", c.memcpy_all_cores_gib_s.0),
            c.memcpy_all_cores_gib_s.1,
        ),
        ("rustls encrypt", c.rustls_encrypt_gib_s),
        ("zstd level 1, text", c.zstd1_text_gib_s),
    ] {
        s.push_str(&format!("| {k} | {v:.2} |\n"));
    }
    s.push_str("\n| content | channels | tls | compress | zero-copy | pagewire GiB/s | raw TCP GiB/s | pagewire/raw | send/recv CPU-s per GiB | wire MiB | kernel copied ZC | QEMU GiB/s | QEMU src/dst CPU-s per GiB | pagewire/QEMU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for cell in &r.cells {
        s.push_str(&format!(
            "| {} | {} | {:?} | {} | {} | {:.2} [{:.2}..{:.2}] | {:.2} | {:.2} | {:.3}/{:.3} | {:.1} | {} | {} | {} | {} |\n",
            cell.content,
            cell.channels,
            cell.tls,
            cell.compress,
            cell.zero_copy,
            cell.pagewire.gib_per_s_median,
            cell.pagewire.gib_per_s_min,
            cell.pagewire.gib_per_s_max,
            cell.raw_tcp_gib_per_s,
            cell.pagewire_over_raw_tcp,
            cell.pagewire.sender_cpu_s_per_gib,
            cell.pagewire.receiver_cpu_s_per_gib,
            cell.wire_bytes as f64 / (1 << 20) as f64,
            if cell.zero_copy_copied_by_kernel { "yes" } else { "no" },
            cell.qemu.as_ref().map_or("-".into(), |q| format!(
                "{:.2} [{:.2}..{:.2}]",
                q.summary.gib_per_s_median, q.summary.gib_per_s_min, q.summary.gib_per_s_max
            )),
            cell.qemu.as_ref().map_or("-".into(), |q| format!(
                "{:.3}/{:.3}",
                q.summary.sender_cpu_s_per_gib, q.summary.receiver_cpu_s_per_gib
            )),
            cell.pagewire_over_qemu.map_or("-".into(), |r| format!("**{r:.2}**")),
        ));
    }
    if r.cells.iter().any(|c| c.pagewire_files.is_some()) {
        s.push_str("
RAM file to RAM file on the huge-page tmpfs QEMU's cells use (pagewire: QEMU's source file to a fresh destination file, end to end):

| content | channels | tls | compress | pagewire files GiB/s | pagewire in memory GiB/s | files/in memory | QEMU GiB/s | files/QEMU |
|---|---|---|---|---|---|---|---|---|
");
        for cell in &r.cells {
            let (Some(f), Some(q)) = (&cell.pagewire_files, &cell.qemu) else {
                continue;
            };
            s.push_str(&format!(
                "| {} | {} | {:?} | {} | {:.2} [{:.2}..{:.2}] | {:.2} | {:.2} | {:.2} | **{:.2}** |\n",
                cell.content,
                cell.channels,
                cell.tls,
                cell.compress,
                f.gib_per_s_median,
                f.gib_per_s_min,
                f.gib_per_s_max,
                cell.pagewire.gib_per_s_median,
                cell.files_over_memory.unwrap_or(0.0),
                q.summary.gib_per_s_median,
                cell.files_over_qemu.unwrap_or(0.0),
            ));
        }
    }
    s
}

/// The three plots: throughput, CPU per GiB, and the ratio to raw TCP, by channel count, one
/// line per combination of the other axes.
fn plots(r: &Results) -> Vec<(&'static str, String)> {
    use crate::svg::{line_chart, Series};
    let mut keys: Vec<String> = Vec::new();
    for c in &r.cells {
        let k = key(c);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let series = |f: &dyn Fn(&Cell) -> f64| -> Vec<Series> {
        keys.iter()
            .map(|k| Series {
                label: k.clone(),
                points: r
                    .cells
                    .iter()
                    .filter(|c| &key(c) == k)
                    .map(|c| (f64::from(c.channels), f(c)))
                    .collect(),
                dashed: false,
            })
            .collect()
    };
    let mut throughput = series(&|c| c.pagewire.gib_per_s_median);
    throughput.push(Series {
        label: "raw TCP (ceiling)".into(),
        points: r
            .ceilings
            .raw_tcp_gib_s_by_channels
            .iter()
            .map(|&(ch, v)| (f64::from(ch), v))
            .collect(),
        dashed: true,
    });
    vec![
        (
            "throughput.svg",
            line_chart(
                "pagewire throughput (median)",
                "channels",
                "GiB/s of guest memory",
                &throughput,
            ),
        ),
        (
            "cpu.svg",
            line_chart(
                "CPU per GiB, sender + receiver",
                "channels",
                "CPU-s/GiB",
                &series(&|c| c.pagewire.sender_cpu_s_per_gib + c.pagewire.receiver_cpu_s_per_gib),
            ),
        ),
        (
            "ratio.svg",
            line_chart(
                "pagewire / raw TCP, same streams",
                "channels",
                "ratio",
                &series(&|c| c.pagewire_over_raw_tcp),
            ),
        ),
    ]
}

fn key(c: &Cell) -> String {
    format!(
        "{} tls={:?} {} zc={}",
        c.content, c.tls, c.compress, c.zero_copy
    )
}

fn write_results(dir: &Path, r: &Results) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, svg) in plots(r) {
        std::fs::write(dir.join(name), svg)?;
    }
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    let mut csv = std::fs::File::create(dir.join("results.csv"))?;
    writeln!(
        csv,
        "content,channels,tls,compress,zero_copy,gib_per_s_median,gib_per_s_min,gib_per_s_max,raw_tcp_gib_per_s,pagewire_over_raw_tcp,sender_cpu_s_per_gib,receiver_cpu_s_per_gib,wire_bytes"
    )?;
    for c in &r.cells {
        writeln!(
            csv,
            "{},{},{:?},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{}",
            c.content,
            c.channels,
            c.tls,
            c.compress,
            c.zero_copy,
            c.pagewire.gib_per_s_median,
            c.pagewire.gib_per_s_min,
            c.pagewire.gib_per_s_max,
            c.raw_tcp_gib_per_s,
            c.pagewire_over_raw_tcp,
            c.pagewire.sender_cpu_s_per_gib,
            c.pagewire.receiver_cpu_s_per_gib,
            c.wire_bytes
        )?;
    }
    Ok(())
}
