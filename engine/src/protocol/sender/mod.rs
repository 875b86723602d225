//! The sending channel's life as a sans-IO state machine: what may be built next, what the
//! receiver's control stream means at each point, when the channel is complete, and when it
//! must speak (a keepalive) or give up (the idle bound).
//!
//! The sender shard drives it: it asks the machine to number each frame it builds, reports
//! back the markers the kernel has taken, and feeds it the receiver's control messages, TLS
//! events and the time. Nothing here touches a socket or reads a clock, so unit tests and the
//! simulated driver run exactly the logic the shards run.
//!
//! ```text
//!  our half      Sending ──end of stream built──▶ EndBuilt ──handed to the kernel──▶ EndSent
//!  the receiver  Awaiting ──Done──▶ Done ──close_notify (TLS only)──▶ Closed
//!  complete      EndSent, and Closed (TLS) or Done (plaintext)
//! ```
//! A `Done` before our end of stream was built, a second `Done`, a close_notify before `Done`,
//! and a connection closed before completion are the peer's faults ([`SenderFault`]). An abort
//! frame may be built in any state: it is the driver's way out.

use std::fmt;
use std::time::{Duration, Instant};

use super::channel::SenderChannel;
use super::control::{AbortCode, Control};
use super::wire::Frame;
use super::ProtocolError;

/// Our half of the channel's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    /// Frames may be built.
    Sending,
    /// The end-of-stream frame is built; nothing more may be (an abort frame excepted).
    EndBuilt,
    /// The kernel has taken the end-of-stream frame.
    EndSent,
}

/// What the receiver has confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// Nothing yet.
    Awaiting,
    /// `Done`: it placed every page of every channel.
    Done,
    /// TLS: its close_notify after `Done`.
    Closed,
}

/// What a built frame marks; the driver hands it back to [`SenderMachine::handed`] once the
/// kernel has taken the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// Pages, a keepalive or an abort.
    None,
    /// The end of this round.
    EndOfRound(u32),
    /// The end of the stream.
    EndOfStream,
}

/// What the machine tells its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderEvent {
    /// Every frame of `round`, up to its end marker, has been handed to the kernel.
    RoundSent {
        /// The round.
        round: u32,
    },
    /// The receiver placed every page of `round` on every channel.
    RoundPlaced {
        /// The round.
        round: u32,
    },
}

/// Why the channel cannot go on, as far as the machine can tell (the driver adds the channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderFault {
    /// The receiver broke the protocol.
    Protocol(ProtocolError),
    /// The receiver aborted, saying why.
    PeerAborted {
        /// Its error class.
        code: AbortCode,
        /// Its reason (sanitized).
        reason: String,
    },
    /// The receiver closed the connection before confirming the end.
    PeerClosed {
        /// Where in the stream.
        when: &'static str,
    },
    /// Nothing moved for the idle bound.
    Idle {
        /// What the channel was waiting for.
        waiting: Waiting,
        /// Milliseconds without progress.
        ms: u64,
    },
}

/// What an idle channel was waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The receiver to take data.
    Data,
    /// The receiver to confirm the end.
    Confirmation,
    /// The receiver to report an ended round placed.
    Placement,
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Waiting::Data => "waiting for the receiver to take data",
            Waiting::Confirmation => "waiting for the receiver to confirm the end",
            Waiting::Placement => "waiting for the receiver to report a round placed",
        })
    }
}

/// One sending channel (see the module docs). `Copy`, so a driver whose frame failed to build
/// can put the machine back as it was (the stream stays gapless for the abort frame).
#[derive(Debug, Clone, Copy)]
pub struct SenderMachine {
    numbering: SenderChannel,
    outgoing: Outgoing,
    confirmation: Confirmation,
    tls: bool,
    key_update_due: bool,
    /// The next round the receiver may report placed (they come in order).
    next_placed: u32,
    idle: Duration,
    keepalive_every: Duration,
    last_frame_at: Instant,
    last_progress: Instant,
    last_seen_pages: u64,
    /// When the last round ended here, or pages last moved on any channel since, whichever is
    /// later: a pending `RoundPlaced` is owed within the idle bound of this. (Keepalives, which
    /// count as progress otherwise, do not move it: they show our side alive, not the
    /// receiver.)
    placement_clock: Instant,
}

impl SenderMachine {
    /// A channel starting at `now`. `tls`: the receiver's close_notify completes it.
    /// `idle`: no progress for this long fails it. `keepalive_every`: an idle channel sends a
    /// keepalive frame this often.
    pub fn new(tls: bool, idle: Duration, keepalive_every: Duration, now: Instant) -> Self {
        SenderMachine {
            numbering: SenderChannel::default(),
            outgoing: Outgoing::Sending,
            confirmation: Confirmation::Awaiting,
            tls,
            key_update_due: false,
            next_placed: 0,
            idle,
            keepalive_every,
            last_frame_at: now,
            last_progress: now,
            last_seen_pages: 0,
            placement_clock: now,
        }
    }

    /// Our half of the channel.
    pub fn outgoing(&self) -> Outgoing {
        self.outgoing
    }

    /// What the receiver has confirmed.
    pub fn confirmation(&self) -> Confirmation {
        self.confirmation
    }

    /// True while frames other than an abort may be built.
    pub fn may_build(&self) -> bool {
        self.outgoing == Outgoing::Sending
    }

    /// True once the end of stream is out and the receiver confirmed it: the channel may close
    /// once nothing is in flight.
    pub fn complete(&self) -> bool {
        let confirmed = match self.confirmation {
            Confirmation::Awaiting => false,
            Confirmation::Done => !self.tls,
            Confirmation::Closed => true,
        };
        self.outgoing == Outgoing::EndSent && confirmed
    }

    /// The round frames are stamped with.
    pub fn round(&self) -> u32 {
        self.numbering.round()
    }

    fn built(&mut self, now: Instant) {
        debug_assert!(self.outgoing == Outgoing::Sending, "built after the end");
        self.last_frame_at = now;
    }

    /// Starts a `Pages` frame for `region` in `frame` (the driver then adds pages).
    pub fn begin_pages(&mut self, frame: &mut Frame, region: u32, live: bool, now: Instant) {
        self.built(now);
        self.numbering.begin_pages(frame, region);
        frame.live = live;
    }

    /// Fills `frame` with the end of the current round, and moves to the next.
    pub fn end_round(&mut self, frame: &mut Frame, now: Instant) -> Marker {
        self.built(now);
        self.placement_clock = now;
        let round = self.numbering.round();
        self.numbering.end_round(frame);
        Marker::EndOfRound(round)
    }

    /// Fills `frame` with a keepalive.
    pub fn keepalive(&mut self, frame: &mut Frame, now: Instant) {
        self.built(now);
        self.numbering.keepalive(frame);
    }

    /// Fills `frame` with the end of the stream: nothing but an abort may follow it.
    pub fn end_stream(&mut self, frame: &mut Frame, now: Instant) -> Marker {
        self.built(now);
        self.numbering.end_stream(frame);
        self.outgoing = Outgoing::EndBuilt;
        Marker::EndOfStream
    }

    /// Fills `frame` with a device state chunk of `payload_bytes` (after the last round).
    pub fn device_state(&mut self, frame: &mut Frame, payload_bytes: u32, now: Instant) {
        self.built(now);
        self.numbering.device_state(frame, payload_bytes);
    }

    /// Fills `frame` with an abort carrying `payload_bytes` of code and reason (any state).
    pub fn abort(&mut self, frame: &mut Frame, payload_bytes: u32, now: Instant) {
        self.last_frame_at = now;
        self.numbering.abort(frame, payload_bytes);
    }

    /// The kernel has taken a frame marked `marker`.
    pub fn handed(&mut self, marker: Marker) -> Option<SenderEvent> {
        match marker {
            Marker::None => None,
            Marker::EndOfRound(round) => Some(SenderEvent::RoundSent { round }),
            Marker::EndOfStream => {
                assert_eq!(
                    self.outgoing,
                    Outgoing::EndBuilt,
                    "end of stream sent twice"
                );
                self.outgoing = Outgoing::EndSent;
                None
            }
        }
    }

    /// True while a round ended here has not yet been reported placed: the driver should watch
    /// the connection closely (a live migration measures each round up to that report).
    pub fn placement_pending(&self) -> bool {
        self.next_placed < self.numbering.round() && self.confirmation == Confirmation::Awaiting
    }

    /// A control message from the receiver; a placed round is passed on to the driver.
    pub fn on_control(&mut self, msg: Control) -> Result<Option<SenderEvent>, SenderFault> {
        match msg {
            Control::Done => {
                if self.outgoing == Outgoing::Sending || self.confirmation != Confirmation::Awaiting
                {
                    return Err(SenderFault::Protocol(ProtocolError::UnexpectedDone));
                }
                self.confirmation = Confirmation::Done;
                Ok(None)
            }
            Control::RoundPlaced { round } => {
                // Rounds are placed in order, only once ended here, and never after `Done`.
                let ended = round < self.numbering.round();
                if round != self.next_placed
                    || !ended
                    || self.confirmation != Confirmation::Awaiting
                {
                    return Err(SenderFault::Protocol(ProtocolError::Round {
                        expected: self.next_placed,
                        got: round,
                    }));
                }
                self.next_placed += 1;
                Ok(Some(SenderEvent::RoundPlaced { round }))
            }
            Control::Abort { code, reason } => Err(SenderFault::PeerAborted { code, reason }),
        }
    }

    /// TLS: the receiver's close_notify.
    pub fn on_close_notify(&mut self) -> Result<(), SenderFault> {
        if self.confirmation != Confirmation::Done {
            return Err(SenderFault::PeerClosed {
                when: "(TLS close_notify) before confirming the end of the transfer",
            });
        }
        self.confirmation = Confirmation::Closed;
        Ok(())
    }

    /// TLS: the receiver updated its key; `requested` asks us to update ours in turn.
    pub fn on_key_update(&mut self, requested: bool) {
        self.key_update_due |= requested;
    }

    /// True once (then false until asked again): the next frame must start with a key update.
    pub fn take_key_update(&mut self) -> bool {
        std::mem::take(&mut self.key_update_due)
    }

    /// The receiver closed the connection (a zero-byte read).
    pub fn on_peer_closed(&self) -> SenderFault {
        SenderFault::PeerClosed {
            when: if self.outgoing == Outgoing::EndSent {
                "before confirming the end of the transfer"
            } else {
                "while data was still being sent"
            },
        }
    }

    /// Something moved at `now` (a completion, or waiting on our own pacing or on work).
    pub fn progressed(&mut self, now: Instant) {
        self.last_progress = now;
    }

    /// The longest this channel may stay silent: a keepalive is owed after that.
    pub fn keepalive_every(&self) -> Duration {
        self.keepalive_every
    }

    /// How long until an idle channel owes the receiver a keepalive (zero: now).
    pub fn keepalive_in(&self, now: Instant) -> Duration {
        self.keepalive_every
            .saturating_sub(now.saturating_duration_since(self.last_frame_at))
    }

    /// Checks the idle bound at `now`. `pages_moved` counts pages handed over on *every*
    /// channel: a channel whose receiver waits at a round barrier for a slower one is blocked,
    /// not dead.
    pub fn check_idle(&mut self, now: Instant, pages_moved: u64) -> Result<(), SenderFault> {
        if pages_moved != self.last_seen_pages {
            self.last_seen_pages = pages_moved;
            self.last_progress = now;
            self.placement_clock = self.placement_clock.max(now);
        }
        if self.outgoing != Outgoing::EndSent && self.placement_pending() {
            let ms = now
                .saturating_duration_since(self.placement_clock)
                .as_millis() as u64;
            if ms >= self.idle.as_millis() as u64 {
                let waiting = Waiting::Placement;
                return Err(SenderFault::Idle { waiting, ms });
            }
        }
        let ms = now
            .saturating_duration_since(self.last_progress)
            .as_millis() as u64;
        if ms >= self.idle.as_millis() as u64 {
            let waiting = if self.outgoing == Outgoing::EndSent {
                Waiting::Confirmation
            } else if self.placement_pending() {
                Waiting::Placement
            } else {
                Waiting::Data
            };
            return Err(SenderFault::Idle { waiting, ms });
        }
        Ok(())
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
