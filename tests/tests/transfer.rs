//! End-to-end transfers over loopback io_uring: destination must equal source.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use pagewire::synth::Content;
use pagewire::{Pinning, RegionSpec, SenderConfig, ZeroCopy};
use pagewire_tests::{migrate_once, skip_without_uring};

const PAGE: u64 = 4096;

fn config(channels: u16, zero_copy: ZeroCopy) -> SenderConfig {
    SenderConfig {
        channels,
        pinning: Pinning::None,
        zero_copy,
        ..SenderConfig::default()
    }
}

/// Several regions whose sizes do not divide into 128-page chunks, at PC-like addresses.
fn odd_layout() -> Vec<RegionSpec> {
    vec![
        RegionSpec {
            gpa: 0,
            len: 640 * 1024,
        },
        RegionSpec {
            gpa: 1 << 20,
            len: 1000 * PAGE + 129 * PAGE,
        },
        RegionSpec {
            gpa: 1 << 30,
            len: PAGE,
        },
        RegionSpec {
            gpa: 4 << 30,
            len: 2049 * PAGE,
        },
    ]
}

#[test]
fn every_channel_count_and_content_arrives_intact() {
    if skip_without_uring() {
        return;
    }
    for channels in [1, 2, 4] {
        for content in [
            Content::Zero,
            Content::Random,
            Content::Mixed,
            Content::Blend,
        ] {
            let (src, dst, sent, received) =
                migrate_once(&odd_layout(), content, &config(channels, ZeroCopy::Auto));
            assert_eq!(
                src.first_difference(&dst),
                None,
                "{channels} channels, {content:?}: destination differs"
            );
            let pages = src.total_pages();
            assert_eq!(sent.normal_pages + sent.zero_pages, pages);
            assert_eq!(received.normal_pages + received.zero_pages, pages);
            assert_eq!(sent.normal_pages, received.normal_pages);
            assert_eq!(sent.transferred_bytes, received.transferred_bytes);
            assert_eq!(sent.channels, channels);
            // No live round came first, so no wait polled as in a migration's downtime.
            assert!(received.shards.iter().all(|c| !c.downtime_began));
            match content {
                Content::Zero => assert_eq!(sent.normal_pages, 0),
                Content::Random => assert_eq!(sent.zero_pages, 0),
                _ => assert!(sent.zero_pages > 0 && sent.normal_pages > 0),
            }
            // Zero pages cost a header entry, not 4 KiB.
            assert!(sent.transferred_bytes < sent.normal_bytes + pages * 64);
        }
    }
}

#[test]
fn plain_and_forced_zero_copy_sends_arrive_intact() {
    if skip_without_uring() {
        return;
    }
    let specs = [RegionSpec {
        gpa: 0,
        len: 8 << 20,
    }];
    let (src, dst, sent, _) = migrate_once(&specs, Content::Mixed, &config(2, ZeroCopy::Off));
    assert_eq!(src.first_difference(&dst), None);
    assert_eq!(sent.zero_copy.completed, 0, "zero-copy off sent zero-copy");

    let caps = pagewire::probe_uring().expect("probed above");
    if !caps.send_zc {
        eprintln!("SKIPPED (zero-copy half): the kernel lacks IORING_OP_SEND_ZC");
        return;
    }
    let (src, dst, sent, _) = migrate_once(&specs, Content::Mixed, &config(2, ZeroCopy::On));
    assert_eq!(src.first_difference(&dst), None);
    assert!(
        sent.zero_copy.completed > 0,
        "zero-copy on never sent zero-copy"
    );
    assert_eq!(
        sent.zero_copy.fallbacks, 0,
        "zero-copy on must not fall back"
    );
    assert!(sent.shards.iter().all(|s| s.fixed_buffers));
}

#[test]
fn loopback_zero_copy_is_detected_as_copied_and_falls_back() {
    if skip_without_uring() {
        return;
    }
    if !pagewire::probe_uring().expect("probed").send_zc {
        eprintln!("SKIPPED: the kernel lacks IORING_OP_SEND_ZC");
        return;
    }
    let specs = [RegionSpec {
        gpa: 0,
        len: 32 << 20,
    }];
    let (src, dst, sent, _) = migrate_once(&specs, Content::Random, &config(2, ZeroCopy::Auto));
    assert_eq!(src.first_difference(&dst), None);
    // On loopback the kernel copies every zero-copy send; each shard must notice and switch.
    assert!(sent.zero_copy.completed >= 32);
    assert_eq!(sent.zero_copy.copied, sent.zero_copy.completed);
    assert_eq!(sent.zero_copy.fallbacks, 2);
}

#[test]
fn forced_zero_copy_survives_the_most_fragmented_memory() {
    if skip_without_uring() {
        return;
    }
    if !pagewire::probe_uring().expect("probed").send_zc {
        eprintln!("SKIPPED: the kernel lacks IORING_OP_SEND_ZC");
        return;
    }
    // Every other page zero: 64 normal runs per 128-page frame, one zero-copy op per run. Every
    // op holds its slot until its notification, so the op table and slots stay bounded.
    let specs = [RegionSpec {
        gpa: 0,
        len: 32 << 20,
    }];
    let src = std::sync::Arc::new(pagewire::GuestMemory::anonymous(&specs).unwrap());
    let region = &src.regions()[0];
    for page in (1..region.pages()).step_by(2) {
        region.write(page * PAGE, &[0xa5; 4096]);
    }
    let dst = std::sync::Arc::new(pagewire::GuestMemory::anonymous(&specs).unwrap());
    let (addr, rx) =
        pagewire_tests::start_receiver(dst.clone(), pagewire::ReceiverConfig::default());
    let mut sender =
        pagewire::Sender::connect(addr, src.clone(), &config(2, ZeroCopy::On)).unwrap();
    sender.send_all().unwrap();
    let sent = sender.finish().unwrap();
    pagewire_tests::join_within(rx, std::time::Duration::from_secs(60), "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
    assert_eq!(sent.zero_pages, region.pages() / 2);
    assert!(sent.zero_copy.completed >= region.pages() / 2);
}

#[test]
fn page_faults_are_counted_on_a_destination_not_faulted_in() {
    if skip_without_uring() {
        return;
    }
    use pagewire::{GuestMemory, ReceiverConfig, Sender};
    use std::sync::Arc;
    let spec = [RegionSpec {
        gpa: 0,
        len: 64 << 20,
    }];
    let src = Arc::new(GuestMemory::anonymous(&spec).unwrap());
    pagewire::synth::fill(&src, Content::Random, 7);
    let mut faults = Vec::new();
    for prefault_first in [false, true] {
        let dst = Arc::new(GuestMemory::anonymous(&spec).unwrap());
        if prefault_first {
            let go = std::sync::atomic::AtomicBool::new(false);
            if !dst.prefault_in_parallel(2, &go).unwrap() {
                eprintln!("SKIPPED (the pre-faulted half): MADV_POPULATE_WRITE is not supported");
                break;
            }
        }
        let (addr, rx) = pagewire_tests::start_receiver(
            dst.clone(),
            ReceiverConfig {
                prefault: false,
                ..ReceiverConfig::default()
            },
        );
        let mut s = Sender::connect(addr, src.clone(), &config(2, ZeroCopy::Off)).unwrap();
        s.send_all().unwrap();
        let sent = s.finish().unwrap();
        let received =
            pagewire_tests::join_within(rx, std::time::Duration::from_secs(60), "receiver")
                .unwrap();
        assert_eq!(src.first_difference(&dst), None);
        // The shard sums are what the totals say.
        let sum: u64 = received.shards.iter().map(|s| s.faults_minor).sum();
        assert_eq!(sum, received.page_faults_minor);
        assert_eq!(sent.page_faults_major + received.page_faults_major, 0);
        faults.push(received.page_faults_minor);
    }
    // Fresh memory faults on first touch (one fault per 4 KiB page, or per 2 MiB with THP);
    // memory faulted in before takes none of those.
    assert!(faults[0] >= 32, "{faults:?}");
    if let Some(&after) = faults.get(1) {
        assert!(after < faults[0] / 4, "{faults:?}");
    }
}

/// The channels take the congestion control asked for, and say which they used; without one,
/// the host's default. A name the kernel does not offer is refused before anything connects.
#[test]
fn the_congestion_control_asked_for_is_used_and_reported() {
    if skip_without_uring() {
        return;
    }
    let Some((default, offered)) = pagewire::sys::host_congestion() else {
        eprintln!("SKIPPED: /proc does not list TCP congestion control algorithms");
        return;
    };
    // Reno is part of the TCP core: every kernel has it.
    assert!(offered.iter().any(|a| a == "reno"), "{offered:?}");
    let layout = [RegionSpec {
        gpa: 0,
        len: 4 << 20,
    }];
    for (asked, want) in [(Some("reno"), "reno"), (None, default.as_str())] {
        let c = SenderConfig {
            congestion: asked.map(str::to_string),
            ..config(2, ZeroCopy::Auto)
        };
        let (src, dst, sent, _) = migrate_once(&layout, Content::Random, &c);
        assert_eq!(src.first_difference(&dst), None);
        assert_eq!(
            sent.congestion.as_deref(),
            Some(want),
            "asked for {asked:?}"
        );
    }
    // Refused by validation: nothing listens on port 1, so a connect would fail otherwise.
    let memory = std::sync::Arc::new(pagewire::GuestMemory::anonymous(&layout).unwrap());
    let c = SenderConfig {
        congestion: Some("no_such_cc".into()),
        ..config(1, ZeroCopy::Auto)
    };
    let err = pagewire::Sender::connect("127.0.0.1:1", memory, &c).unwrap_err();
    assert!(
        matches!(err, pagewire::Error::Config(_)) && err.to_string().contains("no_such_cc"),
        "{err}"
    );
}

/// Fresh destination memory skips the stores of zero pages, but only once: a second transfer
/// into the same memory (a `pagewire-tune serve` destination, a retry), or memory written
/// before the transfer, must get every zero page written.
#[test]
fn zero_pages_are_stored_into_memory_written_before() {
    if skip_without_uring() {
        return;
    }
    use pagewire::{GuestMemory, ReceiverConfig};
    use pagewire_tests::{join_within, send_all_to, start_receiver};
    use std::sync::Arc;
    use std::time::Duration;
    let spec = [RegionSpec {
        gpa: 0,
        len: 1 << 20,
    }];
    let into = |dst: &Arc<GuestMemory>, src: &Arc<GuestMemory>| {
        let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
        send_all_to(addr, src.clone(), &config(2, ZeroCopy::Auto)).unwrap();
        join_within(rx, Duration::from_secs(60), "receiver").unwrap();
    };
    let zeros = Arc::new(GuestMemory::anonymous(&spec).unwrap());
    let random = Arc::new(GuestMemory::anonymous(&spec).unwrap());
    pagewire::synth::fill(&random, Content::Random, 3);
    // Two transfers into one destination: random pages, then zero pages.
    let dst = Arc::new(GuestMemory::anonymous(&spec).unwrap());
    assert!(dst.regions()[0].initially_zero());
    into(&dst, &random);
    assert_eq!(random.first_difference(&dst), None);
    assert!(!dst.regions()[0].initially_zero());
    into(&dst, &zeros);
    assert_eq!(zeros.first_difference(&dst), None, "second transfer");
    // Memory the caller wrote before its first transfer.
    let dst = Arc::new(GuestMemory::anonymous(&spec).unwrap());
    dst.regions()[0].write(5 * PAGE, &[0xA5; PAGE as usize]);
    assert!(!dst.regions()[0].initially_zero());
    into(&dst, &zeros);
    assert_eq!(zeros.first_difference(&dst), None, "written before");
}

#[test]
fn a_default_receiver_spreads_its_shards_over_their_node_while_a_sender_pins_them() {
    if skip_without_uring() {
        return;
    }
    let specs = [RegionSpec {
        gpa: 0,
        len: 8 << 20,
    }];
    let sender = SenderConfig {
        channels: 2,
        ..SenderConfig::default()
    };
    let (src, dst, sent, received) = migrate_once(&specs, Content::Random, &sender);
    assert_eq!(src.first_difference(&dst), None);
    // The receiver's default, `Pinning::Nodes`: no shard held to one core, each placed on the
    // node the plan gave it (every topology has at least one, assumed where none is known).
    assert!(
        received.shards.iter().all(|s| s.core.is_none()),
        "{:?}",
        received.shards
    );
    assert!(
        received.shards.iter().all(|s| s.node.is_some()),
        "{:?}",
        received.shards
    );
    // The sender's default, `Pinning::Cores`: one core each.
    assert!(
        sent.shards.iter().all(|s| s.core.is_some()),
        "{:?}",
        sent.shards
    );
}
