//! The destination side: bind (or take handed-in connections), run one transfer, then the
//! device state blobs and the statistics.

use super::*;

/// Hands `receiver` out through `out`.
///
/// # Safety
/// `out` is null or valid for a write.
pub(crate) unsafe fn put_receiver(
    out: *mut *mut pw_receiver,
    receiver: Receiver,
) -> Result<(), Error> {
    let device_state = receiver.device_state();
    let r = pw_receiver {
        receiver: Some(receiver),
        device_state,
        blobs: Vec::new(),
        stats: None,
    };
    // SAFETY: as the caller promises.
    unsafe { put(out, r) }
}

/// Binds a receiver for one transfer into `memory` on `addr` (e.g. "127.0.0.1:0").
///
/// # Safety
/// `addr` is NUL-terminated; `memory` from [`pw_memory_new`]; `opts` null or valid; `out`
/// valid.
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_bind(
    addr: *const c_char,
    memory: *const pw_memory,
    opts: *const pw_options,
    out: *mut *mut pw_receiver,
) -> pw_status {
    guard(|| {
        // SAFETY: NUL-terminated (caller).
        let addr = unsafe { text(addr, "addr") }?;
        // SAFETY: from pw_memory_new, and null or valid (caller).
        let (memory, config) = unsafe { (memory_of(memory)?, receiver_config(opts)?) };
        let receiver = Receiver::bind(addr, memory, config)?;
        // SAFETY: valid (caller).
        unsafe { put_receiver(out, receiver) }
    })
}

/// The port a receiver listens on (useful after binding port 0).
///
/// # Safety
/// `receiver` from [`pw_receiver_bind`]; `port` valid.
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_port(
    receiver: *const pw_receiver,
    port: *mut u16,
) -> pw_status {
    guard(|| {
        if receiver.is_null() || port.is_null() {
            return Err(invalid("a null pointer"));
        }
        // SAFETY: valid (caller).
        let r = unsafe { &*receiver };
        let bound = r
            .receiver
            .as_ref()
            .ok_or_else(|| invalid("the receiver already ran"))?
            .local_addr()?;
        // SAFETY: valid (caller).
        unsafe { *port = bound.port() };
        Ok(())
    })
}

/// Receives one transfer: blocks until the sender finished (success: every page placed and
/// verified) or the transfer failed. Once only.
///
/// # Safety
/// `receiver` from [`pw_receiver_bind`], used by one thread at a time.
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_run(receiver: *mut pw_receiver) -> pw_status {
    guard(|| {
        if receiver.is_null() {
            return Err(invalid("receiver is a null pointer"));
        }
        // SAFETY: valid, one thread (caller).
        let r = unsafe { &mut *receiver };
        let receiver = r
            .receiver
            .take()
            .ok_or_else(|| invalid("the receiver already ran"))?;
        let stats = receiver.run()?;
        r.blobs = r.device_state.take();
        r.stats = Some(pw_stats::from(&stats));
        Ok(())
    })
}

/// Device state blobs the transfer carried (after [`pw_receiver_run`] succeeded).
///
/// # Safety
/// `receiver` from [`pw_receiver_bind`].
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_blob_count(receiver: *const pw_receiver) -> usize {
    if receiver.is_null() {
        return 0;
    }
    // SAFETY: valid (caller).
    unsafe { &*receiver }.blobs.len()
}

/// Blob `index`: its tag, and its bytes (owned by the receiver, valid until it is freed).
///
/// # Safety
/// `receiver` from [`pw_receiver_bind`]; the output pointers valid.
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_blob(
    receiver: *const pw_receiver,
    index: usize,
    tag: *mut u32,
    bytes: *mut *const u8,
    len: *mut usize,
) -> pw_status {
    guard(|| {
        if receiver.is_null() || tag.is_null() || bytes.is_null() || len.is_null() {
            return Err(invalid("a null pointer"));
        }
        // SAFETY: valid (caller).
        let r = unsafe { &*receiver };
        let b = r
            .blobs
            .get(index)
            .ok_or_else(|| invalid(&format!("no blob {index} ({} arrived)", r.blobs.len())))?;
        // SAFETY: valid outputs (caller).
        unsafe {
            *tag = b.tag;
            *bytes = b.bytes.as_ptr();
            *len = b.bytes.len();
        }
        Ok(())
    })
}

/// Frees a receiver (and its blobs).
///
/// # Safety
/// `receiver` is null or from [`pw_receiver_bind`], not freed before, and no call on it runs
/// on another thread: to stop a `pw_receiver_run` in progress, cancel it through its
/// `pw_control`, wait for it to return, then free.
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_free(receiver: *mut pw_receiver) {
    if !receiver.is_null() {
        // SAFETY: from Box::into_raw, freed once (caller).
        crate::free_quietly(unsafe { Box::from_raw(receiver) });
    }
}

/// Like [`pw_receiver_bind`], over `count` connections the caller already accepted (TCP or
/// UNIX stream sockets). The library takes the descriptors over, on failure too, and closes
/// them when the receiver is freed.
///
/// # Safety
/// `fds` points to `count` open, connected TCP or UNIX stream sockets the caller gives up,
/// each named once (a descriptor named twice is refused, and closed once); `memory` from [`pw_memory_new`]; `opts` null or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_over_fds(
    fds: *const i32,
    count: usize,
    memory: *const pw_memory,
    opts: *const pw_options,
    out: *mut *mut pw_receiver,
) -> pw_status {
    guard(|| {
        // SAFETY: as the caller promises.
        let streams = unsafe { streams(fds, count) }?;
        // SAFETY: from pw_memory_new, and null or valid (caller).
        let (memory, config) = unsafe { (memory_of(memory)?, receiver_config(opts)?) };
        let receiver = Receiver::over_streams(streams, memory, config)?;
        // SAFETY: valid (caller).
        unsafe { put_receiver(out, receiver) }
    })
}

/// Writes the receiver's statistics to `out`, once [`pw_receiver_run`] succeeded.
///
/// # Safety
/// `receiver` from [`pw_receiver_bind`] (or [`pw_receiver_over_fds`]); `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pw_receiver_stats(
    receiver: *const pw_receiver,
    out: *mut pw_stats,
) -> pw_status {
    guard(|| {
        if receiver.is_null() {
            return Err(invalid("receiver is a null pointer"));
        }
        // SAFETY: valid (caller).
        let stats = unsafe { &*receiver }.stats;
        // SAFETY: `out` null or valid for a write (caller).
        unsafe { write_stats(stats, out, "the receiver has not run to success") }
    })
}
