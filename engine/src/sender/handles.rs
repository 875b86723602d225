//! Handles a caller keeps while a transfer runs: its bandwidth limit and its cancellation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::Error;
use crate::shard::Abort;

/// The sender's bandwidth limit (`max_bandwidth_bytes_per_s`), changeable while it runs: every
/// shard reads it before each chain of sends and paces its share (the limit over the channel
/// count), so a change applies within a chain (at most `CHAIN_FRAMES_MAX` frames).
#[derive(Debug, Clone, Default)]
pub struct BandwidthLimit(Arc<AtomicU64>);

impl BandwidthLimit {
    /// A limit of `bytes_per_s` for the whole transfer (`None`: as fast as it goes).
    pub fn new(bytes_per_s: Option<u64>) -> Self {
        let limit = BandwidthLimit::default();
        limit.set(bytes_per_s);
        limit
    }

    /// Changes the limit (`None`, or zero, lifts it).
    pub fn set(&self, bytes_per_s: Option<u64>) {
        self.0.store(bytes_per_s.unwrap_or(0), Ordering::Relaxed);
    }

    /// The limit now.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            b => Some(b),
        }
    }
}

/// Cancels a transfer from another thread: the shards see it within a ring wait slice
/// (`RING_WAIT_SLICE_MS`), tell the peer why ("cancelled") and close; the side's current or
/// next call returns [`Error::Cancelled`]. The two sides must agree on the outcome, so a
/// cancel can come too late and change nothing:
/// - on the sender, once [`Sender::finish`](crate::Sender::finish) has built the end of the
///   stream on every channel: the receiver confirms what it got whatever the sender does
///   after that, so the sender waits for its answer (the time to drain what is on the way
///   and check the pages, bounded by the idle timeout) and reports it;
/// - on either side, once the receiver has confirmed that it holds everything (its `Done` on
///   every channel).
///
/// From
/// [`Sender::canceller`](crate::Sender::canceller) or
/// [`Receiver::canceller`](crate::Receiver::canceller), or made before a sender
/// ([`Canceller::new`]) to cancel its connect and handshakes as well.
#[derive(Clone)]
pub struct Canceller {
    abort: Arc<Abort>,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Canceller")
    }
}

impl Default for Canceller {
    fn default() -> Self {
        Self::new()
    }
}

impl Canceller {
    /// A handle for a sender not started yet: give it to
    /// [`SenderConfig::canceller`](crate::SenderConfig::canceller), and a cancel also ends
    /// the connect and the handshakes.
    pub fn new() -> Self {
        Canceller {
            abort: Arc::new(Abort::new(false)),
        }
    }

    /// The handle of a transfer's own latch.
    pub(crate) fn attached(abort: Arc<Abort>) -> Self {
        Canceller { abort }
    }

    /// The latch, for a sender that starts with this handle.
    pub(crate) fn abort(&self) -> &Arc<Abort> {
        &self.abort
    }

    /// Cancels the transfer (a no-op once it has ended or failed).
    pub fn cancel(&self) {
        self.abort.fail(Error::Cancelled);
    }

    /// True once cancelled (or failed otherwise).
    pub fn is_cancelled(&self) -> bool {
        self.abort.is_raised()
    }
}
