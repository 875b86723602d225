//! Seeded fault injection between a shard and its io_uring (the `faults` feature; test and
//! benchmark builds only): a `FaultRing` (in `ring.rs`) implements the shards' ring interface over a real
//! ring and, deciding from a seed, delivers short sends and receives, `EAGAIN`, completions in
//! another order, zero-copy notifications late (their slot stays busy meanwhile), stalls, and
//! connection resets. A short or failed op in a linked chain cancels the rest of the chain, as
//! the kernel does. [`run_seed`] runs one whole transfer with such rings on both sides and
//! checks what must hold whatever the faults: no panic, no hang past the bounds, a receiver that
//! succeeded holds exactly the source, a sender that succeeded was confirmed by the receiver,
//! and a failure on both sides names the same cause. With [`RunOptions::simulated`] the rings
//! under the faults are `sim::SimRing`s over an in-memory link instead of io_uring.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod ring;
pub mod sim;

use ring::keep_prefix;
pub use ring::FaultPlan;
pub(crate) use ring::{open_ring, RingFaults};

/// Chunk frames this process' senders may still seal before one fails as if its own seal had
/// faulted (a source file truncated during the seal); 0: never. A test hook for the path that
/// gives a sealed, failed frame's TLS record numbers back: the scan reads every page before
/// the seal does, so a real fault lands in the seal alone only in a race. Process-wide: a
/// test that sets it runs alone in its binary.
#[doc(hidden)]
pub static SEAL_FAULT_AFTER_FRAMES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// True for the frame [`SEAL_FAULT_AFTER_FRAMES`] names (counting it down).
pub(crate) fn take_seal_fault() -> bool {
    use std::sync::atomic::Ordering;
    SEAL_FAULT_AFTER_FRAMES
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok_and(|n| n == 1)
}

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

/// The cause of a protocol or TLS error: no fault injected changes a byte or reorders a
/// stream (short sends, resets, stalls, late completions), so one can only come from the
/// engine sending what it should not (say, a short send resumed from the wrong byte). A
/// violation on either side, whatever the other says.
const CORRUPTION: &str = "corrupted stream";

/// A coarse class of an error, to compare the causes both sides name.
fn cause(e: &crate::Error) -> &'static str {
    use crate::error::AbortCode;
    match e.abort_code() {
        AbortCode::Timeout => "timeout",
        AbortCode::PeerClosed | AbortCode::Io => "connection",
        AbortCode::Protocol | AbortCode::Tls => CORRUPTION,
        AbortCode::Incomplete => "incomplete",
        AbortCode::Internal => "internal",
        AbortCode::Other => match e {
            crate::Error::PeerAborted { code, .. } => match code {
                AbortCode::Protocol | AbortCode::Tls => CORRUPTION,
                AbortCode::Timeout => "timeout",
                AbortCode::Incomplete => "incomplete",
                AbortCode::Internal => "internal",
                _ => "connection",
            },
            _ => "other",
        },
    }
}

/// Runs one transfer with faults from `seed` on both sides (1–4 channels, 1–3 rounds, page
/// checksums off in a quarter of the plaintext runs, all drawn from the seed) and checks it
/// (see the module docs).
pub fn run_seed(seed: u64, options: &RunOptions) -> std::result::Result<Outcome, Violation> {
    use crate::synth::{fill, Content};
    use crate::{
        GuestMemory, PageRun, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig,
    };
    let mut r = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let channels = 1 + r.below(4) as u16;
    let rounds = 1 + r.below(3);
    let pages = 64 + r.below(448);
    // A quarter of the plaintext runs send pages without checksums.
    let page_checksums = options.tls.is_some() || r.below(4) != 0;
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
            accept_unchecked_pages: !page_checksums,
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
                page_checksums,
                ..SenderConfig::default()
            },
        )?;
        // Every round but the last is live: the next one rewrites pages of it, which its
        // short sends resumed later (or zero-copy sends) may still read. The last round is
        // stable: nothing changes after it. (Rewriting the pages of a stable round breaks
        // `send_round`'s contract; the receiver then rightly finds torn pages.)
        let whole = PageRun::whole(&source);
        if rounds > 1 {
            s.send_live_round(&whole)?;
        } else {
            s.send_round(&whole)?;
        }
        for round in 1..rounds {
            // Rewrite a few pages and send them again.
            let first = (round * 7) % pages;
            let n = (pages - first).min(9);
            for p in first..first + n {
                source.regions()[0].write(p * 4096, &round.to_le_bytes());
            }
            let runs = [PageRun {
                region: 0,
                first_page: first,
                pages: n,
            }];
            if round + 1 < rounds {
                s.send_live_round(&runs)?;
            } else {
                s.send_round(&runs)?;
            }
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
        (Err(s), _) if cause(&s) == CORRUPTION => Err(violation(format!(
            "the sender saw a corrupted stream: {}",
            crate::error_chain(&s)
        ))),
        (_, Err(r)) if cause(&r) == CORRUPTION => Err(violation(format!(
            "the receiver saw a corrupted stream: {}",
            crate::error_chain(&r)
        ))),
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
