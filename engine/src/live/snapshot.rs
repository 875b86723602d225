//! What a migration reports while it runs and when it ends (QEMU's `query-migrate`): the
//! [`Snapshot`] a round's end or a change of status publishes, and what moves in between,
//! read when a [`MigrationHandle`](super::MigrationHandle) asks.

use std::sync::Arc;
use std::time::Instant;

use super::RoundFigures;

/// Where a migration stands (QEMU's `query-migrate` status), on the source ([`Snapshot`]) or
/// the destination ([`ReceiverSnapshot`](crate::receiver::ReceiverSnapshot)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Not started: the source before round 0, the destination while it waits for the
    /// sender and gathers its channels.
    #[default]
    Setup,
    /// Pages move: pre-copy rounds while the guest runs (a destination also stays here
    /// through the paused round, until device state arrives).
    Active,
    /// The guest is paused: on the source the last round and the device state are on their
    /// way; on the destination the device state is arriving.
    Device,
    /// The receiver confirmed everything.
    Completed,
    /// Failed (a policy giving up, the peer's failure or cancel included).
    Failed,
    /// Cancelled on this side (a [`MigrationHandle`](super::MigrationHandle), a
    /// [`ReceiverHandle`](crate::receiver::ReceiverHandle) or a canceller).
    Cancelled,
}

/// A moment of a migration, as QEMU's `query-migrate` reports it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Snapshot {
    /// Where it stands.
    pub status: Status,
    /// Milliseconds of setup (before round 0).
    pub setup_ms: f64,
    /// Milliseconds since the start (while it runs, up to the moment of the snapshot; once it
    /// ended, up to its end).
    pub total_time_ms: f64,
    /// The last estimate of the downtime, in milliseconds.
    pub expected_downtime_ms: f64,
    /// Measured downtime, once the migration completed: from the pause until every channel
    /// had the destination's confirmation that it holds every page, verified.
    pub downtime_ms: Option<f64>,
    /// Bytes put on the wire so far (while a round runs too).
    pub transferred: u64,
    /// Pages dirty after the last round (what the next one carries).
    pub remaining: u64,
    /// Times the dirty source was read.
    pub dirty_sync_count: u32,
    /// Dirty rate during the last round, pages per second.
    pub dirty_pages_rate: f64,
    /// Megabits per second over the migration so far: `transferred` over `total_time_ms`.
    pub mbps: f64,
    /// The vCPU throttle the migration applied last, percent (QEMU's
    /// `cpu-throttle-percentage`; 0: none). It is lifted when the migration ends; a finished
    /// migration's snapshot keeps the last value, to say how far it had to go.
    pub cpu_throttle_percentage: u8,
    /// True once the policy chose to stop and copy (it stays true if the migration fails
    /// after that, during the pause, the last round or the device state).
    pub converged: bool,
    /// Every round so far.
    pub rounds: Vec<RoundFigures>,
}

/// What a [`MigrationHandle`] reads: the snapshot published at the last step (a round's end,
/// a change of status) and, while the migration runs, what moves between steps, read at the
/// moment of asking.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) snapshot: Snapshot,
    pub(super) running: Option<Running>,
}

/// A running migration's clock and wire counter.
pub(super) struct Running {
    pub(super) start: Instant,
    pub(super) progress: Arc<crate::stats::Progress>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("snapshot", &self.snapshot)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl Shared {
    /// The published snapshot, its time, bytes and rate brought up to now while running.
    pub(super) fn now(&self) -> Snapshot {
        let mut s = self.snapshot.clone();
        if let Some(r) = &self.running {
            r.bring_up_to_now(&mut s);
        }
        s
    }

    /// The migration ended with `status`: the clock stops. A completed migration keeps the
    /// figures of its confirmation (as its report does), any other those of this moment.
    pub(super) fn stop(&mut self, status: Status) {
        self.snapshot.status = status;
        if let Some(r) = self.running.take() {
            if status != Status::Completed {
                r.bring_up_to_now(&mut self.snapshot);
            }
        }
    }
}

impl Running {
    fn bring_up_to_now(&self, s: &mut Snapshot) {
        s.set_totals(
            self.start.elapsed().as_secs_f64() * 1e3,
            self.progress
                .wire_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
}

impl Snapshot {
    pub(super) fn set_totals(&mut self, total_time_ms: f64, transferred: u64) {
        self.total_time_ms = total_time_ms;
        self.transferred = transferred;
        self.mbps = crate::stats::mbps(transferred, total_time_ms);
    }
}
