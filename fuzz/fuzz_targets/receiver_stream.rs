//! The receiving channel's state machine fed an arbitrary byte stream, as a shard feeds it:
//! never a panic, and every frame it hands out lies inside the layout with a payload of the
//! declared size, so placing it could never write out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::limits::{CHUNK_PAGES_MAX, PAGE_BYTES};
use pagewire::pipeline::compress::Codec;
use pagewire::protocol::channel::Event;
use pagewire::protocol::reader::{FrameReader, Need};
use pagewire::protocol::Frame;

const LAYOUT: [u64; 2] = [300, 17];

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::new(&LAYOUT, true);
    let mut frame = Frame::default();
    let mut bytes = data;
    for _ in 0..10_000 {
        match reader.need() {
            Need::Header(n) => {
                let Some(chunk) = bytes.get(..n) else {
                    return;
                };
                reader.header_mut().copy_from_slice(chunk);
                bytes = &bytes[n..];
                match reader.header_filled(&mut frame) {
                    Ok(Some(Event::Pages)) => check(&frame),
                    Ok(_) => {}
                    Err(_) => {
                        assert_eq!(reader.need(), Need::Nothing, "an error must be final");
                        return;
                    }
                }
            }
            Need::Payload => {
                bytes = bytes.get(frame.payload_bytes as usize..).unwrap_or(&[]);
                reader.payload_done();
            }
            Need::Barrier => reader.resume(),
            Need::Nothing => return,
        }
    }
});

fn check(frame: &Frame) {
    let region_pages = LAYOUT[frame.region as usize];
    let mut total = 0;
    for run in frame.normal_runs().iter().chain(frame.zero_runs()) {
        assert!(run.end() <= region_pages, "a run outside its region was handed out");
        total += u64::from(run.pages);
    }
    assert!(total > 0 && total as usize <= CHUNK_PAGES_MAX);
    if frame.codec == Codec::Raw {
        assert_eq!(
            u64::from(frame.payload_bytes),
            frame.normal_pages() * PAGE_BYTES as u64
        );
    }
}
