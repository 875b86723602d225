//! The receiver shard: one thread, one ring, one accepted connection.
//!
//! Strictly sequential per channel (a TCP stream is): read the fixed header, read the run list,
//! decode and check everything against the layout, then place the payload. Plaintext channels
//! receive the payload straight into destination memory with one vectored `MSG_WAITALL` receive
//! (one iovec per normal run, no staging copy). TLS channels receive ciphertext into a registered
//! staging slot and open each record straight into the destination pages (AES-GCM,
//! [`crate::tls::direct`], which says why that is safe before the tag is checked; other ciphers
//! open in place and copy): a record that fails authentication fails the transfer, and none of
//! its pages counts as placed. Zero pages are
//! skipped when the destination page is known to be zero (fresh anonymous memory not yet written
//! by this transfer), otherwise zeroed if they are not already. End-of-round markers wait at the
//! shared [`RoundBarrier`].

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::limits::{
    DOWNTIME_POLL_US, FRAME_HEADER_BYTES_MAX, FRAME_PAYLOAD_BYTES_MAX, FRAME_RUNS_MAX, PAGE_BYTES,
    RING_WAIT_SLICE_MS,
};
use crate::memory::GuestMemory;
use crate::pipeline::compress::{Codec, Decompressor};
use crate::pipeline::seal::RECORD_BYTES_MAX;
use crate::pipeline::zero::ZeroScanner;
use crate::protocol::blob::{BlobAssembler, DeviceBlob, DeviceBudget};
use crate::protocol::channel::Event;
use crate::protocol::control::Control;
use crate::protocol::ledger::PageLedger;
use crate::protocol::reader::{FrameReader, Need};
use crate::protocol::{Frame, ProtocolError};
use crate::simd::xxh3::Xxh3;
use crate::stats::{add, Progress, ShardStats};
use crate::tls::{KeySchedule, Record, RecordStream};
use crate::uring::{errno, Buf, RingIo};

use super::{Abort, Marker, RoundBarrier, CONTROL_WIRE_BYTES_MAX};

mod io;
mod place;
mod tls;

const HEADER_SLOT: u16 = 0;
/// What `wait_one` returns for a retryable result (`EAGAIN`, `EINTR`): post the op again.
const RETRY: i32 = i32::MIN;
/// (Control messages go out through the abort latch, under its lock: see `Abort::send_control`.)
const STAGING_SLOT: u16 = 1;
const SLOT_BYTES_PLAIN: usize = 4096;
/// A TLS staging slot holds a whole frame's records plus one more record being filled.
const SLOT_BYTES_TLS: usize =
    (FRAME_PAYLOAD_BYTES_MAX + 4 * RECORD_BYTES_MAX).next_multiple_of(4096);
const _: () = assert!(
    FRAME_HEADER_BYTES_MAX <= SLOT_BYTES_PLAIN && CONTROL_WIRE_BYTES_MAX <= SLOT_BYTES_PLAIN
);

/// The receiving half of a channel's TLS: opener, key schedule, and the staging window.
pub(crate) struct TlsRx {
    stream: RecordStream,
    keys: KeySchedule,
    /// The handshake phase's record buffer, until its unopened bytes move to the staging slot.
    handshake_buffer: Vec<u8>,
    /// Plaintext of the current record not yet consumed.
    plain: Range<usize>,
    close_notify: bool,
}

impl TlsRx {
    pub(crate) fn from(stream: RecordStream, keys: KeySchedule, buffer: Vec<u8>) -> Self {
        TlsRx {
            stream,
            keys,
            handshake_buffer: buffer,
            plain: 0..0,
            close_notify: false,
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
    pub ledger: Arc<PageLedger>,
    pub barrier: Arc<RoundBarrier>,
    /// The idle bound: no byte on this channel (or, at a barrier, on any) for this long fails.
    pub idle: Duration,
    pub abort: Arc<Abort>,
    pub progress: Arc<Progress>,
    /// This channel's id in the abort latch (which seals its control messages under TLS).
    pub peer: usize,
    pub tls: Option<TlsRx>,
    /// The channel's frames must carry page checksums (plaintext, unless the sender announced
    /// it sends none and the receiver accepted that).
    pub page_checksums: bool,
    pub delay: FrameDelay,
    /// Where completed device state blobs go (every channel's, in channel order of arrival).
    pub device_state: Arc<Mutex<Vec<DeviceBlob>>>,
    /// The device state all channels together may hold (see [`DeviceBudget`]).
    pub device_budget: DeviceBudget,
    /// How the ring is made: test builds may simulate the transport and inject faults.
    pub faults: crate::shard::RingFaults,
}

pub(crate) struct RecvShard {
    channel: u16,
    ring: Box<dyn RingIo>,
    p: RecvShardParams,
    scanner: ZeroScanner,
    hash: Xxh3,
    frame: Box<Frame>,
    /// The channel's frame-stream state machine: what to read next, every check.
    reader: FrameReader,
    bufs: Vec<Buf>,
    decompressor: Decompressor,
    /// A compressed payload opened from TLS records, before decoding.
    packed: Vec<u8>,
    /// A decoded payload, before it is placed.
    unpacked: Vec<u8>,
    stats: ShardStats,
    rng: u64,
    /// Device state chunks of this channel, reassembled.
    blobs: BlobAssembler,
    /// A frame of pages sent while the vCPUs ran has arrived on this channel.
    live_seen: bool,
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    All,
    /// The stream ended cleanly before the first byte (TCP FIN, or TLS close_notify).
    End,
}

impl RecvShard {
    pub(crate) fn new(mut p: RecvShardParams, socket: crate::stream::Stream) -> Result<Self> {
        // The staging slot holds TLS records, or a compressed payload, so every receiver has one.
        let slot_bytes = SLOT_BYTES_TLS;
        let (mut ring, _) = crate::shard::open_ring(
            socket,
            false,
            p.memory.clone(),
            (2, slot_bytes),
            p.faults,
            (p.channel, p.idle),
        )?;
        if let Some(tls) = p.tls.as_mut() {
            // Bytes that arrived with the handshake belong to the first records.
            let buffer = std::mem::take(&mut tls.handshake_buffer);
            tls.stream
                .move_to(&buffer, ring.slot_mut(STAGING_SLOT), p.channel)?;
        }
        Ok(RecvShard {
            channel: p.channel,
            ring,
            scanner: ZeroScanner::detect(),
            hash: Xxh3::detect(),
            frame: Box::default(),
            reader: FrameReader::new(&p.memory.region_pages(), p.page_checksums),
            bufs: Vec::with_capacity(FRAME_RUNS_MAX),
            decompressor: Decompressor::new()
                .map_err(|e| Error::io("creating a zstd decompression context", e))?,
            packed: if p.tls.is_some() {
                vec![0; FRAME_PAYLOAD_BYTES_MAX]
            } else {
                Vec::new()
            },
            unpacked: vec![0; FRAME_PAYLOAD_BYTES_MAX],
            stats: ShardStats {
                channel: p.channel,
                unchecked_pages: !p.page_checksums && p.tls.is_none(),
                ..ShardStats::default()
            },
            rng: p.delay.seed ^ (u64::from(p.channel) << 32) | 1,
            blobs: BlobAssembler::sharing(p.device_budget.clone()),
            live_seen: false,
            p,
        })
    }

    /// Runs the shard to the end of the stream. On failure the abort latch is raised here, while
    /// this shard's ring and socket are still open, so the receiver can still tell the peer why.
    pub(crate) fn run(mut self) -> Result<ShardStats> {
        match self.run_inner() {
            Ok(()) => Ok(std::mem::take(&mut self.stats)),
            Err(e) => Err(self.p.abort.fail(e)),
        }
    }

    fn run_inner(&mut self) -> Result<()> {
        let cpu_start = crate::sys::thread_cpu_time();
        let faults_start = crate::sys::thread_page_faults();
        let start = Instant::now();
        let mut idle = Duration::ZERO;
        loop {
            let event = match self.reader.need() {
                Need::Header(len) => {
                    let boundary = self.reader.at_boundary();
                    let waited = Instant::now();
                    if self.read_header(len, boundary)? == Got::End {
                        return Err(Error::PeerClosed {
                            channel: self.channel,
                            when: "before the end of the stream",
                        });
                    }
                    if boundary {
                        // Time blocked on a frame's first byte is idle time (nothing to send).
                        idle += waited
                            .elapsed()
                            .min(Duration::from_millis(RING_WAIT_SLICE_MS));
                        self.delay();
                    }
                    match self.reader.header_filled(&mut self.frame) {
                        Ok(Some(event)) => event,
                        Ok(None) => continue,
                        Err(e) => return Err(self.protocol(e)),
                    }
                }
                // Every event below is handled where it is returned.
                need => unreachable!("the reader needs {need:?} between frames"),
            };
            self.stats.frames += 1;
            let header_bytes = self.reader.header_len() as u64;
            self.stats.wire_bytes += header_bytes;
            add(&self.p.progress.wire_bytes, header_bytes);
            match event {
                Event::Pages => {
                    if self.frame.live {
                        self.live_seen = true;
                    } else if self.live_seen {
                        // Waits poll before they sleep from now on (see `wait_one`).
                        self.stats.downtime_began = true;
                    }
                    self.place()?;
                    self.reader.payload_done();
                }
                Event::Aborted => return Err(self.peer_aborted()),
                Event::DeviceState => self.device_state()?,
                Event::Keepalive => {}
                Event::EndOfRound(round) => {
                    let waited = Instant::now();
                    self.barrier(Marker::EndOfRound(round))?;
                    self.send_round_placed(round)?;
                    self.reader.resume();
                    idle += waited.elapsed();
                }
                Event::EndOfStream => {
                    self.end_of_stream()?;
                    break;
                }
            }
        }
        self.stats.busy_ms = start.elapsed().saturating_sub(idle).as_secs_f64() * 1e3;
        self.stats.cpu_ms = (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3;
        let faults = crate::sys::thread_page_faults();
        self.stats.faults_minor = faults.0.saturating_sub(faults_start.0);
        self.stats.faults_major = faults.1.saturating_sub(faults_start.1);
        Ok(())
    }

    /// The sender ended the stream: once every channel has, hands the device state over and
    /// confirms, if every page of the layout was placed (or declared zero) at least once.
    fn end_of_stream(&mut self) -> Result<()> {
        self.expect_close_notify()?;
        // Before the barrier: a channel that fails here must not let the others through to
        // confirm.
        if self.blobs.in_progress() {
            return Err(self.protocol(ProtocolError::BlobRefused(
                "the stream ended inside a device state blob",
            )));
        }
        self.barrier(Marker::EndOfStream(self.reader.round()))?;
        if let Some(m) = self.p.ledger.first_missing() {
            return Err(Error::Incomplete {
                region: m.region,
                page: m.page,
                missing: m.pages,
            });
        }
        // Handed over only with the pages complete (and `Receiver::run` takes them back
        // should the transfer fail after all).
        self.p
            .device_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(self.blobs.take());
        self.send_done()
    }

    /// Reads a frame's payload of `len` bytes (an abort's reason, a device state chunk: small
    /// bodies, not pages) into `unpacked[..len]`.
    fn read_body(&mut self, len: usize) -> Result<()> {
        if self.p.tls.is_none() {
            let buf = [Buf::Slab {
                slot: STAGING_SLOT,
                offset: 0,
                len: len as u32,
            }];
            self.recv(&buf, len as u64, false)?;
            self.unpacked[..len].copy_from_slice(&self.ring.slot_mut(STAGING_SLOT)[..len]);
        } else {
            let mut done = 0;
            while done < len {
                let Some(r) = self.tls_plain(len - done, false)? else {
                    return Err(self.cut_short());
                };
                let n = r.len();
                self.unpacked[done..done + n].copy_from_slice(&self.ring.slot_mut(STAGING_SLOT)[r]);
                done += n;
            }
        }
        self.reader.payload_done();
        Ok(())
    }

    /// Reads a sender's abort frame's payload: the error it names.
    fn peer_aborted(&mut self) -> Error {
        let len = self.frame.payload_bytes as usize;
        if let Err(e) = self.read_body(len) {
            return e;
        }
        let (code, reason) = crate::protocol::control::decode_abort_body(&self.unpacked[..len]);
        Error::PeerAborted {
            channel: self.channel,
            code,
            reason,
        }
    }

    /// Reads a device state chunk and hands it to this channel's blob assembler.
    fn device_state(&mut self) -> Result<()> {
        // On channel 0 only, as senders send it: blobs spread over channels would reach the
        // VMM in whatever order the channels passed the final barrier.
        if self.channel != 0 {
            return Err(self.protocol(ProtocolError::BlobRefused(
                "device state on a channel other than 0",
            )));
        }
        let len = self.frame.payload_bytes as usize;
        self.read_body(len)?;
        self.stats.wire_bytes += len as u64;
        add(&self.p.progress.wire_bytes, len as u64);
        add(&self.p.progress.device_state_bytes, len as u64);
        let pushed = self.blobs.push(&self.unpacked[..len]);
        pushed.map_err(|e| self.protocol(e))
    }

    fn barrier(&self, marker: Marker) -> Result<()> {
        self.p.barrier.wait(
            self.channel,
            marker,
            &self.p.abort,
            &self.p.progress.wire_bytes,
            self.p.idle,
        )
    }

    fn protocol(&self, source: ProtocolError) -> Error {
        Error::Protocol {
            channel: self.channel,
            source,
        }
    }

    /// Reads the `len` header bytes the reader needs into it.
    fn read_header(&mut self, len: usize, boundary: bool) -> Result<Got> {
        if self.p.tls.is_none() {
            let buf = [Buf::Slab {
                slot: HEADER_SLOT,
                offset: 0,
                len: len as u32,
            }];
            let got = self.recv(&buf, len as u64, boundary)?;
            if got == Got::All {
                self.reader
                    .header_mut()
                    .copy_from_slice(&self.ring.slot_mut(HEADER_SLOT)[..len]);
            }
            return Ok(got);
        }
        let mut done = 0;
        while done < len {
            let Some(r) = self.tls_plain(len - done, boundary && done == 0)? else {
                return Ok(Got::End);
            };
            let n = r.len();
            self.reader.header_mut()[done..done + n]
                .copy_from_slice(&self.ring.slot_mut(STAGING_SLOT)[r]);
            done += n;
        }
        Ok(Got::All)
    }
}
