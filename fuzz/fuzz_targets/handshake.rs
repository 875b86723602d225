//! Hellos and replies from arbitrary bytes, and an acceptor fed a sequence of hellos: never a
//! panic, never more channels accepted than the session has, never a channel twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::limits::HELLO_BYTES;
use pagewire::protocol::handshake::{Acceptor, Expectation, Hello, Reply};

fuzz_target!(|data: &[u8]| {
    let _ = Reply::decode(data);
    let mut acceptor = Acceptor::new(Expectation {
        channel_count: None,
        page_bytes: 4096,
        layout_digest: 0x1234,
        layout_bytes: 1 << 20,
        features: 3,
        take_layout: data.first().is_some_and(|b| b & 1 == 1),
    });
    let mut accepted = std::collections::HashSet::new();
    for chunk in data.chunks(HELLO_BYTES) {
        let Ok(hello) = Hello::decode(chunk) else {
            continue;
        };
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        if acceptor.check(&hello).is_ok() {
            assert!(accepted.insert(hello.channel_index), "a channel accepted twice");
            let count = acceptor.channel_count().expect("a session after an accept");
            assert!(hello.channel_index < count && accepted.len() <= usize::from(count));
        }
    }
});
