//! The one linked chain of sends a shard keeps in flight: batching ready frames, resubmitting
//! after a short send, retiring frames, reaping completions, and the zero-copy decision.

use super::*;

impl SendShard {
    /// Links ready frames into one chain and submits it.
    pub(super) fn submit_chain(&mut self) -> Result<()> {
        debug_assert!(self.chain.is_empty() && self.chain_outstanding == 0);
        let mut frames = 0;
        let mut ops_total = 0;
        while let Some(&slot) = self.ready.front() {
            let s = &self.slots[usize::from(slot)];
            let ops = if self.zc.sending_zero_copy() {
                s.n_pieces
            } else {
                1
            };
            // The whole chain must fit, plus one entry for a control receive.
            let need = ops_total + ops + 1;
            // Paced: one frame per chain, so the rate applies frame by frame.
            let frames_max = if self.pace_bytes_per_s().is_some() {
                1
            } else {
                CHAIN_FRAMES_MAX
            };
            if frames == frames_max
                || self.ring.sq_space() < need
                || self.ring.ops_space() < need
                || (!self.zc.sending_zero_copy() && self.ring.vectored_space() <= frames)
            {
                break;
            }
            ops_total += ops;
            self.ready.pop_front();
            if self.zc.sending_zero_copy() {
                for piece in 0..s.n_pieces {
                    let len = match s.pieces[piece] {
                        Buf::Slab { len, .. } | Buf::Guest { len, .. } => u64::from(len),
                    };
                    self.chain.push(ChainOp {
                        slot,
                        piece: Some(piece as u16),
                        len,
                        done: 0,
                    });
                }
            } else {
                self.chain.push(ChainOp {
                    slot,
                    piece: None,
                    len: s.bytes,
                    done: 0,
                });
            }
            self.slots[usize::from(slot)].state = SlotState::InChain;
            frames += 1;
        }
        self.chain_started = Instant::now();
        self.chain_bytes = self.chain.iter().map(|op| op.len).sum();
        self.repace();
        if let Some(rate) = self.paced_bytes_per_s {
            // A paced chain is one frame, sent at once; the wait after it is silence on the
            // wire. A wait longer than the keepalive interval would let the receiver's idle
            // bound take a pacing sender for a dead one, so the wait stops there: a limit
            // below one frame per interval sends at that floor.
            let due = Duration::from_secs_f64(self.chain_bytes as f64 / rate);
            let floor = self.m.keepalive_every();
            if due > floor && !self.pace_floor_told {
                self.pace_floor_told = true;
                tracing::warn!(
                    channel = self.channel,
                    "the bandwidth limit ({rate:.0} bytes/s on this channel) is below one frame per keepalive interval ({} ms, a quarter of the receiver's idle bound): sending a frame every {} ms instead",
                    floor.as_millis(),
                    floor.as_millis()
                );
            }
            self.pace_until = self.pace_until.max(self.chain_started) + due.min(floor);
        }
        self.push_chain(0)
    }

    /// Pushes every chain op from `from` that has bytes left, linked in order.
    pub(super) fn push_chain(&mut self, from: usize) -> Result<()> {
        let last = (from..self.chain.len())
            .rev()
            .find(|&i| self.chain[i].done < self.chain[i].len);
        let Some(last) = last else {
            return Ok(());
        };
        for i in from..=last {
            let op = self.chain[i];
            if op.done == op.len {
                continue;
            }
            let tag = (u64::from(op.slot) << 16) | i as u64;
            let link = i < last;
            let s = &self.slots[usize::from(op.slot)];
            match op.piece {
                Some(p) => {
                    let buf = advance(s.pieces[usize::from(p)], op.done);
                    self.ring.push_send(tag, buf, true, link, Some(op.slot));
                }
                None => {
                    let pieces = s.pieces;
                    let n = s.n_pieces;
                    self.ring.push_sendmsg(tag, &pieces[..n], op.done, link);
                }
            }
            self.chain_outstanding += 1;
        }
        self.ring.submit()
    }

    /// Called when every op of the chain has reported: resubmit leftovers of a short send, or
    /// retire the chain.
    pub(super) fn finish_chain(&mut self) -> Result<()> {
        if self.chain.is_empty() {
            return Ok(());
        }
        if let Some(first) = self.chain.iter().position(|op| op.done < op.len) {
            // A short send broke the chain. The kernel cancels the links after it; if a later op
            // sent bytes anyway, the stream's order is lost and resending would corrupt it.
            if self.chain[first + 1..].iter().any(|op| op.done > 0) {
                return Err(Error::io(
                    format!(
                        "sending on channel {}: the kernel completed linked sends after a short one, so the stream order cannot be guaranteed",
                        self.channel
                    ),
                    std::io::Error::from(std::io::ErrorKind::InvalidData),
                ));
            }
            return self.push_chain(first);
        }
        if self.compression == Compression::Auto {
            if let Some(d) = self.ring.delivery() {
                let raw = self
                    .chain
                    .iter()
                    .all(|op| self.slots[usize::from(op.slot)].codec == Codec::Raw);
                self.auto
                    .observe_delivery(d.bytes_per_s, d.app_limited, raw);
            }
        }
        let mut previous = None;
        for i in 0..self.chain.len() {
            let slot = self.chain[i].slot;
            if previous == Some(slot) {
                continue;
            }
            previous = Some(slot);
            let s = &mut self.slots[usize::from(slot)];
            s.state = SlotState::Sent;
            add(&self.progress.pages_done, s.pages);
            if let Some(event) = self.m.handed(s.marker) {
                // The coordinator may be gone if the transfer is being torn down.
                let _ = self.events.send(event);
            }
        }
        self.chain.clear();
        Ok(())
    }

    pub(super) fn reap(&mut self) -> Result<()> {
        while let Some(c) = self.ring.next_completion() {
            self.m.progressed(Instant::now());
            if c.tag == CONTROL_TAG {
                self.on_control(c.result)?;
            } else if c.notif {
                self.stats.zc_completed += 1;
                if c.zc_copied {
                    self.stats.zc_copied += 1;
                }
                self.decide_zero_copy();
            } else {
                let i = (c.tag & 0xffff) as usize;
                self.chain_outstanding -= 1;
                if c.result >= 0 {
                    self.chain[i].done += c.result as u64;
                } else if c.result != -libc::ECANCELED
                    && c.result != -libc::EAGAIN
                    && c.result != -libc::EINTR
                {
                    // (Cancelled links and retryable results sent nothing: the chain's
                    // remainder is resubmitted once every op has reported.)
                    return Err(self.send_failed(errno(c.result)));
                }
            }
        }
        Ok(())
    }

    pub(super) fn decide_zero_copy(&mut self) {
        if self.zc != ZcState::Probing || self.stats.zc_completed < u64::from(ZC_PROBE_SENDS) {
            return;
        }
        if self.stats.zc_copied == self.stats.zc_completed {
            tracing::info!(
                channel = self.channel,
                "the kernel copied every zero-copy send (loopback or a NIC without support): switching to plain sends"
            );
            self.zc = ZcState::Plain;
            self.stats.zc_fallback = true;
        } else if self.tls.is_none() && registers_guest_memory(self.memory.total_bytes()) {
            // Registering pins and faults in all of guest memory (up to a second per GiB); with
            // DEFER_TASKRUN nothing in flight progresses meanwhile, so wait until nothing is.
            self.zc = ZcState::RegisterPending;
        } else {
            if self.tls.is_none() {
                tracing::info!(
                    channel = self.channel,
                    "guest memory is larger than {} GiB: zero-copy sends without fixed buffers (registering it would stall the channel)",
                    REGISTER_GUEST_BYTES_MAX >> 30
                );
            }
            self.zc = ZcState::ZeroCopy;
        }
    }
}

/// Whether a shard registers guest memory of `total_bytes` as fixed buffers (see
/// [`REGISTER_GUEST_BYTES_MAX`]).
fn registers_guest_memory(total_bytes: u64) -> bool {
    total_bytes <= REGISTER_GUEST_BYTES_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_is_registered_only_up_to_the_bound() {
        assert!(registers_guest_memory(1 << 30));
        assert!(registers_guest_memory(REGISTER_GUEST_BYTES_MAX));
        assert!(!registers_guest_memory(REGISTER_GUEST_BYTES_MAX + 4096));
        assert!(!registers_guest_memory(4 << 40));
    }
}
