//! The TLS (or pre-shared-key) record side of a receiving channel: plaintext out of the record
//! stream, close_notify, and answering key updates.

use super::*;
use crate::pipeline::seal::Direct;

impl RecvShard {
    /// Opens the records of a payload into the destination ranges `bufs`: straight into the
    /// pages where a whole record's data fits the range (see [`crate::tls::direct`]), else in
    /// the staging slot, copying the plaintext over.
    pub(super) fn tls_place(&mut self, bufs: &[Buf]) -> Result<()> {
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
                let left = (u64::from(len) - done) as usize;
                if let Some(n) = self.tls_direct(region, offset + done, left)? {
                    done += n as u64;
                    self.stats.tls_direct_bytes += n as u64;
                    continue;
                }
                let Some(r) = self.tls_plain(left, false)? else {
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

    /// Opens the next record straight into `region` at `offset` when it is application data
    /// of at most `max` bytes, receiving ciphertext until it is whole. `None` when it must go
    /// through the staging slot instead (plaintext left over from a record that carried a
    /// frame header, a record longer than the range, a key update, a cipher without a direct
    /// opener).
    fn tls_direct(&mut self, region: u32, offset: u64, max: usize) -> Result<Option<usize>> {
        loop {
            let staging = self.ring.slot_mut(STAGING_SLOT);
            let Some(tls) = self.p.tls.as_mut() else {
                return Ok(None);
            };
            if !tls.plain.is_empty() || tls.close_notify || !tls.stream.opens_direct() {
                return Ok(None);
            }
            match tls.stream.peek(staging)? {
                Some((n, _)) if n == 0 || n > max => return Ok(None),
                Some((n, true)) => {
                    let dest = self.p.memory.regions()[region as usize].range_mut(offset, n);
                    return Ok(match tls.stream.next_direct(staging, &dest)? {
                        Direct::Placed => Some(n),
                        Direct::InPlace => None,
                    });
                }
                _ => self.tls_receive(false)?,
            }
        }
    }

    pub(super) fn cut_short(&self) -> Error {
        Error::PeerClosed {
            channel: self.channel,
            when: "in the middle of a frame",
        }
    }

    /// Up to `max` bytes of opened plaintext, as a range of the staging slot; `None` when the
    /// stream ended (close_notify, or a FIN that `boundary` allows to be reported as an end).
    pub(super) fn tls_plain(&mut self, max: usize, boundary: bool) -> Result<Option<Range<usize>>> {
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
    pub(super) fn tls_next_record(&mut self, boundary: bool) -> Result<bool> {
        loop {
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
            self.tls_receive(boundary)?;
        }
    }

    /// Receives more ciphertext (whatever is available) into the staging slot, making room
    /// first. A FIN is an error: before any byte of a frame when `boundary`, a stream cut
    /// short without close_notify, else one cut in the middle of a frame.
    fn tls_receive(&mut self, boundary: bool) -> Result<()> {
        let channel = self.channel;
        let staging = self.ring.slot_mut(STAGING_SLOT);
        let Some(tls) = self.p.tls.as_mut() else {
            return Err(self.cut_short());
        };
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
        Ok(())
    }

    /// After the end-of-stream frame a TLS channel must close with close_notify: a stream cut
    /// short is an error, never a silent short transfer.
    pub(super) fn expect_close_notify(&mut self) -> Result<()> {
        if self.p.tls.is_none() {
            return Ok(());
        }
        match self.tls_plain(1, false) {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(self.protocol(ProtocolError::AfterEnd)),
            Err(e) => Err(e),
        }
    }
}
