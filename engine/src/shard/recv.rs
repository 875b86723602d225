//! The receiver shard: one thread, one ring, one accepted connection.
//!
//! Strictly sequential per channel (a TCP stream is): receive the fixed header, receive the run
//! list, decode and check everything against the layout, then receive the payload straight into
//! destination memory with one vectored `MSG_WAITALL` receive (one iovec per normal run, no
//! staging copy). Zero pages are skipped when the destination page is known to be zero (fresh
//! anonymous memory not yet written by this transfer), otherwise zeroed if they are not already.
//! End-of-round markers wait at the shared [`RoundBarrier`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::limits::{
    CONTROL_BYTES, FRAME_FIXED_BYTES, FRAME_HEADER_BYTES_MAX, FRAME_RUNS_MAX, IO_IDLE_TIMEOUT_MS,
    PAGE_BYTES, RING_WAIT_SLICE_MS, ROUND_BARRIER_TIMEOUT_MS,
};
use crate::memory::GuestMemory;
use crate::pipeline::zero::ZeroScanner;
use crate::protocol::channel::Event;
use crate::protocol::control::{Control, CONTROL_MESSAGE_BYTES_MAX};
use crate::protocol::wire::{decode_fixed, decode_runs};
use crate::protocol::{Frame, ProtocolError, ReceiverChannel};
use crate::stats::{add, Progress, ShardStats};
use crate::uring::{errno, Buf, Ring};

use super::{Abort, RoundBarrier};

const HEADER_SLOT: u16 = 0;
const CONTROL_SLOT: u16 = 1;
const SLOT_BYTES: usize = 2048;
const _: () =
    assert!(FRAME_HEADER_BYTES_MAX <= SLOT_BYTES && CONTROL_MESSAGE_BYTES_MAX <= SLOT_BYTES);

/// Which destination pages this transfer has written, for regions that started zero: a zero
/// page arriving for a page never written needs no store. One bit per page, shared by shards.
#[derive(Debug)]
pub(crate) struct WrittenMap {
    regions: Vec<Option<Vec<AtomicU64>>>,
}

impl WrittenMap {
    pub(crate) fn new(memory: &GuestMemory) -> Self {
        WrittenMap {
            regions: memory
                .regions()
                .iter()
                .map(|r| {
                    r.initially_zero().then(|| {
                        (0..r.pages().div_ceil(64))
                            .map(|_| AtomicU64::new(0))
                            .collect()
                    })
                })
                .collect(),
        }
    }

    /// True when `page` of `region` is known to hold zeros.
    fn known_zero(&self, region: usize, page: u64) -> bool {
        match &self.regions[region] {
            Some(bits) => {
                bits[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) == 0
            }
            None => false,
        }
    }

    fn mark(&self, region: usize, first_page: u64, pages: u64) {
        if let Some(bits) = &self.regions[region] {
            for page in first_page..first_page + pages {
                bits[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
    }
}

/// Test-only fault injection: a seeded random delay before each frame, larger on lower channels.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FrameDelay {
    pub max_us: u32,
    pub seed: u64,
}

pub(crate) struct RecvShardParams {
    pub channel: u16,
    pub memory: Arc<GuestMemory>,
    pub written: Arc<WrittenMap>,
    pub barrier: Arc<RoundBarrier>,
    pub abort: Arc<Abort>,
    pub progress: Arc<Progress>,
    pub delay: FrameDelay,
}

pub(crate) struct RecvShard {
    channel: u16,
    ring: Ring,
    p: RecvShardParams,
    scanner: ZeroScanner,
    frame: Box<Frame>,
    bufs: Vec<Buf>,
    stats: ShardStats,
    rng: u64,
}

enum Got {
    All,
    Eof,
}

impl RecvShard {
    pub(crate) fn new(p: RecvShardParams, socket: std::net::TcpStream) -> Result<Self> {
        let ring = Ring::new(socket, p.memory.clone(), 2, SLOT_BYTES)?;
        Ok(RecvShard {
            channel: p.channel,
            ring,
            scanner: ZeroScanner::detect(),
            frame: Box::default(),
            bufs: Vec::with_capacity(FRAME_RUNS_MAX),
            stats: ShardStats {
                channel: p.channel,
                ..ShardStats::default()
            },
            rng: p.delay.seed ^ (u64::from(p.channel) << 32) | 1,
            p,
        })
    }

    /// Runs the shard to the end of the stream. On failure the abort latch is raised here, while
    /// this shard's ring and socket are still open, so a receiver can still tell the peer why.
    pub(crate) fn run(mut self) -> Result<ShardStats> {
        match self.run_inner() {
            Ok(()) => Ok(std::mem::take(&mut self.stats)),
            Err(e) => Err(self.p.abort.fail(e)),
        }
    }

    fn run_inner(&mut self) -> Result<()> {
        let cpu_start = crate::sys::thread_cpu_time();
        let start = Instant::now();
        let mut idle = Duration::ZERO;
        let region_pages = self.p.memory.region_pages();
        let mut proto = ReceiverChannel::new(&region_pages);
        loop {
            let waited = Instant::now();
            let header = [Buf::Slab {
                slot: HEADER_SLOT,
                offset: 0,
                len: FRAME_FIXED_BYTES as u32,
            }];
            if let Got::Eof = self.recv(&header, FRAME_FIXED_BYTES as u64, true)? {
                return Err(Error::PeerClosed {
                    channel: self.channel,
                    when: "before the end of the stream",
                });
            }
            // Time blocked on the first header byte is idle time (the sender had nothing).
            idle += waited
                .elapsed()
                .min(Duration::from_millis(RING_WAIT_SLICE_MS));
            self.delay();
            let fixed = decode_fixed(&self.ring.slot_mut(HEADER_SLOT)[..FRAME_FIXED_BYTES])
                .map_err(|e| self.protocol(e))?;
            let runs_bytes = fixed.runs_bytes();
            if runs_bytes > 0 {
                let runs = [Buf::Slab {
                    slot: HEADER_SLOT,
                    offset: FRAME_FIXED_BYTES as u32,
                    len: runs_bytes as u32,
                }];
                self.recv(&runs, runs_bytes as u64, false)?;
            }
            let slot = self.ring.slot_mut(HEADER_SLOT);
            decode_runs(&fixed, &slot[FRAME_FIXED_BYTES..], &mut self.frame)
                .map_err(|e| self.protocol(e))?;
            let event = proto.accept(&self.frame).map_err(|e| self.protocol(e))?;
            self.stats.frames += 1;
            let header_bytes = (FRAME_FIXED_BYTES + runs_bytes) as u64;
            self.stats.wire_bytes += header_bytes;
            add(&self.p.progress.wire_bytes, header_bytes);
            match event {
                Event::Pages => self.place()?,
                Event::EndOfRound(_) => {
                    let waited = Instant::now();
                    self.p.barrier.wait(
                        &self.p.abort,
                        Duration::from_millis(ROUND_BARRIER_TIMEOUT_MS),
                    )?;
                    idle += waited.elapsed();
                }
                Event::EndOfStream => {
                    self.p.barrier.wait(
                        &self.p.abort,
                        Duration::from_millis(ROUND_BARRIER_TIMEOUT_MS),
                    )?;
                    self.send_done()?;
                    break;
                }
            }
        }
        self.stats.busy_ms = start.elapsed().saturating_sub(idle).as_secs_f64() * 1e3;
        self.stats.cpu_ms = (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3;
        Ok(())
    }

    fn protocol(&self, source: ProtocolError) -> Error {
        Error::Protocol {
            channel: self.channel,
            source,
        }
    }

    /// Places a checked `Pages` frame: zero pages first (no I/O), then the payload straight into
    /// destination memory.
    fn place(&mut self) -> Result<()> {
        let frame = &*self.frame;
        let region_index = frame.region as usize;
        let region = &self.p.memory.regions()[region_index];
        for run in frame.zero_runs() {
            for page in run.first_page..run.end() {
                if !self.p.written.known_zero(region_index, page)
                    && !region.page_is_zero(&self.scanner, page)
                {
                    region.zero_pages(page, 1);
                }
            }
        }
        self.bufs.clear();
        for run in frame.normal_runs() {
            self.p
                .written
                .mark(region_index, run.first_page, u64::from(run.pages));
            self.bufs.push(Buf::Guest {
                region: frame.region,
                offset: run.first_page * PAGE_BYTES as u64,
                len: run.pages * PAGE_BYTES as u32,
            });
        }
        let normal = frame.normal_pages();
        let zero = frame.zero_pages();
        let payload = u64::from(frame.payload_bytes);
        if payload > 0 {
            let bufs = std::mem::take(&mut self.bufs);
            let got = self.recv(&bufs, payload, false);
            self.bufs = bufs;
            got?;
        }
        self.stats.normal_pages += normal;
        self.stats.zero_pages += zero;
        self.stats.wire_bytes += payload;
        add(&self.p.progress.wire_bytes, payload);
        add(&self.p.progress.pages_done, normal + zero);
        Ok(())
    }

    /// Receives exactly `len` bytes into `bufs`. `Eof` only when the peer closed cleanly before
    /// the first byte and `eof_ok`; a stream cut anywhere else is an error.
    fn recv(&mut self, bufs: &[Buf], len: u64, eof_ok: bool) -> Result<Got> {
        const TAG: u64 = 1;
        self.ring.push_recv(TAG, bufs);
        let started = Instant::now();
        let completion = loop {
            if let Some(c) = self.ring.next_completion() {
                break c;
            }
            if self.p.abort.is_raised() {
                return Err(Error::Aborted);
            }
            // An idle channel between rounds is normal (the VMM decides when the next starts),
            // so only a receive cut mid-frame is bounded by the idle timeout.
            let ms = started.elapsed().as_millis() as u64;
            if !eof_ok && ms >= IO_IDLE_TIMEOUT_MS {
                return Err(Error::Timeout {
                    what: format!(
                        "waiting for the rest of a frame on channel {}",
                        self.channel
                    ),
                    ms,
                });
            }
            self.ring
                .submit_and_wait(1, Duration::from_millis(RING_WAIT_SLICE_MS))?;
        };
        if completion.result < 0 {
            return Err(Error::io(
                format!("receiving on channel {}", self.channel),
                errno(completion.result),
            ));
        }
        let got = completion.result as u64;
        if got == len {
            Ok(Got::All)
        } else if got == 0 && eof_ok {
            Ok(Got::Eof)
        } else {
            Err(Error::PeerClosed {
                channel: self.channel,
                when: "in the middle of a frame",
            })
        }
    }

    fn send_done(&mut self) -> Result<()> {
        let mut msg = [0u8; CONTROL_MESSAGE_BYTES_MAX];
        let n = Control::Done.encode(&mut msg);
        debug_assert_eq!(n, CONTROL_BYTES);
        self.ring.slot_mut(CONTROL_SLOT)[..n].copy_from_slice(&msg[..n]);
        const TAG: u64 = 2;
        let buf = Buf::Slab {
            slot: CONTROL_SLOT,
            offset: 0,
            len: n as u32,
        };
        self.ring.push_send(TAG, buf, false, false);
        let started = Instant::now();
        loop {
            if let Some(c) = self.ring.next_completion() {
                if c.result < 0 {
                    return Err(Error::io(
                        format!(
                            "confirming the end of the transfer on channel {}",
                            self.channel
                        ),
                        errno(c.result),
                    ));
                }
                return Ok(());
            }
            if self.p.abort.is_raised() {
                return Err(Error::Aborted);
            }
            if started.elapsed().as_millis() as u64 >= IO_IDLE_TIMEOUT_MS {
                return Err(Error::Timeout {
                    what: "sending the end-of-transfer confirmation".into(),
                    ms: IO_IDLE_TIMEOUT_MS,
                });
            }
            self.ring
                .submit_and_wait(1, Duration::from_millis(RING_WAIT_SLICE_MS))?;
        }
    }

    fn delay(&mut self) {
        if self.p.delay.max_us == 0 {
            return;
        }
        // xorshift64*: deterministic per (seed, channel), printed by the test on failure.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // Channels drift apart on purpose: channel c waits up to max / 4^(c mod 4), so channel 0
        // falls rounds behind the others while the kernel's socket buffers hold what it has not
        // read yet.
        let max = u64::from(self.p.delay.max_us) >> (2 * (self.channel % 4));
        let us = r % max.max(1);
        std::thread::sleep(Duration::from_micros(us));
    }
}
