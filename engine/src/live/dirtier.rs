//! A software dirtier: a thread that writes pages of a working set at a chosen rate and marks
//! them in a [`SharedBitmap`], standing in for a guest's vCPUs where KVM cannot run one (tests,
//! `pagewire demo --live` without a usable `/dev/kvm`). Pausing it ([`Vmm::pause`]) stops and
//! joins the thread, so every write it made is marked before the last round's collect.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Vmm;
use crate::dirty::SharedBitmap;
use crate::error::{Error, Result};
use crate::limits::PAGE_BYTES;
use crate::memory::GuestMemory;

/// How often the dirtier checks its pace (it writes in bursts between checks).
const PACE_SLICE_MS: u64 = 1;

/// What the dirtier writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtierConfig {
    /// Bytes per second to dirty (whole pages: `rate / 4096` page writes per second).
    pub bytes_per_s: u64,
    /// Region whose pages it writes.
    pub region: u32,
    /// First page of the working set.
    pub first_page: u64,
    /// Pages in the working set (writes pick among them at random).
    pub pages: u64,
    /// Seed of the page choice.
    pub seed: u64,
}

/// The running dirtier (see the module docs).
#[derive(Debug)]
pub struct SoftwareDirtier {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    /// Percent of its rate taken away ([`Vmm::throttle`]).
    throttle: Arc<AtomicU8>,
    thread: Option<JoinHandle<()>>,
}

impl SoftwareDirtier {
    /// Starts writing into `memory` (which must be writable), marking `bitmap`.
    pub fn start(
        memory: Arc<GuestMemory>,
        bitmap: Arc<SharedBitmap>,
        config: DirtierConfig,
    ) -> Result<Self> {
        let region = memory
            .regions()
            .get(config.region as usize)
            .ok_or_else(|| Error::Config(format!("no region {}", config.region)))?;
        if config.pages == 0 || config.first_page + config.pages > region.pages() {
            return Err(Error::Config(format!(
                "working set of {} pages from page {} does not fit region {} ({} pages)",
                config.pages,
                config.first_page,
                config.region,
                region.pages()
            )));
        }
        if !region.is_writable() {
            return Err(Error::Config("the dirtier needs writable memory".into()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let throttle = Arc::new(AtomicU8::new(0));
        let (stop2, writes2, throttle2) = (stop.clone(), writes.clone(), throttle.clone());
        let thread = std::thread::Builder::new()
            .name("pw-dirtier".into())
            .spawn(move || dirty(&memory, &bitmap, config, &stop2, &writes2, &throttle2))
            .map_err(|e| Error::io("starting the dirtier thread", e))?;
        Ok(SoftwareDirtier {
            stop,
            writes,
            throttle,
            thread: Some(thread),
        })
    }

    /// Page writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// The throttle in effect, percent of its rate taken away ([`Vmm::throttle`]).
    pub fn throttle_percent(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// Stops and joins the thread (idempotent).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // Wakes it from its pacing wait, so a pause does not wait out a slice.
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Vmm for SoftwareDirtier {
    fn guest_cpu_time(&self) -> Option<std::time::Duration> {
        crate::sys::thread_cpu_time_of(self.thread.as_ref()?)
    }

    fn pause(&mut self) -> Result<()> {
        self.stop();
        Ok(())
    }

    /// Writes at `100 − percent` percent of its rate from now on.
    fn throttle(&mut self, percent: u8) -> Result<bool> {
        self.throttle
            .store(percent.min(super::THROTTLE_PERCENT_MAX), Ordering::Relaxed);
        Ok(true)
    }
}

impl Drop for SoftwareDirtier {
    fn drop(&mut self) {
        self.stop();
    }
}

fn dirty(
    memory: &GuestMemory,
    bitmap: &SharedBitmap,
    c: DirtierConfig,
    stop: &AtomicBool,
    writes: &AtomicU64,
    throttle: &AtomicU8,
) {
    let region = &memory.regions()[c.region as usize];
    let per_s = c.bytes_per_s as f64 / PAGE_BYTES as f64;
    let mut x = c.seed | 1;
    let mut done = 0u64;
    // Page writes due and not yet made: the rate (less the throttle) accrues them over time.
    let (mut due, mut last) = (0.0f64, Instant::now());
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let share = f64::from(100 - throttle.load(Ordering::Relaxed).min(100)) / 100.0;
        due += now.duration_since(last).as_secs_f64() * per_s * share;
        last = now;
        if due < 1.0 {
            std::thread::park_timeout(Duration::from_millis(PACE_SLICE_MS));
            continue;
        }
        due -= 1.0;
        // xorshift64: which page; the value written is the write's number, so every write
        // changes the page.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = c.first_page + x % c.pages;
        done += 1;
        region.write(
            page * PAGE_BYTES as u64 + (x % 512) * 8,
            &done.to_le_bytes(),
        );
        // Marked after the write: a collect between the two misses it this round, and sees it
        // the next (the last collect comes after the thread is joined).
        bitmap.mark(c.region, page, 1);
        writes.store(done, Ordering::Relaxed);
    }
}
