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
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
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
    /// Of [`ms`](Self::ms), the milliseconds from the kernel taking the round's last byte to
    /// the receiver's confirmation (the paused round: to its confirmation that it holds
    /// everything). Socket buffers drain and one round trip passes: a cost every round pays
    /// whatever its size, which matters when the pause is short.
    pub tail_ms: f64,
    /// Pages the guest dirtied while the round was sent (what the next round must carry).
    pub dirtied_pages: u64,
    /// Milliseconds over which [`dirtied_pages`](Self::dirtied_pages) were written: from the
    /// dirty-log collect before the round to the one after it (the round, and the collect and
    /// decision around it; 0 where not measured, as for the paused round).
    pub dirty_window_ms: f64,
    /// The vCPU throttle in effect during the round, percent of the vCPUs' time taken away
    /// ([`Decision::Throttle`]; 0: none).
    pub throttle_percent: u8,
    /// CPUs the guest kept busy on average during the round, where the VMM tells its CPU time
    /// ([`Vmm::guest_cpu_time`](super::Vmm::guest_cpu_time)).
    pub guest_cpus: Option<f64>,
    /// The host's CPUs busy on average during the round (anything running), where the host
    /// tells (`/proc/stat`).
    pub host_busy_cpus: Option<f64>,
    /// The host's CPUs (0 where unknown).
    pub host_cpus: u32,
    /// The engine's page-moving threads on this host: the sender's shards, and the
    /// receiver's too where it runs here (0 where unknown).
    pub engine_threads: u32,
    /// The largest share of the round's time that one of this process's send shards spent
    /// runnable but waiting for a CPU (the scheduler's run delay), where the kernel keeps
    /// such statistics; live rounds only (for the paused round, reading them would fall
    /// inside the downtime). What a paused guest can give back is bounded by such waits;
    /// recorded to test the estimate's CPU model against, not used by it.
    pub send_run_delay_share: Option<f64>,
    /// The same for receive shards running in this process (a migration over loopback).
    pub recv_run_delay_share: Option<f64>,
    /// The largest share of the round's time that one of this process's send shards ran on a
    /// CPU, where the kernel keeps such statistics; live rounds only, as the run delays.
    pub send_cpu_share: Option<f64>,
    /// The same for receive shards running in this process.
    pub recv_cpu_share: Option<f64>,
}

impl RoundFigures {
    /// Wire bytes per second this round achieved.
    pub fn bandwidth_bytes_per_s(&self) -> f64 {
        self.wire_bytes as f64 / (self.ms / 1e3).max(1e-6)
    }

    /// Pages per second the guest dirtied during this round (distinct pages: a working set
    /// written over and over counts once), over the time between the collects that bound
    /// them ([`dirty_window_ms`](Self::dirty_window_ms); the round's own time where that was
    /// not measured). A short round is shorter than its window by the collect itself, which
    /// on a large guest takes milliseconds.
    pub fn dirty_pages_per_s(&self) -> f64 {
        let ms = if self.dirty_window_ms > 0.0 {
            self.dirty_window_ms
        } else {
            self.ms
        };
        self.dirtied_pages as f64 / (ms / 1e3).max(1e-6)
    }

    /// How much faster the engine should move pages once the guest is paused than it did in
    /// this round (1 where nothing says otherwise).
    ///
    /// A running guest competes with the migration for the source's CPUs; paused, it gives
    /// its CPU back. The engine had `busy − guest` CPUs; paused it has up to
    /// `min(engine_threads, host_cpus)` (what its threads can use), but gains at most the
    /// guest's CPU, and only the part it could not already take from idle CPUs:
    ///
    /// - on a host with CPUs to spare (the usual source, its receiver elsewhere), idle CPUs
    ///   were there for the taking, so the engine gains `max(0, guest − idle)`: mostly
    ///   nothing;
    /// - on a saturated host (idle under a quarter of its CPUs), it gains all of the guest's
    ///   CPU: there the idle time is the stall of a pipeline whose stages wait on each other,
    ///   not spare room. On this 2-core machine one channel's two shards and a vCPU share two
    ///   CPUs; the paused round moved pages 1.2–1.8 times as fast as the live round before
    ///   it, while counting only `guest − idle` as gain predicted 1.1–1.3
    ///   (`pagewire-bench live --guest kvm`, 400–1600 MiB/s).
    ///
    /// `speedup = min(usable, engine + gain) / engine`, within 1 and [`PAUSED_SPEEDUP_MAX`].
    pub fn paused_speedup(&self) -> f64 {
        let (Some(guest), Some(busy)) = (self.guest_cpus, self.host_busy_cpus) else {
            return 1.0;
        };
        if self.host_cpus == 0 || !guest.is_finite() || !busy.is_finite() {
            return 1.0;
        }
        let cpus = self.host_cpus as f64;
        let busy = busy.clamp(0.0, cpus);
        let guest = guest.clamp(0.0, busy);
        let idle = cpus - busy;
        let gain = if idle <= SATURATED_IDLE_SHARE * cpus {
            guest
        } else {
            (guest - idle).max(0.0)
        };
        let usable = match self.engine_threads {
            0 => cpus,
            t => (t as f64).min(cpus),
        };
        let engine = (busy - guest).max(ENGINE_CPUS_MIN);
        ((engine + gain).min(usable) / engine).clamp(1.0, PAUSED_SPEEDUP_MAX)
    }
}

/// A host whose idle CPUs are at most this share of all its CPUs during a round is saturated
/// (see [`RoundFigures::paused_speedup`]).
pub const SATURATED_IDLE_SHARE: f64 = 0.25;

/// The most [`RoundFigures::paused_speedup`] counts on: a guest that held far more CPU than
/// the engine is a measurement to distrust, not a promise of a short pause.
pub const PAUSED_SPEEDUP_MAX: f64 = 2.5;

/// The least CPU the engine is taken to have had in a round (CPUs), so a round with almost
/// nothing else busy cannot make the speedup explode.
const ENGINE_CPUS_MIN: f64 = 0.1;

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
    /// How much faster the paused round is expected to move pages than the last round did
    /// ([`RoundFigures::paused_speedup`]).
    pub paused_speedup: f64,
    /// Milliseconds the remaining pages would take at the last round's page rate, sped up by
    /// the CPU the paused guest gives back: the downtime if the guest stopped now.
    pub expected_downtime_ms: f64,
}

impl Estimates {
    /// Estimates after the last of `rounds` left `remaining_pages` dirty.
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
    /// costed as what they are, which is why [`DowntimeLimit`] never stops right after round
    /// 0. The rate is then sped up by what the paused guest gives back
    /// ([`RoundFigures::paused_speedup`]).
    ///
    /// Every round, however small, also pays a [`tail_ms`](RoundFigures::tail_ms) (a round
    /// trip, buffers draining): the pages are costed at the last round's rate before its tail,
    /// and a tail is added once. Without it, pauses of 5–20 ms came in 20–45% over the
    /// estimate. The tail added is the median of all rounds' tails so far. The last round's
    /// own tail is a single draw of a noisy figure; the shortest of them (the rule before
    /// this one) is the luckiest round trip, while the paused round's tail also carries the
    /// device state, the end of the stream and the destination's confirmation, and came out
    /// longer than the shortest live round's in 73 of 96 runs. Computed all three ways from the same runs'
    /// figures (two-core `pagewire-bench live --guest kvm` grids, 96 runs with the receiver's
    /// downtime polling, [`DOWNTIME_POLL_US`](crate::limits::DOWNTIME_POLL_US)): within 25%
    /// in 55 with the median, 42 with the shortest, 45 with the last; on 96 runs without the
    /// polling 63, 57 and 55, and on 128 runs of the session before 82, 68 and 76.
    pub fn after(rounds: &[RoundFigures], remaining_pages: u64) -> Estimates {
        let fallback = RoundFigures::default();
        let last = rounds.last().unwrap_or(&fallback);
        let seconds = (last.ms / 1e3).max(1e-6);
        let pages_per_s = (last.pages as f64 / seconds).max(1.0);
        let tail_of = |r: &RoundFigures| r.tail_ms.clamp(0.0, r.ms.max(0.0));
        let last_tail_ms = tail_of(last);
        let tail_ms = median_tail_ms(rounds, tail_of).unwrap_or(last_tail_ms);
        let streaming_s = ((last.ms - last_tail_ms) / 1e3).max(1e-6);
        let mut streaming_pages_per_s = (last.pages as f64 / streaming_s).max(1.0);
        // A round that fits in the socket buffers is handed to the kernel at memory speed, so
        // its pages-before-the-tail rate says nothing about moving more than it did: more pages
        // than the last round are costed at no more than the best rate any round delivered,
        // tail included (on a slow link, round 0's). On the loopback runs of session 30's
        // grids (544) this changed no estimate; it keeps a small last round from pricing a
        // large remainder at memory speed behind a link.
        if remaining_pages > last.pages {
            let delivered_pages_per_s = rounds
                .iter()
                .map(|r| r.pages as f64 / (r.ms / 1e3).max(1e-6))
                .fold(1.0, f64::max);
            streaming_pages_per_s = streaming_pages_per_s.min(delivered_pages_per_s);
        }
        let paused_speedup = last.paused_speedup();
        Estimates {
            bandwidth_bytes_per_s: last.bandwidth_bytes_per_s(),
            pages_per_s,
            dirty_pages_per_s: last.dirty_pages_per_s(),
            remaining_pages,
            paused_speedup,
            expected_downtime_ms: remaining_pages as f64 / (streaming_pages_per_s * paused_speedup)
                * 1e3
                + tail_ms,
        }
    }
}

/// The median of `tail_of` over `rounds`, leaving out any that is not a number (the mean of
/// the middle two for an even count); `None` where none is left.
fn median_tail_ms(rounds: &[RoundFigures], tail_of: impl Fn(&RoundFigures) -> f64) -> Option<f64> {
    let mut tails: Vec<f64> = rounds
        .iter()
        .map(tail_of)
        .filter(|t| t.is_finite())
        .collect();
    if tails.is_empty() {
        return None;
    }
    tails.sort_by(f64::total_cmp);
    let mid = tails.len() / 2;
    Some(if tails.len() % 2 == 1 {
        tails[mid]
    } else {
        (tails[mid - 1] + tails[mid]) / 2.0
    })
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
    /// Throttle the vCPUs to this percentage (of their time taken away, QEMU's
    /// `cpu-throttle-percentage`) through [`Vmm::throttle`](super::Vmm::throttle), then send
    /// the dirty pages in another live round. A VMM that cannot throttle leaves its guest as it
    /// is, and the round goes on.
    Throttle(u8),
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

/// The default policy: stop and copy once the expected downtime fits `downtime_limit_ms`, after
/// at least one round of dirty pages (round 0 alone mixes in zero pages, which cost less than
/// the dirtied pages the pause carries); give up after `rounds_max` live rounds or
/// `total_ms_max` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DowntimeLimit {
    /// The longest pause the guest may see, in milliseconds (QEMU's `downtime-limit`).
    pub downtime_limit_ms: u64,
    /// Live rounds at most (round 0 included) before giving up.
    pub rounds_max: u32,
    /// Milliseconds of pre-copy before giving up, checked after each round: a round under way
    /// when it passes (a large round 0 behind a low bandwidth limit, say) runs to its end.
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
        let rounds = view.rounds.len() as u32;
        if e.expected_downtime_ms <= self.downtime_limit_ms as f64 {
            // Round 0 is no measure of the paused round: it mixes zero pages, which cost less
            // than the dirtied pages the paused round carries. One round of dirty pages
            // measures what they cost (and leaves fewer for the pause), unless nothing is
            // dirty or the round cap says stop.
            if rounds > 1 || e.remaining_pages == 0 || rounds >= self.rounds_max {
                return Decision::StopAndCopy;
            }
            return Decision::NextRound;
        }
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
pub(super) mod tests;
