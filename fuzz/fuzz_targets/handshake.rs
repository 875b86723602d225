//! Hellos and replies from arbitrary bytes, and an acceptor fed a sequence of hellos: never a
//! panic, never more channels accepted than the session has, never a channel twice, never a
//! feature the receiver did not offer (pages without checksums included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire::limits::HELLO_BYTES;
use pagewire::protocol::handshake::{
    Acceptor, Expectation, Hello, Reply, FEATURES_KNOWN, FEATURE_UNCHECKED_PAGES,
};

fuzz_target!(|data: &[u8]| {
    let _ = Reply::decode(data);
    // A receiver that accepts pages without checksums, or one that does not.
    let features = if data.get(1).is_some_and(|b| b & 1 == 1) {
        FEATURES_KNOWN
    } else {
        FEATURES_KNOWN & !FEATURE_UNCHECKED_PAGES
    };
    let mut acceptor = Acceptor::new(Expectation {
        channel_count: None,
        page_bytes: 4096,
        layout_digest: 0x1234,
        layout_bytes: 1 << 20,
        features,
        take_layout: data.first().is_some_and(|b| b & 1 == 1),
    });
    let mut accepted = std::collections::HashSet::new();
    for chunk in data.chunks(HELLO_BYTES) {
        let Ok(hello) = Hello::decode(chunk) else {
            continue;
        };
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        if acceptor.check(&hello).is_ok() {
            assert_eq!(hello.features & !features, 0, "a feature not offered was accepted");
            assert!(accepted.insert(hello.channel_index), "a channel accepted twice");
            let count = acceptor.channel_count().expect("a session after an accept");
            assert!(hello.channel_index < count && accepted.len() <= usize::from(count));
        }
    }
});
