//! The per-core shards: one thread, one io_uring, one connection each. This module holds what
//! they share with their coordinator: the abort latch (first error wins, every channel torn
//! down), the receiver's round barrier, and core pinning.

pub(crate) mod recv;
pub(crate) mod send;

use std::net::Shutdown;

use crate::stream::Stream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::limits::RING_WAIT_SLICE_MS;
use crate::pipeline::seal::{
    RecordSealer, CLOSE_NOTIFY_ALERT, CONTENT_ALERT, CONTENT_APPLICATION_DATA,
    RECORD_OVERHEAD_BYTES,
};
use crate::protocol::control::{Control, CONTROL_MESSAGE_BYTES_MAX};

/// How a shard's ring is made in test builds: over the simulated transport, with seeded faults.
#[cfg(feature = "faults")]
pub(crate) use crate::faults::RingFaults;

/// How a shard's ring is made: release builds have nothing to choose (see [`open_ring`]).
#[cfg(not(feature = "faults"))]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RingFaults;

/// The ring a shard drives over its connection `socket` (`connecting`: the sender's side):
/// io_uring with `slab.0` slab slots of `slab.1` bytes; in test builds, the simulated transport
/// and seeded faults of `faults` ([`crate::faults`]). `who` is the channel and its idle bound.
pub(crate) fn open_ring(
    socket: Stream,
    connecting: bool,
    memory: std::sync::Arc<crate::memory::GuestMemory>,
    slab: (usize, usize),
    faults: RingFaults,
    who: (u16, Duration),
) -> Result<(Box<dyn crate::uring::RingIo>, crate::uring::Caps)> {
    #[cfg(feature = "faults")]
    return crate::faults::open_ring(socket, connecting, memory, slab, faults, who);
    #[cfg(not(feature = "faults"))]
    {
        let _ = (connecting, faults, who);
        let ring = crate::uring::Ring::new(socket, memory, slab.0, slab.1)?;
        let caps = ring.caps();
        Ok((Box::new(ring), caps))
    }
}

/// Bytes of the largest encoded control message: sealed, followed by a close_notify record.
pub(crate) const CONTROL_WIRE_BYTES_MAX: usize =
    CONTROL_MESSAGE_BYTES_MAX + 2 * RECORD_OVERHEAD_BYTES + CLOSE_NOTIFY_ALERT.len();

/// One watched connection: a duplicate of its socket and, with TLS, the sealer of the direction
/// control messages travel in (receivers only send control messages, so the shard never needs it).
#[derive(Debug)]
struct Peer {
    socket: Stream,
    sealer: Option<RecordSealer>,
    /// The channel's last control message (Done with close_notify, or an Abort) is sealed:
    /// nothing may follow it.
    closed: bool,
}

impl Peer {
    /// Encodes `msg` for this peer into `out`: plain, or sealed as a TLS record (a `Done` is then
    /// followed by close_notify, which ends the channel's TLS stream).
    fn encode(&mut self, msg: &Control, out: &mut [u8]) -> Result<usize> {
        let mut plain = [0u8; CONTROL_MESSAGE_BYTES_MAX];
        let n = msg.encode(&mut plain);
        let Some(sealer) = self.sealer.as_mut() else {
            out[..n].copy_from_slice(&plain[..n]);
            return Ok(n);
        };
        let record = |source| Error::TlsRecord {
            channel: u16::MAX,
            source,
        };
        let mut at = sealer
            .seal(&plain[..n], CONTENT_APPLICATION_DATA, out)
            .map_err(record)?;
        if *msg == Control::Done {
            at += sealer
                .seal(&CLOSE_NOTIFY_ALERT, CONTENT_ALERT, &mut out[at..])
                .map_err(record)?;
        }
        Ok(at)
    }
}

/// First error wins: records it, raises the flag every shard checks, and (on a receiver, after
/// telling the sender why) shuts every connection of this side down so blocked operations on
/// both sides end at once.
#[derive(Debug, Default)]
pub(crate) struct Abort {
    raised: AtomicBool,
    first: Mutex<Option<Error>>,
    /// Duplicates of every connection's socket (same kernel socket, separate fd, so shutting one
    /// down never races with a shard closing its own).
    peers: Mutex<Vec<Peer>>,
    /// Receivers tell the sender why before shutting down.
    notify_peer: bool,
    /// A sender started on this latch (one made beforehand, for a canceller that serves one
    /// sender only).
    claimed: AtomicBool,
}

impl Abort {
    pub(crate) fn new(notify_peer: bool) -> Self {
        Abort {
            notify_peer,
            ..Default::default()
        }
    }

    /// Registers a connection for teardown (and, on a receiver with TLS, the sealer its control
    /// messages use). Returns the peer's id for [`send_control`](Self::send_control).
    pub(crate) fn watch(&self, socket: &Stream, sealer: Option<RecordSealer>) -> Result<usize> {
        let dup = socket
            .try_clone()
            .map_err(|e| Error::io("duplicating a socket for teardown", e))?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.push(Peer {
            socket: dup,
            sealer,
            closed: false,
        });
        if self.is_raised() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        Ok(peers.len() - 1)
    }

    /// Forgets every watched connection (the receiver dropped a session it was gathering).
    pub(crate) fn unwatch_all(&self) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Sends our own TLS KeyUpdate (`update_not_requested`) to peer `id`, sealed with its
    /// current key, then moves the peer's sealer to `next` (the new sending key). The receiver
    /// answers a sender's `update_requested` this way (RFC 8446 §4.6.3).
    pub(crate) fn send_key_update(&self, id: usize, next: RecordSealer) -> Result<()> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(peer) = peers.get_mut(id) else {
            return Err(Error::Internal(format!("no watched connection {id}")));
        };
        let Some(sealer) = peer.sealer.as_mut() else {
            return Err(Error::Internal(format!(
                "no TLS connection {id} to answer a key update on"
            )));
        };
        let mut out = [0u8; CONTROL_WIRE_BYTES_MAX];
        let n = sealer
            .seal(
                &crate::pipeline::seal::KEY_UPDATE_MESSAGE,
                crate::pipeline::seal::CONTENT_HANDSHAKE,
                &mut out,
            )
            .map_err(|source| Error::TlsRecord {
                channel: u16::MAX,
                source,
            })?;
        *sealer = next;
        write_peer(peer, &out[..n], "answering a TLS key update")
    }

    /// Sends `msg` to peer `id` (see [`Peer::encode`]). Every control message of a channel is
    /// sealed and written under one lock, so its records leave in the order they were sealed,
    /// whichever thread sends (a shard's `RoundPlaced` and `Done`, the latch's `Abort`).
    /// Sending `Done` closes the peer: an abort after it would follow close_notify, which TLS
    /// forbids.
    pub(crate) fn send_control(&self, id: usize, msg: &Control) -> Result<()> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(peer) = peers.get_mut(id) else {
            return Err(Error::Internal(format!("no watched connection {id}")));
        };
        if peer.closed {
            // An abort went out instead (or the channel is over): a `Done` now would not be
            // sent, and the shard must not end as if it had confirmed.
            return match msg {
                Control::Done => Err(Error::Aborted),
                _ => Ok(()),
            };
        }
        let mut out = [0u8; CONTROL_WIRE_BYTES_MAX];
        let n = peer.encode(msg, &mut out)?;
        if *msg == Control::Done {
            peer.closed = true;
        }
        write_peer(peer, &out[..n], "sending a control message")
    }

    /// Marks the latch as a started transfer's; false when one had it already.
    pub(crate) fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    /// Raises the flag without an error of its own (the caller gives up; shards stop).
    pub(crate) fn raise(&self) {
        self.raised.store(true, Ordering::Release);
    }

    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Records `error` if it is the first, then tears everything down. Returns
    /// [`Error::Aborted`] for the caller to propagate.
    pub(crate) fn fail(&self, error: Error) -> Error {
        if matches!(error, Error::Aborted) {
            return error;
        }
        let first = {
            let mut slot = self.first.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                tracing::debug!("transfer failed: {error}");
                let code = error.abort_code();
                let reason = error_chain(&error);
                *slot = Some(error);
                Some((code, reason))
            } else {
                None
            }
        };
        // A receiver tells every sender channel why *before* raising the flag: shards that see
        // the flag exit and close their connections, and a channel closed before its abort
        // was written would show the sender only a closed connection (seen under load: the
        // sender reported "peer closed" instead of the receiver's memory fault).
        if let (Some((code, reason)), true) = (first, self.notify_peer) {
            let msg = Control::Abort { code, reason };
            // Sealing and writing under one lock keeps each channel's records in order.
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            for peer in peers.iter_mut().filter(|p| !p.closed) {
                let mut buf = [0u8; CONTROL_WIRE_BYTES_MAX];
                let Ok(n) = peer.encode(&msg, &mut buf) else {
                    continue;
                };
                peer.closed = true;
                let _ = write_peer(peer, &buf[..n], "telling the sender why");
            }
        }
        self.raised.store(true, Ordering::Release);
        // A receiver has told the sender (above) and ends every connection at once. A sender's
        // shards each tell the receiver why with an abort frame on the way out (they poll the
        // flag every wait slice), then close their own connection.
        if self.notify_peer {
            self.shutdown_all();
        }
        Error::Aborted
    }

    /// The code and text of the first error, if any (it stays recorded).
    pub(crate) fn first_reason(&self) -> Option<(crate::protocol::control::AbortCode, String)> {
        let slot = self.first.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|e| (e.abort_code(), error_chain(e)))
    }

    /// Records `error` (telling the peer), and returns the first error of the transfer.
    pub(crate) fn fail_and_take(&self, error: Error) -> Error {
        self.fail(error);
        self.take_error().unwrap_or(Error::Aborted)
    }

    /// The first error, if any (taken: later calls return `None`).
    pub(crate) fn take_error(&self) -> Option<Error> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Shuts every watched connection down (end of a transfer, or a caller giving up).
    pub(crate) fn shutdown_all(&self) {
        for p in self.peers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            #[cfg(feature = "faults")]
            crate::faults::sim::shutdown(&p.socket);
            let _ = p.socket.shutdown(Shutdown::Both);
        }
    }
}

/// Milliseconds a control message write may block (the peer's socket buffer is full only
/// when it stopped reading).
const CONTROL_WRITE_MS: u64 = 200;

/// Writes `bytes` to `peer`'s connection (in test builds, over its simulated link if it has
/// one), within `CONTROL_WRITE_MS`.
fn write_peer(peer: &mut Peer, bytes: &[u8], what: &str) -> Result<()> {
    #[cfg(feature = "faults")]
    if crate::faults::sim::write_to_sender(&peer.socket, bytes) {
        return Ok(());
    }
    use std::io::Write;
    let _ = peer
        .socket
        .set_write_timeout(Some(Duration::from_millis(CONTROL_WRITE_MS)));
    (&peer.socket)
        .write_all(bytes)
        .map_err(|e| Error::io(what.to_string(), e))
}

/// `error` and its sources, joined with ": ".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What a channel reports at the round barrier: the marker it read and the round it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Marker {
    /// `EndOfRound` for this round.
    EndOfRound(u32),
    /// `EndOfStream` (the transfer's end) in this round.
    EndOfStream(u32),
}

/// The receiver's per-round barrier: a channel that has read round r's end-of-round marker waits
/// here until every channel has, so no round r+1 page can be placed before every round r page.
/// Every channel of one generation must bring the same marker: an end of stream meeting an end
/// of round (or another round) is a protocol error at once, not a wait.
#[derive(Debug)]
pub(crate) struct RoundBarrier {
    parties: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

#[derive(Debug)]
struct BarrierState {
    generation: u64,
    /// Generations that ended a round (the others ended the stream).
    rounds_ended: u32,
    arrived: usize,
    /// The first arrival of this generation: its channel and marker.
    first: Option<(u16, Marker)>,
}

impl RoundBarrier {
    pub(crate) fn new(parties: usize) -> Self {
        RoundBarrier {
            parties,
            state: Mutex::new(BarrierState {
                generation: 0,
                rounds_ended: 0,
                arrived: 0,
                first: None,
            }),
            cv: Condvar::new(),
        }
    }

    /// Rounds every party has ended together so far (the end of the stream not counted).
    pub(crate) fn rounds_ended(&self) -> u32 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rounds_ended
    }

    /// Waits until all parties arrive with `marker`, the transfer aborts, or nothing has moved
    /// on any channel (`moved` counts bytes received by all of them) for `idle`.
    pub(crate) fn wait(
        &self,
        channel: u16,
        marker: Marker,
        abort: &Abort,
        moved: &std::sync::atomic::AtomicU64,
        idle: Duration,
    ) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.first {
            Some((other, theirs)) if theirs != marker => {
                let describe = |m: Marker| match m {
                    Marker::EndOfRound(r) => format!("ended round {r}"),
                    Marker::EndOfStream(r) => format!("ended the stream in round {r}"),
                };
                return Err(Error::Protocol {
                    channel,
                    source: crate::protocol::ProtocolError::MixedMarkers(format!(
                        "channel {channel} {} while channel {other} {}",
                        describe(marker),
                        describe(theirs)
                    )),
                });
            }
            Some(_) => {}
            None => state.first = Some((channel, marker)),
        }
        state.arrived += 1;
        if state.arrived == self.parties {
            state.generation += 1;
            if matches!(marker, Marker::EndOfRound(_)) {
                state.rounds_ended = state.rounds_ended.saturating_add(1);
            }
            state.arrived = 0;
            state.first = None;
            self.cv.notify_all();
            return Ok(());
        }
        let generation = state.generation;
        let mut last_moved = moved.load(Ordering::Relaxed);
        let mut since = Instant::now();
        while state.generation == generation {
            if abort.is_raised() {
                return Err(Error::Aborted);
            }
            let now_moved = moved.load(Ordering::Relaxed);
            if now_moved != last_moved {
                last_moved = now_moved;
                since = Instant::now();
            }
            if since.elapsed() >= idle {
                return Err(Error::Timeout {
                    what: format!(
                        "waiting at the round barrier on channel {channel}: no other channel received anything meanwhile"
                    ),
                    ms: idle.as_millis() as u64,
                });
            }
            state = self
                .cv
                .wait_timeout(state, Duration::from_millis(RING_WAIT_SLICE_MS))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }
}

/// Runs a shard body, turning a panic into [`Error::ShardPanicked`] so the other shards are torn
/// down at once instead of waiting out a bound.
pub(crate) fn catch_panic<T>(
    side: &'static str,
    channel: u16,
    body: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::ShardPanicked {
                side,
                channel,
                message,
            })
        }
    }
}

/// Core ids this process may run on, in order (empty when affinity cannot be read).
pub(crate) fn allowed_cores() -> Vec<core_affinity::CoreId> {
    core_affinity::get_core_ids().unwrap_or_default()
}

/// Where a shard thread may run (see [`Pinning`](crate::Pinning)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Affinity {
    /// Wherever the scheduler puts it.
    Free,
    /// This core only.
    Core(usize),
    /// Any of these cores (those of its planned node), the scheduler choosing among them.
    Cores(Vec<usize>),
}

impl Affinity {
    /// Shard `channel`'s affinity under `pinning`, following `placement`.
    pub(crate) fn of(
        placement: &crate::placement::Placement,
        channel: usize,
        pinning: crate::Pinning,
    ) -> Affinity {
        let place = placement.plan.shards[channel];
        match (pinning, place.core) {
            (crate::Pinning::None, _) | (_, None) => Affinity::Free,
            (crate::Pinning::Nodes, Some(core)) => {
                let cores = placement.node_cores(channel);
                if cores.is_empty() {
                    Affinity::Core(core)
                } else {
                    Affinity::Cores(cores.to_vec())
                }
            }
            (crate::Pinning::Cores | crate::Pinning::CoresReversed, Some(core)) => {
                Affinity::Core(core)
            }
        }
    }

    /// Applies it to the calling thread. Returns the core it is pinned to (`Core` only) and
    /// whether the thread is placed as planned (so its planned node holds).
    pub(crate) fn apply(&self) -> (Option<usize>, bool) {
        match self {
            Affinity::Free => (None, false),
            Affinity::Core(id) => {
                let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: *id });
                (pinned.then_some(*id), pinned)
            }
            Affinity::Cores(cores) => match crate::sys::set_thread_affinity(cores) {
                Ok(()) => (None, true),
                Err(e) => {
                    tracing::warn!("could not place a shard on cores {cores:?}: {e}");
                    (None, false)
                }
            },
        }
    }
}
