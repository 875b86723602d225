//! Frame header decoding: arbitrary bytes never panic, and whatever decodes re-encodes to the
//! same bytes (so the decoder accepts nothing the encoder could not have written).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::limits::{FRAME_FIXED_BYTES, FRAME_HEADER_BYTES_MAX};
use pagewire::protocol::wire::{decode_fixed, decode_runs};
use pagewire::protocol::Frame;

fuzz_target!(|data: &[u8]| {
    let Ok(fixed) = decode_fixed(data) else {
        return;
    };
    let rest = &data[FRAME_FIXED_BYTES..];
    let mut frame = Frame::default();
    if decode_runs(&fixed, rest, &mut frame).is_err() {
        return;
    }
    let mut out = [0u8; FRAME_HEADER_BYTES_MAX];
    let n = frame.encode(&mut out).expect("a decoded header fits the largest header");
    assert_eq!(&out[..n], &data[..n], "decode then encode changed the header");
});
