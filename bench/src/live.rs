//! `pagewire-bench live`: live migrations while a software dirtier writes the source, over
//! dirty rate × channels × TLS, repeated and interleaved. Per run: total time, downtime (pause
//! to the receiver's verified confirmation), the policy's expected downtime, rounds, whether it
//! converged, and both sides' CPU. The summary checks the targets: downtime within the
//! limit in at least 95% of converged runs, and the expected downtime within 25% of the
//! measured one.
//!
//! The dirtier writes random pages of a working set (a quarter of memory) at the given rate,
//! in its own thread: on a 2-core machine it competes with the shards for CPU, as a busy guest
//! does with migration threads on a host.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use pagewire::dirty::SharedBitmap;
use pagewire::live::dirtier::{DirtierConfig, SoftwareDirtier};
use pagewire::live::{DowntimeLimit, Migration};
use pagewire::synth::{fill, Content};
use pagewire::tls::certs;
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{GuestMemory, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig};

/// Arguments of `pagewire-bench live`.
#[derive(clap::Args)]
pub struct LiveArgs {
    /// Guest memory per run.
    #[arg(long, default_value = "512MiB", value_parser = pagewire::units::parse_size)]
    size: u64,
    /// Dirty rates, bytes per second written by the guest, e.g. 50MiB,200MiB,1GiB.
    #[arg(long, value_delimiter = ',', default_value = "50MB,200MB,800MB", value_parser = pagewire::units::parse_rate)]
    dirty_rate: Vec<u64>,
    /// Channel counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    channels: Vec<u16>,
    /// TLS: off, on (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "off,on")]
    tls: Vec<String>,
    /// The downtime limit.
    #[arg(long, default_value = "300ms", value_parser = pagewire::units::parse_duration_ms)]
    downtime_limit: u64,
    /// Live rounds at most before a run gives up (not converged).
    #[arg(long, default_value_t = 30)]
    rounds_max: u32,
    /// Repetitions of every cell (interleaved).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// One run's figures.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
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
}

fn one(
    a: &LiveArgs,
    tls: Option<&(TlsServer, TlsClient)>,
    dirty_rate: u64,
    channels: u16,
) -> Result<Run> {
    let specs = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let src = Arc::new(GuestMemory::anonymous_populated(&specs)?);
    fill(&src, Content::Mixed, 11);
    let dst = Arc::new(GuestMemory::anonymous_populated(&specs)?);
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            tls: tls.map(|t| t.0.clone()),
            ..ReceiverConfig::default()
        },
    )?;
    let addr = receiver.local_addr()?;
    let rx = std::thread::spawn(move || receiver.run());
    let sender = Sender::connect(
        addr,
        src.clone(),
        &SenderConfig {
            channels,
            pinning: Pinning::None,
            tls: tls.map(|t| t.1.clone()),
            ..SenderConfig::default()
        },
    )?;
    let bitmap = Arc::new(SharedBitmap::new(&src));
    let pages = src.regions()[0].pages();
    let mut guest = SoftwareDirtier::start(
        src.clone(),
        bitmap.clone(),
        DirtierConfig {
            bytes_per_s: dirty_rate,
            region: 0,
            first_page: 0,
            pages: (pages / 4).max(1),
            seed: dirty_rate ^ u64::from(channels),
        },
    )?;
    let policy = DowntimeLimit {
        downtime_limit_ms: a.downtime_limit,
        rounds_max: a.rounds_max,
        ..DowntimeLimit::default()
    };
    let migration = Migration::new(sender, Box::new(bitmap), Box::new(policy));
    let handle = migration.handle();
    let started = Instant::now();
    let result = migration.run(&mut guest);
    guest.stop();
    let received = rx
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
    let s = handle.snapshot();
    let mut run = Run {
        dirty_rate,
        channels,
        tls: tls.is_some(),
        converged: false,
        reason: None,
        rounds: s.rounds.len(),
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        downtime_ms: None,
        expected_downtime_ms: s.expected_downtime_ms,
        sender_cpu_ms: 0.0,
        receiver_cpu_ms: 0.0,
    };
    match (result, received) {
        (Ok(report), Ok(r)) => {
            if src.first_difference(&dst).is_some() {
                anyhow::bail!("the destination differs from the paused source");
            }
            run.converged = report.converged;
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Runs the grid (see the module docs).
pub fn run(a: LiveArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    certs::generate(&certs::CertOptions::default())?.write(dir.path())?;
    let tls = (
        TlsServer::new(certs::server_files(dir.path()).load()?)?,
        TlsClient::new(certs::client_files(dir.path()).load()?, "localhost")?,
    );
    let mut runs = Vec::new();
    for rep in 0..a.reps {
        for &rate in &a.dirty_rate {
            for &channels in &a.channels {
                for t in &a.tls {
                    let on = t == "on";
                    let r = one(&a, on.then_some(&tls), rate, channels)?;
                    if !a.json {
                        eprintln!(
                            "rep {}/{}: {:>5.0} MiB/s, {channels} ch, tls {t}: {} in {} round(s), downtime {}, expected {:.1} ms",
                            rep + 1,
                            a.reps,
                            rate as f64 / f64::from(1 << 20),
                            if r.converged { "converged" } else { "gave up" },
                            r.rounds,
                            r.downtime_ms.map_or("-".into(), |d| format!("{d:.1} ms")),
                            r.expected_downtime_ms
                        );
                    }
                    runs.push(r);
                }
            }
        }
    }
    let converged: Vec<&Run> = runs.iter().filter(|r| r.converged).collect();
    let within = converged
        .iter()
        .filter(|r| r.downtime_ms.is_some_and(|d| d <= a.downtime_limit as f64))
        .count();
    let mut errors: Vec<f64> = converged
        .iter()
        .filter_map(|r| {
            let d = r.downtime_ms?;
            Some((r.expected_downtime_ms - d).abs() / d.max(1e-3))
        })
        .collect();
    let median_error = median(&mut errors);
    let within_25 = errors.iter().filter(|e| **e <= 0.25).count();
    let summary = serde_json::json!({
        "runs": runs.len(),
        "converged": converged.len(),
        "downtime_within_limit": within,
        "downtime_within_limit_fraction": within as f64 / converged.len().max(1) as f64,
        "estimate_error_median": median_error,
        "estimate_within_25_percent": within_25,
        "downtime_limit_ms": a.downtime_limit,
    });
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "summary": summary, "runs": runs })
        );
        return Ok(());
    }
    println!(
        "| dirty rate | channels | TLS | converged | rounds (median) | total ms | downtime ms | expected ms | send CPU ms | recv CPU ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &rate in &a.dirty_rate {
        for &channels in &a.channels {
            for t in &a.tls {
                let cell: Vec<&Run> = runs
                    .iter()
                    .filter(|r| {
                        r.dirty_rate == rate && r.channels == channels && r.tls == (t == "on")
                    })
                    .collect();
                let m = |f: &dyn Fn(&Run) -> Option<f64>| {
                    let mut v: Vec<f64> = cell.iter().filter_map(|r| f(r)).collect();
                    median(&mut v)
                };
                println!(
                    "| {:.0} MiB/s | {channels} | {t} | {}/{} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} |",
                    rate as f64 / f64::from(1 << 20),
                    cell.iter().filter(|r| r.converged).count(),
                    cell.len(),
                    m(&|r| Some(r.rounds as f64)),
                    m(&|r| Some(r.total_ms)),
                    m(&|r| r.downtime_ms),
                    m(&|r| r.converged.then_some(r.expected_downtime_ms)),
                    m(&|r| r.converged.then_some(r.sender_cpu_ms)),
                    m(&|r| r.converged.then_some(r.receiver_cpu_ms)),
                );
            }
        }
    }
    println!(
        "\n{} of {} runs converged; downtime within the {} ms limit in {} of them ({:.0}%); the expected downtime was within 25% of the measured one in {} (median error {:.0}%)",
        converged.len(),
        runs.len(),
        a.downtime_limit,
        within,
        100.0 * within as f64 / converged.len().max(1) as f64,
        within_25,
        100.0 * median_error
    );
    Ok(())
}
