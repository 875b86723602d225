//! What the `pagewire` command prints: the live display of a transfer (a progress bar on a
//! terminal, JSON lines with `--json-stream`) and the statistics at the end (a table, or one
//! JSON object with `--json`).

use super::*;

/// A live display of a transfer: a bar on a terminal, JSON lines with `--json-stream`.
pub(super) struct Display {
    done: Arc<std::sync::atomic::AtomicBool>,
    bar: Option<ProgressBar>,
    join: std::thread::JoinHandle<()>,
}

/// The report's line when plaintext pages went without checksums.
pub(super) const UNCHECKED_PAGES: &str = "off: plaintext pages were covered by TCP's checksum only";

/// Starts the display for `progress`: a progress bar when standard error is a terminal, one
/// JSON line per second on standard output with `json_stream`, nothing otherwise. A
/// receiver's display also says where it stands (its `status` and the `rounds` ended, from
/// `receiver`'s snapshot), so a script watching the stream can tell waiting from receiving.
pub(super) fn start_display(
    progress: Arc<Progress>,
    receiver: Option<pagewire::receiver::ReceiverHandle>,
    label: &'static str,
    json_stream: bool,
) -> Option<Display> {
    let terminal = std::io::stderr().is_terminal();
    if !json_stream && !terminal {
        return None;
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bar = (!json_stream).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} pages  {msg}  eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(label);
        bar
    });
    let (b, d) = (bar.clone(), done.clone());
    let join = std::thread::spawn(move || {
        // The only writer to standard output while a transfer runs: a reader that goes away
        // (`| head`) must cancel the transfer, not kill the process with a new image's
        // temporary file left behind (see `interrupt`).
        interrupt::hold_sigpipe_here();
        let mut output_closed = false;
        let started = Instant::now();
        // Rates count from the first byte on the wire: a receiver may listen for minutes
        // before its sender comes, and that wait is not the transfer's speed.
        let mut first_byte: Option<Instant> = None;
        // The last sample of the interval rate (the bar's, and each JSON line's `interval_mbps`).
        let mut interval = (Instant::now(), 0u64);
        let mut interval_mbps = 0.0;
        let mut last_line = Instant::now();
        while !d.load(std::sync::atomic::Ordering::Relaxed) {
            let (pages, total) = progress.pages();
            let wire = progress
                .wire_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            let now = Instant::now();
            if wire > 0 && first_byte.is_none() {
                first_byte = Some(now);
            }
            let moving_secs = first_byte.map_or(0.0, |t| (now - t).as_secs_f64());
            let mbps_since_first = wire as f64 * 8.0 / 1e6 / moving_secs.max(1e-3);
            let since_sample = (now - interval.0).as_secs_f64();
            if since_sample >= 1.0 {
                interval_mbps = wire.saturating_sub(interval.1) as f64 * 8.0 / 1e6 / since_sample;
                interval = (now, wire);
            }
            let stands = receiver.as_ref().map(|r| r.snapshot());
            match &b {
                Some(b) => {
                    b.set_length(total.max(pages));
                    b.set_position(pages);
                    b.set_message(match &stands {
                        Some(s) if s.status == pagewire::live::Status::Setup => {
                            "waiting for the sender".to_string()
                        }
                        _ => format!(
                            "{:.0} MiB/s on the wire",
                            interval_mbps * 1e6 / 8.0 / (1 << 20) as f64
                        ),
                    });
                }
                None if !output_closed && last_line.elapsed() >= Duration::from_secs(1) => {
                    last_line = now;
                    let mut v = serde_json::json!({
                        "event": "progress",
                        "side": label,
                        "elapsed_ms": (now - started).as_millis() as u64,
                        "moving_ms": (moving_secs * 1e3) as u64,
                        "pages_done": pages,
                        "pages_total": total,
                        "wire_bytes": wire,
                        "mbps": mbps_since_first,
                        "interval_mbps": interval_mbps,
                    });
                    if let Some(s) = &stands {
                        v["status"] = serde_json::to_value(s.status).unwrap_or_default();
                        v["rounds"] = s.rounds.into();
                    }
                    if let Err(e) = writeln!(std::io::stdout(), "{v}") {
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            output_closed = true;
                            interrupt::output_closed();
                        }
                    }
                }
                None => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Some(Display { done, bar, join })
}

pub(super) fn finish_display(display: Option<Display>) {
    if let Some(d) = display {
        d.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(b) = d.bar {
            b.finish_and_clear();
        }
        let _ = d.join.join();
    }
}

pub(super) fn report(
    stats: &TransferStats,
    receiver: Option<(&TransferStats, bool)>,
    common: &CommonArgs,
    verb: &str,
    setup_ms: Option<f64>,
) -> Result<()> {
    if common.json || common.json_stream {
        let mut v = serde_json::to_value(stats)?;
        if let Some(ms) = setup_ms {
            // As QEMU's `setup-time` is part of its `total-time`: the transfer's own time is
            // `transfer_ms` (what `mbps` and `gib_per_s` are over).
            v["setup_ms"] = ms.into();
            v["transfer_ms"] = stats.total_time_ms.into();
            v["total_time_ms"] = (ms + stats.total_time_ms).into();
        }
        if let Some((r, verified)) = receiver {
            v["verified"] = serde_json::Value::Bool(verified);
            v["sender_cpu_ms"] = stats.cpu_ms.into();
            v["receiver_cpu_ms"] = r.cpu_ms.into();
            v["receiver_cpu_s_per_gib"] = r.cpu_s_per_gib.into();
            v["receiver"] = serde_json::to_value(r)?;
        }
        if common.json_stream {
            v["event"] = "end".into();
        }
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let gib = ((stats.normal_pages + stats.zero_pages) * 4096) as f64 / (1u64 << 30) as f64;
    println!(
        "pagewire: {verb} {gib:.2} GiB over {} channel(s)",
        stats.channels
    );
    let mut rows: Vec<(&str, String)> = Vec::new();
    match setup_ms {
        Some(ms) => rows.extend([
            (
                "total time",
                format!("{:.1} ms (setup and transfer)", ms + stats.total_time_ms),
            ),
            (
                "setup",
                format!("{ms:.1} ms faulting destination memory in, before the transfer"),
            ),
            (
                "transfer",
                format!(
                    "{:.1} ms (the rates below are over it)",
                    stats.total_time_ms
                ),
            ),
        ]),
        None => rows.push(("total time", format!("{:.1} ms", stats.total_time_ms))),
    }
    if stats.prefault_ms > 0.0 {
        rows.push((
            "pre-fault",
            format!(
                "{:.1} ms faulting destination memory in, in the background until the sender's channels were in",
                stats.prefault_ms
            ),
        ));
    }
    rows.extend([
        (
            "throughput",
            format!(
                "{:.0} Mbit/s ({:.2} GiB/s of guest memory)",
                stats.mbps, stats.gib_per_s
            ),
        ),
        (
            "transferred (wire)",
            format!("{} bytes", stats.transferred_bytes),
        ),
        (
            "normal pages",
            format!("{} ({} bytes)", stats.normal_pages, stats.normal_bytes),
        ),
        ("zero (duplicate) pages", stats.zero_pages.to_string()),
        (
            "cpu, this side",
            format!(
                "{:.0} ms ({:.2} CPU-s/GiB)",
                stats.cpu_ms, stats.cpu_s_per_gib
            ),
        ),
        (
            "page faults, this side",
            format!(
                "{} minor, {} major (shard threads, during the transfer)",
                stats.page_faults_minor, stats.page_faults_major
            ),
        ),
        (
            "zero-copy sends",
            format!(
                "{} completed, {} copied by the kernel, {} shard(s) fell back to plain sends",
                stats.zero_copy.completed, stats.zero_copy.copied, stats.zero_copy.fallbacks
            ),
        ),
        ("zero scan", stats.zero_scan.to_string()),
        (
            "tcp congestion control",
            stats.congestion.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "compressed frames",
            format!(
                "{} (ratio {:.2})",
                stats.compressed_frames, stats.compression_ratio
            ),
        ),
    ]);
    if stats.unchecked_pages {
        rows.push(("page checksums", UNCHECKED_PAGES.into()));
    }
    for (k, v) in rows {
        println!("  {k:<24} {v}");
    }
    if let Some((r, verified)) = receiver {
        println!(
            "  {:<24} {:.0} ms ({:.2} CPU-s/GiB)",
            "cpu, receiver", r.cpu_ms, r.cpu_s_per_gib
        );
        println!(
            "  {:<24} {} minor, {} major",
            "page faults, receiver", r.page_faults_minor, r.page_faults_major
        );
        println!(
            "  {:<24} {}",
            "verified",
            if verified {
                "yes: destination equals source"
            } else {
                "NO"
            }
        );
    }
    println!("  per shard:");
    for s in &stats.shards {
        println!(
            "    channel {:>2}  core {:>4}  node {:>2}  {:>8.1} MiB  {:>6} frames  busy {:>7.1} ms  cpu {:>7.1} ms{}",
            s.channel,
            s.core.map_or("-".to_string(), |c| c.to_string()),
            s.node.map_or("-".to_string(), |n| n.to_string()),
            s.wire_bytes as f64 / (1 << 20) as f64,
            s.frames,
            s.busy_ms,
            s.cpu_ms,
            if s.zc_fallback { "  (zero-copy fell back)" } else { "" }
        );
    }
    Ok(())
}
