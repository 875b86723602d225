//! Seeded fault injection between a shard and its io_uring (the `faults` feature; test and
//! benchmark builds only): a [`FaultRing`] implements the shards' ring interface over a real
//! ring and, deciding from a seed, delivers short sends and receives, `EAGAIN`, completions in
//! another order, zero-copy notifications late (their slot stays busy meanwhile), stalls, and
//! connection resets. A short or failed op in a linked chain cancels the rest of the chain, as
//! the kernel does. [`run_seed`] runs one whole transfer with such rings on both sides and
//! checks what must hold whatever the faults: no panic, no hang past the bounds, a receiver that
//! succeeded holds exactly the source, a sender that succeeded was confirmed by the receiver,
//! and a failure on both sides names the same cause. With [`RunOptions::simulated`] the rings
//! under the faults are [`sim::SimRing`]s over an in-memory link instead of io_uring.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod sim;

use crate::stream::Stream;

use crate::error::Result;
use crate::memory::GuestMemory;
use crate::uring::{Buf, Caps, Completion, Ring, RingIo, Wait};

/// A small deterministic generator (xorshift64*), seeded per ring.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

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
fn keep_prefix(bufs: &[Buf], mut skip: u64, mut keep: u64) -> Vec<Buf> {
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
        let ring = sim::SimRing::new(socket, connecting, memory, slots, slot_bytes)?;
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

/// How one seeded run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides succeeded and the destination equals the source.
    Complete,
    /// The receiver succeeded (its image is complete and verified) but the sender failed
    /// after the receiver had confirmed (a fault cut the confirmation): `.0` is why.
    ConfirmedButSenderFailed(String),
    /// Both sides failed naming the same cause (`.0`).
    BothFailed(String),
}

/// What a run broke: one of the properties that must hold whatever the faults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// Settings of one seeded run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// TLS on the run's channels (certificates made by the caller).
    pub tls: Option<(crate::tls::TlsServer, crate::tls::TlsClient)>,
    /// The idle bound both sides use.
    pub idle: Duration,
    /// Run the data path over the simulated transport ([`sim`]) instead of io_uring and
    /// loopback sockets (the handshake still uses loopback).
    pub simulated: bool,
}

/// A coarse class of an error, to compare the causes both sides name.
fn cause(e: &crate::Error) -> &'static str {
    use crate::error::AbortCode;
    match e.abort_code() {
        AbortCode::Timeout => "timeout",
        AbortCode::PeerClosed | AbortCode::Io => "connection",
        AbortCode::Protocol | AbortCode::Tls => "connection",
        AbortCode::Incomplete => "incomplete",
        AbortCode::Internal => "internal",
        AbortCode::Other => match e {
            crate::Error::PeerAborted { code, .. } => match code {
                AbortCode::Timeout => "timeout",
                AbortCode::Incomplete => "incomplete",
                AbortCode::Internal => "internal",
                _ => "connection",
            },
            _ => "other",
        },
    }
}

/// Runs one transfer with faults from `seed` on both sides (1–4 channels, 1–3 rounds, all
/// drawn from the seed) and checks it (see the module docs).
pub fn run_seed(seed: u64, options: &RunOptions) -> std::result::Result<Outcome, Violation> {
    use crate::synth::{fill, Content};
    use crate::{
        GuestMemory, PageRun, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig,
    };
    let mut r = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let channels = 1 + r.below(4) as u16;
    let rounds = 1 + r.below(3);
    let pages = 64 + r.below(448);
    let specs = [RegionSpec {
        gpa: 0,
        len: pages * crate::limits::PAGE_BYTES as u64,
    }];
    let violation = |what: String| Violation(format!("seed {seed}: {what}"));
    let src = Arc::new(GuestMemory::anonymous(&specs).map_err(|e| violation(e.to_string()))?);
    fill(&src, Content::Blend, seed);
    let dst = Arc::new(GuestMemory::anonymous(&specs).map_err(|e| violation(e.to_string()))?);
    let idle_ms = options.idle.as_millis() as u64;
    let (server, client) = match &options.tls {
        Some((s, c)) => (Some(s.clone()), Some(c.clone())),
        None => (None, None),
    };
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            accept_timeout_ms: Some(10 * idle_ms),
            idle_timeout_ms: idle_ms,
            tls: server,
            fault_seed: seed,
            fault_ring: true,
            simulated: options.simulated,
            ..ReceiverConfig::default()
        },
    )
    .map_err(|e| violation(e.to_string()))?;
    let addr = receiver
        .local_addr()
        .map_err(|e| violation(e.to_string()))?;
    let rx = std::thread::spawn(move || receiver.run());
    let started = Instant::now();
    let source = src.clone();
    let simulated = options.simulated;
    let tx = std::thread::spawn(move || {
        let mut s = Sender::connect(
            addr,
            source.clone(),
            &SenderConfig {
                channels,
                pinning: Pinning::None,
                tls: client,
                idle_timeout_ms: idle_ms,
                tls_records_per_key: 40,
                fault_seed: Some(seed),
                simulated,
                ..SenderConfig::default()
            },
        )?;
        s.send_all()?;
        for round in 1..rounds {
            // Rewrite a few pages and send them again (a stable round: nothing changes after).
            let first = (round * 7) % pages;
            let n = (pages - first).min(9);
            for p in first..first + n {
                source.regions()[0].write(p * 4096, &round.to_le_bytes());
            }
            s.send_round(&[PageRun {
                region: 0,
                first_page: first,
                pages: n,
            }])?;
        }
        s.finish()
    });
    // Everything must end within the bounds: setup, the idle bound a few times over, slack.
    let limit = Duration::from_millis(30 * idle_ms + 10_000);
    while !(tx.is_finished() && rx.is_finished()) {
        if started.elapsed() > limit {
            return Err(violation(format!("still running after {limit:?} (a hang)")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = tx
        .join()
        .map_err(|_| violation("the sender panicked".into()))?;
    let received = rx
        .join()
        .map_err(|_| violation("the receiver panicked".into()))?;
    match (sent, received) {
        (Ok(_), Ok(_)) | (Err(_), Ok(_)) if src.first_difference(&dst).is_some() => Err(violation(
            "the receiver reported success over an image that differs".into(),
        )),
        (Ok(_), Ok(_)) => Ok(Outcome::Complete),
        (Err(s), Ok(_)) => Ok(Outcome::ConfirmedButSenderFailed(crate::error_chain(&s))),
        (Ok(_), Err(r)) => Err(violation(format!(
            "the sender succeeded but the receiver failed: {}",
            crate::error_chain(&r)
        ))),
        (Err(s), Err(r)) => {
            let (a, b) = (cause(&s), cause(&r));
            // A side that gave up on its idle bound while its own ring was stalled cannot tell
            // the other why; that side sees it close the connection, which is the same event.
            let gave_up = |x: &str, other: &crate::Error| {
                let closed = match other {
                    crate::Error::PeerClosed { .. } => true,
                    crate::Error::Io { source, .. } => {
                        matches!(source.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE))
                    }
                    _ => false,
                };
                x == "timeout" && closed
            };
            if a == b || gave_up(a, &r) || gave_up(b, &s) {
                Ok(Outcome::BothFailed(a.into()))
            } else {
                Err(violation(format!(
                    "the sides name different causes: sender {a} ({}), receiver {b} ({})",
                    crate::error_chain(&s),
                    crate::error_chain(&r)
                )))
            }
        }
    }
}
