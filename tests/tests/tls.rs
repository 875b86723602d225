//! TLS 1.3 end to end: round trips, every way a peer must be refused, a tampered record, key
//! updates.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pagewire::synth::{fill, Content};
use pagewire::tls::certs::{self, CertOptions, CertSet};
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{
    error_chain, Error, GuestMemory, Pinning, ReceiverConfig, RegionSpec, Sender, SenderConfig,
};
use pagewire_tests::{join_within, skip_without_uring, start_receiver, tampering_proxy, Tamper};

const LIMIT: Duration = Duration::from_secs(30);

struct Pki {
    _dir: tempfile::TempDir,
    server: TlsServer,
    client: TlsClient,
}

fn pki_from(set: &CertSet, hostname: &str) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    set.write(dir.path()).unwrap();
    let server = TlsServer::new(certs::server_files(dir.path()).load().unwrap()).unwrap();
    let client = TlsClient::new(certs::client_files(dir.path()).load().unwrap(), hostname).unwrap();
    Pki {
        _dir: dir,
        server,
        client,
    }
}

fn pki() -> Pki {
    pki_from(
        &certs::generate(&CertOptions::default()).unwrap(),
        "localhost",
    )
}

fn memory(specs: &[RegionSpec]) -> Arc<GuestMemory> {
    Arc::new(GuestMemory::anonymous(specs).unwrap())
}

fn one_region(len: u64) -> Vec<RegionSpec> {
    vec![RegionSpec { gpa: 0, len }]
}

fn sender_config(channels: u16, tls: Option<TlsClient>) -> SenderConfig {
    SenderConfig {
        channels,
        pinning: Pinning::None,
        tls,
        ..SenderConfig::default()
    }
}

fn receiver_config(tls: Option<TlsServer>) -> ReceiverConfig {
    ReceiverConfig {
        pinning: Pinning::None,
        tls,
        ..ReceiverConfig::default()
    }
}

type Outcome = (
    pagewire::Result<pagewire::TransferStats>,
    pagewire::Result<pagewire::TransferStats>,
);

/// Runs one transfer; returns the sender's and receiver's results.
fn transfer(
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    sender: SenderConfig,
    receiver: ReceiverConfig,
) -> Outcome {
    transfer_via(src, dst, sender, receiver, |addr| addr)
}

/// Like [`transfer`], with the sender dialling `route(receiver's address)`.
fn transfer_via(
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    sender: SenderConfig,
    receiver: ReceiverConfig,
    route: impl FnOnce(SocketAddr) -> SocketAddr,
) -> Outcome {
    let (addr, rx) = start_receiver(dst, receiver);
    let addr = route(addr);
    let tx = std::thread::spawn(move || {
        let mut s = Sender::connect(addr, src, &sender)?;
        s.send_all()?;
        s.finish()
    });
    let sent = join_within(tx, LIMIT, "sender");
    let received = join_within(rx, LIMIT, "receiver");
    (sent, received)
}

#[test]
fn tls_round_trips_on_1_2_and_4_channels() {
    if skip_without_uring() {
        return;
    }
    let specs = vec![
        RegionSpec {
            gpa: 0,
            len: 3 << 20,
        },
        RegionSpec {
            gpa: 1 << 32,
            len: 777 * 4096,
        },
    ];
    for channels in [1, 2, 4] {
        let p = pki();
        let src = memory(&specs);
        fill(&src, Content::Blend, u64::from(channels));
        let dst = memory(&specs);
        let (sent, received) = transfer(
            src.clone(),
            dst.clone(),
            sender_config(channels, Some(p.client.clone())),
            receiver_config(Some(p.server.clone())),
        );
        let sent = sent.unwrap();
        received.unwrap();
        assert_eq!(src.first_difference(&dst), None, "{channels} channels");
        // Sealed records cost more than the payload; zero pages still cost only a run entry.
        assert!(sent.transferred_bytes > sent.normal_bytes);
        assert!(
            sent.transferred_bytes < sent.normal_bytes + (sent.zero_pages + 64) * 64 + (4 << 10)
        );
    }
}

#[test]
fn key_updates_keep_the_stream_readable() {
    if skip_without_uring() {
        return;
    }
    let p = pki();
    let specs = one_region(8 << 20);
    let src = memory(&specs);
    fill(&src, Content::Random, 9);
    let dst = memory(&specs);
    let mut config = sender_config(2, Some(p.client.clone()));
    config.tls_records_per_key = 7; // hundreds of key updates in 8 MiB
    let (sent, received) = transfer(
        src.clone(),
        dst.clone(),
        config,
        receiver_config(Some(p.server)),
    );
    sent.unwrap();
    let received = received.unwrap();
    assert_eq!(src.first_difference(&dst), None);
    // With aws-lc-rs (the default provider, which this crate builds), records of page data
    // open straight into the
    // destination pages; only the plaintext that shares a record with a frame's header, and
    // the record after each key update, go through the staging slot.
    let direct: u64 = received.shards.iter().map(|s| s.tls_direct_bytes).sum();
    eprintln!(
        "{direct} of {} payload bytes opened straight into destination memory",
        received.normal_bytes
    );
    assert!(
        direct > received.normal_bytes / 2 && direct <= received.normal_bytes,
        "{direct} of {} bytes opened straight into memory",
        received.normal_bytes
    );
}

/// One channel, 1 MiB, with the given TLS ends (`None`: plaintext on that side).
fn one_mib_transfer(client: Option<TlsClient>, server: Option<TlsServer>) -> Outcome {
    let specs = one_region(1 << 20);
    // A refused sender does not end the receive: the receiver drops it and, at its deadline,
    // names the last refusal.
    let receiver = ReceiverConfig {
        accept_timeout_ms: Some(2000),
        ..receiver_config(server)
    };
    transfer(
        memory(&specs),
        memory(&specs),
        sender_config(1, client),
        receiver,
    )
}

fn assert_refused_both(
    sent: pagewire::Result<pagewire::TransferStats>,
    received: pagewire::Result<pagewire::TransferStats>,
    sender_says: &[&str],
    receiver_says: &[&str],
) {
    let s = error_chain(&sent.unwrap_err());
    let r = error_chain(&received.unwrap_err());
    assert!(
        sender_says.iter().any(|w| s.contains(w)),
        "sender said: {s}"
    );
    assert!(
        receiver_says.iter().any(|w| r.contains(w)),
        "receiver said: {r}"
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    if skip_without_uring() {
        return;
    }
    let good = certs::generate(&CertOptions::default()).unwrap();
    let other = certs::generate(&CertOptions::default()).unwrap();
    // The sender trusts the right CA but presents a certificate signed by another one.
    let mixed = CertSet {
        client_cert: other.client_cert.clone(),
        client_key: other.client_key.clone(),
        ..good.clone()
    };
    let server = pki_from(&good, "localhost").server;
    let client = pki_from(&mixed, "localhost").client;
    let (sent, received) = one_mib_transfer(Some(client), Some(server));
    assert_refused_both(
        sent,
        received,
        &["TLS alert"],
        &["invalid peer certificate"],
    );
}

#[test]
fn a_wrong_hostname_is_refused() {
    if skip_without_uring() {
        return;
    }
    let set = certs::generate(&CertOptions::default()).unwrap();
    let p = pki_from(&set, "not-the-receiver.example");
    let (sent, received) = one_mib_transfer(Some(p.client), Some(p.server));
    assert_refused_both(
        sent,
        received,
        &["not valid for name"],
        &["received fatal alert: BadCertificate"],
    );
}

#[test]
fn an_expired_client_certificate_is_refused() {
    if skip_without_uring() {
        return;
    }
    let set = certs::generate(&CertOptions {
        client_expired: true,
        ..CertOptions::default()
    })
    .unwrap();
    let p = pki_from(&set, "localhost");
    let (sent, received) = one_mib_transfer(Some(p.client), Some(p.server));
    assert_refused_both(
        sent,
        received,
        &["TLS alert certificate_expired"],
        &["certificate expired"],
    );
}

#[test]
fn plaintext_meeting_tls_fails_with_a_message_that_says_so_either_way() {
    if skip_without_uring() {
        return;
    }
    let p = pki();
    // Plaintext sender, TLS receiver.
    let (sent, received) = one_mib_transfer(None, Some(p.server.clone()));
    assert_refused_both(sent, received, &["requires TLS"], &["plaintext"]);
    // TLS sender, plaintext receiver.
    let (sent, received) = one_mib_transfer(Some(p.client.clone()), None);
    assert_refused_both(
        sent,
        received,
        &["plaintext", "without TLS"],
        &["TLS handshake"],
    );
}

/// Runs a one-channel TLS transfer of `src` into `dst` through a proxy doing `tamper`.
fn transfer_through(
    p: &Pki,
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    tamper: Tamper,
) -> Outcome {
    transfer_via(
        src,
        dst,
        sender_config(1, Some(p.client.clone())),
        receiver_config(Some(p.server.clone())),
        |addr| tampering_proxy(addr, tamper),
    )
}

#[test]
fn a_flipped_ciphertext_byte_is_an_authentication_error_and_nothing_past_its_record_is_written() {
    if skip_without_uring() {
        return;
    }
    let p = pki();
    let specs = one_region(4 << 20);
    let src = memory(&specs);
    fill(&src, Content::Random, 3);
    let dst = memory(&specs);
    // Well past the handshake (a few KiB), inside the sealed page data.
    let (sent, received) = transfer_through(&p, src.clone(), dst.clone(), Tamper::Flip(300_000));
    let r = received.unwrap_err();
    assert!(
        matches!(r, Error::TlsRecord { .. }) && error_chain(&r).contains("authentication"),
        "receiver: {}",
        error_chain(&r)
    );
    assert!(sent.is_err(), "the sender must not report success");
    // Every destination byte is untouched (zero), the source's byte, or one of the forged
    // record's: a record is opened straight into its pages before its tag is checked (see
    // `tls::direct`), so its data may land there as garbage, but no more than one record's
    // worth (16 KiB), and the transfer stopped there (the tail of the memory was never
    // written). The transfer fails, so the garbage is never taken for the guest's.
    let region_src = &src.regions()[0];
    let region_dst = &dst.regions()[0];
    let mut a = vec![0u8; 4 << 20];
    let mut b = vec![0u8; 4 << 20];
    region_src.read(0, &mut a);
    region_dst.read(0, &mut b);
    let foreign: Vec<usize> = (0..a.len())
        .filter(|&i| b[i] != 0 && a[i] != b[i])
        .collect();
    eprintln!(
        "{} bytes of the forged record reached memory",
        foreign.len()
    );
    if let (Some(first), Some(last)) = (foreign.first(), foreign.last()) {
        assert!(
            last - first < 16 * 1024,
            "bytes that are not the source's were written from {first} to {last}"
        );
    }
    let written = b.iter().rposition(|&x| x != 0).unwrap_or(0);
    assert!(
        written < 300_000 + 16 * 1024,
        "data past the forged record was placed (up to byte {written})"
    );
}

#[test]
fn a_tls_stream_cut_short_is_an_error_not_a_short_transfer() {
    if skip_without_uring() {
        return;
    }
    let p = pki();
    let specs = one_region(4 << 20);
    let src = memory(&specs);
    fill(&src, Content::Random, 4);
    // Cut inside the data, and cut just before the end (after the last page, before close_notify
    // and the end of the stream could arrive).
    for cut in [200_000usize, (4 << 20) + 2_000] {
        let (sent, received) = transfer_through(&p, src.clone(), memory(&specs), Tamper::Cut(cut));
        let r = received.unwrap_err();
        assert!(
            matches!(r, Error::PeerClosed { .. }),
            "cut at {cut}: receiver: {}",
            error_chain(&r)
        );
        assert!(
            sent.is_err(),
            "cut at {cut}: the sender must not report success"
        );
    }
}
