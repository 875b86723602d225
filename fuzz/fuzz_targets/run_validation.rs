//! A decoded frame checked against an arbitrary layout: whatever the channel accepts lies inside
//! its region, within the frame limits, with a payload of the size its pages declare.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::limits::{CHUNK_PAGES_MAX, FRAME_FIXED_BYTES, PAGE_BYTES};
use pagewire::pipeline::compress::Codec;
use pagewire::protocol::channel::Event;
use pagewire::protocol::wire::{decode_fixed, decode_runs};
use pagewire::protocol::{Frame, ReceiverChannel};

fuzz_target!(|data: &[u8]| {
    // First byte: how many regions; then 2 bytes of page count each; the rest is a header.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 4) + 1;
    if rest.len() < 2 * n {
        return;
    }
    let pages: Vec<u64> = rest[..2 * n]
        .chunks(2)
        .map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])))
        .collect();
    let header = &rest[2 * n..];
    let Ok(fixed) = decode_fixed(header) else {
        return;
    };
    let mut frame = Frame::default();
    if decode_runs(&fixed, &header[FRAME_FIXED_BYTES..], &mut frame).is_err() {
        return;
    }
    let mut channel = ReceiverChannel::new(&pages, true);
    if channel.accept(&frame) != Ok(Event::Pages) {
        return;
    }
    let region_pages = pages[frame.region as usize];
    let mut total = 0u64;
    for run in frame.normal_runs().iter().chain(frame.zero_runs()) {
        assert!(run.pages > 0 && run.end() <= region_pages, "run outside its region");
        total += u64::from(run.pages);
    }
    assert!(total as usize <= CHUNK_PAGES_MAX);
    let raw = frame.normal_pages() * PAGE_BYTES as u64;
    match frame.codec {
        Codec::Raw => assert_eq!(u64::from(frame.payload_bytes), raw),
        _ => assert!(u64::from(frame.payload_bytes) < raw),
    }
    if frame.normal_pages() > 0 {
        assert_eq!(
            frame.checksums().map(|c| c.len() as u64),
            Some(frame.normal_pages())
        );
    }
});
