//! A reference model of the sending channel's machine, stated from the module docs rather than
//! from its fields, and a runner that drives a [`SenderMachine`] and the model through the same
//! [`Step`]s and compares them after every step.
//!
//! Steps are the driver's calls in the order a shard makes them (build only while building is
//! allowed; hand markers back in the order they were built) and anything a receiver can say, in
//! any order. The proptest in `tests.rs` and the `sender_machine` fuzz target (which includes
//! this file by path, so both run the same model) differ only in where the steps come from.
//! The includer provides, by `use`, the machine's types, `Control` and `Frame`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use super::*;

/// One step: a driver call, the passing of time, or a message from the receiver.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// Build a `Pages` frame (skipped once nothing but an abort may be built).
    Pages,
    /// Build the end of the current round.
    EndRound,
    /// Build the end of the stream.
    EndStream,
    /// Build a keepalive.
    Keepalive,
    /// Build a device-state chunk.
    DeviceState,
    /// The kernel takes the oldest frame built and not yet taken.
    Hand,
    /// This many milliseconds pass.
    Wait(u16),
    /// A completion (progress on this channel).
    Progressed,
    /// The driver checks the idle bound; `pages_moved`: some channel moved pages since.
    CheckIdle {
        /// Pages moved on some channel since the last check.
        pages_moved: bool,
    },
    /// The receiver says `Done`.
    Done,
    /// The receiver reports a round placed: the one owed next, moved by `offset - 1` (so 1 is
    /// the expected round, 0 the one before it, 2 the one after).
    Placed(u8),
    /// The receiver aborts.
    PeerAbort,
    /// TLS: the receiver's close_notify.
    CloseNotify,
    /// TLS: the receiver updated its key, asking for ours in turn or not.
    KeyUpdate(bool),
    /// The driver asks whether a key update is due.
    TakeKeyUpdate,
    /// The receiver says what a well-behaved one says next: the round placement owed, else
    /// `Done` once the end is built, else (TLS) its close_notify after `Done`; else nothing
    /// happens. Random messages mostly end a run with a fault; these carry runs to the end.
    Answer,
}

/// What the docs say the channel is, in milliseconds from its start.
struct Model {
    tls: bool,
    idle_ms: u64,
    keepalive_ms: u64,
    now_ms: u64,
    last_frame_ms: u64,
    last_progress_ms: u64,
    /// When a pending placement report started to be owed: the later of the last round's end
    /// and the last time pages moved.
    placement_from_ms: u64,
    pages_moved: u64,
    pages_seen: u64,
    frames_built: u64,
    rounds_ended: u32,
    next_placed: u32,
    built: VecDeque<Marker>,
    end_built: bool,
    end_sent: bool,
    confirmation: Confirmation,
    key_update_due: bool,
}

impl Model {
    /// The step a well-behaved receiver takes now (see [`Step::Answer`]).
    fn answer(&self) -> Step {
        if self.placement_pending() {
            Step::Placed(1)
        } else if self.end_built && self.confirmation == Confirmation::Awaiting {
            Step::Done
        } else if self.tls && self.confirmation == Confirmation::Done {
            Step::CloseNotify
        } else {
            Step::Progressed
        }
    }

    fn placement_pending(&self) -> bool {
        self.next_placed < self.rounds_ended && self.confirmation == Confirmation::Awaiting
    }

    fn outgoing(&self) -> Outgoing {
        match (self.end_built, self.end_sent) {
            (_, true) => Outgoing::EndSent,
            (true, false) => Outgoing::EndBuilt,
            (false, false) => Outgoing::Sending,
        }
    }

    fn complete(&self) -> bool {
        self.end_sent
            && match self.confirmation {
                Confirmation::Awaiting => false,
                Confirmation::Done => !self.tls,
                Confirmation::Closed => true,
            }
    }

    /// What `check_idle` must answer now.
    fn idle_check(&mut self) -> Result<(), SenderFault> {
        if self.pages_moved != self.pages_seen {
            self.pages_seen = self.pages_moved;
            self.last_progress_ms = self.now_ms;
            self.placement_from_ms = self.placement_from_ms.max(self.now_ms);
        }
        let owed_for = self.now_ms - self.placement_from_ms;
        if !self.end_sent && self.placement_pending() && owed_for >= self.idle_ms {
            return Err(SenderFault::Idle {
                waiting: Waiting::Placement,
                ms: owed_for,
            });
        }
        let still = self.now_ms - self.last_progress_ms;
        if still >= self.idle_ms {
            let waiting = if self.end_sent {
                Waiting::Confirmation
            } else if self.placement_pending() {
                Waiting::Placement
            } else {
                Waiting::Data
            };
            return Err(SenderFault::Idle { waiting, ms: still });
        }
        Ok(())
    }
}

/// Runs `steps` on a fresh machine and on the model; `Err` names the first step where they
/// disagree. A step the machine refuses with a fault the model expects ends the run (a shard
/// fails the channel there). `Ok(true)`: the channel was complete at the end.
pub fn run(tls: bool, idle_ms: u64, keepalive_ms: u64, steps: &[Step]) -> Result<bool, String> {
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    let mut m = SenderMachine::new(
        tls,
        Duration::from_millis(idle_ms),
        Duration::from_millis(keepalive_ms),
        start,
    );
    let mut w = Model {
        tls,
        idle_ms,
        keepalive_ms,
        now_ms: 0,
        last_frame_ms: 0,
        last_progress_ms: 0,
        placement_from_ms: 0,
        pages_moved: 0,
        pages_seen: 0,
        frames_built: 0,
        rounds_ended: 0,
        next_placed: 0,
        built: VecDeque::new(),
        end_built: false,
        end_sent: false,
        confirmation: Confirmation::Awaiting,
        key_update_due: false,
    };
    let mut frame = Frame::default();
    for (i, &step) in steps.iter().enumerate() {
        let step = match step {
            Step::Answer => w.answer(),
            s => s,
        };
        let now = at(w.now_ms);
        let builds = matches!(
            step,
            Step::Pages | Step::EndRound | Step::EndStream | Step::Keepalive | Step::DeviceState
        );
        if builds && !m.may_build() {
            continue;
        }
        let mismatch = |what: String| Err(format!("step {i} ({step:?}): {what}"));
        // Builds: the machine numbers every frame in turn and marks the ends.
        let marker = match step {
            Step::Pages => {
                m.begin_pages(&mut frame, 0, false, now);
                Some(Marker::None)
            }
            Step::EndRound => Some(m.end_round(&mut frame, now)),
            Step::EndStream => Some(m.end_stream(&mut frame, now)),
            Step::Keepalive => {
                m.keepalive(&mut frame, now);
                Some(Marker::None)
            }
            Step::DeviceState => {
                m.device_state(&mut frame, 100, now);
                Some(Marker::None)
            }
            _ => None,
        };
        if let Some(marker) = marker {
            let want = match step {
                Step::EndRound => Marker::EndOfRound(w.rounds_ended),
                Step::EndStream => Marker::EndOfStream,
                _ => Marker::None,
            };
            if marker != want || frame.frame_number != w.frames_built {
                return mismatch(format!(
                    "built {marker:?} as frame {}, the model expected {want:?} as frame {}",
                    frame.frame_number, w.frames_built
                ));
            }
            w.frames_built += 1;
            w.last_frame_ms = w.now_ms;
            match step {
                Step::EndRound => {
                    w.rounds_ended += 1;
                    w.placement_from_ms = w.now_ms;
                }
                Step::EndStream => w.end_built = true,
                _ => {}
            }
            w.built.push_back(marker);
        }
        // Everything else.
        let fault = match step {
            Step::Hand => {
                let Some(marker) = w.built.pop_front() else {
                    continue;
                };
                let want = match marker {
                    Marker::EndOfRound(round) => Some(SenderEvent::RoundSent { round }),
                    Marker::None | Marker::EndOfStream => None,
                };
                w.end_sent |= marker == Marker::EndOfStream;
                let got = m.handed(marker);
                if got != want {
                    return mismatch(format!("handed {marker:?}: {got:?}, expected {want:?}"));
                }
                None
            }
            Step::Wait(ms) => {
                w.now_ms += u64::from(ms);
                None
            }
            Step::Progressed => {
                m.progressed(now);
                w.last_progress_ms = w.now_ms;
                None
            }
            Step::CheckIdle { pages_moved } => {
                w.pages_moved += u64::from(pages_moved);
                let want = w.idle_check();
                let got = m.check_idle(now, w.pages_moved);
                if got != want {
                    return mismatch(format!("check_idle: {got:?}, expected {want:?}"));
                }
                got.err()
            }
            Step::Done => {
                let ok = w.end_built && w.confirmation == Confirmation::Awaiting;
                match (m.on_control(Control::Done), ok) {
                    (Ok(None), true) => {
                        w.confirmation = Confirmation::Done;
                        None
                    }
                    (Err(f @ SenderFault::Protocol(_)), false) => Some(f),
                    (got, _) => return mismatch(format!("Done: {got:?}, accepted: {ok}")),
                }
            }
            Step::Placed(offset) => {
                let round = w
                    .next_placed
                    .wrapping_add(u32::from(offset))
                    .wrapping_sub(1);
                let ok = round == w.next_placed
                    && round < w.rounds_ended
                    && w.confirmation == Confirmation::Awaiting;
                match (m.on_control(Control::RoundPlaced { round }), ok) {
                    (Ok(Some(SenderEvent::RoundPlaced { round: r })), true) if r == round => {
                        w.next_placed += 1;
                        None
                    }
                    (Err(f @ SenderFault::Protocol(_)), false) => Some(f),
                    (got, _) => {
                        return mismatch(format!("RoundPlaced {round}: {got:?}, accepted: {ok}"))
                    }
                }
            }
            Step::PeerAbort => {
                let abort = Control::Abort {
                    code: AbortCode::Internal,
                    reason: "fuzz".into(),
                };
                match m.on_control(abort) {
                    Err(f @ SenderFault::PeerAborted { .. }) => Some(f),
                    got => return mismatch(format!("Abort: {got:?}")),
                }
            }
            Step::CloseNotify => {
                let ok = w.confirmation == Confirmation::Done;
                match (m.on_close_notify(), ok) {
                    (Ok(()), true) => {
                        w.confirmation = Confirmation::Closed;
                        None
                    }
                    (Err(f @ SenderFault::PeerClosed { .. }), false) => Some(f),
                    (got, _) => return mismatch(format!("close_notify: {got:?}, accepted: {ok}")),
                }
            }
            Step::KeyUpdate(requested) => {
                m.on_key_update(requested);
                w.key_update_due |= requested;
                None
            }
            Step::TakeKeyUpdate => {
                let got = m.take_key_update();
                if got != std::mem::take(&mut w.key_update_due) {
                    return mismatch(format!("take_key_update: {got}"));
                }
                None
            }
            _ => None,
        };
        if fault.is_some() {
            // The driver fails the channel here.
            return Ok(false);
        }
        let now = at(w.now_ms);
        let keepalive_in =
            Duration::from_millis(w.keepalive_ms.saturating_sub(w.now_ms - w.last_frame_ms));
        let seen = (
            m.round(),
            m.outgoing(),
            m.confirmation(),
            m.may_build(),
            m.placement_pending(),
            m.complete(),
            m.keepalive_in(now),
        );
        let want = (
            w.rounds_ended,
            w.outgoing(),
            w.confirmation,
            !w.end_built,
            w.placement_pending(),
            w.complete(),
            keepalive_in,
        );
        if seen != want {
            return mismatch(format!(
                "(round, outgoing, confirmation, may_build, placement_pending, complete, \
                 keepalive_in) is {seen:?}, the model says {want:?}"
            ));
        }
    }
    Ok(m.complete())
}
