//! Sessions over connections the caller made, as management software hands them in (here as
//! raw file descriptors): the caller listens, connects and accepts (or makes UNIX
//! socketpairs); the sender and receiver only handshake and transfer. Plaintext and TLS, over
//! TCP and UNIX stream sockets, verified.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use pagewire::synth::{fill, Content};
use pagewire::{
    GuestMemory, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig, Stream,
};
use pagewire_tests::{join_within, skip_without_uring, tls_identities};

/// `n` connected pairs, passed through raw file descriptors as another process would: loopback
/// TCP connections, or UNIX socketpairs, left non-blocking as an event loop's are.
/// [`Stream::from_fd`] tells them apart.
fn pairs(n: usize, unix: bool) -> (Vec<Stream>, Vec<Stream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..n {
        let (client, server) = if unix {
            let (a, b) = UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            b.set_nonblocking(true).unwrap();
            (a.into_raw_fd(), OwnedFd::from(b))
        } else {
            let c = TcpStream::connect(addr).unwrap();
            let s = listener.accept().unwrap().0;
            c.set_nonblocking(true).unwrap();
            s.set_nonblocking(true).unwrap();
            (c.into_raw_fd(), OwnedFd::from(s))
        };
        // SAFETY: `client` is an open socket just released by its owner.
        let client = unsafe { OwnedFd::from_raw_fd(client) };
        clients.push(Stream::from_fd(client).unwrap());
        servers.push(Stream::from_fd(server).unwrap());
        assert_eq!(matches!(clients.last(), Some(Stream::Unix(_))), unix);
    }
    (clients, servers)
}

fn migrate(tls: bool, unix: bool) {
    let specs = [RegionSpec {
        gpa: 0,
        len: 32 << 20,
    }];
    let src = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    fill(&src, Content::Blend, 5);
    let dst = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = tls_identities(dir.path(), tls);
    let (clients, servers) = pairs(3, unix);
    let receiver = Receiver::over_streams(
        servers,
        dst.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            tls: server,
            ..ReceiverConfig::default()
        },
    )
    .unwrap();
    assert!(receiver.local_addr().is_err(), "it listens nowhere");
    let rx = std::thread::spawn(move || receiver.run());
    let mut sender = Sender::over_streams(
        clients,
        src.clone(),
        &SenderConfig {
            pinning: Pinning::None,
            tls: client,
            ..SenderConfig::default()
        },
    )
    .unwrap();
    sender.send_all().unwrap();
    let sent = sender.finish().unwrap();
    assert_eq!(sent.channels, 3, "one channel per connection handed in");
    join_within(rx, Duration::from_secs(10), "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
}

#[test]
fn a_session_over_handed_in_connections_plaintext() {
    if skip_without_uring() {
        return;
    }
    migrate(false, false);
}

#[test]
fn a_session_over_handed_in_connections_tls() {
    if skip_without_uring() {
        return;
    }
    migrate(true, false);
}

#[test]
fn a_session_over_handed_in_unix_sockets_plaintext() {
    if skip_without_uring() {
        return;
    }
    migrate(false, true);
}

#[test]
fn a_session_over_handed_in_unix_sockets_tls() {
    if skip_without_uring() {
        return;
    }
    migrate(true, true);
}

/// A receiver over handed-in connections has no listener to wait on: once every connection
/// it was given has ended without a complete session (the peer went away, failed its
/// handshake, or handed in fewer channels than its session has), nothing more can come, and
/// it must say so at once instead of waiting for a cancel. Three ways: the peer closes before
/// its hello; a sender of a different layout is refused; two of a three-channel session come.
#[test]
fn a_receiver_whose_handed_in_connections_all_ended_says_so() {
    if skip_without_uring() {
        return;
    }
    let specs = [RegionSpec {
        gpa: 0,
        len: 1 << 20,
    }];
    let dst = || Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let run = |servers: Vec<Stream>| {
        let receiver = Receiver::over_streams(servers, dst(), ReceiverConfig::default()).unwrap();
        let rx = std::thread::spawn(move || receiver.run());
        let err = join_within(rx, Duration::from_secs(5), "receiver").unwrap_err();
        pagewire::error_chain(&err)
    };

    // A sender over `clients` (as many channels as connections), on its own thread.
    let start_sender = |clients: Vec<Stream>, specs: &[RegionSpec]| {
        let src = Arc::new(GuestMemory::anonymous(specs).unwrap());
        std::thread::spawn(move || {
            let config = SenderConfig {
                pinning: Pinning::None,
                ..SenderConfig::default()
            };
            Sender::over_streams(clients, src, &config).map(drop)
        })
    };

    let (clients, servers) = pairs(1, true);
    drop(clients);
    let text = run(servers);
    assert!(text.contains("handed-in connections"), "{text}");

    let (clients, servers) = pairs(1, false);
    let other = [RegionSpec {
        gpa: 0,
        len: 2 << 20,
    }];
    let tx = start_sender(clients, &other);
    let text = run(servers);
    assert!(
        text.contains("handed-in connections") && text.contains("layout"),
        "{text}"
    );
    assert!(join_within(tx, Duration::from_secs(5), "sender").is_err());

    let (clients, mut servers) = pairs(3, true);
    drop(servers.pop());
    let tx = start_sender(clients, &specs);
    let text = run(servers);
    assert!(text.contains("2 of 3"), "{text}");
    assert!(join_within(tx, Duration::from_secs(5), "sender").is_err());
}
