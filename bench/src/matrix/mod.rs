//! `pagewire-bench matrix`: every combination of the chosen axes, repeated and interleaved
//! (A B A B, because these machines drift), with the machine's ceilings measured in the same run:
//! raw TCP with the same streams and bytes, a one-core DRAM read scan and memcpy, one-core AEAD,
//! pagewire-seal and rustls-encrypt rates, and a one-core zstd rate. Writes `results.json`,
//! `results.csv`, `report.md` and three SVG plots (throughput, CPU-s/GiB and the ratio to raw TCP,
//! by channel count) to `--out`; with `--live`, the live rows' `live.json` and `live.md` too,
//! whose tables `report.md` ends with.
//!
//! Each cell's throughput is end to end: from the sender's connect until the receiver has
//! confirmed every page, into a pre-faulted destination (faults are not measured).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pagewire::pipeline::compress::Compression;
use pagewire::synth::{fill, Content};
use pagewire::tls::{certs, TlsClient, TlsServer};
use pagewire::{GuestMemory, RegionSpec, ZeroCopy};
use serde::Serialize;

use crate::measure::{pagewire_run, raw_tcp, refresh_free_memory, touch, Run, Security};

mod ceilings;
mod cells;
mod report;
use ceilings::Ceilings;
use cells::{cell, cell_keys, qemu_owners, Cell, CellRuns};
use report::{markdown, write_results};

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
    /// Page checksums of plaintext cells: on (the default), off (`pagewire send
    /// --no-page-checksums`: TCP's checksum only, as QEMU's multifd). TLS cells are covered by
    /// their AEAD and run once. QEMU runs once per cell either way, and both rows show it.
    #[arg(long, value_delimiter = ',', default_value = "on")]
    page_checksums: Vec<OnOff>,
    /// Repetitions of every cell (interleaved).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Directory for results.json, results.csv and report.md.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Print the results as one JSON object on stdout too.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    net: crate::measure::Net,
    /// Run QEMU's multifd migration of the same content side by side (same channels, TLS and
    /// compression; needs qemu-system-x86, /dev/kvm and root, skipped with a reason otherwise).
    #[arg(long)]
    with_qemu: bool,
    /// Live rows after the static cells: migrations of a running guest (the tiny KVM guest, or
    /// the software dirtier without /dev/kvm) at these dirty rates × the channels × TLS, with
    /// QEMU side by side under --with-qemu. Written to `live.json` and `live.md` in --out, and
    /// their tables appended to `report.md` (see `pagewire-bench live` for more settings).
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

#[derive(Serialize)]
struct Results {
    machine: String,
    /// The destination, when it was another host.
    peer: Option<String>,
    size_bytes: u64,
    reps: usize,
    /// pagewire's shards and raw TCP's threads were placed as pagewire's defaults place them:
    /// senders one core each, receivers within their node's cores (QEMU's are never pinned).
    pinned: bool,
    /// Where each stream's receiving thread ran relative to its sender (`--receiver-placement`).
    receiver_placement: crate::measure::ReceiverPlacement,
    ceilings: Ceilings,
    cells: Vec<Cell>,
}

/// Runs the matrix.
/// Checks the options against each other and applies the presets, before anything is measured:
/// `--quick`, and a RAM image's size for every cell. Returns whether the QEMU rows run (said on
/// stderr when `--with-qemu` cannot).
fn settle(a: &mut MatrixArgs) -> Result<bool> {
    if a.with_qemu && a.peer.is_some() {
        bail!("--with-qemu runs both QEMUs on this host: it cannot be combined with --peer");
    }
    if !a.live.is_empty() && a.peer.is_some() {
        bail!("--live runs both sides on this host: it cannot be combined with --peer");
    }
    a.net.check()?;
    if a.net.congestion.is_some() && a.peer.is_some() {
        bail!(
            "--congestion applies to connections on this host: it cannot be combined with --peer"
        );
    }
    if a.net.receiver_placement != crate::measure::ReceiverPlacement::Free && a.peer.is_some() {
        bail!(
            "--receiver-placement places receivers on this host: it cannot be combined with --peer"
        );
    }
    crate::qemu::check_congestion(a.with_qemu, a.net.congestion.as_deref())?;
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
    Ok(a.with_qemu
        && match crate::qemu::unavailable() {
            Some(why) => {
                eprintln!("SKIPPED: the QEMU rows: {why}");
                false
            }
            None => true,
        })
}

/// Runs the matrix: see the module docs.
pub fn run(mut a: MatrixArgs) -> Result<()> {
    let with_qemu = settle(&mut a)?;
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
        Some(addr) => Some(crate::remote::Peer::connect(addr, !a.net.no_pin)?),
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

    let cells = cell_keys(memories.len(), &a);
    let qemu_owner = qemu_owners(&cells);
    let qemu_cells = if with_qemu {
        cells
            .iter()
            .enumerate()
            .filter(|&(i, c)| c.3 != Compression::Auto && qemu_owner[i] == i)
            .count()
    } else {
        0
    };
    let runs_total = (cells.len() + 2 * qemu_cells + a.channels.len()) * a.reps;
    let ram = if with_qemu {
        Some(crate::qemu::RamDir::new(a.size)?)
    } else {
        None
    };
    let bar = ProgressBar::new(runs_total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix("matrix");
    let mut measured: Vec<CellRuns> = cells.iter().map(|_| CellRuns::default()).collect();
    let mut raw: Vec<Vec<Run>> = vec![Vec::new(); a.channels.len()];
    // A KVM guest run before the matrix (a live migration's, a VM's) leaves the same slow
    // pages behind as QEMU's runs within it.
    refresh_free_memory(a.size);
    for rep in 0..a.reps {
        for (k, &ch) in a.channels.iter().enumerate() {
            bar.set_message(format!("raw TCP, {ch} stream(s)"));
            let run = match peer.as_mut() {
                Some(p) => p.raw(&memories[0].1, ch)?,
                None => {
                    let dst = GuestMemory::anonymous_populated(&spec)?;
                    touch(&memories[0].1);
                    raw_tcp(&memories[0].1, &dst, usize::from(ch), &a.net)?
                }
            };
            raw[k].push(run);
            bar.inc(1);
        }
        // Every other repetition walks the cells backwards (A B C, C B A): a cell's position
        // (what ran just before it) then weighs on no cell more than on its neighbours.
        let order: Vec<usize> = if rep % 2 == 0 {
            (0..cells.len()).collect()
        } else {
            (0..cells.len()).rev().collect()
        };
        for i in order {
            let (ci, ch, t, comp, zc, pc) = cells[i];
            let (content, src) = &memories[ci];
            let content = content.name();
            let m = &mut measured[i];
            bar.set_message(format!(
                "{content} ch={ch} tls={t:?} compress={comp} zero-copy={zc} checksums={pc:?}"
            ));
            let checksums = pc == OnOff::On;
            if let Some(p) = peer.as_mut() {
                // Remote cells: the receiver's confirmation says every page was placed; the
                // bytes themselves stay on the other host.
                let tls = if t == OnOff::On { pki.as_ref() } else { None };
                let (run, stats) = p.pagewire(src.clone(), ch, zc, tls, comp, checksums)?;
                m.note(run, &stats);
                bar.inc(1);
                continue;
            }
            let dst = Arc::new(GuestMemory::anonymous_populated(&spec)?);
            let security = match (t, checksums) {
                (OnOff::On, _) => local_pki.as_ref().map_or(Security::Plain, Security::Tls),
                (OnOff::Off, true) => Security::Plain,
                (OnOff::Off, false) => Security::PlainUnchecked,
            };
            touch(src);
            let (run, stats) =
                pagewire_run(src.clone(), dst.clone(), ch, zc, &a.net, security, comp)?;
            if m.pagewire.is_empty() && src.first_difference(&dst).is_some() {
                bail!("destination differs from the source in cell {i}");
            }
            m.note(run, &stats);
            bar.inc(1);
            // QEMU multifd on the same memory with the same settings, right after (A B A B).
            if let (Some(ram), true) = (
                ram.as_ref(),
                comp != Compression::Auto && qemu_owner[i] == i,
            ) {
                bar.set_message(format!(
                    "QEMU multifd: {content} ch={ch} tls={t:?} compress={comp}"
                ));
                let set = if t == OnOff::On {
                    pki.as_ref().map(|p| &p.2)
                } else {
                    None
                };
                m.qemu.push(crate::qemu::migrate(ram, src, ch, comp, set)?);
                // The pages handed out after a KVM guest ran are slow on first use: see
                // `refresh_free_memory`.
                refresh_free_memory(a.size);
                bar.inc(1);
                // pagewire between the same RAM files, right after.
                bar.set_message(format!(
                    "pagewire RAM files: {content} ch={ch} tls={t:?} compress={comp}"
                ));
                let (fsrc, fdst) = ram.pagewire_files()?;
                let (run, _) =
                    pagewire_run(fsrc.clone(), fdst.clone(), ch, zc, &a.net, security, comp)?;
                if m.files.is_empty() && fsrc.first_difference(&fdst).is_some() {
                    bail!("the destination RAM file differs from the source in cell {i}");
                }
                m.files.push(run);
                bar.inc(1);
            }
        }
    }
    bar.set_message("one-core ceilings");
    let ceilings = ceilings::measure(&a, &memories, &raw)?;
    bar.finish_and_clear();

    let out_cells = cells
        .iter()
        .enumerate()
        .map(|(i, &key)| {
            let k = a.channels.iter().position(|&c| c == key.1).unwrap_or(0);
            let raw_med = ceilings.raw_tcp_gib_s_by_channels[k].1;
            let qemu = &measured[qemu_owner[i]].qemu;
            cell(
                a.size,
                memories[key.0].0.name(),
                key,
                &measured[i],
                qemu,
                raw_med,
            )
        })
        .collect();
    let results = Results {
        machine: crate::measure::machine(),
        peer: a.peer.clone(),
        size_bytes: a.size,
        reps: a.reps,
        pinned: !a.net.no_pin,
        receiver_placement: a.net.receiver_placement,
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
        let tls = a
            .tls
            .iter()
            .map(|t| match t {
                OnOff::Off => "off".to_string(),
                OnOff::On => "on".to_string(),
            })
            .collect();
        crate::live::run_for_matrix(
            &a.out,
            crate::live::LiveArgs::for_matrix(
                a.size,
                a.live.clone(),
                a.live_working_set,
                a.channels.clone(),
                tls,
                a.reps,
                with_qemu,
                a.net.congestion.clone(),
                !a.json,
            ),
        )?;
    }
    Ok(())
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
