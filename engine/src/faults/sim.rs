//! The simulated transport: a `SimRing` implements the shards' ring interface (`RingIo`)
//! over an in-memory link instead of io_uring and a socket, so the seeded runs of
//! [`super::run_seed`] drive the real shards and their channel machines without the kernel's
//! network stack: every byte a sender shard sends is what its receiver shard reads, in order,
//! through a bounded pipe per direction.
//!
//! What it keeps of the kernel's behaviour, because the shards rely on it:
//! - sends complete in submission order, each whole (`MSG_WAITALL`) or failed; a failed op
//!   cancels the ops linked after it (`-ECANCELED`);
//! - a zero-copy send completes twice: its result (`more`), then a notification that says the
//!   data was copied (as loopback does), and its slab slot stays busy until the notification;
//! - a `MSG_WAITALL` receive completes when its buffers are full or the stream ended; a plain
//!   receive completes with whatever is there (at least a byte) or the end;
//! - a pipe holds at most [`PIPE_BYTES_MAX`] (a socket buffer): a sender ahead of its receiver
//!   waits;
//! - closing one end (drop, or `RingIo::shutdown`, which the fault ring uses for resets) ends
//!   the other's stream: its receives see the end, its sends fail with `EPIPE`.
//!
//! The handshake still runs over the real loopback connection; both ends of it find their
//! link in a registry keyed by the connection's two addresses, and the connection itself
//! carries nothing after the handshake. Faults come from the `FaultRing` (`ring.rs`) on top.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use crate::stream::Stream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::uring::{Buf, Completion, RingIo, Wait, VECTORED_OPS_MAX};

/// Bytes one direction of a link holds before a sender waits (a loopback socket buffer's order).
pub const PIPE_BYTES_MAX: usize = 4 << 20;
/// Ops a simulated ring holds at once (as many as the real ring's table allows).
const OPS_MAX: usize = 2048;
/// Longest a waiting shard sleeps before it looks at the link again.
const POLL_SLICE_MS: u64 = 2;

/// One direction of a link.
#[derive(Debug, Default)]
struct Pipe {
    bytes: VecDeque<u8>,
    /// Bytes ever written into this pipe (the reader's "bytes received").
    written: u64,
    /// The writing end is closed: once drained, the reader sees the end of the stream.
    closed: bool,
    /// The reading end is gone: writes fail.
    reader_gone: bool,
}

/// Both directions of one connection: `pipes[0]` carries the connecting side's bytes.
#[derive(Debug, Default)]
struct Link {
    pipes: Mutex<[Pipe; 2]>,
    changed: Condvar,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, [Pipe; 2]> {
        // A panicking shard poisons nothing the other side cannot read on.
        self.pipes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type LinkKey = (SocketAddr, SocketAddr);

/// Links waiting for their second end, by (connecting side's address, accepting side's).
fn registry() -> &'static Mutex<HashMap<LinkKey, Arc<Link>>> {
    static LINKS: OnceLock<Mutex<HashMap<LinkKey, Arc<Link>>>> = OnceLock::new();
    LINKS.get_or_init(Default::default)
}

/// The link of `socket`'s connection, and which end of it this side is (0: the connecting side).
fn link_of(socket: &Stream, connecting: bool) -> Result<(Arc<Link>, usize)> {
    let socket = socket
        .tcp()
        .ok_or_else(|| Error::Config("the simulated transport runs over TCP loopback".into()))?;
    let (local, peer) = (
        socket
            .local_addr()
            .map_err(|e| Error::io("reading a socket address", e))?,
        socket
            .peer_addr()
            .map_err(|e| Error::io("reading a socket address", e))?,
    );
    let key = if connecting {
        (local, peer)
    } else {
        (peer, local)
    };
    let mut links = registry().lock().unwrap_or_else(|p| p.into_inner());
    let link = match links.remove(&key) {
        Some(link) => link,
        None => {
            let link = Arc::new(Link::default());
            links.insert(key, link.clone());
            live()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, Arc::downgrade(&link));
            link
        }
    };
    Ok((link, usize::from(!connecting)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send { zero_copy: bool },
    Recv { wait_all: bool },
}

#[derive(Debug)]
struct Op {
    tag: u64,
    kind: Kind,
    bufs: Vec<Buf>,
    total: u64,
    done: u64,
    link: bool,
    slot: Option<u16>,
    vectored: bool,
}

/// A ring over a simulated link (see the module docs).
pub(crate) struct SimRing {
    link: Arc<Link>,
    /// This end's index: it writes `pipes[end]` and reads `pipes[1 - end]`.
    end: usize,
    memory: Arc<GuestMemory>,
    slab: Vec<u8>,
    slot_bytes: usize,
    sends: VecDeque<Op>,
    recvs: VecDeque<Op>,
    /// A linked send failed: the sends linked after it are cancelled.
    cancel_linked: bool,
    ready: VecDeque<(Completion, Option<u16>)>,
    /// Zero-copy sends whose notification is still to come (slot, tag).
    notifs: VecDeque<(u64, Option<u16>)>,
    in_flight: usize,
    vectored: usize,
    slot_busy: Vec<u16>,
    /// The bytes of the send at the front of the queue (staged once, written as room allows).
    staged: Vec<u8>,
    /// Bytes taken from the link for the receive at the front.
    scratch: Vec<u8>,
    /// Kept open so the peer's handshake socket does not see a close.
    _socket: Stream,
}

impl SimRing {
    /// The simulated ring of `socket`'s connection (already handshaken), with `slots` slab slots
    /// of `slot_bytes`. `connecting`: this is the side that connected (the sender).
    pub(crate) fn new(
        socket: Stream,
        connecting: bool,
        memory: Arc<GuestMemory>,
        slots: usize,
        slot_bytes: usize,
    ) -> Result<Self> {
        let (link, end) = link_of(&socket, connecting)?;
        Ok(SimRing {
            link,
            end,
            memory,
            slab: vec![0; slots * slot_bytes],
            slot_bytes,
            sends: VecDeque::new(),
            recvs: VecDeque::new(),
            cancel_linked: false,
            ready: VecDeque::new(),
            notifs: VecDeque::new(),
            in_flight: 0,
            vectored: 0,
            slot_busy: vec![0; slots],
            staged: Vec::new(),
            scratch: Vec::new(),
            _socket: socket,
        })
    }

    /// Queues an op; `vectored` ops (sendmsg, a receive into several buffers) count against
    /// the vectored slots as on the real ring.
    fn push(
        &mut self,
        tag: u64,
        kind: Kind,
        (bufs, skip): (&[Buf], u64),
        link: bool,
        vectored: bool,
    ) {
        let bufs = super::keep_prefix(bufs, skip, u64::MAX);
        let total = bufs.iter().map(|b| u64::from(b.bytes())).sum();
        let slot = bufs.iter().find_map(|b| b.slot());
        if let Some(s) = slot {
            self.slot_busy[usize::from(s)] += 1;
        }
        self.vectored += usize::from(vectored);
        self.in_flight += 1;
        let op = Op {
            tag,
            kind,
            bufs,
            total,
            done: 0,
            link,
            slot,
            vectored,
        };
        match kind {
            Kind::Send { .. } => self.sends.push_back(op),
            Kind::Recv { .. } => self.recvs.push_back(op),
        }
    }

    /// The bytes of `buf`, copied out (slab or guest memory).
    fn read_buf(&mut self, buf: Buf, out: &mut Vec<u8>) {
        match buf {
            Buf::Slab { slot, offset, len } => {
                let at = usize::from(slot) * self.slot_bytes + offset as usize;
                out.extend_from_slice(&self.slab[at..at + len as usize]);
            }
            Buf::Guest {
                region,
                offset,
                len,
            } => {
                let start = out.len();
                out.resize(start + len as usize, 0);
                self.memory.regions()[region as usize].read(offset, &mut out[start..]);
            }
        }
    }

    fn write_buf(&mut self, buf: Buf, data: &[u8]) {
        match buf {
            Buf::Slab { slot, offset, .. } => {
                let at = usize::from(slot) * self.slot_bytes + offset as usize;
                self.slab[at..at + data.len()].copy_from_slice(data);
            }
            Buf::Guest { region, offset, .. } => {
                self.memory.regions()[region as usize].write(offset, data);
            }
        }
    }

    /// Hands an op's final result out.
    fn complete(&mut self, op: Op, result: i32) {
        self.vectored -= usize::from(op.vectored);
        let zero_copy = matches!(op.kind, Kind::Send { zero_copy: true });
        let more = zero_copy && result >= 0;
        self.ready.push_back((
            Completion {
                tag: op.tag,
                result,
                more,
                notif: false,
                zc_copied: false,
            },
            if more { None } else { op.slot },
        ));
        if more {
            self.notifs.push_back((op.tag, op.slot));
        }
    }

    /// Moves bytes between this end and the link as far as they can go now. Returns true when
    /// anything happened.
    fn pump(&mut self) -> bool {
        let link = self.link.clone();
        let mut pipes = link.lock();
        let mut moved = self.pump_sends(&mut pipes[self.end]);
        moved |= self.pump_recvs(&mut pipes[1 - self.end]);
        // Notifications follow their send's result.
        while let Some((tag, slot)) = self.notifs.pop_front() {
            self.ready.push_back((
                Completion {
                    tag,
                    result: 0,
                    more: false,
                    notif: true,
                    zc_copied: true,
                },
                slot,
            ));
            moved = true;
        }
        if moved {
            self.link.changed.notify_all();
        }
        moved
    }

    /// Sends, strictly in order, into `tx` as far as its room allows.
    fn pump_sends(&mut self, tx: &mut Pipe) -> bool {
        let mut moved = false;
        while let Some(op) = self.sends.front_mut() {
            if self.cancel_linked {
                let op = self.sends.pop_front().expect("front exists");
                self.cancel_linked = op.link;
                self.complete(op, -libc::ECANCELED);
                moved = true;
                continue;
            }
            if tx.reader_gone || tx.closed {
                let op = self.sends.pop_front().expect("front exists");
                self.cancel_linked = op.link;
                self.complete(op, -libc::EPIPE);
                moved = true;
                continue;
            }
            let room = PIPE_BYTES_MAX.saturating_sub(tx.bytes.len()) as u64;
            if room == 0 {
                break;
            }
            if op.done == 0 {
                // Stage the op's bytes once.
                let mut data = std::mem::take(&mut self.staged);
                data.clear();
                let bufs = std::mem::take(&mut self.sends[0].bufs);
                for &b in &bufs {
                    self.read_buf(b, &mut data);
                }
                self.sends[0].bufs = bufs;
                self.staged = data;
            }
            let op = &mut self.sends[0];
            let n = room.min(op.total - op.done);
            let from = op.done as usize;
            tx.bytes.extend(&self.staged[from..from + n as usize]);
            tx.written += n;
            op.done += n;
            moved = true;
            if op.done < op.total {
                break;
            }
            let op = self.sends.pop_front().expect("front exists");
            let total = op.total as i32;
            self.complete(op, total);
        }
        moved
    }

    /// Receives, in order, out of `rx`.
    fn pump_recvs(&mut self, rx: &mut Pipe) -> bool {
        let mut moved = false;
        while let Some(op) = self.recvs.front_mut() {
            let available = rx.bytes.len() as u64;
            let ended = rx.closed && available == 0;
            let n = available.min(op.total - op.done);
            if n > 0 {
                let mut data = std::mem::take(&mut self.scratch);
                data.clear();
                data.extend(rx.bytes.drain(..n as usize));
                let (bufs, mut skip) = (std::mem::take(&mut op.bufs), op.done);
                let mut at = 0usize;
                for &b in &bufs {
                    let len = u64::from(b.bytes());
                    if skip >= len {
                        skip -= len;
                        continue;
                    }
                    let take = ((len - skip) as usize).min(data.len() - at);
                    if take == 0 {
                        break;
                    }
                    let dst = crate::uring::advance(b, skip).truncated(take as u32);
                    self.write_buf(dst, &data[at..at + take]);
                    at += take;
                    skip = 0;
                }
                let op = &mut self.recvs[0];
                op.bufs = bufs;
                op.done += n;
                self.scratch = data;
                moved = true;
            }
            let op = &self.recvs[0];
            let whole = op.done == op.total;
            let some = matches!(op.kind, Kind::Recv { wait_all: false }) && op.done > 0;
            if whole || some || ended {
                let op = self.recvs.pop_front().expect("front exists");
                let done = op.done as i32;
                self.complete(op, done);
                moved = true;
                continue;
            }
            break;
        }
        moved
    }

    fn close(&self, both: bool) {
        let mut pipes = self.link.lock();
        pipes[self.end].closed = true;
        pipes[1 - self.end].reader_gone = true;
        if both {
            pipes[1 - self.end].closed = true;
        }
        drop(pipes);
        self.link.changed.notify_all();
    }
}

impl RingIo for SimRing {
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn sq_space(&mut self) -> usize {
        OPS_MAX - self.sends.len() - self.recvs.len()
    }
    fn vectored_space(&self) -> usize {
        VECTORED_OPS_MAX.saturating_sub(self.vectored)
    }
    fn ops_space(&self) -> usize {
        OPS_MAX - self.in_flight
    }
    fn slot_idle(&self, slot: u16) -> bool {
        self.slot_busy[usize::from(slot)] == 0
    }
    fn slot_mut(&mut self, slot: u16) -> &mut [u8] {
        let at = usize::from(slot) * self.slot_bytes;
        &mut self.slab[at..at + self.slot_bytes]
    }
    fn register_guest_memory(&mut self) -> Result<()> {
        Ok(())
    }
    fn push_send(&mut self, tag: u64, buf: Buf, zero_copy: bool, link: bool, owner: Option<u16>) {
        self.push(tag, Kind::Send { zero_copy }, (&[buf], 0), link, false);
        if let (None, Some(s)) = (buf.slot(), owner) {
            // A guest piece counts against its frame's slot until its notification.
            self.slot_busy[usize::from(s)] += 1;
            self.sends.back_mut().expect("just pushed").slot = Some(s);
        }
    }
    fn push_sendmsg(&mut self, tag: u64, bufs: &[Buf], skip: u64, link: bool) {
        self.push(
            tag,
            Kind::Send { zero_copy: false },
            (bufs, skip),
            link,
            true,
        );
    }
    fn push_recv(&mut self, tag: u64, bufs: &[Buf], skip: u64) {
        self.push(
            tag,
            Kind::Recv { wait_all: true },
            (bufs, skip),
            false,
            bufs.len() > 1,
        );
    }
    fn push_recv_some(&mut self, tag: u64, buf: Buf) {
        self.push(
            tag,
            Kind::Recv { wait_all: false },
            (&[buf], 0),
            false,
            false,
        );
    }
    fn submit_and_wait(&mut self, _want: usize, slice: Duration) -> Result<Wait> {
        let deadline = Instant::now() + slice;
        loop {
            self.pump();
            if !self.ready.is_empty() {
                return Ok(Wait::Ready);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Wait::TimedOut);
            }
            let wait = (deadline - now).min(Duration::from_millis(POLL_SLICE_MS));
            let pipes = self.link.lock();
            // Woken by the other end moving bytes; bounded, so a missed wake-up costs a slice.
            drop(self.link.changed.wait_timeout(pipes, wait));
        }
    }
    fn submit(&mut self) -> Result<()> {
        self.pump();
        Ok(())
    }
    fn next_completion(&mut self) -> Option<Completion> {
        if self.ready.is_empty() {
            self.pump();
        }
        let (c, slot) = self.ready.pop_front()?;
        if !c.more {
            self.in_flight -= 1;
            if let Some(s) = slot {
                self.slot_busy[usize::from(s)] -= 1;
            }
        }
        Some(c)
    }
    fn bytes_received(&self) -> u64 {
        self.link.lock()[1 - self.end].written
    }
    fn delivery(&self) -> Option<crate::sys::Delivery> {
        None
    }
    fn shutdown(&self) {
        self.close(true);
    }
}

impl Drop for SimRing {
    fn drop(&mut self) {
        self.close(false);
    }
}

/// Links of live connections by their two addresses, for the receiver's abort latch, which
/// writes its reason past the shards (see `shard::Abort::fail`).
fn live() -> &'static Mutex<HashMap<LinkKey, std::sync::Weak<Link>>> {
    static LIVE: OnceLock<Mutex<HashMap<LinkKey, std::sync::Weak<Link>>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// The live link of an accepted `socket`, if its data path is simulated.
fn live_link(socket: &Stream) -> Option<Arc<Link>> {
    let socket = socket.tcp()?;
    let key = (socket.peer_addr().ok()?, socket.local_addr().ok()?);
    let mut links = live().lock().unwrap_or_else(|p| p.into_inner());
    links.retain(|_, l| l.strong_count() > 0);
    links.get(&key)?.upgrade()
}

/// Receiver side: writes `bytes` to the sender over the simulated link of the accepted
/// `socket`. False when that connection is not simulated (the caller writes the socket).
pub(crate) fn write_to_sender(socket: &Stream, bytes: &[u8]) -> bool {
    let Some(link) = live_link(socket) else {
        return false;
    };
    let mut pipes = link.lock();
    if !pipes[1].closed && !pipes[0].reader_gone {
        pipes[1].bytes.extend(bytes);
        pipes[1].written += bytes.len() as u64;
    }
    drop(pipes);
    link.changed.notify_all();
    true
}

/// Receiver side: ends both directions of the accepted `socket`'s simulated link, if any.
pub(crate) fn shutdown(socket: &Stream) {
    if let Some(link) = live_link(socket) {
        let mut pipes = link.lock();
        for p in pipes.iter_mut() {
            p.closed = true;
        }
        drop(pipes);
        link.changed.notify_all();
    }
}
