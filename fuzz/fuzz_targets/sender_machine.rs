//! The sending channel's state machine driven by arbitrary steps (a shard's calls in a valid
//! order, the time, and anything a receiver can say in any order), against the reference model
//! of its docs: never a panic, and after every step the machine says what the model says.
//! The model and its runner are the engine's own (included by path), as in the proptest.
#![no_main]

use libfuzzer_sys::fuzz_target;
#[allow(unused_imports)]
use pagewire::protocol::control::{AbortCode, Control};
#[allow(unused_imports)]
use pagewire::protocol::sender::*;
#[allow(unused_imports)]
use pagewire::protocol::Frame;

#[path = "../../engine/src/protocol/sender/model.rs"]
mod model;

use model::Step;

/// One step from one or two bytes: the low 4 bits choose the step (15 with bit 4 set: a
/// well-behaved receiver's answer), the next byte its value.
fn steps(data: &[u8]) -> Vec<Step> {
    let mut out = Vec::new();
    let mut bytes = data.iter().copied();
    while let Some(b) = bytes.next() {
        let mut arg = || bytes.next().unwrap_or(0);
        out.push(match b & 0x0f {
            0 => Step::Pages,
            1 => Step::EndRound,
            2 => Step::EndStream,
            3 => Step::Keepalive,
            4 => Step::DeviceState,
            5 | 6 => Step::Hand,
            7 => Step::Wait(u16::from(arg()) * 8),
            8 => Step::Progressed,
            9 => Step::CheckIdle {
                pages_moved: b & 0x10 != 0,
            },
            10 => Step::Done,
            11 => Step::Placed(arg() % 3),
            12 => Step::PeerAbort,
            13 => Step::CloseNotify,
            14 => Step::KeyUpdate(b & 0x10 != 0),
            // A well-behaved receiver's answer carries runs to the end, as in the proptest.
            _ if b & 0x10 != 0 => Step::Answer,
            _ => Step::TakeKeyUpdate,
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let tls = first & 1 != 0;
    if let Err(e) = model::run(tls, 1000, 250, &steps(rest)) {
        panic!("{e}");
    }
});
