//! Ctrl-C, `SIGTERM` and `SIGHUP`: a transfer that runs is cancelled, so it ends the way any
//! failure does: the peer is told why, a new RAM image's temporary file is removed and an
//! existing image keeps its marker saying it is incomplete. Killed by the signal instead, the
//! process would leave a hidden temporary file of the image's full size behind, or an image
//! without its marker. With nothing registered to cancel, or at a second signal, the process
//! ends at once (status 130, as a shell reports Ctrl-C).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pagewire::sender::Canceller;

/// What a signal cancels.
static CANCELLERS: Mutex<Vec<Canceller>> = Mutex::new(Vec::new());
/// A signal has come.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// Exit status after a signal ends the process (128 + SIGINT).
const SIGNAL_EXIT_STATUS: i32 = 130;

/// Installs the handler (once, before any transfer starts).
pub(crate) fn install() {
    let installed = ctrlc::set_handler(|| {
        if SIGNALLED.swap(true, Ordering::SeqCst) {
            std::process::exit(SIGNAL_EXIT_STATUS);
        }
        let cancellers = CANCELLERS.lock().unwrap_or_else(|p| p.into_inner());
        if cancellers.is_empty() {
            std::process::exit(SIGNAL_EXIT_STATUS);
        }
        eprintln!("pagewire: interrupted, cancelling (again to quit at once)");
        for c in cancellers.iter() {
            c.cancel();
        }
    });
    if let Err(e) = installed {
        tracing::warn!("no handler for Ctrl-C/SIGTERM ({e}): a signal ends the process at once");
    }
}

/// From now on a signal cancels what `c` cancels (at once, should one have come already).
pub(crate) fn cancels(c: Canceller) {
    let mut cancellers = CANCELLERS.lock().unwrap_or_else(|p| p.into_inner());
    if SIGNALLED.load(Ordering::SeqCst) {
        c.cancel();
    }
    cancellers.push(c);
}
