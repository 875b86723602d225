//! Plaintext is not anonymous: a pre-shared key authenticates both ends and protects every
//! byte; a receiver with neither TLS nor a key listens only on loopback.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pagewire::auth::Psk;
use pagewire::protocol::handshake::{layout_digest, Hello, Refusal, Reply};
use pagewire::protocol::{Frame, SenderChannel, PROTOCOL_VERSION};
use pagewire::synth::{fill, Content};
use pagewire::{error_chain, Error, Pinning, Receiver, ReceiverConfig, SenderConfig};
use pagewire_tests::{
    join_within, memory, send_all_to, skip_without_uring, start_receiver, tampering_proxy, Tamper,
};

const LIMIT: Duration = Duration::from_secs(60);

fn sender(channels: u16, psk: Option<Psk>) -> SenderConfig {
    SenderConfig {
        channels,
        pinning: Pinning::None,
        psk,
        ..SenderConfig::default()
    }
}

fn receiver(psk: Option<Psk>) -> ReceiverConfig {
    ReceiverConfig {
        pinning: Pinning::None,
        psk,
        ..ReceiverConfig::default()
    }
}

#[test]
fn a_pre_shared_key_transfer_round_trips_with_key_updates() {
    if skip_without_uring() {
        return;
    }
    let key = Psk::generate();
    let src = memory(16 << 20);
    fill(&src, Content::Blend, 4);
    let dst = memory(16 << 20);
    let (addr, rx) = start_receiver(dst.clone(), receiver(Some(key.clone())));
    let config = SenderConfig {
        // Rotate keys often, so the key schedule of pre-shared-key sessions runs too.
        tls_records_per_key: 50,
        ..sender(2, Some(key))
    };
    send_all_to(addr, src.clone(), &config).unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
}

/// A peer without the key that answers a pre-shared-key hello with a plain "accepted" (a man
/// in the middle asking for the pages in the clear) is refused before any page leaves.
#[test]
fn a_plain_accept_of_a_pre_shared_key_hello_is_refused() {
    if skip_without_uring() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let mut hello = [0u8; 96];
        s.read_exact(&mut hello).unwrap();
        let accept = Reply {
            version: PROTOCOL_VERSION,
            refusal: None,
            idle_timeout_ms: 30_000,
        };
        s.write_all(&accept.encode()).unwrap();
        // Whatever the sender sends next: a refused sender closes without a frame.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest.len()
    });
    let src = memory(1 << 20);
    fill(&src, Content::Random, 2);
    let err = send_all_to(addr, src, &sender(1, Some(Psk::generate()))).unwrap_err();
    assert!(
        matches!(err, Error::Auth { .. }) && error_chain(&err).contains("challenge"),
        "{}",
        error_chain(&err)
    );
    assert_eq!(
        join_within(fake, LIMIT, "fake receiver"),
        0,
        "bytes sent after the accept"
    );
}

#[test]
fn a_sender_with_another_key_is_refused_and_the_receiver_keeps_waiting() {
    if skip_without_uring() {
        return;
    }
    let (addr, rx) = start_receiver(
        memory(1 << 20),
        ReceiverConfig {
            accept_timeout_ms: Some(1500),
            ..receiver(Some(Psk::generate()))
        },
    );
    let err = send_all_to(addr, memory(1 << 20), &sender(1, Some(Psk::generate()))).unwrap_err();
    assert!(
        matches!(err, Error::Auth { .. }) && error_chain(&err).contains("key differs"),
        "{}",
        error_chain(&err)
    );
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(err, Error::NoSender { refused: 1.., .. }),
        "{}",
        error_chain(&err)
    );
}

fn plain_hello(len: u64, features: u32) -> [u8; 96] {
    Hello {
        version: PROTOCOL_VERSION,
        channel_index: 0,
        channel_count: 1,
        session_id: [5; 16],
        page_bytes: 4096,
        features,
        layout_digest: layout_digest([(0, len)]),
        layout_bytes: len,
        region_count: 1,
        nonce: [1; 16],
    }
    .encode()
}

#[test]
fn an_unauthenticated_write_into_page_0_is_refused_and_the_real_sender_still_migrates() {
    if skip_without_uring() {
        return;
    }
    let len = 16 * 4096;
    let key = Psk::generate();
    let dst = memory(len);
    let (addr, rx) = start_receiver(dst.clone(), receiver(Some(key.clone())));
    // A stranger without the key: hello, then a frame writing page 0.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(&plain_hello(len, 0)).unwrap();
    let mut f = Frame::default();
    SenderChannel::default().begin_pages(&mut f, 0);
    f.push_page(0, false).unwrap();
    f.payload_bytes = 4096;
    f.begin_checksums();
    f.push_checksum(pagewire::simd::xxh3::Xxh3::detect().hash(&[0xEE; 4096]));
    let mut header = vec![0u8; f.header_bytes()];
    f.encode(&mut header).unwrap();
    let _ = s.write_all(&header);
    let _ = s.write_all(&[0xEE; 4096]);
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        Reply::decode(&reply).unwrap().refusal,
        Some(Refusal::PskRequired)
    );
    // A stranger claiming a key it cannot prove.
    let mut s2 = TcpStream::connect(addr).unwrap();
    s2.set_read_timeout(Some(LIMIT)).unwrap();
    s2.write_all(&plain_hello(
        len,
        pagewire::protocol::handshake::FEATURE_PSK,
    ))
    .unwrap();
    let mut challenge = [0u8; pagewire::auth::CHALLENGE_BYTES];
    s2.read_exact(&mut challenge).unwrap();
    s2.write_all(b"PWPROOF!").unwrap();
    s2.write_all(&[0u8; 32]).unwrap();
    s2.read_exact(&mut reply).unwrap();
    assert_eq!(
        Reply::decode(&reply).unwrap().refusal,
        Some(Refusal::PskMismatch)
    );
    let scanner = pagewire::pipeline::zero::ZeroScanner::detect();
    assert!(
        dst.regions()[0].page_is_zero(&scanner, 0),
        "a stranger wrote page 0"
    );
    // The real sender is not harmed.
    let src = memory(len);
    fill(&src, Content::Random, 2);
    send_all_to(addr, src.clone(), &sender(1, Some(key))).unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
}

#[test]
fn a_flipped_bit_under_a_pre_shared_key_is_refused_on_both_sides() {
    if skip_without_uring() {
        return;
    }
    let key = Psk::generate();
    let src = memory(1 << 20);
    fill(&src, Content::Random, 6);
    let dst = memory(1 << 20);
    let (addr, rx) = start_receiver(dst, receiver(Some(key.clone())));
    // Hello 96, proof 40, then records: flip a byte well inside the first frame's records.
    let proxy = tampering_proxy(addr, Tamper::Flip(96 + 40 + 200 + 9000));
    let sent = send_all_to(proxy, src, &sender(1, Some(key))).unwrap_err();
    let received = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        error_chain(&received).contains("failed authentication"),
        "{}",
        error_chain(&received)
    );
    assert!(
        error_chain(&sent).contains("failed authentication"),
        "{}",
        error_chain(&sent)
    );
}

#[test]
fn without_tls_or_a_key_a_receiver_listens_only_on_loopback() {
    let open = |config: ReceiverConfig| Receiver::bind("0.0.0.0:0", memory(1 << 20), config);
    let err = open(ReceiverConfig::default()).unwrap_err();
    assert!(
        error_chain(&err).contains("refusing to listen"),
        "{}",
        error_chain(&err)
    );
    open(ReceiverConfig {
        insecure: true,
        ..ReceiverConfig::default()
    })
    .unwrap();
    open(receiver(Some(Psk::generate()))).unwrap();
    Receiver::bind("127.0.0.1:0", memory(1 << 20), ReceiverConfig::default()).unwrap();
}
