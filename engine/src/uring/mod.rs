//! The io_uring boundary: ring set-up and probing, the registered header slab, buffer
//! registration, the op table that owns `user_data`, and completion decoding.
//!
//! Everything outside this module sees safe types: an op is pushed with a caller *tag* and
//! buffers named as [`Buf`] (a slab slot or a range of guest memory, both kept alive by the
//! [`Ring`] itself), and comes back as a [`Completion`] with that tag. The ring owns the socket
//! and the `Arc<GuestMemory>` its ops point into, and on drop cancels and drains every op before
//! either can go away, so the kernel never writes into memory that was freed or remapped.
//!
//! Zero-copy sends post two completions: the result (`F_MORE` set when a notification follows)
//! and the notification (`F_NOTIF`), after which the kernel no longer reads the buffer. A slab
//! slot stays *busy* until every op on it has posted its final completion; `slot_mut` asserts it
//! is idle, so a header is never rewritten under the kernel.

use crate::stream::Stream;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use memmap2::MmapMut;

use crate::error::{Error, Result};
use crate::limits::{FRAME_RUNS_MAX, REGISTERED_BUFFERS_MAX, REGISTERED_BUFFER_BYTES_MAX};
use crate::memory::GuestMemory;

mod ring;

/// `IORING_SEND_ZC_REPORT_USAGE`: ask the notification to say whether the kernel copied.
/// (Not exported by the io-uring crate.)
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// Set in a notification's result when the kernel copied instead of sending from our pages.
const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// Iovecs one vectored op may use: a header plus one per run.
const IOVECS_PER_OP_MAX: usize = 1 + FRAME_RUNS_MAX;
/// Vectored ops (sendmsg/recvmsg) in flight at once per ring.
pub(crate) const VECTORED_OPS_MAX: usize = crate::limits::CHAIN_FRAMES_MAX + 2;
/// Ops in flight at once per ring (the op table's size). A zero-copy op holds its entry until its
/// notification, so the worst case is every slot's frame sent as one op per piece, twice (a chain
/// resubmitted after a short send while the first attempt's notifications are still due), plus the
/// control receive.
const OPS_MAX: usize =
    2 * (crate::limits::SHARD_FRAMES_IN_FLIGHT_MAX + 1) * (1 + crate::limits::FRAME_RUNS_MAX) + 16;

/// What the kernel offers, probed once per ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Caps {
    /// `IORING_OP_SEND_ZC` is available.
    pub send_zc: bool,
    /// The ring runs with `SINGLE_ISSUER | DEFER_TASKRUN`.
    pub defer_taskrun: bool,
    /// The header slab is registered as a fixed buffer.
    pub slab_registered: bool,
}

/// A buffer an op reads or writes. Both kinds stay valid for the ring's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buf {
    /// `len` bytes at `offset` in slab slot `slot`.
    Slab { slot: u16, offset: u32, len: u32 },
    /// `len` bytes at byte `offset` of guest region `region`.
    Guest { region: u32, offset: u64, len: u32 },
}

impl Buf {
    fn len(&self) -> u32 {
        match *self {
            Buf::Slab { len, .. } | Buf::Guest { len, .. } => len,
        }
    }
}

/// One completion, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    /// The tag given when the op was pushed.
    pub tag: u64,
    /// Bytes transferred, or a negative errno.
    pub result: i32,
    /// A zero-copy send's result with a notification still to come.
    pub more: bool,
    /// A zero-copy notification (the buffer is free now).
    pub notif: bool,
    /// The notification says the kernel copied the data after all.
    pub zc_copied: bool,
}

#[derive(Debug, Clone, Copy)]
struct OpEntry {
    /// The `user_data` the op was pushed with: its table index, and in the high 32 bits a
    /// generation that changes every time the index is reused, so a completion the kernel posts
    /// late for an op already retired is recognised as stale instead of being taken for the
    /// op that now holds the index.
    user_data: u64,
    tag: u64,
    slot: Option<u16>,
    vectored: Option<u16>,
}

/// Storage a vectored op's kernel-visible `msghdr` and iovecs live in until it completes.
struct VectoredSlot {
    msg: libc::msghdr,
    iov: [libc::iovec; IOVECS_PER_OP_MAX],
}

/// One io_uring with its socket, header slab and guest memory.
pub(crate) struct Ring {
    ring: IoUring,
    caps: Caps,
    socket: Stream,
    memory: Arc<GuestMemory>,
    slab: MmapMut,
    slot_bytes: usize,
    slot_busy: Vec<u16>,
    vectored: Box<[VectoredSlot]>,
    vectored_free: Vec<u16>,
    ops: Vec<Option<OpEntry>>,
    ops_free: Vec<u32>,
    /// Generations handed out per op index (see [`OpEntry::user_data`]).
    ops_generation: Vec<u32>,
    in_flight: usize,
    /// Fixed-buffer index and start address of each ≤1 GiB guest piece, per region.
    guest_fixed: Option<Vec<Vec<(u16, u64)>>>,
}

/// Result of waiting on the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Completions may be ready.
    Ready,
    /// The wait slice passed without a completion.
    TimedOut,
}

fn build_ring(entries: u32) -> Result<(IoUring, bool)> {
    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun();
    match b.build(entries) {
        Ok(r) => Ok((r, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Older kernel without DEFER_TASKRUN (6.1) or SINGLE_ISSUER (6.0): plain ring.
            IoUring::new(entries)
                .map(|r| (r, false))
                .map_err(Error::UringUnavailable)
        }
        Err(e) => Err(Error::UringUnavailable(e)),
    }
}

/// Probes io_uring once, without a socket: `Ok(caps)` or the reason pagewire cannot run here.
pub fn probe() -> Result<Caps> {
    let (ring, defer) = build_ring(8)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| Error::io("probing io_uring opcodes", e))?;
    for (code, name) in [
        (opcode::SendMsg::CODE, "IORING_OP_SENDMSG"),
        (opcode::RecvMsg::CODE, "IORING_OP_RECVMSG"),
        (opcode::Send::CODE, "IORING_OP_SEND"),
        (opcode::Recv::CODE, "IORING_OP_RECV"),
        (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(Error::Unsupported(name));
        }
    }
    // Every wait is bounded (`submit_with_args` with a timeout), which needs it (5.11).
    if !ring.params().is_feature_ext_arg() {
        return Err(Error::Unsupported("IORING_FEAT_EXT_ARG"));
    }
    Ok(Caps {
        send_zc: probe.is_supported(opcode::SendZc::CODE),
        defer_taskrun: defer,
        slab_registered: false,
    })
}

/// One io_uring opcode, setup flag or feature pagewire uses, as this kernel offers it
/// ([`features`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UringFeature {
    /// Its kernel name (`IORING_OP_SEND_ZC`, `IORING_SETUP_DEFER_TASKRUN`, ...).
    pub name: &'static str,
    /// This kernel has it.
    pub available: bool,
    /// What pagewire does with it and without it.
    pub role: &'static str,
}

/// Every io_uring opcode, setup flag and feature the engine relies on, and whether this kernel
/// offers each (what `pagewire-tune probe` lists). An error only where no ring can be made.
pub fn features() -> Result<Vec<UringFeature>> {
    let (ring, defer) = build_ring(8)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| Error::io("probing io_uring opcodes", e))?;
    let op = |code: u8| probe.is_supported(code);
    let params = ring.params();
    let sparse = ring.submitter().register_buffers_sparse(2).is_ok();
    let f = |name, available, role| UringFeature {
        name,
        available,
        role,
    };
    Ok(vec![
        f("IORING_OP_SEND", op(opcode::Send::CODE), "headers and payloads of plain sends; required"),
        f("IORING_OP_SENDMSG", op(opcode::SendMsg::CODE), "a frame's header and runs in one vectored send; required"),
        f("IORING_OP_RECV", op(opcode::Recv::CODE), "control messages and headers; required"),
        f("IORING_OP_RECVMSG", op(opcode::RecvMsg::CODE), "a frame's payload straight into guest pages (MSG_WAITALL); required"),
        f("IORING_OP_ASYNC_CANCEL", op(opcode::AsyncCancel::CODE), "ending a shard's ops on abort; required"),
        f("IORING_OP_SEND_ZC", op(opcode::SendZc::CODE), "zero-copy sends from guest pages where the kernel does not copy anyway; without it, plain sends"),
        f("IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN", defer, "completions run when the shard waits, not in interrupts; without them, a plain ring"),
        f("IORING_FEAT_EXT_ARG", params.is_feature_ext_arg(), "bounded waits (every loop wakes within its slice); required"),
        f("IORING_FEAT_FAST_POLL", params.is_feature_fast_poll(), "a send or receive on a busy socket waits for it in the kernel, not on a worker thread"),
        f("IORING_FEAT_NODROP", params.is_feature_nodrop(), "no completion is lost when the completion queue is full"),
        f("IORING_REGISTER_BUFFERS2 (sparse)", sparse, "the header slab, and guest memory up to 8 GiB where zero-copy is real, as fixed buffers; without it, plain buffers"),
    ])
}

/// What a shard needs of a ring: pushing sends and receives of [`Buf`]s, submitting, waiting,
/// reaping [`Completion`]s, and its slab. The io_uring [`Ring`] implements it, and so does the
/// fault-injecting ring of the `faults` feature ([`crate::faults`]), which the seeded fault runs
/// put between a shard and its real ring.
#[cfg_attr(not(feature = "faults"), allow(dead_code))]
pub(crate) trait RingIo {
    /// Ops whose final completion the shard has not seen.
    fn in_flight(&self) -> usize;
    /// Free submission queue entries.
    fn sq_space(&mut self) -> usize;
    /// Free vectored-op slots.
    fn vectored_space(&self) -> usize;
    /// Free op-table entries.
    fn ops_space(&self) -> usize;
    /// True when no op uses slab slot `slot`.
    fn slot_idle(&self, slot: u16) -> bool;
    /// The bytes of an idle slab slot.
    fn slot_mut(&mut self, slot: u16) -> &mut [u8];
    /// Registers guest memory as fixed buffers.
    fn register_guest_memory(&mut self) -> Result<()>;
    /// See [`Ring::push_send`].
    fn push_send(&mut self, tag: u64, buf: Buf, zero_copy: bool, link: bool, owner: Option<u16>);
    /// See [`Ring::push_sendmsg`].
    fn push_sendmsg(&mut self, tag: u64, bufs: &[Buf], skip: u64, link: bool);
    /// See [`Ring::push_recv`].
    fn push_recv(&mut self, tag: u64, bufs: &[Buf], skip: u64);
    /// See [`Ring::push_recv_some`].
    fn push_recv_some(&mut self, tag: u64, buf: Buf);
    /// Submits and waits up to `slice` for `want` completions.
    fn submit_and_wait(&mut self, want: usize, slice: Duration) -> Result<Wait>;
    /// Submits without waiting.
    fn submit(&mut self) -> Result<()>;
    /// The next completion, if any.
    fn next_completion(&mut self) -> Option<Completion>;
    /// Bytes the kernel has received on the connection (the idle bound's progress measure).
    fn bytes_received(&self) -> u64;
    /// The kernel's delivery-rate sample of the connection.
    fn delivery(&self) -> Option<crate::sys::Delivery>;
    /// Shuts the connection down (both directions).
    fn shutdown(&self);
}

#[cfg_attr(not(feature = "faults"), allow(dead_code))]
impl Buf {
    /// The first `len` bytes of this buffer.
    pub(crate) fn truncated(self, len: u32) -> Buf {
        match self {
            Buf::Slab { slot, offset, .. } => Buf::Slab { slot, offset, len },
            Buf::Guest { region, offset, .. } => Buf::Guest {
                region,
                offset,
                len,
            },
        }
    }

    /// Bytes of the buffer.
    pub(crate) fn bytes(&self) -> u32 {
        self.len()
    }

    /// The slab slot the buffer lies in, if any.
    pub(crate) fn slot(&self) -> Option<u16> {
        match *self {
            Buf::Slab { slot, .. } => Some(slot),
            Buf::Guest { .. } => None,
        }
    }
}

/// `buf` without its first `skip` bytes.
pub(crate) fn advance(buf: Buf, skip: u64) -> Buf {
    match buf {
        Buf::Slab { slot, offset, len } => Buf::Slab {
            slot,
            offset: offset + skip as u32,
            len: len - skip as u32,
        },
        Buf::Guest {
            region,
            offset,
            len,
        } => Buf::Guest {
            region,
            offset: offset + skip,
            len: len - skip as u32,
        },
    }
}

/// Maps a negative completion result to an `io::Error`.
pub(crate) fn errno(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The feature list agrees with the probe the rings use: what a ring requires is there
    /// wherever a ring can run, and the optional ones say what the probe says.
    #[test]
    fn the_feature_list_agrees_with_the_probe() {
        let Ok(caps) = probe() else {
            eprintln!("SKIPPED: io_uring is not usable here");
            return;
        };
        let list = features().unwrap();
        let has = |name: &str| list.iter().find(|f| f.name == name).map(|f| f.available);
        for f in list.iter().filter(|f| f.role.ends_with("required")) {
            assert!(f.available, "{} is required, and a ring runs here", f.name);
        }
        assert_eq!(has("IORING_OP_SEND_ZC"), Some(caps.send_zc));
        assert_eq!(
            has("IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN"),
            Some(caps.defer_taskrun)
        );
    }
}
