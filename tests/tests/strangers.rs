//! A receiver outlives strangers: stray connections are dropped while it keeps waiting for the
//! real sender, and idle channels between rounds stay alive on keepalives.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use pagewire::protocol::handshake::{layout_digest, Hello};
use pagewire::protocol::PROTOCOL_VERSION;
use pagewire::synth::{fill, Content};
use pagewire::tls::certs::{self, CertOptions, CertSet};
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{error_chain, PageRun, Pinning, ReceiverConfig, Sender, SenderConfig};
use pagewire_tests::{join_within, memory, skip_without_uring, start_receiver};

const LIMIT: Duration = Duration::from_secs(60);

fn tls_pair(set: &CertSet) -> (tempfile::TempDir, TlsServer, TlsClient) {
    let dir = tempfile::tempdir().unwrap();
    set.write(dir.path()).unwrap();
    let server = TlsServer::new(certs::server_files(dir.path()).load().unwrap()).unwrap();
    let client =
        TlsClient::new(certs::client_files(dir.path()).load().unwrap(), "localhost").unwrap();
    (dir, server, client)
}

#[test]
fn five_strangers_then_the_real_sender_migrates_and_verifies() {
    if skip_without_uring() {
        return;
    }
    let good = certs::generate(&CertOptions::default()).unwrap();
    let (_dir, server, client) = tls_pair(&good);
    // A client whose certificate another CA signed (it trusts the right CA).
    let other = certs::generate(&CertOptions::default()).unwrap();
    let (_dir2, _, foreign) = tls_pair(&CertSet {
        client_cert: other.client_cert.clone(),
        client_key: other.client_key.clone(),
        ..good.clone()
    });
    let len = 8 << 20;
    let src = memory(len);
    fill(&src, Content::Blend, 11);
    let dst = memory(len);
    let (addr, rx) = start_receiver(
        dst.clone(),
        ReceiverConfig {
            tls: Some(server),
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    );
    // 1. Connect and close.
    drop(TcpStream::connect(addr).unwrap());
    // 2. Garbage.
    let mut g = TcpStream::connect(addr).unwrap();
    g.write_all(&[0x42; 300]).unwrap();
    // 3. An HTTP request.
    let mut h = TcpStream::connect(addr).unwrap();
    h.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    // 4. A plaintext pagewire hello to this TLS receiver.
    let mut p = TcpStream::connect(addr).unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        channel_index: 0,
        channel_count: 1,
        session_id: [1; 16],
        page_bytes: 4096,
        features: 0,
        layout_digest: layout_digest([(0, len)]),
        layout_bytes: len,
        region_count: 1,
        nonce: [3; 16],
    };
    p.write_all(&hello.encode()).unwrap();
    // 5. A client with a certificate from another CA.
    let config = |tls| SenderConfig {
        channels: 2,
        pinning: Pinning::None,
        tls: Some(tls),
        ..SenderConfig::default()
    };
    let err = Sender::connect(addr, src.clone(), &config(foreign)).unwrap_err();
    assert!(error_chain(&err).contains("TLS"), "{}", error_chain(&err));

    // The real sender.
    let mut s = Sender::connect(addr, src.clone(), &config(client)).unwrap();
    s.send_all().unwrap();
    s.finish().unwrap();
    let stats = join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(stats.channels, 2);
    assert_eq!(src.first_difference(&dst), None);
    drop((g, h, p));
}

#[test]
fn keepalives_carry_a_channel_through_a_pause_longer_than_the_idle_bound() {
    if skip_without_uring() {
        return;
    }
    let len = 4 << 20;
    let src = memory(len);
    fill(&src, Content::Random, 3);
    let dst = memory(len);
    let (addr, rx) = start_receiver(
        dst.clone(),
        ReceiverConfig {
            idle_timeout_ms: 1000,
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    );
    let mut s = Sender::connect(
        addr,
        src.clone(),
        &SenderConfig {
            channels: 2,
            pinning: Pinning::None,
            ..SenderConfig::default()
        },
    )
    .unwrap();
    s.send_all().unwrap();
    // The VMM thinks for three idle bounds before the next round.
    std::thread::sleep(Duration::from_millis(3000));
    src.regions()[0].write(5 * 4096, b"dirty again");
    s.send_round(&[PageRun {
        region: 0,
        first_page: 5,
        pages: 1,
    }])
    .unwrap();
    s.finish().unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
}

#[test]
fn a_session_whose_sender_gave_up_is_dropped_at_once() {
    if skip_without_uring() {
        return;
    }
    use std::io::Read;
    let len = 4u64 << 20;
    let src = memory(len);
    fill(&src, Content::Random, 5);
    let dst = memory(len);
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    // Channel 0 of a two-channel session is accepted, then its sender gives up.
    let mut first = TcpStream::connect(addr).unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        channel_index: 0,
        channel_count: 2,
        session_id: [8; 16],
        page_bytes: 4096,
        features: 0,
        layout_digest: layout_digest([(0, len)]),
        layout_bytes: len,
        region_count: 1,
        nonce: [2; 16],
    };
    first.write_all(&hello.encode()).unwrap();
    let mut reply = [0u8; 16];
    first.read_exact(&mut reply).unwrap();
    drop(first);
    // The next sender is served at once, not after the receiver's 10 s gather bound.
    let started = std::time::Instant::now();
    let mut s = Sender::connect(
        addr,
        src.clone(),
        &SenderConfig {
            channels: 2,
            pinning: Pinning::None,
            ..SenderConfig::default()
        },
    )
    .unwrap();
    s.send_all().unwrap();
    s.finish().unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// A stranger that drips its hello a byte at a time, each within the socket's read timeout,
/// is cut off when the whole handshake overruns `HANDSHAKE_TIMEOUT_MS` (10 s), not after
/// minutes, and the receiver still takes the real sender afterwards.
#[test]
fn a_hello_dripped_a_byte_at_a_time_is_cut_off_at_the_handshake_bound() {
    if skip_without_uring() {
        return;
    }
    let len = 1 << 20;
    let src = memory(len);
    fill(&src, Content::Blend, 5);
    let dst = memory(len);
    let (addr, rx) = start_receiver(
        dst.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    );
    let mut drip = TcpStream::connect(addr).unwrap();
    let started = std::time::Instant::now();
    drip.write_all(b"PAGEWIRE").unwrap();
    let bound = Duration::from_millis(pagewire::limits::HANDSHAKE_TIMEOUT_MS);
    let mut cut_after = None;
    // A byte every 2 s for up to twice the bound (a hello is longer than that), and a probe
    // every 500 ms: an empty write does not reach the peer, but fails once it has reset us.
    let mut sent_at = started;
    drip.set_nonblocking(false).unwrap();
    while started.elapsed() < 2 * bound {
        std::thread::sleep(Duration::from_millis(500));
        let byte: &[u8] = if sent_at.elapsed() >= Duration::from_secs(2) {
            sent_at = std::time::Instant::now();
            &[0]
        } else {
            &[]
        };
        if drip.write_all(byte).is_err() || peer_closed(&drip) {
            cut_after = Some(started.elapsed());
            break;
        }
    }
    // (A write to a socket whose peer shut down succeeds once, then fails.)
    let cut_after = cut_after.expect("the dripping connection was never cut off");
    // Cut by the bound, not by something else earlier (a read timeout, a refused hello).
    assert!(
        cut_after >= bound - Duration::from_secs(1) && cut_after < bound + Duration::from_secs(5),
        "cut off after {cut_after:?}"
    );
    let mut s = Sender::connect(
        addr,
        src.clone(),
        &SenderConfig {
            channels: 1,
            pinning: Pinning::None,
            ..SenderConfig::default()
        },
    )
    .unwrap();
    s.send_all().unwrap();
    s.finish().unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
}

/// The receiver closed or reset `s` (a read would see the end, or an error), without waiting.
fn peer_closed(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.set_nonblocking(true).unwrap();
    let closed = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}
