//! Everything that must fail, failing clearly on both sides and in bounded time: handshake
//! mismatches, peers that are not pagewire, peers that vanish mid-frame, garbled frames.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use pagewire::protocol::control::Control;
use pagewire::protocol::handshake::{layout_digest, Hello, Refusal, Reply};
use pagewire::protocol::{Frame, FrameKind, SenderChannel, PROTOCOL_VERSION};
use pagewire::synth::{fill, Content};
use pagewire::{error_chain, Error, Pinning, ReceiverConfig, Sender, SenderConfig};
use pagewire_tests::{join_within, memory, skip_without_uring, start_receiver};

const LIMIT: Duration = Duration::from_secs(30);

fn sender_config(channels: u16) -> SenderConfig {
    SenderConfig {
        channels,
        pinning: Pinning::None,
        ..SenderConfig::default()
    }
}

fn hello_for(len: u64, index: u16, count: u16, session: u8) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        channel_index: index,
        channel_count: count,
        session_id: [session; 16],
        page_bytes: 4096,
        features: 0,
        layout_digest: layout_digest([(0, len)]),
        layout_bytes: len,
        region_count: 1,
        nonce: [3; 16],
    }
}

/// Opens a connection and sends `hello`; returns the stream and the receiver's reply.
fn raw_hello(addr: std::net::SocketAddr, hello: &Hello) -> (TcpStream, Reply) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(&hello.encode()).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    (s, Reply::decode(&reply).unwrap())
}

fn assert_refused(e: &Error, want: fn(&Refusal) -> bool, text: &str) {
    match e {
        Error::Refused { refusal, .. } if want(refusal) => {}
        other => panic!(
            "expected a refusal about {text}, got: {}",
            error_chain(other)
        ),
    }
    assert!(
        e.to_string().contains(text),
        "message {:?} lacks {text:?}",
        e.to_string()
    );
}

#[test]
fn layout_mismatch_is_refused_on_both_sides() {
    if skip_without_uring() {
        return;
    }
    let (addr, rx) = start_receiver(memory(8 << 20), short_wait());
    let err = Sender::connect(addr, memory(4 << 20), &sender_config(2)).unwrap_err();
    assert_refused(
        &err,
        |r| matches!(r, Refusal::LayoutMismatch { .. }),
        "layout",
    );
    // The receiver drops the refused connections and keeps listening; at its deadline it names
    // the last refusal.
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert_no_sender(&err, "layout");
}

/// A receiver that gives up on senders after 1.5 s.
fn short_wait() -> ReceiverConfig {
    ReceiverConfig {
        accept_timeout_ms: Some(1500),
        ..ReceiverConfig::default()
    }
}

/// The receiver's deadline error, naming the last refusal.
fn assert_no_sender(e: &Error, text: &str) {
    assert!(
        matches!(e, Error::NoSender { refused, .. } if *refused > 0)
            && error_chain(e).contains(text),
        "expected the receiver to time out naming {text:?}, got: {}",
        error_chain(e)
    );
}

#[test]
fn channel_count_mismatch_is_refused_on_both_sides() {
    if skip_without_uring() {
        return;
    }
    let config = ReceiverConfig {
        channels: Some(4),
        ..short_wait()
    };
    let (addr, rx) = start_receiver(memory(1 << 20), config);
    let err = Sender::connect(addr, memory(1 << 20), &sender_config(2)).unwrap_err();
    assert_refused(
        &err,
        |r| matches!(r, Refusal::ChannelCountMismatch { expected: 4 }),
        "channel count",
    );
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert_no_sender(&err, "channel count");
}

/// Encodes `frames` (each made by `make` on one channel's sequence) back to back.
fn frames(make: impl FnOnce(&mut SenderChannel, &mut Frame, &mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chan = SenderChannel::default();
    let mut frame = Frame::default();
    make(&mut chan, &mut frame, &mut out);
    out
}

fn push_encoded(frame: &Frame, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + frame.header_bytes(), 0);
    frame.encode(&mut out[at..]).unwrap();
}

#[test]
fn a_second_sender_is_refused_without_harming_the_first() {
    if skip_without_uring() {
        return;
    }
    let len = 16 * 4096;
    let dst = memory(len);
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    // Session 7, channel 0 of 2: accepted.
    let (mut first, reply) = raw_hello(addr, &hello_for(len, 0, 2, 7));
    assert_eq!(reply.refusal, None);
    assert!(
        reply.idle_timeout_ms > 0,
        "the reply carries the idle bound"
    );
    // Meanwhile other senders and broken hellos: each refused with its reason.
    type Case = (Hello, fn(&Refusal) -> bool);
    let cases: [Case; 4] = [
        (hello_for(len, 1, 2, 9), |r| {
            matches!(r, Refusal::SessionMismatch)
        }),
        (hello_for(len, 0, 2, 7), |r| {
            matches!(r, Refusal::ChannelDuplicate)
        }),
        (hello_for(len, 2, 2, 7), |r| {
            matches!(r, Refusal::ChannelOutOfRange)
        }),
        (
            Hello {
                version: PROTOCOL_VERSION + 1,
                ..hello_for(len, 1, 2, 7)
            },
            |r| matches!(r, Refusal::VersionUnsupported { receiver } if *receiver == PROTOCOL_VERSION),
        ),
    ];
    for (hello, want) in cases {
        let (_s, reply) = raw_hello(addr, &hello);
        let refusal = reply.refusal.expect("refused");
        assert!(want(&refusal), "got {refusal:?}");
    }
    // The first session goes on: channel 1 joins, every page arrives, both channels end.
    let (mut second, reply) = raw_hello(addr, &hello_for(len, 1, 2, 7));
    assert_eq!(reply.refusal, None);
    let stream0 = frames(|chan, f, out| {
        chan.begin_pages(f, 0);
        for p in 0..16 {
            f.push_page(p, p % 2 == 1).unwrap();
        }
        f.payload_bytes = 8 * 4096;
        let payload = vec![0x5a; 8 * 4096];
        f.begin_checksums();
        for page in payload.chunks(4096) {
            f.push_checksum(xxh3(page));
        }
        push_encoded(f, out);
        out.extend(payload);
        chan.end_stream(f);
        push_encoded(f, out);
    });
    let stream1 = frames(|chan, f, out| {
        chan.end_stream(f);
        push_encoded(f, out);
    });
    first.write_all(&stream0).unwrap();
    second.write_all(&stream1).unwrap();
    for s in [&mut first, &mut second] {
        let mut done = [0u8; 16];
        s.read_exact(&mut done).unwrap();
        assert_eq!(Control::decode(&done), Ok(Some((Control::Done, 16))));
    }
    let stats = join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(stats.normal_pages, 8);
    let mut page = [0u8; 4096];
    dst.regions()[0].read(2 * 4096, &mut page);
    assert!(page.iter().all(|&b| b == 0x5a));
}

#[test]
fn a_peer_that_is_not_pagewire_fails_clearly_either_way() {
    if skip_without_uring() {
        return;
    }
    // Not-pagewire client meets a receiver: dropped, and named at the receiver's deadline.
    let (addr, rx) = start_receiver(memory(1 << 20), short_wait());
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert_no_sender(&err, "not speaking pagewire");

    // Sender meets a server that is not pagewire.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = c.read(&mut buf);
        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let err = Sender::connect(addr, memory(1 << 20), &sender_config(1)).unwrap_err();
    assert!(
        matches!(err, Error::Protocol { .. })
            && error_chain(&err).contains("not speaking pagewire"),
        "{}",
        error_chain(&err)
    );
    join_within(server, LIMIT, "fake server");
}

#[test]
fn connection_refused_is_a_clear_error() {
    if skip_without_uring() {
        return;
    }
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = Sender::connect(addr, memory(1 << 20), &sender_config(1)).unwrap_err();
    let text = error_chain(&err);
    assert!(
        text.contains("connecting channel 0") && text.contains("refused"),
        "{text}"
    );
}

/// A fake sender: handshake for one channel of a 16-page layout, then raw bytes.
fn fake_sender(addr: std::net::SocketAddr) -> TcpStream {
    let (s, reply) = raw_hello(addr, &hello_for(16 * 4096, 0, 1, 3));
    assert_eq!(reply.refusal, None);
    s
}

fn pages_frame(pages: &[u64], payload: u32) -> Vec<u8> {
    let mut frame = Frame::default();
    let mut chan = SenderChannel::default();
    chan.begin_pages(&mut frame, 0);
    for &p in pages {
        frame.push_page(p, false).unwrap();
    }
    frame.payload_bytes = payload;
    // A plaintext frame must carry checksums; these frames fail before they are checked.
    frame.begin_checksums();
    for _ in pages {
        frame.push_checksum(0);
    }
    let mut buf = vec![0u8; frame.header_bytes()];
    frame.encode(&mut buf).unwrap();
    buf
}

/// The payload checksum of one page (XXH3-64).
fn xxh3(page: &[u8]) -> u64 {
    pagewire::simd::xxh3::Xxh3::detect().hash(page)
}

#[test]
fn a_sender_vanishing_mid_frame_or_before_the_end_is_an_error_not_a_hang() {
    if skip_without_uring() {
        return;
    }
    // Cut inside the payload.
    let (addr, rx) = start_receiver(memory(16 * 4096), ReceiverConfig::default());
    let mut s = fake_sender(addr);
    s.write_all(&pages_frame(&[0, 1, 2, 3], 4 * 4096)).unwrap();
    s.write_all(&[0xab; 2 * 4096]).unwrap();
    drop(s);
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(err, Error::PeerClosed { when, .. } if when.contains("middle of a frame")),
        "{}",
        error_chain(&err)
    );

    // Cut inside a header.
    let (addr, rx) = start_receiver(memory(16 * 4096), ReceiverConfig::default());
    let mut s = fake_sender(addr);
    s.write_all(&pages_frame(&[0], 4096)[..20]).unwrap();
    drop(s);
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(err, Error::PeerClosed { .. }),
        "{}",
        error_chain(&err)
    );

    // Clean close at a frame boundary, but without the end-of-stream marker.
    let (addr, rx) = start_receiver(memory(16 * 4096), ReceiverConfig::default());
    drop(fake_sender(addr));
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(err, Error::PeerClosed { when, .. } if when.contains("before the end")),
        "{}",
        error_chain(&err)
    );
}

#[test]
fn a_garbled_frame_is_refused_before_any_page_is_written_and_the_sender_is_told() {
    if skip_without_uring() {
        return;
    }
    let dst = memory(16 * 4096);
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    let mut s = fake_sender(addr);
    let mut frame = pages_frame(&[5], 4096);
    frame[8] ^= 0x40; // frame number: the checksum no longer matches
    s.write_all(&frame).unwrap();
    s.write_all(&[0xcd; 4096]).unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(err, Error::Protocol { .. }) && error_chain(&err).contains("checksum"),
        "{}",
        error_chain(&err)
    );
    let scanner = pagewire::pipeline::zero::ZeroScanner::detect();
    assert!(
        dst.regions()[0].page_is_zero(&scanner, 5),
        "a refused frame wrote its page"
    );
    // The receiver told the sender why.
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = Vec::new();
    let read = s.read_to_end(&mut buf);
    eprintln!("read: {read:?}");
    match Control::decode(&buf) {
        Ok(Some((Control::Abort { reason, .. }, _))) => {
            assert!(reason.contains("checksum"), "{reason}")
        }
        other => panic!("expected an abort message, got {other:?} from {buf:?}"),
    }

    // A frame pointing outside the layout: refused, nothing written anywhere.
    let dst = memory(16 * 4096);
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    let mut s = fake_sender(addr);
    s.write_all(&pages_frame(&[15, 16], 2 * 4096)).unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        error_chain(&err).contains("outside region"),
        "{}",
        error_chain(&err)
    );
    drop(s);
}

/// A fake receiver: accepts one channel, answers the hello, then runs `then`.
fn fake_receiver(then: fn(TcpStream)) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let join = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut hello = [0u8; 64];
        c.read_exact(&mut hello).unwrap();
        c.write_all(
            &Reply {
                version: PROTOCOL_VERSION,
                refusal: None,
                idle_timeout_ms: 30_000,
            }
            .encode(),
        )
        .unwrap();
        then(c);
    });
    (addr, join)
}

#[test]
fn a_receiver_vanishing_or_aborting_mid_transfer_fails_the_sender() {
    if skip_without_uring() {
        return;
    }
    let src = memory(64 << 20);
    fill(&src, Content::Random, 5);
    // Vanishes after 1 MiB.
    let (addr, server) = fake_receiver(|mut c| {
        let mut buf = vec![0u8; 1 << 20];
        let _ = c.read_exact(&mut buf);
    });
    let sender = std::thread::spawn({
        let src = src.clone();
        move || {
            let mut s = Sender::connect(addr, src, &sender_config(1))?;
            s.send_all()?;
            s.finish()
        }
    });
    let err = join_within(sender, LIMIT, "sender").unwrap_err();
    let text = error_chain(&err);
    assert!(
        matches!(err, Error::Io { .. } | Error::PeerClosed { .. }),
        "unexpected error: {text}"
    );
    join_within(server, LIMIT, "fake receiver");

    // Aborts with a reason.
    let (addr, server) = fake_receiver(|mut c| {
        let mut buf = vec![0u8; 256 << 10];
        let _ = c.read_exact(&mut buf);
        let mut msg = [0u8; pagewire::protocol::control::CONTROL_MESSAGE_BYTES_MAX];
        let n = Control::Abort {
            code: pagewire::AbortCode::Io,
            reason: "destination disk on fire".into(),
        }
        .encode(&mut msg);
        let _ = c.write_all(&msg[..n]);
        let _ = c.shutdown(std::net::Shutdown::Write);
        std::thread::sleep(Duration::from_millis(300));
    });
    let sender = std::thread::spawn(move || {
        let mut s = Sender::connect(addr, src, &sender_config(1))?;
        s.send_all()?;
        s.finish()
    });
    let err = join_within(sender, LIMIT, "sender").unwrap_err();
    assert!(
        matches!(&err, Error::PeerAborted { reason, .. } if reason.contains("disk on fire")),
        "{}",
        error_chain(&err)
    );
    join_within(server, LIMIT, "fake receiver");
}

/// Reads what the receiver sent until it closes and decodes it as one control message.
fn read_control(s: &mut TcpStream) -> Control {
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    match Control::decode(&buf) {
        Ok(Some((msg, _))) => msg,
        other => panic!("expected a control message, got {other:?} from {buf:?}"),
    }
}

#[test]
fn a_forged_end_of_stream_over_an_empty_image_is_refused() {
    if skip_without_uring() {
        return;
    }
    let (addr, rx) = start_receiver(memory(16 * 4096), ReceiverConfig::default());
    let mut s = fake_sender(addr);
    s.write_all(&frames(|chan, f, out| {
        chan.end_stream(f);
        push_encoded(f, out);
    }))
    .unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Incomplete {
                region: 0,
                page: 0,
                missing: 16
            }
        ),
        "{}",
        error_chain(&err)
    );
    match read_control(&mut s) {
        Control::Abort { code, reason } => {
            assert_eq!(code, pagewire::AbortCode::Incomplete);
            assert!(reason.contains("page 0 of region 0"), "{reason}");
        }
        other => panic!("expected an abort, got {other:?}"),
    }

    // Every page but one: still refused, naming the missing page.
    let (addr, rx) = start_receiver(memory(16 * 4096), ReceiverConfig::default());
    let mut s = fake_sender(addr);
    s.write_all(&frames(|chan, f, out| {
        chan.begin_pages(f, 0);
        for p in (0..16).filter(|&p| p != 11) {
            f.push_page(p, true).unwrap();
        }
        push_encoded(f, out);
        chan.end_stream(f);
        push_encoded(f, out);
    }))
    .unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Incomplete {
                region: 0,
                page: 11,
                missing: 1
            }
        ),
        "{}",
        error_chain(&err)
    );
    let _ = FrameKind::Invalid;
}

#[test]
fn a_half_header_then_silence_fails_within_the_idle_bound() {
    if skip_without_uring() {
        return;
    }
    let config = ReceiverConfig {
        idle_timeout_ms: 800,
        ..ReceiverConfig::default()
    };
    let (addr, rx) = start_receiver(memory(16 * 4096), config);
    let mut s = fake_sender(addr);
    let started = std::time::Instant::now();
    s.write_all(&pages_frame(&[0], 4096)[..15]).unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(err, Error::Timeout { .. }) && error_chain(&err).contains("sent nothing"),
        "{}",
        error_chain(&err)
    );
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "failed after {waited:?}"
    );
    // A sender that stops after a whole frame (silence at a frame boundary) fails the same way.
    let config = ReceiverConfig {
        idle_timeout_ms: 800,
        ..ReceiverConfig::default()
    };
    let (addr, rx) = start_receiver(memory(16 * 4096), config);
    let mut s = fake_sender(addr);
    s.write_all(&frames(|chan, f, out| {
        chan.begin_pages(f, 0);
        f.push_page(3, true).unwrap();
        push_encoded(f, out);
    }))
    .unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(err, Error::Timeout { .. }),
        "{}",
        error_chain(&err)
    );
    drop(s);
}

#[test]
fn a_slow_but_moving_payload_outlasts_the_idle_bound() {
    if skip_without_uring() {
        return;
    }
    // One frame of 16 pages whose payload trickles in over about 2.5 idle bounds: the receive
    // of that payload is one op that stays pending the whole time, so only the bytes the kernel
    // sees arriving (TCP_INFO) keep the bound from cutting a sender that is slow, not stopped.
    let idle_ms = 800;
    let dst = memory(16 * 4096);
    let config = ReceiverConfig {
        idle_timeout_ms: idle_ms,
        ..ReceiverConfig::default()
    };
    let (addr, rx) = start_receiver(dst.clone(), config);
    let mut s = fake_sender(addr);
    s.set_nodelay(true).unwrap();
    let payload: Vec<u8> = (0..16 * 4096u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    // One channel machine for both frames: their numbers follow on.
    let mut chan = SenderChannel::default();
    let mut f = Frame::default();
    let mut header = Vec::new();
    chan.begin_pages(&mut f, 0);
    for p in 0..16 {
        f.push_page(p, false).unwrap();
    }
    f.payload_bytes = payload.len() as u32;
    f.begin_checksums();
    for page in payload.chunks(4096) {
        f.push_checksum(xxh3(page));
    }
    push_encoded(&f, &mut header);
    s.write_all(&header).unwrap();
    let started = std::time::Instant::now();
    let pieces = 200;
    for piece in payload.chunks(payload.len() / pieces) {
        if let Err(e) = s.write_all(piece) {
            let received = join_within(rx, LIMIT, "receiver").map(drop);
            let why = received.map_or_else(|e| error_chain(&e), |()| "it succeeded".into());
            panic!(
                "the receiver hung up after {:?} ({e}): {why}",
                started.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let trickled = started.elapsed();
    assert!(
        trickled > Duration::from_millis(2 * idle_ms),
        "the payload took only {trickled:?}"
    );
    let mut end = Vec::new();
    chan.end_stream(&mut f);
    push_encoded(&f, &mut end);
    s.write_all(&end).unwrap();
    let received = join_within(rx, LIMIT, "receiver");
    let stats = received.unwrap_or_else(|e| panic!("the receiver failed: {}", error_chain(&e)));
    assert_eq!(stats.normal_pages, 16);
    let mut done = [0u8; 16];
    s.read_exact(&mut done).unwrap();
    assert_eq!(Control::decode(&done), Ok(Some((Control::Done, 16))));
    let mut got = vec![0u8; payload.len()];
    dst.regions()[0].read(0, &mut got);
    assert!(got == payload, "the destination differs from what was sent");
}

#[test]
fn mixed_end_of_round_and_end_of_stream_is_a_protocol_error_not_a_wait() {
    if skip_without_uring() {
        return;
    }
    let len = 16 * 4096;
    let (addr, rx) = start_receiver(memory(len), ReceiverConfig::default());
    let (mut a, reply) = raw_hello(addr, &hello_for(len, 0, 2, 4));
    assert_eq!(reply.refusal, None);
    let (mut b, reply) = raw_hello(addr, &hello_for(len, 1, 2, 4));
    assert_eq!(reply.refusal, None);
    let started = std::time::Instant::now();
    a.write_all(&frames(|chan, f, out| {
        chan.end_round(f);
        push_encoded(f, out);
    }))
    .unwrap();
    b.write_all(&frames(|chan, f, out| {
        chan.end_stream(f);
        push_encoded(f, out);
    }))
    .unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        error_chain(&err).contains("disagree at the round barrier"),
        "{}",
        error_chain(&err)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_flipped_payload_bit_fails_both_sides_naming_region_and_page() {
    if skip_without_uring() {
        return;
    }
    use pagewire_tests::{tampering_proxy, Tamper};
    let len = 16 * 4096;
    let src = memory(len);
    fill(&src, Content::Random, 8);
    let dst = memory(len);
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    // The first frame: the hello, then a header of 32 bytes, one run of 12 and a checksum
    // per page (16 × 8), then the payload; flip a bit in page 3.
    let header = 32 + 12 + 16 * 8;
    let proxy = tampering_proxy(
        addr,
        Tamper::Flip(pagewire::limits::HELLO_BYTES + header + 3 * 4096 + 100),
    );
    let tx = std::thread::spawn(move || {
        let mut s = Sender::connect(proxy, src, &sender_config(1))?;
        s.send_all()?;
        s.finish()
    });
    let received = join_within(rx, LIMIT, "receiver").unwrap_err();
    let sent = join_within(tx, LIMIT, "sender").unwrap_err();
    assert!(
        error_chain(&received).contains("page 3 of region 0"),
        "{}",
        error_chain(&received)
    );
    assert!(
        matches!(&sent, Error::PeerAborted { reason, .. } if reason.contains("page 3 of region 0")),
        "{}",
        error_chain(&sent)
    );
}

#[test]
fn a_torn_page_of_a_live_round_must_arrive_again_before_success() {
    if skip_without_uring() {
        return;
    }
    use pagewire::PageRun;
    use pagewire_tests::{tampering_proxy, Tamper};
    let len = 16 * 4096;
    let header = 32 + 12 + 16 * 8;
    let everything = [PageRun {
        region: 0,
        first_page: 0,
        pages: 16,
    }];
    for resend in [true, false] {
        let src = memory(len);
        fill(&src, Content::Random, 9);
        let dst = memory(len);
        let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
        // A bit flipped in page 3 of a live round looks exactly like a page a vCPU tore.
        let proxy = tampering_proxy(
            addr,
            Tamper::Flip(pagewire::limits::HELLO_BYTES + header + 3 * 4096 + 7),
        );
        let source = src.clone();
        let tx = std::thread::spawn(move || {
            let mut s = Sender::connect(proxy, source, &sender_config(1))?;
            s.send_live_round(&everything)?;
            if resend {
                // The dirty log would name the torn page: it goes again in the final round.
                s.send_round(&[PageRun {
                    region: 0,
                    first_page: 3,
                    pages: 1,
                }])?;
            }
            s.finish()
        });
        let received = join_within(rx, LIMIT, "receiver");
        let sent = join_within(tx, LIMIT, "sender");
        if resend {
            let stats = received.unwrap();
            sent.unwrap();
            assert_eq!(stats.torn_pages, 1);
            assert_eq!(src.first_difference(&dst), None);
        } else {
            let err = received.unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Incomplete {
                        region: 0,
                        page: 3,
                        missing: 1
                    }
                ),
                "{}",
                error_chain(&err)
            );
            assert!(sent.is_err());
        }
    }
}

/// A cancel that comes once the receiver has confirmed everything is too late, on either side:
/// the destination may already run the guest, so both sides must report the migration
/// complete. Raced many times, so that the cancel lands while the other side's shards take
/// or send the `Done`, or after they ended.
#[test]
fn a_cancel_after_the_receiver_confirmed_leaves_both_sides_agreeing() {
    if skip_without_uring() {
        return;
    }
    const LEN: u64 = 2 << 20;
    let src = memory(LEN);
    fill(&src, Content::Random, 9);
    for i in 0..60 {
        let cancel_sender = i % 2 == 0;
        let dst = memory(LEN);
        let receiver = pagewire::Receiver::bind(
            "127.0.0.1:0",
            dst.clone(),
            ReceiverConfig {
                pinning: Pinning::None,
                accept_timeout_ms: Some(20_000),
                ..ReceiverConfig::default()
            },
        )
        .unwrap();
        let addr = receiver.local_addr().unwrap();
        let receiver_canceller = receiver.canceller();
        let (give, take) = std::sync::mpsc::channel::<pagewire::sender::Canceller>();
        let rx = std::thread::spawn(move || {
            let r = receiver.run();
            if r.is_ok() && cancel_sender {
                take.recv().unwrap().cancel();
            }
            r
        });
        let mut sender = Sender::connect(addr, src.clone(), &sender_config(2)).unwrap();
        give.send(sender.canceller()).unwrap();
        sender.send_all().unwrap();
        let sent = sender.finish();
        if sent.is_ok() && !cancel_sender {
            receiver_canceller.cancel();
        }
        let received = join_within(rx, LIMIT, "receiver");
        let who = if cancel_sender { "sender" } else { "receiver" };
        assert!(
            received.is_ok() && sent.is_ok(),
            "iteration {i}, the {who} cancelled late: receiver {:?}, sender {:?}",
            received.as_ref().err().map(|e| error_chain(e)),
            sent.as_ref().err().map(|e| error_chain(e)),
        );
        assert_eq!(src.first_difference(&dst), None);
    }
}

/// A connection that sends a valid hello and resets before the answer: its channel joined the
/// session being gathered, then its handshake failed. The receiver must drop that session and
/// serve the real sender that comes next, not refuse it as another session for ever.
#[test]
fn a_channel_reset_during_its_handshake_does_not_block_the_next_sender() {
    if skip_without_uring() {
        return;
    }
    let len = 64 * 4096;
    let dst = memory(len);
    let (addr, rx) = start_receiver(
        dst.clone(),
        ReceiverConfig {
            accept_timeout_ms: Some(5_000),
            ..ReceiverConfig::default()
        },
    );
    for session in [7, 8, 9] {
        let s = TcpStream::connect(addr).unwrap();
        (&s).write_all(&hello_for(len, 0, 2, session).encode())
            .unwrap();
        // Close at once with a reset (SO_LINGER 0): the hello stays readable, the answer
        // cannot be written.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a `linger` of the size given.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(100));
    let src = memory(len);
    fill(&src, Content::Random, 5);
    let sent = pagewire_tests::send_all_to(addr, src.clone(), &sender_config(2));
    let received = join_within(rx, LIMIT, "receiver");
    assert!(
        sent.is_ok() && received.is_ok(),
        "sender {:?}, receiver {:?}",
        sent.as_ref().err().map(|e| error_chain(e)),
        received.as_ref().err().map(|e| error_chain(e))
    );
    assert_eq!(src.first_difference(&dst), None);
}

/// A cancel after the sender built its end of the stream cannot take it back: the receiver,
/// past that frame, reads nothing more on the channel and confirms whatever the sender does
/// meanwhile, and its VMM may then resume the guest. So the sender must wait for the
/// receiver's answer and report the same outcome, however long the receiver takes to drain
/// what is on the way. A slow path (2 MB/s) holds the last second or so of the stream when the
/// cancel comes, at three points after `finish` was called (3 MiB fit in the shards' frames and
/// the socket buffers, so the end of stream is built long before): both sides complete.
#[test]
fn a_cancel_after_the_end_of_the_stream_left_waits_for_the_receiver_s_answer() {
    use pagewire_tests::{tampering_proxy, Tamper};
    if skip_without_uring() {
        return;
    }
    const LEN: u64 = 3 << 20;
    const SLOW_BYTES_PER_S: u64 = 2_000_000;
    let src = memory(LEN);
    fill(&src, Content::Random, 11);
    for cancel_after_ms in [200, 500, 900] {
        let dst = memory(LEN);
        let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
        let proxy = tampering_proxy(addr, Tamper::Slow(SLOW_BYTES_PER_S));
        let mut sender = Sender::connect(proxy, src.clone(), &sender_config(1)).unwrap();
        let canceller = sender.canceller();
        sender.send_all().unwrap();
        let tx = std::thread::spawn(move || sender.finish());
        std::thread::sleep(Duration::from_millis(cancel_after_ms));
        canceller.cancel();
        let still_finishing = !tx.is_finished();
        let sent = join_within(tx, LIMIT, "sender");
        let received = join_within(rx, LIMIT, "receiver");
        assert!(
            still_finishing,
            "finish returned within {cancel_after_ms} ms: the path was not slow"
        );
        assert!(
            sent.is_ok() && received.is_ok(),
            "cancelled {cancel_after_ms} ms into finish: sender {:?}, receiver {:?}",
            sent.as_ref().err().map(|e| error_chain(e)),
            received.as_ref().err().map(|e| error_chain(e)),
        );
        assert_eq!(src.first_difference(&dst), None);
    }
}

/// Each handshake read has a timeout, but a peer that drips its reply a byte at a time, each
/// within it, would hold `Sender::connect` for as long as it likes (16 bytes 3 s apart: 48 s;
/// a TLS record's 16 KiB: hours), with no canceller to stop it yet. The whole handshake is
/// bounded by `HANDSHAKE_TIMEOUT_MS` (10 s) instead, and says so.
#[test]
fn a_receiver_dripping_its_reply_cannot_hold_the_sender_past_the_handshake_bound() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Left to end on its own (its next write after the sender gave up fails).
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut hello = [0u8; 64];
        let _ = c.read_exact(&mut hello);
        let reply = Reply {
            version: PROTOCOL_VERSION,
            refusal: None,
            idle_timeout_ms: 30_000,
        }
        .encode();
        for b in reply {
            std::thread::sleep(Duration::from_secs(3));
            if c.write_all(&[b]).is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    let tx = std::thread::spawn(move || {
        Sender::connect(addr, memory(1 << 20), &sender_config(1)).map(drop)
    });
    let sent = join_within(tx, Duration::from_secs(20), "sender");
    let took = started.elapsed();
    let err = sent.unwrap_err();
    assert!(
        took < Duration::from_secs(15),
        "took {took:?}: {}",
        error_chain(&err)
    );
    assert!(
        matches!(err, Error::Timeout { .. }),
        "{}",
        error_chain(&err)
    );
}

/// A bandwidth limit so low that one frame's share of it lasts longer than the receiver's idle
/// bound (here 512 KiB frames at 256 KiB/s against 400 ms) must not make the receiver give up
/// on a sender that is only pacing itself: the sender never stays silent for longer than its
/// keepalive interval, so below that floor it sends at the floor (and says so).
#[test]
fn a_limit_below_one_frame_per_idle_bound_does_not_time_the_receiver_out() {
    if skip_without_uring() {
        return;
    }
    let src = memory(1 << 20);
    fill(&src, Content::Random, 13);
    let dst = memory(1 << 20);
    let (addr, rx) = start_receiver(
        dst.clone(),
        ReceiverConfig {
            idle_timeout_ms: 400,
            ..ReceiverConfig::default()
        },
    );
    let config = SenderConfig {
        max_bandwidth_bytes_per_s: Some(256 << 10),
        ..sender_config(1)
    };
    let sent = pagewire_tests::send_all_to(addr, src.clone(), &config);
    let received = join_within(rx, LIMIT, "receiver");
    if let Err(e) = &received {
        panic!("receiver: {}", error_chain(e));
    }
    sent.unwrap();
    assert_eq!(src.first_difference(&dst), None);
}
