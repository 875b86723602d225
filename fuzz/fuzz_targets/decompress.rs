//! Hostile compressed payloads: never a panic, never a write beyond the outputs, and success
//! only when the payload decodes to exactly the declared bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::pipeline::compress::{Codec, Decompressor};

fuzz_target!(|data: &[u8]| {
    let Some((&head, payload)) = data.split_first() else {
        return;
    };
    let codec = if head & 1 == 0 { Codec::Zstd } else { Codec::Zlib };
    // 1 to 8 pages, split into two outputs the way runs split a frame.
    let pages = usize::from(head >> 5) + 1;
    let expected = pages * 4096;
    let split = (usize::from(head >> 1 & 0xf) * 512).min(expected);
    // Guard bytes after each output catch any write past its end.
    let mut buf = vec![0xA5u8; expected + 64];
    let (first, rest) = buf.split_at_mut(split);
    let (second, guard) = rest.split_at_mut(expected - split);
    let mut d = Decompressor::new().expect("decompressor");
    let ok = d
        .decompress(codec, payload, expected, [first, second].into_iter())
        .is_ok();
    assert!(guard.iter().all(|&b| b == 0xA5), "wrote past the outputs");
    if ok {
        // A success means the payload really decodes to these bytes.
        let mut again = vec![0u8; expected];
        let mut d = Decompressor::new().expect("decompressor");
        assert!(d
            .decompress(codec, payload, expected, std::iter::once(&mut again[..]))
            .is_ok());
        assert_eq!(&again[..], &buf[..expected]);
    }
});
