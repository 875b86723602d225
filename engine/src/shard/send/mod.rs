//! The sender shard: one thread, one ring, one connection.
//!
//! Run loop (bounded, allocation-free in the steady state):
//! 1. reap completions: send results advance the in-flight *chain*, zero-copy notifications free
//!    header slots, the control receive brings the receiver's `Done` or `Abort`;
//! 2. when the chain has fully completed, finish it (report round markers, or resubmit whatever
//!    a short send left) and submit the next chain of ready frames;
//! 3. while header slots are free, take work and build frames: zero-scan the chunk, encode the
//!    header into the slot, list the normal runs as payload pieces straight from guest memory;
//! 4. wait on the ring (or, when nothing is outstanding, on the work queue), in bounded slices.
//!
//! Sends on one TCP socket must reach the kernel in order, and two independent io_uring ops on a
//! socket may complete out of order when one is punted, so a shard keeps exactly one linked
//! chain in flight (`IOSQE_IO_LINK`, `MSG_WAITALL`), batching up to `CHAIN_FRAMES_MAX` frames.
//!
//! Zero-copy: in `auto` mode a shard starts with `SEND_ZC` (one op per piece, header from the
//! registered slab) and reads the usage report of each notification. When the first
//! `ZC_PROBE_SENDS` all say the kernel copied (loopback, veth), the shard switches to one plain
//! `sendmsg` per frame (header plus runs as an iovec: one syscall, no staging copy), because a
//! copied zero-copy send costs more than a plain one. When they say the NIC really sent from our
//! pages, the shard registers guest memory as fixed buffers, so later sends skip page pinning.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::config::ZeroCopy;
use crate::error::{Error, Result};
use crate::limits::{
    CHAIN_FRAMES_MAX, CONTROL_BYTES, DEVICE_CHUNK_BYTES_MAX, FRAME_HEADER_BYTES_MAX,
    FRAME_PAYLOAD_BYTES_MAX, FRAME_RUNS_MAX, PAGE_BYTES, REGISTER_GUEST_BYTES_MAX,
    RING_WAIT_SLICE_MS, SHARD_FRAMES_IN_FLIGHT_MAX, ZC_PROBE_SENDS,
};
use crate::memory::GuestMemory;
use crate::pipeline::compress::{Auto, Codec, Compression, Compressor};
use crate::pipeline::seal::{
    CLOSE_NOTIFY_ALERT, KEY_UPDATE_MESSAGE, RECORD_BYTES_MAX, RECORD_OVERHEAD_BYTES,
    RECORD_PLAINTEXT_BYTES_MAX,
};
use crate::pipeline::zero::ZeroScanner;
use crate::protocol::blob::{ChunkHeader, CHUNK_HEADER_BYTES};
use crate::protocol::control::ControlReader;
use crate::protocol::control::{Control, CONTROL_MESSAGE_BYTES_MAX};
use crate::protocol::sender::{Marker, Outgoing, SenderFault, SenderMachine};
use crate::protocol::{Frame, FrameKind, ProtocolError};
use crate::simd::xxh3::Xxh3;
use crate::stats::{add, Progress, ShardStats};
use crate::tls::{Record, TlsSession};
use crate::uring::{advance, errno, Buf, RingIo, Wait};

use super::Abort;

mod build;
mod chain;
mod control;
mod setup;
mod work;

pub(crate) use work::{ChunkRuns, Work};

/// What a shard tells its coordinator (what its channel machine says).
pub(crate) use crate::protocol::sender::SenderEvent as ShardEvent;

const CONTROL_SLOT: u16 = SHARD_FRAMES_IN_FLIGHT_MAX as u16;
/// A plaintext slot holds a frame's header, or a body (an abort's reason, a device state chunk)
/// right after the header's place.
const SLOT_BYTES_PLAIN: usize = (PAYLOAD_OFFSET + BODY_BYTES_MAX).next_multiple_of(4096);
/// Bytes of the largest frame body built in the shard (not pages).
const BODY_BYTES_MAX: usize = CHUNK_HEADER_BYTES + DEVICE_CHUNK_BYTES_MAX;
/// Records one frame's plaintext (header plus payload) fills at most.
const FRAME_RECORDS_MAX: usize =
    (FRAME_HEADER_BYTES_MAX + FRAME_PAYLOAD_BYTES_MAX).div_ceil(RECORD_PLAINTEXT_BYTES_MAX);
/// A TLS slot holds a frame's records, plus a key update before and a close_notify after them.
const SLOT_BYTES_TLS: usize = (FRAME_HEADER_BYTES_MAX
    + FRAME_PAYLOAD_BYTES_MAX
    + (FRAME_RECORDS_MAX + 2) * RECORD_OVERHEAD_BYTES
    + KEY_UPDATE_MESSAGE.len()
    + CLOSE_NOTIFY_ALERT.len())
.next_multiple_of(4096);
/// Where a compressed payload starts in a plaintext slot; the header is written just before it,
/// so header and payload leave in one contiguous send.
const PAYLOAD_OFFSET: usize = FRAME_HEADER_BYTES_MAX.next_multiple_of(64);
const SLOT_BYTES_COMPRESSED: usize =
    (PAYLOAD_OFFSET + FRAME_PAYLOAD_BYTES_MAX).next_multiple_of(4096);
const CONTROL_TAG: u64 = u64::MAX - 1;
/// Frames built (scanned, checksummed, sealed) and not yet handed to the kernel, at most. The
/// kernel copies a frame soon after it is submitted; building far ahead lets the pages the
/// checksum (or the seal) just read fall out of the 2 MiB L2 before that copy reads them
/// again. Measured with `pagewire-bench transfer` (1 GiB random, 2 channels): 2 ahead instead
/// of all 16 slots cut the sender's CPU per GiB by 7–10%.
const FRAMES_BUILT_AHEAD_MAX: usize = 2;
/// Milliseconds between looks at the ring while only zero-copy notifications are outstanding
/// and the shard waits for work (see `run_inner`).
const NOTIFICATION_POLL_MS: u64 = 1;
/// Milliseconds a failed sender shard spends telling the receiver why (an abort frame after the
/// frames already built), before it closes the connection regardless.
const ABORT_SEND_MS: u64 = 300;
const _: () = assert!(4 + CONTROL_MESSAGE_BYTES_MAX <= BODY_BYTES_MAX);
const _: () = assert!(PAYLOAD_OFFSET + BODY_BYTES_MAX <= SLOT_BYTES_COMPRESSED);
const _: () = assert!(
    FRAME_HEADER_BYTES_MAX <= SLOT_BYTES_PLAIN && CONTROL_MESSAGE_BYTES_MAX <= SLOT_BYTES_PLAIN
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Ready,
    InChain,
    /// Handed to the kernel; free once the ring says no op uses it (zero-copy notification).
    Sent,
}

/// Whether frames go out as zero-copy sends, and what is still to be decided about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZcState {
    /// One plain `sendmsg` per frame (policy off, no `SEND_ZC`, or the kernel copied anyway).
    Plain,
    /// `auto`: zero-copy sends while the first notifications say whether the kernel copies.
    Probing,
    /// Zero-copy sends from guest memory as it is mapped.
    ZeroCopy,
    /// Zero-copy sends; guest memory is registered as fixed buffers once nothing is in flight.
    RegisterPending,
}

impl ZcState {
    fn sending_zero_copy(self) -> bool {
        self != ZcState::Plain
    }
}

struct FrameSlot {
    state: SlotState,
    /// The frame's payload codec (what `auto` needs to read delivery samples).
    codec: Codec,
    pieces: [Buf; 1 + FRAME_RUNS_MAX],
    n_pieces: usize,
    bytes: u64,
    pages: u64,
    marker: Marker,
}

/// One op of the in-flight chain.
#[derive(Debug, Clone, Copy)]
struct ChainOp {
    slot: u16,
    /// Piece index for a zero-copy send; `None` for a sendmsg of the whole frame.
    piece: Option<u16>,
    len: u64,
    done: u64,
}

/// Shard parameters.
pub(crate) struct SendShardParams {
    pub channel: u16,
    /// Channels of the transfer (the bandwidth limit is shared among them).
    pub channels: u16,
    pub zero_copy: ZeroCopy,
    pub memory: Arc<GuestMemory>,
    pub work: Receiver<Work>,
    /// The chunks of this shard's pool, which its other shards pull from too.
    pub pool: Receiver<Work>,
    /// Told (when not told already) whenever this shard takes a pool's last queued chunk.
    pub pool_drained: Sender<()>,
    pub events: Sender<ShardEvent>,
    pub abort: Arc<Abort>,
    pub progress: Arc<Progress>,
    /// The channel's TLS session: frames are sealed into their slots before submission.
    pub tls: Option<TlsSession>,
    /// Records per TLS key before a key update.
    pub tls_records_per_key: u64,
    /// Plaintext frames carry a checksum per page ([`crate::SenderConfig::page_checksums`]).
    pub page_checksums: bool,
    /// What to do with normal pages.
    pub compression: Compression,
    /// zstd level (checked by the coordinator).
    pub zstd_level: i32,
    /// The transfer's bandwidth limit; this shard paces its share.
    pub pace: crate::sender::BandwidthLimit,
    /// No progress for this long (sends not taken, no confirmation) fails the channel.
    pub idle: Duration,
    /// An idle channel sends a keepalive frame this often (a quarter of the receiver's bound).
    pub keepalive_every: Duration,
    /// How the ring is made: test builds may simulate the transport and inject faults.
    pub faults: crate::shard::RingFaults,
}

pub(crate) struct SendShard {
    channel: u16,
    ring: Box<dyn RingIo>,
    memory: Arc<GuestMemory>,
    scanner: ZeroScanner,
    hash: Xxh3,
    /// Frames carry a checksum per normal page: plaintext, unless the sender turned them off.
    page_checksums: bool,
    /// The channel's life: numbering, rounds, the end, the receiver's confirmation, timers.
    m: SenderMachine,
    frame: Box<Frame>,
    slots: Vec<FrameSlot>,
    ready: VecDeque<u16>,
    chain: Vec<ChainOp>,
    chain_outstanding: usize,
    zc: ZcState,
    /// Plaintext: the control message being received into the control slot.
    control: ControlReader,
    /// A control receive is posted on the ring.
    control_posted: bool,
    /// This shard's own queue: round ends, device state, the end of the stream.
    work: Receiver<Work>,
    /// Its pool's chunks, shared with the pool's other shards: whoever has room takes the next.
    pool: Receiver<Work>,
    /// The coordinator waits on this for a round's chunks to be taken (see `take_work`).
    pool_drained: Sender<()>,
    events: Sender<ShardEvent>,
    abort: Arc<Abort>,
    progress: Arc<Progress>,
    stats: ShardStats,
    tls: Option<TlsSession>,
    tls_records_per_key: u64,
    /// The sealer's sequence number before the frame being built was sealed, where it can go
    /// back to it should the frame fail (see `build`).
    sealed_from: Option<u64>,
    header: [u8; FRAME_HEADER_BYTES_MAX],
    compression: Compression,
    compressor: Option<Compressor>,
    auto: Auto,
    /// Normal pages copied out of guest memory for the compressor (never borrowed in place).
    scratch: Vec<u8>,
    /// Compressed payload waiting to be sealed (TLS only; plaintext compresses into its slot).
    packed: Vec<u8>,
    chain_started: Instant,
    chain_bytes: u64,
    pace: crate::sender::BandwidthLimit,
    channels: u16,
    /// When the chains sent so far have had their time at the limit (`--max-bandwidth`).
    pace_until: Instant,
    /// This shard's share of the limit `pace_until` was reckoned at (see `repace`).
    paced_bytes_per_s: Option<f64>,
    /// The limit was found below the pacing floor and said so (see `submit_chain`).
    pace_floor_told: bool,
    /// The last round ended here was live: the coordinator waits for its `RoundPlaced`.
    awaited_round: bool,
    /// The body of an abort or device state frame being built.
    body: Box<[u8; BODY_BYTES_MAX]>,
}

/// Where an idle shard waits: on its work queue, where new work wakes it at once and the ring
/// is looked at after the slice; or on its ring, where a completion (the receiver's next
/// control message) wakes it at once and the queue is looked at after the slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleWait {
    Queue(Duration),
    Ring(Duration),
}

impl IdleWait {
    /// Where to wait: on the ring while the coordinator waits for a live round's
    /// `RoundPlaced`; on the queue otherwise, looking at the ring every millisecond while
    /// zero-copy notifications are due, else after `slice`.
    fn choose(placement_awaited: bool, notifications_only: bool, slice: Duration) -> IdleWait {
        let poll = Duration::from_millis(NOTIFICATION_POLL_MS);
        if placement_awaited {
            IdleWait::Ring(poll)
        } else if notifications_only {
            IdleWait::Queue(poll)
        } else {
            IdleWait::Queue(slice)
        }
    }
}

impl SendShard {
    /// Runs the shard to the end of the stream, until the receiver confirms it. On failure the
    /// abort latch is raised here, while this shard's ring and socket are still open, so a
    /// receiver can still tell the peer why.
    pub(crate) fn run(mut self) -> Result<ShardStats> {
        match self.run_inner() {
            Ok(()) => Ok(std::mem::take(&mut self.stats)),
            Err(e) => {
                let told = matches!(e, Error::PeerAborted { .. });
                let e = self.abort.fail(e);
                if !told {
                    self.tell_receiver();
                }
                Err(e)
            }
        }
    }

    fn run_inner(&mut self) -> Result<()> {
        let cpu_start = crate::sys::thread_cpu_time();
        let faults_start = crate::sys::thread_page_faults();
        let start = Instant::now();
        let mut idle = Duration::ZERO;
        // Records that arrived with the handshake (an early abort, say) come first.
        if let Some(tls) = self.tls.as_mut() {
            let buffer = std::mem::take(&mut tls.buffer);
            tls.stream
                .move_to(&buffer, self.ring.slot_mut(CONTROL_SLOT), self.channel)?;
            self.on_control_records()?;
        } else {
            self.post_control_recv(CONTROL_BYTES);
        }
        self.ring.submit()?;
        let slice = Duration::from_millis(RING_WAIT_SLICE_MS);
        loop {
            // A cancel (or another channel's failure) ends the channel at once while it is
            // still sending: its end of stream is never built, so the receiver cannot confirm.
            // Once the end of stream is built it cannot be taken back: the receiver, past it,
            // reads nothing more here and confirms whatever this side does meanwhile (and its
            // VMM may then resume the guest). So the channel goes on as if the abort had not
            // come, and ends with the receiver's answer: `Done`, its abort, or a closed
            // connection, within the idle bound. Both sides then report the same outcome.
            if self.abort.is_raised() && self.m.outgoing() == Outgoing::Sending {
                return Err(Error::Aborted);
            }
            self.reap()?;
            if self.chain_outstanding == 0 {
                self.finish_chain()?;
                self.register_when_idle();
            }
            if self.m.complete() && self.sends_in_flight() == 0 {
                break;
            }
            self.fill(None)?;
            // --max-bandwidth: a chain leaves only when the previous ones' time has passed.
            self.repace();
            let pace = self.pace_until.saturating_duration_since(Instant::now());
            if self.chain_outstanding == 0 && !self.ready.is_empty() && pace.is_zero() {
                self.submit_chain()?;
                self.fill(None)?;
            }
            let slice = if self.ready.is_empty() || pace.is_zero() {
                slice
            } else {
                // Waiting on our own pacing is not a stalled peer.
                self.m.progressed(Instant::now());
                pace.min(slice)
            };
            // Zero-copy notifications alone must not keep new work waiting: on loopback (and
            // behind a delayed ACK) they come up to 40 ms after the data, and a round's first
            // chunk or the end of the stream would wait for them (measured: a live migration's
            // downtime grew from ~3 ms to ~50 ms). Wait on the work queue then, entering the
            // ring every millisecond for them.
            // A live round's RoundPlaced is the other way round: it arrives on the ring, and a
            // live migration measures every round up to it, and waits for it before the next
            // round comes. Wait on the ring then, looking at the queue every millisecond
            // (measured: a wait on the work queue alone added a whole wait slice, 100 ms, to
            // every round; polling the ring every millisecond still added ~1 ms to every
            // round's tail). After the last round the coordinator does not wait: the device
            // state and the end of the stream follow at once, on the queue.
            let notifications_only = self.chain_outstanding == 0 && self.sends_in_flight() > 0;
            let can_take_work =
                self.m.may_build() && self.ready.is_empty() && self.free_slot().is_some();
            if can_take_work && (self.sends_in_flight() == 0 || notifications_only) {
                let wait = IdleWait::choose(
                    self.awaited_round && self.m.placement_pending(),
                    notifications_only,
                    slice,
                );
                idle += self.wait_for_work(wait)?;
            } else if self.ring.submit_and_wait(1, slice)? == Wait::TimedOut {
                self.check_idle()?;
            }
        }
        self.stats.busy_ms = (start.elapsed().saturating_sub(idle)).as_secs_f64() * 1e3;
        self.stats.cpu_ms = (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3;
        let faults = crate::sys::thread_page_faults();
        self.stats.faults_minor = faults.0.saturating_sub(faults_start.0);
        self.stats.faults_major = faults.1.saturating_sub(faults_start.1);
        Ok(())
    }

    /// Nothing to send and nothing to build: waits as `wait` says for work or the ring, or
    /// sends a keepalive when one is due. Returns the time spent idle.
    fn wait_for_work(&mut self, wait: IdleWait) -> Result<Duration> {
        let waited = Instant::now();
        let keepalive_in = self.m.keepalive_in(waited);
        if keepalive_in.is_zero() {
            // Nothing to send for a while: tell the receiver we are alive.
            self.fill(Some(Work::Keepalive))?;
            return Ok(Duration::ZERO);
        }
        match wait {
            IdleWait::Queue(slice) => {
                let timeout = slice.min(keepalive_in);
                // Either queue's work wakes us at once; a disconnected queue (the coordinator
                // is gone) is ready at once too, with an error.
                let taken = crossbeam_channel::select! {
                    recv(self.work) -> w => w.map(Some),
                    recv(self.pool) -> w => {
                        self.took_from_pool();
                        w.map(Some)
                    },
                    default(timeout) => Ok(None),
                };
                match taken {
                    Ok(Some(work)) => self.fill(Some(work))?,
                    Ok(None) => {
                        // Enter the ring briefly: with DEFER_TASKRUN a receiver's abort or a
                        // closed connection is only posted when this thread asks for events.
                        self.ring.submit_and_wait(1, Duration::from_millis(1))?;
                    }
                    Err(crossbeam_channel::RecvError) => return Err(Error::Aborted),
                }
            }
            IdleWait::Ring(slice) => match self.take_work()? {
                Some(work) => self.fill(Some(work))?,
                None => {
                    // The control receive is posted: the receiver's next message ends this.
                    self.ring.submit_and_wait(1, slice.min(keepalive_in))?;
                }
            },
        }
        if let IdleWait::Queue(_) = wait {
            // Waiting on our own coordinator is not the peer's fault.
            self.m.progressed(Instant::now());
        }
        if self.m.placement_pending() {
            // A round's RoundPlaced is the receiver's to send, so that wait is bounded: a
            // receiver that took the whole round into its socket buffer and then hung (stopped,
            // say) would otherwise hold a live migration for ever.
            self.check_idle()?;
        }
        Ok(waited.elapsed())
    }

    /// `auto` zero-copy that really sends from our pages: registers guest memory as fixed
    /// buffers once no send is in flight (see [`chain`]'s zero-copy decision).
    fn register_when_idle(&mut self) {
        if self.zc != ZcState::RegisterPending || self.sends_in_flight() > 0 {
            return;
        }
        self.zc = ZcState::ZeroCopy;
        match self.ring.register_guest_memory() {
            Ok(()) => self.stats.fixed_buffers = true,
            Err(e) => tracing::warn!(
                channel = self.channel,
                "zero-copy works but guest memory could not be registered, sending without fixed buffers: {e}"
            ),
        }
    }

    /// This shard's share of the bandwidth limit now, in bytes per second.
    fn pace_bytes_per_s(&self) -> Option<f64> {
        self.pace
            .get()
            .map(|b| b as f64 / f64::from(self.channels.max(1)))
    }

    /// Follows a change of the bandwidth limit: the wait still ahead was reckoned at the old
    /// rate, and is rescaled to the new one (none once the limit is lifted or newly set), so a
    /// limit lifted or raised while this shard waits applies at once, not after a wait that a
    /// low limit made long.
    fn repace(&mut self) {
        let rate = self.pace_bytes_per_s();
        if rate == self.paced_bytes_per_s {
            return;
        }
        let now = Instant::now();
        let left = self.pace_until.saturating_duration_since(now);
        self.pace_until = match (self.paced_bytes_per_s, rate) {
            (Some(old), Some(new)) => now + left.mul_f64(old / new),
            _ => now,
        };
        self.paced_bytes_per_s = rate;
    }

    pub(super) fn sends_in_flight(&self) -> usize {
        self.ring.in_flight() - usize::from(self.control_posted)
    }

    /// Fails when nothing has moved for too long (see [`SenderMachine::check_idle`]).
    fn check_idle(&mut self) -> Result<()> {
        let moved = self
            .progress
            .pages_done
            .load(std::sync::atomic::Ordering::Relaxed);
        let checked = self.m.check_idle(Instant::now(), moved);
        checked.map_err(|f| self.fault(f))
    }

    fn free_slot(&mut self) -> Option<u16> {
        for i in 0..self.slots.len() {
            let slot = i as u16;
            if self.slots[i].state == SlotState::Sent && self.ring.slot_idle(slot) {
                self.slots[i].state = SlotState::Free;
            }
            if self.slots[i].state == SlotState::Free {
                return Some(slot);
            }
        }
        None
    }

    /// Builds frames while slots are free: from `first` if given, then whatever is queued.
    fn fill(&mut self, mut first: Option<Work>) -> Result<()> {
        while self.m.may_build() {
            if first.is_none() && self.ready.len() >= FRAMES_BUILT_AHEAD_MAX {
                return Ok(());
            }
            let Some(slot) = self.free_slot() else {
                // `first` cannot be lost: we only pass it when a slot is free.
                debug_assert!(first.is_none());
                return Ok(());
            };
            let work = match first.take() {
                Some(w) => w,
                None => match self.take_work()? {
                    Some(w) => w,
                    None => return Ok(()),
                },
            };
            self.build(slot, work)?;
        }
        Ok(())
    }

    /// The next work item, if one is waiting: this shard's own first, then its pool's.
    ///
    /// Which queue goes first does not matter for ordering: the coordinator queues a round's
    /// `EndRound` only once its pool is empty (every chunk of the round taken by some shard,
    /// which builds it before looking at its queues again), and the next round's chunks only
    /// once every shard has ended this one.
    fn take_work(&mut self) -> Result<Option<Work>> {
        match self.work.try_recv() {
            Ok(w) => return Ok(Some(w)),
            Err(TryRecvError::Disconnected) => return Err(Error::Aborted),
            Err(TryRecvError::Empty) => {}
        }
        match self.pool.try_recv() {
            Ok(w) => {
                self.took_from_pool();
                Ok(Some(w))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Error::Aborted),
        }
    }

    /// After a take from the pool: if that emptied it, wakes the coordinator, which waits for
    /// that before it ends the round. (A token already waiting says the same; a stale one,
    /// from a pool that emptied while chunks were still coming, only makes it look again.)
    fn took_from_pool(&self) {
        if self.pool.is_empty() {
            let _ = self.pool_drained.try_send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_shard_waits_on_its_ring_only_for_an_awaited_round() {
        let slice = Duration::from_millis(RING_WAIT_SLICE_MS);
        let poll = Duration::from_millis(NOTIFICATION_POLL_MS);
        // A live round's RoundPlaced arrives on the ring, and nothing comes on the queue
        // before it: wait there.
        assert_eq!(IdleWait::choose(true, false, slice), IdleWait::Ring(poll));
        assert_eq!(IdleWait::choose(true, true, slice), IdleWait::Ring(poll));
        // After the last round (or any round nobody waits for) the next work comes on the
        // queue at once: the device state, the end of the stream.
        assert_eq!(
            IdleWait::choose(false, false, slice),
            IdleWait::Queue(slice)
        );
        // Zero-copy notifications alone must not keep new work waiting.
        assert_eq!(IdleWait::choose(false, true, slice), IdleWait::Queue(poll));
    }
}
