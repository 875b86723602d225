//! What a destination reports while it receives and once it ended (QEMU's `query-migrate` on
//! the incoming side, with the figures this side can know): a [`ReceiverSnapshot`] read through
//! a [`ReceiverHandle`] from any thread.
//!
//! The status moves at the receiver's few steps (channels gathered, shards started, the end),
//! under a lock no shard takes; what moves in between (bytes, pages, rounds) is read from the
//! shards' counters at the moment of asking (the rounds under the round barrier's lock, which
//! shards take once a round, and which is never held while taking this one). Nothing here
//! runs on the data path.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::live::Status;
use crate::sender::Canceller;
use crate::shard::RoundBarrier;
use crate::stats::{Progress, TransferStats};

/// A moment of a receiver, as QEMU's `query-migrate` reports the incoming side (with more of
/// the figures than QEMU's destination fills in).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ReceiverSnapshot {
    /// Where it stands: [`Status::Setup`] while it waits for a sender and gathers its channels,
    /// [`Status::Active`] while pages arrive, [`Status::Device`] once the device state is
    /// arriving (the source's guest is paused by then), then [`Status::Completed`] (every page
    /// placed and verified, the sender told so), [`Status::Failed`] (the sender's failure or
    /// cancel included), or [`Status::Cancelled`] (cancelled here).
    pub status: Status,
    /// Milliseconds from the sender's first channel joining until every channel was gathered
    /// and the shards started (0 before).
    pub setup_ms: f64,
    /// Milliseconds since the sender's first channel joined, once all of its channels were
    /// gathered (0 before; once ended, up to the end).
    pub total_time_ms: f64,
    /// Bytes taken off the wire so far.
    pub transferred: u64,
    /// Of [`transferred`](Self::transferred), the device state's.
    pub device_state_bytes: u64,
    /// Pages placed so far, over all rounds (a page sent in several rounds counts each time).
    pub pages_placed: u64,
    /// Pages of the destination (0 until known: a destination the sender sizes is made once
    /// its channels are gathered).
    pub memory_pages: u64,
    /// Rounds every channel has ended so far.
    pub rounds: u32,
    /// Megabits per second over the transfer so far: `transferred` over `total_time_ms`.
    pub mbps: f64,
}

/// Another thread's view of a [`Receiver`](super::Receiver): cancel it, or read where it
/// stands. Take it before [`Receiver::run`](super::Receiver::run); it stays valid after.
#[derive(Debug, Clone)]
pub struct ReceiverHandle {
    pub(super) canceller: Canceller,
    pub(super) progress: Arc<Progress>,
    pub(super) shared: Arc<Mutex<Shared>>,
}

impl ReceiverHandle {
    /// Cancels the receiver, as [`Receiver::canceller`](super::Receiver::canceller)'s would.
    pub fn cancel(&self) {
        self.canceller.cancel();
    }

    /// Live counters for a progress display.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Where the receiver stands now.
    pub fn snapshot(&self) -> ReceiverSnapshot {
        let shared = published(&self.shared);
        if let Some(done) = &shared.ended {
            return done.clone();
        }
        let mut s = ReceiverSnapshot {
            status: shared.status,
            setup_ms: shared.setup_ms,
            ..ReceiverSnapshot::default()
        };
        s.read(&self.progress, shared.barrier.as_deref());
        if let Some(start) = shared.start {
            s.set_total_time(start.elapsed().as_secs_f64() * 1e3);
        }
        if s.status == Status::Active && s.device_state_bytes > 0 {
            s.status = Status::Device;
        }
        s
    }
}

/// Ends the published state when the receiver's run ends, however it ends: with
/// [`end`](Self::end), or, should the run panic (a caller's `MakeDestination`, a bug), as
/// failed when dropped, so that no handle reads `active` for ever.
pub(super) struct Ending {
    shared: Arc<Mutex<Shared>>,
    progress: Arc<Progress>,
}

impl Ending {
    pub(super) fn new(shared: Arc<Mutex<Shared>>, progress: Arc<Progress>) -> Self {
        Ending { shared, progress }
    }

    /// The run returned `result`.
    pub(super) fn end(self, result: &crate::Result<TransferStats>) {
        published(&self.shared).end(result, &self.progress);
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        let mut shared = published(&self.shared);
        if shared.ended.is_none() {
            shared.end(
                &Err(crate::Error::Internal("the receiver's run panicked".into())),
                &self.progress,
            );
        }
    }
}

/// The receiver's published state, locked (a panic elsewhere leaves it readable).
pub(super) fn published(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the receiver publishes for its handles.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    status: Status,
    /// When the sender's first channel joined.
    start: Option<Instant>,
    setup_ms: f64,
    /// The shards' round barrier, once they run.
    barrier: Option<Arc<RoundBarrier>>,
    /// The last snapshot, once the receiver ended.
    ended: Option<ReceiverSnapshot>,
}

impl Shared {
    /// The sender's channels are gathered: the clock runs from when the first one joined.
    pub(crate) fn gathered(&mut self, start: Instant) {
        self.start = Some(start);
    }

    /// The shards run: setup is over.
    pub(crate) fn active(&mut self, barrier: Arc<RoundBarrier>) {
        self.setup_ms = self.start.map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3);
        self.barrier = Some(barrier);
        self.status = Status::Active;
    }

    /// The receiver ended with `result`: the snapshot is frozen, with a completed transfer's
    /// own figures.
    pub(crate) fn end(&mut self, result: &crate::Result<TransferStats>, progress: &Progress) {
        let mut s = ReceiverSnapshot {
            status: match result {
                Ok(_) => Status::Completed,
                Err(crate::Error::Cancelled) => Status::Cancelled,
                Err(_) => Status::Failed,
            },
            setup_ms: self.setup_ms,
            ..ReceiverSnapshot::default()
        };
        s.read(progress, self.barrier.as_deref());
        match result {
            Ok(stats) => {
                s.rounds = stats.rounds;
                s.set_total_time(stats.total_time_ms);
            }
            Err(_) => s.set_total_time(self.start.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3)),
        }
        self.barrier = None;
        self.ended = Some(s);
    }
}

impl ReceiverSnapshot {
    fn read(&mut self, progress: &Progress, barrier: Option<&RoundBarrier>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.transferred = progress.wire_bytes.load(Relaxed);
        self.device_state_bytes = progress.device_state_bytes.load(Relaxed);
        (self.pages_placed, self.memory_pages) = progress.pages();
        self.rounds = barrier.map_or(0, RoundBarrier::rounds_ended);
    }

    fn set_total_time(&mut self, total_time_ms: f64) {
        self.total_time_ms = total_time_ms;
        self.mbps = crate::stats::mbps(self.transferred, total_time_ms);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use crate::shard::Marker;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    fn handle() -> ReceiverHandle {
        ReceiverHandle {
            canceller: Canceller::new(),
            progress: Arc::default(),
            shared: Arc::default(),
        }
    }

    #[test]
    fn statuses_follow_the_receivers_steps_and_the_end_is_frozen() {
        let h = handle();
        assert_eq!(h.snapshot(), ReceiverSnapshot::default());
        assert_eq!(h.snapshot().status, Status::Setup);
        let start = Instant::now() - std::time::Duration::from_millis(20);
        published(&h.shared).gathered(start);
        assert_eq!(h.snapshot().status, Status::Setup);
        assert!(h.snapshot().total_time_ms >= 20.0);
        let barrier = Arc::new(RoundBarrier::new(1));
        published(&h.shared).active(barrier.clone());
        // Rounds count as the barrier passes their ends; the end of the stream is no round.
        let (abort, moved) = (crate::shard::Abort::new(false), AtomicU64::new(0));
        let idle = std::time::Duration::from_secs(1);
        for marker in [
            Marker::EndOfRound(0),
            Marker::EndOfRound(1),
            Marker::EndOfStream(1),
        ] {
            barrier.wait(0, marker, &abort, &moved, idle).unwrap();
        }
        h.progress.wire_bytes.store(1 << 20, Relaxed);
        h.progress.pages_total.store(256, Relaxed);
        h.progress.pages_done.store(200, Relaxed);
        let s = h.snapshot();
        assert_eq!(s.status, Status::Active);
        assert!(s.setup_ms >= 20.0 && s.total_time_ms >= s.setup_ms);
        assert_eq!(
            (s.transferred, s.pages_placed, s.memory_pages),
            (1 << 20, 200, 256)
        );
        assert_eq!(s.rounds, 2);
        assert!(s.mbps > 0.0);
        // Device state on its way: the source's guest is paused.
        h.progress.device_state_bytes.store(100, Relaxed);
        assert_eq!(h.snapshot().status, Status::Device);
        let stats = TransferStats {
            rounds: 3,
            total_time_ms: 50.0,
            ..TransferStats::default()
        };
        published(&h.shared).end(&Ok(stats), &h.progress);
        let done = h.snapshot();
        assert_eq!(
            (done.status, done.rounds, done.total_time_ms),
            (Status::Completed, 3, 50.0)
        );
        // Frozen: later counter changes do not show.
        h.progress.wire_bytes.store(2 << 20, Relaxed);
        assert_eq!(h.snapshot(), done);
    }

    #[test]
    fn a_run_that_never_returned_its_result_reads_failed() {
        let h = handle();
        published(&h.shared).active(Arc::new(RoundBarrier::new(1)));
        drop(Ending::new(h.shared.clone(), h.progress.clone()));
        assert_eq!(h.snapshot().status, Status::Failed);
        // One that did keeps its own end.
        let h = handle();
        Ending::new(h.shared.clone(), h.progress.clone()).end(&Err(crate::Error::Cancelled));
        assert_eq!(h.snapshot().status, Status::Cancelled);
    }

    #[test]
    fn a_cancel_here_reads_cancelled_and_any_other_failure_failed() {
        for (error, status) in [
            (crate::Error::Cancelled, Status::Cancelled),
            (crate::Error::Aborted, Status::Failed),
        ] {
            let h = handle();
            published(&h.shared).end(&Err(error), &h.progress);
            assert_eq!(h.snapshot().status, status);
        }
    }
}
