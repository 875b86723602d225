//! The sending channel's machine: unit tests, and a proptest against the reference model.

use super::*;
use crate::protocol::FrameKind;

const IDLE: Duration = Duration::from_secs(4);
const KEEPALIVE: Duration = Duration::from_secs(1);

fn machine(tls: bool, now: Instant) -> SenderMachine {
    SenderMachine::new(tls, IDLE, KEEPALIVE, now)
}

#[test]
fn a_plaintext_channel_completes_after_its_end_is_sent_and_confirmed() {
    let t = Instant::now();
    let mut m = machine(false, t);
    let mut f = Frame::default();
    m.begin_pages(&mut f, 0, false, t);
    assert_eq!((f.kind, f.frame_number, f.round), (FrameKind::Pages, 0, 0));
    assert!(!m.placement_pending(), "no round has ended");
    let marker = m.end_round(&mut f, t);
    assert_eq!(marker, Marker::EndOfRound(0));
    assert_eq!(m.round(), 1);
    assert!(
        m.placement_pending(),
        "round 0 ended, not yet reported placed"
    );
    assert_eq!(m.handed(Marker::None), None);
    assert_eq!(m.handed(marker), Some(SenderEvent::RoundSent { round: 0 }));
    // The receiver reports round 0 placed, once, and nothing it has not been sent.
    assert_eq!(
        m.on_control(Control::RoundPlaced { round: 0 }),
        Ok(Some(SenderEvent::RoundPlaced { round: 0 }))
    );
    assert!(!m.placement_pending());
    assert!(m.on_control(Control::RoundPlaced { round: 0 }).is_err());
    let mut early = machine(false, t);
    assert!(early.on_control(Control::RoundPlaced { round: 0 }).is_err());
    let end = m.end_stream(&mut f, t);
    assert_eq!(
        (f.kind, f.frame_number, f.round),
        (FrameKind::EndOfStream, 2, 1)
    );
    assert!(!m.may_build() && !m.complete());
    // Done may overtake the report that the kernel took the end (one batch of completions).
    m.on_control(Control::Done).unwrap();
    assert!(!m.complete());
    m.handed(end);
    assert!(m.complete());
    assert_eq!(
        m.on_control(Control::Done),
        Err(SenderFault::Protocol(ProtocolError::UnexpectedDone))
    );
}

#[test]
fn tls_needs_close_notify_after_done() {
    let t = Instant::now();
    let mut m = machine(true, t);
    let mut f = Frame::default();
    let end = m.end_stream(&mut f, t);
    m.handed(end);
    assert!(matches!(
        m.on_close_notify(),
        Err(SenderFault::PeerClosed { .. })
    ));
    m.on_control(Control::Done).unwrap();
    assert!(!m.complete());
    m.on_close_notify().unwrap();
    assert!(m.complete());
}

#[test]
fn the_peer_cannot_confirm_early_and_its_abort_is_reported() {
    let t = Instant::now();
    let mut m = machine(false, t);
    assert_eq!(
        m.on_control(Control::Done),
        Err(SenderFault::Protocol(ProtocolError::UnexpectedDone))
    );
    let abort = Control::Abort {
        code: AbortCode::Io,
        reason: "disk".into(),
    };
    assert_eq!(
        m.on_control(abort),
        Err(SenderFault::PeerAborted {
            code: AbortCode::Io,
            reason: "disk".into()
        })
    );
    assert!(matches!(
        m.on_peer_closed(),
        SenderFault::PeerClosed {
            when: "while data was still being sent"
        }
    ));
}

#[test]
fn keepalives_fall_due_and_idleness_fails_naming_what_it_waited_for() {
    let t = Instant::now();
    let mut m = machine(false, t);
    assert_eq!(m.keepalive_in(t), KEEPALIVE);
    assert_eq!(m.keepalive_in(t + KEEPALIVE * 2), Duration::ZERO);
    let mut f = Frame::default();
    m.keepalive(&mut f, t + KEEPALIVE);
    assert_eq!(m.keepalive_in(t + KEEPALIVE), KEEPALIVE);
    m.check_idle(t + IDLE / 2, 0).unwrap();
    // Pages moving on any channel count as progress.
    m.check_idle(t + IDLE, 7).unwrap();
    assert!(matches!(
        m.check_idle(t + IDLE * 2, 7),
        Err(SenderFault::Idle {
            waiting: Waiting::Data,
            ..
        })
    ));
    // A round ended and sent, its RoundPlaced not come: that is what the channel waits for,
    // within the idle bound of the round's end, whatever keepalives made progress since.
    let marker = m.end_round(&mut f, t + IDLE * 2);
    m.handed(marker);
    m.progressed(t + IDLE * 3);
    m.check_idle(t + IDLE * 2 + IDLE / 2, 7).unwrap();
    assert!(matches!(
        m.check_idle(t + IDLE * 3, 7),
        Err(SenderFault::Idle {
            waiting: Waiting::Placement,
            ..
        })
    ));
    // Pages moving on another channel (this one waits at the receiver's barrier) hold it
    // off, as for data.
    m.check_idle(t + IDLE * 3, 8).unwrap();
    m.on_control(Control::RoundPlaced { round: 0 }).unwrap();
    m.check_idle(t + IDLE * 3 + IDLE / 2, 8).unwrap();
    let end = m.end_stream(&mut f, t);
    m.handed(end);
    assert!(matches!(
        m.check_idle(t + IDLE * 5, 8),
        Err(SenderFault::Idle {
            waiting: Waiting::Confirmation,
            ..
        })
    ));
}

#[test]
fn a_restored_copy_gives_a_failed_frame_its_number_back() {
    let t = Instant::now();
    let mut m = machine(false, t);
    let mut f = Frame::default();
    let saved = m;
    m.end_stream(&mut f, t);
    m = saved;
    assert!(m.may_build());
    m.abort(&mut f, 4, t);
    assert_eq!((f.kind, f.frame_number), (FrameKind::Abort, 0));
}

#[test]
fn key_updates_are_answered_once() {
    let t = Instant::now();
    let mut m = machine(true, t);
    m.on_key_update(false);
    assert!(!m.take_key_update());
    m.on_key_update(true);
    assert!(m.take_key_update());
    assert!(!m.take_key_update());
}

fn step() -> impl proptest::strategy::Strategy<Value = super::model::Step> {
    use super::model::Step;
    use proptest::prelude::*;
    // Weighted so that a run lasts: a receiver's fault ends it, so faults are rare.
    prop_oneof![
        12 => Just(Step::Pages),
        8 => Just(Step::EndRound),
        2 => Just(Step::EndStream),
        6 => Just(Step::Keepalive),
        2 => Just(Step::DeviceState),
        16 => Just(Step::Hand),
        12 => (0u16..700).prop_map(Step::Wait),
        6 => Just(Step::Progressed),
        8 => any::<bool>().prop_map(|pages_moved| Step::CheckIdle { pages_moved }),
        1 => Just(Step::Done),
        2 => Just(Step::Placed(1)),
        1 => (0u8..3).prop_map(Step::Placed),
        1 => Just(Step::PeerAbort),
        1 => Just(Step::CloseNotify),
        2 => any::<bool>().prop_map(Step::KeyUpdate),
        2 => Just(Step::TakeKeyUpdate),
        8 => Just(Step::Answer),
    ]
}

/// The same calls and time, with a receiver that only ever says the right thing next: runs
/// that get to the end of a channel's life (every round placed, `Done`, close_notify), which
/// random messages almost never let a run reach.
fn well_behaved_step() -> impl proptest::strategy::Strategy<Value = super::model::Step> {
    use super::model::Step;
    use proptest::prelude::*;
    prop_oneof![
        12 => Just(Step::Pages),
        8 => Just(Step::EndRound),
        3 => Just(Step::EndStream),
        6 => Just(Step::Keepalive),
        2 => Just(Step::DeviceState),
        16 => Just(Step::Hand),
        6 => (0u16..700).prop_map(Step::Wait),
        6 => Just(Step::Progressed),
        8 => any::<bool>().prop_map(|pages_moved| Step::CheckIdle { pages_moved }),
        2 => any::<bool>().prop_map(Step::KeyUpdate),
        2 => Just(Step::TakeKeyUpdate),
        12 => Just(Step::Answer),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(2000))]

    /// Any interleaving of a shard's calls, the time and a receiver's messages: the machine
    /// does what the model of its docs says after every step (rounds placed in order and only
    /// once ended, `Done` only after the end is built, a placement report owed within the idle
    /// bound of the round's end or of pages last moving, keepalives due on time, completion).
    #[test]
    fn the_machine_follows_its_model_whatever_the_receiver_says(
        tls in proptest::prelude::any::<bool>(),
        steps in proptest::collection::vec(step(), 0..120),
    ) {
        if let Err(e) = super::model::run(tls, 1000, 250, &steps) {
            proptest::prop_assert!(false, "{}", e);
        }
    }

    /// The same with a well-behaved receiver, whose runs reach the channel's end.
    #[test]
    fn the_machine_follows_its_model_to_the_end_with_a_well_behaved_receiver(
        tls in proptest::prelude::any::<bool>(),
        steps in proptest::collection::vec(well_behaved_step(), 0..120),
    ) {
        if let Err(e) = super::model::run(tls, 1000, 250, &steps) {
            proptest::prop_assert!(false, "{}", e);
        }
    }
}

/// The well-behaved generator reaches the end of a channel's life: over a fixed sample of its
/// runs, enough end complete (rounds placed, `Done`, and under TLS the close_notify) for the
/// property to cover them.
#[test]
fn the_model_s_runs_reach_completion() {
    use proptest::strategy::{Strategy, ValueTree};
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let runs = (
        proptest::prelude::any::<bool>(),
        proptest::collection::vec(well_behaved_step(), 0..120),
    );
    let (mut complete, mut complete_tls) = (0, 0);
    const SAMPLE: usize = 2000;
    for _ in 0..SAMPLE {
        let (tls, steps) = runs.new_tree(&mut runner).unwrap().current();
        if super::model::run(tls, 1000, 250, &steps).unwrap() {
            complete += 1;
            complete_tls += usize::from(tls);
        }
    }
    eprintln!("{complete} of {SAMPLE} runs complete, {complete_tls} of them under TLS");
    assert!(
        complete >= SAMPLE / 4,
        "{complete} of {SAMPLE} runs complete"
    );
    assert!(
        complete_tls >= SAMPLE / 10,
        "{complete_tls} complete under TLS"
    );
}
