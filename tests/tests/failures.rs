//! Everything that must fail, failing clearly on both sides and in bounded time: handshake
//! mismatches, peers that are not pagewire, peers that vanish mid-frame, garbled frames.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use pagewire::protocol::control::Control;
use pagewire::protocol::handshake::{layout_digest, Hello, Refusal, Reply};
use pagewire::protocol::{Frame, FrameKind, SenderChannel, PROTOCOL_VERSION};
use pagewire::synth::{fill, Content};
use pagewire::{
    error_chain, Error, GuestMemory, Pinning, ReceiverConfig, RegionSpec, Sender, SenderConfig,
};
use pagewire_tests::{join_within, skip_without_uring, start_receiver};

const LIMIT: Duration = Duration::from_secs(30);

fn memory(len: u64) -> Arc<GuestMemory> {
    Arc::new(GuestMemory::anonymous(&[RegionSpec { gpa: 0, len }]).unwrap())
}

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
    let (addr, rx) = start_receiver(memory(8 << 20), ReceiverConfig::default());
    let err = Sender::connect(addr, memory(4 << 20), &sender_config(2)).unwrap_err();
    assert_refused(
        &err,
        |r| matches!(r, Refusal::LayoutMismatch { .. }),
        "layout",
    );
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert_refused(
        &err,
        |r| matches!(r, Refusal::LayoutMismatch { .. }),
        "layout",
    );
}

#[test]
fn channel_count_mismatch_is_refused_on_both_sides() {
    if skip_without_uring() {
        return;
    }
    let config = ReceiverConfig {
        channels: Some(4),
        ..ReceiverConfig::default()
    };
    let (addr, rx) = start_receiver(memory(1 << 20), config);
    let err = Sender::connect(addr, memory(1 << 20), &sender_config(2)).unwrap_err();
    assert_refused(
        &err,
        |r| matches!(r, Refusal::ChannelCountMismatch { expected: 4 }),
        "channel count",
    );
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert_refused(
        &err,
        |r| matches!(r, Refusal::ChannelCountMismatch { .. }),
        "channel count",
    );
}

#[test]
fn wrong_session_duplicate_channel_and_version_are_refused() {
    if skip_without_uring() {
        return;
    }
    let len = 1 << 20;
    type Case = (Hello, fn(&Refusal) -> bool, &'static str);
    let cases: [Case; 3] = [
        (
            hello_for(len, 1, 2, 9),
            |r| matches!(r, Refusal::SessionMismatch),
            "session",
        ),
        (
            hello_for(len, 0, 2, 7),
            |r| matches!(r, Refusal::ChannelDuplicate),
            "duplicate",
        ),
        (
            Hello {
                version: 2,
                ..hello_for(len, 1, 2, 7)
            },
            |r| matches!(r, Refusal::VersionUnsupported { receiver: 1 }),
            "version",
        ),
    ];
    for (second, want, text) in cases {
        let (addr, rx) = start_receiver(memory(len), ReceiverConfig::default());
        let (_first, reply) = raw_hello(addr, &hello_for(len, 0, 2, 7));
        assert_eq!(reply.refusal, None);
        let (_second, reply) = raw_hello(addr, &second);
        let refusal = reply.refusal.expect("second hello must be refused");
        assert!(want(&refusal), "{text}: got {refusal:?}");
        let err = join_within(rx, LIMIT, "receiver").unwrap_err();
        assert_refused(&err, want, text);
    }
    // Channel index out of range, on its own.
    let (addr, rx) = start_receiver(memory(len), ReceiverConfig::default());
    let (_s, reply) = raw_hello(addr, &hello_for(len, 2, 2, 7));
    assert_eq!(reply.refusal, Some(Refusal::ChannelOutOfRange));
    assert!(join_within(rx, LIMIT, "receiver").is_err());
}

#[test]
fn a_peer_that_is_not_pagewire_fails_clearly_either_way() {
    if skip_without_uring() {
        return;
    }
    // Not-pagewire client meets a receiver.
    let (addr, rx) = start_receiver(memory(1 << 20), ReceiverConfig::default());
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let err = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(err, Error::BadHello { .. }),
        "{}",
        error_chain(&err)
    );
    assert!(
        error_chain(&err).contains("not speaking pagewire"),
        "{}",
        error_chain(&err)
    );

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
    let mut buf = vec![0u8; frame.header_bytes()];
    frame.encode(&mut buf).unwrap();
    buf
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
                version: 1,
                refusal: None,
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
            code: 2,
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

#[test]
fn a_frame_kind_of_zero_or_after_the_end_is_refused() {
    if skip_without_uring() {
        return;
    }
    let (addr, rx) = start_receiver(memory(16 * 4096), ReceiverConfig::default());
    let mut s = fake_sender(addr);
    let mut f = Frame::default();
    let mut chan = SenderChannel::default();
    chan.end_stream(&mut f);
    let mut buf = vec![0u8; f.header_bytes()];
    f.encode(&mut buf).unwrap();
    s.write_all(&buf).unwrap();
    // Receiver finishes cleanly after the end-of-stream and sends Done.
    let mut done = [0u8; 16];
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.read_exact(&mut done).unwrap();
    assert_eq!(Control::decode(&done), Ok(Some((Control::Done, 16))));
    join_within(rx, LIMIT, "receiver").unwrap();
    let _ = FrameKind::Invalid;
}
