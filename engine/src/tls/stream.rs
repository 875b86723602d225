//! The receiving half of one TLS (or pre-shared-key) connection's record layer, sans-IO, used
//! by the handshake path, the sender's control direction and the receiver's data direction:
//! ciphertext arrives into a buffer the caller owns (a registered slot, or a `Vec`), and
//! [`RecordStream::next`] opens whole records in place and says what each is: application
//! data (a range of the buffer), close_notify, or a KeyUpdate (the stream moves to the next key
//! itself and says whether the peer asked for one in turn, which the caller must answer). Any
//! other alert, a record that fails authentication, or an unexpected content type is an error.
//!
//! ```text
//!  buf:  [ consumed | start .. end: unprocessed ciphertext | room for the next receive ]
//! ```

use std::ops::Range;

use crate::error::{Error, Result};
use crate::pipeline::seal::{
    check_key_update, record_data_bytes, record_len, Direct, RecordOpener, CLOSE_NOTIFY_ALERT,
    CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE, RECORD_HEADER_BYTES,
};

use super::KeySchedule;

/// What the next record was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// Application data: its plaintext is this range of the buffer.
    Data(Range<usize>),
    /// The peer's close_notify: the stream ended cleanly.
    CloseNotify,
    /// A KeyUpdate, already applied; `requested`: the peer asks for ours in turn.
    KeyUpdate { requested: bool },
}

/// Record reassembly and opening over a caller's buffer (see the module docs).
pub(crate) struct RecordStream {
    opener: RecordOpener,
    start: usize,
    end: usize,
    channel: u16,
}

impl RecordStream {
    /// A stream opening with `opener`; `buffered` bytes of ciphertext already sit at the start
    /// of the caller's buffer.
    pub(crate) fn new(opener: RecordOpener, buffered: usize, channel: u16) -> Self {
        RecordStream {
            opener,
            start: 0,
            end: buffered,
            channel,
        }
    }

    /// Moves the unopened ciphertext from `from` (the buffer used so far) to the start of `to`
    /// (a shard's registered slot), which the stream uses from now on; names its channel.
    /// Fails when it does not fit.
    pub(crate) fn move_to(&mut self, from: &[u8], to: &mut [u8], channel: u16) -> Result<()> {
        let n = self.buffered();
        if n > to.len() {
            return Err(Error::TlsProtocol {
                channel,
                what: format!("{n} bytes after the handshake, more than the buffer holds"),
            });
        }
        to[..n].copy_from_slice(&from[self.start..self.end]);
        self.start = 0;
        self.end = n;
        self.channel = channel;
        Ok(())
    }

    /// Bytes of ciphertext not yet opened.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Where the next receive goes in `buf` (after moving unprocessed bytes to the front when
    /// fewer than `want` bytes of room are left). Empty when `buf` cannot hold more.
    pub(crate) fn room(&mut self, buf: &mut [u8], want: usize) -> Range<usize> {
        if self.start > 0 && buf.len() - self.end < want {
            buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.end..buf.len()
    }

    /// `n` bytes were received into the range [`room`](Self::room) gave.
    pub(crate) fn received(&mut self, n: usize) {
        self.end += n;
    }

    /// True when this stream can open records straight into guest memory.
    pub(crate) fn opens_direct(&self) -> bool {
        self.opener.opens_direct()
    }

    /// The next record, for a direct open: `None` while its header is not buffered, else its
    /// data bytes if unpadded and whether it is whole in `buf`.
    pub(crate) fn peek(&self, buf: &[u8]) -> Result<Option<(usize, bool)>> {
        if self.buffered() < RECORD_HEADER_BYTES {
            return Ok(None);
        }
        let mut header = [0u8; RECORD_HEADER_BYTES];
        header.copy_from_slice(&buf[self.start..self.start + RECORD_HEADER_BYTES]);
        let channel = self.channel;
        let record = |source| Error::TlsRecord { channel, source };
        let total = record_len(&header).map_err(record)?;
        let data = record_data_bytes(&header).map_err(record)?;
        Ok(Some((data, self.buffered() >= total)))
    }

    /// Opens the next record, whole in `buf` ([`peek`](Self::peek)), straight into `dest`,
    /// as long as its unpadded data. On [`Direct::InPlace`] the record is left for
    /// [`next`](Self::next).
    pub(crate) fn next_direct(
        &mut self,
        buf: &[u8],
        dest: &crate::memory::GuestRange,
    ) -> Result<Direct> {
        let channel = self.channel;
        let mut header = [0u8; RECORD_HEADER_BYTES];
        header.copy_from_slice(&buf[self.start..self.start + RECORD_HEADER_BYTES]);
        let total = record_len(&header).map_err(|source| Error::TlsRecord { channel, source })?;
        let done = self
            .opener
            .open_direct(&buf[self.start..self.start + total], dest)
            .map_err(|source| Error::TlsRecord { channel, source })?;
        if done == Direct::Placed {
            self.start += total;
        }
        Ok(done)
    }

    /// Opens the next whole record in `buf`, or `None` when more ciphertext is needed.
    pub(crate) fn next(
        &mut self,
        buf: &mut [u8],
        keys: &mut KeySchedule,
    ) -> Result<Option<Record>> {
        let channel = self.channel;
        let record = |source| Error::TlsRecord { channel, source };
        if self.buffered() < RECORD_HEADER_BYTES {
            return Ok(None);
        }
        let mut header = [0u8; RECORD_HEADER_BYTES];
        header.copy_from_slice(&buf[self.start..self.start + RECORD_HEADER_BYTES]);
        let total = record_len(&header).map_err(record)?;
        if total > buf.len() {
            return Err(Error::TlsProtocol {
                channel,
                what: format!(
                    "a record of {total} bytes does not fit the {}-byte buffer",
                    buf.len()
                ),
            });
        }
        if self.buffered() < total {
            return Ok(None);
        }
        let at = self.start;
        self.start += total;
        let (ty, r) = self
            .opener
            .open_in_place(&mut buf[at..at + total])
            .map_err(record)?;
        let plain = at + r.start..at + r.end;
        match ty {
            CONTENT_APPLICATION_DATA => Ok(Some(Record::Data(plain))),
            CONTENT_ALERT if buf[plain.clone()] == CLOSE_NOTIFY_ALERT => {
                Ok(Some(Record::CloseNotify))
            }
            CONTENT_ALERT => Err(super::alert_error(channel, &buf[plain])),
            CONTENT_HANDSHAKE => {
                let requested = check_key_update(&buf[plain]).map_err(record)?;
                self.opener = keys.next_opener()?;
                Ok(Some(Record::KeyUpdate { requested }))
            }
            other => Err(Error::TlsProtocol {
                channel,
                what: format!("unexpected content type {other}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::seal::{RecordSealer, KEY_UPDATE_REQUEST};

    #[test]
    fn records_arrive_in_pieces_and_key_updates_move_both_sides_on() {
        let (tx, rx) = ([1u8; 32], [2u8; 32]);
        let mut sender = super::super::psk_session(tx, rx, Vec::new()).unwrap();
        let receiver = super::super::psk_session(rx, tx, Vec::new()).unwrap();
        let mut wire = vec![0u8; 4096];
        let mut n = sender
            .sealer
            .seal(b"hello", CONTENT_APPLICATION_DATA, &mut wire)
            .unwrap();
        n += sender
            .sealer
            .seal(&KEY_UPDATE_REQUEST, CONTENT_HANDSHAKE, &mut wire[n..])
            .unwrap();
        sender.sealer = sender.keys.next_sealer().unwrap();
        n += sender
            .sealer
            .seal(b"after", CONTENT_APPLICATION_DATA, &mut wire[n..])
            .unwrap();
        n += sender
            .sealer
            .seal(&CLOSE_NOTIFY_ALERT, CONTENT_ALERT, &mut wire[n..])
            .unwrap();
        // Byte by byte into a buffer of 64 bytes more than the largest record here.
        let mut buf = vec![0u8; 128];
        let super::super::TlsSession {
            stream: mut s,
            mut keys,
            ..
        } = receiver;
        let mut seen = Vec::new();
        for &b in &wire[..n] {
            let room = s.room(&mut buf, 1);
            buf[room.start] = b;
            s.received(1);
            while let Some(r) = s.next(&mut buf, &mut keys).unwrap() {
                seen.push(match r {
                    Record::Data(range) => String::from_utf8(buf[range].to_vec()).unwrap(),
                    other => format!("{other:?}"),
                });
            }
        }
        assert_eq!(
            seen,
            [
                "hello",
                "KeyUpdate { requested: true }",
                "after",
                "CloseNotify"
            ]
        );
        // A record sealed with another key is refused.
        let mut other = RecordSealer::aes128(&[9; 16], [9; 12], 0).unwrap();
        let n = other
            .seal(b"x", CONTENT_APPLICATION_DATA, &mut wire)
            .unwrap();
        let mut s = RecordStream::new(RecordOpener::aes128(&[8; 16], [8; 12], 0).unwrap(), n, 0);
        assert!(s.next(&mut wire, &mut keys).is_err());
    }
}
