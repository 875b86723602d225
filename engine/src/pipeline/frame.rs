//! The frame sealing stage: one frame (its header, then its payload straight from guest memory
//! or from a buffer) sealed into TLS records in a caller's buffer, the sender shard's slot.
//! Each record's plaintext is gathered as pieces (header bytes, guest ranges) that the AEAD
//! reads where they lie (AES-GCM under aws-lc-rs: `tls::direct`), so sealing is the only pass
//! over the pages; other ciphers copy the pieces into the record and seal it in place while
//! it is in cache. A key update goes before the frame when the key has sealed its share (or
//! the peer asked for one), and close_notify after the end-of-stream frame.

use crate::limits::PAGE_BYTES;
use crate::tls::TlsSession;

use super::seal::{
    Piece, RecordError, CLOSE_NOTIFY_ALERT, CONTENT_ALERT, CONTENT_APPLICATION_DATA,
    CONTENT_HANDSHAKE, KEY_UPDATE_REQUEST, RECORD_PLAINTEXT_BYTES_MAX,
};

/// Pieces one record's plaintext can have: the rest of a header, then guest ranges of at
/// least a page each except the first and last (16 KiB spans at most 5 pages), or one buffer.
const RECORD_PIECES_MAX: usize = 8;

/// Where a sealed frame's payload comes from.
pub(crate) enum Payload<'a> {
    /// Normal pages, straight from guest memory.
    Guest(&'a crate::memory::Region, &'a [crate::protocol::Run]),
    /// A compressed payload.
    Bytes(&'a [u8]),
}

/// Seals one frame (header, then the payload from guest memory or a buffer) into `out` as TLS
/// records of 16 KiB of plaintext, preceded by a key update when the key has sealed its share,
/// followed by close_notify after the end-of-stream frame. Returns the bytes written.
pub(crate) fn seal_frame(
    tls: &mut TlsSession,
    records_per_key: u64,
    header: &[u8],
    payload: Payload<'_>,
    close: bool,
    out: &mut [u8],
) -> Result<usize, RecordError> {
    let mut at = 0;
    if tls.sealer.sequence() >= records_per_key {
        // Ask the receiver to rotate its own (control) key in turn: it answers on its side.
        at += tls
            .sealer
            .seal(&KEY_UPDATE_REQUEST, CONTENT_HANDSHAKE, &mut out[at..])?;
        tls.sealer = tls
            .keys
            .next_sealer()
            .map_err(|_| RecordError::UnsupportedSuite)?;
    }
    let (region, runs, bytes) = match payload {
        Payload::Guest(region, runs) => (Some(region), runs, &[][..]),
        Payload::Bytes(bytes) => (None, &[][..], bytes),
    };
    let (mut header_at, mut run, mut run_at, mut bytes_at) = (0usize, 0usize, 0u64, 0usize);
    loop {
        let mut pieces = [Piece::Bytes(&[]); RECORD_PIECES_MAX];
        let mut n_pieces = 0;
        let mut filled = 0;
        while filled < RECORD_PLAINTEXT_BYTES_MAX && n_pieces < RECORD_PIECES_MAX {
            let room = RECORD_PLAINTEXT_BYTES_MAX - filled;
            let piece = if header_at < header.len() {
                let n = room.min(header.len() - header_at);
                header_at += n;
                Piece::Bytes(&header[header_at - n..header_at])
            } else if bytes_at < bytes.len() {
                let n = room.min(bytes.len() - bytes_at);
                bytes_at += n;
                Piece::Bytes(&bytes[bytes_at - n..bytes_at])
            } else if let (Some(region), true) = (region, run < runs.len()) {
                let run_bytes = u64::from(runs[run].pages) * PAGE_BYTES as u64;
                let n = (room as u64).min(run_bytes - run_at);
                let offset = runs[run].first_page * PAGE_BYTES as u64 + run_at;
                run_at += n;
                if run_at == run_bytes {
                    run += 1;
                    run_at = 0;
                }
                Piece::Guest(region.range(offset, n as usize))
            } else {
                break;
            };
            filled += piece.len();
            pieces[n_pieces] = piece;
            n_pieces += 1;
        }
        if filled == 0 {
            break;
        }
        at += tls.sealer.seal_pieces(
            &mut out[at..],
            &pieces[..n_pieces],
            CONTENT_APPLICATION_DATA,
        )?;
    }
    if close {
        at += tls
            .sealer
            .seal(&CLOSE_NOTIFY_ALERT, CONTENT_ALERT, &mut out[at..])?;
    }
    Ok(at)
}
