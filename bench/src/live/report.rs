//! The live grid's report: the table of medians per cell and each engine's summary against the
//! issue's targets, as Markdown (printed, and written beside the JSON results).

use std::fmt::Write as _;

use super::*;
use crate::measure::median;
use repeat::{repeats_markdown, Repeat};

/// The table of `runs` (medians per cell), the repeated rounds and each engine's summary, as
/// Markdown.
pub(super) fn markdown(
    a: &LiveArgs,
    runs: &[Run],
    engines: &[&'static str],
    summaries: &[serde_json::Value],
    repeats: &[Repeat],
) -> String {
    let mut out = String::new();
    let throttle_column = if a.auto_converge {
        (" throttle % |", "---|")
    } else {
        ("", "")
    };
    let _ = writeln!(
        out,
        "Medians over each cell's converged runs (NaN where none converged); \"guest wrote\" over all of its runs."
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "pagewire: {}", settings_line(a));
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| engine | dirty rate | guest wrote MiB/s | channels | TLS | converged | rounds (median) | total ms | downtime ms | expected ms | send CPU ms | recv CPU ms |{}",
        throttle_column.0
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|{}",
        throttle_column.1
    );
    for &rate in &a.dirty_rate {
        for &channels in &a.channels {
            for t in &a.tls {
                for e in engines {
                    let cell: Vec<&Run> = runs
                        .iter()
                        .filter(|r| {
                            r.engine == *e
                                && r.dirty_rate == rate
                                && r.channels == channels
                                && r.tls == (t == "on")
                        })
                        .collect();
                    let m = |f: &dyn Fn(&Run) -> Option<f64>| {
                        let mut v: Vec<f64> = cell.iter().filter_map(|r| f(r)).collect();
                        median(&mut v)
                    };
                    let throttle = if a.auto_converge {
                        format!(" {:.0} |", m(&|r| Some(f64::from(r.throttle_percent))))
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        out,
                        "| {e} | {:.0} MiB/s | {:.0} | {channels} | {t} | {}/{} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} |{throttle}",
                        rate as f64 / f64::from(1 << 20),
                        m(&|r| r.guest_pages_per_s.map(|p| p * 4096.0 / f64::from(1 << 20))),
                        cell.iter().filter(|r| r.converged).count(),
                        cell.len(),
                        m(&|r| r.converged.then_some(r.rounds as f64)),
                        m(&|r| r.converged.then_some(r.total_ms)),
                        m(&|r| r.downtime_ms.filter(|_| r.converged)),
                        m(&|r| r.converged.then_some(r.expected_downtime_ms)),
                        m(&|r| r.converged.then_some(r.sender_cpu_ms)),
                        m(&|r| r.converged.then_some(r.receiver_cpu_ms)),
                    );
                }
            }
        }
    }
    out.push_str(&repeats_markdown(repeats, a.repeat_rounds));
    let _ = writeln!(out);
    for (e, s) in engines.iter().zip(summaries) {
        let _ = writeln!(
            out,
            "{e}: {} of {} runs converged; downtime within the {} ms limit in {} of them; expected downtime within 25% of the measured one in {} (median error {:.0}%)",
            s["converged"],
            s["runs"],
            a.downtime_limit,
            s["downtime_within_limit"],
            s["estimate_within_25_percent"],
            100.0 * s["estimate_error_median"].as_f64().unwrap_or(f64::NAN)
        );
        for h in s["highest_converging_rate"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let _ = writeln!(
                out,
                "{e}: {} ch, TLS {}: converged in every run up to {}",
                h["channels"],
                h["tls"],
                h["dirty_rate"]
                    .as_u64()
                    .map_or("no rate measured".into(), |r| format!(
                        "{:.0} MiB/s",
                        r as f64 / f64::from(1 << 20)
                    ))
            );
        }
    }
    out
}

/// One engine's summary: convergence, downtime against the limit, the estimate's error, and
/// per channels × TLS the highest dirty rate at which every run (and every lower rate's)
/// converged.
pub(super) fn summary(a: &LiveArgs, runs: Vec<&Run>, engine: &str) -> serde_json::Value {
    let converged: Vec<&&Run> = runs.iter().filter(|r| r.converged).collect();
    let within = converged
        .iter()
        .filter(|r| r.downtime_ms.is_some_and(|d| d <= a.downtime_limit as f64))
        .count();
    let mut errors: Vec<f64> = converged
        .iter()
        .filter_map(|r| {
            let d = r.downtime_ms?;
            let e = (r.expected_downtime_ms - d).abs() / d.max(1e-3);
            e.is_finite().then_some(e)
        })
        .collect();
    let median_error = median(&mut errors);
    let within_25 = errors.iter().filter(|e| **e <= 0.25).count();
    let mut rates = a.dirty_rate.clone();
    rates.sort_unstable();
    let mut highest = Vec::new();
    for &channels in &a.channels {
        for t in &a.tls {
            let on = t == "on";
            let mut best = None;
            for &rate in &rates {
                let all = runs
                    .iter()
                    .filter(|r| r.dirty_rate == rate && r.channels == channels && r.tls == on)
                    .all(|r| r.converged);
                if !all {
                    break;
                }
                best = Some(rate);
            }
            highest
                .push(serde_json::json!({ "channels": channels, "tls": on, "dirty_rate": best }));
        }
    }
    serde_json::json!({
        "engine": engine,
        "runs": runs.len(),
        "converged": converged.len(),
        "downtime_within_limit": within,
        "downtime_within_limit_fraction": within as f64 / converged.len().max(1) as f64,
        "estimate_error_median": median_error,
        "estimate_within_25_percent": within_25,
        "downtime_limit_ms": a.downtime_limit,
        "highest_converging_rate": highest,
    })
}

/// pagewire's settings that vary between grids, in one line (the report's and the JSON's).
pub(super) fn settings_line(a: &LiveArgs) -> String {
    format!(
        "zero-copy {}, page checksums {} (TLS runs: the AEAD), congestion control {}, shards {}",
        a.zero_copy,
        if a.page_checksums == OnOff::On {
            "on"
        } else {
            "off"
        },
        a.congestion.as_deref().unwrap_or("the host's default"),
        if a.pin {
            "pinned"
        } else {
            "placed by the scheduler"
        }
    ) + &match a.max_bandwidth {
        Some(b) => format!(", both engines limited to {:.0} MB/s", b as f64 / 1e6),
        None => String::new(),
    } + &match a.discard_first {
        0 => String::new(),
        n => format!(", after {n} discarded run(s) of the first cell"),
    }
}
