//! TLS 1.3 application-data records, sealed in place into caller-owned buffers (a slot of the
//! shard's registered slab) and opened in place, with the traffic keys rustls negotiated.
//!
//! A record is `type 0x17 | version 0x0303 | length u16` then the AEAD ciphertext of
//! `plaintext || inner content type`, then the 16-byte tag (RFC 8446 §5.2). The nonce is the
//! traffic IV XOR the 64-bit record sequence number (aws-lc-rs, or ring with that feature); the additional data is the 5-byte header.
//! pagewire fills records with 16 KiB of plaintext, the most TLS allows, so the per-record cost
//! (a header, a tag, one AEAD call) is spread over as many bytes as possible.
//!
//! Sans-IO like the protocol core: bytes in, bytes out, no socket, no clock.

use crate::crypto::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::ConnectionTrafficSecrets;

/// Bytes of a TLS record header.
pub const RECORD_HEADER_BYTES: usize = 5;
/// Bytes of plaintext one record carries at most (2^14).
pub const RECORD_PLAINTEXT_BYTES_MAX: usize = 16 * 1024;
/// Bytes a record adds to its plaintext: header, inner content type, AEAD tag.
pub const RECORD_OVERHEAD_BYTES: usize = RECORD_HEADER_BYTES + 1 + TAG_BYTES;
/// Bytes of the largest record pagewire writes.
pub const RECORD_BYTES_MAX: usize = RECORD_PLAINTEXT_BYTES_MAX + RECORD_OVERHEAD_BYTES;
/// Largest ciphertext length a peer may announce (RFC 8446: 2^14 + 256).
const CIPHERTEXT_BYTES_MAX: usize = RECORD_PLAINTEXT_BYTES_MAX + 256;
const TAG_BYTES: usize = 16;

/// Outer content type of every TLS 1.3 protected record.
const APPLICATION_DATA: u8 = 0x17;
/// Inner content types.
pub const CONTENT_ALERT: u8 = 0x15;
/// Inner content type of handshake messages (key updates after the handshake).
pub const CONTENT_HANDSHAKE: u8 = 0x16;
/// Inner content type of application data.
pub const CONTENT_APPLICATION_DATA: u8 = 0x17;

/// Why a record could not be opened or sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The record header is not a TLS 1.3 protected record.
    #[error(
        "not a TLS application-data record (type {0:#04x}); the peer is not speaking TLS 1.3 here"
    )]
    BadHeader(u8),
    /// The announced length exceeds the protocol's limit.
    #[error("TLS record of {0} bytes exceeds the limit")]
    TooLong(usize),
    /// The AEAD rejected the record: it was modified, truncated, or sealed with another key.
    #[error("TLS record failed authentication (corrupted or forged data)")]
    Authentication,
    /// The inner plaintext held no content type.
    #[error("TLS record has no inner content type")]
    NoContentType,
    /// The buffer cannot hold the sealed record.
    #[error("buffer too small for a TLS record")]
    BufferTooSmall,
    /// The sequence number would wrap; the key must have been updated long before.
    #[error("TLS sequence number exhausted")]
    SequenceExhausted,
    /// A handshake message after the handshake that is not a KeyUpdate.
    #[error("unexpected TLS handshake message after the handshake")]
    UnexpectedHandshake,
    /// The negotiated cipher suite is not one pagewire seals with.
    #[error("unsupported TLS cipher suite for record sealing")]
    UnsupportedSuite,
}

struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let unbound =
            UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::UnsupportedSuite)?;
        let mut nonce_iv = [0u8; 12];
        if iv.as_ref().len() != 12 {
            return Err(RecordError::UnsupportedSuite);
        }
        nonce_iv.copy_from_slice(iv.as_ref());
        Ok(Keys {
            key: LessSafeKey::new(unbound),
            iv: nonce_iv,
            seq,
        })
    }

    fn aes128(key: &[u8; 16], iv: [u8; 12], seq: u64) -> Result<Self, RecordError> {
        let unbound =
            UnboundKey::new(&AES_128_GCM, key).map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Keys {
            key: LessSafeKey::new(unbound),
            iv,
            seq,
        })
    }

    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let n = self.nonce_bytes();
        self.advance()?;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// The nonce of the next record (the traffic IV XOR the sequence number), not yet used.
    fn nonce_bytes(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn advance(&mut self) -> Result<(), RecordError> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(RecordError::SequenceExhausted)?;
        Ok(())
    }
}

/// A piece of a record's plaintext for [`RecordSealer::seal_pieces`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Piece<'a> {
    /// Bytes of a Rust buffer (a frame header, a compressed payload).
    Bytes(&'a [u8]),
    /// Guest memory, read where it is.
    Guest(crate::memory::GuestSrc),
}

impl Piece<'_> {
    /// Bytes in the piece.
    pub(crate) fn len(&self) -> usize {
        match self {
            Piece::Bytes(b) => b.len(),
            Piece::Guest(g) => g.len(),
        }
    }

    /// Copies the piece into `out` (as long as the piece).
    pub(crate) fn copy_to(&self, out: &mut [u8]) {
        match self {
            Piece::Bytes(b) => out.copy_from_slice(b),
            Piece::Guest(g) => g.copy_to(out),
        }
    }
}

/// Seals records for one direction of one connection.
pub struct RecordSealer {
    keys: Keys,
    /// The same AES-GCM key, for sealing plaintext read where it lies (aws-lc-rs only; `None`
    /// for ChaCha20-Poly1305).
    #[cfg(feature = "aws-lc-rs")]
    direct: Option<crate::tls::direct::DirectSealer>,
}

impl std::fmt::Debug for RecordSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSealer")
            .field("seq", &self.keys.seq)
            .finish()
    }
}

impl RecordSealer {
    /// A sealer continuing at sequence number `seq` with `secrets`.
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        Ok(RecordSealer {
            keys: Keys::new(secrets, seq)?,
            #[cfg(feature = "aws-lc-rs")]
            direct: aes_gcm_key(secrets).and_then(crate::tls::direct::DirectSealer::aes_gcm),
        })
    }

    /// A sealer with an AES-128-GCM `key` and `iv` of pagewire's own (pre-shared-key
    /// connections), continuing at `seq`.
    pub fn aes128(key: &[u8; 16], iv: [u8; 12], seq: u64) -> Result<Self, RecordError> {
        Ok(RecordSealer {
            keys: Keys::aes128(key, iv, seq)?,
            #[cfg(feature = "aws-lc-rs")]
            direct: crate::tls::direct::DirectSealer::aes_gcm(key),
        })
    }

    /// Seals the plaintext `pieces` (at most [`RECORD_PLAINTEXT_BYTES_MAX`] bytes together)
    /// into `record` as one record of inner type `content_type`; returns its total length.
    /// With AES-GCM under aws-lc-rs the encryption reads the pieces where they lie (guest
    /// memory included) and writes the record: one pass, no copy; otherwise they are copied
    /// into the record and sealed in place.
    pub(crate) fn seal_pieces(
        &mut self,
        record: &mut [u8],
        pieces: &[Piece<'_>],
        content_type: u8,
    ) -> Result<usize, RecordError> {
        let len: usize = pieces.iter().map(Piece::len).sum();
        if len > RECORD_PLAINTEXT_BYTES_MAX || record.len() < len + RECORD_OVERHEAD_BYTES {
            return Err(RecordError::BufferTooSmall);
        }
        #[cfg(feature = "aws-lc-rs")]
        if let Some(direct) = self.direct.as_mut() {
            let header = record_header(len);
            record[..RECORD_HEADER_BYTES].copy_from_slice(&header);
            let nonce = self.keys.nonce_bytes();
            let body = &mut record[RECORD_HEADER_BYTES..len + RECORD_OVERHEAD_BYTES];
            if !direct.seal(&nonce, &header, pieces, content_type, body) {
                return Err(RecordError::Authentication);
            }
            self.keys.advance()?;
            return Ok(len + RECORD_OVERHEAD_BYTES);
        }
        let mut at = RECORD_HEADER_BYTES;
        for p in pieces {
            p.copy_to(&mut record[at..at + p.len()]);
            at += p.len();
        }
        self.seal_in_place(record, len, content_type)
    }

    /// Records sealed with the current key.
    pub fn sequence(&self) -> u64 {
        self.keys.seq
    }

    /// Takes the sequence number back to `seq` (at most the current one), so the records
    /// sealed since are as if never sealed.
    ///
    /// Their nonces will be used again: sound only while no byte of those records has left
    /// the process, nor ever will (the caller discards them). The sender uses it for a frame
    /// that failed after its seal, whose slot never reaches the ring, so that the abort frame
    /// that follows takes the numbers the receiver expects.
    pub(crate) fn rewind(&mut self, seq: u64) {
        debug_assert!(seq <= self.keys.seq, "a rewind goes back, never forward");
        self.keys.seq = seq.min(self.keys.seq);
    }

    /// Seals the `len` bytes of plaintext the caller placed at `record[5..5 + len]`, in place,
    /// as one record of inner type `content_type`; writes the header and returns the record's
    /// total length (`len + RECORD_OVERHEAD_BYTES`).
    pub fn seal_in_place(
        &mut self,
        record: &mut [u8],
        len: usize,
        content_type: u8,
    ) -> Result<usize, RecordError> {
        if len > RECORD_PLAINTEXT_BYTES_MAX || record.len() < len + RECORD_OVERHEAD_BYTES {
            return Err(RecordError::BufferTooSmall);
        }
        let header = record_header(len);
        record[..RECORD_HEADER_BYTES].copy_from_slice(&header);
        let body_end = RECORD_HEADER_BYTES + len + 1;
        record[body_end - 1] = content_type;
        let nonce = self.keys.next_nonce()?;
        let (body, rest) = record[RECORD_HEADER_BYTES..].split_at_mut(len + 1);
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::Authentication)?;
        rest[..TAG_BYTES].copy_from_slice(tag.as_ref());
        Ok(len + RECORD_OVERHEAD_BYTES)
    }

    /// Seals `plaintext` (a Rust buffer) into `out` as one or more full records; returns the bytes
    /// written. For small control messages; the data path fills records itself.
    pub fn seal(
        &mut self,
        plaintext: &[u8],
        content_type: u8,
        out: &mut [u8],
    ) -> Result<usize, RecordError> {
        let mut at = 0;
        for chunk in plaintext.chunks(RECORD_PLAINTEXT_BYTES_MAX) {
            let rec = out.get_mut(at..).ok_or(RecordError::BufferTooSmall)?;
            if rec.len() < chunk.len() + RECORD_OVERHEAD_BYTES {
                return Err(RecordError::BufferTooSmall);
            }
            rec[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + chunk.len()].copy_from_slice(chunk);
            at += self.seal_in_place(rec, chunk.len(), content_type)?;
        }
        Ok(at)
    }
}

/// Opens records of one direction of one connection.
pub struct RecordOpener {
    keys: Keys,
    /// The same AES-GCM key, for opening straight into guest memory (aws-lc-rs only; `None`
    /// for ChaCha20-Poly1305).
    #[cfg(feature = "aws-lc-rs")]
    direct: Option<crate::tls::direct::DirectOpener>,
}

/// What [`RecordOpener::open_into`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// Its data went to the destination: the next record follows.
    Placed,
    /// It cannot go there (no direct opener, or it is no unpadded application data record
    /// of that length): it is untouched and its sequence number unused, so open it in place.
    /// The destination holds bytes of no meaning.
    InPlace,
}

impl std::fmt::Debug for RecordOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordOpener")
            .field("seq", &self.keys.seq)
            .finish()
    }
}

/// The key of AES-GCM traffic secrets (the suites `tls::direct` seals and opens); `None` for
/// ChaCha20-Poly1305.
#[cfg(feature = "aws-lc-rs")]
fn aes_gcm_key(secrets: &ConnectionTrafficSecrets) -> Option<&[u8]> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, .. }
        | ConnectionTrafficSecrets::Aes256Gcm { key, .. } => Some(key.as_ref()),
        _ => None,
    }
}

/// The header of the record at the start of `record` and the record's total length, checked,
/// the whole record being there.
fn whole_record(record: &[u8]) -> Result<([u8; RECORD_HEADER_BYTES], usize), RecordError> {
    let header: [u8; RECORD_HEADER_BYTES] = record
        .get(..RECORD_HEADER_BYTES)
        .and_then(|h| h.try_into().ok())
        .ok_or(RecordError::BufferTooSmall)?;
    let total = record_len(&header)?;
    if record.len() < total {
        return Err(RecordError::BufferTooSmall);
    }
    Ok((header, total))
}

/// The header of a record of `len` bytes of plaintext.
fn record_header(len: usize) -> [u8; RECORD_HEADER_BYTES] {
    let ciphertext = len + 1 + TAG_BYTES;
    [
        APPLICATION_DATA,
        0x03,
        0x03,
        (ciphertext >> 8) as u8,
        ciphertext as u8,
    ]
}

/// Bytes of data the record whose header starts `bytes` carries when it is not padded (its
/// ciphertext less the inner content type and the tag), checked.
pub fn record_data_bytes(bytes: &[u8; RECORD_HEADER_BYTES]) -> Result<usize, RecordError> {
    Ok(record_len(bytes)? - RECORD_OVERHEAD_BYTES)
}

/// Total length of the record whose header starts `bytes` (header included), checked.
pub fn record_len(bytes: &[u8; RECORD_HEADER_BYTES]) -> Result<usize, RecordError> {
    if bytes[0] != APPLICATION_DATA || bytes[1] != 0x03 || bytes[2] != 0x03 {
        return Err(RecordError::BadHeader(bytes[0]));
    }
    let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    if len > CIPHERTEXT_BYTES_MAX {
        return Err(RecordError::TooLong(len));
    }
    if len < 1 + TAG_BYTES {
        return Err(RecordError::Authentication);
    }
    Ok(RECORD_HEADER_BYTES + len)
}

impl RecordOpener {
    /// An opener continuing at sequence number `seq` with `secrets`.
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        Ok(RecordOpener {
            keys: Keys::new(secrets, seq)?,
            #[cfg(feature = "aws-lc-rs")]
            direct: aes_gcm_key(secrets).and_then(crate::tls::direct::DirectOpener::aes_gcm),
        })
    }

    /// An opener with an AES-128-GCM `key` and `iv` of pagewire's own (pre-shared-key
    /// connections), continuing at `seq`.
    pub fn aes128(key: &[u8; 16], iv: [u8; 12], seq: u64) -> Result<Self, RecordError> {
        Ok(RecordOpener {
            keys: Keys::aes128(key, iv, seq)?,
            #[cfg(feature = "aws-lc-rs")]
            direct: crate::tls::direct::DirectOpener::aes_gcm(key),
        })
    }

    /// True when records can be opened straight into guest memory
    /// ([`open_into`](Self::open_into)).
    pub fn opens_direct(&self) -> bool {
        #[cfg(feature = "aws-lc-rs")]
        return self.direct.is_some();
        #[cfg(not(feature = "aws-lc-rs"))]
        false
    }

    /// Opens the complete record in `record` (header included) straight into `region` at
    /// `offset`, for as many bytes as the record's data would be without padding (see
    /// `tls::direct` for why writing guest memory before the tag is checked is safe). A record
    /// that fails authentication is an error; one that is no application data (a key update,
    /// an alert) or is padded comes back as [`Direct::InPlace`], untouched and its sequence
    /// number unused, for [`open_in_place`](Self::open_in_place). Panics when that range is
    /// outside the region or the region is read-only (the caller checks its ranges, as the
    /// receiver does against the frame it placed).
    pub fn open_into(
        &mut self,
        record: &[u8],
        region: &crate::memory::Region,
        offset: u64,
    ) -> Result<Direct, RecordError> {
        let (header, _) = whole_record(record)?;
        let data = record_data_bytes(&header)?;
        self.open_direct(record, &region.range_mut(offset, data))
    }

    /// Opens the complete record in `record` (header included) straight into `dest`, which
    /// must be as long as the record's data would be without padding
    /// ([`record_data_bytes`]); see [`crate::tls::direct`] for why writing guest memory before
    /// the tag is checked is safe. A record that fails authentication is an error; one that
    /// is no application data (a key update, an alert) or is padded comes back as
    /// [`Direct::InPlace`], untouched, for [`open_in_place`](Self::open_in_place).
    pub(crate) fn open_direct(
        &mut self,
        record: &[u8],
        dest: &crate::memory::GuestRange,
    ) -> Result<Direct, RecordError> {
        #[cfg(feature = "aws-lc-rs")]
        if let Some(direct) = self.direct.as_mut() {
            let (header, total) = whole_record(record)?;
            let body = &record[RECORD_HEADER_BYTES..total];
            if body.len() != dest.len() + 1 + TAG_BYTES {
                return Ok(Direct::InPlace);
            }
            let mut content_type = [0u8; 1];
            let nonce = self.keys.nonce_bytes();
            if !direct.open(&nonce, &header, body, dest, &mut content_type) {
                return Err(RecordError::Authentication);
            }
            if content_type[0] != CONTENT_APPLICATION_DATA {
                return Ok(Direct::InPlace);
            }
            self.keys.advance()?;
            return Ok(Direct::Placed);
        }
        let _ = (record, dest);
        Ok(Direct::InPlace)
    }

    /// Opens the complete record in `record` (header included) in place. Returns the inner
    /// content type and the plaintext's range within `record`. Nothing is returned from a record
    /// that fails authentication.
    pub fn open_in_place(
        &mut self,
        record: &mut [u8],
    ) -> Result<(u8, std::ops::Range<usize>), RecordError> {
        let (header, total) = whole_record(record)?;
        let body = &mut record[RECORD_HEADER_BYTES..total];
        let nonce = self.keys.next_nonce()?;
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::Authentication)?;
        // Strip zero padding; the last non-zero byte is the content type.
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::NoContentType)?;
        if end > RECORD_PLAINTEXT_BYTES_MAX {
            return Err(RecordError::TooLong(end));
        }
        let content_type = plain[end];
        Ok((content_type, RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + end))
    }
}

/// Plaintext of a TLS 1.3 KeyUpdate handshake message (update_not_requested).
pub const KEY_UPDATE_MESSAGE: [u8; 5] = [24, 0, 0, 1, 0];

/// Plaintext of a TLS 1.3 KeyUpdate asking the peer to update its own key in turn
/// (update_requested): senders send it when they rotate, receivers answer it.
pub const KEY_UPDATE_REQUEST: [u8; 5] = [24, 0, 0, 1, 1];

/// Whether `plain`, the plaintext of a handshake-type record, is a well-formed KeyUpdate, and
/// whether it asks for an update in turn (`update_requested`, which the receiver of it must
/// answer with a KeyUpdate of its own). Anything else is an error (RFC 8446 §4.6.3).
pub fn check_key_update(plain: &[u8]) -> Result<bool, RecordError> {
    match plain {
        [24, 0, 0, 1, 0] => Ok(false),
        [24, 0, 0, 1, 1] => Ok(true),
        _ => Err(RecordError::UnexpectedHandshake),
    }
}

/// Plaintext of a close_notify alert.
pub const CLOSE_NOTIFY_ALERT: [u8; 2] = [1, 0];

/// A readable name for a TLS alert description.
pub fn alert_name(description: u8) -> &'static str {
    match description {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        80 => "internal_error",
        112 => "unrecognized_name",
        116 => "certificate_required",
        _ => "unknown alert",
    }
}

#[cfg(test)]
mod tests;
