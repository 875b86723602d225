//! SIGBUS on file-backed guest memory becomes an error, never a dead process.
//!
//! A shared file mapping raises SIGBUS when a page cannot be backed: the file was truncated
//! under us, a sparse file's filesystem is full, a huge-page pool is empty, a disk failed. The
//! kernel's own copies into such a mapping (a socket receive) fail with `EFAULT` instead, but the
//! shards also copy in user space (TLS plaintext, decoded payloads, zero pages) and the zero
//! scanner reads through raw pointers. So every file-backed region is *guarded*: a process-wide
//! SIGBUS handler that finds the faulting address inside a guarded region maps an anonymous page
//! over it (`MAP_FIXED`), records the fault, and returns, so the faulting instruction completes
//! on a page of no consequence. The shard checks [`take_fault`] after each frame and fails the
//! transfer with an error naming the region and offset, which also tells the peer why. A fault
//! outside every guarded region is not ours: the previous handler runs (or the default action,
//! which ends the process as before).
//!
//! The registry is a fixed array of atomics, so the handler reads it without locks or
//! allocation (async-signal-safe); the handler only calls `mmap` and `sigaction`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Guarded ranges at once (a handful per GuestMemory; file-backed memories are few).
const GUARDED_RANGES_MAX: usize = 256;

struct Guarded {
    start: AtomicUsize,
    len: AtomicUsize,
    /// Faulting address + 1 of the first fault in this range (0: none).
    fault: AtomicUsize,
    used: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Guarded = Guarded {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    fault: AtomicUsize::new(0),
    used: AtomicBool::new(false),
};

static RANGES: [Guarded; GUARDED_RANGES_MAX] = [EMPTY; GUARDED_RANGES_MAX];
static INSTALL: Once = Once::new();
/// The handler that was installed before ours (`sa_sigaction` as an address; 0 = SIG_DFL).
static PREVIOUS: AtomicUsize = AtomicUsize::new(0);
static PREVIOUS_FLAGS: AtomicUsize = AtomicUsize::new(0);

/// A registered range; unregisters on drop.
#[derive(Debug)]
pub(crate) struct Guard {
    slot: usize,
}

/// Guards `len` bytes at `start`. `None` when every slot is taken (the region then works
/// unguarded, as before: a fault ends the process).
pub(crate) fn guard(start: *mut u8, len: usize) -> Option<Guard> {
    INSTALL.call_once(install);
    for (slot, r) in RANGES.iter().enumerate() {
        if r.used
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            r.fault.store(0, Ordering::Relaxed);
            r.len.store(len, Ordering::Relaxed);
            r.start.store(start as usize, Ordering::Release);
            return Some(Guard { slot });
        }
    }
    tracing::warn!("too many guarded memory regions: this one is not protected from SIGBUS");
    None
}

impl Guard {
    /// The offset (from the range's start) of the first fault since the last call, if any.
    pub(crate) fn take_fault(&self) -> Option<usize> {
        let r = &RANGES[self.slot];
        match r.fault.swap(0, Ordering::AcqRel) {
            0 => None,
            addr => Some(addr - 1 - r.start.load(Ordering::Relaxed)),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let r = &RANGES[self.slot];
        r.start.store(0, Ordering::Release);
        r.len.store(0, Ordering::Release);
        r.used.store(false, Ordering::Release);
    }
}

fn install() {
    // SAFETY: a zeroed sigaction is a valid value to fill; `handler` has the SA_SIGINFO
    // signature; `old` receives the previous disposition.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut old) == 0 {
            PREVIOUS.store(old.sa_sigaction, Ordering::Release);
            PREVIOUS_FLAGS.store(old.sa_flags as usize, Ordering::Release);
        }
    }
}

/// True when SIGBUS has the default disposition now.
fn default_now() -> bool {
    // SAFETY: queries only (a null new action); `old` is a valid place for the answer.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_DFL
    }
}

extern "C" fn handler(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    // Sent by a process (kill, sigqueue, tkill: si_code <= 0), not raised by a fault: its
    // address means nothing, and nothing re-executes to end the process below.
    let sent = code <= 0;
    for r in RANGES.iter().filter(|_| !sent) {
        let start = r.start.load(Ordering::Acquire);
        let len = r.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= start + len {
            continue;
        }
        // Replace the page (or, in a huge-page mapping, the 2 MiB page) under the fault with
        // anonymous memory, so the faulting access completes harmlessly.
        for size in [4096usize, 2 << 20] {
            let page = addr & !(size - 1);
            // Never over a neighbour: the 2 MiB page must lie inside the guarded range too.
            if page < start || page + size > start + len {
                continue;
            }
            // SAFETY: `page..page + size` lies in a mapping this process made and guards; its
            // transfer is being failed (recorded below) and nobody reads the new page as data.
            let mapped = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                let _ = r
                    .fault
                    .compare_exchange(0, addr + 1, Ordering::AcqRel, Ordering::Relaxed);
                return;
            }
        }
        break;
    }
    // Not ours (or unrecoverable): the previous handler, or the default action.
    let previous = PREVIOUS.load(Ordering::Acquire);
    if previous != libc::SIG_DFL && previous != libc::SIG_IGN {
        if PREVIOUS_FLAGS.load(Ordering::Acquire) & libc::SA_SIGINFO as usize != 0 {
            type SigInfoHandler =
                extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
            // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this
            // signature; we pass the arguments we were given.
            let f: SigInfoHandler = unsafe { std::mem::transmute(previous) };
            f(signal, info, context);
        } else {
            // SAFETY: a plain handler takes the signal number.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous) };
            f(signal);
        }
        // Rust's own handler (stack overflows) restores the default and returns, as for a
        // fault, which re-executes: a sent signal then needs raising again to take effect.
        if sent && default_now() {
            // SAFETY: raise is async-signal-safe; SIGBUS is blocked until we return.
            unsafe { libc::raise(libc::SIGBUS) };
        }
        return;
    }
    if sent && previous == libc::SIG_IGN {
        // Ignored before pagewire: a sent one still is (a fault cannot be, below).
        return;
    }
    // A sent signal is raised again, to take the default action once this handler returns
    // (SIGBUS is blocked in it); a fault's access re-executes and ends the process.
    // SAFETY: restoring the default disposition, as the process had it without pagewire.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        if sent {
            libc::raise(libc::SIGBUS);
        }
    }
}
