//! Sessions over connections the caller made, as management software hands them in (here as
//! raw file descriptors): the caller listens, connects and accepts; the sender and receiver
//! only handshake and transfer. Plaintext and TLS, verified.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::Duration;

use pagewire::synth::{fill, Content};
use pagewire::tls::certs::{self, CertOptions};
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{GuestMemory, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig};
use pagewire_tests::{join_within, skip_without_uring};

/// `n` connected pairs, passed through raw file descriptors as another process would.
fn pairs(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..n {
        let fd = TcpStream::connect(addr).unwrap().into_raw_fd();
        // SAFETY: `fd` is an open TCP socket just released by its owner.
        clients.push(unsafe { TcpStream::from_raw_fd(fd) });
        servers.push(listener.accept().unwrap().0);
    }
    (clients, servers)
}

fn migrate(tls: bool) {
    let specs = [RegionSpec {
        gpa: 0,
        len: 32 << 20,
    }];
    let src = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    fill(&src, Content::Blend, 5);
    let dst = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = if tls {
        certs::generate(&CertOptions::default())
            .unwrap()
            .write(dir.path())
            .unwrap();
        (
            Some(TlsServer::new(certs::server_files(dir.path()).load().unwrap()).unwrap()),
            Some(
                TlsClient::new(certs::client_files(dir.path()).load().unwrap(), "localhost")
                    .unwrap(),
            ),
        )
    } else {
        (None, None)
    };
    let (clients, servers) = pairs(3);
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
    migrate(false);
}

#[test]
fn a_session_over_handed_in_connections_tls() {
    if skip_without_uring() {
        return;
    }
    migrate(true);
}
