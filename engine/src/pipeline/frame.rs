//! The frame sealing stage: one frame (its header, then its payload straight from guest memory
//! or from a buffer) sealed into TLS records in a caller's buffer, the sender shard's slot, so
//! the copy out of guest memory lands where the AEAD encrypts it in place while it is still in
//! cache. A key update goes before the frame when the key has sealed its share (or the peer
//! asked for one), and close_notify after the end-of-stream frame.

use crate::limits::PAGE_BYTES;
use crate::tls::TlsSession;

use super::seal::{
    RecordError, CLOSE_NOTIFY_ALERT, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE,
    KEY_UPDATE_REQUEST, RECORD_HEADER_BYTES, RECORD_PLAINTEXT_BYTES_MAX,
};

/// Where a sealed frame's payload comes from.
pub(crate) enum Payload<'a> {
    /// Normal pages, straight from guest memory.
    Guest(&'a crate::memory::Region, &'a [crate::protocol::Run]),
    /// A compressed payload.
    Bytes(&'a [u8]),
}

/// Seals one frame (header, then the payload copied from guest memory) into `out` as TLS
/// records of 16 KiB of plaintext, preceded by a key update when the key has sealed its share,
/// followed by close_notify after the end-of-stream frame. Returns the bytes written. The copy
/// out of guest memory lands in the record, where the AEAD encrypts it in place while it is
/// still in cache: one pass over the data.
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
        let record = &mut out[at..];
        let mut filled = 0;
        while filled < RECORD_PLAINTEXT_BYTES_MAX {
            let room = RECORD_PLAINTEXT_BYTES_MAX - filled;
            let dst = RECORD_HEADER_BYTES + filled;
            if header_at < header.len() {
                let n = room.min(header.len() - header_at);
                record[dst..dst + n].copy_from_slice(&header[header_at..header_at + n]);
                header_at += n;
                filled += n;
            } else if bytes_at < bytes.len() {
                let n = room.min(bytes.len() - bytes_at);
                record[dst..dst + n].copy_from_slice(&bytes[bytes_at..bytes_at + n]);
                bytes_at += n;
                filled += n;
            } else if let (Some(region), true) = (region, run < runs.len()) {
                let run_bytes = u64::from(runs[run].pages) * PAGE_BYTES as u64;
                let n = (room as u64).min(run_bytes - run_at);
                let offset = runs[run].first_page * PAGE_BYTES as u64 + run_at;
                region.read(offset, &mut record[dst..dst + n as usize]);
                run_at += n;
                filled += n as usize;
                if run_at == run_bytes {
                    run += 1;
                    run_at = 0;
                }
            } else {
                break;
            }
        }
        if filled == 0 {
            break;
        }
        at += tls
            .sealer
            .seal_in_place(record, filled, CONTENT_APPLICATION_DATA)?;
    }
    if close {
        at += tls
            .sealer
            .seal(&CLOSE_NOTIFY_ALERT, CONTENT_ALERT, &mut out[at..])?;
    }
    Ok(at)
}
