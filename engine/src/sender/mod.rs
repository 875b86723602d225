//! The sender's coordinator: connects the channels, starts one shard per channel, splits each
//! round's page runs into chunks and queues them for the shards, and runs the round protocol.
//! Control plane only: it never touches a page.
//!
//! A round's chunks are not dealt to the channels in advance: the shards of a pool (all of
//! them, or those of one NUMA node) pull from one bounded queue, so a channel that moves
//! faster (its receiver got more CPU, its path is less loaded) takes more, and the channels
//! finish a round together. Dealt in turn, a small round (a paused guest's last one, 100-odd
//! chunks) was fixed at its start, and one channel often ended it milliseconds after the
//! other: measured on 2 channels, one shard done at 9.6 ms and the other at 20.5 ms.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{
    bounded, unbounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender as Tx, TrySendError,
};

use crate::config::SenderConfig;
use crate::error::{Error, Result};
use crate::limits::DEVICE_CHUNK_BYTES_MAX;
use crate::limits::{KEEPALIVE_PER_IDLE, PAGE_BYTES, RING_WAIT_SLICE_MS, SHARD_QUEUE_ITEMS_MAX};
use crate::memory::GuestMemory;
use crate::pipeline::compress::Compression;
use crate::placement::Placement;
use crate::protocol::blob::{DeviceBlob, DEVICE_STATE_BYTES_MAX};
use crate::protocol::handshake::{
    Hello, FEATURE_PSK, FEATURE_UNCHECKED_PAGES, FEATURE_ZLIB, FEATURE_ZSTD,
};
use crate::protocol::PROTOCOL_VERSION;
use crate::shard::send::{SendShard, SendShardParams, ShardEvent, Work};
use crate::shard::{catch_panic, Abort};
use crate::stats::{Progress, RoundStats, ShardStats, TransferStats};
use crate::stream::Stream;

mod handles;
mod handshake;
mod runs;
mod start;
pub use handles::{BandwidthLimit, Canceller};
use handshake::{connect_all, Connected};
pub use runs::PageRun;
use runs::{check_runs, pack_chunks};

struct Shard {
    /// The shard's own queue: round ends, device state, the end of the stream.
    tx: Tx<Work>,
    join: Option<JoinHandle<Result<ShardStats>>>,
    core: Option<usize>,
}

fn device_chunk(tag: u32, total: u64, last: bool, bytes: &[u8]) -> Work {
    Work::DeviceState {
        tag,
        total,
        last,
        chunk: bytes.into(),
    }
}

/// A connected sender. Send rounds with [`send_round`](Self::send_round) (or everything once
/// with [`send_all`](Self::send_all)), then [`finish`](Self::finish).
pub struct Sender {
    memory: Arc<GuestMemory>,
    shards: Vec<Shard>,
    /// Chunk queues, one per pool of shards ([`Placement::pools`]): every shard of a pool pulls
    /// from its queue, so a round's chunks go to whichever channel has room, and the channels
    /// of a round end together.
    pools: Vec<Tx<Work>>,
    /// The pool of the next chunk that no node claims.
    next_pool: usize,
    /// A shard took a pool's last queued chunk (see [`Sender::wait_pools_empty`]).
    pool_drained: Receiver<()>,
    events: Receiver<ShardEvent>,
    abort: Arc<Abort>,
    progress: Arc<Progress>,
    round: u32,
    start: Instant,
    cpu_ms: f64,
    rounds: Vec<RoundStats>,
    finished: bool,
    /// Device state went out: it is the guest's at the pause, so no round may follow it.
    device_state_sent: bool,
    /// The last round sent was a live one (see `finish`).
    last_round_live: bool,
    defer_taskrun: bool,
    bandwidth: BandwidthLimit,
    /// The last round the receiver placed on every channel.
    placed: Option<u32>,
    /// Reports of rounds not yet placed on every channel: (round, channels that said so).
    placed_reports: Vec<(u32, usize)>,
    /// Shard placement, and the routing of chunks to the shards of their memory's node.
    placement: Placement,
    /// The receiver runs on this host (loopback, a UNIX socket): its shards share the CPUs.
    receiver_here: bool,
    /// The congestion control algorithm of the channels (the first one's, as the kernel says).
    congestion: Option<String>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("channels", &self.shards.len())
            .field("round", &self.round)
            .finish()
    }
}

impl Sender {
    /// Where the shards run and which memory each node's shards send: see
    /// [`crate::placement`].
    pub fn plan(&self) -> &crate::placement::Plan {
        &self.placement.plan
    }

    /// Channels (one shard thread each).
    pub fn channels(&self) -> usize {
        self.shards.len()
    }

    /// True when the receiver runs on this host (a loopback or own address, a UNIX socket),
    /// so its shards compete with this side's for the same CPUs.
    pub fn receiver_on_this_host(&self) -> bool {
        self.receiver_here
    }

    /// Live counters for a progress display.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// The round the next [`send_round`](Self::send_round) sends.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Sends every page of every region as one (stable) round.
    pub fn send_all(&mut self) -> Result<RoundStats> {
        self.send_round(&PageRun::whole(&self.memory))
    }

    /// Sends one round: `runs` must be sorted by region and page and must not overlap (a page is
    /// sent at most once per round, which is what makes the round barrier sufficient for
    /// ordering). Returns when every shard has handed the whole round to the kernel.
    ///
    /// A round sent this way is *stable*: its pages must not change until [`finish`](Self::finish)
    /// returns (a paused guest, a RAM image), because zero-copy sends may still read them after
    /// this returns and every frame's payload checksum must match. Rounds sent while vCPUs run
    /// use [`send_live_round`](Self::send_live_round).
    pub fn send_round(&mut self, runs: &[PageRun]) -> Result<RoundStats> {
        self.send_round_with(runs.iter().copied(), false)
    }

    /// Like [`send_round`](Self::send_round), for a pre-copy round while vCPUs run: a page
    /// written during its send may arrive torn. The dirty log names every such page, so the
    /// caller sends it again in a later round, and the stream must end with a stable round
    /// ([`send_round`](Self::send_round), vCPUs paused) carrying whatever was written since
    /// the last collect. Where a plaintext page's checksum shows the tear, the receiver leaves
    /// the page un-placed (and refuses the transfer if it never comes again intact); a page
    /// sealed by TLS or compressed is read once, so its record or checksum matches whatever
    /// mix of old and new bytes it read, and only the stable round makes it right.
    pub fn send_live_round(&mut self, runs: &[PageRun]) -> Result<RoundStats> {
        self.send_round_with(runs.iter().copied(), true)
    }

    /// [`send_live_round`](Self::send_live_round) (`live`) or [`send_round`](Self::send_round)
    /// of runs that come from an iterator, under the same rules: sorted, disjoint, inside the
    /// layout. It is walked twice, on a clone to check them and then to send them, so its
    /// clone must give the same runs (a pure iterator over data that does not change meanwhile,
    /// as [`BitmapRuns`](crate::dirty::BitmapRuns) over bitmaps nobody writes). With
    /// [`DirtyBitmaps::iter_runs`](crate::dirty::DirtyBitmaps::iter_runs) a round goes out
    /// straight from the dirty bitmaps, with no list of runs, which for a scattered dirty set
    /// of a multi-TiB guest would take GiBs.
    pub fn send_runs<I>(&mut self, runs: I, live: bool) -> Result<RoundStats>
    where
        I: Iterator<Item = PageRun> + Clone,
    {
        self.send_round_with(runs, live)
    }

    fn send_round_with<I>(&mut self, runs: I, live: bool) -> Result<RoundStats>
    where
        I: Iterator<Item = PageRun> + Clone,
    {
        let span = tracing::debug_span!("round", round = self.round, live);
        let _enter = span.enter();
        if self.finished {
            return Err(Error::Config("send_round after finish".into()));
        }
        if self.device_state_sent {
            return Err(Error::Config(
                "send_round after send_device_state (device state comes after the last round)"
                    .into(),
            ));
        }
        let started = Instant::now();
        let cpu_start = crate::sys::thread_cpu_time();
        let pages = check_runs(&self.memory, runs.clone())?;
        self.last_round_live = live;
        crate::stats::add(&self.progress.pages_total, pages);
        let n = self.shards.len();
        for (region, runs) in pack_chunks(runs) {
            let first_page = runs.runs().first().map_or(0, |r| r.0);
            let work = Work::Chunk { region, runs, live };
            // On a multi-node host a chunk goes to the pool of the node that holds it, else to
            // the pools in turn.
            let pool = match self.placement.pool_for(region, first_page) {
                Some(pool) => pool,
                None => {
                    let pool = self.next_pool;
                    self.next_pool = (pool + 1) % self.pools.len();
                    pool
                }
            };
            self.send_to_pool(pool, work)?;
        }
        // A round's end goes out on a channel only after every chunk of the round was taken
        // by a shard (each builds a chunk it took before it looks at its queues again): only
        // then can no chunk of this round come after its end on any channel.
        self.wait_pools_empty()?;
        for i in 0..n {
            self.send_to(i, Work::EndRound { live })?;
        }
        let mut sent = 0;
        // When the first channel had handed its share to the kernel: how far apart they end.
        let mut first_done_ms = None;
        while sent < n {
            match self
                .events
                .recv_timeout(Duration::from_millis(RING_WAIT_SLICE_MS))
            {
                Ok(ShardEvent::RoundSent { round }) => {
                    debug_assert_eq!(round, self.round);
                    sent += 1;
                    first_done_ms.get_or_insert(started.elapsed().as_secs_f64() * 1e3);
                }
                Ok(ShardEvent::RoundPlaced { round }) => self.note_placed(round),
                Err(RecvTimeoutError::Timeout) => self.check_alive()?,
                Err(RecvTimeoutError::Disconnected) => return Err(self.failure()),
            }
        }
        let stats = RoundStats {
            round: self.round,
            pages,
            time_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        tracing::debug!(
            pages,
            time_ms = stats.time_ms,
            first_channel_ms = first_done_ms,
            "round handed to the kernel"
        );
        self.rounds.push(stats);
        self.round += 1;
        self.cpu_ms += (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3;
        Ok(stats)
    }

    /// Sends the VMM's device state (after the last round, before [`finish`](Self::finish)):
    /// each blob in chunks on channel 0, in order. The receiver hands them back whole and
    /// checked ([`crate::Receiver::device_state`]). At most
    /// [`DEVICE_STATE_BYTES_MAX`] bytes in all.
    pub fn send_device_state(&mut self, blobs: &[DeviceBlob]) -> Result<()> {
        let total: u64 = blobs.iter().map(|b| b.bytes.len() as u64).sum();
        if total > DEVICE_STATE_BYTES_MAX {
            return Err(Error::Config(format!(
                "{total} bytes of device state, more than the {DEVICE_STATE_BYTES_MAX} a migration carries"
            )));
        }
        if self.finished {
            return Err(Error::Config("send_device_state after finish".into()));
        }
        // (Nothing to send declares nothing: rounds may still follow.)
        self.device_state_sent |= !blobs.is_empty();
        for blob in blobs {
            let len = blob.bytes.len() as u64;
            let mut chunks = blob.bytes.chunks(DEVICE_CHUNK_BYTES_MAX).peekable();
            if chunks.peek().is_none() {
                self.send_to(0, device_chunk(blob.tag, 0, true, &[]))?;
            }
            while let Some(c) = chunks.next() {
                let last = chunks.peek().is_none();
                self.send_to(0, device_chunk(blob.tag, len, last, c))?;
            }
        }
        Ok(())
    }

    /// Ends the stream on every channel, waits for the receiver to confirm it placed everything,
    /// and returns the sender's statistics.
    pub fn finish(mut self) -> Result<TransferStats> {
        self.finished = true;
        if self.last_round_live {
            tracing::warn!(
                "the stream ends on a live round: a page written during it may have arrived torn (end with a stable round, vCPUs paused)"
            );
        }
        let cpu_start = crate::sys::thread_cpu_time();
        for i in 0..self.shards.len() {
            if let Err(e) = self.send_to(i, Work::Finish) {
                self.join_all();
                return Err(e);
            }
        }
        let results = self.join_all();
        // A shard ends well only once the receiver confirmed it holds everything, verified.
        // When all did, an abort latched after that (a cancel that came too late) does not
        // undo the migration: the destination may already be running the guest.
        let latched = self.abort.take_error();
        if let (Some(e), false) = (latched, results.iter().all(|r| r.is_ok())) {
            return Err(e);
        }
        let mut stats = TransferStats {
            channels: self.shards.len() as u16,
            rounds: self.round,
            zero_scan: crate::pipeline::zero::ZeroScanner::detect().kind().name(),
            defer_taskrun: self.defer_taskrun,
            congestion: self.congestion.clone(),
            ..TransferStats::default()
        };
        for (r, shard) in results.into_iter().zip(&self.shards) {
            let mut s = r?;
            s.core = s.core.or(shard.core);
            stats.shards.push(s);
        }
        self.cpu_ms += (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3;
        stats.finalize(self.start.elapsed().as_secs_f64(), self.cpu_ms);
        Ok(stats)
    }

    /// CPU milliseconds the calling threads spent in this sender's own calls so far (connect,
    /// rounds), beside its shards'.
    pub(crate) fn coordinator_cpu_ms(&self) -> f64 {
        self.cpu_ms
    }

    /// The bandwidth limit, to change while this sender runs (see [`BandwidthLimit`]).
    pub fn bandwidth_limit(&self) -> BandwidthLimit {
        self.bandwidth.clone()
    }

    /// The memory this sender sends.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Gives up with `error`: the shards tell the receiver why and close. Returns the error
    /// the transfer ends with (the first one, if another came earlier).
    pub fn abandon(mut self, error: Error) -> Error {
        self.abort.fail(error);
        self.failure()
    }

    /// A handle that cancels this transfer from any thread (see [`Canceller`]).
    pub fn canceller(&self) -> Canceller {
        Canceller::attached(self.abort.clone())
    }

    /// Per-round figures so far.
    pub fn rounds(&self) -> &[RoundStats] {
        &self.rounds
    }

    /// One channel's receiver reported `round` placed.
    fn note_placed(&mut self, round: u32) {
        match self.placed_reports.iter_mut().find(|(r, _)| *r == round) {
            Some((_, n)) => *n += 1,
            None => self.placed_reports.push((round, 1)),
        }
        let channels = self.shards.len();
        if let Some(i) = self
            .placed_reports
            .iter()
            .position(|&(r, n)| r == round && n == channels)
        {
            self.placed_reports.remove(i);
            self.placed = Some(self.placed.map_or(round, |p| p.max(round)));
        }
    }

    /// Waits until the receiver has placed every page of `round` (every channel passed its
    /// barrier and said so), or the transfer fails. A live migration measures its rounds this
    /// way, and waits for its last live round before pausing the guest, so that the pause
    /// covers only what remains (not what the socket buffers still hold).
    pub fn wait_placed(&mut self, round: u32) -> Result<()> {
        if round >= self.round {
            return Err(Error::Config(format!(
                "round {round} has not been sent (the next round is {})",
                self.round
            )));
        }
        while self.placed.is_none_or(|p| p < round) {
            match self
                .events
                .recv_timeout(Duration::from_millis(RING_WAIT_SLICE_MS))
            {
                Ok(ShardEvent::RoundPlaced { round }) => self.note_placed(round),
                Ok(ShardEvent::RoundSent { .. }) => {}
                Err(RecvTimeoutError::Timeout) => self.check_alive()?,
                Err(RecvTimeoutError::Disconnected) => return Err(self.failure()),
            }
        }
        Ok(())
    }

    /// Queues the chunk `work` on pool `pool`, or, when that pool's queue is full, on any other
    /// pool with room (so a slow node's full queue does not hold up queueing the rest of the
    /// round; the round still ends only when every pool has been drained), or waits for
    /// `pool`.
    fn send_to_pool(&mut self, pool: usize, mut work: Work) -> Result<()> {
        let n = self.pools.len();
        for k in 0..n {
            match self.pools[(pool + k) % n].try_send(work) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(w)) => work = w,
                Err(TrySendError::Disconnected(_)) => return Err(self.failure()),
            }
        }
        let queue = self.pools[pool].clone();
        self.send_waiting(&queue, work)
    }

    /// Waits until the shards have taken every queued chunk: the shard that takes a pool's
    /// last one says so.
    fn wait_pools_empty(&mut self) -> Result<()> {
        while self.pools.iter().any(|p| !p.is_empty()) {
            match self
                .pool_drained
                .recv_timeout(Duration::from_millis(RING_WAIT_SLICE_MS))
            {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => self.check_alive()?,
                Err(RecvTimeoutError::Disconnected) => return Err(self.failure()),
            }
        }
        Ok(())
    }

    fn send_to(&mut self, shard: usize, work: Work) -> Result<()> {
        let queue = self.shards[shard].tx.clone();
        self.send_waiting(&queue, work)
    }

    /// Queues `work` on `queue`, waiting while it is full (and failing if a shard has ended).
    fn send_waiting(&mut self, queue: &Tx<Work>, mut work: Work) -> Result<()> {
        loop {
            match queue.send_timeout(work, Duration::from_millis(RING_WAIT_SLICE_MS)) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Timeout(w)) => {
                    work = w;
                    self.check_alive()?;
                }
                Err(SendTimeoutError::Disconnected(_)) => return Err(self.failure()),
            }
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        if self.abort.is_raised()
            || self
                .shards
                .iter()
                .any(|s| s.join.as_ref().is_some_and(|j| j.is_finished()))
        {
            return Err(self.failure());
        }
        Ok(())
    }

    /// Tears down and returns the first error any shard reported.
    fn failure(&mut self) -> Error {
        // The shards see the raised flag within a wait slice, tell the receiver why, and close;
        // only then is everything shut down.
        self.abort.raise();
        let results = self.join_all();
        self.abort.shutdown_all();
        if let Some(e) = self.abort.take_error() {
            return e;
        }
        results
            .into_iter()
            .find_map(|r| r.err())
            .unwrap_or(Error::Aborted)
    }

    fn join_all(&mut self) -> Vec<Result<ShardStats>> {
        self.shards
            .iter_mut()
            .map(|s| match s.join.take() {
                // Shard bodies catch their own panics; a panic here is in the glue around them.
                Some(j) => j.join().unwrap_or(Err(Error::Aborted)),
                None => Err(Error::Aborted),
            })
            .collect()
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if self.shards.iter().any(|s| s.join.is_some()) {
            // Dropped without finish (or after an error): tear down and wait for the shards.
            self.abort.fail(Error::Dropped);
            self.join_all();
        }
    }
}
