//! The per-core shards: one thread, one io_uring, one connection each. This module holds what
//! they share with their coordinator: the abort latch (first error wins, every channel torn
//! down), the receiver's round barrier, and core pinning.

pub(crate) mod recv;
pub(crate) mod send;

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::limits::RING_WAIT_SLICE_MS;
use crate::protocol::control::{Control, CONTROL_MESSAGE_BYTES_MAX};

/// First error wins: records it, raises the flag every shard checks, and shuts every connection
/// of this side down so blocked operations on both sides end at once.
#[derive(Debug, Default)]
pub(crate) struct Abort {
    raised: AtomicBool,
    first: Mutex<Option<Error>>,
    /// Duplicates of every connection's socket (same kernel socket, separate fd, so shutting one
    /// down never races with a shard closing its own).
    sockets: Mutex<Vec<TcpStream>>,
    /// Receivers tell the sender why before shutting down.
    notify_peer: bool,
}

impl Abort {
    pub(crate) fn new(notify_peer: bool) -> Self {
        Abort {
            notify_peer,
            ..Default::default()
        }
    }

    /// Registers a connection for teardown.
    pub(crate) fn watch(&self, socket: &TcpStream) -> Result<()> {
        let dup = socket
            .try_clone()
            .map_err(|e| Error::io("duplicating a socket for teardown", e))?;
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dup);
        if self.is_raised() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        Ok(())
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
        self.raised.store(true, Ordering::Release);
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some((code, reason)), true) = (first, self.notify_peer) {
            let mut buf = [0u8; CONTROL_MESSAGE_BYTES_MAX];
            let n = Control::Abort { code, reason }.encode(&mut buf);
            for s in sockets.iter() {
                use std::io::Write;
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = (&*s).write_all(&buf[..n]);
            }
        }
        for s in sockets.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        Error::Aborted
    }

    /// The first error, if any (taken: later calls return `None`).
    pub(crate) fn take_error(&self) -> Option<Error> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Shuts every watched connection down (end of a transfer, or a caller giving up).
    pub(crate) fn shutdown_all(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
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

/// The receiver's per-round barrier: a channel that has read round r's end-of-round marker waits
/// here until every channel has, so no round r+1 page can be placed before every round r page.
#[derive(Debug)]
pub(crate) struct RoundBarrier {
    parties: usize,
    state: Mutex<(u64, usize)>,
    cv: Condvar,
}

impl RoundBarrier {
    pub(crate) fn new(parties: usize) -> Self {
        RoundBarrier {
            parties,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }

    /// Times every party has passed the barrier together (rounds plus the final end of stream).
    pub(crate) fn generations(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Waits until all parties arrive, the transfer aborts, or `timeout` passes.
    pub(crate) fn wait(&self, abort: &Abort, timeout: Duration) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 += 1;
        if state.1 == self.parties {
            state.0 += 1;
            state.1 = 0;
            self.cv.notify_all();
            return Ok(());
        }
        let generation = state.0;
        let start = Instant::now();
        while state.0 == generation {
            if abort.is_raised() {
                return Err(Error::Aborted);
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout {
                    what: "waiting at the round barrier for the other channels".into(),
                    ms: timeout.as_millis() as u64,
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

/// Core ids this process may run on, in order (empty when affinity cannot be read).
pub(crate) fn allowed_cores() -> Vec<core_affinity::CoreId> {
    core_affinity::get_core_ids().unwrap_or_default()
}

/// Pins the calling thread to `core`; returns the core index on success.
pub(crate) fn pin(core: Option<core_affinity::CoreId>) -> Option<usize> {
    let core = core?;
    core_affinity::set_for_current(core).then_some(core.id)
}
