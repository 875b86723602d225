//! `pagewire demo`: a migration over loopback of synthetic guest memory, verified at the end;
//! with `--live`, of a running guest (the tiny KVM guest, or the software dirtier where
//! `/dev/kvm` cannot run one).

use super::*;
use pagewire::live::tinyguest::AnyGuest;

/// What both demos share: source and destination memory, the receiver running on a thread,
/// and the sender's settings (with the run's TLS certificates or key).
struct DemoSetup {
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    receiver: std::thread::JoinHandle<pagewire::Result<TransferStats>>,
    addr: std::net::SocketAddr,
    config: SenderConfig,
    quiet: bool,
    /// Milliseconds spent faulting the destination in before the transfer.
    setup_ms: f64,
    /// Certificates made for this run, removed when the demo ends.
    _certs: Option<tempfile::TempDir>,
}

impl DemoSetup {
    fn say(&self, s: String) {
        if !self.quiet {
            eprintln!("{s}");
        }
    }
}

fn demo_setup(a: &DemoArgs) -> Result<DemoSetup> {
    // Every setting is checked before memory is generated or anything listens.
    let idle = idle_ms(a.common.idle_timeout)?;
    let level = a.compress.level()?;
    let config = SenderConfig {
        channels: a.channels,
        pinning: pinning(a.no_pin, false),
        zero_copy: a.zero_copy,
        tls: None,
        compression: a.compress.compression(),
        zstd_level: level,
        max_bandwidth_bytes_per_s: a.compress.max_bandwidth,
        idle_timeout_ms: idle,
        congestion: a.compress.congestion.clone(),
        page_checksums: !a.no_page_checksums,
        ..SenderConfig::default()
    };
    config.validate()?;
    if a.live && a.dirty_rate == 0 {
        bail!("--dirty-rate must be more than zero");
    }
    pagewire::probe_uring()?;
    let quiet = a.common.json || a.common.json_stream;
    // Like a PC guest: RAM below 3 GiB at 0, the rest from 4 GiB.
    let low = a.size.min(3 << 30);
    let mut specs = vec![RegionSpec { gpa: 0, len: low }];
    if a.size > low {
        specs.push(RegionSpec {
            gpa: 4 << 30,
            len: a.size - low,
        });
    }
    let t = Instant::now();
    let src = Arc::new(GuestMemory::anonymous(&specs)?);
    synth::fill(&src, a.content, a.seed);
    if !quiet {
        eprintln!(
            "pagewire demo: {} MiB of {} memory generated in {:.2} s; migrating{} over loopback with {} channel(s){}",
            a.size >> 20,
            a.content.name(),
            t.elapsed().as_secs_f64(),
            if a.live { " live" } else { "" },
            a.channels,
            if a.tls {
                " over TLS 1.3"
            } else if a.psk {
                " with a pre-shared key"
            } else {
                ""
            }
        );
    }
    let dst = Arc::new(GuestMemory::anonymous(&specs)?);
    // Like QEMU's -mem-prealloc: fresh memory costs a fault per page on first touch (on these
    // machines a host allocation too), so it is faulted in before the transfer, one thread per
    // core, and reported as setup.
    let t = Instant::now();
    dst.prefault_in_parallel(
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        &std::sync::atomic::AtomicBool::new(false),
    )?;
    let setup_ms = t.elapsed().as_secs_f64() * 1e3;
    if !quiet {
        eprintln!(
            "destination memory faulted in in {:.2} s (setup)",
            setup_ms / 1e3
        );
    }
    let cert_dir = if a.tls {
        let dir =
            tempfile::tempdir().context("creating a directory for the demo's certificates")?;
        certs::generate(&certs::CertOptions::default())?.write(dir.path())?;
        Some(dir)
    } else {
        None
    };
    let (server_tls, client_tls) = match &cert_dir {
        Some(dir) => (
            Some(TlsServer::new(certs::server_files(dir.path()).load()?)?),
            Some(TlsClient::new(
                certs::client_files(dir.path()).load()?,
                "localhost",
            )?),
        ),
        None => (None, None),
    };
    let psk = a.psk.then(Psk::generate);
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst.clone(),
        ReceiverConfig {
            pinning: pinning(a.no_pin, true),
            accept_timeout_ms: Some(30_000),
            idle_timeout_ms: idle,
            tls: server_tls,
            psk: psk.clone(),
            accept_unchecked_pages: a.no_page_checksums,
            ..ReceiverConfig::default()
        },
    )?;
    let addr = receiver.local_addr()?;
    let receiver = std::thread::spawn(move || receiver.run());
    Ok(DemoSetup {
        src,
        dst,
        receiver,
        addr,
        config: SenderConfig {
            tls: client_tls,
            psk,
            ..config
        },
        quiet,
        setup_ms,
        _certs: cert_dir,
    })
}

/// Both sides' results, or one error naming each side's failure.
fn both<T>(
    sent: pagewire::Result<T>,
    receiver: std::thread::JoinHandle<pagewire::Result<TransferStats>>,
) -> Result<(T, TransferStats)> {
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?;
    match (sent, received) {
        (Ok(s), Ok(r)) => Ok((s, r)),
        (Err(e), Ok(_)) => Err(e).context("sending failed"),
        (Ok(_), Err(e)) => Err(e).context("receiving failed"),
        (Err(s), Err(r)) => bail!(
            "the migration failed: the sender reports: {}; the receiver reports: {}",
            pagewire::error_chain(&s),
            pagewire::error_chain(&r)
        ),
    }
}

pub(super) fn demo(a: DemoArgs) -> Result<bool> {
    let d = demo_setup(&a)?;
    if a.live {
        return demo_live(&a, d);
    }
    let sent = Sender::connect(d.addr, d.src.clone(), &d.config).and_then(|mut sender| {
        let display = if a.common.json {
            None
        } else {
            start_display(sender.progress(), None, "demo", a.common.json_stream)
        };
        let r = sender.send_all().and_then(|_| sender.finish());
        finish_display(display);
        r
    });
    let (sent, received) = both(sent, d.receiver)?;
    let t = Instant::now();
    let difference = d.src.first_difference(&d.dst);
    if !d.quiet {
        eprintln!(
            "verified destination against source in {:.2} s",
            t.elapsed().as_secs_f64()
        );
    }
    let verified = difference.is_none();
    report(
        &sent,
        Some((&received, verified)),
        &a.common,
        "migrated",
        Some(d.setup_ms),
    )?;
    if let Some((region, page)) = difference {
        eprintln!("error: destination differs from source at region {region}, page {page}");
    }
    Ok(verified)
}

/// Starts the live demo's guest writing `a.dirty_rate` into `src`: the tiny KVM guest when
/// `/dev/kvm` runs it, else a software dirtier over an eighth of the memory.
fn demo_guest(
    a: &DemoArgs,
    d: &DemoSetup,
) -> Result<(AnyGuest, Box<dyn pagewire::dirty::DirtySource>, String)> {
    use pagewire::live::guestcode::{Params, WORKING_SET_GPA};
    use pagewire::live::tinyguest::{self, TinyGuest};
    let region_bytes = d.src.regions()[0].len();
    match tinyguest::probe() {
        Ok(()) if region_bytes > WORKING_SET_GPA => {
            // The working set: an eighth of memory, as the software dirtier's.
            let pages = ((region_bytes / 8) / 4096).min((region_bytes - WORKING_SET_GPA) / 4096);
            let params = Params::for_rate(a.dirty_rate, pages.max(1) as u32);
            let guest = TinyGuest::start(d.src.clone(), params)?;
            let dirty = Box::new(guest.dirty_log());
            let what = format!(
                "a tiny KVM guest writing {} pages/ms ({:.0} MB/s) over {} MiB, its dirty log {}",
                params.burst,
                params.bytes_per_s() as f64 / 1e6,
                (u64::from(params.working_set_pages) * 4096) >> 20,
                if guest.manual_protect() {
                    "cleared by KVM_CLEAR_DIRTY_LOG (manual protect)"
                } else {
                    "cleared on get"
                }
            );
            Ok((AnyGuest::Kvm(guest), dirty, what))
        }
        probed => {
            let why = probed.err().unwrap_or_else(|| {
                "the memory is too small for the KVM guest's working set above 1 MiB".into()
            });
            let bitmap = Arc::new(SharedBitmap::new(&d.src));
            let region = &d.src.regions()[0];
            let pages = (region.pages() / 8).max(1);
            let guest = SoftwareDirtier::start(
                d.src.clone(),
                bitmap.clone(),
                DirtierConfig {
                    bytes_per_s: a.dirty_rate,
                    region: 0,
                    first_page: 0,
                    pages,
                    seed: a.seed,
                },
            )?;
            let what = format!(
                "a software dirtier writing {:.0} MB/s over {} MiB ({why})",
                a.dirty_rate as f64 / 1e6,
                (pages * 4096) >> 20
            );
            Ok((AnyGuest::Software(guest), Box::new(bitmap), what))
        }
    }
}

fn demo_live(a: &DemoArgs, d: DemoSetup) -> Result<bool> {
    let (mut guest, dirty, what) = demo_guest(a, &d)?;
    d.say(format!("the guest: {what}"));
    let limit = DowntimeLimit {
        downtime_limit_ms: a.downtime_limit,
        ..DowntimeLimit::default()
    };
    let policy = limit.policy(a.auto_converge);
    let sender = Sender::connect(d.addr, d.src.clone(), &d.config);
    let mut handle = None;
    let sent = sender.and_then(|sender| {
        let progress = sender.progress();
        let migration = Migration::new(sender, dirty, policy);
        handle = Some(migration.handle());
        let display = if a.common.json {
            None
        } else {
            start_display(progress, None, "live", a.common.json_stream)
        };
        let rounds = (!d.quiet).then(|| print_rounds(migration.handle()));
        let r = migration.run(&mut guest);
        finish_display(display);
        if let Some(t) = rounds {
            let _ = t.join();
        }
        r
    });
    // A migration that did not converge is an answer, not a breakdown: with --json it still
    // says `converged: false`, with its rounds and what it expected, as a result.
    if let (Err(pagewire::Error::NotConverging(why)), Some(handle), true) =
        (&sent, &handle, a.common.json || a.common.json_stream)
    {
        let received = d.receiver.join();
        let s = handle.snapshot();
        let mut v = serde_json::json!({
            "error": format!("the migration did not converge: {why}"),
            "live": true,
            "guest": what,
            "converged": false,
            "rounds": s.rounds,
            "downtime_ms": null,
            "expected_downtime_ms": s.expected_downtime_ms,
            "total_time_ms": s.total_time_ms,
            "dirty_sync_count": s.dirty_sync_count,
            "cpu_throttle_percentage": s.cpu_throttle_percentage,
            "receiver_error": match received {
                Ok(Err(e)) => Some(pagewire::error_chain(&e)),
                _ => None,
            },
        });
        if a.common.json_stream {
            v["event"] = "end".into();
        }
        println!("{v}");
        return Ok(false);
    }
    let (report, received) = both(sent, d.receiver)?;
    let difference = d.src.first_difference(&d.dst);
    let verified = difference.is_none();
    let s = &report.snapshot;
    if a.common.json || a.common.json_stream {
        let mut v = serde_json::to_value(&report.transfer)?;
        v["live"] = true.into();
        v["guest"] = what.into();
        v["converged"] = report.converged.into();
        v["rounds"] = serde_json::to_value(&s.rounds)?;
        v["downtime_ms"] = s.downtime_ms.into();
        v["expected_downtime_ms"] = s.expected_downtime_ms.into();
        // `setup_ms` means what it means in the static demo's JSON (the destination's memory
        // faulted in before the transfer); the migration's own setup (QEMU's `setup-time`) is
        // `migration_setup_ms`.
        v["setup_ms"] = d.setup_ms.into();
        v["migration_setup_ms"] = s.setup_ms.into();
        v["sender_cpu_ms"] = report.transfer.cpu_ms.into();
        v["receiver_cpu_ms"] = received.cpu_ms.into();
        v["receiver_cpu_s_per_gib"] = received.cpu_s_per_gib.into();
        v["dirty_sync_count"] = s.dirty_sync_count.into();
        v["cpu_throttle_percentage"] = s.cpu_throttle_percentage.into();
        v["verified"] = verified.into();
        v["receiver"] = serde_json::to_value(&received)?;
        if a.common.json_stream {
            v["event"] = "end".into();
        }
        println!("{v}");
    } else {
        println!(
            "pagewire: live migration converged after {} round(s) in {:.1} ms",
            s.rounds.len(),
            s.total_time_ms
        );
        println!(
            "  {:<24} {:.1} ms (expected {:.1} ms, limit {} ms)",
            "downtime",
            s.downtime_ms.unwrap_or(0.0),
            s.expected_downtime_ms,
            a.downtime_limit
        );
        println!(
            "  {:<24} {} bytes, {:.0} Mbit/s",
            "transferred", s.transferred, s.mbps
        );
        if a.auto_converge {
            println!(
                "  {:<24} {}% at the pause (auto-converge)",
                "vCPU throttle", s.cpu_throttle_percentage
            );
        }
        if report.transfer.unchecked_pages {
            println!(
                "  {:<24} {}",
                "page checksums",
                super::report::UNCHECKED_PAGES
            );
        }
        println!(
            "  {:<24} {}",
            "verified",
            if verified {
                "yes: destination equals the paused source"
            } else {
                "NO"
            }
        );
    }
    if let Some((region, page)) = difference {
        eprintln!("error: destination differs from source at region {region}, page {page}");
    }
    Ok(verified)
}

/// Prints each round as it completes (to standard error), until the migration ends.
fn print_rounds(handle: MigrationHandle) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut printed = 0;
        loop {
            let s = handle.snapshot();
            for r in &s.rounds[printed.min(s.rounds.len())..] {
                let throttled = match r.throttle_percent {
                    0 => String::new(),
                    p => format!(" (vCPU throttled {p}%)"),
                };
                eprintln!(
                    "  round {:>3}: {:>9} pages in {:>8.1} ms ({:>6.0} MB/s); the guest dirtied {} pages meanwhile{throttled}",
                    r.round,
                    r.pages,
                    r.ms,
                    r.bandwidth_bytes_per_s() / 1e6,
                    r.dirtied_pages
                );
            }
            printed = s.rounds.len();
            if !matches!(s.status, Status::Setup | Status::Active | Status::Device) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}
