//! Work on the destination in the background: its pre-fault while the receiver waits for its
//! sender, and a new image file's space reservation while pages arrive.

use crate::error::{Error, Result};
use crate::limits::{PREFAULT_DELAY_MS, PREFAULT_THREADS_MAX};
use crate::memory::{GuestMemory, Reservation};
use crate::shard::{allowed_cores, Abort};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Destination memory being faulted in, in the background (see [`ReceiverConfig::prefault`]),
/// by one thread per allowed core, while the receiver waits for the sender's channels (from
/// `PREFAULT_DELAY_MS` after it started: a sender that connects at once is not slowed). Never
/// waited for: it is stopped when they are all in (a large destination on a slow host must not
/// hold the sender past its idle bound, and once pages flow it would only take cores from the
/// shards). Stopped and joined when dropped.
pub(super) struct Prefault {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Result<bool>, f64)>>,
}

impl Prefault {
    pub(super) fn start(memory: &Arc<GuestMemory>) -> Prefault {
        let threads = allowed_cores().len().clamp(1, PREFAULT_THREADS_MAX);
        let memory = memory.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pw-prefault".into())
            .spawn(move || {
                // A sender already connecting gets the cores to itself: pre-faulting only uses
                // time the receiver spends waiting.
                let waited = Instant::now();
                while waited.elapsed() < Duration::from_millis(PREFAULT_DELAY_MS) {
                    if stopped.load(Ordering::Relaxed) {
                        return (Ok(true), 0.0);
                    }
                    std::thread::sleep(Duration::from_millis(PREFAULT_DELAY_MS / 20));
                }
                let started = Instant::now();
                let r = memory.prefault_in_parallel(threads, &stopped);
                (r, started.elapsed().as_secs_f64() * 1e3)
            })
            .ok();
        Prefault { stop, thread }
    }

    /// Asks it to stop (each thread ends its current step), without waiting.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops it where it is and waits for it: what it returned and the milliseconds it ran.
    pub(super) fn stop_and_join(&mut self) -> Option<(Result<bool>, f64)> {
        self.stop();
        self.thread.take()?.join().ok()
    }

    /// Stops it and waits for it; the milliseconds it ran. Best effort: where it failed (a file
    /// mapping cut short, memory the kernel cannot give), pages fault on first touch instead,
    /// and placing them reports the precise page.
    pub(super) fn finish(mut self) -> f64 {
        match self.stop_and_join() {
            Some((Ok(true), ms)) => ms,
            Some((Ok(false), ms)) => {
                tracing::debug!("no MADV_POPULATE_WRITE here: pages fault on first touch");
                ms
            }
            Some((Err(e), ms)) => {
                tracing::warn!(
                    "pre-faulting the destination stopped ({}); pages fault on first touch",
                    crate::shard::error_chain(&e)
                );
                ms
            }
            None => 0.0,
        }
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// A new image file's space being reserved while pages arrive (see
/// [`crate::ImageFile::create_reserving_while_received`]), on one thread. A failure (a full
/// filesystem) fails the transfer at once, through the abort latch, which tells the sender
/// why. Stopped and joined when dropped.
pub(super) struct Reserving {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Reservation>>,
}

impl Reserving {
    pub(super) fn start(mut reservation: Reservation, abort: Arc<Abort>) -> Result<Reserving> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let bytes = reservation.len();
        let thread = std::thread::Builder::new()
            .name("pw-reserve".into())
            .spawn(move || {
                let started = Instant::now();
                match reservation.run_beside_writers(&stopped) {
                    Ok(done) => tracing::debug!(
                        done,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "reserving the destination file while pages arrived"
                    ),
                    Err(e) => {
                        abort.fail(reservation.error(e));
                    }
                }
                reservation
            })
            .map_err(|e| Error::io("starting the destination's reservation thread", e))?;
        tracing::debug!(
            bytes,
            "reserving the destination file's space while pages arrive"
        );
        Ok(Reserving {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops it where it is and hands what is left back to `memory`, for the image's commit
    /// to finish (nothing waits for a large tmpfs file's reservation after the transfer; a
    /// failed step is tried again there, and fails the commit).
    pub(super) fn stop_and_hand_back(mut self, memory: &GuestMemory) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(Ok(r)) = self.thread.take().map(JoinHandle::join) {
            memory.put_reservation(r);
        }
    }
}

impl Drop for Reserving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
