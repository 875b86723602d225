//! Live migration sessions over loopback with a software dirtier writing the source while rounds
//! run: the destination equals the source after the last round (and a dropped last round is
//! caught by that comparison), a policy that gives up fails both sides with its reason, a
//! cancel from another thread ends both sides within a second, and a round the receiver never
//! reports placed fails the sender within its idle bound.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagewire::dirty::{DirtyBitmaps, DirtySource, SharedBitmap, Union};
use pagewire::live::dirtier::{DirtierConfig, SoftwareDirtier};
use pagewire::live::{AutoConverge, DowntimeLimit, Migration, Policy, Status, Throttling, Vmm};
use pagewire::protocol::blob::DeviceBlob;
use pagewire::receiver::{ReceiverHandle, ReceiverSnapshot};
use pagewire::synth::{fill, Content};
use pagewire::{
    Error, GuestMemory, PageRun, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender,
    SenderConfig,
};
use pagewire_tests::{join_within, skip_without_uring, tls_identities};

const MEMORY_BYTES: u64 = 64 << 20;

struct Pair {
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    receiver: std::thread::JoinHandle<pagewire::Result<pagewire::TransferStats>>,
    device_state: pagewire::receiver::DeviceState,
    /// The receiver's `query-migrate`.
    incoming: ReceiverHandle,
    sender: Sender,
}

fn connect(channels: u16) -> Pair {
    connect_with(channels, false)
}

fn connect_with(channels: u16, tls: bool) -> Pair {
    connect_through(channels, tls, |addr| addr, None, true)
}

/// A receiver and a sender connected to the address `route` gives for the receiver's (a proxy
/// in front of it, say), with the sender's idle bound when `sender_idle_timeout_ms` says, and
/// plaintext pages without checksums unless `page_checksums`.
fn connect_through(
    channels: u16,
    tls: bool,
    route: impl FnOnce(std::net::SocketAddr) -> std::net::SocketAddr,
    sender_idle_timeout_ms: Option<u64>,
    page_checksums: bool,
) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = tls_identities(dir.path(), tls);
    let specs = [RegionSpec {
        gpa: 0,
        len: MEMORY_BYTES,
    }];
    let src = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    fill(&src, Content::Mixed, 7);
    let dst = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            idle_timeout_ms: 5_000,
            tls: server,
            accept_unchecked_pages: !page_checksums,
            ..ReceiverConfig::default()
        },
    )
    .unwrap();
    let addr = route(receiver.local_addr().unwrap());
    let device_state = receiver.device_state();
    let incoming = receiver.handle();
    let receiver = std::thread::spawn(move || receiver.run());
    let defaults = SenderConfig::default();
    let sender = Sender::connect(
        addr,
        src.clone(),
        &SenderConfig {
            channels,
            pinning: Pinning::None,
            tls: client,
            idle_timeout_ms: sender_idle_timeout_ms.unwrap_or(defaults.idle_timeout_ms),
            page_checksums,
            ..defaults
        },
    )
    .unwrap();
    Pair {
        src,
        dst,
        receiver,
        device_state,
        incoming,
        sender,
    }
}

fn dirtier(
    src: &Arc<GuestMemory>,
    bitmap: &Arc<SharedBitmap>,
    bytes_per_s: u64,
) -> SoftwareDirtier {
    SoftwareDirtier::start(
        src.clone(),
        bitmap.clone(),
        DirtierConfig {
            bytes_per_s,
            region: 0,
            first_page: 1024,
            pages: 2048, // an 8 MiB working set
            seed: 3,
        },
    )
    .unwrap()
}

/// Snapshots of `incoming` every millisecond until it reports an end (at most 30 s).
fn watch_until_ended(incoming: &ReceiverHandle) -> Vec<ReceiverSnapshot> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let s = incoming.snapshot();
        let ended = matches!(
            s.status,
            Status::Completed | Status::Failed | Status::Cancelled
        );
        seen.push(s);
        if ended {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    seen
}

/// A migration of `sender`'s memory driven by `bitmap`, stopping once 50 ms of downtime fit.
fn within_50_ms(sender: Sender, bitmap: &Arc<SharedBitmap>) -> Migration {
    Migration::new(
        sender,
        Box::new(bitmap.clone()),
        Box::new(DowntimeLimit {
            downtime_limit_ms: 50,
            ..DowntimeLimit::default()
        }),
    )
}

#[test]
fn a_live_migration_converges_and_the_destination_equals_the_source() {
    if skip_without_uring() {
        return;
    }
    let p = connect(2);
    let bitmap = Arc::new(SharedBitmap::new(&p.src));
    let mut guest = dirtier(&p.src, &bitmap, 40 << 20);
    let migration = within_50_ms(p.sender, &bitmap);
    let handle = migration.handle();
    // The destination's own `query-migrate` while rounds run (sampled from another thread).
    let incoming = p.incoming.clone();
    let watching = std::thread::spawn(move || watch_until_ended(&incoming));
    let report = migration.run(&mut guest).unwrap();
    let received = join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
    let seen = join_within(watching, Duration::from_secs(10), "watcher");
    assert!(guest.writes() > 0, "the guest wrote while rounds ran");
    let done = p.incoming.snapshot();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(
        seen.last(),
        Some(&done),
        "the watcher ended on the final snapshot"
    );
    // The destination counts the rounds the source sent, and the bytes its shards took in.
    assert_eq!(done.rounds as usize, report.snapshot.rounds.len());
    assert_eq!(done.transferred, received.transferred_bytes);
    assert_eq!(done.memory_pages, MEMORY_BYTES / 4096);
    assert!(
        done.pages_placed > done.memory_pages,
        "round 0 placed every page, later rounds more: {done:?}"
    );
    assert!(done.setup_ms > 0.0 && done.setup_ms < done.total_time_ms && done.mbps > 0.0);
    // While it ran: active, its status never going back, its rounds and bytes only ever growing.
    let rank = |s: Status| match s {
        Status::Setup => 0,
        Status::Active => 1,
        Status::Device => 2,
        _ => 3,
    };
    let active: Vec<_> = seen.iter().filter(|s| s.status == Status::Active).collect();
    assert!(!active.is_empty(), "{seen:?}");
    for w in seen.windows(2) {
        assert!(
            rank(w[0].status) <= rank(w[1].status)
                && w[0].rounds <= w[1].rounds
                && w[0].transferred <= w[1].transferred,
            "{w:?}"
        );
    }
    assert!(active.iter().any(|s| s.transferred > 0), "{active:?}");
    assert_eq!(p.src.first_difference(&p.dst), None);
    // The last round's pages, sent with the guest paused after live ones, start the
    // downtime on the channels that carry them: their waits poll from then on.
    assert!(
        received.shards.iter().any(|c| c.downtime_began),
        "{:?}",
        received.shards
    );
    let s = &report.snapshot;
    assert_eq!(s.status, Status::Completed);
    assert!(report.converged);
    assert!(
        s.rounds.len() >= 3,
        "round 0, at least one round of dirty pages, then the last round"
    );
    // The live rounds carry what the paused round's estimate counts on: the dirtier's CPU,
    // the host's CPUs, and the engine's threads here (both sides' shards, over loopback).
    // (The host's busy CPUs need clock ticks that rounds this short may not see.)
    for r in &s.rounds[..s.rounds.len() - 1] {
        assert!(r.guest_cpus.is_some_and(|g| g > 0.0), "{r:?}");
        assert!(r.host_cpus > 0, "{r:?}");
        assert_eq!(r.engine_threads, 4, "{r:?}");
        assert!(r.tail_ms > 0.0 && r.tail_ms < r.ms, "{r:?}");
    }
    assert!(s.downtime_ms.is_some() && s.transferred > 0 && s.mbps > 0.0);
    // The downtime ends at the destination's confirmation, which every channel records.
    assert!(
        report
            .transfer
            .shards
            .iter()
            .all(|c| c.confirmed_at.is_some()),
        "{:?}",
        report.transfer.shards
    );
    assert_eq!(
        s.rounds[0].pages,
        MEMORY_BYTES / 4096,
        "round 0 sends everything"
    );
    assert_eq!(handle.snapshot().status, Status::Completed);
    eprintln!(
        "rounds {:?}, expected downtime {:.1} ms, downtime {:.1} ms",
        s.rounds.iter().map(|r| r.pages).collect::<Vec<_>>(),
        s.expected_downtime_ms,
        s.downtime_ms.unwrap()
    );
}

#[test]
fn a_live_migration_without_page_checksums_ends_with_the_paused_source() {
    if skip_without_uring() {
        return;
    }
    // Pages the dirtier writes under a live round's send arrive torn and unnoticed; the dirty
    // log names them, so later rounds (the paused one last) bring them whole.
    let p = connect_through(2, false, |addr| addr, None, false);
    let bitmap = Arc::new(SharedBitmap::new(&p.src));
    let mut guest = dirtier(&p.src, &bitmap, 40 << 20);
    let migration = within_50_ms(p.sender, &bitmap);
    let report = migration.run(&mut guest).unwrap();
    let received = join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
    assert!(guest.writes() > 0, "the guest wrote while rounds ran");
    assert!(report.converged);
    assert_eq!(p.src.first_difference(&p.dst), None);
    assert!(report.transfer.unchecked_pages && received.unchecked_pages);
    assert_eq!(
        received.torn_pages, 0,
        "nothing can be seen torn without checksums"
    );
}

/// A dirty source whose collect after the pause loses everything: the last round sends nothing.
struct ForgetsTheLastRound {
    inner: Arc<SharedBitmap>,
    paused: Arc<AtomicBool>,
}

impl DirtySource for ForgetsTheLastRound {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> pagewire::Result<()> {
        if self.paused.load(Ordering::Acquire) {
            into.clear();
            return Ok(());
        }
        self.inner.clone().collect(into)
    }
}

struct Pauses<'a>(&'a mut SoftwareDirtier, Arc<AtomicBool>);

impl Vmm for Pauses<'_> {
    fn pause(&mut self) -> pagewire::Result<()> {
        self.1.store(true, Ordering::Release);
        self.0.pause()
    }
}

#[test]
fn a_dropped_last_round_leaves_a_destination_that_differs() {
    if skip_without_uring() {
        return;
    }
    let p = connect(1);
    let bitmap = Arc::new(SharedBitmap::new(&p.src));
    let mut guest = dirtier(&p.src, &bitmap, 200 << 20);
    let paused = Arc::new(AtomicBool::new(false));
    let migration = Migration::new(
        p.sender,
        Box::new(ForgetsTheLastRound {
            inner: bitmap.clone(),
            paused: paused.clone(),
        }),
        // Any round's leftovers fit: stop right after round 0.
        Box::new(DowntimeLimit {
            downtime_limit_ms: 60_000,
            ..DowntimeLimit::default()
        }),
    );
    // Either the receiver's ledger refuses (a page torn in round 0 never arrived intact), or
    // the copy completes stale and the comparison the other tests make tells it from the
    // source: a broken last round cannot pass unnoticed.
    match migration.run(&mut Pauses(&mut guest, paused)) {
        Err(e) => {
            assert!(e.to_string().contains("never received"), "{e}");
            let r = join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap_err();
            assert!(matches!(r, Error::Incomplete { .. }), "receiver: {r}");
        }
        Ok(_) => {
            join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
            assert!(p.src.first_difference(&p.dst).is_some());
        }
    }
}

/// A guest that keeps a few pages dirty in every round whatever the scheduler does (the
/// dirtier thread may not run during a short round on two busy cores): such a migration never
/// fits a zero downtime limit.
struct AlwaysDirty;

impl DirtySource for AlwaysDirty {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> pagewire::Result<()> {
        into.mark(0, 0, 256);
        Ok(())
    }
}

/// A migration of `src` under `limit`, its guest writing 400 MB/s, its dirty source adding 256
/// pages that are always dirty (so a downtime limit of 0 is never met), and the guest to run.
fn busy_migration(
    sender: Sender,
    src: &Arc<GuestMemory>,
    limit: DowntimeLimit,
) -> (Migration, SoftwareDirtier) {
    let bitmap = Arc::new(SharedBitmap::new(src));
    let guest = dirtier(src, &bitmap, 400 << 20);
    let source = Box::new(Union(vec![Box::new(bitmap), Box::new(AlwaysDirty)]));
    (Migration::new(sender, source, Box::new(limit)), guest)
}

/// Never converges by itself: only a cancel ends it.
const UNTIL_CANCELLED: DowntimeLimit = DowntimeLimit {
    downtime_limit_ms: 0,
    rounds_max: 1_000_000,
    total_ms_max: 60_000,
};

#[test]
fn a_policy_that_gives_up_fails_both_sides_with_its_reason() {
    if skip_without_uring() {
        return;
    }
    let p = connect(2);
    let (migration, mut guest) = busy_migration(
        p.sender,
        &p.src,
        DowntimeLimit {
            downtime_limit_ms: 0,
            rounds_max: 3,
            ..DowntimeLimit::default()
        },
    );
    let handle = migration.handle();
    let err = migration.run(&mut guest).unwrap_err();
    assert!(matches!(err, Error::NotConverging(_)), "{err}");
    assert!(err.to_string().contains("3 rounds"), "{err}");
    let r = join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap_err();
    assert!(r.to_string().contains("not converging"), "receiver: {r}");
    let s = handle.snapshot();
    assert_eq!((s.status, s.rounds.len()), (Status::Failed, 3));
}

/// A dirty source that fails on its `n`th collect (a KVM ioctl error, a VMM's bitmap gone).
struct FailsAt(u32);

impl DirtySource for FailsAt {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> pagewire::Result<()> {
        self.0 -= 1;
        if self.0 == 0 {
            return Err(Error::Config("the dirty log went away".into()));
        }
        into.mark(0, 0, 16);
        Ok(())
    }
}

#[test]
fn a_failing_dirty_source_fails_both_sides_with_its_reason() {
    if skip_without_uring() {
        return;
    }
    // The first collect (before round 0), those after rounds 0 and 1, and the one after the
    // pause (the policy stops after round 1: a round of dirty pages, and they fit).
    for n in [1, 2, 3, 4] {
        let p = connect(2);
        let bitmap = Arc::new(SharedBitmap::new(&p.src));
        let mut guest = dirtier(&p.src, &bitmap, 0);
        let migration = Migration::new(
            p.sender,
            Box::new(FailsAt(n)),
            Box::new(DowntimeLimit {
                downtime_limit_ms: 10_000,
                ..DowntimeLimit::default()
            }),
        );
        let err = migration.run(&mut guest).unwrap_err();
        assert!(
            err.to_string().contains("dirty log went away"),
            "{n}: {err}"
        );
        let r = join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap_err();
        assert!(
            r.to_string().contains("dirty log went away"),
            "{n}: the receiver should hear why: {r}"
        );
    }
}

/// A dirty source that spends `burn` of this thread's CPU in every collect (a KVM dirty log
/// harvested and write-protected again costs such CPU) and reports 16 pages.
struct Burning {
    burn: Duration,
    collects: Arc<std::sync::atomic::AtomicU32>,
}

impl DirtySource for Burning {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> pagewire::Result<()> {
        self.collects.fetch_add(1, Ordering::Relaxed);
        let start = pagewire::sys::thread_cpu_time();
        while pagewire::sys::thread_cpu_time() - start < self.burn {
            std::hint::spin_loop();
        }
        into.mark(0, 0, 16);
        Ok(())
    }
}

#[test]
fn a_live_migrations_cpu_counts_the_work_between_rounds() {
    if skip_without_uring() {
        return;
    }
    // Collects (before round 0, after each round, after the pause) of 40 ms each: the sending
    // side's CPU holds them beside its shards'.
    let p = connect(2);
    let bitmap = Arc::new(SharedBitmap::new(&p.src));
    let mut guest = dirtier(&p.src, &bitmap, 0);
    let burn = Duration::from_millis(40);
    let collects = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let migration = Migration::new(
        p.sender,
        Box::new(Burning {
            burn,
            collects: collects.clone(),
        }),
        Box::new(DowntimeLimit {
            downtime_limit_ms: 10_000,
            ..DowntimeLimit::default()
        }),
    );
    let report = migration.run(&mut guest).unwrap();
    join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
    let shards: f64 = report.transfer.shards.iter().map(|s| s.cpu_ms).sum();
    let collects = f64::from(collects.load(Ordering::Relaxed));
    assert!(collects >= 3.0, "{collects} collects");
    let between = report.transfer.cpu_ms - shards;
    assert!(
        between >= collects * burn.as_secs_f64() * 1e3,
        "{between:.1} ms of CPU beside the shards', for {collects} collects of {burn:?}"
    );
    // Each live round says how long its shards waited for a CPU and ran on one, where the
    // kernel tells (the paused round does not: reading it would lengthen the downtime).
    let rounds = &report.snapshot.rounds;
    let (last, live) = rounds.split_last().unwrap();
    assert_eq!(
        [
            last.send_run_delay_share,
            last.recv_run_delay_share,
            last.send_cpu_share,
            last.recv_cpu_share
        ],
        [None; 4]
    );
    if std::path::Path::new("/proc/self/schedstat").exists() {
        for r in live {
            let shares = [
                r.send_run_delay_share,
                r.recv_run_delay_share,
                r.send_cpu_share,
                r.recv_cpu_share,
            ];
            assert!(
                shares
                    .iter()
                    .all(|s| s.is_some_and(|s| (0.0..=1.5).contains(&s))),
                "round {}: {shares:?}",
                r.round
            );
        }
    }
}

/// Auto-converge: a guest that dirties its working set faster than a 40 MB/s link can send it
/// never fits 50 ms of downtime (the plain policy gives up at its round cap), but throttled step
/// by step it does, and the destination equals the paused source.
#[test]
fn a_guest_faster_than_the_link_converges_only_once_auto_converge_throttles_it() {
    if skip_without_uring() {
        return;
    }
    let limit = DowntimeLimit {
        downtime_limit_ms: 50,
        rounds_max: 10,
        ..DowntimeLimit::default()
    };
    let run = |policy: Box<dyn Policy>| {
        let p = connect(2);
        p.sender.bandwidth_limit().set(Some(40_000_000));
        let bitmap = Arc::new(SharedBitmap::new(&p.src));
        let mut guest = dirtier(&p.src, &bitmap, 80_000_000);
        let migration = Migration::new(p.sender, Box::new(bitmap.clone()), policy);
        let handle = migration.handle();
        let result = migration.run(&mut guest);
        // Whatever the outcome, the throttle ends with the migration.
        assert_eq!(guest.throttle_percent(), 0);
        let received = join_within(p.receiver, Duration::from_secs(10), "receiver");
        (result, received, handle.snapshot(), p.src, p.dst)
    };
    let (result, received, s, ..) = run(Box::new(limit));
    assert!(
        matches!(result, Err(Error::NotConverging(_))),
        "without throttling: {result:?}"
    );
    assert!(received.is_err());
    assert_eq!(s.cpu_throttle_percentage, 0);
    // Quicker steps than QEMU's, so the test stays short: one dirty round each, 20% more.
    let auto = AutoConverge::new(
        limit,
        Throttling {
            trigger_rounds: 1,
            increment_percent: 20,
            ..Throttling::default()
        },
    );
    let (result, received, s, src, dst) = run(Box::new(auto));
    let report = result.unwrap();
    received.unwrap();
    assert!(report.converged);
    assert_eq!(src.first_difference(&dst), None);
    // The throttle of each live round (the paused one runs no guest), stepping up.
    let live = &s.rounds[..s.rounds.len() - 1];
    let throttles: Vec<u8> = live.iter().map(|r| r.throttle_percent).collect();
    assert!(
        s.cpu_throttle_percentage >= 20
            && throttles.last() == Some(&s.cpu_throttle_percentage)
            && throttles.windows(2).all(|w| w[0] <= w[1]),
        "throttle {}%, by round {throttles:?}",
        s.cpu_throttle_percentage
    );
    eprintln!(
        "converged after {} rounds, throttle by round {throttles:?}, downtime {:.1} ms",
        s.rounds.len(),
        s.downtime_ms.unwrap_or(-1.0)
    );
}

/// Forwards a channel both ways until `mute` is set; from then on the receiver's messages are
/// read and dropped, while the sender's bytes still reach the receiver: a receiver that took
/// everything and then hung, as far as the sender can tell.
fn muting_proxy(server: std::net::SocketAddr, mute: Arc<AtomicBool>) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((client, _)) = listener.accept() else {
            return;
        };
        let Ok(upstream) = TcpStream::connect(server) else {
            return;
        };
        let (mut c_read, mut u_write) =
            (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        let (mut u_read, mut c_write) = (upstream, client);
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = u_read.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if !mute.load(Ordering::Acquire) && c_write.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut buf = [0u8; 65536];
        while let Ok(n) = c_read.read(&mut buf) {
            if n == 0 || u_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    addr
}

#[test]
fn a_round_never_reported_placed_fails_the_sender_within_its_idle_bound() {
    if skip_without_uring() {
        return;
    }
    let mute = Arc::new(AtomicBool::new(false));
    let muted = mute.clone();
    let p = connect_through(
        1,
        false,
        |addr| muting_proxy(addr, muted),
        Some(1_000),
        true,
    );
    let mut sender = p.sender;
    let round = sender.send_live_round(&PageRun::whole(&p.src)).unwrap();
    sender.wait_placed(round.round).unwrap();
    // A small round fits the socket buffers whole: every send completes, and only the
    // receiver's RoundPlaced, which the proxy now drops, can end the wait.
    mute.store(true, Ordering::Release);
    let small = [PageRun {
        region: 0,
        first_page: 0,
        pages: 16,
    }];
    let waiter = std::thread::spawn(move || {
        let round = sender.send_live_round(&small)?;
        sender.wait_placed(round.round)
    });
    let err = join_within(waiter, Duration::from_secs(15), "the sender").unwrap_err();
    assert!(err.to_string().contains("report a round placed"), "{err}");
    // The sender's abort still reaches the receiver, which ends too.
    let _ = join_within(p.receiver, Duration::from_secs(10), "receiver");
}

#[test]
fn a_cancel_from_another_thread_ends_both_sides_within_a_second() {
    if skip_without_uring() {
        return;
    }
    let p = connect(2);
    let (migration, mut guest) = busy_migration(p.sender, &p.src, UNTIL_CANCELLED);
    let handle = migration.handle();
    let run = std::thread::spawn(move || migration.run(&mut guest));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(handle.snapshot().status, Status::Active);
    let cancelled = Instant::now();
    handle.cancel();
    let err = join_within(run, Duration::from_secs(1), "cancelled sender").unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    let r = join_within(p.receiver, Duration::from_secs(1), "receiver").unwrap_err();
    assert!(r.to_string().contains("cancelled"), "receiver: {r}");
    assert!(cancelled.elapsed() < Duration::from_secs(1));
    assert_eq!(handle.snapshot().status, Status::Cancelled);
    // Cancelled at the source: the destination failed (as QEMU's does).
    assert_eq!(p.incoming.snapshot().status, Status::Failed);
}

/// A dirty source that cancels the migration while the policy is about to stop and copy.
struct CancelsAfterRoundZero {
    collects: u32,
    canceller: pagewire::sender::Canceller,
}

impl DirtySource for CancelsAfterRoundZero {
    fn collect(&mut self, _into: &mut DirtyBitmaps) -> pagewire::Result<()> {
        // The first collect clears what came before round 0; the second follows it.
        self.collects += 1;
        if self.collects == 2 {
            self.canceller.cancel();
        }
        Ok(())
    }
}

struct StopNow;

impl Policy for StopNow {
    fn decide(&mut self, _: &pagewire::live::PolicyView<'_>) -> pagewire::live::Decision {
        pagewire::live::Decision::StopAndCopy
    }
}

struct CountsPauses(u32);

impl Vmm for CountsPauses {
    fn pause(&mut self) -> pagewire::Result<()> {
        self.0 += 1;
        Ok(())
    }
}

/// A cancel that returned before the policy chose to stop: the guest is never paused.
#[test]
fn a_cancel_before_the_stop_never_pauses_the_guest() {
    if skip_without_uring() {
        return;
    }
    let p = connect(1);
    let source = CancelsAfterRoundZero {
        collects: 0,
        canceller: p.sender.canceller(),
    };
    let migration = Migration::new(p.sender, Box::new(source), Box::new(StopNow));
    let handle = migration.handle();
    let mut vmm = CountsPauses(0);
    let err = migration.run(&mut vmm).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(vmm.0, 0, "the guest was paused after the cancel");
    // The policy did choose to stop, and the snapshot keeps saying so after the failure.
    let s = handle.snapshot();
    assert_eq!((s.status, s.converged), (Status::Cancelled, true));
    let r = join_within(p.receiver, Duration::from_secs(5), "receiver").unwrap_err();
    assert!(r.to_string().contains("cancelled"), "receiver: {r}");
}

/// A VMM whose pause makes another thread cancel the migration, and whose device state takes
/// a while: the cancel lands while the guest is paused and the last round goes out.
struct CancelledWhilePaused {
    handle: pagewire::live::MigrationHandle,
    cancelled: Option<std::thread::JoinHandle<Instant>>,
}

impl Vmm for CancelledWhilePaused {
    fn pause(&mut self) -> pagewire::Result<()> {
        let handle = self.handle.clone();
        self.cancelled = Some(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            handle.cancel();
            Instant::now()
        }));
        Ok(())
    }
    fn device_state(&mut self) -> pagewire::Result<Vec<DeviceBlob>> {
        std::thread::sleep(Duration::from_millis(200));
        Ok(vec![DeviceBlob {
            tag: 1,
            bytes: vec![7; 100],
        }])
    }
}

/// A cancel from another thread while the guest is paused (the last round and the device state
/// going out, before the end of the stream): both sides end cancelled within a second, and the
/// destination never reports the migration complete, so the source may resume its guest.
#[test]
fn a_cancel_while_the_guest_is_paused_ends_both_sides_within_a_second() {
    if skip_without_uring() {
        return;
    }
    let p = connect(2);
    let migration = Migration::new(p.sender, Box::new(AlwaysDirty), Box::new(StopNow));
    let mut vmm = CancelledWhilePaused {
        handle: migration.handle(),
        cancelled: None,
    };
    let handle = migration.handle();
    let err = migration.run(&mut vmm).unwrap_err();
    let ended = Instant::now();
    assert!(matches!(err, Error::Cancelled), "{err}");
    let at = vmm
        .cancelled
        .take()
        .expect("the guest was paused")
        .join()
        .unwrap();
    assert!(
        ended.saturating_duration_since(at) < Duration::from_secs(1),
        "the source ended {:?} after the cancel",
        ended.saturating_duration_since(at)
    );
    assert_eq!(handle.snapshot().status, Status::Cancelled);
    let r = join_within(p.receiver, Duration::from_secs(1), "receiver").unwrap_err();
    assert!(r.to_string().contains("cancelled"), "receiver: {r}");
}

/// A paused guest with device state: blobs of several chunks, an empty one, a tiny one.
struct WithDevices(SoftwareDirtier, Vec<DeviceBlob>);

impl Vmm for WithDevices {
    fn pause(&mut self) -> pagewire::Result<()> {
        self.0.pause()
    }
    fn device_state(&mut self) -> pagewire::Result<Vec<DeviceBlob>> {
        Ok(self.1.clone())
    }
}

fn blobs_arrive_byte_identical(tls: bool) {
    let p = connect_with(2, tls);
    let bitmap = Arc::new(SharedBitmap::new(&p.src));
    let guest = dirtier(&p.src, &bitmap, 20 << 20);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..300_000)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    let blobs = vec![
        DeviceBlob {
            tag: 0x6370_7530,
            bytes: big,
        },
        DeviceBlob {
            tag: 2,
            bytes: vec![],
        },
        DeviceBlob {
            tag: 3,
            bytes: b"virtio!".to_vec(),
        },
    ];
    let mut vmm = WithDevices(guest, blobs.clone());
    let sent = p.sender.progress();
    let report = Migration::new(
        p.sender,
        Box::new(bitmap.clone()),
        Box::new(DowntimeLimit::default()),
    )
    .run(&mut vmm)
    .unwrap();
    let received = join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
    assert_eq!(p.src.first_difference(&p.dst), None);
    assert_eq!(p.device_state.take(), blobs);
    // Both sides count the device state's bytes alike (chunk headers on top of the blobs').
    let device_bytes = p.incoming.snapshot().device_state_bytes;
    let blob_bytes: usize = blobs.iter().map(|b| b.bytes.len()).sum();
    assert!(device_bytes > blob_bytes as u64, "{device_bytes}");
    assert_eq!(
        sent.device_state_bytes.load(Ordering::Relaxed),
        device_bytes
    );
    // Both sides count the same bytes on the wire, the device state's included (under TLS
    // the sender counts the records' framing too, which the receiver does not see).
    if !tls {
        assert_eq!(
            received.transferred_bytes, report.transfer.transferred_bytes,
            "receiver against sender"
        );
    }
}

#[test]
fn device_state_blobs_arrive_byte_identical_plaintext() {
    if skip_without_uring() {
        return;
    }
    blobs_arrive_byte_identical(false);
}

#[test]
fn device_state_blobs_arrive_byte_identical_tls() {
    if skip_without_uring() {
        return;
    }
    blobs_arrive_byte_identical(true);
}

/// Device state is the guest's at the pause: a round after it is refused, and a receiver whose
/// transfer fails (pages missing) hands over no blobs.
#[test]
fn device_state_comes_last_and_only_with_all_the_pages() {
    if skip_without_uring() {
        return;
    }
    let blob = DeviceBlob {
        tag: 5,
        bytes: b"registers".to_vec(),
    };
    let mut p = connect(2);
    p.sender.send_all().unwrap();
    p.sender
        .send_device_state(std::slice::from_ref(&blob))
        .unwrap();
    let err = p
        .sender
        .send_round(&[PageRun {
            region: 0,
            first_page: 0,
            pages: 1,
        }])
        .unwrap_err();
    assert!(err.to_string().contains("after send_device_state"), "{err}");
    p.sender.finish().unwrap();
    join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
    assert_eq!(p.device_state.take(), std::slice::from_ref(&blob));

    let mut p = connect(2);
    p.sender
        .send_round(&[PageRun {
            region: 0,
            first_page: 0,
            pages: 1,
        }])
        .unwrap();
    p.sender.send_device_state(&[blob]).unwrap();
    assert!(p.sender.finish().is_err());
    let r = join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap_err();
    assert!(matches!(r, Error::Incomplete { .. }), "{r}");
    assert_eq!(
        p.device_state.take(),
        [],
        "no blobs without the whole memory"
    );
}

#[test]
fn a_bandwidth_change_mid_transfer_changes_the_rate() {
    if skip_without_uring() {
        return;
    }
    const LIMIT: u64 = 32 << 20;
    let mut p = connect(2);
    let limit = p.sender.bandwidth_limit();
    limit.set(Some(LIMIT));
    let progress = p.sender.progress();
    let started = Instant::now();
    let lift = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        let sent = progress.wire_bytes.load(Ordering::Relaxed);
        limit.set(None);
        sent
    });
    p.sender.send_all().unwrap();
    p.sender.finish().unwrap();
    let elapsed = started.elapsed();
    let limited = lift.join().unwrap();
    join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
    assert_eq!(p.src.first_difference(&p.dst), None);
    // Under the limit, 400 ms carry about 13 MiB (allow a chain of slack either way); at the
    // limit the whole 64 MiB (about half of it zero pages, which cost nothing) would take
    // ~1 s, so lifting it shows in the total time.
    let limited_rate = limited as f64 / 0.4;
    assert!(
        limited_rate < 1.5 * LIMIT as f64,
        "{:.1} MiB/s while limited to {} MiB/s",
        limited_rate / f64::from(1 << 20),
        LIMIT >> 20
    );
    let total = MEMORY_BYTES as f64 / 2.0;
    let at_limit = Duration::from_secs_f64(total / LIMIT as f64);
    assert!(
        elapsed < at_limit,
        "{elapsed:?}: no faster than at the limit ({at_limit:?})"
    );
}

/// The migration's own handle (what a VMM's `migrate-set-parameters max-bandwidth` calls)
/// limits a running migration and lifts the limit again: the rate follows both ways.
#[test]
fn the_migration_handle_s_bandwidth_limit_changes_a_running_migration_s_rate() {
    if skip_without_uring() {
        return;
    }
    const LIMIT: u64 = 8 << 20;
    let p = connect(2);
    let (migration, mut guest) = busy_migration(p.sender, &p.src, UNTIL_CANCELLED);
    let handle = migration.handle();
    handle.set_max_bandwidth(Some(LIMIT));
    let running = std::thread::spawn(move || migration.run(&mut guest));
    let rate_over = |ms: u64| {
        let before = handle.snapshot().transferred;
        std::thread::sleep(Duration::from_millis(ms));
        (handle.snapshot().transferred - before) as f64 / (ms as f64 / 1e3)
    };
    std::thread::sleep(Duration::from_millis(200));
    let limited = rate_over(600);
    handle.set_max_bandwidth(None);
    std::thread::sleep(Duration::from_millis(100));
    let lifted = rate_over(600);
    handle.cancel();
    let sent = join_within(running, Duration::from_secs(2), "migration");
    assert!(sent.is_err(), "cancelled, yet {sent:?}");
    let _ = join_within(p.receiver, Duration::from_secs(2), "receiver");
    let mib = |r: f64| r / f64::from(1 << 20);
    assert!(
        limited < 1.5 * LIMIT as f64,
        "{:.1} MiB/s while limited to {} MiB/s",
        mib(limited),
        LIMIT >> 20
    );
    assert!(
        lifted > 4.0 * LIMIT as f64,
        "{:.1} MiB/s once lifted, against {:.1} MiB/s limited",
        mib(lifted),
        mib(limited)
    );
}

/// Dirty from round 0 on: 4096 pages (16 MiB), and once round 0 is through, a bandwidth limit
/// under which they would take 4 s.
struct DirtyThenLimited {
    collects: u32,
    limit: pagewire::sender::BandwidthLimit,
}

impl DirtySource for DirtyThenLimited {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> pagewire::Result<()> {
        self.collects += 1;
        if self.collects >= 2 {
            into.mark(0, 0, 4096);
        }
        if self.collects == 2 {
            self.limit.set(Some(4 << 20));
        }
        Ok(())
    }
}

/// The bandwidth limit shapes the live rounds, not the downtime: as QEMU's stop-and-copy
/// ignores `max-bandwidth`, the paused round goes unlimited (16 MiB at the 4 MiB/s limit
/// would pause the guest for 4 s).
#[test]
fn a_bandwidth_limit_does_not_stretch_the_downtime() {
    if skip_without_uring() {
        return;
    }
    let p = connect(2);
    let source = DirtyThenLimited {
        collects: 0,
        limit: p.sender.bandwidth_limit(),
    };
    let migration = Migration::new(p.sender, Box::new(source), Box::new(StopNow));
    let report = migration.run(&mut CountsPauses(0)).unwrap();
    join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
    assert_eq!(p.src.first_difference(&p.dst), None);
    let last = report.snapshot.rounds.last().unwrap();
    assert_eq!(last.pages, 4096);
    let downtime = report.snapshot.downtime_ms.unwrap();
    assert!(
        downtime < 1000.0,
        "paused for {downtime:.0} ms: the 4 MiB/s limit held the last round"
    );
}

/// A very low limit makes each chain's wait long (a 512 KiB frame at 32 KiB/s per channel: 16
/// s); lifting the limit must end the wait at once, not after it.
#[test]
fn lifting_a_low_bandwidth_limit_ends_the_wait_it_made() {
    if skip_without_uring() {
        return;
    }
    let mut p = connect(2);
    let limit = p.sender.bandwidth_limit();
    limit.set(Some(64 << 10));
    let started = Instant::now();
    let lift = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        limit.set(None);
    });
    p.sender.send_all().unwrap();
    p.sender.finish().unwrap();
    lift.join().unwrap();
    join_within(p.receiver, Duration::from_secs(10), "receiver").unwrap();
    assert_eq!(p.src.first_difference(&p.dst), None);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?} after the limit was lifted at 300 ms",
        started.elapsed()
    );
}

#[test]
fn a_receiver_cancelled_while_waiting_or_receiving_ends_within_a_second() {
    if skip_without_uring() {
        return;
    }
    // Waiting for a sender.
    let dst = Arc::new(
        GuestMemory::anonymous(&[RegionSpec {
            gpa: 0,
            len: 1 << 20,
        }])
        .unwrap(),
    );
    let receiver = Receiver::bind("127.0.0.1:0", dst, ReceiverConfig::default()).unwrap();
    let cancel = receiver.canceller();
    let incoming = receiver.handle();
    let waiting = std::thread::spawn(move || receiver.run());
    std::thread::sleep(Duration::from_millis(200));
    let s = incoming.snapshot();
    assert_eq!(
        (s.status, s.total_time_ms, s.transferred),
        (Status::Setup, 0.0, 0)
    );
    cancel.cancel();
    let err = join_within(waiting, Duration::from_secs(1), "waiting receiver").unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(incoming.snapshot().status, Status::Cancelled);

    // Receiving a live migration that would not end by itself.
    let specs = [RegionSpec {
        gpa: 0,
        len: MEMORY_BYTES,
    }];
    let src = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let dst = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst,
        ReceiverConfig {
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    )
    .unwrap();
    let addr = receiver.local_addr().unwrap();
    let incoming = receiver.handle();
    let receiving = std::thread::spawn(move || receiver.run());
    let sender = Sender::connect(
        addr,
        src.clone(),
        &SenderConfig {
            pinning: Pinning::None,
            ..SenderConfig::default()
        },
    )
    .unwrap();
    let (migration, mut guest) = busy_migration(sender, &src, UNTIL_CANCELLED);
    let sending = std::thread::spawn(move || migration.run(&mut guest));
    std::thread::sleep(Duration::from_millis(300));
    let s = incoming.snapshot();
    assert_eq!(s.status, Status::Active, "{s:?}");
    assert!(s.transferred > 0 && s.total_time_ms > 0.0, "{s:?}");
    // The handle cancels as the receiver's canceller does.
    incoming.cancel();
    let r = join_within(receiving, Duration::from_secs(1), "receiver").unwrap_err();
    assert!(matches!(r, Error::Cancelled), "{r}");
    let ended = incoming.snapshot();
    assert_eq!(ended.status, Status::Cancelled);
    assert!(ended.transferred >= s.transferred && ended.rounds >= s.rounds);
    let s = join_within(sending, Duration::from_secs(1), "sender").unwrap_err();
    assert!(s.to_string().contains("cancelled"), "sender: {s}");
}

/// A sender cancelled before it is connected: while its connect hangs (a listener whose
/// backlog is full drops the SYNs, as a host behind a dead route would) and while its
/// handshake waits for a receiver that accepted and never answers. Each used to hold
/// `Sender::connect` until its 10 s bound; a handle made beforehand
/// (`SenderConfig::canceller`) now ends it within a second, with `Cancelled`, every thread
/// joined.
#[test]
fn a_sender_cancelled_while_connecting_or_handshaking_ends_within_a_second() {
    if skip_without_uring() {
        return;
    }
    let cancelled_after = |addr: std::net::SocketAddr, what: &str| {
        let canceller = pagewire::sender::Canceller::new();
        let config = SenderConfig {
            pinning: Pinning::None,
            canceller: Some(canceller.clone()),
            ..SenderConfig::default()
        };
        let memory = Arc::new(
            GuestMemory::anonymous(&[RegionSpec {
                gpa: 0,
                len: 1 << 20,
            }])
            .unwrap(),
        );
        let again = (config.clone(), memory.clone());
        let connecting = std::thread::spawn(move || Sender::connect(addr, memory, &config));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !connecting.is_finished(),
            "{what}: the connect did not wait"
        );
        let at = Instant::now();
        canceller.cancel();
        let err = join_within(connecting, Duration::from_secs(2), what).unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{what}: {err}");
        assert!(
            at.elapsed() < Duration::from_secs(1),
            "{what}: {:?} after the cancel",
            at.elapsed()
        );
        // One sender per handle: a retry with the same config is refused, not "cancelled".
        let err = Sender::connect(addr, again.1, &again.0).unwrap_err();
        assert!(
            err.to_string().contains("given to a sender already"),
            "{what}: {err}"
        );
    };

    // A receiver that accepts and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let holding = std::thread::spawn(move || {
        let mut held = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until && held.len() < 2 {
            match silent.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        held
    });
    cancelled_after(addr, "handshake");
    drop(holding.join());

    // A listener that accepts nothing, its backlog full: further connects hang.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    full.listen(0).unwrap();
    let addr = full.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    let hangs = (0..8).any(|_| {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => {
                queued.push(s);
                false
            }
            Err(_) => true,
        }
    });
    if !hangs {
        eprintln!("SKIPPED (connect stage): a full backlog here does not make connects wait");
        return;
    }
    cancelled_after(addr, "connect");
}

/// "Nothing left running" after a cancel, counted: the cancel tests above run again, one after
/// another, and after each the process must hold no thread named `pw-*` (the names of the
/// library's shard, handshake, watchdog, pre-fault and dirtier threads) and no more threads
/// than before it (the tests' own threads, and the library's unnamed scoped ones). Threads are counted in `/proc/self/task`, which is only
/// meaningful with nothing else running in the process, so the test re-runs itself alone in a
/// child process of this test binary and does the counting there.
#[test]
fn every_cancel_leaves_no_thread_running() {
    if skip_without_uring() {
        return;
    }
    const CHILD_ENV: &str = "PAGEWIRE_TEST_THREADS_CHILD";
    const NAME: &str = "every_cancel_leaves_no_thread_running";
    if std::env::var_os(CHILD_ENV).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && all.contains("1 passed"),
            "the counting child failed:\n{all}"
        );
        eprintln!("{all}");
        return;
    }
    let threads = || -> Vec<String> {
        let mut names = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            // A thread that ended between the listing and the read is gone: not counted.
            if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
                names.push(comm.trim().to_string());
            }
        }
        names.sort();
        names
    };
    let before = threads();
    let cancels: [(&str, fn()); 5] = [
        (
            "live, from another thread",
            a_cancel_from_another_thread_ends_both_sides_within_a_second,
        ),
        (
            "before the stop",
            a_cancel_before_the_stop_never_pauses_the_guest,
        ),
        (
            "while the guest is paused",
            a_cancel_while_the_guest_is_paused_ends_both_sides_within_a_second,
        ),
        (
            "the receiver",
            a_receiver_cancelled_while_waiting_or_receiving_ends_within_a_second,
        ),
        (
            "while connecting or handshaking",
            a_sender_cancelled_while_connecting_or_handshaking_ends_within_a_second,
        ),
    ];
    for (what, cancel) in cancels {
        cancel();
        // A joined thread can linger in /proc for a moment after its join returned (longer on
        // a loaded host); one that was not joined is still running. The bound for a
        // cancel is a second, so a thread still there a second later is one too many.
        let until = Instant::now() + Duration::from_secs(1);
        let mut now = threads();
        while (now.len() > before.len() || now.iter().any(|t| t.starts_with("pw-")))
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(10));
            now = threads();
        }
        assert!(
            now.len() <= before.len() && !now.iter().any(|t| t.starts_with("pw-")),
            "after the cancel {what}, threads still running: {now:?} (before: {before:?})"
        );
        eprintln!("after the cancel {what}: {} threads, as before", now.len());
    }
}

/// `query-migrate`'s time, bytes and rate move while a round runs, not only when one ends:
/// round 0 of a large guest is most of a migration. At 32 MiB/s round 0 here takes about a
/// second; half a second in, the snapshot must show the time and the bytes so far.
#[test]
fn the_snapshot_moves_during_a_round() {
    if skip_without_uring() {
        return;
    }
    let p = connect(2);
    p.sender.bandwidth_limit().set(Some(32 << 20));
    let (migration, mut guest) = busy_migration(p.sender, &p.src, UNTIL_CANCELLED);
    let handle = migration.handle();
    let watcher = handle.clone();
    let watch = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let s = watcher.snapshot();
        watcher.cancel();
        s
    });
    let err = migration.run(&mut guest).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    let _ = join_within(p.receiver, Duration::from_secs(10), "receiver");
    let s = watch.join().unwrap();
    assert_eq!(s.status, Status::Active);
    assert!(
        s.rounds.is_empty(),
        "round 0 ended within 500 ms: {:?}",
        s.rounds.len()
    );
    assert!(
        s.total_time_ms >= 400.0,
        "total_time_ms {}",
        s.total_time_ms
    );
    assert!(s.transferred > 4 << 20, "transferred {}", s.transferred);
    assert!(s.mbps > 32.0, "mbps {}", s.mbps);
    // Once ended, the figures stay where the migration stopped.
    let end = handle.snapshot();
    assert_eq!(end.status, Status::Cancelled);
    assert!(end.total_time_ms >= s.total_time_ms && end.transferred >= s.transferred);
}
