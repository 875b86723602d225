//! Page checksums off (`SenderConfig::page_checksums`): plaintext pages covered by TCP's
//! checksum only, and only where the receiver consented.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use pagewire::pipeline::compress::Compression;
use pagewire::synth::{fill, Content};
use pagewire::{error_chain, Error, Pinning, ReceiverConfig, SenderConfig};
use pagewire_tests::{
    join_within, memory, send_all_to, skip_without_uring, start_receiver, tampering_proxy, Tamper,
};

const LIMIT: Duration = Duration::from_secs(60);

fn unchecked(channels: u16) -> SenderConfig {
    SenderConfig {
        channels,
        pinning: Pinning::None,
        page_checksums: false,
        ..SenderConfig::default()
    }
}

fn consenting() -> ReceiverConfig {
    ReceiverConfig {
        pinning: Pinning::None,
        accept_unchecked_pages: true,
        ..ReceiverConfig::default()
    }
}

#[test]
fn unchecked_pages_arrive_whole_where_the_receiver_consents_and_are_reported() {
    if skip_without_uring() {
        return;
    }
    for compression in [Compression::None, Compression::Zstd] {
        let src = memory(16 << 20);
        fill(&src, Content::Blend, 11);
        let dst = memory(16 << 20);
        let (addr, rx) = start_receiver(dst.clone(), consenting());
        let config = SenderConfig {
            compression,
            ..unchecked(2)
        };
        let sent = send_all_to(addr, src.clone(), &config).unwrap();
        let received = join_within(rx, LIMIT, "receiver").unwrap();
        assert_eq!(src.first_difference(&dst), None, "{compression}");
        assert!(sent.unchecked_pages && received.unchecked_pages);
        assert!(received.normal_pages > 0);
    }
    // The default, against the same consenting receiver: checksums go and are checked.
    let src = memory(4 << 20);
    fill(&src, Content::Random, 12);
    let dst = memory(4 << 20);
    let (addr, rx) = start_receiver(dst.clone(), consenting());
    let sent = send_all_to(
        addr,
        src.clone(),
        &SenderConfig {
            page_checksums: true,
            ..unchecked(1)
        },
    )
    .unwrap();
    let received = join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
    assert!(!sent.unchecked_pages && !received.unchecked_pages);
}

#[test]
fn a_receiver_refuses_unchecked_pages_unless_told_and_keeps_waiting() {
    if skip_without_uring() {
        return;
    }
    let (addr, rx) = start_receiver(
        memory(1 << 20),
        ReceiverConfig {
            accept_timeout_ms: Some(1500),
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    );
    let err = send_all_to(addr, memory(1 << 20), &unchecked(1)).unwrap_err();
    assert!(
        matches!(err, Error::Refused { .. })
            && error_chain(&err).contains("--accept-unchecked-pages"),
        "{}",
        error_chain(&err)
    );
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(err, Error::NoSender { refused: 1.., .. })
            && error_chain(&err).contains("without checksums"),
        "{}",
        error_chain(&err)
    );
}

#[test]
fn without_checksums_a_flipped_payload_bit_goes_unnoticed_and_the_report_says_so() {
    if skip_without_uring() {
        return;
    }
    // The trade-off the option makes, shown: the same flip that fails both sides with
    // checksums (failures.rs) lands in the destination when they are off.
    let len = 16 * 4096;
    let src = memory(len);
    fill(&src, Content::Random, 8);
    let dst = memory(len);
    let (addr, rx) = start_receiver(dst.clone(), consenting());
    // The first frame: the hello, a header of 32 bytes and one run of 12 (no checksums),
    // then the payload; flip a bit in page 3.
    let header = 32 + 12;
    let proxy = tampering_proxy(
        addr,
        Tamper::Flip(pagewire::limits::HELLO_BYTES + header + 3 * 4096 + 100),
    );
    let sent = send_all_to(proxy, src.clone(), &unchecked(1)).unwrap();
    let received = join_within(rx, LIMIT, "receiver").unwrap();
    assert!(sent.unchecked_pages && received.unchecked_pages);
    assert_eq!(src.first_difference(&dst), Some((0, 3)));
}
