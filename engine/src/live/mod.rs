//! Live migration, source side: iterative pre-copy driven by a dirty-page source.
//!
//! ```text
//!  setup      clear the dirty source (only writes from now on count)
//!  round 0    all memory, live (vCPUs run; zero pages cost a header entry)
//!  round k    wait until the receiver placed the last round (RoundPlaced on every channel),
//!             collect and clear the dirty pages, measure the round, ask the policy:
//!             NextRound → send them live; StopAndCopy → below; GiveUp → fail, guest runs on
//!  stop       pause the vCPUs (Vmm::pause), collect once more (what was written since the
//!             last collect), send those pages as a stable round
//!  device     the VMM's device state (Vmm::device_state) as tagged blobs
//!  finish     end the stream; the receiver confirms only when every page of the layout was
//!             placed, and the rounds' barrier keeps an older copy of a page from ever
//!             landing after a newer one. A page torn by a vCPU write in a live round is in
//!             the next collect, so a later round (at the latest the stable one) carries it
//!             again; where its plaintext checksum shows the tear, the receiver also leaves it
//!             un-placed until then
//! ```
//! Downtime is measured from the pause to the receiver's confirmation. The policy is
//! replaceable ([`policy::Policy`]); [`Migration::handle`] gives another thread a
//! [`MigrationHandle`] to cancel and to read a `query-migrate`-like [`Snapshot`]. The
//! destination runs a [`Receiver`](crate::Receiver), whose
//! [`handle`](crate::Receiver::handle) does the same on its side
//! ([`ReceiverSnapshot`](crate::receiver::ReceiverSnapshot), with the same [`Status`]).

pub mod autoconverge;
pub mod dirtier;
pub mod guestcode;
pub mod policy;
mod snapshot;
#[cfg(feature = "kvm")]
pub mod tinyguest;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::dirty::{DirtyBitmaps, DirtySource};
use crate::error::{Error, Result};
use crate::protocol::blob::DeviceBlob;
use crate::sender::{BandwidthLimit, Canceller, PageRun, Sender};
use crate::stats::TransferStats;

pub use autoconverge::{AutoConverge, Throttling};
pub use policy::{Decision, DowntimeLimit, Estimates, Policy, PolicyView, RoundFigures};
use snapshot::{Running, Shared};
pub use snapshot::{Snapshot, Status};

/// What the migration needs of the VMM on the source.
pub trait Vmm {
    /// Pauses every vCPU and device that writes guest memory: when this returns, nothing
    /// writes it any more (the last round is sent from it as it is).
    fn pause(&mut self) -> Result<()>;

    /// The device state to carry after the last round (vCPU registers, device models), as
    /// opaque tagged blobs; called once, after [`pause`](Self::pause).
    fn device_state(&mut self) -> Result<Vec<DeviceBlob>> {
        Ok(Vec::new())
    }

    /// CPU time the guest (its vCPU threads, and whatever else stops at
    /// [`pause`](Self::pause)) has used so far, where the VMM can tell; `None` (the default)
    /// when it cannot. The session reads it around each live round: on a host whose CPUs are
    /// all busy, the paused round gets that CPU back, and the expected downtime counts on it
    /// (see [`Estimates::after`]).
    fn guest_cpu_time(&self) -> Option<std::time::Duration> {
        None
    }

    /// Throttles the vCPUs so that they run at most `100 − percent` percent of the time, as
    /// QEMU's `cpu-throttle-percentage` does (0 lifts it): asked by a policy that sees the guest
    /// dirty memory faster than it can be sent ([`Decision::Throttle`], [`AutoConverge`]).
    /// Returns false (the default) when this VMM cannot throttle; the migration then goes on
    /// unthrottled. When the migration ends, whatever the outcome, a throttle it applied is
    /// lifted with `throttle(0)` (the destination's guest never was throttled).
    fn throttle(&mut self, percent: u8) -> Result<bool> {
        let _ = percent;
        Ok(false)
    }
}

/// How a migration ended, with every figure of its last [`Snapshot`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationReport {
    /// The final snapshot (status `completed`).
    pub snapshot: Snapshot,
    /// True: the policy chose to stop and copy (a report only exists for converged
    /// migrations; a policy that gives up makes [`Migration::run`] fail).
    pub converged: bool,
    /// The sender's transfer statistics (CPU, shards, zero pages).
    pub transfer: TransferStats,
}

/// Another thread's view of a running migration: cancel it, or read where it stands.
#[derive(Debug, Clone)]
pub struct MigrationHandle {
    canceller: Canceller,
    bandwidth: BandwidthLimit,
    shared: Arc<Mutex<Shared>>,
}

impl MigrationHandle {
    /// Cancels the migration: both sides stop within a ring wait slice (~100 ms) and report
    /// [`Error::Cancelled`] (the receiver as the sender's abort). A cancel before the policy
    /// chose to stop and copy never pauses the guest. Once the source has handed over the
    /// end of the stream (after the device state) or the receiver has confirmed that it holds
    /// everything, a cancel comes too late: the source waits for the destination's answer,
    /// and both sides report the migration complete, since the destination may already run
    /// the guest.
    pub fn cancel(&self) {
        self.canceller.cancel();
    }

    /// Changes the bandwidth limit, in wire bytes per second for the whole migration (`None`
    /// lifts it); applies from the shards' next chain of sends. It limits the live rounds:
    /// once the guest is paused, the last round and the device state go unlimited, as in
    /// QEMU, where `max-bandwidth` does not apply to the stop-and-copy phase.
    pub fn set_max_bandwidth(&self, bytes_per_s: Option<u64>) {
        self.bandwidth.set(bytes_per_s);
    }

    /// Where the migration stands now.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).now()
    }
}

/// A live migration over a connected [`Sender`] (see the module docs).
pub struct Migration {
    sender: Sender,
    source: Box<dyn DirtySource>,
    policy: Box<dyn Policy>,
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("sender", &self.sender)
            .finish_non_exhaustive()
    }
}

impl Migration {
    /// A migration of `sender`'s memory, rounds driven by `source` and decided by `policy`.
    pub fn new(sender: Sender, source: Box<dyn DirtySource>, policy: Box<dyn Policy>) -> Self {
        Migration {
            sender,
            source,
            policy,
            shared: Arc::default(),
        }
    }

    /// A handle for another thread.
    pub fn handle(&self) -> MigrationHandle {
        MigrationHandle {
            canceller: self.sender.canceller(),
            bandwidth: self.sender.bandwidth_limit(),
            shared: self.shared.clone(),
        }
    }

    /// Runs the migration to the receiver's confirmation; `vmm` is paused for the last round.
    /// On failure the receiver has been told why, and the guest was not paused unless the
    /// failure came after the pause.
    pub fn run(self, vmm: &mut dyn Vmm) -> Result<MigrationReport> {
        let Migration {
            sender,
            mut source,
            mut policy,
            shared,
        } = self;
        let mut run = Run {
            shared,
            start: Instant::now(),
            rounds: Vec::new(),
        };
        run.lock().running = Some(Running {
            start: run.start,
            progress: sender.progress(),
        });
        // The sender counts its callers' CPU only inside its own calls; a migration's side
        // also spends it between them (harvesting dirty logs, which write-protects the pages
        // again, the policy, the pause), so this thread counts whole from here, beside what
        // the sender counted before (connecting: rings, handshakes).
        let connect_cpu_ms = sender.coordinator_cpu_ms();
        let cpu_start = crate::sys::thread_cpu_time();
        let mut result = run.precopy(sender, source.as_mut(), policy.as_mut(), vmm);
        if let Ok(report) = &mut result {
            let thread_ms = (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3;
            report
                .transfer
                .count_coordinator_cpu(connect_cpu_ms + thread_ms);
        }
        // Whatever the outcome, the throttle ends with the migration (as QEMU's does): a source
        // that keeps running after a failure or a cancel runs at full speed again.
        let throttled = run.lock().snapshot.cpu_throttle_percentage;
        if throttled > 0 {
            if let Err(e) = vmm.throttle(0) {
                tracing::warn!("lifting the vCPU throttle failed: {e}");
            }
        }
        let status = match &result {
            Ok(_) => Status::Completed,
            Err(Error::Cancelled) => Status::Cancelled,
            Err(_) => Status::Failed,
        };
        run.lock().stop(status);
        result
    }
}

/// The guest's and the host's CPU time at a round's start, for the CPU figures of
/// [`RoundFigures`].
#[derive(Clone, Copy)]
struct Load {
    at: Instant,
    guest: Option<std::time::Duration>,
    host: Option<crate::sys::HostCpuTicks>,
}

/// The scheduler's figures of this process's send and receive shards (see
/// [`RoundFigures::send_run_delay_share`] and [`RoundFigures::send_cpu_share`]).
struct ShardSched {
    send: Vec<crate::sys::ThreadSched>,
    recv: Vec<crate::sys::ThreadSched>,
}

/// The largest shares of a round's time one shard of each kind spent waiting for a CPU and
/// running on one; `None` where none was measured.
struct ShardShares {
    send_run_delay: Option<f64>,
    recv_run_delay: Option<f64>,
    send_cpu: Option<f64>,
    recv_cpu: Option<f64>,
}

impl ShardSched {
    fn now() -> ShardSched {
        ShardSched {
            send: crate::sys::threads_sched("pw-send-"),
            recv: crate::sys::threads_sched("pw-recv-"),
        }
    }

    /// The shares of `ms` from `self` to `now` (threads in both only).
    fn shares_until(&self, now: &ShardSched, ms: f64) -> ShardShares {
        type Field = fn(&crate::sys::ThreadSched) -> std::time::Duration;
        let share = |a: &[crate::sys::ThreadSched], b: &[crate::sys::ThreadSched], field: Field| {
            b.iter()
                .filter_map(|later| {
                    let earlier = a.iter().find(|t| t.tid == later.tid)?;
                    let spent = field(later).saturating_sub(field(earlier));
                    Some(spent.as_secs_f64() * 1e3 / ms.max(1e-3))
                })
                .reduce(f64::max)
        };
        ShardShares {
            send_run_delay: share(&self.send, &now.send, |t| t.run_delay),
            recv_run_delay: share(&self.recv, &now.recv, |t| t.run_delay),
            send_cpu: share(&self.send, &now.send, |t| t.on_cpu),
            recv_cpu: share(&self.recv, &now.recv, |t| t.on_cpu),
        }
    }
}

/// The fewest `/proc/stat` ticks (all CPUs together, usually 10 ms each) a host figure is
/// taken from: a round shorter than that is measured together with the round before it.
const HOST_TICKS_MIN: u64 = 16;

impl Load {
    fn now(vmm: &dyn Vmm) -> Load {
        Load {
            at: Instant::now(),
            guest: vmm.guest_cpu_time(),
            host: crate::sys::host_cpu_ticks(),
        }
    }

    /// CPUs the guest kept busy, CPUs the host kept busy, and the host's CPUs, from `self` to
    /// `now`; the host's figure is `None` when too few ticks passed.
    fn until(&self, now: &Load) -> (Option<f64>, Option<f64>, u32) {
        let ms = now.at.duration_since(self.at).as_secs_f64() * 1e3;
        let guest = match (self.guest, now.guest) {
            (Some(a), Some(b)) if ms > 0.0 => Some(b.saturating_sub(a).as_secs_f64() * 1e3 / ms),
            _ => None,
        };
        let busy = match (self.host, now.host) {
            (Some(a), Some(b)) if b.total.saturating_sub(a.total) >= HOST_TICKS_MIN => {
                b.busy_cpus_since(&a)
            }
            _ => None,
        };
        (guest, busy, now.host.map_or(0, |h| h.cpus))
    }
}

/// The most a policy may throttle the vCPUs, percent (QEMU's `max-cpu-throttle` default):
/// a guest throttled further would barely run.
pub const THROTTLE_PERCENT_MAX: u8 = 99;

/// The state of one [`Migration::run`].
struct Run {
    shared: Arc<Mutex<Shared>>,
    start: Instant,
    rounds: Vec<RoundFigures>,
}

impl Run {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.lock().snapshot);
    }

    fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    /// Publishes the rounds so far (a finished one just pushed) in the snapshot, with the
    /// estimates made after it, if any.
    fn record(&mut self, transferred: u64, estimates: Option<Estimates>) {
        let elapsed_ms = self.elapsed_ms();
        let rounds = self.rounds.clone();
        self.update(|s| {
            s.set_totals(elapsed_ms, transferred);
            s.dirty_sync_count += 1;
            s.rounds = rounds;
            if let Some(e) = estimates {
                s.expected_downtime_ms = e.expected_downtime_ms;
                s.remaining = e.remaining_pages;
                s.dirty_pages_rate = e.dirty_pages_per_s;
            }
        });
    }

    fn precopy(
        &mut self,
        mut sender: Sender,
        source: &mut dyn DirtySource,
        policy: &mut dyn Policy,
        vmm: &mut dyn Vmm,
    ) -> Result<MigrationReport> {
        let progress = sender.progress();
        let wire = || {
            progress
                .wire_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut bitmaps = DirtyBitmaps::for_memory(sender.memory());
        // Only writes from now on count: round 0 sends everything anyway.
        let mut collected_at = Instant::now();
        if let Err(e) = source.collect(&mut bitmaps) {
            return Err(sender.abandon(e));
        }
        bitmaps.clear();
        let setup_ms = self.elapsed_ms();
        self.update(|s| {
            s.status = Status::Active;
            s.setup_ms = setup_ms;
            s.dirty_sync_count = 1;
        });
        // Round 0 sends everything; later rounds go out straight from the bitmaps, which
        // hold what the last collect found.
        let whole = PageRun::whole(sender.memory());
        let mut round_zero = true;
        let mut earlier: Option<Load> = None;
        let engine_threads =
            sender.channels() as u32 * if sender.receiver_on_this_host() { 2 } else { 1 };
        let mut throttle = 0u8;
        let expected = loop {
            let before = wire();
            let load = Load::now(vmm);
            let since = earlier.replace(load).unwrap_or(load);
            let sched = ShardSched::now();
            let started = Instant::now();
            let sent = if std::mem::take(&mut round_zero) {
                sender.send_live_round(&whole)?
            } else {
                sender.send_runs(bitmaps.iter_runs(), true)?
            };
            // A round counts once the receiver placed it: the socket buffers hold megabytes,
            // and a round only handed to the kernel would make the bandwidth, and the downtime
            // it predicts, look better than they are (measured: predicted 2 ms, paused 50).
            sender.wait_placed(sent.round)?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            // The CPU figures of this round, or of this round and the one before where this
            // one was too short for the host's clock ticks.
            let end = Load::now(vmm);
            let shares = sched.shares_until(&ShardSched::now(), ms);
            let (guest_cpus, host_busy_cpus, host_cpus) = match load.until(&end) {
                (_, None, _) => since.until(&end),
                figures => figures,
            };
            bitmaps.clear();
            let dirty_window_ms = collected_at.elapsed().as_secs_f64() * 1e3;
            collected_at = Instant::now();
            if let Err(e) = source.collect(&mut bitmaps) {
                return Err(sender.abandon(e));
            }
            let dirty = bitmaps.dirty_pages();
            let figures = RoundFigures {
                round: sent.round,
                pages: sent.pages,
                wire_bytes: wire() - before,
                ms,
                tail_ms: (ms - sent.time_ms).max(0.0),
                dirtied_pages: dirty,
                dirty_window_ms,
                throttle_percent: throttle,
                guest_cpus,
                host_busy_cpus,
                host_cpus,
                engine_threads,
                send_run_delay_share: shares.send_run_delay,
                recv_run_delay_share: shares.recv_run_delay,
                send_cpu_share: shares.send_cpu,
                recv_cpu_share: shares.recv_cpu,
            };
            self.rounds.push(figures);
            let estimates = Estimates::after(&self.rounds, dirty);
            self.record(wire(), Some(estimates));
            let view = PolicyView {
                rounds: &self.rounds,
                estimates,
                elapsed_ms: self.elapsed_ms(),
            };
            match policy.decide(&view) {
                Decision::NextRound => {}
                Decision::Throttle(percent) => {
                    let percent = percent.min(THROTTLE_PERCENT_MAX);
                    match vmm.throttle(percent) {
                        Ok(true) => {
                            throttle = percent;
                            self.update(|s| s.cpu_throttle_percentage = percent);
                        }
                        Ok(false) if percent > 0 => {
                            tracing::warn!("the policy asked to throttle the vCPUs to {percent}%, but this VMM cannot throttle");
                        }
                        Ok(false) => {}
                        Err(e) => return Err(sender.abandon(e)),
                    }
                }
                Decision::StopAndCopy => break estimates.expected_downtime_ms,
                Decision::GiveUp(why) => return Err(sender.abandon(Error::NotConverging(why))),
            }
        };
        self.update(|s| s.converged = true);
        tracing::info!(
            rounds = self.rounds.len(),
            expected_downtime_ms = expected,
            "converged: pausing the guest for the last round"
        );
        // A cancel that came during the last round or its collect ends the migration here:
        // the caller's cancel has returned, and a guest paused after it would be its surprise.
        if sender.canceller().is_cancelled() {
            return Err(sender.abandon(Error::Cancelled));
        }
        let paused = Instant::now();
        if let Err(e) = vmm.pause() {
            return Err(sender.abandon(e));
        }
        // The bandwidth limit shapes the live rounds, not the downtime: the paused round and
        // the device state go as fast as the link takes them, as QEMU's stop-and-copy ignores
        // its `max-bandwidth` (measured with both capped at 100 MB/s: QEMU paused 16–41 ms,
        // pagewire, still capped, 250–275 ms). The policy costed the rest at the capped rate,
        // so the downtime comes in under its estimate, not over.
        sender.bandwidth_limit().set(None);
        self.update(|s| s.status = Status::Device);
        let paused_ms = paused.elapsed().as_secs_f64() * 1e3;
        // What was written between the last collect and the pause.
        if let Err(e) = source.collect(&mut bitmaps) {
            return Err(sender.abandon(e));
        }
        let collected_ms = paused.elapsed().as_secs_f64() * 1e3;
        let before = wire();
        let last = sender.send_runs(bitmaps.iter_runs(), false)?;
        let sent_ms = paused.elapsed().as_secs_f64() * 1e3;
        // No run delays for this round: reading them (two files per thread) would fall inside
        // the downtime.
        let mut figures = RoundFigures {
            round: last.round,
            pages: last.pages,
            wire_bytes: wire() - before,
            ms: last.time_ms,
            ..RoundFigures::default()
        };
        let blobs = match vmm.device_state() {
            Ok(b) => b,
            Err(e) => return Err(sender.abandon(e)),
        };
        sender.send_device_state(&blobs)?;
        let device_ms = paused.elapsed().as_secs_f64() * 1e3;
        let transfer = sender.finish()?;
        let finished_ms = paused.elapsed().as_secs_f64() * 1e3;
        // The downtime ends when every channel has the destination's confirmation that it
        // holds every page, verified: from then on the destination may resume the guest. The
        // source's own teardown after that (TLS close_notify, its rings) is not downtime.
        let after_pause_ms = |t: Instant| t.saturating_duration_since(paused).as_secs_f64() * 1e3;
        let confirmed = transfer
            .shards
            .iter()
            .map(|s| s.confirmed_at)
            .collect::<Option<Vec<_>>>();
        let downtime_ms = confirmed
            .as_ref()
            .and_then(|all| all.iter().copied().max())
            .map_or(finished_ms, after_pause_ms);
        figures.tail_ms = (downtime_ms - device_ms).max(0.0);
        // The first channel's confirmation: how far apart the channels ended.
        let first_confirmed_ms = confirmed
            .and_then(|all| all.into_iter().min())
            .map(after_pause_ms);
        tracing::debug!(
            first_confirmed_ms,
            paused_ms,
            collected_ms,
            sent_ms,
            device_ms,
            confirmed_ms = downtime_ms,
            finished_ms,
            "downtime, cumulative from the pause"
        );
        self.rounds.push(figures);
        self.record(wire(), None);
        self.update(|s| {
            s.status = Status::Completed;
            s.downtime_ms = Some(downtime_ms);
            s.remaining = 0;
        });
        let snapshot = self.lock().snapshot.clone();
        Ok(MigrationReport {
            snapshot,
            converged: true,
            transfer,
        })
    }
}
