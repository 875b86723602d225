//! When to stop pre-copying: estimators from measured figures, and the replaceable policy that
//! reads them.
//!
//! After every live round the session measures what the round took (wire bytes, time) and
//! what the guest dirtied meanwhile, and asks its [`Policy`] for a [`Decision`]. The default,
//! [`DowntimeLimit`], stops when the dirty pages would go out within the downtime limit at the
//! bandwidth just measured, and gives up at a round cap or a time cap with a clear reason. A
//! VMM supplies its own policy to do more (throttle vCPUs between rounds, as QEMU's
//! auto-converge does, then keep going).
//!
//! Pure arithmetic: no clock, no I/O, so policies are unit-tested on simulated rates.

use crate::limits::PAGE_BYTES;

/// What one pre-copy round measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RoundFigures {
    /// Round number (0 sends all memory).
    pub round: u32,
    /// Pages the round sent.
    pub pages: u64,
    /// Bytes the round put on the wire (zero pages cost a header entry, not a page).
    pub wire_bytes: u64,
    /// Milliseconds from the round's start until the receiver had placed all of it (the last
    /// round: until the kernel had taken it; its end is the migration's).
    pub ms: f64,
    /// Pages the guest dirtied while the round was sent (what the next round must carry).
    pub dirtied_pages: u64,
}

impl RoundFigures {
    /// Wire bytes per second this round achieved.
    pub fn bandwidth_bytes_per_s(&self) -> f64 {
        self.wire_bytes as f64 / (self.ms / 1e3).max(1e-6)
    }

    /// Pages per second the guest dirtied during this round (distinct pages: a working set
    /// written over and over counts once).
    pub fn dirty_pages_per_s(&self) -> f64 {
        self.dirtied_pages as f64 / (self.ms / 1e3).max(1e-6)
    }
}

/// The estimators a policy decides on, from the rounds so far.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimates {
    /// Wire bandwidth of the last round, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// Pages per second the last round moved, zero pages included.
    pub pages_per_s: f64,
    /// Dirty rate during the last round, pages per second.
    pub dirty_pages_per_s: f64,
    /// Pages dirty now (the next round's size).
    pub remaining_pages: u64,
    /// Milliseconds the remaining pages would take at the last round's page rate: the downtime
    /// if the guest stopped now.
    pub expected_downtime_ms: f64,
}

impl Estimates {
    /// Estimates after `last` left `remaining_pages` dirty.
    ///
    /// The downtime is costed per page, at the last round's page rate, not per wire byte: both
    /// sides visit every page whether or not it goes on the wire (the sender scans it, the
    /// receiver checks or writes it), and on the machines measured a zero page cost the engine
    /// about what a normal one did (`pagewire-bench transfer`: 64 MiB of zero pages at 3.5
    /// GiB/s, 1 GiB of mixed pages at 4.5 GiB/s). Costed per wire byte, a round 0 that is half
    /// zero pages looked half as fast as it was, and the paused round came in at about half the
    /// expected downtime (`pagewire-bench live --with-qemu` grid, 32 runs: 9 within 25% per
    /// wire byte, always high; 20 per page, 21 of them low, by up to 37%, since zero pages are
    /// cheaper than normal ones after all). On a link far slower than memory a mostly-zero
    /// round 0 would make this estimate lower still; later rounds, of dirtied pages, are
    /// costed as what they are.
    pub fn after(last: &RoundFigures, remaining_pages: u64) -> Estimates {
        let seconds = (last.ms / 1e3).max(1e-6);
        let pages_per_s = (last.pages as f64 / seconds).max(1.0);
        Estimates {
            bandwidth_bytes_per_s: last.bandwidth_bytes_per_s(),
            pages_per_s,
            dirty_pages_per_s: last.dirty_pages_per_s(),
            remaining_pages,
            expected_downtime_ms: remaining_pages as f64 / pages_per_s * 1e3,
        }
    }
}

/// What a policy sees after each live round.
#[derive(Debug, Clone, Copy)]
pub struct PolicyView<'a> {
    /// Every round so far, the last one just finished.
    pub rounds: &'a [RoundFigures],
    /// Estimates after the last round.
    pub estimates: Estimates,
    /// Milliseconds since the migration started.
    pub elapsed_ms: f64,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send the dirty pages in another live round.
    NextRound,
    /// Pause the vCPUs and send the rest: the downtime fits.
    StopAndCopy,
    /// Stop trying: the migration fails with this reason (the guest keeps running here).
    GiveUp(String),
}

/// Decides after each live round (see the module docs). `Send`, so a session may run on any
/// thread.
pub trait Policy: Send {
    /// The decision after the last round of `view`.
    fn decide(&mut self, view: &PolicyView<'_>) -> Decision;
}

/// The default policy: stop and copy once the expected downtime fits `downtime_limit_ms`; give
/// up after `rounds_max` live rounds or `total_ms_max` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DowntimeLimit {
    /// The longest pause the guest may see, in milliseconds (QEMU's `downtime-limit`).
    pub downtime_limit_ms: u64,
    /// Live rounds at most (round 0 included) before giving up.
    pub rounds_max: u32,
    /// Milliseconds of pre-copy at most before giving up.
    pub total_ms_max: u64,
}

impl Default for DowntimeLimit {
    /// QEMU's default downtime limit (300 ms), 30 rounds, 10 minutes.
    fn default() -> Self {
        DowntimeLimit {
            downtime_limit_ms: 300,
            rounds_max: 30,
            total_ms_max: 600_000,
        }
    }
}

impl Policy for DowntimeLimit {
    fn decide(&mut self, view: &PolicyView<'_>) -> Decision {
        let e = &view.estimates;
        if e.expected_downtime_ms <= self.downtime_limit_ms as f64 {
            return Decision::StopAndCopy;
        }
        let rounds = view.rounds.len() as u32;
        let why = |cap: String| {
            Decision::GiveUp(format!(
                "not converging: {cap}; the guest dirties {:.0} pages/s ({:.0} MB/s) against {:.0} MB/s of bandwidth, and {} dirty pages would take {:.0} ms against a downtime limit of {} ms",
                e.dirty_pages_per_s,
                e.dirty_pages_per_s * PAGE_BYTES as f64 / 1e6,
                e.bandwidth_bytes_per_s / 1e6,
                e.remaining_pages,
                e.expected_downtime_ms,
                self.downtime_limit_ms
            ))
        };
        if rounds >= self.rounds_max {
            return why(format!("{rounds} rounds, the cap"));
        }
        if view.elapsed_ms >= self.total_ms_max as f64 {
            return why(format!(
                "{:.0} ms of pre-copy, the cap is {} ms",
                view.elapsed_ms, self.total_ms_max
            ));
        }
        Decision::NextRound
    }
}

#[cfg(test)]
mod tests {
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
        let mut rounds = Vec::new();
        let mut pages = memory_pages;
        let mut elapsed = 0.0;
        loop {
            let ms = pages as f64 * PAGE_BYTES as f64 / bandwidth * 1e3;
            let dirtied = ((dirty * ms / 1e3) as u64).min(working_set);
            let r = RoundFigures {
                round: rounds.len() as u32,
                pages,
                wire_bytes: pages * PAGE_BYTES as u64,
                ms,
                dirtied_pages: dirtied,
            };
            rounds.push(r);
            elapsed += ms;
            let view = PolicyView {
                rounds: &rounds,
                estimates: Estimates::after(&r, dirtied),
                elapsed_ms: elapsed,
            };
            match policy.decide(&view) {
                Decision::NextRound => pages = dirtied,
                d => return (d, rounds),
            }
        }
    }

    const GIB_PAGES: u64 = (1 << 30) / PAGE_BYTES as u64;

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
        let e = Estimates::after(last, last.dirtied_pages);
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
        };
        let e = Estimates::after(&r, 500);
        assert!((e.pages_per_s - 10_000.0).abs() < 1e-6);
        assert!((e.expected_downtime_ms - 50.0).abs() < 1e-6, "{e:?}");
        assert!((e.bandwidth_bytes_per_s - 500.0 * PAGE_BYTES as f64 * 10.0).abs() < 1e-3);
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
}
