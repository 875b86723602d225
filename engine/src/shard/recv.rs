//! The receiver shard: one thread, one ring, one accepted connection.
//!
//! Strictly sequential per channel (a TCP stream is): read the fixed header, read the run list,
//! decode and check everything against the layout, then place the payload. Plaintext channels
//! receive the payload straight into destination memory with one vectored `MSG_WAITALL` receive
//! (one iovec per normal run, no staging copy). TLS channels receive ciphertext into a registered
//! staging slot, open each record in place, and copy its plaintext to the destination pages: a
//! record that fails authentication is refused before any of its bytes is placed. Zero pages are
//! skipped when the destination page is known to be zero (fresh anonymous memory not yet written
//! by this transfer), otherwise zeroed if they are not already. End-of-round markers wait at the
//! shared [`RoundBarrier`].

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::limits::{
    FRAME_HEADER_BYTES_MAX, FRAME_PAYLOAD_BYTES_MAX, FRAME_RUNS_MAX, PAGE_BYTES, RING_WAIT_SLICE_MS,
};
use crate::memory::GuestMemory;
use crate::pipeline::compress::{Codec, Decompressor};
use crate::pipeline::seal::RECORD_BYTES_MAX;
use crate::pipeline::zero::ZeroScanner;
use crate::protocol::channel::Event;
use crate::protocol::control::Control;
use crate::protocol::ledger::PageLedger;
use crate::protocol::reader::{FrameReader, Need};
use crate::protocol::{Frame, ProtocolError};
use crate::simd::xxh3::Xxh3;
use crate::stats::{add, Progress, ShardStats};
use crate::tls::{KeySchedule, Record, RecordStream};
use crate::uring::{advance, errno, Buf, Ring, RingIo};

use super::{Abort, Marker, RoundBarrier, CONTROL_WIRE_BYTES_MAX};

const HEADER_SLOT: u16 = 0;
/// What `wait_one` returns for a retryable result (`EAGAIN`, `EINTR`): post the op again.
const RETRY: i32 = i32::MIN;
const CONTROL_SLOT: u16 = 1;
const STAGING_SLOT: u16 = 2;
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
    pub delay: FrameDelay,
    /// Seeded fault injection between this shard and its ring (test builds).
    #[cfg(feature = "faults")]
    pub fault_seed: Option<u64>,
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
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    All,
    /// The stream ended cleanly before the first byte (TCP FIN, or TLS close_notify).
    End,
}

impl RecvShard {
    pub(crate) fn new(mut p: RecvShardParams, socket: std::net::TcpStream) -> Result<Self> {
        // The staging slot holds TLS records, or a compressed payload, so every receiver has one.
        let slot_bytes = SLOT_BYTES_TLS;
        let mut ring = Ring::new(socket, p.memory.clone(), 3, slot_bytes)?;
        if let Some(tls) = p.tls.as_mut() {
            // Bytes that arrived with the handshake belong to the first records.
            let buffer = std::mem::take(&mut tls.handshake_buffer);
            tls.stream
                .move_to(&buffer, ring.slot_mut(STAGING_SLOT), p.channel)?;
        }
        #[cfg(feature = "faults")]
        let ring = crate::faults::wrap(ring, p.fault_seed, p.channel, p.idle);
        #[cfg(not(feature = "faults"))]
        let ring: Box<dyn RingIo> = Box::new(ring);
        Ok(RecvShard {
            channel: p.channel,
            ring,
            scanner: ZeroScanner::detect(),
            hash: Xxh3::detect(),
            frame: Box::default(),
            reader: FrameReader::new(&p.memory.region_pages(), p.tls.is_none()),
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
                ..ShardStats::default()
            },
            rng: p.delay.seed ^ (u64::from(p.channel) << 32) | 1,
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
                    self.place()?;
                    self.reader.payload_done();
                }
                Event::Aborted => return Err(self.peer_aborted()),
                Event::Keepalive => {}
                Event::EndOfRound(round) => {
                    let waited = Instant::now();
                    self.barrier(Marker::EndOfRound(round))?;
                    self.reader.resume();
                    idle += waited.elapsed();
                }
                Event::EndOfStream => {
                    self.expect_close_notify()?;
                    self.barrier(Marker::EndOfStream(self.reader.round()))?;
                    // Every channel has ended: the image is complete only if every page of
                    // the layout was placed (or declared zero) at least once.
                    if let Some(m) = self.p.ledger.first_missing() {
                        return Err(Error::Incomplete {
                            region: m.region,
                            page: m.page,
                            missing: m.pages,
                        });
                    }
                    self.send_done()?;
                    break;
                }
            }
        }
        self.stats.busy_ms = start.elapsed().saturating_sub(idle).as_secs_f64() * 1e3;
        self.stats.cpu_ms = (crate::sys::thread_cpu_time() - cpu_start).as_secs_f64() * 1e3;
        Ok(())
    }

    /// Reads a sender's abort frame's payload: the error it names.
    fn peer_aborted(&mut self) -> Error {
        let len = self.frame.payload_bytes as usize;
        let mut body = [0u8; 4 + crate::protocol::control::CONTROL_REASON_BYTES_MAX];
        let got = if self.p.tls.is_none() {
            let buf = [Buf::Slab {
                slot: HEADER_SLOT,
                offset: 0,
                len: len as u32,
            }];
            self.recv(&buf, len as u64, false).map(|_| {
                body[..len].copy_from_slice(&self.ring.slot_mut(HEADER_SLOT)[..len]);
            })
        } else {
            let mut done = 0;
            let mut result = Ok(());
            while done < len {
                match self.tls_plain(len - done, false) {
                    Ok(Some(r)) => {
                        let n = r.len();
                        body[done..done + n].copy_from_slice(&self.ring.slot_mut(STAGING_SLOT)[r]);
                        done += n;
                    }
                    Ok(None) => {
                        result = Err(self.cut_short());
                        break;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            result
        };
        if let Err(e) = got {
            return e;
        }
        self.reader.payload_done();
        let (code, reason) = crate::protocol::control::decode_abort_body(&body[..len]);
        Error::PeerAborted {
            channel: self.channel,
            code,
            reason,
        }
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

    /// Places a checked `Pages` frame: zero pages first (no I/O), then the payload.
    fn place(&mut self) -> Result<()> {
        let frame = &*self.frame;
        let region_index = frame.region as usize;
        let region = &self.p.memory.regions()[region_index];
        for run in frame.zero_runs() {
            for page in run.first_page..run.end() {
                if !self.p.ledger.known_zero(frame.region, page)
                    && !region.page_is_zero(&self.scanner, page)
                {
                    region.zero_pages(page, 1);
                }
            }
        }
        self.bufs.clear();
        for run in frame.normal_runs() {
            self.p
                .ledger
                .mark_written(frame.region, run.first_page, u64::from(run.pages));
            self.bufs.push(Buf::Guest {
                region: frame.region,
                offset: run.first_page * PAGE_BYTES as u64,
                len: run.pages * PAGE_BYTES as u32,
            });
        }
        let normal = frame.normal_pages();
        let zero = frame.zero_pages();
        let payload = u64::from(frame.payload_bytes);
        let mut torn = 0u128;
        if frame.codec != Codec::Raw {
            torn = self.place_compressed(payload as usize)?;
        } else if payload > 0 {
            let bufs = std::mem::take(&mut self.bufs);
            let got = if self.p.tls.is_some() {
                self.tls_place(&bufs)
            } else {
                self.recv(&bufs, payload, false).map(drop)
            };
            self.bufs = bufs;
            // The kernel could not write the destination (a truncated or unbackable file).
            got.map_err(|e| match &e {
                Error::Io { source, .. } if source.raw_os_error() == Some(libc::EFAULT) => {
                    Error::MemoryFault {
                        region: self.frame.region,
                        page: self.frame.normal_runs().first().map_or(0, |r| r.first_page),
                    }
                }
                _ => e,
            })?;
        }
        // A user-space store or load that took SIGBUS on a file mapping (see `crate::sigbus`).
        self.p.memory.take_fault()?;
        // A raw payload landed in destination memory: check it there before its pages count.
        if self.frame.codec == Codec::Raw {
            let (memory, hash, region) = (self.p.memory.clone(), self.hash, self.frame.region);
            let region = &memory.regions()[region as usize];
            torn = self.verify(|_, page| region.page_checksum(hash, page))?;
        }
        // Every byte of the frame is in place and checked: its pages count as received (a torn
        // page of a live frame does not, until it arrives intact).
        let frame = &*self.frame;
        let mut i = 0;
        for run in frame.normal_runs() {
            if torn == 0 {
                self.p
                    .ledger
                    .mark_placed(frame.region, run.first_page, u64::from(run.pages));
                continue;
            }
            for page in run.first_page..run.end() {
                if torn & (1 << i) == 0 {
                    self.p.ledger.mark_placed(frame.region, page, 1);
                } else {
                    self.p.ledger.mark_unplaced(frame.region, page, 1);
                }
                i += 1;
            }
        }
        for run in frame.zero_runs() {
            self.p
                .ledger
                .mark_placed(frame.region, run.first_page, u64::from(run.pages));
        }
        self.stats.normal_pages += normal;
        self.stats.zero_pages += zero;
        self.stats.wire_bytes += payload;
        add(&self.p.progress.wire_bytes, payload);
        add(&self.p.progress.pages_done, normal + zero);
        Ok(())
    }

    /// Checks the frame's normal pages against their checksums; `hash_of(i, page)` hashes the
    /// `i`-th normal page (region page `page`). Returns the mask of pages that did not match
    /// in a live frame (a vCPU tore them under the send; the dirty log resends them, so they
    /// are only left un-placed); a mismatch in any other frame fails the transfer, naming the
    /// page.
    fn verify(&mut self, mut hash_of: impl FnMut(usize, u64) -> u64) -> Result<u128> {
        let frame = &*self.frame;
        let Some(sums) = frame.checksums() else {
            return Ok(0);
        };
        let mut torn = 0u128;
        let mut i = 0;
        for run in frame.normal_runs() {
            for page in run.first_page..run.end() {
                if hash_of(i, page) != sums[i] {
                    if !frame.live {
                        return Err(self.protocol(ProtocolError::PayloadChecksum {
                            frame: frame.frame_number,
                            region: frame.region,
                            page,
                        }));
                    }
                    torn |= 1 << i;
                }
                i += 1;
            }
        }
        if torn != 0 {
            self.stats.torn_pages += u64::from(torn.count_ones());
        }
        Ok(torn)
    }

    /// Receives a compressed payload whole (into the staging slot, or out of TLS records into
    /// `packed`), decodes it into `unpacked`, checks it, and places the frame's pages from
    /// there. Returns the mask of torn pages (see [`verify`](Self::verify)).
    fn place_compressed(&mut self, len: usize) -> Result<u128> {
        if self.p.tls.is_some() {
            let mut done = 0;
            while done < len {
                let Some(r) = self.tls_plain(len - done, false)? else {
                    return Err(self.cut_short());
                };
                let n = r.len();
                self.packed[done..done + n].copy_from_slice(&self.ring.slot_mut(STAGING_SLOT)[r]);
                done += n;
            }
        } else {
            let buf = [Buf::Slab {
                slot: STAGING_SLOT,
                offset: 0,
                len: len as u32,
            }];
            self.recv(&buf, len as u64, false)?;
        }
        // Decode into this shard's buffer, then place: decoding straight into guest memory
        // would need `&mut` slices of it, and a hostile peer could name the same page in frames
        // on two channels at once. The copy costs a few percent of the decode.
        let frame = &*self.frame;
        let expected = frame.normal_pages() as usize * PAGE_BYTES;
        let src = if self.p.tls.is_some() {
            &self.packed[..len]
        } else {
            &self.ring.slot_mut(STAGING_SLOT)[..len]
        };
        let out = &mut self.unpacked[..expected];
        self.decompressor
            .decompress(frame.codec, src, expected, std::iter::once(out))
            .map_err(|e| Error::Protocol {
                channel: self.channel,
                source: ProtocolError::Compressed(e),
            })?;
        // Checked before a byte is placed; a torn page of a live frame is not written.
        let hash = self.hash;
        let unpacked = std::mem::take(&mut self.unpacked);
        let torn = self.verify(|i, _| hash.hash(&unpacked[i * PAGE_BYTES..(i + 1) * PAGE_BYTES]));
        self.unpacked = unpacked;
        let torn = torn?;
        let frame = &*self.frame;
        let region = &self.p.memory.regions()[frame.region as usize];
        let mut i = 0;
        for run in frame.normal_runs() {
            for page in run.first_page..run.end() {
                if torn & (1 << i) == 0 {
                    region.write(
                        page * PAGE_BYTES as u64,
                        &self.unpacked[i * PAGE_BYTES..(i + 1) * PAGE_BYTES],
                    );
                }
                i += 1;
            }
        }
        self.stats.compressed_frames += 1;
        Ok(torn)
    }

    /// Copies opened plaintext into the destination ranges `bufs`, record by record.
    fn tls_place(&mut self, bufs: &[Buf]) -> Result<()> {
        for buf in bufs {
            let Buf::Guest {
                region,
                offset,
                len,
            } = *buf
            else {
                continue;
            };
            let mut done = 0u64;
            while done < u64::from(len) {
                let Some(r) = self.tls_plain((u64::from(len) - done) as usize, false)? else {
                    return Err(self.cut_short());
                };
                let n = r.len() as u64;
                let staging = self.ring.slot_mut(STAGING_SLOT);
                self.p.memory.regions()[region as usize].write(offset + done, &staging[r]);
                done += n;
            }
        }
        Ok(())
    }

    fn cut_short(&self) -> Error {
        Error::PeerClosed {
            channel: self.channel,
            when: "in the middle of a frame",
        }
    }

    /// Up to `max` bytes of opened plaintext, as a range of the staging slot; `None` when the
    /// stream ended (close_notify, or a FIN that `boundary` allows to be reported as an end).
    fn tls_plain(&mut self, max: usize, boundary: bool) -> Result<Option<Range<usize>>> {
        loop {
            let Some(tls) = self.p.tls.as_mut() else {
                return Ok(None);
            };
            if !tls.plain.is_empty() {
                let take = max.min(tls.plain.len());
                let r = tls.plain.start..tls.plain.start + take;
                tls.plain.start += take;
                return Ok(Some(r));
            }
            if tls.close_notify {
                return Ok(None);
            }
            if !self.tls_next_record(boundary)? {
                let closed = self.p.tls.as_ref().is_some_and(|t| t.close_notify);
                return if closed || boundary {
                    Ok(None)
                } else {
                    Err(self.cut_short())
                };
            }
        }
    }

    /// Opens the next record (receiving more ciphertext as needed). Returns false at a clean
    /// end: a close_notify (recorded), or a FIN at a frame boundary when `boundary` allows it.
    fn tls_next_record(&mut self, boundary: bool) -> Result<bool> {
        loop {
            let channel = self.channel;
            let staging = self.ring.slot_mut(STAGING_SLOT);
            let Some(tls) = self.p.tls.as_mut() else {
                return Ok(false);
            };
            match tls.stream.next(staging, &mut tls.keys)? {
                Some(Record::Data(plain)) => {
                    tls.plain = plain;
                    if !tls.plain.is_empty() {
                        return Ok(true);
                    }
                    continue;
                }
                Some(Record::CloseNotify) => {
                    tls.close_notify = true;
                    return Ok(false);
                }
                Some(Record::KeyUpdate { requested }) => {
                    // Later records use the next key (the stream moved on); one that asks for
                    // an update in turn is answered on the control direction.
                    if requested {
                        self.answer_key_update()?;
                    }
                    continue;
                }
                None => {}
            }
            // Need more ciphertext: make room, then receive whatever is available.
            let at_boundary = boundary && tls.stream.buffered() == 0;
            let room = tls.stream.room(staging, RECORD_BYTES_MAX);
            let buf = Buf::Slab {
                slot: STAGING_SLOT,
                offset: room.start as u32,
                len: room.len() as u32,
            };
            let n = self.recv_some(buf)?;
            if n == 0 {
                if at_boundary {
                    return Err(Error::PeerClosed {
                        channel,
                        when: "without TLS close_notify (the stream was cut short)",
                    });
                }
                return Err(self.cut_short());
            }
            if let Some(tls) = self.p.tls.as_mut() {
                tls.stream.received(n);
            }
        }
    }

    /// After the end-of-stream frame a TLS channel must close with close_notify: a stream cut
    /// short is an error, never a silent short transfer.
    fn expect_close_notify(&mut self) -> Result<()> {
        if self.p.tls.is_none() {
            return Ok(());
        }
        match self.tls_plain(1, false) {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(self.protocol(ProtocolError::AfterEnd)),
            Err(e) => Err(e),
        }
    }

    /// Waits for the one op in flight to complete. Bounded by the idle bound, measured from the
    /// last byte the kernel received on this connection (`TCP_INFO`), so a slow but moving
    /// payload is fine while a half-sent header followed by silence, or a stopped sender, fails;
    /// between rounds the sender's keepalive frames keep the channel moving.
    fn wait_one(&mut self, what: &str) -> Result<i32> {
        let mut since = Instant::now();
        let mut received = self.ring.bytes_received();
        loop {
            if let Some(c) = self.ring.next_completion() {
                if c.result == -libc::EAGAIN || c.result == -libc::EINTR {
                    return Ok(RETRY);
                }
                if c.result < 0 {
                    return Err(Error::io(
                        format!("{what} on channel {}", self.channel),
                        errno(c.result),
                    ));
                }
                return Ok(c.result);
            }
            if self.p.abort.is_raised() {
                return Err(Error::Aborted);
            }
            let now = self.ring.bytes_received();
            if now != received {
                received = now;
                since = Instant::now();
            }
            if since.elapsed() >= self.p.idle {
                return Err(Error::Timeout {
                    what: format!(
                        "{what} on channel {}: the sender sent nothing meanwhile",
                        self.channel
                    ),
                    ms: self.p.idle.as_millis() as u64,
                });
            }
            self.ring
                .submit_and_wait(1, Duration::from_millis(RING_WAIT_SLICE_MS))?;
        }
    }

    /// Receives exactly `len` bytes into `bufs`. `End` only when the peer closed cleanly before
    /// the first byte and `boundary`; a stream cut anywhere else is an error.
    /// A `MSG_WAITALL` receive can still complete short (a signal, or io_uring's retry limit),
    /// so the rest is posted again; only 0 means the peer closed.
    fn recv(&mut self, bufs: &[Buf], len: u64, boundary: bool) -> Result<Got> {
        let mut done = 0u64;
        while done < len {
            self.ring.push_recv(1, bufs, done);
            let got = self.wait_one("receiving")?;
            if got == RETRY {
                continue;
            }
            let got = got as u64;
            if got == 0 {
                return if done == 0 && boundary {
                    Ok(Got::End)
                } else {
                    Err(self.cut_short())
                };
            }
            done += got;
        }
        Ok(Got::All)
    }

    /// Receives what is available into `buf`; 0 at end of stream.
    fn recv_some(&mut self, buf: Buf) -> Result<usize> {
        loop {
            self.ring.push_recv_some(1, buf);
            match self.wait_one("receiving")? {
                RETRY => continue,
                n => return Ok(n as usize),
            }
        }
    }

    /// Sends our own KeyUpdate (sealed with the old sending key) and moves to the next key.
    fn answer_key_update(&mut self) -> Result<()> {
        let Some(tls) = self.p.tls.as_mut() else {
            return Ok(());
        };
        let next = tls.keys.next_sealer()?;
        let mut msg = [0u8; CONTROL_WIRE_BYTES_MAX];
        let n = self
            .p
            .abort
            .encode_key_update(self.p.peer, next, &mut msg)?;
        self.send_control(&msg[..n], "answering a TLS key update")
    }

    /// Sends `bytes` on the control direction and waits until all of them are sent.
    fn send_control(&mut self, bytes: &[u8], what: &str) -> Result<()> {
        self.ring.slot_mut(CONTROL_SLOT)[..bytes.len()].copy_from_slice(bytes);
        let buf = Buf::Slab {
            slot: CONTROL_SLOT,
            offset: 0,
            len: bytes.len() as u32,
        };
        let mut done = 0u64;
        while done < bytes.len() as u64 {
            self.ring
                .push_send(2, advance(buf, done), false, false, None);
            match self.wait_one(what)? {
                RETRY => {}
                n => done += n as u64,
            }
        }
        Ok(())
    }

    fn send_done(&mut self) -> Result<()> {
        let mut msg = [0u8; CONTROL_WIRE_BYTES_MAX];
        let n = self
            .p
            .abort
            .encode_control(self.p.peer, &Control::Done, &mut msg)?;
        self.send_control(&msg[..n], "confirming the end of the transfer")
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
