//! `pagewire-bench live`: live migrations while a software dirtier writes the source, over
//! dirty rate × channels × TLS, repeated and interleaved. Per run: total time, downtime (pause
//! to the receiver's verified confirmation), the policy's expected downtime, rounds, whether it
//! converged, and both sides' CPU. The summary checks the targets: downtime within the
//! limit in at least 95% of converged runs, and the expected downtime within 25% of the
//! measured one.
//!
//! The guest writes pages of a working set (a quarter of memory unless `--working-set` says)
//! at the given rate: either a software dirtier (random pages, in its own thread) or, with
//! `--guest kvm`, the tiny KVM guest of `pagewire::live::guestcode` (pages in turn, paced by a
//! 1 ms tick). Either competes with the shards for CPU, as a busy guest does with migration
//! threads on a host.
//!
//! `--with-qemu` runs the tiny KVM guest under QEMU too (the same code, booted as its
//! firmware) and migrates it with QEMU multifd, without auto-converge, at the same dirty rate,
//! downtime limit, channels and TLS, interleaved with pagewire's runs; a QEMU run that passes
//! the same round or time cap is cancelled and counts as not converged. The summary names the
//! highest dirty rate at which each engine converged in every run.
//!
//! `--auto-converge` lets both engines throttle the guest's vCPU with QEMU's steps (pagewire's
//! `live::AutoConverge`, QEMU's `auto-converge` capability); the table then shows the throttle
//! each run ended at.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pagewire::dirty::{DirtySource, SharedBitmap};
use pagewire::live::dirtier::{DirtierConfig, SoftwareDirtier};
use pagewire::live::guestcode::WORKING_SET_GPA;
use pagewire::live::tinyguest::{AnyGuest as Guest, TinyGuest};
use pagewire::live::{DowntimeLimit, Migration};
use pagewire::synth::{fill, Content};
use pagewire::tls::certs;
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{GuestMemory, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig};

mod args;
mod repeat;
mod report;
use crate::matrix::OnOff;
pub use args::{GuestKind, LiveArgs};
use repeat::repeated_rounds;
use report::summary;

/// One run's figures.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    engine: &'static str,
    dirty_rate: u64,
    channels: u16,
    tls: bool,
    converged: bool,
    reason: Option<String>,
    rounds: usize,
    total_ms: f64,
    downtime_ms: Option<f64>,
    expected_downtime_ms: f64,
    sender_cpu_ms: f64,
    receiver_cpu_ms: f64,
    /// Pages per second the guest actually wrote during the migration (KVM guest only).
    guest_pages_per_s: Option<f64>,
    /// pagewire's rounds (empty for QEMU).
    round_figures: Vec<pagewire::live::RoundFigures>,
    /// The vCPU throttle at the end (auto-converge), percent.
    throttle_percent: u8,
    /// Bytes the migration put on the wire (pagewire's `transferred`, QEMU's
    /// `ram.transferred`), and their rate over the whole migration, MB/s: with
    /// `--max-bandwidth`, what each engine made of the limit.
    wire_bytes: u64,
    wire_mb_per_s: f64,
}

impl Run {
    /// A run that failed outright, `why` said: not converged, no figures.
    fn failed(engine: &'static str, dirty_rate: u64, channels: u16, tls: bool, why: String) -> Run {
        Run {
            engine,
            dirty_rate,
            channels,
            tls,
            converged: false,
            reason: Some(why),
            rounds: 0,
            total_ms: f64::NAN,
            downtime_ms: None,
            expected_downtime_ms: f64::NAN,
            sender_cpu_ms: f64::NAN,
            receiver_cpu_ms: f64::NAN,
            guest_pages_per_s: None,
            round_figures: Vec::new(),
            throttle_percent: 0,
            wire_bytes: 0,
            wire_mb_per_s: f64::NAN,
        }
    }
}

/// Every run's initial guest memory: `a.size` bytes of mixed content, the same each time.
fn initial_memory(a: &LiveArgs) -> Result<(GuestMemory, [RegionSpec; 1])> {
    let specs = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let src = GuestMemory::anonymous_populated(&specs)?;
    fill(&src, Content::Mixed, 11);
    Ok((src, specs))
}

/// A sender and a receiver over loopback, each side's memory the run's initial memory (the
/// destination's faulted in), set up as every pagewire run here is.
struct Session {
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    sender: Sender,
    receiver: std::thread::JoinHandle<pagewire::Result<pagewire::TransferStats>>,
    /// Milliseconds connecting and the handshakes took: they count in the total, as they do
    /// in QEMU's `total-time`.
    connect_ms: f64,
}

fn session(a: &LiveArgs, tls: Option<&(TlsServer, TlsClient)>, channels: u16) -> Result<Session> {
    let (src, specs) = initial_memory(a)?;
    let src = Arc::new(src);
    let dst = Arc::new(GuestMemory::anonymous_populated(&specs)?);
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst.clone(),
        ReceiverConfig {
            pinning: if a.pin { Pinning::Nodes } else { Pinning::None },
            tls: tls.map(|t| t.0.clone()),
            accept_unchecked_pages: a.page_checksums == OnOff::Off,
            ..ReceiverConfig::default()
        },
    )?;
    let addr = receiver.local_addr()?;
    let rx = std::thread::spawn(move || receiver.run());
    let connecting = Instant::now();
    let sender = Sender::connect(
        addr,
        src.clone(),
        &SenderConfig {
            channels,
            pinning: if a.pin { Pinning::Cores } else { Pinning::None },
            tls: tls.map(|t| t.1.clone()),
            congestion: a.congestion.clone(),
            zero_copy: a.zero_copy,
            page_checksums: a.page_checksums == OnOff::On,
            max_bandwidth_bytes_per_s: a.max_bandwidth,
            ..SenderConfig::default()
        },
    )?;
    Ok(Session {
        src,
        dst,
        sender,
        receiver: rx,
        connect_ms: connecting.elapsed().as_secs_f64() * 1e3,
    })
}

fn one(
    a: &LiveArgs,
    tls: Option<&(TlsServer, TlsClient)>,
    dirty_rate: u64,
    channels: u16,
) -> Result<Run> {
    // What the run before left behind (QEMU's exit, freed memory) finishes first.
    crate::measure::wait_quiet(crate::measure::QUIET_WAIT_MS_MAX);
    let Session {
        src,
        dst,
        sender,
        receiver: rx,
        connect_ms,
    } = session(a, tls, channels)?;
    let (mut guest, dirty): (Guest, Box<dyn DirtySource>) = match a.guest {
        GuestKind::Software => {
            let bitmap = Arc::new(SharedBitmap::new(&src));
            let g = SoftwareDirtier::start(
                src.clone(),
                bitmap.clone(),
                DirtierConfig {
                    bytes_per_s: dirty_rate,
                    region: 0,
                    first_page: 0,
                    pages: (a.working_set_bytes() / 4096).max(1),
                    seed: dirty_rate ^ u64::from(channels),
                },
            )?;
            (Guest::Software(g), Box::new(bitmap))
        }
        GuestKind::Kvm => {
            let g = TinyGuest::start(src.clone(), a.guest_params(dirty_rate))?;
            let log = g.dirty_log();
            (Guest::Kvm(g), Box::new(log))
        }
    };
    std::thread::sleep(std::time::Duration::from_millis(a.warmup_ms));
    let counter0 = match &guest {
        Guest::Kvm(g) => g.counter(),
        Guest::Software(_) => 0,
    };
    let limit = DowntimeLimit {
        downtime_limit_ms: a.downtime_limit,
        rounds_max: a.rounds_max,
        total_ms_max: a.time_max,
    };
    let policy = limit.policy(a.auto_converge);
    let migration = Migration::new(sender, dirty, policy);
    let handle = migration.handle();
    let started = Instant::now();
    let result = migration.run(&mut guest);
    let elapsed = started.elapsed();
    let guest_pages_per_s = match &mut guest {
        Guest::Kvm(g) => {
            g.stop()?;
            let at_pause = g.counter_at_pause.unwrap_or(counter0);
            Some(f64::from(at_pause.wrapping_sub(counter0)) / elapsed.as_secs_f64())
        }
        Guest::Software(g) => {
            g.stop();
            None
        }
    };
    let received = rx
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
    let s = handle.snapshot();
    let mut run = Run {
        engine: "pagewire",
        dirty_rate,
        channels,
        tls: tls.is_some(),
        converged: false,
        reason: None,
        rounds: s.rounds.len(),
        total_ms: connect_ms + elapsed.as_secs_f64() * 1e3,
        downtime_ms: None,
        expected_downtime_ms: s.expected_downtime_ms,
        sender_cpu_ms: 0.0,
        receiver_cpu_ms: 0.0,
        guest_pages_per_s,
        round_figures: s.rounds.clone(),
        throttle_percent: s.cpu_throttle_percentage,
        wire_bytes: s.transferred,
        wire_mb_per_s: s.transferred as f64 / (elapsed.as_secs_f64() * 1e6),
    };
    match (result, received) {
        (Ok(report), Ok(r)) => {
            if src.first_difference(&dst).is_some() {
                anyhow::bail!("the destination differs from the paused source");
            }
            // The policy looks at its time cap only between rounds: a run that stopped the guest
            // after the cap counts as not converged, as QEMU's runs are cancelled at the cap.
            run.converged = report.converged && run.total_ms <= a.time_max as f64;
            if report.converged && !run.converged {
                run.reason = Some(format!(
                    "converged after {:.0} ms, past the {} ms cap",
                    run.total_ms, a.time_max
                ));
            }
            run.downtime_ms = report.snapshot.downtime_ms;
            run.sender_cpu_ms = report.transfer.cpu_ms;
            run.receiver_cpu_ms = r.cpu_ms;
        }
        (Err(pagewire::Error::NotConverging(why)), Err(_)) => run.reason = Some(why),
        (Err(e), _) => return Err(e).context("the migration failed"),
        (Ok(_), Err(e)) => return Err(e).context("the receiver failed"),
    }
    Ok(run)
}

/// The QEMU run of one cell, as a [`Run`].
fn one_qemu(
    a: &LiveArgs,
    ram: &crate::qemu::RamDir,
    certs: Option<&certs::CertSet>,
    dirty_rate: u64,
    channels: u16,
) -> Result<Run> {
    crate::measure::wait_quiet(crate::measure::QUIET_WAIT_MS_MAX);
    // The same initial memory as pagewire's runs; QEMU's firmware loads the guest over it.
    let (src, _) = initial_memory(a)?;
    let q = crate::qemu::migrate_live(
        ram,
        &src,
        &crate::qemu::LiveSpec {
            guest: a.guest_params(dirty_rate),
            channels,
            tls: certs,
            downtime_limit_ms: a.downtime_limit,
            rounds_max: a.rounds_max,
            total_ms_max: a.time_max,
            warmup_ms: a.warmup_ms,
            auto_converge: a.auto_converge,
            max_bandwidth: a.max_bandwidth,
        },
    )?;
    Ok(Run {
        engine: "qemu",
        dirty_rate,
        channels,
        tls: certs.is_some(),
        // The same rule as pagewire's runs: completed past the time cap is not converged.
        converged: q.converged && q.total_ms <= a.time_max as f64,
        reason: if !q.converged {
            Some(format!("not complete after {} rounds", q.rounds))
        } else if q.total_ms > a.time_max as f64 {
            Some(format!(
                "converged after {:.0} ms, past the {} ms cap",
                q.total_ms, a.time_max
            ))
        } else {
            None
        },
        rounds: q.rounds as usize,
        total_ms: q.total_ms,
        downtime_ms: q.downtime_ms,
        expected_downtime_ms: q.expected_downtime_ms.unwrap_or(f64::NAN),
        sender_cpu_ms: q.source_cpu_ms,
        receiver_cpu_ms: q.destination_cpu_ms,
        guest_pages_per_s: Some(q.guest_pages_per_s),
        round_figures: Vec::new(),
        throttle_percent: q.throttle_percent,
        wire_bytes: q.transferred_bytes,
        wire_mb_per_s: q.transferred_bytes as f64 / (q.total_ms * 1e3),
    })
}

/// Runs `--discard-first` migrations of the grid's first cell, saying on stderr what each
/// measured (so a reader sees the host settle). Their figures stay out of the grid's runs and
/// summary; the JSON keeps them apart, as `discarded_runs`.
fn discard_first_runs(a: &LiveArgs, tls: &(TlsServer, TlsClient)) -> Result<Vec<Run>> {
    let (Some(&rate), Some(&channels), Some(t)) =
        (a.dirty_rate.first(), a.channels.first(), a.tls.first())
    else {
        return Ok(Vec::new());
    };
    let on = t == "on";
    let mut discarded = Vec::with_capacity(a.discard_first);
    for k in 0..a.discard_first {
        let r = one(a, on.then_some(tls), rate, channels)
            .with_context(|| format!("discarded run {}/{}", k + 1, a.discard_first))?;
        if !a.json {
            eprintln!(
                "discarded run {}/{}: {:.0} MiB/s, {channels} ch, tls {t}: {}, {:.0} ms, downtime {}, expected {:.1} ms",
                k + 1,
                a.discard_first,
                rate as f64 / f64::from(1 << 20),
                if r.converged { "converged" } else { "gave up" },
                r.total_ms,
                r.downtime_ms.map_or("-".into(), |d| format!("{d:.1} ms")),
                r.expected_downtime_ms,
            );
        }
        discarded.push(r);
    }
    Ok(discarded)
}

/// Where the report of a grid whose JSON results go to `json` is written: beside it, with the
/// extension `md`.
pub fn markdown_path(json: &std::path::Path) -> std::path::PathBuf {
    json.with_extension("md")
}

/// `matrix --live`: runs the live rows `a` into `live.json` and `live.md` in the matrix's
/// output directory `dir` (an earlier run's removed first, so they cannot pass for this run's)
/// and appends their tables to its `report.md`, also when some runs failed (they are in the
/// tables as not converged).
pub fn run_for_matrix(dir: &std::path::Path, mut a: LiveArgs) -> Result<()> {
    let json = dir.join("live.json");
    for stale in [json.clone(), markdown_path(&json)] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", stale.display()))
            }
            _ => {}
        }
    }
    a.out = Some(json.clone());
    let live = run(a);
    if let Ok(tables) = std::fs::read_to_string(markdown_path(&json)) {
        let report = dir.join("report.md");
        let mut md = std::fs::read_to_string(&report)
            .with_context(|| format!("reading {}", report.display()))?;
        md.push_str("\n## Live migrations\n\n");
        md.push_str(&tables);
        std::fs::write(&report, md).with_context(|| format!("writing {}", report.display()))?;
    }
    live
}

/// Runs the grid (see the module docs).
pub fn run(mut a: LiveArgs) -> Result<()> {
    if let Some(out) = &a.out {
        if markdown_path(out) == *out {
            bail!(
                "--out {}: the JSON results need another name than the Markdown report written beside them (for example results.json)",
                out.display()
            );
        }
    }
    if let Some(name) = &a.congestion {
        pagewire::config::check_congestion(name)?;
    }
    crate::qemu::check_congestion(a.with_qemu, a.congestion.as_deref())?;
    if a.with_qemu {
        if let Some(why) = crate::qemu::unavailable() {
            bail!("--with-qemu: {why}");
        }
        a.guest = GuestKind::Kvm;
    }
    if a.guest == GuestKind::Kvm {
        if let Err(why) = pagewire::live::tinyguest::probe() {
            bail!("--guest kvm: {why}");
        }
        if a.size <= WORKING_SET_GPA {
            bail!("--guest kvm needs more than 1 MiB of memory");
        }
    }
    let dir = tempfile::tempdir()?;
    let cert_set = certs::generate(&certs::CertOptions::default())?;
    cert_set.write(dir.path())?;
    let tls = (
        TlsServer::new(certs::server_files(dir.path()).load()?)?,
        TlsClient::new(certs::client_files(dir.path()).load()?, "localhost")?,
    );
    let ram = if a.with_qemu {
        Some(crate::qemu::RamDir::new(a.size)?)
    } else {
        None
    };
    let discarded = discard_first_runs(&a, &tls)?;
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for rep in 0..a.reps {
        for &rate in &a.dirty_rate {
            for &channels in &a.channels {
                for t in &a.tls {
                    let on = t == "on";
                    // The engines take turns at going first (the first run after a KVM guest
                    // exits can be slower, see `measure`).
                    let qemu = |a: &LiveArgs| match &ram {
                        Some(ram) => {
                            one_qemu(a, ram, on.then_some(&cert_set), rate, channels).map(Some)
                        }
                        None => Ok(None),
                    };
                    // A run that fails outright (not a policy giving up) is kept as a failed
                    // row, so one failure does not lose the grid; the command fails at the end.
                    let mut settle = |engine, r: Result<Option<Run>>| match r {
                        Ok(r) => r,
                        Err(e) => {
                            let why = format!("failed: {e:#}");
                            failures.push(format!(
                                "{engine}, {} MiB/s, {channels} ch, tls {t}, rep {}: {why}",
                                rate >> 20,
                                rep + 1
                            ));
                            Some(Run::failed(engine, rate, channels, on, why))
                        }
                    };
                    let mut cell = Vec::new();
                    if rep % 2 == 1 {
                        cell.extend(settle("qemu", qemu(&a)));
                    }
                    let own = one(&a, on.then_some(&tls), rate, channels).map(Some);
                    cell.extend(settle("pagewire", own));
                    if rep % 2 == 0 {
                        cell.extend(settle("qemu", qemu(&a)));
                    }
                    for r in cell {
                        if !a.json {
                            eprintln!(
                                "rep {}/{}: {:>8} {:>5.0} MiB/s, {channels} ch, tls {t}: {} in {} round(s), {:.0} ms, downtime {}, expected {:.1} ms, wire {:.0} MB/s{}",
                                rep + 1,
                                a.reps,
                                r.engine,
                                rate as f64 / f64::from(1 << 20),
                                match (r.converged, r.reason.as_deref()) {
                                    (true, _) => "converged",
                                    (false, Some(w)) if w.starts_with("failed") => "FAILED",
                                    (false, _) => "gave up",
                                },
                                r.rounds,
                                r.total_ms,
                                r.downtime_ms.map_or("-".into(), |d| format!("{d:.1} ms")),
                                r.expected_downtime_ms,
                                r.wire_mb_per_s,
                                r.guest_pages_per_s.map_or(String::new(), |p| format!(
                                    ", guest wrote {:.0} MB/s",
                                    p * 4096.0 / 1e6
                                )),
                            );
                        }
                        runs.push(r);
                    }
                }
            }
        }
    }
    let mut repeats = Vec::new();
    if a.repeat_rounds > 0 {
        for &channels in &a.channels {
            for t in &a.tls {
                let on = t == "on";
                if !a.json {
                    eprintln!("the same round repeated: {channels} ch, tls {t}");
                }
                repeats.extend(repeated_rounds(&a, on.then_some(&tls), channels)?);
            }
        }
    }
    let engines: Vec<&'static str> = if a.with_qemu {
        vec!["pagewire", "qemu"]
    } else {
        vec!["pagewire"]
    };
    let summaries: Vec<serde_json::Value> = engines
        .iter()
        .map(|e| summary(&a, runs.iter().filter(|r| r.engine == *e).collect(), e))
        .collect();
    let settings = serde_json::json!({
        "zero_copy": a.zero_copy.to_string(),
        "page_checksums": a.page_checksums,
        "congestion": a.congestion,
        "pin": a.pin,
        "guest": a.guest,
        "size": a.size,
        "working_set": a.working_set_bytes(),
        "downtime_limit_ms": a.downtime_limit,
        "max_bandwidth_bytes_per_s": a.max_bandwidth,
        "discarded_first_runs": a.discard_first,
        "described": report::settings_line(&a),
    });
    let results = serde_json::json!({
        "settings": settings,
        "summary": summaries,
        "runs": runs,
        "discarded_runs": discarded,
        "repeated_rounds": repeats,
    });
    let markdown = report::markdown(&a, &runs, &engines, &summaries, &repeats);
    if let Some(path) = &a.out {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let md = markdown_path(path);
        std::fs::write(&md, &markdown).with_context(|| format!("writing {}", md.display()))?;
    }
    if a.json {
        println!("{results}");
    } else if a.print {
        print!("{markdown}");
    }
    if !failures.is_empty() {
        bail!(
            "{} run(s) failed (kept in the results as not converged):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
