//! The control direction (receiver to sender): `Done`, `Abort`, and under TLS the record stream
//! with its close_notify and key updates; and, the other way, telling the receiver why this side
//! failed.

use super::*;
use crate::protocol::sender::Confirmation;

impl SendShard {
    /// A send failed: prefer the receiver's own reason if it sent one before closing.
    pub(super) fn send_failed(&mut self, e: std::io::Error) -> Error {
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.control_posted && Instant::now() < deadline && !self.abort.is_raised() {
            if self
                .ring
                .submit_and_wait(1, Duration::from_millis(50))
                .is_err()
            {
                break;
            }
            while let Some(c) = self.ring.next_completion() {
                if c.tag == CONTROL_TAG {
                    if let Err(peer) = self.on_control(c.result) {
                        return peer;
                    }
                }
            }
        }
        Error::io(format!("sending on channel {}", self.channel), e)
    }

    pub(super) fn post_control_recv(&mut self, upto: usize) {
        self.ring.push_recv(
            CONTROL_TAG,
            &[Buf::Slab {
                slot: CONTROL_SLOT,
                offset: self.control.filled() as u32,
                len: (upto - self.control.filled()) as u32,
            }],
            0,
        );
        self.control_posted = true;
    }

    pub(super) fn on_control(&mut self, result: i32) -> Result<()> {
        self.control_posted = false;
        if result == -libc::EAGAIN || result == -libc::EINTR {
            // Nothing arrived, nothing ended: ask again for what is still missing.
            return self.repost_control();
        }
        if result < 0 {
            if result == -libc::ECANCELED {
                return Ok(());
            }
            return Err(Error::io(
                format!("receiving control messages on channel {}", self.channel),
                errno(result),
            ));
        }
        if result == 0 {
            return Err(self.fault(self.m.on_peer_closed()));
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.stream.received(result as usize);
            return self.on_control_records();
        }
        self.control.received(result as usize);
        loop {
            let next = self.control.next(self.ring.slot_mut(CONTROL_SLOT));
            match next.map_err(|e| self.fault(SenderFault::Protocol(e)))? {
                Some(msg) => self.on_control_message(msg)?,
                None => break,
            }
        }
        // More may come until `Done` (after it the receiver closes: no receive is left posted).
        if self.m.confirmation() == Confirmation::Awaiting {
            self.repost_control()?;
        }
        Ok(())
    }

    /// Posts the control receive again for what is still missing (after part of a message, or
    /// a retryable result).
    pub(super) fn repost_control(&mut self) -> Result<()> {
        if self.tls.is_some() {
            return self.on_control_records();
        }
        let need = self.control.wanted(self.ring.slot_mut(CONTROL_SLOT));
        self.post_control_recv(need);
        Ok(())
    }

    pub(super) fn on_control_message(&mut self, msg: Control) -> Result<()> {
        let verdict = self.m.on_control(msg);
        if self.stats.confirmed_at.is_none() && self.m.confirmation() == Confirmation::Done {
            self.stats.confirmed_at = Some(Instant::now());
        }
        if let Some(event) = verdict.map_err(|f| self.fault(f))? {
            // The coordinator may be gone if the transfer is being torn down.
            let _ = self.events.send(event);
        }
        Ok(())
    }

    /// TLS: opens every complete record in the control slot, then asks for more.
    pub(super) fn on_control_records(&mut self) -> Result<()> {
        let channel = self.channel;
        loop {
            let buf = self.ring.slot_mut(CONTROL_SLOT);
            let Some(tls) = self.tls.as_mut() else {
                return Ok(());
            };
            match tls.stream.next(buf, &mut tls.keys)? {
                Some(Record::Data(r)) => {
                    let mut plain = [0u8; CONTROL_MESSAGE_BYTES_MAX];
                    let n = r.len().min(plain.len());
                    plain[..n].copy_from_slice(&buf[r.start..r.start + n]);
                    let decoded = Control::decode(&plain[..n])
                        .map_err(|source| Error::Protocol { channel, source })?;
                    match decoded {
                        Some((msg, _)) => self.on_control_message(msg)?,
                        None => {
                            return Err(Error::Protocol {
                                channel,
                                source: ProtocolError::Truncated {
                                    what: "control message",
                                    need: CONTROL_BYTES,
                                    have: n,
                                },
                            })
                        }
                    }
                }
                Some(Record::CloseNotify) => {
                    let closed = self.m.on_close_notify();
                    return closed.map_err(|f| self.fault(f));
                }
                Some(Record::KeyUpdate { requested }) => {
                    // The stream moved to the next key; a request is answered with our own
                    // KeyUpdate before the next frame.
                    self.m.on_key_update(requested);
                }
                None => {
                    let room = tls.stream.room(buf, RECORD_BYTES_MAX);
                    self.ring.push_recv_some(
                        CONTROL_TAG,
                        Buf::Slab {
                            slot: CONTROL_SLOT,
                            offset: room.start as u32,
                            len: room.len() as u32,
                        },
                    );
                    self.control_posted = true;
                    return Ok(());
                }
            }
            if self.m.confirmation() == Confirmation::Closed {
                return Ok(());
            }
        }
    }

    /// On the way out after a failure: sends the receiver an abort frame naming the first
    /// error, after whatever frames are already built (they hold the frame numbers and TLS
    /// sequence numbers before it). Best effort, within `ABORT_SEND_MS`: a connection that is
    /// gone or stuck gets nothing, and the receiver then sees it close.
    pub(super) fn tell_receiver(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(ABORT_SEND_MS);
        let mut settle = || -> Result<bool> {
            while Instant::now() < deadline {
                self.reap()?;
                if self.chain_outstanding == 0 {
                    self.finish_chain()?;
                    if self.chain.is_empty() {
                        return Ok(true);
                    }
                }
                self.ring.submit_and_wait(1, Duration::from_millis(10))?;
            }
            Ok(false)
        };
        if !matches!(settle(), Ok(true)) {
            return;
        }
        let Some(slot) = self.free_slot() else {
            return;
        };
        if self.build(slot, Work::Abort).is_err() {
            return;
        }
        while !self.ready.is_empty() && Instant::now() < deadline {
            if self.submit_chain().is_err() {
                return;
            }
            while self.chain_outstanding > 0 && Instant::now() < deadline {
                if self.reap().is_err()
                    || self
                        .ring
                        .submit_and_wait(1, Duration::from_millis(10))
                        .is_err()
                {
                    return;
                }
            }
            if self.finish_chain().is_err() {
                return;
            }
        }
    }

    /// The machine's verdict as this channel's error.
    pub(super) fn fault(&self, fault: SenderFault) -> Error {
        let channel = self.channel;
        match fault {
            SenderFault::Protocol(source) => Error::Protocol { channel, source },
            SenderFault::PeerAborted { code, reason } => Error::PeerAborted {
                channel,
                code,
                reason,
            },
            SenderFault::PeerClosed { when } => Error::PeerClosed { channel, when },
            SenderFault::Idle { waiting, ms } => Error::Timeout {
                what: format!("{waiting} on channel {channel}"),
                ms,
            },
        }
    }
}
