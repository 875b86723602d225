//! Compression end to end: zstd and zlib, with and without TLS, on text-like, random and mixed
//! memory; corrupt and oversized compressed frames; levels; the bandwidth limit.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagewire::pipeline::compress::{Codec, Compression, Compressor};
use pagewire::protocol::handshake::{layout_digest, Hello, Reply, FEATURE_ZSTD};
use pagewire::protocol::{Frame, SenderChannel, PROTOCOL_VERSION};
use pagewire::synth::{fill, Content};
use pagewire::tls::certs::{self, CertOptions};
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{error_chain, Error, GuestMemory, Pinning, ReceiverConfig, Sender, SenderConfig};
use pagewire_tests::{join_within, memory, skip_without_uring, start_receiver};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn both_codecs_round_trip_with_and_without_tls() {
    if skip_without_uring() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    certs::generate(&CertOptions::default())
        .unwrap()
        .write(dir.path())
        .unwrap();
    let server = TlsServer::new(certs::server_files(dir.path()).load().unwrap()).unwrap();
    let client =
        TlsClient::new(certs::client_files(dir.path()).load().unwrap(), "localhost").unwrap();
    for compression in [Compression::Zstd, Compression::Zlib, Compression::Auto] {
        for tls in [false, true] {
            for content in [Content::Text, Content::Random, Content::Mixed] {
                let what = format!("{compression} tls={tls} {content:?}");
                let src = memory(2 << 20);
                fill(&src, content, 5);
                let dst = memory(2 << 20);
                let receiver = ReceiverConfig {
                    pinning: Pinning::None,
                    tls: tls.then(|| server.clone()),
                    ..ReceiverConfig::default()
                };
                let (addr, rx) = start_receiver(dst.clone(), receiver);
                let config = SenderConfig {
                    channels: 2,
                    pinning: Pinning::None,
                    tls: tls.then(|| client.clone()),
                    compression,
                    ..SenderConfig::default()
                };
                let mut s = Sender::connect(addr, src.clone(), &config).unwrap();
                s.send_all().unwrap();
                let sent = s.finish().unwrap();
                let received = join_within(rx, LIMIT, "receiver").unwrap();
                assert_eq!(src.first_difference(&dst), None, "{what}");
                assert_eq!(
                    sent.compressed_frames,
                    received
                        .shards
                        .iter()
                        .map(|s| s.compressed_frames)
                        .sum::<u64>(),
                    "{what}"
                );
                // Both sides count the same compressed payloads, so they agree on the ratio.
                assert!(
                    (sent.compression_ratio - received.compression_ratio).abs() < 1e-9,
                    "{what}: sender {} receiver {}",
                    sent.compression_ratio,
                    received.compression_ratio
                );
                match content {
                    // Incompressible chunks travel raw.
                    Content::Random => assert_eq!(sent.compressed_frames, 0, "{what}"),
                    Content::Text if compression != Compression::Auto => {
                        assert!(sent.compressed_frames > 0, "{what}");
                        assert!(
                            sent.compression_ratio > 2.0,
                            "{what}: ratio {}",
                            sent.compression_ratio
                        );
                        assert!(sent.transferred_bytes < sent.normal_bytes / 2, "{what}");
                    }
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn invalid_levels_are_refused_before_connecting() {
    let config = SenderConfig {
        compression: Compression::Zstd,
        zstd_level: 1000,
        ..SenderConfig::default()
    };
    let err = Sender::connect("127.0.0.1:9", memory(1 << 20), &config).unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{}", error_chain(&err));
    assert!(
        err.to_string().contains("outside the library's range"),
        "{err}"
    );
}

/// A fake sender: plaintext handshake announcing zstd for a 16-page layout, then one frame.
fn send_compressed_frame(addr: std::net::SocketAddr, pages: &[u64], payload: &[u8]) -> TcpStream {
    let len = 16 * 4096;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        channel_index: 0,
        channel_count: 1,
        session_id: [1; 16],
        page_bytes: 4096,
        features: FEATURE_ZSTD,
        layout_digest: layout_digest([(0, len)]),
        layout_bytes: len,
        region_count: 1,
        nonce: [3; 16],
    };
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello.encode()).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(Reply::decode(&reply).unwrap().refusal, None);
    let mut frame = Frame::default();
    SenderChannel::default().begin_pages(&mut frame, 0);
    for &p in pages {
        frame.push_page(p, false).unwrap();
    }
    frame.codec = Codec::Zstd;
    frame.payload_bytes = payload.len() as u32;
    // These payloads fail to decode, before their checksums would be checked.
    frame.begin_checksums();
    for _ in pages {
        frame.push_checksum(0);
    }
    let mut header = vec![0u8; frame.header_bytes()];
    frame.encode(&mut header).unwrap();
    s.write_all(&header).unwrap();
    s.write_all(payload).unwrap();
    s
}

fn prefilled(len: u64) -> Arc<GuestMemory> {
    let m = memory(len);
    for p in 0..len / 4096 {
        m.regions()[0].write(p * 4096, &[0x5a; 4096]);
    }
    m
}

#[test]
fn corrupt_or_oversized_compressed_frames_are_refused_and_write_nothing_outside_their_pages() {
    if skip_without_uring() {
        return;
    }
    let data: Vec<u8> = (0..8 * 4096u32)
        .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
        .collect();
    let mut c = Compressor::new(3).unwrap();
    let mut packed = vec![0u8; data.len()];
    // Four pages' worth, declared as four pages, but corrupted.
    let n4 = c
        .compress(Codec::Zstd, &data[..4 * 4096], &mut packed)
        .unwrap();
    let mut corrupt = packed[..n4].to_vec();
    corrupt[n4 / 2] ^= 0x55;
    corrupt[n4 - 1] ^= 0x55;
    // Eight pages' worth (a "bomb" for this frame), declared as four pages.
    let n8 = c.compress(Codec::Zstd, &data, &mut packed).unwrap();
    let bomb = packed[..n8].to_vec();
    for (payload, what) in [(corrupt, "corrupt"), (bomb, "oversized")] {
        let dst = prefilled(16 * 4096);
        let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
        let _s = send_compressed_frame(addr, &[4, 5, 6, 7], &payload);
        let err = join_within(rx, LIMIT, "receiver").unwrap_err();
        assert!(
            error_chain(&err).contains("compressed frame refused"),
            "{what}: {}",
            error_chain(&err)
        );
        let mut page = [0u8; 4096];
        for p in (0..4).chain(8..16) {
            dst.regions()[0].read(p * 4096, &mut page);
            assert!(
                page.iter().all(|&b| b == 0x5a),
                "{what}: page {p} outside the frame was written"
            );
        }
    }
}

#[test]
fn max_bandwidth_paces_the_sender() {
    if skip_without_uring() {
        return;
    }
    let src = memory(8 << 20);
    fill(&src, Content::Random, 1);
    let dst = memory(8 << 20);
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    let config = SenderConfig {
        channels: 2,
        pinning: Pinning::None,
        max_bandwidth_bytes_per_s: Some(32 << 20),
        ..SenderConfig::default()
    };
    let started = Instant::now();
    let mut s = Sender::connect(addr, src.clone(), &config).unwrap();
    s.send_all().unwrap();
    s.finish().unwrap();
    let elapsed = started.elapsed();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
    // 8 MiB at 32 MiB/s is 250 ms. Paced shards send one 512 KiB frame at a time, the first at
    // once: 7 of each shard's 8 frames wait their turn, 219 ms. A lower bound only (no timing
    // assertions on speed): without pacing this takes a few milliseconds.
    assert!(
        elapsed >= Duration::from_millis(190),
        "8 MiB at 32 MiB/s took only {elapsed:?}"
    );
}
