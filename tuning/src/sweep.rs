//! `pagewire-tune serve` and `pagewire-tune sweep`: measure sender settings against a receiver
//! and write the best as a tuning profile ([`pagewire::profile`]).
//!
//! `serve` is a receiver that takes one transfer after another into the same (pre-faulted)
//! memory, so every measurement sees warm destination memory. `sweep` measures against it, or
//! against `pagewire-bench serve` (`--server bench`), which starts a plaintext receiver in
//! fresh, pre-faulted memory for each transfer and reports that receiver's CPU time, so the
//! profile also holds the destination's CPU per GiB. `sweep` sends the same source
//! memory with each combination of channels, zero-copy, compression and TCP congestion control
//! (the host's default, cubic and bbr by default: on short links they differ), repetitions
//! interleaved (cell A, B, C, A, B, C, ...) so a drift in the machine or the link spreads over
//! all cells instead of favouring one. The best cell is the fastest by median; among cells
//! within [`NEAR_BEST_FRACTION`] of it, the one using the least sender CPU per GiB wins (then
//! the fewest channels), since a VMM's host has other work for its cores.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pagewire::auth::Psk;
use pagewire::pipeline::compress::Compression;
use pagewire::profile::{Cell, Measured, Profile, SendSettings};
use pagewire::synth::Content;
use pagewire::{GuestMemory, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig, ZeroCopy};

/// Cells within this fraction of the fastest median count as equally fast.
const NEAR_BEST_FRACTION: f64 = 0.03;
/// How long a sweep retries connecting while `serve` rebinds between transfers.
const CONNECT_RETRY_MS: u64 = 10_000;
/// Pause between connection attempts.
const CONNECT_RETRY_PAUSE_MS: u64 = 50;

/// `pagewire-tune serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:7979.
    #[arg(long, default_value = "127.0.0.1:7979")]
    listen: String,
    /// Destination memory; every sweep against this server must use the same --size.
    #[arg(long, value_parser = pagewire::units::parse_size, default_value = "1GiB")]
    size: u64,
    /// Pre-shared key file (`pagewire psk`): senders must hold it.
    #[arg(long)]
    psk_file: Option<PathBuf>,
    /// Listen on a non-loopback address without a key (a trusted benchmark link only).
    #[arg(long)]
    insecure: bool,
    /// Stop after this many transfers (default: until interrupted).
    #[arg(long)]
    transfers: Option<u32>,
}

/// Receives transfers one after another until `transfers` (or forever).
pub fn serve(a: ServeArgs) -> Result<()> {
    let psk = a.psk_file.as_deref().map(Psk::from_file).transpose()?;
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let memory = Arc::new(
        GuestMemory::anonymous_populated(&spec)
            .with_context(|| format!("allocating {} bytes of destination memory", a.size))?,
    );
    eprintln!(
        "pagewire-tune serve: {} MiB on {}; run `pagewire-tune sweep --peer HOST:PORT --size {}MiB` on the source",
        a.size >> 20,
        a.listen,
        a.size >> 20
    );
    // One listener for every transfer: a sweep that connects while the last transfer winds
    // down waits in the backlog.
    let listener = std::net::TcpListener::bind(a.listen.as_str())
        .with_context(|| format!("listening on {}", a.listen))?;
    let mut n = 0u32;
    let mut failed = 0u32;
    while a.transfers.is_none_or(|max| n < max) {
        let receiver = Receiver::on_listener(
            listener.try_clone()?,
            memory.clone(),
            ReceiverConfig {
                psk: psk.clone(),
                insecure: a.insecure,
                // Already faulted in: nothing to overlap.
                prefault: false,
                ..ReceiverConfig::default()
            },
        )?;
        n += 1;
        match receiver.run() {
            Ok(s) => println!(
                "transfer {n}: {} channel(s), {:.2} GiB/s, receiver {:.2} CPU-s/GiB",
                s.channels, s.gib_per_s, s.cpu_s_per_gib
            ),
            Err(e) => {
                // Served on: the next sweep may well succeed; the exit status says it later.
                eprintln!("transfer {n}: failed: {}", pagewire::error_chain(&e));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {n} transfers failed");
    }
    Ok(())
}

/// What listens at `sweep --peer`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Server {
    /// `pagewire-tune serve`: a receiver taking one transfer after another.
    Tune,
    /// `pagewire-bench serve`'s control port: a plaintext receiver per transfer, which reports
    /// its CPU time (a trusted link only: no key, no TLS).
    Bench,
}

/// `pagewire-tune sweep`.
#[derive(Args)]
pub struct SweepArgs {
    /// The receiver: `pagewire-tune serve` on the destination host, or with `--server bench`
    /// the control port of `pagewire-bench serve`.
    #[arg(long)]
    peer: String,
    /// What listens at --peer.
    #[arg(long, value_enum, default_value = "tune")]
    server: Server,
    /// Guest memory per transfer (against `pagewire-tune serve`, its --size).
    #[arg(long, value_parser = pagewire::units::parse_size, default_value = "1GiB")]
    size: u64,
    /// Memory content: zero, random, mixed, text, blend.
    #[arg(long, default_value = "blend")]
    content: String,
    /// Channel counts (default: 1, 2, 4, ... up to the allowed cores, and the cores).
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<u16>>,
    /// Zero-copy policies.
    #[arg(long, value_delimiter = ',', default_value = "auto,off")]
    zero_copy: Vec<ZeroCopy>,
    /// Compression modes.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    compress: Vec<Compression>,
    /// TCP congestion control algorithms (default: the host's default, and cubic and bbr where
    /// this kernel offers them).
    #[arg(long, value_delimiter = ',')]
    congestion: Option<Vec<String>>,
    /// Interleaved repetitions of every cell (every other one in reverse order, after one
    /// warm-up transfer that is not counted).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Pre-shared key file (the server's).
    #[arg(long)]
    psk_file: Option<PathBuf>,
    /// Where to write the profile.
    #[arg(long, default_value = "pagewire-profile.toml")]
    out: PathBuf,
}

struct Combo {
    channels: u16,
    zero_copy: ZeroCopy,
    compress: Compression,
    congestion: String,
    /// One measurement per repetition.
    runs: Vec<Run>,
}

/// One transfer's figures.
struct Run {
    gib_per_s: f64,
    /// Sender CPU seconds per GiB.
    cpu_s_per_gib: f64,
    /// Receiver CPU seconds per GiB, where the server reports it (`--server bench`).
    receiver_cpu_s_per_gib: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Congestion control algorithms to try by default: the host's default, then cubic and bbr
/// where offered (none where the kernel does not say: the host's default, unnamed).
fn default_congestion() -> Vec<String> {
    let Some((default, offered)) = pagewire::sys::host_congestion() else {
        return Vec::new();
    };
    let mut out = vec![default];
    for name in ["cubic", "bbr"] {
        if offered.iter().any(|o| o == name) && !out.iter().any(|o| o == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// Channel counts to try by default: powers of two up to the allowed cores, and the cores.
fn default_channels() -> Vec<u16> {
    let cores = pagewire::placement::pin_order(None, pagewire::Pinning::Cores)
        .map_or(1, |c| c.len().max(1))
        .min(pagewire::limits::CHANNELS_MAX) as u16;
    let mut out: Vec<u16> = std::iter::successors(Some(1u16), |c| c.checked_mul(2))
        .take_while(|&c| c <= cores)
        .collect();
    if out.last() != Some(&cores) {
        out.push(cores);
    }
    out
}

/// Calls `connect` until it succeeds, fails otherwise than `refused` says, or
/// `CONNECT_RETRY_MS` have passed: a server started just before (or rebinding between
/// transfers, as `serve` does) refuses for a moment.
fn retry_while_refused<T, E>(
    mut connect: impl FnMut() -> std::result::Result<T, E>,
    refused: impl Fn(&E) -> bool,
) -> std::result::Result<T, E> {
    let deadline = Instant::now() + Duration::from_millis(CONNECT_RETRY_MS);
    loop {
        match connect() {
            Err(e) if refused(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(CONNECT_RETRY_PAUSE_MS));
            }
            result => return result,
        }
    }
}

fn is_refused(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::ConnectionRefused
}

fn connect_retrying(
    peer: &str,
    memory: &Arc<GuestMemory>,
    config: &SenderConfig,
) -> Result<Sender> {
    retry_while_refused(
        || Sender::connect(peer, memory.clone(), config),
        |e| matches!(e, pagewire::Error::Io { source, .. } if is_refused(source)),
    )
    .map_err(|e| anyhow::anyhow!(pagewire::error_chain(&e)))
    .with_context(|| {
        format!("connecting to {peer} (is `pagewire-tune serve` running there with --size?)")
    })
}

/// Opens the control connection to `pagewire-bench serve`.
fn connect_bench_retrying(peer: &str) -> Result<pagewire_bench_control::Client> {
    retry_while_refused(
        || pagewire_bench_control::Client::connect(peer),
        |e| matches!(e, pagewire_bench_control::ControlError::Io(io) if is_refused(io)),
    )
    .with_context(|| format!("connecting to {peer} (is `pagewire-bench serve` listening there?)"))
}

/// Where the sweep's transfers go.
enum Target {
    /// `pagewire-tune serve` at this address.
    Tune(String),
    /// `pagewire-bench serve`'s control connection.
    Bench(pagewire_bench_control::Client),
}

impl Target {
    fn open(peer: &str, server: Server) -> Result<Target> {
        Ok(match server {
            Server::Tune => Target::Tune(peer.to_string()),
            Server::Bench => Target::Bench(connect_bench_retrying(peer)?),
        })
    }

    /// Sends all of `memory` once with `config`.
    fn transfer(&mut self, memory: &Arc<GuestMemory>, config: &SenderConfig) -> Result<Run> {
        let (mut sender, bench) = match self {
            Target::Tune(peer) => (connect_retrying(peer, memory, config)?, None),
            Target::Bench(control) => {
                let addr = control.start(&pagewire_bench_control::Request::Recv {
                    size: memory.total_bytes(),
                    tls: None,
                    unchecked_pages: !config.page_checksums,
                    pin: !matches!(config.pinning, pagewire::Pinning::None),
                })?;
                let sender = Sender::connect(addr, memory.clone(), config)
                    .map_err(|e| anyhow::anyhow!(pagewire::error_chain(&e)))
                    .with_context(|| {
                        format!("connecting to the bench server's receiver at {addr}")
                    })?;
                (sender, Some(control))
            }
        };
        sender.send_all()?;
        let stats = sender.finish()?;
        let receiver_cpu_s_per_gib = match bench {
            Some(control) => {
                let cpu_s = control.done()?;
                Some(cpu_s / (memory.total_bytes() as f64 / f64::from(1u32 << 30)))
            }
            None => None,
        };
        Ok(Run {
            gib_per_s: stats.gib_per_s,
            cpu_s_per_gib: stats.cpu_s_per_gib,
            receiver_cpu_s_per_gib,
        })
    }
}

/// The order of a sweep's `reps × cells` transfers: every cell once per repetition, every
/// other repetition walking the cells backwards, so no cell always runs first or after the
/// same neighbour.
fn schedule(reps: u32, cells: usize) -> Vec<usize> {
    (0..reps)
        .flat_map(|rep| (0..cells).map(move |i| if rep % 2 == 0 { i } else { cells - 1 - i }))
        .collect()
}

/// Measures every cell (after one warm-up transfer, not counted: `reps × cells + 1`
/// transfers in all) and writes the profile; prints a table (or JSON).
pub fn sweep(a: SweepArgs, json: bool) -> Result<()> {
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let content: Content = a
        .content
        .parse()
        .map_err(|e| anyhow::anyhow!("--content: {e}"))?;
    if a.server == Server::Bench && a.psk_file.is_some() {
        bail!(
            "--psk-file: `pagewire-bench serve` receives plaintext only (a trusted benchmark \
             link); leave the key out, or sweep against `pagewire-tune serve --psk-file`"
        );
    }
    let psk = a.psk_file.as_deref().map(Psk::from_file).transpose()?;
    let channels = a.channels.clone().unwrap_or_else(default_channels);
    let congestion = a.congestion.clone().unwrap_or_else(default_congestion);
    // An empty list (a kernel that does not say): the host's default, unnamed.
    let congestion: Vec<String> = if congestion.is_empty() {
        vec![String::new()]
    } else {
        congestion
    };
    let mut combos = Vec::new();
    for &c in &channels {
        for &z in &a.zero_copy {
            for &k in &a.compress {
                for cc in &congestion {
                    combos.push(Combo {
                        channels: c,
                        zero_copy: z,
                        compress: k,
                        congestion: cc.clone(),
                        runs: Vec::new(),
                    });
                }
            }
        }
    }
    for c in &combos {
        config_of(c, &psk).validate()?;
    }
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let memory = Arc::new(GuestMemory::anonymous_populated(&spec)?);
    pagewire::synth::fill(&memory, content, 1);
    let total = combos.len() as u64 * u64::from(a.reps);
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} transfers  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // One transfer first, not counted: the receiver's memory starts untouched (its zero pages
    // skipped, its pages not yet faulted in), which favoured whichever cell went first.
    bar.set_message("warm-up");
    let mut target = Target::open(&a.peer, a.server)?;
    target.transfer(&memory, &config_of(&combos[0], &psk))?;
    for i in schedule(a.reps, combos.len()) {
        let c = &mut combos[i];
        bar.set_message(format!(
            "{} ch, zero-copy {}, {}, {}",
            c.channels, c.zero_copy, c.compress, c.congestion
        ));
        let run = target.transfer(&memory, &config_of(c, &psk))?;
        c.runs.push(run);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let cells: Vec<Cell> = combos
        .iter()
        .map(|c| {
            let rates: Vec<f64> = c.runs.iter().map(|r| r.gib_per_s).collect();
            // Three decimals: the profile is read by people too.
            let round = |x: f64| (x * 1e3).round() / 1e3;
            Cell {
                channels: c.channels,
                zero_copy: c.zero_copy.to_string(),
                compress: c.compress.to_string(),
                congestion: c.congestion.clone(),
                gib_per_s: round(median(rates.clone())),
                gib_per_s_range: [
                    round(rates.iter().copied().fold(f64::INFINITY, f64::min)),
                    round(rates.iter().copied().fold(0.0, f64::max)),
                ],
                cpu_s_per_gib: round(median(c.runs.iter().map(|r| r.cpu_s_per_gib).collect())),
                receiver_cpu_s_per_gib: c
                    .runs
                    .iter()
                    .map(|r| r.receiver_cpu_s_per_gib)
                    .collect::<Option<Vec<f64>>>()
                    .map(|v| round(median(v))),
            }
        })
        .collect();
    let best = choose(&cells);
    let profile = Profile {
        send: SendSettings {
            channels: Some(best.channels),
            zero_copy: Some(best.zero_copy.clone()),
            compress: Some(best.compress.clone()),
            zstd_level: None,
            congestion: Some(best.congestion.clone()).filter(|c| !c.is_empty()),
        },
        measured: Some(Measured {
            peer: a.peer.clone(),
            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            size_bytes: a.size,
            content: a.content.clone(),
            reps: a.reps,
            cells: cells.clone(),
        }),
    };
    profile
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "profile": a.out, "best": best, "cells": cells })
        );
        return Ok(());
    }
    println!("| channels | zero-copy | compress | congestion | GiB/s median [min..max] | sender CPU-s/GiB | receiver CPU-s/GiB |");
    println!("|---|---|---|---|---|---|---|");
    for c in &cells {
        println!(
            "| {} | {} | {} | {} | {:.2} [{:.2}..{:.2}] | {:.3} | {} |{}",
            c.channels,
            c.zero_copy,
            c.compress,
            if c.congestion.is_empty() {
                "default"
            } else {
                &c.congestion
            },
            c.gib_per_s,
            c.gib_per_s_range[0],
            c.gib_per_s_range[1],
            c.cpu_s_per_gib,
            // `pagewire-tune serve` prints its own; only the bench server reports it here.
            c.receiver_cpu_s_per_gib
                .map_or_else(|| "-".to_string(), |r| format!("{r:.3}")),
            if std::ptr::eq(c, best) { " best" } else { "" }
        );
    }
    println!(
        "wrote {}: use it with `pagewire send --profile {}` (or --channels auto)",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

fn config_of(c: &Combo, psk: &Option<Psk>) -> SenderConfig {
    SenderConfig {
        channels: c.channels,
        zero_copy: c.zero_copy,
        compression: c.compress,
        congestion: Some(c.congestion.clone()).filter(|c| !c.is_empty()),
        psk: psk.clone(),
        ..SenderConfig::default()
    }
}

/// The fastest cell by median; among those within `NEAR_BEST_FRACTION` of it, the least
/// sender CPU per GiB, then the fewest channels.
pub fn choose(cells: &[Cell]) -> &Cell {
    let fastest = cells.iter().map(|c| c.gib_per_s).fold(0.0, f64::max);
    cells
        .iter()
        .filter(|c| c.gib_per_s >= fastest * (1.0 - NEAR_BEST_FRACTION))
        .min_by(|a, b| {
            a.cpu_s_per_gib
                .total_cmp(&b.cpu_s_per_gib)
                .then(a.channels.cmp(&b.channels))
        })
        .unwrap_or(&cells[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(channels: u16, gib_per_s: f64, cpu: f64) -> Cell {
        Cell {
            channels,
            gib_per_s,
            cpu_s_per_gib: cpu,
            ..Cell::default()
        }
    }

    #[test]
    fn the_choice_is_the_fastest_then_the_cheapest() {
        let cells = [cell(1, 2.0, 0.3), cell(2, 3.0, 0.5), cell(4, 3.05, 0.6)];
        // 2 channels are within 3% of 4 and cost less CPU.
        assert_eq!(choose(&cells).channels, 2);
        let cells = [cell(1, 2.0, 0.3), cell(2, 2.5, 0.5), cell(4, 3.05, 0.6)];
        assert_eq!(choose(&cells).channels, 4);
        let cells = [cell(2, 3.0, 0.5), cell(4, 3.0, 0.5)];
        assert_eq!(choose(&cells).channels, 2, "a tie: fewer channels");
    }

    #[test]
    fn repetitions_alternate_their_direction() {
        assert_eq!(schedule(3, 3), [0, 1, 2, 2, 1, 0, 0, 1, 2]);
        assert_eq!(schedule(1, 2), [0, 1]);
        assert!(schedule(2, 0).is_empty());
    }

    #[test]
    fn medians_and_default_channels() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let d = default_channels();
        assert_eq!(d[0], 1);
        assert!(d.windows(2).all(|w| w[0] < w[1]), "{d:?}");
    }
}
