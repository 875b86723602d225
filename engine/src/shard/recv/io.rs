//! The receiving channel's ring operations: bounded waits, exact and partial receives, control
//! messages to the sender, and the test-only frame delay.

use super::*;

impl RecvShard {
    /// Waits for the one op in flight to complete. Bounded by the idle bound, measured from the
    /// last byte the kernel received on this connection (`TCP_INFO`), so a slow but moving
    /// payload is fine while a half-sent header followed by silence, or a stopped sender, fails;
    /// between rounds the sender's keepalive frames keep the channel moving.
    ///
    /// `TCP_INFO` is read at most once a wait slice, and only once a slice has passed without
    /// the completion: it is a syscall that takes the socket's lock, which the sending side's
    /// softirq holds while it queues data here, and read around every receive (twice for each
    /// of the three receives of a frame) it was the receiver's most frequent syscall. The first
    /// reading sets the baseline and restarts the bound, so the bound may run up to one slice
    /// longer than the idle timeout, never shorter.
    ///
    /// Once the downtime began on this channel (`ShardStats::downtime_began`) the ring is
    /// polled for up to [`DOWNTIME_POLL_US`] before the wait sleeps.
    pub(super) fn wait_one(&mut self, what: &str) -> Result<i32> {
        let slice = Duration::from_millis(RING_WAIT_SLICE_MS);
        let mut since = Instant::now();
        let poll_until = self
            .stats
            .downtime_began
            .then(|| since + Duration::from_micros(DOWNTIME_POLL_US));
        let mut sampled = since;
        let mut received: Option<u64> = None;
        loop {
            if let Some(c) = self.ring.next_completion() {
                if c.result == -libc::EAGAIN || c.result == -libc::EINTR {
                    return Ok(RETRY);
                }
                if c.result < 0 {
                    return Err(Error::io(
                        format!("{what} on channel {}", self.channel),
                        errno(c.result),
                    ));
                }
                return Ok(c.result);
            }
            if self.p.abort.is_raised() {
                return Err(Error::Aborted);
            }
            if sampled.elapsed() >= slice {
                sampled = Instant::now();
                let now = self.ring.bytes_received();
                if received != Some(now) {
                    received = Some(now);
                    since = sampled;
                }
            }
            if since.elapsed() >= self.p.idle {
                return Err(Error::Timeout {
                    what: format!(
                        "{what} on channel {}: the sender sent nothing meanwhile",
                        self.channel
                    ),
                    ms: self.p.idle.as_millis() as u64,
                });
            }
            // A zero timeout runs the ring's deferred work and returns at once.
            match poll_until {
                Some(until) if Instant::now() < until => {
                    self.ring.submit_and_wait(1, Duration::ZERO)?;
                    std::thread::yield_now();
                }
                _ => {
                    self.ring.submit_and_wait(1, slice)?;
                }
            }
        }
    }

    /// Receives exactly `len` bytes into `bufs`. `End` only when the peer closed cleanly before
    /// the first byte and `boundary`; a stream cut anywhere else is an error.
    /// A `MSG_WAITALL` receive can still complete short (a signal, or io_uring's retry limit),
    /// so the rest is posted again; only 0 means the peer closed.
    pub(super) fn recv(&mut self, bufs: &[Buf], len: u64, boundary: bool) -> Result<Got> {
        let mut done = 0u64;
        while done < len {
            self.ring.push_recv(1, bufs, done);
            let got = self.wait_one("receiving")?;
            if got == RETRY {
                continue;
            }
            let got = got as u64;
            if got == 0 {
                return if done == 0 && boundary {
                    Ok(Got::End)
                } else {
                    Err(self.cut_short())
                };
            }
            done += got;
        }
        Ok(Got::All)
    }

    /// Receives what is available into `buf`; 0 at end of stream.
    pub(super) fn recv_some(&mut self, buf: Buf) -> Result<usize> {
        loop {
            self.ring.push_recv_some(1, buf);
            match self.wait_one("receiving")? {
                RETRY => continue,
                n => return Ok(n as usize),
            }
        }
    }

    /// Sends our own KeyUpdate (sealed with the old sending key) and moves to the next key.
    pub(super) fn answer_key_update(&mut self) -> Result<()> {
        let Some(tls) = self.p.tls.as_mut() else {
            return Ok(());
        };
        let next = tls.keys.next_sealer()?;
        self.p.abort.send_key_update(self.p.peer, next)
    }

    pub(super) fn send_done(&mut self) -> Result<()> {
        self.p.abort.send_control(self.p.peer, &Control::Done)
    }

    /// Tells the sender that every channel placed `round` (after its barrier).
    pub(super) fn send_round_placed(&mut self, round: u32) -> Result<()> {
        self.p
            .abort
            .send_control(self.p.peer, &Control::RoundPlaced { round })
    }

    pub(super) fn delay(&mut self) {
        if self.p.delay.max_us == 0 {
            return;
        }
        // xorshift64*: deterministic per (seed, channel), printed by the test on failure.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // Channels drift apart on purpose: channel c waits up to max / 4^(c mod 4), so channel 0
        // falls rounds behind the others while the kernel's socket buffers hold what it has not
        // read yet.
        let max = u64::from(self.p.delay.max_us) >> (2 * (self.channel % 4));
        let us = r % max.max(1);
        std::thread::sleep(Duration::from_micros(us));
    }
}
