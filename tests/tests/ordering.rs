//! Cross-channel ordering: pages re-sent in later rounds over other channels must never be
//! overwritten by their older copies, whatever the timing. The receiver delays each frame by a
//! seeded random amount so channels drift apart; only the round barrier keeps them in order.
//! And how a round's chunks are shared among channels of different speeds.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use pagewire::synth::{fill, Content};
use pagewire::{GuestMemory, PageRun, Pinning, ReceiverConfig, RegionSpec, Sender, SenderConfig};
use pagewire_tests::{join_within, skip_without_uring, start_receiver, tampering_proxy, Tamper};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Two regions of `first` and `second` bytes, the second at 4 GiB.
fn two_regions(first: u64, second: u64) -> [RegionSpec; 2] {
    [
        RegionSpec { gpa: 0, len: first },
        RegionSpec {
            gpa: 1 << 32,
            len: second,
        },
    ]
}

/// Rewrites about one page in `one_in` of every region of `memory` with random bytes, the
/// first one `round`, as a running guest would; returns the pages rewritten, as runs.
fn rewrite_pages(memory: &GuestMemory, rng: &mut StdRng, one_in: u32, round: u8) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for (ri, region) in memory.regions().iter().enumerate() {
        for page in 0..region.pages() {
            if rng.gen_range(0..one_in) != 0 {
                continue;
            }
            let mut bytes = [0u8; 4096];
            rng.fill(&mut bytes[..]);
            bytes[0] = round;
            region.write(page * 4096, &bytes);
            match runs.last_mut() {
                Some(r) if r.region == ri as u32 && r.first_page + r.pages == page => r.pages += 1,
                _ => runs.push(PageRun {
                    region: ri as u32,
                    first_page: page,
                    pages: 1,
                }),
            }
        }
    }
    runs
}

#[test]
fn later_rounds_win_across_channels_under_random_timing() {
    if skip_without_uring() {
        return;
    }
    let specs = two_regions(2 << 20, 1 << 20);
    for seed in [1u64, 2, 3] {
        eprintln!("ordering test seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let src = Arc::new(GuestMemory::anonymous(&specs).unwrap());
        fill(&src, Content::Random, seed);
        let dst = Arc::new(GuestMemory::anonymous(&specs).unwrap());
        let config = ReceiverConfig {
            pinning: Pinning::None,
            fault_frame_delay_max_us: 1500,
            fault_seed: seed,
            ..ReceiverConfig::default()
        };
        let (addr, rx) = start_receiver(dst.clone(), config);
        let sender_config = SenderConfig {
            channels: 4,
            pinning: Pinning::None,
            ..SenderConfig::default()
        };
        let mut sender = Sender::connect(addr, src.clone(), &sender_config).unwrap();
        // Every round is live: the test rewrites pages right after each round returns, while
        // zero-copy sends may still read them, exactly as running vCPUs would.
        sender.send_live_round(&PageRun::whole(&src)).unwrap();
        for round in 1..=5u8 {
            // Dirty a random set of pages (one page in three), then resend exactly those.
            let runs = rewrite_pages(&src, &mut rng, 3, round);
            let stats = sender.send_live_round(&runs).unwrap();
            assert_eq!(stats.round, u32::from(round));
        }
        let sent = sender.finish();
        let received = join_within(rx, Duration::from_secs(60), "receiver");
        let (sent, received) = match (sent, received) {
            (Ok(s), Ok(r)) => (s, r),
            (s, r) => panic!("seed {seed}: sender {s:?}, receiver {r:?}"),
        };
        assert_eq!(sent.rounds, 6);
        eprintln!("seed {seed}: {} torn pages resent", received.torn_pages);
        assert_eq!(
            src.first_difference(&dst),
            None,
            "seed {seed}: an older copy overwrote a newer one"
        );
    }
}

#[test]
fn overlapping_or_unsorted_runs_in_one_round_are_refused() {
    if skip_without_uring() {
        return;
    }
    let specs = [RegionSpec {
        gpa: 0,
        len: 1 << 20,
    }];
    let dst = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let (addr, rx) = start_receiver(dst, ReceiverConfig::default());
    let src = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let mut sender = Sender::connect(addr, src, &SenderConfig::default()).unwrap();
    let overlapping = [
        PageRun {
            region: 0,
            first_page: 0,
            pages: 10,
        },
        PageRun {
            region: 0,
            first_page: 5,
            pages: 10,
        },
    ];
    let refused = |sender: &mut Sender, runs: &[PageRun], why: &str| {
        let err = sender.send_round(runs).unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    };
    refused(&mut sender, &overlapping, "sorted and disjoint");
    let unsorted = [
        PageRun {
            region: 0,
            first_page: 5,
            pages: 1,
        },
        PageRun {
            region: 0,
            first_page: 0,
            pages: 1,
        },
    ];
    refused(&mut sender, &unsorted, "sorted and disjoint");
    let outside = [PageRun {
        region: 0,
        first_page: 250,
        pages: 10,
    }];
    refused(&mut sender, &outside, "outside region 0");
    let wrong_region = [PageRun {
        region: 1,
        first_page: 0,
        pages: 1,
    }];
    refused(&mut sender, &wrong_region, "names region 1");
    sender.send_all().unwrap();
    sender.finish().unwrap();
    join_within(rx, Duration::from_secs(30), "receiver").unwrap();
}

/// A round's chunks go to whichever channel has room, not dealt out in turn: with one channel
/// behind a slow path (16 MB/s) and one direct, the slow one carries only what it took before
/// its buffers filled, and the round does not wait for it to work through half of it.
#[test]
fn a_slow_channel_carries_less_of_a_round() {
    if skip_without_uring() {
        return;
    }
    const SLOW_BYTES_PER_S: u64 = 16_000_000;
    // 256 chunks of 128 pages: more than the queues hold, random so nothing is a zero page.
    let len: u64 = 128 << 20;
    let specs = [RegionSpec { gpa: 0, len }];
    let src = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    fill(&src, Content::Random, 7);
    let dst = Arc::new(GuestMemory::anonymous(&specs).unwrap());
    let (addr, rx) = start_receiver(
        dst.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    );
    let slow = tampering_proxy(addr, Tamper::Slow(SLOW_BYTES_PER_S));
    let streams = vec![
        TcpStream::connect(addr).unwrap(),
        TcpStream::connect(slow).unwrap(),
    ];
    let config = SenderConfig {
        pinning: Pinning::None,
        ..SenderConfig::default()
    };
    let memory = src.clone();
    let tx = std::thread::spawn(move || {
        let mut s = Sender::over_streams(streams, memory, &config)?;
        s.send_all()?;
        s.finish()
    });
    let sent = join_within(tx, Duration::from_secs(60), "sender").unwrap();
    join_within(rx, Duration::from_secs(60), "receiver").unwrap();
    assert!(src.first_difference(&dst).is_none());
    let pages = |c: u16| {
        let s = sent.shards.iter().find(|s| s.channel == c).unwrap();
        s.normal_pages + s.zero_pages
    };
    let (fast, slow) = (pages(0), pages(1));
    assert_eq!(fast + slow, len / 4096);
    let share = slow as f64 / (fast + slow) as f64;
    eprintln!(
        "pages: direct channel {fast}, slow channel {slow} ({:.0}%)",
        share * 100.0
    );
    // Dealt in turn, the slow channel took its full queue (64 chunks) and more: over 30%.
    assert!(
        share < 0.2,
        "the slow channel carried {:.0}% of the round",
        share * 100.0
    );
}

/// Migrates `src` (a region per synthetic node, `SenderConfig::fault_nodes` 2) over four
/// channels, node 1's two behind slow paths: round 0 whole, then `live_rounds` rounds that
/// rewrite one page in eight of every region first. Returns the pages each region sent and
/// the pages each channel carried, after checking that the destination equals the source.
fn migrate_on_two_nodes(specs: &[RegionSpec], live_rounds: u8) -> (Vec<u64>, Vec<u64>) {
    const SLOW_BYTES_PER_S: u64 = 64_000_000;
    let src = Arc::new(GuestMemory::anonymous(specs).unwrap());
    fill(&src, Content::Random, 11);
    let dst = Arc::new(GuestMemory::anonymous(specs).unwrap());
    let (addr, rx) = start_receiver(
        dst.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    );
    let streams = vec![
        TcpStream::connect(addr).unwrap(),
        TcpStream::connect(addr).unwrap(),
        TcpStream::connect(tampering_proxy(addr, Tamper::Slow(SLOW_BYTES_PER_S))).unwrap(),
        TcpStream::connect(tampering_proxy(addr, Tamper::Slow(SLOW_BYTES_PER_S))).unwrap(),
    ];
    let config = SenderConfig {
        pinning: Pinning::None,
        fault_nodes: 2,
        ..SenderConfig::default()
    };
    let memory = src.clone();
    let tx = std::thread::spawn(move || {
        let mut s = Sender::over_streams(streams, memory.clone(), &config)?;
        let nodes: Vec<Option<u32>> = s.plan().shards.iter().map(|p| p.node).collect();
        assert_eq!(nodes, [Some(0), Some(0), Some(1), Some(1)]);
        let mut sent: Vec<u64> = memory.regions().iter().map(|r| r.pages()).collect();
        s.send_live_round(&PageRun::whole(&memory))?;
        let mut rng = StdRng::seed_from_u64(11);
        for round in 1..=live_rounds {
            let runs = rewrite_pages(&memory, &mut rng, 8, round);
            for run in &runs {
                sent[run.region as usize] += run.pages;
            }
            s.send_live_round(&runs)?;
        }
        s.finish().map(|stats| (sent, stats))
    });
    let (sent, stats) = join_within(tx, Duration::from_secs(60), "sender").unwrap();
    join_within(rx, Duration::from_secs(60), "receiver").unwrap();
    assert_eq!(stats.rounds, 1 + u32::from(live_rounds));
    assert_eq!(src.first_difference(&dst), None, "an older copy won");
    let carried = (0..4u16)
        .map(|c| {
            let s = stats.shards.iter().find(|s| s.channel == c).unwrap();
            s.normal_pages + s.zero_pages
        })
        .collect();
    (sent, carried)
}

/// On a host with more than one NUMA node the shards of a node pull from their node's own
/// pool, and a chunk goes to the pool of the node that holds its pages: with room in every
/// pool, node 0's channels carry exactly node 0's pages, however much faster they are. Run
/// on two synthetic nodes; rounds interleave with rewrites of both nodes' memory.
#[test]
fn chunks_go_to_the_pool_of_their_node() {
    if skip_without_uring() {
        return;
    }
    // 8 and 24 chunks: far less than a pool's queue holds, and unequal, so that chunks dealt
    // to the pools in turn would not add up to each node's pages by chance.
    let specs = two_regions(4 << 20, 12 << 20);
    let (sent, carried) = migrate_on_two_nodes(&specs, 3);
    eprintln!("pages sent per region {sent:?}, carried per channel {carried:?}");
    assert_eq!(carried[0] + carried[1], sent[0], "node 0's channels");
    assert_eq!(carried[2] + carried[3], sent[1], "node 1's channels");
}

/// A node's pool whose queue is full spills into the other pools, so a slow node does not
/// hold up queueing the rest of the round, and the round still ends in order on every
/// channel. Node 1's region, 384 chunks behind slow paths, is three times what its pool
/// holds: node 0's channels carry part of it.
#[test]
fn a_full_node_pool_spills_into_the_others() {
    if skip_without_uring() {
        return;
    }
    let specs = two_regions(2 << 20, 192 << 20);
    let (sent, carried) = migrate_on_two_nodes(&specs, 1);
    eprintln!("pages sent per region {sent:?}, carried per channel {carried:?}");
    assert!(
        carried[0] + carried[1] > sent[0],
        "nothing of node 1's spilled to node 0's channels"
    );
    assert!(
        carried[2] + carried[3] > 0,
        "node 1's channels carried nothing"
    );
}
