//! Unit tests of the pre-copy policies and their estimates, on simulated rates.
use super::*;

/// Rounds of a simulated guest: `bandwidth` bytes/s, dirtying `dirty` distinct pages/s out
/// of a working set of `working_set` pages, starting from `memory_pages`.
fn simulate(
    policy: &mut dyn Policy,
    memory_pages: u64,
    bandwidth: f64,
    dirty: f64,
    working_set: u64,
) -> (Decision, Vec<RoundFigures>) {
    let (d, rounds, _) =
        simulate_throttled(policy, memory_pages, bandwidth, dirty, working_set, false);
    (d, rounds)
}

/// [`simulate`], where a [`Decision::Throttle`] slows the guest's writes by its percentage
/// when `throttles` (a VMM that can throttle), and the run goes on. Also returns the
/// throttles asked for.
pub(in crate::live) fn simulate_throttled(
    policy: &mut dyn Policy,
    memory_pages: u64,
    bandwidth: f64,
    dirty: f64,
    working_set: u64,
    throttles: bool,
) -> (Decision, Vec<RoundFigures>, Vec<u8>) {
    let (mut rounds, mut asked) = (Vec::new(), Vec::new());
    let (mut pages, mut elapsed, mut throttle) = (memory_pages, 0.0, 0u8);
    loop {
        let ms = pages as f64 * PAGE_BYTES as f64 / bandwidth * 1e3;
        let rate = dirty * f64::from(100 - throttle) / 100.0;
        let dirtied = ((rate * ms / 1e3) as u64).min(working_set);
        rounds.push(RoundFigures {
            round: rounds.len() as u32,
            pages,
            wire_bytes: pages * PAGE_BYTES as u64,
            ms,
            dirtied_pages: dirtied,
            throttle_percent: throttle,
            ..RoundFigures::default()
        });
        elapsed += ms;
        let view = PolicyView {
            rounds: &rounds,
            estimates: Estimates::after(&rounds, dirtied),
            elapsed_ms: elapsed,
        };
        match policy.decide(&view) {
            Decision::NextRound => {}
            Decision::Throttle(p) => {
                asked.push(p);
                if throttles {
                    throttle = p;
                }
            }
            d => return (d, rounds, asked),
        }
        pages = dirtied;
    }
}

pub(in crate::live) const GIB_PAGES: u64 = (1 << 30) / PAGE_BYTES as u64;

#[test]
fn converges_when_the_link_outruns_the_guest() {
    // 1 GiB at 1 GB/s, dirtying 100 MB/s: each round a tenth of the last.
    let (d, rounds) = simulate(
        &mut DowntimeLimit::default(),
        GIB_PAGES,
        1e9,
        1e8 / 4096.0,
        GIB_PAGES,
    );
    assert_eq!(d, Decision::StopAndCopy);
    assert!(rounds.len() <= 4, "{} rounds", rounds.len());
    let last = rounds.last().unwrap();
    let e = Estimates::after(&rounds, last.dirtied_pages);
    assert!(e.expected_downtime_ms <= 300.0);
}

#[test]
fn gives_up_at_the_round_cap_naming_the_rates() {
    // The guest dirties faster than the link: rounds never shrink below the limit.
    let mut p = DowntimeLimit {
        rounds_max: 5,
        ..DowntimeLimit::default()
    };
    let (d, rounds) = simulate(&mut p, GIB_PAGES, 1e9, 2e9 / 4096.0, GIB_PAGES / 2);
    assert_eq!(rounds.len(), 5);
    let Decision::GiveUp(why) = d else {
        panic!("{d:?}")
    };
    assert!(
        why.contains("5 rounds") && why.contains("downtime limit of 300 ms"),
        "{why}"
    );
}

#[test]
fn gives_up_at_the_time_cap() {
    let mut p = DowntimeLimit {
        total_ms_max: 2_000,
        rounds_max: 1000,
        ..DowntimeLimit::default()
    };
    let (d, rounds) = simulate(&mut p, GIB_PAGES, 1e9, 2e9 / 4096.0, GIB_PAGES / 2);
    let Decision::GiveUp(why) = d else {
        panic!("{d:?}")
    };
    assert!(why.contains("the cap is 2000 ms"), "{why}");
    let total: f64 = rounds.iter().map(|r| r.ms).sum();
    assert!(total >= 2_000.0 && total < 2_000.0 + rounds.last().unwrap().ms + 1.0);
}

#[test]
fn the_downtime_is_costed_per_page_moved_not_per_wire_byte() {
    // A round 0 of 1000 pages, half of them zero (half a round of wire bytes), in 100 ms:
    // 10 000 pages/s. 500 dirty pages then take 50 ms, not the 100 ms that 2 MB of wire at
    // 20 MB/s would suggest.
    let r = RoundFigures {
        round: 0,
        pages: 1000,
        wire_bytes: 500 * PAGE_BYTES as u64,
        ms: 100.0,
        dirtied_pages: 500,
        ..RoundFigures::default()
    };
    let e = Estimates::after(&[r], 500);
    assert!((e.pages_per_s - 10_000.0).abs() < 1e-6);
    assert!((e.expected_downtime_ms - 50.0).abs() < 1e-6, "{e:?}");
    assert!((e.bandwidth_bytes_per_s - 500.0 * PAGE_BYTES as f64 * 10.0).abs() < 1e-3);
}

fn view<'a>(rounds: &'a [RoundFigures], remaining: u64) -> PolicyView<'a> {
    PolicyView {
        rounds,
        estimates: Estimates::after(rounds, remaining),
        elapsed_ms: rounds.iter().map(|r| r.ms).sum(),
    }
}

#[test]
fn round_0_is_never_the_last_live_round_while_pages_are_dirty() {
    let r0 = RoundFigures {
        pages: 1000,
        wire_bytes: 1000 * PAGE_BYTES as u64,
        ms: 100.0,
        dirtied_pages: 10,
        ..RoundFigures::default()
    };
    let mut p = DowntimeLimit::default();
    // 10 dirty pages fit the limit many times over, but round 0 is no measure of them.
    assert_eq!(p.decide(&view(&[r0], 10)), Decision::NextRound);
    // Nothing dirty: nothing to measure, stop.
    assert_eq!(p.decide(&view(&[r0], 0)), Decision::StopAndCopy);
    // After a round of dirty pages it stops.
    let r1 = RoundFigures {
        round: 1,
        pages: 10,
        ms: 1.0,
        ..r0
    };
    assert_eq!(p.decide(&view(&[r0, r1], 2)), Decision::StopAndCopy);
    // A cap of one round wins over the extra round.
    let mut one = DowntimeLimit {
        rounds_max: 1,
        ..DowntimeLimit::default()
    };
    assert_eq!(one.decide(&view(&[r0], 10)), Decision::StopAndCopy);
}

#[test]
fn the_tail_of_a_round_is_paid_once_not_per_page() {
    // 1000 pages in 12 ms, 2 of them the tail: 100 pages/ms while streaming. 500 pages
    // then take 5 ms plus the 2 ms tail, not 6 ms at the round's average rate.
    let r = RoundFigures {
        round: 1,
        pages: 1000,
        wire_bytes: 1000 * PAGE_BYTES as u64,
        ms: 12.0,
        tail_ms: 2.0,
        ..RoundFigures::default()
    };
    let e = Estimates::after(&[r], 500);
    assert!((e.expected_downtime_ms - 7.0).abs() < 1e-9, "{e:?}");
    // A tail longer than the round (clock trouble) is cut to the round.
    let odd = RoundFigures { tail_ms: 50.0, ..r };
    assert!(Estimates::after(&[odd], 500)
        .expected_downtime_ms
        .is_finite());
}

#[test]
fn the_tail_added_is_the_median_seen_and_the_rate_is_the_last_rounds() {
    // Round 0 drained in 0.5 ms; round 1 waited 4 ms (a busy host) after 10 ms of pages.
    let r0 = RoundFigures {
        round: 0,
        pages: 10_000,
        ms: 100.0,
        tail_ms: 0.5,
        ..RoundFigures::default()
    };
    let r1 = RoundFigures {
        round: 1,
        pages: 1000,
        ms: 14.0,
        tail_ms: 4.0,
        ..RoundFigures::default()
    };
    // 100 pages/ms streaming in round 1: 500 pages take 5 ms, plus the median of 0.5 and
    // 4 ms.
    let e = Estimates::after(&[r0, r1], 500);
    assert!((e.expected_downtime_ms - 7.25).abs() < 1e-9, "{e:?}");
    // With round 1 alone its own tail is the median.
    let e = Estimates::after(&[r1], 500);
    assert!((e.expected_downtime_ms - 9.0).abs() < 1e-9, "{e:?}");
    // Three rounds: the middle tail (4 ms), neither the shortest (0.5) nor the last (8).
    let r2 = RoundFigures {
        round: 2,
        tail_ms: 8.0,
        ms: 18.0,
        ..r1
    };
    let e = Estimates::after(&[r0, r1, r2], 500);
    assert!((e.expected_downtime_ms - 9.0).abs() < 1e-9, "{e:?}");
    // A tail that is not a number (a VMM's own figures) is left out.
    let odd = RoundFigures {
        tail_ms: f64::NAN,
        ..r2
    };
    let e = Estimates::after(&[r0, odd], 500);
    assert!(e.expected_downtime_ms.is_finite(), "{e:?}");
    // No rounds: finite, not a panic.
    assert!(Estimates::after(&[], 500).expected_downtime_ms.is_finite());
}

/// A last round small enough for the socket buffers was handed to the kernel almost at once
/// (0.5 ms of its 20, the rest its tail); a remainder fifty times its size cannot move at
/// that speed behind a link that carried round 0 at 30 pages per ms.
#[test]
fn a_remainder_larger_than_the_last_round_is_costed_at_no_more_than_a_delivered_rate() {
    let r0 = RoundFigures {
        round: 0,
        pages: 262_144,
        ms: 8600.0,
        tail_ms: 30.0,
        ..RoundFigures::default()
    };
    let r1 = RoundFigures {
        round: 1,
        pages: 500,
        ms: 20.0,
        tail_ms: 19.5,
        ..RoundFigures::default()
    };
    let e = Estimates::after(&[r0, r1], 25_000);
    // 25000 pages at round 0's 30.5 pages per ms: 820 ms, plus the median tail.
    let want = 25_000.0 / (262_144.0 / 8600.0) + 24.75;
    assert!(
        (e.expected_downtime_ms - want).abs() < 1e-6,
        "{e:?}, want {want}"
    );
    // A remainder the last round's size or less keeps its streaming rate.
    let e = Estimates::after(&[r0, r1], 500);
    assert!(
        (e.expected_downtime_ms - (0.5 + 24.75)).abs() < 1e-9,
        "{e:?}"
    );
}

fn loaded(guest: f64, busy: f64, cpus: u32, threads: u32) -> RoundFigures {
    RoundFigures {
        guest_cpus: Some(guest),
        host_busy_cpus: Some(busy),
        host_cpus: cpus,
        engine_threads: threads,
        ..RoundFigures::default()
    }
}

#[test]
fn a_saturated_host_gets_the_guest_cpu_back_when_paused() {
    // Two CPUs all busy, the guest held 0.5 of them: the engine's threads (two shards)
    // had 1.5 and get 2 when paused.
    let s = loaded(0.5, 2.0, 2, 2).paused_speedup();
    assert!((s - 2.0 / 1.5).abs() < 1e-9, "{s}");
    // Idle time under a quarter of the CPUs is a stalled pipeline, not spare room: the
    // guest's 0.5 comes back in full (1.3 -> 1.8), not only its 0.3 beyond the idle 0.2.
    let s = loaded(0.5, 1.8, 2, 2).paused_speedup();
    assert!((s - 1.8 / 1.3).abs() < 1e-9, "{s}");
    // The engine cannot use more CPUs than it has threads: one shard had 0.8.
    let s = loaded(1.2, 2.0, 2, 1).paused_speedup();
    assert!((s - 1.0 / 0.8).abs() < 1e-9, "{s}");
    // Nor gain more than the guest gives back.
    let s = loaded(0.1, 2.0, 2, 4).paused_speedup();
    assert!((s - 2.0 / 1.9).abs() < 1e-9, "{s}");
    // The cap.
    assert_eq!(loaded(1.9, 2.0, 2, 2).paused_speedup(), PAUSED_SPEEDUP_MAX);
}

#[test]
fn a_host_with_cpus_to_spare_gains_nothing_from_the_pause() {
    // 16 CPUs, 3 busy (one of them the guest): the engine could have had more already.
    assert_eq!(loaded(1.0, 3.0, 16, 2).paused_speedup(), 1.0);
    // Unknown figures change nothing.
    assert_eq!(RoundFigures::default().paused_speedup(), 1.0);
    let no_guest = RoundFigures {
        guest_cpus: None,
        ..loaded(1.0, 2.0, 2, 2)
    };
    assert_eq!(no_guest.paused_speedup(), 1.0);
    assert_eq!(loaded(f64::NAN, 2.0, 2, 2).paused_speedup(), 1.0);
}

#[test]
fn the_expected_downtime_counts_on_the_speedup() {
    let r = RoundFigures {
        round: 1,
        pages: 1000,
        ms: 10.0,
        ..loaded(0.5, 2.0, 2, 2)
    };
    let e = Estimates::after(&[r], 1000);
    assert!((e.paused_speedup - 2.0 / 1.5).abs() < 1e-9);
    assert!((e.expected_downtime_ms - 7.5).abs() < 1e-9, "{e:?}");
}

#[test]
fn a_small_working_set_converges_even_at_a_high_dirty_rate() {
    // 4 GB/s of writes into a 16 MiB working set: at most 16 MiB dirty per round.
    let (d, _) = simulate(
        &mut DowntimeLimit::default(),
        GIB_PAGES,
        1e9,
        4e9 / 4096.0,
        4096,
    );
    assert_eq!(d, Decision::StopAndCopy);
}

#[test]
fn the_dirty_rate_counts_the_time_between_the_collects() {
    // A 1 ms round whose collects were 10 ms apart: the pages were written over 10 ms.
    let r = RoundFigures {
        ms: 1.0,
        dirtied_pages: 1000,
        dirty_window_ms: 10.0,
        ..RoundFigures::default()
    };
    assert!((r.dirty_pages_per_s() - 100_000.0).abs() < 1e-6);
    // Not measured (the paused round): the round's own time.
    let r = RoundFigures {
        dirty_window_ms: 0.0,
        ..r
    };
    assert!((r.dirty_pages_per_s() - 1_000_000.0).abs() < 1e-6);
}
