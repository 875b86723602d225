//! Unit tests of the channel handshake: hellos, replies, refusals, the layout digest.
use super::*;

fn hello(index: u16) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        channel_index: index,
        channel_count: 2,
        session_id: [7; 16],
        page_bytes: 4096,
        features: 0,
        layout_digest: layout_digest([(0, 1 << 20)]),
        layout_bytes: 1 << 20,
        region_count: 1,
        nonce: [3; 16],
    }
}

fn expect() -> Expectation {
    Expectation {
        take_layout: false,
        channel_count: None,
        page_bytes: 4096,
        layout_digest: layout_digest([(0, 1 << 20)]),
        layout_bytes: 1 << 20,
        features: 0,
    }
}

#[test]
fn hello_round_trips_and_rejects_garbage() {
    let h = hello(1);
    let b = h.encode();
    assert_eq!(Hello::decode(&b), Ok(h));
    for cut in 0..HELLO_BYTES {
        assert!(Hello::decode(&b[..cut]).is_err(), "cut at {cut}");
    }
    for byte in 0..HELLO_BYTES {
        let mut g = b;
        g[byte] ^= 0x10;
        assert!(Hello::decode(&g).is_err(), "flip in byte {byte}");
    }
}

#[test]
fn reply_round_trips_every_refusal() {
    let all = [
        Refusal::Malformed,
        Refusal::VersionUnsupported { receiver: 1 },
        Refusal::SessionMismatch,
        Refusal::ChannelCountMismatch { expected: 4 },
        Refusal::ChannelOutOfRange,
        Refusal::ChannelDuplicate,
        Refusal::PageSizeMismatch { expected: 4096 },
        Refusal::LayoutMismatch { expected_mib: 64 },
        Refusal::FeatureUnsupported { accepted: 0 },
        Refusal::TlsRequired,
        Refusal::PskRequired,
        Refusal::PskUnsupported,
        Refusal::PskMismatch,
        Refusal::ChecksumsRequired,
    ];
    for r in all.into_iter().map(Some).chain([None]) {
        let reply = Reply {
            version: 2,
            refusal: r,
            idle_timeout_ms: if r.is_none() { 1234 } else { 0 },
        };
        assert_eq!(Reply::decode(&reply.encode()), Ok(reply));
    }
}

#[test]
fn acceptor_refuses_every_mismatch() {
    let mut a = Acceptor::new(expect());
    assert_eq!(a.check(&hello(0)), Ok(()));
    assert!(!a.complete());
    assert_eq!(a.check(&hello(0)), Err(Refusal::ChannelDuplicate));
    let mut other = hello(1);
    other.session_id = [8; 16];
    assert_eq!(a.check(&other), Err(Refusal::SessionMismatch));
    let mut other = hello(1);
    other.channel_count = 3;
    assert!(matches!(
        a.check(&other),
        Err(Refusal::ChannelCountMismatch { expected: 2 })
    ));
    let mut other = hello(1);
    other.version = 9;
    assert!(matches!(
        a.check(&other),
        Err(Refusal::VersionUnsupported { .. })
    ));
    let mut other = hello(1);
    other.page_bytes = 2 << 20;
    assert!(matches!(
        a.check(&other),
        Err(Refusal::PageSizeMismatch { .. })
    ));
    let mut other = hello(1);
    other.layout_digest ^= 1;
    assert!(matches!(
        a.check(&other),
        Err(Refusal::LayoutMismatch { .. })
    ));
    let mut other = hello(1);
    other.features = 1;
    assert!(matches!(
        a.check(&other),
        Err(Refusal::FeatureUnsupported { .. })
    ));
    assert_eq!(a.check(&hello(1)), Ok(()));
    assert!(a.complete());

    let mut b = Acceptor::new(expect());
    assert_eq!(b.check(&hello(2)), Err(Refusal::ChannelOutOfRange));
    let mut fixed = Acceptor::new(Expectation {
        channel_count: Some(4),
        ..expect()
    });
    assert!(matches!(
        fixed.check(&hello(0)),
        Err(Refusal::ChannelCountMismatch { expected: 4 })
    ));
}

#[test]
fn unchecked_pages_need_the_receivers_consent() {
    let unchecked = Hello {
        features: FEATURE_UNCHECKED_PAGES | FEATURE_ZSTD,
        ..hello(0)
    };
    let mut strict = Acceptor::new(Expectation {
        features: FEATURES_KNOWN & !FEATURE_UNCHECKED_PAGES,
        ..expect()
    });
    assert_eq!(strict.check(&unchecked), Err(Refusal::ChecksumsRequired));
    assert_eq!(
        strict.check(&Hello {
            features: FEATURE_ZSTD,
            ..hello(0)
        }),
        Ok(())
    );
    let mut consenting = Acceptor::new(Expectation {
        features: FEATURES_KNOWN,
        ..expect()
    });
    assert_eq!(consenting.check(&unchecked), Ok(()));
}

#[test]
fn a_receiver_without_memory_takes_one_region_from_the_first_sender() {
    let mut a = Acceptor::new(Expectation {
        take_layout: true,
        layout_bytes: 1 << 30,
        layout_digest: 0,
        ..expect()
    });
    let two = Hello {
        region_count: 2,
        layout_digest: layout_digest([(0, 4096), (1 << 20, 4096)]),
        layout_bytes: 8192,
        ..hello(0)
    };
    assert!(matches!(a.check(&two), Err(Refusal::LayoutMismatch { .. })));
    let huge = Hello {
        layout_digest: layout_digest([(0, 2 << 30)]),
        layout_bytes: 2 << 30,
        ..hello(0)
    };
    assert!(matches!(
        a.check(&huge),
        Err(Refusal::LayoutMismatch { .. })
    ));
    assert_eq!(a.check(&hello(0)), Ok(()));
    assert_eq!(a.layout_bytes(), 1 << 20);
    let other = Hello {
        layout_digest: layout_digest([(0, 2 << 20)]),
        layout_bytes: 2 << 20,
        ..hello(1)
    };
    assert!(matches!(
        a.check(&other),
        Err(Refusal::LayoutMismatch { .. })
    ));
    assert_eq!(a.check(&hello(1)), Ok(()));
}

#[test]
fn layout_digest_depends_on_every_field() {
    let base = layout_digest([(0, 4096), (1 << 32, 8192)]);
    assert_ne!(base, layout_digest([(0, 4096), (1 << 32, 4096)]));
    assert_ne!(base, layout_digest([(4096, 4096), (1 << 32, 8192)]));
    assert_ne!(base, layout_digest([(0, 4096)]));
}

#[test]
fn refusals_a_user_can_mend_say_how_in_every_interface() {
    // The library's errors reach CLI users and VMMs (Rust and C) alike.
    for (refusal, settings) in [
        (
            Refusal::TlsRequired,
            ["--tls-cert", "pw_options.tls_dir", "SenderConfig::tls"],
        ),
        (
            Refusal::PskRequired,
            ["--psk-file", "pw_options.psk_file", "SenderConfig::psk"],
        ),
        (
            Refusal::ChecksumsRequired,
            [
                "--accept-unchecked-pages",
                "pw_options.unchecked_pages",
                "ReceiverConfig::accept_unchecked_pages",
            ],
        ),
    ] {
        let message = refusal.to_string();
        for setting in settings {
            assert!(message.contains(setting), "{message:?} lacks {setting}");
        }
    }
}
