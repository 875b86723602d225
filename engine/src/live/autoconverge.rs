//! QEMU's auto-converge: throttle the vCPUs while the guest dirties memory faster than pre-copy
//! sends it, so that a migration that would never fit its downtime limit does.
//!
//! QEMU checks, at a dirty-bitmap sync at least a second after its last check, whether the
//! guest dirtied more than `throttle-trigger-threshold` (50%) of the bytes transferred since;
//! after two such periods it throttles the vCPUs, first by `cpu-throttle-initial` (20%), then
//! by `cpu-throttle-increment` (10%) more each time, up to `max-cpu-throttle` (99%).
//! [`AutoConverge`] applies the same rule and steps after each live round, on top of
//! [`DowntimeLimit`], which still decides when to stop and copy and when to give up. Its period
//! is the round, not QEMU's second: pagewire's rounds are often tens of milliseconds, so it
//! throttles sooner and climbs faster than QEMU would on the same guest (the README's figures
//! were measured so). Pure arithmetic, like the rest of [`super::policy`].

use super::policy::{Decision, DowntimeLimit, Policy, PolicyView};
use crate::limits::PAGE_BYTES;

/// How [`AutoConverge`] throttles; the defaults are QEMU's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Throttling {
    /// The first throttle, percent of the vCPUs' time taken away (`cpu-throttle-initial`).
    pub initial_percent: u8,
    /// How much each later step adds, percent (`cpu-throttle-increment`).
    pub increment_percent: u8,
    /// The most it throttles, percent (`max-cpu-throttle`; at most
    /// [`THROTTLE_PERCENT_MAX`](super::THROTTLE_PERCENT_MAX)).
    pub max_percent: u8,
    /// A round is a dirty one when the guest dirtied at least this percentage of the bytes the
    /// round put on the wire (`throttle-trigger-threshold`).
    pub trigger_percent: u8,
    /// Dirty rounds needed for each step, counted since the last one (QEMU: 2). As in QEMU,
    /// a round under the trigger between them does not reset the count.
    pub trigger_rounds: u32,
}

impl Default for Throttling {
    /// QEMU's: 20%, then 10% more per step, up to 99%, after two rounds that dirtied half of
    /// what they sent.
    fn default() -> Self {
        Throttling {
            initial_percent: 20,
            increment_percent: 10,
            max_percent: 99,
            trigger_percent: 50,
            trigger_rounds: 2,
        }
    }
}

/// [`DowntimeLimit`] with vCPU throttling (see the module docs). A VMM that cannot throttle
/// ([`Vmm::throttle`](super::Vmm::throttle) returned false: the next round ran unthrottled) is
/// not asked again, and the policy is then [`DowntimeLimit`] alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AutoConverge {
    /// When to stop and copy, and the caps at which to give up.
    pub limit: DowntimeLimit,
    /// How to throttle.
    pub throttling: Throttling,
    /// The throttle asked for so far.
    asked_percent: u8,
    /// Dirty rounds since the last step.
    dirty_rounds: u32,
    /// The VMM did not apply a throttle it was asked for.
    unsupported: bool,
}

impl Default for AutoConverge {
    /// QEMU's throttling over [`DowntimeLimit::default`].
    fn default() -> Self {
        AutoConverge::new(DowntimeLimit::default(), Throttling::default())
    }
}

impl AutoConverge {
    /// Auto-converge over `limit`, throttling as `throttling` says.
    pub fn new(limit: DowntimeLimit, throttling: Throttling) -> Self {
        AutoConverge {
            limit,
            throttling,
            asked_percent: 0,
            dirty_rounds: 0,
            unsupported: false,
        }
    }

    /// The throttle asked for so far, percent.
    pub fn throttle_percent(&self) -> u8 {
        self.asked_percent
    }
}

impl DowntimeLimit {
    /// This limit as a policy: alone, or under [`AutoConverge`] with QEMU's [`Throttling`] when
    /// `auto_converge` (what a VMM's `auto-converge` switch chooses between).
    pub fn policy(self, auto_converge: bool) -> Box<dyn Policy> {
        if auto_converge {
            Box::new(AutoConverge::new(self, Throttling::default()))
        } else {
            Box::new(self)
        }
    }
}

impl Policy for AutoConverge {
    fn decide(&mut self, view: &PolicyView<'_>) -> Decision {
        let decision = self.limit.decide(view);
        let t = self.throttling;
        let Some(last) = view.rounds.last() else {
            return decision;
        };
        if self.asked_percent > 0 && last.throttle_percent < self.asked_percent {
            self.unsupported = true;
        }
        if decision != Decision::NextRound || self.unsupported {
            return decision;
        }
        let dirtied_bytes = last.dirtied_pages.saturating_mul(PAGE_BYTES as u64);
        // QEMU's test (`migration_trigger_throttle`): more than the threshold, and a period
        // under it leaves the count as it was.
        let dirty = last.wire_bytes > 0
            && u128::from(dirtied_bytes) * 100
                > u128::from(last.wire_bytes) * u128::from(t.trigger_percent);
        if !dirty {
            return decision;
        }
        self.dirty_rounds += 1;
        if self.dirty_rounds < t.trigger_rounds.max(1) {
            return decision;
        }
        self.dirty_rounds = 0;
        let max = t.max_percent.min(super::THROTTLE_PERCENT_MAX);
        let next = if self.asked_percent == 0 {
            t.initial_percent
        } else {
            self.asked_percent.saturating_add(t.increment_percent)
        }
        .min(max);
        if next <= self.asked_percent {
            return decision;
        }
        self.asked_percent = next;
        Decision::Throttle(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::policy::tests::{simulate_throttled, GIB_PAGES};
    use crate::live::policy::RoundFigures;

    /// The shared simulation, from 1 GiB of memory.
    fn simulate(
        policy: &mut dyn Policy,
        bandwidth: f64,
        dirty: f64,
        working_set: u64,
        throttles: bool,
    ) -> (Decision, Vec<RoundFigures>, Vec<u8>) {
        simulate_throttled(policy, GIB_PAGES, bandwidth, dirty, working_set, throttles)
    }

    #[test]
    fn a_guest_that_outruns_the_link_converges_once_throttled_as_qemu_steps() {
        // 2 GB/s of writes over half of memory against 1 GB/s: DowntimeLimit alone gives up.
        let (d, _, _) = simulate(
            &mut DowntimeLimit::default(),
            1e9,
            2e9 / 4096.0,
            GIB_PAGES / 2,
            true,
        );
        assert!(matches!(d, Decision::GiveUp(_)), "{d:?}");
        let mut p = AutoConverge::default();
        let (d, rounds, asked) = simulate(&mut p, 1e9, 2e9 / 4096.0, GIB_PAGES / 2, true);
        assert_eq!(d, Decision::StopAndCopy, "{rounds:?}");
        // QEMU's steps: 20, then 10 more each time, every second dirty round.
        assert!(asked.len() >= 2, "{asked:?}");
        assert_eq!(asked[0], 20);
        assert!(asked.windows(2).all(|w| w[1] == w[0] + 10), "{asked:?}");
        assert_eq!(p.throttle_percent(), *asked.last().unwrap());
        assert!(rounds.len() < 30);
    }

    #[test]
    fn a_guest_the_link_outruns_is_never_throttled() {
        let mut p = AutoConverge::default();
        let (d, _, asked) = simulate(&mut p, 1e9, 1e8 / 4096.0, GIB_PAGES, true);
        assert_eq!(d, Decision::StopAndCopy);
        assert!(asked.is_empty(), "{asked:?}");
    }

    #[test]
    fn a_vmm_that_cannot_throttle_is_asked_once_and_the_caps_still_hold() {
        let mut p = AutoConverge::new(
            DowntimeLimit {
                rounds_max: 12,
                ..DowntimeLimit::default()
            },
            Throttling::default(),
        );
        let (d, rounds, asked) = simulate(&mut p, 1e9, 2e9 / 4096.0, GIB_PAGES / 2, false);
        assert_eq!(asked, vec![20]);
        assert_eq!(rounds.len(), 12);
        assert!(
            matches!(d, Decision::GiveUp(ref why) if why.contains("12 rounds")),
            "{d:?}"
        );
    }

    #[test]
    fn dirty_rounds_count_as_in_qemu_across_a_clean_one() {
        // Dirty, clean, dirty: QEMU's count reaches two at the third period and throttles (a
        // clean period does not reset it); exactly half is not over the threshold.
        let mut p = AutoConverge::default();
        let mut rounds = Vec::new();
        let mut decide = |dirtied_pages: u64| {
            rounds.push(RoundFigures {
                round: rounds.len() as u32,
                pages: 1000,
                wire_bytes: 1000 * PAGE_BYTES as u64,
                ms: 100.0,
                dirtied_pages,
                ..RoundFigures::default()
            });
            let view = PolicyView {
                rounds: &rounds,
                estimates: crate::live::policy::Estimates::after(&rounds, 1_000_000),
                elapsed_ms: 0.0,
            };
            p.decide(&view)
        };
        assert_eq!(decide(900), Decision::NextRound);
        assert_eq!(
            decide(500),
            Decision::NextRound,
            "half is not more than half"
        );
        assert_eq!(decide(900), Decision::Throttle(20));
    }

    #[test]
    fn the_throttle_stops_at_its_maximum() {
        // Nothing can catch this guest: a link of 10 MB/s against 1 GB/s of writes.
        let mut p = AutoConverge::new(
            DowntimeLimit {
                rounds_max: 20,
                ..DowntimeLimit::default()
            },
            Throttling {
                max_percent: 45,
                ..Throttling::default()
            },
        );
        let (d, _, asked) = simulate(&mut p, 1e7, 1e9 / 4096.0, GIB_PAGES / 4, true);
        assert!(matches!(d, Decision::GiveUp(_)), "{d:?}");
        assert_eq!(asked, vec![20, 30, 40, 45]);
    }
}
