//! Ctrl-C, `SIGTERM` and `SIGHUP`: a transfer that runs is cancelled, so it ends the way any
//! failure does: the peer is told why, a new RAM image's temporary file is removed and an
//! existing image keeps its marker saying it is incomplete. Killed by the signal instead, the
//! process would leave a hidden temporary file of the image's full size behind, or an image
//! without its marker. Then the process ends by the same signal (default action), so a shell
//! or a service manager sees what ended it. With nothing to cancel, or at a second signal, it
//! ends by the signal at once. A signal the process was started with ignored (`nohup`, a
//! background job of a script) stays ignored.
//!
//! A closed standard output (`--json-stream` piped into `head`) is taken the same way: the
//! display thread holds `SIGPIPE` blocked, so its failed write does not kill the process
//! mid-transfer, and reports the broken pipe with [`output_closed`]; the process then ends by
//! `SIGPIPE`, as a Unix filter does, once the transfer is cancelled and cleaned up. Everywhere
//! else `SIGPIPE` keeps its default action.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

use pagewire::sender::Canceller;
use signal_hook::consts::{SIGHUP, SIGINT, SIGPIPE, SIGTERM};

/// What a signal cancels.
static CANCELLERS: Mutex<Vec<Canceller>> = Mutex::new(Vec::new());
/// The first signal taken (0: none yet).
static TAKEN: AtomicI32 = AtomicI32::new(0);
/// Setting up something a signal must not interrupt half-way (a RAM image being made): the
/// first signal waits for [`cancels`] instead of ending the process.
static DEFERRING: AtomicBool = AtomicBool::new(false);

/// Starts taking the signals (once, before any transfer starts).
pub(crate) fn install() {
    let wanted: Vec<i32> = [SIGINT, SIGTERM, SIGHUP]
        .into_iter()
        .filter(|&s| !ignored(s))
        .collect();
    let signals = match signal_hook::iterator::Signals::new(&wanted) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(
                "no handler for Ctrl-C/SIGTERM ({e}): a signal ends the process at once"
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("pw-signals".into())
        .spawn(move || {
            let mut signals = signals;
            for signal in signals.forever() {
                on_signal(signal);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no thread for signals ({e}): a signal ends the process at once");
    }
}

fn on_signal(signal: i32) {
    if !take(signal) {
        die_by(signal);
    }
    cancel_all(signal, "interrupted, cancelling (again to quit at once)");
}

/// Standard output's reader has gone (a write failed with `EPIPE`): cancels the transfer as a
/// signal would, so its clean-up runs, and [`taken`] then says `SIGPIPE`. With nothing to
/// cancel the process ends by `SIGPIPE` at once. Once a signal has been taken the cancel is
/// already under way, and this adds nothing.
pub(crate) fn output_closed() {
    if take(SIGPIPE) {
        cancel_all(SIGPIPE, "standard output closed, cancelling");
    }
}

/// Records `signal` as the first one taken; false when one was taken before.
fn take(signal: i32) -> bool {
    TAKEN
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}

/// Cancels what there is to cancel, saying `why`; with nothing to cancel (and nothing being
/// set up), ends the process by `signal`.
fn cancel_all(signal: i32, why: &str) {
    let cancellers = CANCELLERS.lock().unwrap_or_else(|p| p.into_inner());
    if cancellers.is_empty() && !DEFERRING.load(Ordering::SeqCst) {
        die_by(signal);
    }
    eprintln!("pagewire: {why}");
    for c in cancellers.iter() {
        c.cancel();
    }
}

/// Blocks `SIGPIPE` in the calling thread, so a write of its to a closed pipe fails with
/// `EPIPE` instead of ending the process; the signal stays pending on the thread and is
/// discarded when it exits (or delivered by [`die_by`]).
pub(crate) fn hold_sigpipe_here() {
    mask_in_this_thread(libc::SIG_BLOCK, SIGPIPE);
}

/// Blocks (`SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) `signal` in the calling thread's mask.
fn mask_in_this_thread(how: libc::c_int, signal: i32) {
    // SAFETY: an all-zero sigset_t is a valid argument to sigemptyset, which initialises it;
    // sigaddset and pthread_sigmask only read and write the set and this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// From now until [`cancels`], a first signal is held for the transfer instead of ending the
/// process.
pub(crate) fn defer() {
    DEFERRING.store(true, Ordering::SeqCst);
}

/// From now on a signal cancels what `c` cancels (at once, should one have come already).
pub(crate) fn cancels(c: Canceller) {
    let mut cancellers = CANCELLERS.lock().unwrap_or_else(|p| p.into_inner());
    if TAKEN.load(Ordering::SeqCst) != 0 {
        c.cancel();
    }
    cancellers.push(c);
}

/// The signal that cancelled the transfer, if one did: the caller ends by it with
/// [`die_by`] once it has reported.
pub(crate) fn taken() -> Option<i32> {
    match TAKEN.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Ends the process by `signal`, as its default action does (from any thread, one that holds
/// the signal blocked included).
pub(crate) fn die_by(signal: i32) -> ! {
    // SAFETY: resetting a disposition to SIG_DFL has no memory-safety preconditions.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
    }
    mask_in_this_thread(libc::SIG_UNBLOCK, signal);
    // SAFETY: raising a signal has no memory-safety preconditions; the default action of these
    // four signals ends the process.
    unsafe {
        libc::raise(signal);
    }
    std::process::exit(128 + signal)
}

/// True when `signal` is ignored now (inherited so from the parent).
fn ignored(signal: i32) -> bool {
    // SAFETY: all-zero is a valid sigaction (plain integers and a null handler); with a null
    // new action, sigaction only writes the current one into `old`.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above: `old` is a valid, writable sigaction.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) };
    rc == 0 && old.sa_sigaction == libc::SIG_IGN
}
