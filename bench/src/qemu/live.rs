//! A running guest migrated live by QEMU multifd: the tiny guest's code booted as QEMU's
//! firmware, for `pagewire-bench live --with-qemu`.

use super::*;

/// One live QEMU migration's figures (QEMU's `query-migrate`, and CPU without the vCPU).
#[derive(Debug, Clone, Serialize)]
pub struct QemuLiveRun {
    /// Completed before the round or time cap.
    pub converged: bool,
    /// `total-time` (completed) or the time until the cap, in milliseconds.
    pub total_ms: f64,
    /// `downtime`, in milliseconds, when completed.
    pub downtime_ms: Option<f64>,
    /// The last `expected-downtime` QEMU reported while active, in milliseconds.
    pub expected_downtime_ms: Option<f64>,
    /// QEMU's rounds: `ram.dirty-sync-count` less the sync at setup, before any page went
    /// (pagewire's snapshot counts its syncs the same way, one more than its rounds).
    pub rounds: u64,
    /// CPU milliseconds of the source QEMU less its vCPU thread.
    pub source_cpu_ms: f64,
    /// CPU milliseconds of the destination QEMU less its vCPU thread.
    pub destination_cpu_ms: f64,
    /// Pages per second the guest wrote during the migration (its progress counter).
    pub guest_pages_per_s: f64,
    /// The resumed destination guest's counter went on from the source's.
    pub resumed: bool,
    /// The last `cpu-throttle-percentage` QEMU reported (auto-converge), percent.
    pub throttle_percent: u8,
    /// `ram.transferred` at the end (or at the cap): bytes QEMU put on the wire.
    pub transferred_bytes: u64,
}

/// How a live QEMU cell runs: the guest, the limits, the caps.
pub struct LiveSpec<'a> {
    /// The guest's parameters (the same code pagewire's tiny VMM runs).
    pub guest: Params,
    /// multifd channels.
    pub channels: u16,
    /// TLS with these certificates.
    pub tls: Option<&'a CertSet>,
    /// QEMU's `downtime-limit`, in milliseconds.
    pub downtime_limit_ms: u64,
    /// Rounds (`dirty-sync-count`) at most before the run counts as not converging.
    pub rounds_max: u32,
    /// Milliseconds at most before the run counts as not converging.
    pub total_ms_max: u64,
    /// How long the guest runs before the migration starts.
    pub warmup_ms: u64,
    /// QEMU's `auto-converge` capability (with its default throttle steps).
    pub auto_converge: bool,
    /// QEMU's `max-bandwidth`, bytes per second; `None`: unlimited (far above the link).
    pub max_bandwidth: Option<u64>,
}

fn guest_counter(path: &Path) -> Result<u32> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 4];
    std::fs::File::open(path)?.read_exact_at(&mut b, guestcode::COUNTER_GPA)?;
    Ok(u32::from_le_bytes(b))
}

/// Migrates a running guest live with QEMU multifd (auto-converge as `spec` says): `src`
/// (region 0) is the
/// initial memory, the guest of [`guestcode`] runs from QEMU's firmware and dirties it at
/// `spec.guest`'s rate. A run that passes the round or time cap is cancelled and reported as
/// not converged. A completed one is checked: the paused destination's memory equals the
/// source's, and resumed, its guest counts on from where the source stopped.
pub fn migrate_live(ram: &RamDir, src: &GuestMemory, spec: &LiveSpec<'_>) -> Result<QemuLiveRun> {
    let bios = ram.path("guest.bin");
    std::fs::write(&bios, guestcode::firmware(&spec.guest))?;
    let mut extra = json!({ "downtime-limit": spec.downtime_limit_ms });
    if let Some(b) = spec.max_bandwidth {
        extra["max-bandwidth"] = json!(b);
    }
    let mut pair = Pair::start(
        ram,
        src,
        &bios,
        spec.channels,
        Compression::None,
        spec.tls,
        extra,
    )?;
    std::thread::sleep(Duration::from_millis(spec.warmup_ms));
    let src_ram = ram.path("src.ram");
    let counter0 = guest_counter(&src_ram)?;
    if counter0 == 0 {
        bail!(
            "the QEMU guest did not start counting within {} ms",
            spec.warmup_ms
        );
    }
    let (src_cpu0, dst_cpu0) = (
        pair.src.cpu_s_without_vcpus(),
        pair.dst.cpu_s_without_vcpus(),
    );
    if spec.auto_converge {
        pair.src.cmd(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "auto-converge", "state": true }] })),
        )?;
    }
    let started = Instant::now();
    pair.src.cmd(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{}", pair.port) })),
    )?;
    let mut expected = None;
    let mut throttle = 0u8;
    let mut run = loop {
        let r = pair.src.cmd("query-migrate", None)?;
        let rounds = r["ram"]["dirty-sync-count"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(1);
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        let cpu = |p: &Pair| {
            (
                (p.src.cpu_s_without_vcpus() - src_cpu0) * 1e3,
                (p.dst.cpu_s_without_vcpus() - dst_cpu0) * 1e3,
            )
        };
        // Reported while active only.
        if let Some(e) = r["expected-downtime"].as_f64() {
            expected = Some(e);
        }
        if let Some(t) = r["cpu-throttle-percentage"].as_u64() {
            throttle = u8::try_from(t).unwrap_or(u8::MAX);
        }
        let transferred_bytes = r["ram"]["transferred"].as_u64().unwrap_or(0);
        // The run's figures so far; `None` downtime while it has not completed.
        let figures =
            |pair: &Pair, total_ms: f64, downtime_ms: Option<f64>| -> Result<QemuLiveRun> {
                let (s, d) = cpu(pair);
                let counter = guest_counter(&src_ram)?;
                Ok(QemuLiveRun {
                    converged: downtime_ms.is_some(),
                    total_ms,
                    downtime_ms,
                    expected_downtime_ms: expected,
                    rounds,
                    source_cpu_ms: s,
                    destination_cpu_ms: d,
                    guest_pages_per_s: f64::from(counter.wrapping_sub(counter0))
                        / (elapsed_ms / 1e3),
                    resumed: false,
                    throttle_percent: throttle,
                    transferred_bytes,
                })
            };
        match r["status"].as_str() {
            Some("completed") => {
                let total = r["total-time"].as_f64().unwrap_or(elapsed_ms);
                let downtime = r["downtime"].as_f64().unwrap_or(f64::NAN);
                break figures(&pair, total, Some(downtime))?;
            }
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {r}"),
            _ => {}
        }
        // Past the round cap by one sync at most: QEMU counts the sync of a pass it may still
        // complete, so QEMU gets the benefit of the doubt.
        if rounds > u64::from(spec.rounds_max) || elapsed_ms > spec.total_ms_max as f64 {
            let run = figures(&pair, elapsed_ms, None)?;
            pair.src.cmd("migrate_cancel", None)?;
            return Ok(run);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    pair.wait_loaded()?;
    // The source is paused after completion and the destination (-S) not yet running.
    if !files_equal(&src_ram, &ram.path("dst.ram"))? {
        bail!("QEMU's destination memory differs from the paused source");
    }
    let at_pause = guest_counter(&src_ram)?;
    pair.dst.cmd("cont", None)?;
    let resumed_by = Instant::now() + Duration::from_secs(2);
    while Instant::now() < resumed_by {
        if guest_counter(&ram.path("dst.ram"))?.wrapping_sub(at_pause) as i32 > 0 {
            run.resumed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !run.resumed {
        bail!("QEMU's destination guest did not count on after resuming");
    }
    Ok(run)
}
