//! `pagewire-bench live`'s repeated rounds: the same round re-sent in one quiet session, the
//! spread that no estimate made before a last round can beat.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{bail, Result};
use pagewire::live::guestcode::WORKING_SET_GPA;
use pagewire::tls::{TlsClient, TlsServer};

use super::{session, LiveArgs, Session};
use crate::measure::median;

/// Page counts of the repeated round: the last rounds of the grids span about these.
const REPEAT_PAGES: [u64; 3] = [4096, 16384, 65536];

/// One size of the repeated round (see [`repeated_rounds`]).
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Repeat {
    channels: u16,
    tls: bool,
    pages: u64,
    /// Each repetition: from the round's start until the receiver reported it placed, ms.
    ms: Vec<f64>,
    median_ms: f64,
    /// Repetitions whose time the median is within 25% of (as the estimate is judged).
    within_25_percent: usize,
}

/// The same round, sent again and again in one session with no guest running: the pages of the
/// working set's start, `REPEAT_PAGES` at a time, each size `a.repeat_rounds` times in turn. A
/// last round is such a round (its guest is paused), so how much an identical round's time
/// varies here bounds how close any estimate made before it can come.
pub(super) fn repeated_rounds(
    a: &LiveArgs,
    tls: Option<&(TlsServer, TlsClient)>,
    channels: u16,
) -> Result<Vec<Repeat>> {
    let Session {
        src,
        dst,
        mut sender,
        receiver: rx,
        ..
    } = session(a, tls, channels)?;
    sender.send_all()?;
    let total_pages = a.size / 4096;
    let first_page = (WORKING_SET_GPA / 4096).min(total_pages / 2);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); REPEAT_PAGES.len()];
    for _ in 0..a.repeat_rounds {
        for (k, &pages) in REPEAT_PAGES.iter().enumerate() {
            let run = pagewire::PageRun {
                region: 0,
                first_page,
                pages: pages.min(total_pages - first_page),
            };
            let started = Instant::now();
            let round = sender.send_live_round(&[run])?.round;
            sender.wait_placed(round)?;
            times[k].push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    sender.finish()?;
    rx.join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
    if src.first_difference(&dst).is_some() {
        bail!("the destination differs from the source after the repeated rounds");
    }
    Ok(REPEAT_PAGES
        .iter()
        .zip(times)
        .map(|(&pages, ms)| {
            let median_ms = median(&mut ms.clone());
            // As the estimate is judged: an estimate that always said the median.
            let within_25_percent = ms
                .iter()
                .filter(|&&t| (median_ms - t).abs() <= 0.25 * t)
                .count();
            Repeat {
                channels,
                tls: tls.is_some(),
                pages,
                ms,
                median_ms,
                within_25_percent,
            }
        })
        .collect())
}

/// The repeated rounds' table as Markdown (empty when there are none).
pub(super) fn repeats_markdown(repeats: &[Repeat], rounds: usize) -> String {
    let mut out = String::new();
    if repeats.is_empty() {
        return out;
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "The same round sent {rounds} times in one session, no guest running (sent and reported placed):"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| channels | TLS | pages | median ms | min ms | max ms | within 25% of the median |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for r in repeats {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {} of {} |",
            r.channels,
            if r.tls { "on" } else { "off" },
            r.pages,
            r.median_ms,
            r.ms.iter().copied().fold(f64::INFINITY, f64::min),
            r.ms.iter().copied().fold(0.0, f64::max),
            r.within_25_percent,
            r.ms.len()
        );
    }
    out
}
