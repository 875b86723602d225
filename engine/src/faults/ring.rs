//! The fault-injecting ring ([`FaultRing`]) and how a shard's ring is made in builds with the
//! `faults` feature: the real io_uring or the simulated transport, wrapped in a [`FaultRing`]
//! when a seed is set. The faults are listed in the parent module's docs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stream::Stream;

use super::Rng;
use crate::error::Result;
use crate::memory::GuestMemory;
use crate::uring::{Buf, Caps, Completion, Ring, RingIo, Wait};

/// Which faults one ring injects, drawn from its seed.
#[derive(Debug, Clone, Copy)]
pub struct FaultPlan {
    /// Percent of sends and receives cut short.
    pub short_percent: u64,
    /// Percent of sends and receives that complete with `EAGAIN` instead of running.
    pub eagain_percent: u64,
    /// Completions may be handed out in another order.
    pub reorder: bool,
    /// Polls a zero-copy notification is held back (its slot stays busy).
    pub late_notif_polls: u64,
    /// The op count at which the connection is reset, if any.
    pub reset_at_op: Option<u64>,
    /// The op count at which completions stall, and for how long.
    pub stall: Option<(u64, Duration)>,
}

impl FaultPlan {
    /// The plan of seed `seed`: mostly benign faults, sometimes a reset or a stall.
    pub fn from_seed(seed: u64, idle: Duration) -> Self {
        let mut r = Rng(seed | 1);
        FaultPlan {
            short_percent: r.below(30),
            eagain_percent: r.below(8),
            reorder: r.chance(50),
            late_notif_polls: r.below(20),
            reset_at_op: r.chance(12).then(|| 1 + r.below(120)),
            stall: r.chance(15).then(|| {
                // Mostly shorter than the idle bound (the transfer must survive), sometimes
                // longer (both sides must fail on it).
                let ms = if r.chance(70) {
                    r.below(idle.as_millis() as u64 / 2)
                } else {
                    idle.as_millis() as u64 * 2
                };
                (1 + r.below(100), Duration::from_millis(ms))
            }),
        }
    }
}

/// A ring that injects the faults of a [`FaultPlan`] (see the module docs).
pub(crate) struct FaultRing {
    inner: Box<dyn RingIo>,
    plan: FaultPlan,
    rng: Rng,
    ops: u64,
    ticks: u64,
    /// Completions taken from the kernel, with the tick they may be handed out at.
    held: VecDeque<(u64, Completion, Option<u16>)>,
    /// Completions of ops that never reached the kernel (EAGAIN, cancelled links).
    synthetic: VecDeque<Completion>,
    /// A linked op failed or was cut short: the rest of its chain is cancelled.
    cancel_rest: bool,
    /// The last op that reached the kernel was linked to the next one pushed: an op after it
    /// must reach the kernel too (an SQE already pushed cannot be unlinked).
    prev_linked: bool,
    /// (tag, slot) of zero-copy sends, so a held notification keeps its slot busy.
    zc_slots: Vec<(u64, u16)>,
    stall_until: Option<Instant>,
}

impl FaultRing {
    pub(crate) fn new(inner: Box<dyn RingIo>, seed: u64, plan: FaultPlan) -> Self {
        FaultRing {
            inner,
            plan,
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            ops: 0,
            ticks: 0,
            held: VecDeque::new(),
            synthetic: VecDeque::new(),
            cancel_rest: false,
            prev_linked: false,
            zc_slots: Vec::new(),
            stall_until: None,
        }
    }

    fn synth(&mut self, tag: u64, result: i32) {
        self.synthetic.push_back(Completion {
            tag,
            result,
            more: false,
            notif: false,
            zc_copied: false,
        });
    }

    /// Counts an op and applies the op-count faults. Returns false when the op must not reach
    /// the kernel (its completion was synthesized).
    fn before_op(&mut self, tag: u64, link: bool) -> bool {
        self.ops += 1;
        if self.plan.reset_at_op == Some(self.ops) {
            self.inner.shutdown();
        }
        if let Some((at, how_long)) = self.plan.stall {
            if at == self.ops {
                self.stall_until = Some(Instant::now() + how_long);
            }
        }
        if self.cancel_rest {
            self.synth(tag, -libc::ECANCELED);
            self.cancel_rest = link;
            return false;
        }
        // A result that never reaches the kernel only where no pushed SQE links to this op.
        if !self.prev_linked && self.rng.chance(self.plan.eagain_percent) {
            self.synth(tag, -libc::EAGAIN);
            self.cancel_rest = link;
            return false;
        }
        true
    }

    /// `total` bytes cut to a random shorter length, or `None` when this op runs whole.
    fn cut(&mut self, total: u64) -> Option<u64> {
        (total > 1 && self.rng.chance(self.plan.short_percent))
            .then(|| 1 + self.rng.below(total - 1))
    }

    fn stalled(&mut self) -> bool {
        match self.stall_until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                self.stall_until = None;
                false
            }
            None => false,
        }
    }

    /// Moves what the kernel completed into `held`, each with the tick it may leave at.
    fn pull(&mut self) {
        while let Some(c) = self.inner.next_completion() {
            let delay = if c.notif {
                self.plan.late_notif_polls
            } else if self.plan.reorder {
                self.rng.below(3)
            } else {
                0
            };
            let slot = c
                .notif
                .then(|| {
                    self.zc_slots
                        .iter()
                        .find(|(t, _)| *t == c.tag)
                        .map(|(_, s)| *s)
                })
                .flatten();
            self.held.push_back((self.ticks + delay, c, slot));
        }
    }
}

/// `bufs` without their first `skip` bytes, cut to `keep` bytes.
pub(super) fn keep_prefix(bufs: &[Buf], mut skip: u64, mut keep: u64) -> Vec<Buf> {
    let mut out = Vec::new();
    for &b in bufs {
        let len = u64::from(b.bytes());
        if skip >= len {
            skip -= len;
            continue;
        }
        let b = crate::uring::advance(b, skip);
        skip = 0;
        let n = u64::from(b.bytes()).min(keep);
        out.push(b.truncated(n as u32));
        keep -= n;
        if keep == 0 {
            break;
        }
    }
    out
}

impl RingIo for FaultRing {
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len() + self.synthetic.len()
    }
    fn sq_space(&mut self) -> usize {
        self.inner.sq_space()
    }
    fn vectored_space(&self) -> usize {
        self.inner.vectored_space()
    }
    fn ops_space(&self) -> usize {
        self.inner.ops_space()
    }
    fn slot_idle(&self, slot: u16) -> bool {
        self.inner.slot_idle(slot)
            && !self
                .held
                .iter()
                .any(|(_, c, s)| c.notif && *s == Some(slot))
    }
    fn slot_mut(&mut self, slot: u16) -> &mut [u8] {
        assert!(
            self.slot_idle(slot),
            "slab slot {slot} is still in use (a notification is pending)"
        );
        self.inner.slot_mut(slot)
    }
    fn register_guest_memory(&mut self) -> Result<()> {
        self.inner.register_guest_memory()
    }
    fn push_send(&mut self, tag: u64, buf: Buf, zero_copy: bool, link: bool, owner: Option<u16>) {
        if !self.before_op(tag, link) {
            return;
        }
        let (buf, link) = match self.cut(u64::from(buf.bytes())) {
            Some(n) => {
                self.cancel_rest = link;
                (buf.truncated(n as u32), false)
            }
            None => (buf, link),
        };
        if zero_copy {
            if let Some(slot) = buf.slot().or(owner) {
                self.zc_slots.push((tag, slot));
            }
        }
        self.prev_linked = link;
        self.inner.push_send(tag, buf, zero_copy, link, owner);
    }
    fn push_sendmsg(&mut self, tag: u64, bufs: &[Buf], skip: u64, link: bool) {
        if !self.before_op(tag, link) {
            return;
        }
        let total: u64 = bufs.iter().map(|b| u64::from(b.bytes())).sum::<u64>() - skip;
        match self.cut(total) {
            Some(n) => {
                self.cancel_rest = link;
                self.prev_linked = false;
                let kept = keep_prefix(bufs, skip, n);
                self.inner.push_sendmsg(tag, &kept, 0, false);
            }
            None => {
                self.prev_linked = link;
                self.inner.push_sendmsg(tag, bufs, skip, link);
            }
        }
    }
    fn push_recv(&mut self, tag: u64, bufs: &[Buf], skip: u64) {
        if !self.before_op(tag, false) {
            return;
        }
        let total: u64 = bufs.iter().map(|b| u64::from(b.bytes())).sum::<u64>() - skip;
        match self.cut(total) {
            Some(n) => {
                let kept = keep_prefix(bufs, skip, n);
                self.inner.push_recv(tag, &kept, 0);
            }
            None => self.inner.push_recv(tag, bufs, skip),
        }
        self.prev_linked = false;
    }
    fn push_recv_some(&mut self, tag: u64, buf: Buf) {
        if !self.before_op(tag, false) {
            return;
        }
        let buf = match self.cut(u64::from(buf.bytes())) {
            Some(n) => buf.truncated(n as u32),
            None => buf,
        };
        self.prev_linked = false;
        self.inner.push_recv_some(tag, buf);
    }
    fn submit_and_wait(&mut self, want: usize, slice: Duration) -> Result<Wait> {
        if self.stalled() {
            // A stalled kernel: nothing submitted, nothing reaped, so ops already armed make no
            // progress either (the ring defers their work to this thread's next entry).
            std::thread::sleep(slice.min(Duration::from_millis(10)));
            return Ok(Wait::TimedOut);
        }
        if !self.synthetic.is_empty() || self.held.iter().any(|(t, ..)| *t <= self.ticks) {
            self.inner.submit()?;
            return Ok(Wait::Ready);
        }
        // Held completions leave as ticks pass: wait in short slices.
        let wait = if self.held.is_empty() {
            slice
        } else {
            slice.min(Duration::from_millis(1))
        };
        let r = self.inner.submit_and_wait(want, wait)?;
        self.ticks += 1;
        Ok(if self.held.is_empty() { r } else { Wait::Ready })
    }
    fn submit(&mut self) -> Result<()> {
        if self.stalled() {
            return Ok(());
        }
        self.inner.submit()
    }
    fn next_completion(&mut self) -> Option<Completion> {
        if self.stalled() {
            return None;
        }
        if let Some(c) = self.synthetic.pop_front() {
            return Some(c);
        }
        self.pull();
        let ready: Vec<usize> = (0..self.held.len())
            .filter(|&i| self.held[i].0 <= self.ticks)
            .collect();
        if ready.is_empty() {
            self.ticks += 1;
            return None;
        }
        let pick = if self.plan.reorder {
            ready[self.rng.below(ready.len() as u64) as usize]
        } else {
            ready[0]
        };
        let (_, c, _) = self.held.remove(pick)?;
        Some(c)
    }
    fn bytes_received(&self) -> u64 {
        self.inner.bytes_received()
    }
    fn delivery(&self) -> Option<crate::sys::Delivery> {
        self.inner.delivery()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// How a shard's ring is made in test builds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RingFaults {
    /// Wrap the ring in a [`FaultRing`] with faults drawn from this seed.
    pub seed: Option<u64>,
    /// Use the simulated transport ([`sim::SimRing`]) instead of io_uring and the socket.
    pub simulated: bool,
}

/// See [`crate::shard::open_ring`].
pub(crate) fn open_ring(
    socket: Stream,
    connecting: bool,
    memory: Arc<GuestMemory>,
    (slots, slot_bytes): (usize, usize),
    faults: RingFaults,
    (channel, idle): (u16, Duration),
) -> Result<(Box<dyn RingIo>, Caps)> {
    let (ring, caps): (Box<dyn RingIo>, Caps) = if faults.simulated {
        let ring = super::sim::SimRing::new(socket, connecting, memory, slots, slot_bytes)?;
        // Zero-copy sends exist, and the kernel copies them (as on loopback): the shards probe,
        // then fall back to plain sends, both paths simulated.
        let caps = Caps {
            send_zc: true,
            defer_taskrun: false,
            slab_registered: false,
        };
        (Box::new(ring), caps)
    } else {
        let ring = Ring::new(socket, memory, slots, slot_bytes)?;
        let caps = ring.caps();
        (Box::new(ring), caps)
    };
    Ok((wrap(ring, faults.seed, channel, idle), caps))
}

/// Wraps `ring` in a [`FaultRing`] when a fault seed is set.
pub(crate) fn wrap(
    ring: Box<dyn RingIo>,
    seed: Option<u64>,
    channel: u16,
    idle: Duration,
) -> Box<dyn RingIo> {
    match seed {
        Some(seed) => {
            let seed = seed ^ (u64::from(channel) << 48) ^ 0x5eed;
            let plan = FaultPlan::from_seed(seed, idle);
            // To see which faults a failing seed drew.
            if std::env::var_os("PAGEWIRE_FAULTS_SHOW").is_some() {
                eprintln!("channel {channel}: {plan:?}");
            }
            Box::new(FaultRing::new(ring, seed, plan))
        }
        None => ring,
    }
}
