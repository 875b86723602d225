//! Hostile compressed payloads: never a panic, never a write beyond the output, and success
//! only when the payload decodes to exactly the declared bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::pipeline::compress::{Codec, Decompressor};

fuzz_target!(|data: &[u8]| {
    let Some((&head, payload)) = data.split_first() else {
        return;
    };
    let codec = if head & 1 == 0 { Codec::Zstd } else { Codec::Zlib };
    // 1 to 8 pages, and a few bytes off a page for the odd sizes.
    let pages = usize::from(head >> 5) + 1;
    let expected = pages * 4096 - usize::from(head >> 1 & 0xf) * 8;
    // Guard bytes after the output catch any write past its end.
    let mut buf = vec![0xA5u8; expected + 64];
    let (out, guard) = buf.split_at_mut(expected);
    let mut d = Decompressor::new().expect("decompressor");
    let ok = d.decompress(codec, payload, out).is_ok();
    assert!(guard.iter().all(|&b| b == 0xA5), "wrote past the output");
    if ok {
        // A success means the payload really decodes to these bytes, on a reused context too.
        let mut again = vec![0u8; expected];
        assert!(d.decompress(codec, payload, &mut again).is_ok());
        assert_eq!(&again[..], &buf[..expected]);
    }
});
