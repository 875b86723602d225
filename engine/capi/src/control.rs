//! Controls: a [`pw_control`], taken from a sender or receiver before it runs, or made before
//! a sender connects ([`pw_control_new`]), is the one handle another thread may use meanwhile:
//! cancel, change the bandwidth limit, read the progress counters and a live migration's
//! `query-migrate`-like [`pw_migration_info`] (the source's) or [`pw_receiver_info`] (the
//! destination's). This is what a VMM's management thread (QMP's `migrate_cancel`,
//! `migrate-set-parameters max-bandwidth`, `query-migrate`) needs.

use std::sync::atomic::{AtomicBool, Ordering::AcqRel};
use std::sync::OnceLock;

use pw::live::MigrationHandle;
use pw::receiver::{ReceiverHandle, ReceiverSnapshot};
use pw::sender::{BandwidthLimit, Canceller};
use pw::Progress;

use super::live::{lock, pw_migration_status, MigrationSlot};
use super::*;

/// A handle another thread may use while a sender, receiver or live migration runs (see
/// [`pw_sender_control`], [`pw_receiver_control`], [`pw_control_new`]). Every `pw_control_*`
/// call but [`pw_control_free`] may come from any thread, at the same time as others, also
/// after the transfer ended (when it changes nothing); free it once no thread uses it any more.
pub struct pw_control {
    canceller: Canceller,
    side: Side,
    /// Whether a connect took this control already (one sender per control, also when that
    /// connect failed or was cancelled).
    claimed: AtomicBool,
}

enum Side {
    /// A receiver's handle (progress and snapshots).
    Receiver(ReceiverHandle),
    /// A sender's handles, set once it is connected (at once for [`pw_sender_control`]'s).
    /// Shared with the connect that claimed the control, which sets them without touching the
    /// control itself: a VMM may free it as soon as its cancel returned, even while a connect
    /// that had just succeeded is still handing its sender out.
    Sender(Arc<OnceLock<SenderHandles>>),
}

/// What a connect takes from the control in its `pw_options`, before it blocks.
pub(crate) struct Claim {
    /// The sender's canceller ([`pw::SenderConfig::canceller`]).
    pub(crate) canceller: Canceller,
    handles: Arc<OnceLock<SenderHandles>>,
}

impl Claim {
    /// Binds the control to the sender that connected with it.
    pub(crate) fn attach(self, handle: &pw_sender) {
        if let Some(sender) = handle.sender.as_ref() {
            // One connect claims a control, so this is the first and only sender.
            let _ = self.handles.set(SenderHandles::of(handle, sender));
        }
    }
}

struct SenderHandles {
    progress: Arc<Progress>,
    limit: BandwidthLimit,
    migration: MigrationSlot,
}

impl SenderHandles {
    fn of(handle: &pw_sender, sender: &Sender) -> Self {
        SenderHandles {
            progress: sender.progress(),
            limit: sender.bandwidth_limit(),
            migration: handle.migration.clone(),
        }
    }
}

impl pw_control {
    /// Claims the control for the connect whose `pw_options` hold it: one connect per control.
    pub(crate) fn claim(&self) -> Result<Claim, Error> {
        match &self.side {
            Side::Sender(handles) if handles.get().is_some() => Err(invalid(
                "pw_options.control belongs to a connected sender already: make one per sender with pw_control_new",
            )),
            Side::Sender(handles) if !self.claimed.swap(true, AcqRel) => Ok(Claim {
                canceller: self.canceller.clone(),
                handles: handles.clone(),
            }),
            Side::Sender(_) => Err(invalid(
                "pw_options.control was given to a connect before: make one per sender with pw_control_new",
            )),
            Side::Receiver(_) => Err(invalid(
                "pw_options.control is a receiver's control: make a sender's with pw_control_new",
            )),
        }
    }

    fn progress(&self) -> Option<&Progress> {
        match &self.side {
            Side::Receiver(r) => Some(r.progress()),
            Side::Sender(handles) => handles.get().map(|h| &*h.progress),
        }
    }

    fn sender(&self) -> Result<&SenderHandles, Error> {
        match &self.side {
            Side::Sender(handles) => handles.get().ok_or_else(|| {
                invalid("the sender of this control is not connected yet (pw_sender_connect has not returned)")
            }),
            Side::Receiver(_) => Err(invalid(
                "a receiver has no bandwidth limit and runs no migration (use the sender's control)",
            )),
        }
    }
}

/// A control for a sender not connected yet: put it in the `control` field of the
/// [`pw_options`] given to [`pw_sender_connect`] (or [`pw_sender_over_fds`]), and a
/// [`pw_control_cancel`] from another thread ends the connect and the handshakes too, which
/// against a receiver that never answers (or a host that drops the connection attempts) wait
/// up to 10 s: the connect returns `PW_STATUS_CANCELLED` within a few tens of milliseconds.
/// Once the sender is connected, the control works as one from [`pw_sender_control`]; before,
/// its progress is zero and the bandwidth limit and migration calls fail with
/// `PW_STATUS_INVALID`. One sender per control: a second connect with it is refused, also
/// after the first failed or was cancelled.
///
/// # Safety
/// `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pw_control_new(out: *mut *mut pw_control) -> pw_status {
    guard(|| {
        let control = pw_control {
            canceller: Canceller::new(),
            side: Side::Sender(Arc::default()),
            claimed: AtomicBool::new(false),
        };
        // SAFETY: valid (caller).
        unsafe { put(out, control) }
    })
}

/// Progress counters of a running transfer, updated as it goes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct pw_progress {
    /// Pages sent (sender) or placed (receiver) so far, over all rounds.
    pub pages_done: u64,
    /// Pages queued so far (a sender's rounds add theirs as they start).
    pub pages_total: u64,
    /// Bytes put on (or taken off) the wire so far.
    pub transferred_bytes: u64,
}

/// A control for `sender` (take it before handing the sender to another thread or starting
/// [`pw_sender_migrate`]).
///
/// # Safety
/// `sender` from [`pw_sender_connect`] (or [`pw_sender_over_fds`]), not in use on another
/// thread; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pw_sender_control(
    sender: *const pw_sender,
    out: *mut *mut pw_control,
) -> pw_status {
    guard(|| {
        if sender.is_null() {
            return Err(invalid("sender is a null pointer"));
        }
        // SAFETY: valid (caller).
        let handle = unsafe { &*sender };
        let s = handle
            .sender
            .as_ref()
            .ok_or_else(|| invalid("the sender already finished"))?;
        let control = pw_control {
            canceller: s.canceller(),
            side: Side::Sender(Arc::new(OnceLock::from(SenderHandles::of(handle, s)))),
            claimed: AtomicBool::new(true),
        };
        // SAFETY: valid (caller).
        unsafe { put(out, control) }
    })
}

/// A control for `receiver` (take it before [`pw_receiver_run`]): cancel, progress, and where
/// the transfer stands ([`pw_control_receiver`]).
///
/// # Safety
/// `receiver` from [`pw_receiver_bind`] (or [`pw_receiver_over_fds`]), not in use on another
/// thread; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_control(
    receiver: *const pw_receiver,
    out: *mut *mut pw_control,
) -> pw_status {
    guard(|| {
        if receiver.is_null() {
            return Err(invalid("receiver is a null pointer"));
        }
        // SAFETY: valid (caller).
        let r = unsafe { &*receiver }
            .receiver
            .as_ref()
            .ok_or_else(|| invalid("the receiver already ran"))?;
        let control = pw_control {
            canceller: r.canceller(),
            side: Side::Receiver(r.handle()),
            claimed: AtomicBool::new(true),
        };
        // SAFETY: valid (caller).
        unsafe { put(out, control) }
    })
}

/// # Safety
/// `control` null or from `pw_sender_control` / `pw_receiver_control` / `pw_control_new`, not
/// freed.
unsafe fn control<'a>(control: *const pw_control) -> Result<&'a pw_control, Error> {
    // SAFETY: null or valid (caller).
    unsafe { control.as_ref() }.ok_or_else(|| invalid("control is a null pointer"))
}

/// Cancels the transfer or migration: within about 100 ms both sides stop, the peer is told,
/// and the blocked call returns `PW_STATUS_CANCELLED` (the other side `PW_STATUS_PEER`, saying
/// it was cancelled). A guest already paused stays paused: resuming it is the VMM's call. A
/// cancel before the policy chose to stop never pauses the guest. One that comes once the
/// sender has handed over the end of the stream (every page and the device state), or once
/// the receiver confirmed it holds everything, is too late: the sender waits for the
/// receiver's answer, and both sides return `PW_STATUS_OK`.
///
/// # Safety
/// `control` from [`pw_sender_control`], [`pw_receiver_control`] or [`pw_control_new`], not
/// freed.
#[no_mangle]
pub unsafe extern "C" fn pw_control_cancel(control: *const pw_control) -> pw_status {
    guard(|| {
        // SAFETY: as the caller promises.
        unsafe { self::control(control) }?.canceller.cancel();
        Ok(())
    })
}

/// Changes a sender's bandwidth limit, in wire bytes per second for all its channels together
/// (QEMU's `max-bandwidth`; 0 lifts it). It applies within the shards' next chain of sends.
///
/// # Safety
/// `control` from [`pw_sender_control`] or [`pw_control_new`], not freed.
#[no_mangle]
pub unsafe extern "C" fn pw_control_set_max_bandwidth(
    control: *const pw_control,
    bytes_per_s: u64,
) -> pw_status {
    guard(|| {
        // SAFETY: as the caller promises.
        let limit = &unsafe { self::control(control) }?.sender()?.limit;
        limit.set((bytes_per_s > 0).then_some(bytes_per_s));
        Ok(())
    })
}

/// Writes the progress counters to `out` (zeros while a control from [`pw_control_new`] waits
/// for its sender to connect).
///
/// # Safety
/// `control` from [`pw_sender_control`], [`pw_receiver_control`] or [`pw_control_new`], not
/// freed; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pw_control_progress(
    control: *const pw_control,
    out: *mut pw_progress,
) -> pw_status {
    use std::sync::atomic::Ordering::Relaxed;
    guard(|| {
        // SAFETY: as the caller promises.
        let c = unsafe { self::control(control) }?;
        if out.is_null() {
            return Err(invalid("out is a null pointer"));
        }
        let p = c
            .progress()
            .map_or_else(pw_progress::default, |p| pw_progress {
                pages_done: p.pages_done.load(Relaxed),
                pages_total: p.pages_total.load(Relaxed),
                transferred_bytes: p.wire_bytes.load(Relaxed),
            });
        // SAFETY: non-null and valid for a write (caller).
        unsafe { out.write(p) };
        Ok(())
    })
}

/// Writes where the sender's live migration stands (`query-migrate`) to `out`; fails with
/// `PW_STATUS_INVALID` before [`pw_sender_migrate`] started one, or on a receiver's control.
///
/// # Safety
/// `control` from [`pw_sender_control`] or [`pw_control_new`], not freed; `out` valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn pw_control_migration(
    control: *const pw_control,
    out: *mut pw_migration_info,
) -> pw_status {
    guard(|| {
        // SAFETY: as the caller promises.
        let slot = &unsafe { self::control(control) }?.sender()?.migration;
        if out.is_null() {
            return Err(invalid("out is a null pointer"));
        }
        let snapshot = lock(slot)
            .as_ref()
            .map(MigrationHandle::snapshot)
            .ok_or_else(|| invalid("no migration has started on this sender"))?;
        // SAFETY: non-null and valid for a write (caller).
        unsafe { out.write(pw_migration_info::of(&snapshot)) };
        Ok(())
    })
}

/// A moment of a receiver (the destination's `query-migrate`, with more than QEMU's
/// destination fills in); the names in parentheses are QEMU's fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pw_receiver_info {
    /// Where it stands (`status`): `SETUP` while it waits for a sender and gathers its
    /// channels, `ACTIVE` while pages arrive, `DEVICE` once the device state is arriving (the
    /// source's guest is paused by then), then `COMPLETED` (every page placed and verified),
    /// `FAILED` (the sender's failure or cancel included) or `CANCELLED` (cancelled here).
    pub status: pw_migration_status,
    /// Milliseconds from the sender's first channel joining until all were gathered and the
    /// shards started (`setup-time`).
    pub setup_ms: f64,
    /// Milliseconds since the sender's first channel joined, once all of its channels were
    /// gathered; 0 before (`total-time`).
    pub total_time_ms: f64,
    /// Bytes taken off the wire so far (`ram.transferred`).
    pub transferred_bytes: u64,
    /// Of `transferred_bytes`, the device state's.
    pub device_state_bytes: u64,
    /// Pages placed so far, over all rounds.
    pub pages_placed: u64,
    /// Pages of the destination (`ram.total`, in pages; 0 until known).
    pub memory_pages: u64,
    /// Rounds every channel has ended so far.
    pub rounds: u32,
    /// Megabits per second over the transfer so far (`ram.mbps`).
    pub mbps: f64,
}

impl pw_receiver_info {
    fn of(s: &ReceiverSnapshot) -> Self {
        pw_receiver_info {
            status: s.status.into(),
            setup_ms: s.setup_ms,
            total_time_ms: s.total_time_ms,
            transferred_bytes: s.transferred,
            device_state_bytes: s.device_state_bytes,
            pages_placed: s.pages_placed,
            memory_pages: s.memory_pages,
            rounds: s.rounds,
            mbps: s.mbps,
        }
    }
}

/// Writes where the receiver stands to `out`, also after [`pw_receiver_run`] returned (its
/// final figures); fails with `PW_STATUS_INVALID` on a sender's control.
///
/// # Safety
/// `control` from [`pw_receiver_control`], not freed; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pw_control_receiver(
    control: *const pw_control,
    out: *mut pw_receiver_info,
) -> pw_status {
    guard(|| {
        // SAFETY: as the caller promises.
        let Side::Receiver(handle) = &unsafe { self::control(control) }?.side else {
            return Err(invalid(
                "a sender's control: pw_control_migration tells where its migration stands",
            ));
        };
        if out.is_null() {
            return Err(invalid("out is a null pointer"));
        }
        let info = pw_receiver_info::of(&handle.snapshot());
        // SAFETY: non-null and valid for a write (caller).
        unsafe { out.write(info) };
        Ok(())
    })
}

/// Frees a control (the transfer it controls goes on).
///
/// # Safety
/// `control` is null or from [`pw_sender_control`] / [`pw_receiver_control`] /
/// [`pw_control_new`], not freed before, and no other thread is using it (one in a
/// `pw_options` may be freed once the connect returned).
#[no_mangle]
pub unsafe extern "C" fn pw_control_free(control: *mut pw_control) {
    if !control.is_null() {
        // SAFETY: from Box::into_raw, freed once (caller).
        crate::free_quietly(unsafe { Box::from_raw(control) });
    }
}
