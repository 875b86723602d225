//! The per-connection handshake: the sender's `Hello`, the receiver's `Reply`, and the
//! [`Acceptor`] that checks every channel of one transfer against the first.
//!
//! ```text
//!  Hello, 96 bytes                                   Reply, 16 bytes
//!  0  magic "PAGEWIRE"       36 feature flags u32    0  magic "PAGEWIRE"
//!  8  version u16            40 layout digest u64    8  receiver's version u16
//!  10 hello bytes u16 (=96)  48 layout bytes u64     10 status u16 (0 = accepted)
//!  12 channel index u16      56 region count u32     12 detail u32 (refused: the receiver's value;
//!  14 channel count u16      60 sender nonce [u8; 16]    accepted: its idle bound in ms)
//!  16 session id [u8; 16]    76 reserved (16, zero)
//!  32 page bytes u32         92 crc32c of 0..92
//! ```
//! With a pre-shared key (feature bit [`FEATURE_PSK`]) the hello is followed by a challenge and
//! a proof (see [`crate::auth`]) before the reply, which then travels sealed with keys derived
//! from the key and both nonces; the key itself never crosses the wire.

use std::fmt;

use crate::config::{HINT_ACCEPT_UNCHECKED, HINT_SENDER_PSK, HINT_SENDER_TLS};
use crate::limits::{CHANNELS_MAX, HELLO_BYTES};

use super::{ProtocolError, PROTOCOL_VERSION};

const MAGIC: [u8; 8] = *b"PAGEWIRE";

/// Feature bit: the sender may send zstd-compressed frames.
pub const FEATURE_ZSTD: u32 = 1 << 0;
/// Feature bit: the sender may send zlib-compressed frames.
pub const FEATURE_ZLIB: u32 = 1 << 1;
/// Feature bit: the sender authenticates with a pre-shared key; a challenge follows the hello.
pub const FEATURE_PSK: u32 = 1 << 2;
/// Feature bit: the sender's plaintext frames carry no page checksums
/// ([`SenderConfig::page_checksums`](crate::SenderConfig::page_checksums) off), so its pages are
/// covered by TCP's checksum only. A receiver accepts it only when told to
/// ([`ReceiverConfig::accept_unchecked_pages`](crate::ReceiverConfig::accept_unchecked_pages));
/// otherwise it refuses with [`Refusal::ChecksumsRequired`].
pub const FEATURE_UNCHECKED_PAGES: u32 = 1 << 3;
/// Feature bits a receiver understands. (TLS needs none: it is visible before the hello.)
pub const FEATURES_KNOWN: u32 = FEATURE_ZSTD | FEATURE_ZLIB | FEATURE_PSK | FEATURE_UNCHECKED_PAGES;

/// The sender's opening message on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the sender speaks.
    pub version: u16,
    /// Index of this channel, `0..channel_count`.
    pub channel_index: u16,
    /// Channels in this transfer.
    pub channel_count: u16,
    /// Random id shared by every channel of one transfer.
    pub session_id: [u8; 16],
    /// Bytes per page.
    pub page_bytes: u32,
    /// Feature flags the sender will use.
    pub features: u32,
    /// Digest of the region layout ([`layout_digest`]).
    pub layout_digest: u64,
    /// Total bytes of all regions.
    pub layout_bytes: u64,
    /// Regions in the layout.
    pub region_count: u32,
    /// Fresh random bytes per connection (the pre-shared-key challenge mixes them in).
    pub nonce: [u8; 16],
}

impl Hello {
    /// Encodes into `HELLO_BYTES` (96) bytes.
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let Hello {
            version,
            channel_index,
            channel_count,
            session_id,
            page_bytes,
            features,
            layout_digest,
            layout_bytes,
            region_count,
            nonce,
        } = self;
        let mut b = [0u8; HELLO_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&version.to_le_bytes());
        b[10..12].copy_from_slice(&(HELLO_BYTES as u16).to_le_bytes());
        b[12..14].copy_from_slice(&channel_index.to_le_bytes());
        b[14..16].copy_from_slice(&channel_count.to_le_bytes());
        b[16..32].copy_from_slice(session_id);
        b[32..36].copy_from_slice(&page_bytes.to_le_bytes());
        b[36..40].copy_from_slice(&features.to_le_bytes());
        b[40..48].copy_from_slice(&layout_digest.to_le_bytes());
        b[48..56].copy_from_slice(&layout_bytes.to_le_bytes());
        b[56..60].copy_from_slice(&region_count.to_le_bytes());
        b[60..76].copy_from_slice(nonce);
        let crc = crc32c::crc32c(&b[..92]);
        b[92..96].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks framing (magic, length, checksum). Semantic checks are [`Acceptor`]'s.
    pub fn decode(b: &[u8]) -> Result<Hello, ProtocolError> {
        if b.len() < 8 || b[0..8] != MAGIC {
            return Err(ProtocolError::BadMagic { what: "hello" });
        }
        if b.len() < HELLO_BYTES {
            return Err(ProtocolError::Truncated {
                what: "hello",
                need: HELLO_BYTES,
                have: b.len(),
            });
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let expected = u32_at(92);
        let computed = crc32c::crc32c(&b[..92]);
        if expected != computed {
            return Err(ProtocolError::BadChecksum { expected, computed });
        }
        if usize::from(u16_at(10)) != HELLO_BYTES {
            return Err(ProtocolError::Reserved("hello length"));
        }
        if b[76..92].iter().any(|&x| x != 0) {
            return Err(ProtocolError::Reserved("hello"));
        }
        let mut session_id = [0u8; 16];
        session_id.copy_from_slice(&b[16..32]);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[60..76]);
        Ok(Hello {
            version: u16_at(8),
            channel_index: u16_at(12),
            channel_count: u16_at(14),
            session_id,
            page_bytes: u32_at(32),
            features: u32_at(36),
            layout_digest: u64_at(40),
            layout_bytes: u64_at(48),
            region_count: u32_at(56),
            nonce,
        })
    }
}

/// Why a receiver refused a channel. Sent in the reply's status field, so both sides report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The hello was malformed (magic, length or checksum).
    Malformed,
    /// The receiver does not speak the sender's version; `receiver` is the one it speaks.
    VersionUnsupported {
        /// The receiver's version.
        receiver: u16,
    },
    /// Another transfer's session id arrived while this one was in progress.
    SessionMismatch,
    /// Channel count differs from the first channel's or the receiver's configuration.
    ChannelCountMismatch {
        /// The count the receiver expects.
        expected: u16,
    },
    /// Channel index outside `0..count`.
    ChannelOutOfRange,
    /// The same channel index arrived twice.
    ChannelDuplicate,
    /// Page size differs.
    PageSizeMismatch {
        /// The receiver's page size.
        expected: u32,
    },
    /// The region layout differs (sizes or addresses).
    LayoutMismatch {
        /// The receiver's total bytes (low 32 bits are shown, which is enough to tell).
        expected_mib: u32,
    },
    /// The sender wants a feature the receiver does not have or has not enabled.
    FeatureUnsupported {
        /// Feature bits the receiver would accept.
        accepted: u32,
    },
    /// The receiver requires TLS and the sender spoke plaintext.
    TlsRequired,
    /// The receiver requires a pre-shared key and the sender offered none.
    PskRequired,
    /// The sender offered a pre-shared key the receiver does not have configured.
    PskUnsupported,
    /// The sender's proof did not match: it holds another key.
    PskMismatch,
    /// The sender sends pages without checksums ([`FEATURE_UNCHECKED_PAGES`]) and the receiver
    /// was not told to accept them.
    ChecksumsRequired,
}

impl Refusal {
    /// Wire status code and detail.
    pub fn to_wire(self) -> (u16, u32) {
        match self {
            Refusal::Malformed => (1, 0),
            Refusal::VersionUnsupported { receiver } => (2, u32::from(receiver)),
            Refusal::SessionMismatch => (3, 0),
            Refusal::ChannelCountMismatch { expected } => (4, u32::from(expected)),
            Refusal::ChannelOutOfRange => (5, 0),
            Refusal::ChannelDuplicate => (6, 0),
            Refusal::PageSizeMismatch { expected } => (7, expected),
            Refusal::LayoutMismatch { expected_mib } => (8, expected_mib),
            Refusal::FeatureUnsupported { accepted } => (9, accepted),
            Refusal::TlsRequired => (10, 0),
            Refusal::PskRequired => (11, 0),
            Refusal::PskUnsupported => (12, 0),
            Refusal::PskMismatch => (13, 0),
            Refusal::ChecksumsRequired => (14, 0),
        }
    }

    /// Decodes a status code; unknown codes map to `Malformed` rather than failing.
    pub fn from_wire(status: u16, detail: u32) -> Refusal {
        match status {
            2 => Refusal::VersionUnsupported {
                receiver: detail as u16,
            },
            3 => Refusal::SessionMismatch,
            4 => Refusal::ChannelCountMismatch {
                expected: detail as u16,
            },
            5 => Refusal::ChannelOutOfRange,
            6 => Refusal::ChannelDuplicate,
            7 => Refusal::PageSizeMismatch { expected: detail },
            8 => Refusal::LayoutMismatch {
                expected_mib: detail,
            },
            9 => Refusal::FeatureUnsupported { accepted: detail },
            10 => Refusal::TlsRequired,
            11 => Refusal::PskRequired,
            12 => Refusal::PskUnsupported,
            13 => Refusal::PskMismatch,
            14 => Refusal::ChecksumsRequired,
            _ => Refusal::Malformed,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Malformed => write!(f, "malformed hello (not a pagewire v2 sender?)"),
            Refusal::VersionUnsupported { receiver } => {
                write!(
                    f,
                    "protocol version not supported (receiver speaks v{receiver})"
                )
            }
            Refusal::SessionMismatch => {
                write!(f, "session id differs from the transfer in progress")
            }
            Refusal::ChannelCountMismatch { expected } => {
                write!(f, "channel count differs (receiver expects {expected})")
            }
            Refusal::ChannelOutOfRange => write!(f, "channel index out of range"),
            Refusal::ChannelDuplicate => write!(f, "duplicate channel index"),
            Refusal::PageSizeMismatch { expected } => {
                write!(f, "page size differs (receiver uses {expected} bytes)")
            }
            Refusal::LayoutMismatch { expected_mib } => write!(
                f,
                "memory layout differs (receiver has {expected_mib} MiB in its regions)"
            ),
            Refusal::FeatureUnsupported { accepted } => {
                write!(
                    f,
                    "feature flags not supported (receiver accepts {accepted:#x})"
                )
            }
            Refusal::TlsRequired => write!(
                f,
                "the receiver requires TLS, but this sender speaks plaintext (give the sender a \
                 TLS identity: {HINT_SENDER_TLS})"
            ),
            Refusal::PskRequired => write!(
                f,
                "the receiver requires a pre-shared key, but this sender offered none (give the \
                 sender the receiver's key: {HINT_SENDER_PSK})"
            ),
            Refusal::PskUnsupported => write!(
                f,
                "this sender offered a pre-shared key, but the receiver has none configured"
            ),
            Refusal::PskMismatch => {
                write!(f, "the sender's pre-shared key differs from the receiver's")
            }
            Refusal::ChecksumsRequired => write!(
                f,
                "this sender sends pages without checksums, and the receiver requires them (let \
                 the receiver accept them, {HINT_ACCEPT_UNCHECKED}; or keep the sender's \
                 checksums on)"
            ),
        }
    }
}

/// The receiver's answer to a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The receiver's protocol version.
    pub version: u16,
    /// `None` when accepted.
    pub refusal: Option<Refusal>,
    /// When accepted: milliseconds the receiver waits for any byte before it gives up on a
    /// channel; the sender sends keepalive frames well within it. 0 when refused.
    pub idle_timeout_ms: u32,
}

impl Reply {
    /// Encodes into 16 bytes.
    pub fn encode(&self) -> [u8; 16] {
        let (status, detail) = self
            .refusal
            .map_or((0, self.idle_timeout_ms), Refusal::to_wire);
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&status.to_le_bytes());
        b[12..16].copy_from_slice(&detail.to_le_bytes());
        b
    }

    /// Decodes a reply.
    pub fn decode(b: &[u8]) -> Result<Reply, ProtocolError> {
        if b.len() < 8 || b[0..8] != MAGIC {
            return Err(ProtocolError::BadMagic { what: "reply" });
        }
        if b.len() < 16 {
            return Err(ProtocolError::Truncated {
                what: "reply",
                need: 16,
                have: b.len(),
            });
        }
        let status = u16::from_le_bytes([b[10], b[11]]);
        let detail = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        Ok(Reply {
            version: u16::from_le_bytes([b[8], b[9]]),
            refusal: (status != 0).then(|| Refusal::from_wire(status, detail)),
            idle_timeout_ms: if status == 0 { detail } else { 0 },
        })
    }
}

/// What the receiver expects of every channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    /// Channels the receiver was told to expect (`None`: take the sender's count).
    pub channel_count: Option<u16>,
    /// Page size of the destination memory.
    pub page_bytes: u32,
    /// Digest of the destination layout.
    pub layout_digest: u64,
    /// Total bytes of the destination layout.
    pub layout_bytes: u64,
    /// Feature bits the receiver accepts.
    pub features: u32,
    /// The receiver has no memory yet and takes the first sender's layout, if it is one
    /// region at guest-physical 0 (a RAM image), of at most `layout_bytes` bytes; the layout
    /// fields above are then ignored until a hello fixes them.
    pub take_layout: bool,
}

/// Checks the hellos of one transfer: the first fixes session and count; every later one must
/// match it and bring a channel index not yet seen. Sans-IO: the caller reads and writes.
#[derive(Debug)]
pub struct Acceptor {
    expect: Expectation,
    /// The layout (digest, bytes) channels must bring.
    layout: (u64, u64),
    session: Option<([u8; 16], u16)>,
    seen: [bool; CHANNELS_MAX],
    accepted: usize,
}

impl Acceptor {
    /// A new acceptor for one transfer.
    pub fn new(expect: Expectation) -> Self {
        Acceptor {
            layout: (expect.layout_digest, expect.layout_bytes),
            expect,
            session: None,
            seen: [false; CHANNELS_MAX],
            accepted: 0,
        }
    }

    /// Checks a hello; on success the channel counts as accepted.
    pub fn check(&mut self, hello: &Hello) -> Result<(), Refusal> {
        let e = &self.expect;
        if hello.version != PROTOCOL_VERSION {
            return Err(Refusal::VersionUnsupported {
                receiver: PROTOCOL_VERSION,
            });
        }
        if let Some((session, count)) = self.session {
            if session != hello.session_id {
                return Err(Refusal::SessionMismatch);
            }
            if count != hello.channel_count {
                return Err(Refusal::ChannelCountMismatch { expected: count });
            }
        }
        let count = e.channel_count.unwrap_or(hello.channel_count);
        if hello.channel_count != count
            || hello.channel_count == 0
            || usize::from(hello.channel_count) > CHANNELS_MAX
        {
            return Err(Refusal::ChannelCountMismatch { expected: count });
        }
        if hello.channel_index >= hello.channel_count {
            return Err(Refusal::ChannelOutOfRange);
        }
        if hello.page_bytes != e.page_bytes {
            return Err(Refusal::PageSizeMismatch {
                expected: e.page_bytes,
            });
        }
        if e.take_layout && self.session.is_none() {
            // The first sender sizes a receiver that has no memory yet: one region at 0.
            let one_region = hello.region_count == 1
                && hello.layout_bytes > 0
                && hello.layout_bytes.is_multiple_of(u64::from(e.page_bytes))
                && hello.layout_bytes <= e.layout_bytes
                && hello.layout_digest == layout_digest([(0, hello.layout_bytes)]);
            if !one_region {
                return Err(Refusal::LayoutMismatch {
                    expected_mib: (e.layout_bytes >> 20) as u32,
                });
            }
        } else if hello.layout_digest != self.layout.0 || hello.layout_bytes != self.layout.1 {
            return Err(Refusal::LayoutMismatch {
                expected_mib: (self.layout.1 >> 20) as u32,
            });
        }
        if hello.features & FEATURE_UNCHECKED_PAGES & !e.features != 0 {
            return Err(Refusal::ChecksumsRequired);
        }
        if hello.features & !e.features != 0 {
            return Err(Refusal::FeatureUnsupported {
                accepted: e.features,
            });
        }
        let idx = usize::from(hello.channel_index);
        if self.seen[idx] {
            return Err(Refusal::ChannelDuplicate);
        }
        self.seen[idx] = true;
        self.session = Some((hello.session_id, hello.channel_count));
        self.layout = (hello.layout_digest, hello.layout_bytes);
        self.accepted += 1;
        Ok(())
    }

    /// The layout's total bytes: the receiver's own, or the one the session's sender brought
    /// (see [`Expectation::take_layout`]).
    pub fn layout_bytes(&self) -> u64 {
        self.layout.1
    }

    /// Forgets a session whose channels did not all arrive in time, so the next sender can start
    /// afresh (the caller drops the connections it had accepted for it).
    pub fn reset(&mut self) {
        self.session = None;
        self.layout = (self.expect.layout_digest, self.expect.layout_bytes);
        self.seen = [false; CHANNELS_MAX];
        self.accepted = 0;
    }

    /// Channels the transfer has, once the first hello was accepted.
    pub fn channel_count(&self) -> Option<u16> {
        self.session.map(|(_, c)| c)
    }

    /// True when every channel has been accepted.
    pub fn complete(&self) -> bool {
        self.channel_count()
            .is_some_and(|c| self.accepted == usize::from(c))
    }
}

/// FNV-1a 64 over the canonical layout encoding (region count, then start and length of each
/// region, little-endian). Catches a destination sized or placed differently; not a security
/// measure (TLS authenticates the peer).
pub fn layout_digest(regions: impl IntoIterator<Item = (u64, u64)>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    };
    let mut count = 0u32;
    let mut body = Vec::new();
    for (start, len) in regions {
        count += 1;
        body.extend_from_slice(&start.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
    }
    eat(&count.to_le_bytes());
    eat(&body);
    h
}

#[cfg(test)]
mod tests;
