//! Wire protocol v2, sans-IO: bytes in, bytes and events out. Nothing here touches a socket or a
//! clock, so the fuzzers and simulated-network tests drive exactly the code the shards run.
//!
//! # One transfer
//!
//! A transfer moves a *layout* (an ordered list of regions, each a guest-physical start and a
//! length in whole pages) over N TCP connections, the *channels*. Every channel carries the same
//! conversation:
//!
//! ```text
//!  sender shard i                                   receiver shard i
//!  ─────────────                                    ────────────────
//!  Hello{magic, version, session, i, N,      ───▶  check magic, version, session, channel
//!        page size, layout digest, features}        index unique and < N, page size, layout
//!                                            ◀───  Reply{status, detail} (status ≠ 0: refused, the
//!                                                   sender reports the reason, the receiver logs it,
//!                                                   drops the connection and keeps listening; when
//!                                                   accepted, detail is the receiver's idle bound in ms)
//!  Pages{frame 0, round 0, region, runs}     ───▶  check every field, then place the payload
//!        + payload (the normal pages)               straight into destination memory, zero or
//!  Pages{frame 1, round 0, …} + payload      ───▶  skip the zero pages
//!  EndOfRound{frame k, round 0}              ───▶  wait at the round barrier until every channel
//!                                                   has finished round 0
//!                                            ◀───  Control::RoundPlaced{0}   (every channel placed
//!                                                   round 0; a live migration waits for it)
//!  Pages{frame k+1, round 1, …} + payload    ───▶  …
//!  Keepalive{frame k+2, round 1}             ───▶  (sender idle, e.g. between live rounds: sent
//!                                                   every quarter of the receiver's idle bound)
//!  DeviceState{frame m, round r}             ───▶  (live migration, channel 0, after the last round:
//!        + chunk header and bytes                   the VMM's device state, reassembled into
//!                                                   tagged blobs and checked; see [`blob`])
//!  EndOfStream{frame n, round r}             ───▶  barrier; when all channels are done and every
//!                                                   page of the layout was placed or declared zero:
//!                                            ◀───  Control::Done   (otherwise Abort naming the first
//!                                                   page never received)
//!  close                                             close
//! ```
//! At any point a receiver that fails sends `Control::Abort{code, reason}` on every channel it can
//! and closes them; the sender reports that reason. A sender that fails sends an `Abort` frame
//! (kind 5: an abort code and its reason as payload) after the frames it already built, when its
//! connection still takes it, so both sides name the same cause. Senders never send control
//! messages.
//!
//! # Encoding
//! All integers are little-endian and at fixed offsets. A frame is a 32-byte fixed header, then
//! `normal_runs + zero_runs` runs of 12 bytes, then (flags bit 3) one 8-byte checksum per normal
//! page, then `payload_bytes` of payload:
//!
//! ```text
//!  0      2     3      4         8              16       20        22      24         28      32
//!  ┌──────┬─────┬──────┬─────────┬──────────────┬────────┬─────────┬───────┬──────────┬───────┐
//!  │"PW"  │kind │flags │region   │frame number  │round   │normal   │zero   │payload   │crc32c │
//!  │u16   │u8   │      │u32      │u64           │u32     │runs u16 │runs u16│bytes u32│u32    │
//!  └──────┴─────┴──────┴─────────┴──────────────┴────────┴─────────┴───────┴──────────┴───────┘
//!  flags: bits 0-1 codec, bit 2 live round, bit 3 page checksums follow the runs; bits 4-7 zero
//!  run: first page u64 (index within the region) │ page count u32
//!  page checksum: XXH3-64 u64 of one normal page's 4096 bytes, in payload order
//! ```
//! The CRC32C covers bytes 0..28, the runs and the checksums, so a garbled header is refused
//! before anything is written. Plaintext senders send page checksums (unless the hello
//! announced [`FEATURE_UNCHECKED_PAGES`](handshake::FEATURE_UNCHECKED_PAGES) and the receiver
//! accepted it: then TCP's checksum alone covers the pages) and the receiver checks every page
//! before it counts as placed: a raw payload is received straight into
//! destination memory and checked there, a compressed one after decoding and before a byte of
//! it is placed. A mismatch fails the transfer naming the region and page, unless the frame is
//! marked *live* (sent while vCPUs run): a vCPU may then have torn the page under the send,
//! which its dirty log resends in a later round, so only that page is left un-placed, and the
//! final check refuses success if it never arrives intact. Under TLS the AEAD tag of every
//! record already authenticates the payload, so no checksums travel.
//! Frame numbers count
//! from 0 on each channel with no gaps. Kinds: 0 is reserved as invalid, 1 `Pages`,
//! 2 `EndOfRound`, 3 `EndOfStream`, 4 `Keepalive`, 5 `Abort` (v2). The flags byte holds the payload's codec (0 raw, 1 zstd,
//! 2 zlib; other bits reserved, announced by the hello's feature bits). A raw payload is exactly
//! the normal pages; a compressed one is non-empty, smaller than them, and must decode to exactly
//! them. Runs are sorted, never overlap, lie inside their region, and cover at most
//! [`CHUNK_PAGES_MAX`](crate::limits::CHUNK_PAGES_MAX) pages.
//!
//! # Ordering across channels and rounds
//! A page sent again in round r+1, possibly over another channel, must never be overwritten by
//! its round-r copy arriving late. pagewire uses a **per-round barrier at the receiver**, like
//! QEMU multifd's SYNC packet but without a round trip: each sender shard ends a round with an
//! `EndOfRound` frame; a receiver shard that reads it waits until every channel has read its own
//! before reading on. A round ends the same way on every channel: one channel's `EndOfStream`
//! meeting another's `EndOfRound` at the barrier is a protocol error at once, not a wait. Within
//! one round a page appears in at most one frame (the sender refuses
//! overlapping runs), so no two copies of a page are ever in flight to the destination at once.
//! Round stamps (keep the highest round per page, drop older) would avoid the wait but need
//! per-page state written atomically with the page itself, which the kernel's copy into
//! destination memory cannot give.
//!
//! # Version policy
//! The handshake carries the protocol version. A receiver accepts exactly the versions it
//! implements (v2 today: v2 added `Keepalive` frames and the idle bound in the reply) and otherwise refuses with `VersionUnsupported` naming its own, so an
//! operator sees which side to upgrade. New optional behaviour arrives as feature bits, which a
//! receiver refuses when it does not know them; any change to the meaning or layout of an
//! existing field bumps the version. Reserved fields and flags must be zero and are checked.

#![forbid(unsafe_code)]

pub mod blob;
pub mod channel;
pub mod control;
pub mod handshake;
pub mod ledger;
pub mod reader;
pub mod sender;
pub mod wire;

pub use channel::{ReceiverChannel, SenderChannel};
pub use sender::SenderMachine;
pub use wire::{Frame, FrameKind, Run};

/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// Why bytes from the peer were refused. Every variant is a fact about the input, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The input ended before the structure was complete.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes the structure needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Magic bytes did not match; the peer is not speaking pagewire (or the stream lost sync).
    #[error("bad magic in {what}: the peer is not speaking pagewire v2 here (a TLS peer meeting a plaintext one looks like this)")]
    BadMagic {
        /// What was being decoded.
        what: &'static str,
    },
    /// The checksum over the header did not match its contents.
    #[error(
        "frame header checksum mismatch (expected {expected:#010x}, computed {computed:#010x})"
    )]
    BadChecksum {
        /// Value in the header.
        expected: u32,
        /// Value computed over the bytes received.
        computed: u32,
    },
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// A reserved field or flag was not zero.
    #[error("reserved field {0} is not zero")]
    Reserved(&'static str),
    /// A count exceeds its limit.
    #[error("{what} is {value}, more than the limit {max}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A frame arrived out of sequence.
    #[error("frame number {got}, expected {expected}")]
    FrameNumber {
        /// Expected frame number.
        expected: u64,
        /// Received frame number.
        got: u64,
    },
    /// A frame belongs to another round than the channel is in.
    #[error("frame for round {got} while in round {expected}")]
    Round {
        /// Current round.
        expected: u32,
        /// Round in the frame.
        got: u32,
    },
    /// A frame names a region the layout does not have.
    #[error("region {region} does not exist (layout has {regions})")]
    Region {
        /// Region index in the frame.
        region: u32,
        /// Regions in the layout.
        regions: usize,
    },
    /// A run lies (partly) outside its region.
    #[error("run of {pages} pages at page {first_page} lies outside region {region} ({region_pages} pages)")]
    RunOutOfBounds {
        /// Region index.
        region: u32,
        /// First page of the run.
        first_page: u64,
        /// Pages in the run.
        pages: u32,
        /// Pages in the region.
        region_pages: u64,
    },
    /// Runs are empty, unsorted or overlap.
    #[error("page runs are empty, unsorted or overlapping at page {0}")]
    RunOrder(u64),
    /// The payload length does not match the pages the header declares.
    #[error("payload is {got} bytes but the header declares {expected}")]
    PayloadLength {
        /// Bytes implied by the page list.
        expected: u64,
        /// Bytes in the header.
        got: u64,
    },
    /// A marker frame carried pages or payload.
    #[error("{0} frame carries pages or payload")]
    MarkerWithPayload(&'static str),
    /// Data arrived after the end-of-stream marker.
    #[error("data after the end of the stream")]
    AfterEnd,
    /// The receiver confirmed the end before this side ended the stream, or twice.
    #[error("the receiver confirmed an end this side had not sent (or confirmed it twice)")]
    UnexpectedDone,
    /// A frame's payload does not match its checksum (corrupted on the way).
    #[error("payload checksum mismatch for page {page} of region {region} (frame {frame}): the data was corrupted on the way")]
    PayloadChecksum {
        /// Frame number.
        frame: u64,
        /// Region of the page.
        region: u32,
        /// The page whose bytes do not match.
        page: u64,
    },
    /// A plaintext frame with a payload but no checksum.
    #[error("a frame with a payload carries no checksum (plaintext senders must send one)")]
    ChecksumMissing,
    /// Channels ended a round differently (one ended the stream while another ended a round, or
    /// they ended different rounds).
    #[error("channels disagree at the round barrier: {0}")]
    MixedMarkers(String),
    /// Pages or the end of a round after device state, which comes after the last round.
    #[error("pages or the end of a round after the device state (it comes after the last round)")]
    AfterDeviceState,
    /// A device state chunk was refused (see [`blob`]).
    #[error("device state refused: {0}")]
    BlobRefused(&'static str),
    /// A compressed payload did not decode to exactly the frame's pages.
    #[error("compressed frame refused")]
    Compressed(#[source] crate::pipeline::compress::DecompressError),
}
