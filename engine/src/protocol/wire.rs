//! Frame encoding and decoding (see the [module docs](super) for the layout).
//!
//! Encoding writes into a caller-owned buffer (a slot of a registered buffer) and returns the
//! bytes written; decoding is split in two steps because the fixed part says how many run bytes
//! follow: [`decode_fixed`] then [`decode_runs`]. Both check everything they can check without
//! knowing the layout; [`ReceiverChannel`](super::ReceiverChannel) checks the rest.

use crate::limits::{CHUNK_PAGES_MAX, FRAME_FIXED_BYTES, FRAME_RUNS_MAX, RUN_BYTES};
use crate::pipeline::compress::Codec;

use super::ProtocolError;

const FRAME_MAGIC: [u8; 2] = *b"PW";

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Reserved; never valid on the wire.
    Invalid = 0,
    /// Pages of one region: normal pages as payload, zero pages listed only.
    Pages = 1,
    /// The sender finished a round on this channel.
    EndOfRound = 2,
    /// The sender finished the transfer on this channel.
    EndOfStream = 3,
    /// Nothing to send right now: the sender is alive (between rounds of a live migration), so
    /// the receiver's idle bound can stay short.
    Keepalive = 4,
    /// The sender failed: the payload is an abort code (u32) and its reason (UTF-8), as in
    /// [`Control::Abort`](super::control::Control::Abort), so both sides name the same cause.
    Abort = 5,
    /// A chunk of the VMM's device state after the last round (see [`super::blob`]).
    DeviceState = 6,
}

impl FrameKind {
    fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        match v {
            1 => Ok(FrameKind::Pages),
            2 => Ok(FrameKind::EndOfRound),
            3 => Ok(FrameKind::EndOfStream),
            4 => Ok(FrameKind::Keepalive),
            5 => Ok(FrameKind::Abort),
            6 => Ok(FrameKind::DeviceState),
            other => Err(ProtocolError::BadKind(other)),
        }
    }
}

/// Consecutive pages of one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Run {
    /// Index of the first page within its region.
    pub first_page: u64,
    /// Number of pages (at least 1 on the wire).
    pub pages: u32,
}

impl Run {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first_page + u64::from(self.pages)
    }
}

/// A decoded or to-be-encoded frame header. Holds its runs inline (no allocation), so one
/// `Frame` per shard is reused for every frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame kind.
    pub kind: FrameKind,
    /// Region the runs belong to (0 for markers).
    pub region: u32,
    /// Per-channel sequence number, from 0.
    pub frame_number: u64,
    /// Round the frame belongs to.
    pub round: u32,
    /// Bytes of payload after the header.
    pub payload_bytes: u32,
    /// How the payload encodes the normal pages (frame flags bits 0–1).
    pub codec: Codec,
    /// The sender's memory may change under this frame (a live pre-copy round; flags bit 2):
    /// a checksum mismatch then means a page torn by a vCPU write, which the dirty log resends,
    /// so the receiver un-places the frame's pages instead of failing.
    pub live: bool,
    /// One XXH3-64 per normal page, in payload order, of its uncompressed bytes (flags bit 3:
    /// present). Plaintext senders always send them; under TLS every record's AEAD tag already
    /// authenticates the payload, so they are left out.
    checksums: [u64; CHUNK_PAGES_MAX],
    checksums_len: Option<usize>,
    normal: [Run; FRAME_RUNS_MAX],
    normal_len: usize,
    zero: [Run; FRAME_RUNS_MAX],
    zero_len: usize,
}

impl Default for Frame {
    fn default() -> Self {
        Frame {
            kind: FrameKind::Invalid,
            region: 0,
            frame_number: 0,
            round: 0,
            payload_bytes: 0,
            codec: Codec::Raw,
            live: false,
            checksums: [0; CHUNK_PAGES_MAX],
            checksums_len: None,
            normal: [Run::default(); FRAME_RUNS_MAX],
            normal_len: 0,
            zero: [Run::default(); FRAME_RUNS_MAX],
            zero_len: 0,
        }
    }
}

/// The encode buffer was too small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer of {have} bytes is too small for a {need}-byte frame header")]
pub struct BufferTooSmall {
    /// Bytes needed.
    pub need: usize,
    /// Bytes available.
    pub have: usize,
}

/// The run list of a frame is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a frame holds at most {FRAME_RUNS_MAX} runs")]
pub struct RunsFull;

impl Frame {
    /// Resets to an empty frame of `kind`, keeping the storage.
    pub fn reset(&mut self, kind: FrameKind, region: u32, frame_number: u64, round: u32) {
        self.kind = kind;
        self.region = region;
        self.frame_number = frame_number;
        self.round = round;
        self.payload_bytes = 0;
        self.codec = Codec::Raw;
        self.live = false;
        self.checksums_len = None;
        self.normal_len = 0;
        self.zero_len = 0;
    }

    /// Runs of normal pages, whose bytes form the payload in this order.
    pub fn normal_runs(&self) -> &[Run] {
        &self.normal[..self.normal_len]
    }

    /// Runs of zero pages (no payload).
    pub fn zero_runs(&self) -> &[Run] {
        &self.zero[..self.zero_len]
    }

    /// Normal pages in the frame.
    pub fn normal_pages(&self) -> u64 {
        self.normal_runs().iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Zero pages in the frame.
    pub fn zero_pages(&self) -> u64 {
        self.zero_runs().iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Adds one page to the normal (`zero == false`) or zero list, extending the last run when
    /// the page follows it. Pages must be added in ascending order.
    pub fn push_page(&mut self, page: u64, zero: bool) -> Result<(), RunsFull> {
        let (runs, len) = if zero {
            (&mut self.zero, &mut self.zero_len)
        } else {
            (&mut self.normal, &mut self.normal_len)
        };
        if *len > 0 {
            let last = &mut runs[*len - 1];
            if last.end() == page && last.pages < u32::MAX {
                last.pages += 1;
                return Ok(());
            }
        }
        if *len == FRAME_RUNS_MAX {
            return Err(RunsFull);
        }
        runs[*len] = Run {
            first_page: page,
            pages: 1,
        };
        *len += 1;
        Ok(())
    }

    /// Starts the frame's page checksums (pushed with [`push_checksum`](Self::push_checksum),
    /// one per normal page in order).
    pub fn begin_checksums(&mut self) {
        self.checksums_len = Some(0);
    }

    /// Adds the checksum of the next normal page. Panics past `CHUNK_PAGES_MAX` (our bug).
    pub fn push_checksum(&mut self, checksum: u64) {
        let n = self.checksums_len.get_or_insert(0);
        self.checksums[*n] = checksum;
        *n += 1;
    }

    /// The per-page checksums, when the frame carries them.
    pub fn checksums(&self) -> Option<&[u64]> {
        self.checksums_len.map(|n| &self.checksums[..n])
    }

    /// Bytes the encoded header takes.
    pub fn header_bytes(&self) -> usize {
        FRAME_FIXED_BYTES
            + RUN_BYTES * (self.normal_len + self.zero_len)
            + CHECKSUM_BYTES * self.checksums_len.unwrap_or(0)
    }

    /// Encodes the header into `out`, returning the bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let need = self.header_bytes();
        if out.len() < need {
            return Err(BufferTooSmall {
                need,
                have: out.len(),
            });
        }
        // Destructure so that a new field cannot be forgotten here.
        let Frame {
            kind,
            region,
            frame_number,
            round,
            payload_bytes,
            codec,
            live,
            checksums,
            checksums_len,
            normal: _,
            normal_len,
            zero: _,
            zero_len,
        } = self;
        assert!(
            checksums_len.is_none_or(|n| n as u64 == self.normal_pages()),
            "a frame needs one checksum per normal page"
        );
        let out = &mut out[..need];
        out[0..2].copy_from_slice(&FRAME_MAGIC);
        out[2] = *kind as u8;
        out[3] = *codec as u8
            | if *live { FLAG_LIVE } else { 0 }
            | if checksums_len.is_some() {
                FLAG_CHECKSUM
            } else {
                0
            };
        out[4..8].copy_from_slice(&region.to_le_bytes());
        out[8..16].copy_from_slice(&frame_number.to_le_bytes());
        out[16..20].copy_from_slice(&round.to_le_bytes());
        // Both lengths are at most FRAME_RUNS_MAX, asserted below u16::MAX in limits.
        out[20..22].copy_from_slice(&(*normal_len as u16).to_le_bytes());
        out[22..24].copy_from_slice(&(*zero_len as u16).to_le_bytes());
        out[24..28].copy_from_slice(&payload_bytes.to_le_bytes());
        let mut at = FRAME_FIXED_BYTES;
        for run in self.normal_runs().iter().chain(self.zero_runs()) {
            out[at..at + 8].copy_from_slice(&run.first_page.to_le_bytes());
            out[at + 8..at + 12].copy_from_slice(&run.pages.to_le_bytes());
            at += RUN_BYTES;
        }
        for sum in &checksums[..checksums_len.unwrap_or(0)] {
            out[at..at + CHECKSUM_BYTES].copy_from_slice(&sum.to_le_bytes());
            at += CHECKSUM_BYTES;
        }
        let crc = header_crc(out);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        Ok(need)
    }
}

/// Frame flags bit 2: the sender's memory may change under the frame (a live round).
const FLAG_LIVE: u8 = 1 << 2;
/// Frame flags bit 3: the runs are followed by one checksum per normal page.
const FLAG_CHECKSUM: u8 = 1 << 3;
/// Bytes of one page checksum.
pub const CHECKSUM_BYTES: usize = 8;
/// Flag bits v2 defines; the others must be zero.
const FLAGS_KNOWN: u8 = 0b11 | FLAG_LIVE | FLAG_CHECKSUM;

/// CRC32C over bytes 0..28, the runs and the checksums of an encoded header (the CRC field
/// excluded).
fn header_crc(header: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[..28]);
    crc32c::crc32c_append(crc, &header[FRAME_FIXED_BYTES..])
}

/// The fixed 32-byte part of a frame header, checked for magic, kind, reserved bits and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    bytes: [u8; FRAME_FIXED_BYTES],
    normal_runs: u16,
    zero_runs: u16,
}

impl FixedHeader {
    /// Bytes of run list that follow the fixed part.
    pub fn runs_bytes(&self) -> usize {
        RUN_BYTES * (usize::from(self.normal_runs) + usize::from(self.zero_runs))
    }

    /// Bytes of page checksums that follow the runs (`runs`, this header's run list, says how
    /// many normal pages there are). Refuses more normal pages than a frame holds, before
    /// anything is read for them.
    pub fn checksums_bytes(&self, runs: &[u8]) -> Result<usize, ProtocolError> {
        if self.bytes[3] & FLAG_CHECKSUM == 0 {
            return Ok(0);
        }
        let mut pages = 0u64;
        for raw in runs
            .chunks_exact(RUN_BYTES)
            .take(usize::from(self.normal_runs))
        {
            pages += u64::from(u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]));
        }
        if pages > CHUNK_PAGES_MAX as u64 {
            return Err(ProtocolError::TooLarge {
                what: "pages in a frame",
                value: pages,
                max: CHUNK_PAGES_MAX as u64,
            });
        }
        Ok(CHECKSUM_BYTES * pages as usize)
    }
}

/// Decodes and checks the fixed part of a frame header.
pub fn decode_fixed(bytes: &[u8]) -> Result<FixedHeader, ProtocolError> {
    let Some(fixed) = bytes.get(..FRAME_FIXED_BYTES) else {
        return Err(ProtocolError::Truncated {
            what: "frame header",
            need: FRAME_FIXED_BYTES,
            have: bytes.len(),
        });
    };
    if fixed[0..2] != FRAME_MAGIC {
        return Err(ProtocolError::BadMagic {
            what: "frame header",
        });
    }
    FrameKind::from_u8(fixed[2])?;
    if fixed[3] & !FLAGS_KNOWN != 0 || Codec::from_bits(fixed[3] & 0b11).is_none() {
        return Err(ProtocolError::Reserved("frame flags"));
    }
    let normal_runs = u16::from_le_bytes([fixed[20], fixed[21]]);
    let zero_runs = u16::from_le_bytes([fixed[22], fixed[23]]);
    let runs = u64::from(normal_runs) + u64::from(zero_runs);
    if runs > FRAME_RUNS_MAX as u64 {
        return Err(ProtocolError::TooLarge {
            what: "run count",
            value: runs,
            max: FRAME_RUNS_MAX as u64,
        });
    }
    let mut copy = [0u8; FRAME_FIXED_BYTES];
    copy.copy_from_slice(fixed);
    Ok(FixedHeader {
        bytes: copy,
        normal_runs,
        zero_runs,
    })
}

/// Decodes the run list and page checksums that follow `fixed` (`rest`: the runs, then
/// [`FixedHeader::checksums_bytes`] of checksums) into `frame`, verifying the header CRC and
/// the shape of the runs (non-empty, sorted, disjoint). Layout checks are the channel's job.
pub fn decode_runs(
    fixed: &FixedHeader,
    rest: &[u8],
    frame: &mut Frame,
) -> Result<(), ProtocolError> {
    let runs_bytes = fixed.runs_bytes();
    let Some(runs) = rest.get(..runs_bytes) else {
        return Err(ProtocolError::Truncated {
            what: "frame run list",
            need: runs_bytes,
            have: rest.len(),
        });
    };
    let need = runs_bytes + fixed.checksums_bytes(runs)?;
    let Some(all) = rest.get(..need) else {
        return Err(ProtocolError::Truncated {
            what: "frame page checksums",
            need,
            have: rest.len(),
        });
    };
    let b = &fixed.bytes;
    let expected = u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), all);
    if expected != computed {
        return Err(ProtocolError::BadChecksum { expected, computed });
    }
    let kind = FrameKind::from_u8(b[2])?;
    let region = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let frame_number = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    let round = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    frame.reset(kind, region, frame_number, round);
    frame.payload_bytes = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    frame.codec = Codec::from_bits(b[3] & 0b11).ok_or(ProtocolError::Reserved("frame flags"))?;
    frame.live = b[3] & FLAG_LIVE != 0;
    if b[3] & FLAG_CHECKSUM != 0 {
        frame.begin_checksums();
        for raw in all[runs_bytes..].chunks_exact(CHECKSUM_BYTES) {
            let mut sum = [0u8; CHECKSUM_BYTES];
            sum.copy_from_slice(raw);
            frame.push_checksum(u64::from_le_bytes(sum));
        }
    }
    let normal = usize::from(fixed.normal_runs);
    for (i, raw) in runs.chunks_exact(RUN_BYTES).enumerate() {
        let mut first = [0u8; 8];
        first.copy_from_slice(&raw[..8]);
        let run = Run {
            first_page: u64::from_le_bytes(first),
            pages: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
        };
        if i < normal {
            frame.normal[frame.normal_len] = run;
            frame.normal_len += 1;
        } else {
            frame.zero[frame.zero_len] = run;
            frame.zero_len += 1;
        }
    }
    check_runs_disjoint(frame)
}

/// Runs of each list must be non-empty and ascending, and no page may appear twice across both
/// lists. Both lists are sorted, so a merge walk checks it in one pass without allocating.
fn check_runs_disjoint(frame: &Frame) -> Result<(), ProtocolError> {
    let (mut n, mut z) = (frame.normal_runs().iter(), frame.zero_runs().iter());
    let (mut next_n, mut next_z) = (n.next(), z.next());
    let mut end = 0u64;
    let mut first = true;
    loop {
        let run = match (next_n, next_z) {
            (None, None) => return Ok(()),
            (Some(a), Some(b)) if a.first_page <= b.first_page => {
                next_n = n.next();
                a
            }
            (Some(a), None) => {
                next_n = n.next();
                a
            }
            (_, Some(b)) => {
                next_z = z.next();
                b
            }
        };
        if run.pages == 0 || (!first && run.first_page < end) {
            return Err(ProtocolError::RunOrder(run.first_page));
        }
        end = run
            .first_page
            .checked_add(u64::from(run.pages))
            .ok_or(ProtocolError::RunOrder(run.first_page))?;
        first = false;
    }
}

#[cfg(test)]
mod tests;
