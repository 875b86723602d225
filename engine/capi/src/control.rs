//! Controls: a [`pw_control`], taken from a sender or receiver before it runs, is the one
//! handle another thread may use meanwhile: cancel, change the bandwidth limit, read the
//! progress counters and a live migration's `query-migrate`-like [`pw_migration_info`]. This is
//! what a VMM's management thread (QMP's `migrate_cancel`, `migrate-set-parameters
//! max-bandwidth`, `query-migrate`) needs.

use pw::live::MigrationHandle;
use pw::sender::{BandwidthLimit, Canceller};
use pw::Progress;

use super::live::{lock, MigrationSlot};
use super::*;

/// A handle another thread may use while a sender, receiver or live migration runs (see
/// [`pw_sender_control`], [`pw_receiver_control`]). Every `pw_control_*` call but
/// [`pw_control_free`] may come from any thread, at the same time as others, also after the
/// transfer ended (when it changes nothing); free it once no thread uses it any more.
pub struct pw_control {
    canceller: Canceller,
    progress: Arc<Progress>,
    /// A sender's bandwidth limit and live migration; `None` on a receiver.
    sender: Option<(BandwidthLimit, MigrationSlot)>,
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
            progress: s.progress(),
            sender: Some((s.bandwidth_limit(), handle.migration.clone())),
        };
        // SAFETY: valid (caller).
        unsafe { put(out, control) }
    })
}

/// A control for `receiver` (take it before [`pw_receiver_run`]): cancel and progress.
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
            progress: r.progress(),
            sender: None,
        };
        // SAFETY: valid (caller).
        unsafe { put(out, control) }
    })
}

/// # Safety
/// `control` null or from `pw_sender_control` / `pw_receiver_control`, not freed.
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
/// `control` from [`pw_sender_control`] or [`pw_receiver_control`], not freed.
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
/// `control` from [`pw_sender_control`], not freed.
#[no_mangle]
pub unsafe extern "C" fn pw_control_set_max_bandwidth(
    control: *const pw_control,
    bytes_per_s: u64,
) -> pw_status {
    guard(|| {
        // SAFETY: as the caller promises.
        let (limit, _) = unsafe { self::control(control) }?
            .sender
            .as_ref()
            .ok_or_else(|| invalid("a receiver has no bandwidth limit (set it on the sender)"))?;
        limit.set((bytes_per_s > 0).then_some(bytes_per_s));
        Ok(())
    })
}

/// Writes the progress counters to `out`.
///
/// # Safety
/// `control` from [`pw_sender_control`] or [`pw_receiver_control`], not freed; `out` valid for
/// a write.
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
        let p = pw_progress {
            pages_done: c.progress.pages_done.load(Relaxed),
            pages_total: c.progress.pages_total.load(Relaxed),
            transferred_bytes: c.progress.wire_bytes.load(Relaxed),
        };
        // SAFETY: non-null and valid for a write (caller).
        unsafe { out.write(p) };
        Ok(())
    })
}

/// Writes where the sender's live migration stands (`query-migrate`) to `out`; fails with
/// `PW_STATUS_INVALID` before [`pw_sender_migrate`] started one, or on a receiver's control.
///
/// # Safety
/// `control` from [`pw_sender_control`], not freed; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pw_control_migration(
    control: *const pw_control,
    out: *mut pw_migration_info,
) -> pw_status {
    guard(|| {
        // SAFETY: as the caller promises.
        let (_, slot) = unsafe { self::control(control) }?
            .sender
            .as_ref()
            .ok_or_else(|| invalid("a receiver runs no migration (ask the sender's control)"))?;
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

/// Frees a control (the transfer it controls goes on).
///
/// # Safety
/// `control` is null or from [`pw_sender_control`] / [`pw_receiver_control`], not freed
/// before, and no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn pw_control_free(control: *mut pw_control) {
    if !control.is_null() {
        // SAFETY: from Box::into_raw, freed once (caller).
        crate::free_quietly(unsafe { Box::from_raw(control) });
    }
}
