//! Destination images that cannot be backed: a truncated file fails the transfer cleanly on
//! both sides, with and without TLS, and never kills the receiving process.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use pagewire::synth::{fill, Content};
use pagewire::tls::certs::{self, CertOptions};
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{
    error_chain, Error, GuestMemory, ImageFile, Pinning, ReceiverConfig, RegionSpec, Sender,
    SenderConfig,
};
use pagewire_tests::{join_within, skip_without_uring, start_receiver};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_destination_file_truncated_under_the_receiver_fails_both_sides_cleanly() {
    if skip_without_uring() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    certs::generate(&CertOptions::default())
        .unwrap()
        .write(dir.path())
        .unwrap();
    for tls in [false, true] {
        let len = 16u64 << 20;
        let path = dir.path().join(format!("dst-{tls}.img"));
        std::fs::write(&path, vec![0u8; len as usize]).unwrap();
        let image = ImageFile::open_existing(&path).unwrap();
        // Someone truncates the image under the receiver's mapping.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let src = Arc::new(GuestMemory::anonymous(&[RegionSpec { gpa: 0, len }]).unwrap());
        fill(&src, Content::Random, 1);
        let (server, client) = if tls {
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
        let (addr, rx) = start_receiver(
            image.memory(),
            ReceiverConfig {
                tls: server,
                pinning: Pinning::None,
                ..ReceiverConfig::default()
            },
        );
        let tx = std::thread::spawn(move || {
            let mut s = Sender::connect(
                addr,
                src,
                &SenderConfig {
                    channels: 2,
                    pinning: Pinning::None,
                    tls: client,
                    ..SenderConfig::default()
                },
            )?;
            s.send_all()?;
            s.finish()
        });
        let received = join_within(rx, LIMIT, "receiver").unwrap_err();
        let sent = join_within(tx, LIMIT, "sender").unwrap_err();
        assert!(
            matches!(received, Error::MemoryFault { region: 0, page } if page >= 256),
            "tls {tls}: {}",
            error_chain(&received)
        );
        assert!(
            error_chain(&sent).contains("cannot be accessed"),
            "tls {tls}: the sender should hear why: {}",
            error_chain(&sent)
        );
        image.fail(&error_chain(&received));
        let marker = dir
            .path()
            .join(format!("dst-{tls}.img.pagewire-incomplete"));
        assert!(std::fs::read_to_string(marker)
            .unwrap()
            .contains("NOT complete"));
    }
}

#[test]
fn a_sender_that_fails_tells_the_receiver_why() {
    if skip_without_uring() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let len = 16u64 << 20;
    let path = dir.path().join("src.img");
    std::fs::write(&path, vec![0x33u8; len as usize]).unwrap();
    let src = Arc::new(GuestMemory::from_file(&path, false).unwrap());
    // The source image is truncated under the sender: its scan faults past 1 MiB.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let dst = Arc::new(GuestMemory::anonymous(&[RegionSpec { gpa: 0, len }]).unwrap());
    let (addr, rx) = start_receiver(
        dst,
        ReceiverConfig {
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    );
    let tx = std::thread::spawn(move || {
        let mut s = Sender::connect(
            addr,
            src,
            &SenderConfig {
                channels: 1,
                pinning: Pinning::None,
                ..SenderConfig::default()
            },
        )?;
        s.send_all()?;
        s.finish()
    });
    let sent = join_within(tx, LIMIT, "sender").unwrap_err();
    let received = join_within(rx, LIMIT, "receiver").unwrap_err();
    assert!(
        matches!(sent, Error::MemoryFault { .. }),
        "{}",
        error_chain(&sent)
    );
    assert!(
        matches!(&received, Error::PeerAborted { reason, .. } if reason.contains("cannot be accessed")),
        "the receiver should hear the sender's reason: {}",
        error_chain(&received)
    );
}
