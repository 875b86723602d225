//! Device state: the VMM's opaque tagged blobs (vCPU registers, device models), sent after the
//! last round of a live migration as `DeviceState` frames and handed back whole, checked, on
//! the destination.
//!
//! A blob travels as one or more chunks, in order, on one channel. Each frame's payload is a
//! 24-byte chunk header, then the chunk's bytes:
//!
//! ```text
//!  0 tag u32 │ 4 flags u32 (bit 0: last chunk) │ 8 total bytes of the blob u64 │
//!  16 CRC32C of this chunk's bytes u32 │ 20 reserved u32 (0)
//! ```
//! The receiver ([`BlobAssembler`]) refuses a chunk whose CRC does not match (plaintext has no
//! other cover for these bytes; under TLS the AEAD covers them too), a blob larger than
//! [`DEVICE_STATE_BYTES_MAX`] in all, chunks that overrun the total or end short of it, and a
//! chunk of another tag before the current blob ended. The bound holds over all of a
//! receiver's channels together ([`DeviceBudget`]), and every blob, empty ones too, costs
//! [`BLOB_OVERHEAD_BYTES`] of it besides its bytes, so a peer cannot make the receiver hold
//! more by spreading blobs over channels or by sending millions of empty ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::ProtocolError;

/// Bytes of a chunk header.
pub const CHUNK_HEADER_BYTES: usize = 24;
/// Bytes of device state a migration may carry in all (every blob together): a bound on what a
/// peer can make the receiver hold in memory.
pub const DEVICE_STATE_BYTES_MAX: u64 = 256 << 20;
/// What each blob costs of [`DEVICE_STATE_BYTES_MAX`] besides its bytes: the receiver's
/// bookkeeping of it (a `DeviceBlob` and its allocation, rounded up).
pub const BLOB_OVERHEAD_BYTES: u64 = 64;
const FLAG_LAST: u32 = 1;

/// The device state bytes held so far by every [`BlobAssembler`] sharing it (clones share),
/// checked against [`DEVICE_STATE_BYTES_MAX`].
#[derive(Debug, Clone, Default)]
pub struct DeviceBudget(Arc<AtomicU64>);

impl DeviceBudget {
    /// Takes `bytes` of the budget; on refusal, the total that would have been held.
    fn take(&self, bytes: u64) -> Result<(), u64> {
        let mut would = 0;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                would = held.saturating_add(bytes);
                (would <= DEVICE_STATE_BYTES_MAX).then_some(would)
            })
            .map(drop)
            .map_err(|_| would)
    }
}

/// One blob of device state, as the VMM handed it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBlob {
    /// The VMM's tag (what the blob is; pagewire does not interpret it).
    pub tag: u32,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// A chunk's header (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// The blob's tag.
    pub tag: u32,
    /// This chunk ends the blob.
    pub last: bool,
    /// Bytes of the whole blob.
    pub total: u64,
    /// CRC32C of the chunk's bytes.
    pub crc: u32,
}

impl ChunkHeader {
    /// The header of `chunk`, a piece of a blob of `total` bytes tagged `tag`.
    pub fn of(tag: u32, total: u64, chunk: &[u8], last: bool) -> Self {
        ChunkHeader {
            tag,
            last,
            total,
            crc: crc32c::crc32c(chunk),
        }
    }

    /// Encodes into `out`.
    pub fn encode(&self, out: &mut [u8; CHUNK_HEADER_BYTES]) {
        out[0..4].copy_from_slice(&self.tag.to_le_bytes());
        let flags = if self.last { FLAG_LAST } else { 0 };
        out[4..8].copy_from_slice(&flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.total.to_le_bytes());
        out[16..20].copy_from_slice(&self.crc.to_le_bytes());
        out[20..24].fill(0);
    }

    /// Decodes the start of a chunk's payload.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let Some(b) = b.get(..CHUNK_HEADER_BYTES) else {
            return Err(ProtocolError::Truncated {
                what: "device state chunk header",
                need: CHUNK_HEADER_BYTES,
                have: b.len(),
            });
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let flags = u32_at(4);
        if flags & !FLAG_LAST != 0 || u32_at(20) != 0 {
            return Err(ProtocolError::Reserved("device state chunk header"));
        }
        let mut total = [0u8; 8];
        total.copy_from_slice(&b[8..16]);
        Ok(ChunkHeader {
            tag: u32_at(0),
            last: flags & FLAG_LAST != 0,
            total: u64::from_le_bytes(total),
            crc: u32_at(16),
        })
    }
}

/// Reassembles blobs from chunks, checking every field (see the module docs).
#[derive(Debug, Default)]
pub struct BlobAssembler {
    current: Option<DeviceBlob>,
    total: u64,
    budget: DeviceBudget,
    done: Vec<DeviceBlob>,
}

impl BlobAssembler {
    /// An assembler whose blobs count against `budget`, shared with the receiver's other
    /// channels (`default()` has a budget of its own).
    pub fn sharing(budget: DeviceBudget) -> Self {
        BlobAssembler {
            budget,
            ..BlobAssembler::default()
        }
    }

    /// Takes one chunk's payload (header and bytes).
    pub fn push(&mut self, payload: &[u8]) -> Result<(), ProtocolError> {
        let h = ChunkHeader::decode(payload)?;
        let bytes = &payload[CHUNK_HEADER_BYTES..];
        if crc32c::crc32c(bytes) != h.crc {
            return Err(ProtocolError::BlobRefused(
                "a chunk's CRC does not match its bytes",
            ));
        }
        if self.current.is_none() {
            let cost = h.total.saturating_add(BLOB_OVERHEAD_BYTES);
            if let Err(value) = self.budget.take(cost) {
                return Err(ProtocolError::TooLarge {
                    what: "device state bytes, with each blob's bookkeeping",
                    value,
                    max: DEVICE_STATE_BYTES_MAX,
                });
            }
        }
        let blob = match self.current.as_mut() {
            Some(b) if b.tag != h.tag || self.total != h.total => {
                return Err(ProtocolError::BlobRefused(
                    "a chunk of another blob before the current one ended",
                ))
            }
            Some(b) => b,
            None => {
                self.total = h.total;
                // Exactly the declared size (the budget took it above): grown by doubling, a
                // blob could hold twice what the budget counts.
                self.current.insert(DeviceBlob {
                    tag: h.tag,
                    bytes: Vec::with_capacity(h.total as usize),
                })
            }
        };
        if blob.bytes.len() as u64 + bytes.len() as u64 > self.total {
            return Err(ProtocolError::BlobRefused("chunks overrun the blob's size"));
        }
        blob.bytes.extend_from_slice(bytes);
        if h.last {
            if blob.bytes.len() as u64 != self.total {
                return Err(ProtocolError::BlobRefused(
                    "the last chunk ends short of the blob's size",
                ));
            }
            let blob = self.current.take().expect("current is set above");
            self.done.push(blob);
        }
        Ok(())
    }

    /// True while a blob is partly received (the stream must not end there).
    pub fn in_progress(&self) -> bool {
        self.current.is_some()
    }

    /// The blobs completed so far, in arrival order.
    pub fn take(&mut self) -> Vec<DeviceBlob> {
        std::mem::take(&mut self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(tag: u32, total: u64, bytes: &[u8], last: bool) -> Vec<u8> {
        let mut h = [0u8; CHUNK_HEADER_BYTES];
        ChunkHeader::of(tag, total, bytes, last).encode(&mut h);
        [&h[..], bytes].concat()
    }

    #[test]
    fn blobs_come_back_whole_and_in_order() {
        let mut a = BlobAssembler::default();
        a.push(&chunk(7, 5, b"hel", false)).unwrap();
        assert!(a.in_progress());
        a.push(&chunk(7, 5, b"lo", true)).unwrap();
        a.push(&chunk(9, 0, b"", true)).unwrap();
        assert!(!a.in_progress());
        let got = a.take();
        assert_eq!(
            got,
            [
                DeviceBlob {
                    tag: 7,
                    bytes: b"hello".to_vec()
                },
                DeviceBlob {
                    tag: 9,
                    bytes: vec![]
                }
            ]
        );
    }

    #[test]
    fn a_blob_holds_its_declared_size_not_twice_it() {
        // Chunks appended one by one: grown by doubling, 100 000 bytes would take 131 072.
        let mut a = BlobAssembler::default();
        for _ in 0..3 {
            a.push(&chunk(1, 100_000, &[0; 32_768], false)).unwrap();
        }
        let capacity = a.current.as_ref().unwrap().bytes.capacity();
        assert!(capacity <= 100_000, "{capacity}");
    }

    #[test]
    fn every_field_is_checked() {
        let mut c = chunk(1, 3, b"abc", true);
        c[CHUNK_HEADER_BYTES] ^= 1;
        assert!(BlobAssembler::default().push(&c).is_err(), "CRC");
        assert!(
            BlobAssembler::default()
                .push(&chunk(1, 2, b"abc", true))
                .is_err(),
            "overrun"
        );
        assert!(
            BlobAssembler::default()
                .push(&chunk(1, 4, b"abc", true))
                .is_err(),
            "short"
        );
        let mut a = BlobAssembler::default();
        a.push(&chunk(1, 6, b"abc", false)).unwrap();
        assert!(
            a.push(&chunk(2, 6, b"def", true)).is_err(),
            "another tag mid-blob"
        );
        let big = DEVICE_STATE_BYTES_MAX + 1;
        assert!(
            BlobAssembler::default()
                .push(&chunk(1, big, b"", false))
                .is_err(),
            "size"
        );
        let mut r = chunk(1, 0, b"", true);
        r[20] = 1;
        assert!(BlobAssembler::default().push(&r).is_err(), "reserved");
        assert!(
            BlobAssembler::default().push(&r[..10]).is_err(),
            "truncated"
        );
    }

    #[test]
    fn the_bound_holds_over_channels_and_counts_empty_blobs() {
        // Two channels sharing one budget: half of it each fits, a byte more does not.
        let budget = DeviceBudget::default();
        let mut a = BlobAssembler::sharing(budget.clone());
        let mut b = BlobAssembler::sharing(budget);
        let half = DEVICE_STATE_BYTES_MAX / 2 - BLOB_OVERHEAD_BYTES;
        a.push(&chunk(1, half, b"", false)).unwrap();
        b.push(&chunk(2, half, b"", false)).unwrap();
        let err = BlobAssembler::sharing(b.budget.clone())
            .push(&chunk(3, 0, b"", true))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err:?}");
        // Empty blobs are not free: beside a blob that leaves room for 100 of them, 100 fit.
        let budget = DeviceBudget::default();
        let room = DEVICE_STATE_BYTES_MAX - 101 * BLOB_OVERHEAD_BYTES;
        BlobAssembler::sharing(budget.clone())
            .push(&chunk(5, room, b"", false))
            .unwrap();
        let mut e = BlobAssembler::sharing(budget);
        let empty = chunk(4, 0, b"", true);
        let fits = 100;
        let mut pushed = 0u64;
        while e.push(&empty).is_ok() {
            pushed += 1;
            assert!(pushed <= fits, "more than {fits} empty blobs held");
        }
        assert_eq!(pushed, fits);
    }
}
