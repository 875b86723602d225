//! The KVM dirty log as a [`DirtySource`] (the `kvm` feature): the pages vCPUs wrote, per
//! memory slot, through `KVM_GET_DIRTY_LOG`, read into a bitmap kept from one collect to the
//! next.
//!
//! The VMM registers each region of the layout as a KVM memory slot with
//! `KVM_MEM_LOG_DIRTY_PAGES` and tells the source which slot holds which region. Two ways to
//! clear what a collect took:
//! - **On get** (KVM's default): `KVM_GET_DIRTY_LOG` both returns and clears a slot's bits and
//!   write-protects the pages again, which is exactly this trait's get-and-clear contract.
//! - **Manual protect**, where the kernel offers `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` and the
//!   VMM enabled it ([`enable_manual_protect`], before it registers the slots): the get only
//!   reads, and the source clears the bits it read with `KVM_CLEAR_DIRTY_LOG`, in steps of
//!   [`KVM_CLEAR_STEP_PAGES`] that skip clean stretches, so KVM never holds its MMU lock over a
//!   whole large slot at once. With `KVM_DIRTY_LOG_INITIALLY_SET` (which
//!   [`enable_manual_protect`] asks for), turning logging on write-protects nothing: every
//!   page starts dirty, and the write protection moves to a live session's first collect
//!   (before round 0, which sends everything anyway), in steps. This is what QEMU does where
//!   offered.
//!
//! Tell the source which one the VM uses ([`KvmDirtyLog::manual_protect`]). Told "manual" on a
//! VM without it, the clears are only redundant. Not told on a VM with it, nothing is ever
//! cleared: every round resends every page written since logging began (all of them, with
//! initially-set bits), and the session gives up at its round cap.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::{words_for, DirtyBitmaps, DirtySource, PAGES_PER_WORD};
use crate::error::{Error, Result};
use crate::limits::{KVM_CLEAR_STEP_PAGES, KVM_EINTR_TRIES_MAX, PAGE_BYTES};

/// `op`, again while a signal interrupts it (`EINTR`), at most [`KVM_EINTR_TRIES_MAX`] times
/// in all.
pub(crate) fn retrying<T>(
    mut op: impl FnMut() -> std::result::Result<T, kvm_ioctls::Error>,
) -> std::result::Result<T, kvm_ioctls::Error> {
    let mut tries = 1;
    loop {
        match op() {
            Err(e) if e.errno() == libc::EINTR && tries < KVM_EINTR_TRIES_MAX => tries += 1,
            r => return r,
        }
    }
}

/// [`retrying`] for an ioctl that answers an `io::Error`.
fn retrying_io(mut op: impl FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
    let mut tries = 1;
    loop {
        match op() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < KVM_EINTR_TRIES_MAX => {
                tries += 1
            }
            r => return r,
        }
    }
}

/// Enables manual dirty-log protect on `vm` where KVM offers it
/// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), with initially-set bits where offered too (see the
/// module docs). Returns whether it is now on; `false` leaves the VM as it was. Call it before
/// registering the memory slots with `KVM_MEM_LOG_DIRTY_PAGES` (initially-set bits apply to
/// slots whose logging starts afterwards), and pass the answer to
/// [`KvmDirtyLog::manual_protect`].
pub fn enable_manual_protect(vm: &VmFd) -> Result<bool> {
    let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    // The answer is the mask of the flags this kernel supports (0: none, not offered).
    let offered = u64::try_from(vm.check_extension_raw(libc::c_ulong::from(cap))).unwrap_or(0);
    let wanted = u64::from(
        kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET,
    );
    if offered & u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
        return Ok(false);
    }
    let enable = kvm_bindings::kvm_enable_cap {
        cap,
        args: [offered & wanted, 0, 0, 0],
        ..Default::default()
    };
    retrying(|| vm.enable_cap(&enable)).map_err(|e| {
        Error::io(
            "enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    Ok(true)
}

/// One region's KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRegion {
    /// The KVM memory slot id.
    pub slot: u32,
    /// The region of the layout it holds (index into [`crate::GuestMemory::regions`]).
    pub region: u32,
    /// The slot's size in bytes (`memory_size` of its `kvm_userspace_memory_region`), which
    /// must be its region's: KVM writes the whole slot's bitmap into a buffer sized from it.
    pub bytes: u64,
}

/// The dirty log of a VM's memory slots (see the module docs).
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<SlotRegion>,
    /// Regions another source watches (see [`leaving_out`](Self::leaving_out)).
    left_out: Vec<u32>,
    /// The VM has manual protect on: the source clears what it read.
    manual: bool,
    /// Each slot's bitmap as KVM last wrote it, kept from one collect to the next (made at the
    /// first, once the slots are checked).
    logs: Vec<Vec<u64>>,
}

impl std::fmt::Debug for KvmDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirtyLog")
            .field("slots", &self.slots)
            .field("left_out", &self.left_out)
            .field("manual", &self.manual)
            .finish_non_exhaustive()
    }
}

impl KvmDirtyLog {
    /// The dirty log of `slots` of `vm`. Each slot must have been registered with
    /// `KVM_MEM_LOG_DIRTY_PAGES`, with its region's size. Every region of the layout needs a
    /// slot, one at most, unless [left out](Self::leaving_out): a region nothing watches would
    /// keep its round-0 copy on the destination while the guest writes it, and the migration
    /// would end "complete" with stale memory. A slot said to be of another size than its
    /// region, a region without a slot, or a region with two are refused at the first
    /// [`collect`](DirtySource::collect), before KVM is asked.
    ///
    /// # Safety
    ///
    /// Each `bytes` is the `memory_size` the slot was registered with (and stays so while
    /// this source lives). KVM cannot be asked a slot's size: it copies the bitmap of the
    /// whole slot as registered into a buffer sized from `bytes`, so a slot registered larger
    /// than said has the kernel write past that buffer.
    #[allow(unsafe_code)] // a contract only: the body does nothing unsafe
    pub unsafe fn new(vm: Arc<VmFd>, slots: Vec<SlotRegion>) -> Self {
        KvmDirtyLog {
            vm,
            slots,
            left_out: Vec::new(),
            manual: false,
            logs: Vec::new(),
        }
    }

    /// Says whether the VM has manual dirty-log protect on ([`enable_manual_protect`]'s
    /// answer): with it, each collect clears the bits it read with `KVM_CLEAR_DIRTY_LOG`. See
    /// the module docs for what a wrong answer costs.
    pub fn manual_protect(mut self, enabled: bool) -> Self {
        self.manual = enabled;
        self
    }

    /// Regions that have no KVM slot of their own, because another source watches them (a
    /// VMM's bitmap of memory no vCPU maps, in a [`Union`](super::Union) with this one).
    pub fn leaving_out(mut self, regions: &[u32]) -> Self {
        self.left_out.extend_from_slice(regions);
        self
    }

    /// Refuses slots that do not cover the layout of `into` exactly (see [`new`](Self::new)).
    fn check_cover(&self, into: &DirtyBitmaps) -> Result<()> {
        let regions = into.regions();
        let mut slot_of = vec![None; regions as usize];
        for s in &self.slots {
            let pages = into.region_pages(s.region).ok_or_else(|| {
                Error::Config(format!(
                    "KVM slot {} is said to hold region {}, which the layout does not have",
                    s.slot, s.region
                ))
            })?;
            // KVM fills the slot's whole bitmap into a buffer sized from `bytes`, and pages
            // past a smaller size would go unreported.
            if s.bytes != pages * PAGE_BYTES as u64 {
                return Err(Error::Config(format!(
                    "KVM slot {} ({} bytes) does not match region {} ({pages} pages of {PAGE_BYTES} bytes)",
                    s.slot, s.bytes, s.region
                )));
            }
            if let Some(other) = slot_of[s.region as usize].replace(s.slot) {
                return Err(Error::Config(format!(
                    "KVM slots {other} and {} are both said to hold region {}",
                    s.slot, s.region
                )));
            }
        }
        match (0..regions).find(|r| slot_of[*r as usize].is_none() && !self.left_out.contains(r))
        {
            Some(r) => Err(Error::Config(format!(
                "region {r} has no KVM slot: its writes would never be sent again (name its slot, or leave it out for the source that watches it)"
            ))),
            None => Ok(()),
        }
    }
}

impl DirtySource for KvmDirtyLog {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> Result<()> {
        self.check_cover(into)?;
        if self.logs.len() != self.slots.len() {
            self.logs = self
                .slots
                .iter()
                .map(|s| vec![0; words_for(s.bytes / PAGE_BYTES as u64)])
                .collect();
        }
        for (s, log) in self.slots.iter().zip(&mut self.logs) {
            let pages = s.bytes / PAGE_BYTES as u64;
            let failed = |what: &str, e: std::io::Error| {
                Error::io(format!("{what} of memory slot {}", s.slot), e)
            };
            // Interrupted by a signal, nothing was collected: it asks again.
            retrying_io(|| {
                // SAFETY: `log` has `words_for(pages)` words, the whole bitmap of a slot of
                // `s.bytes`, which `new`'s caller promised is the size it was registered with.
                #[allow(unsafe_code)]
                unsafe {
                    crate::sys::kvm_get_dirty_log(&*self.vm, s.slot, log)
                }
            })
            .map_err(|e| failed("KVM_GET_DIRTY_LOG", e))?;
            // Taken before KVM forgets them: a clear that fails leaves them in both.
            into.or_words(s.region, log)?;
            if self.manual {
                clear_read_bits(&self.vm, s.slot, log, pages)
                    .map_err(|e| failed("KVM_CLEAR_DIRTY_LOG", e))?;
            }
        }
        Ok(())
    }
}

/// Clears the bits of `log` (a slot of `pages` pages) from KVM's log, [`KVM_CLEAR_STEP_PAGES`]
/// at a time, passing over steps with no bit set.
fn clear_read_bits(vm: &VmFd, slot: u32, log: &[u64], pages: u64) -> std::io::Result<()> {
    let step_words = (KVM_CLEAR_STEP_PAGES / PAGES_PER_WORD) as usize;
    for (i, words) in log.chunks(step_words).enumerate() {
        if words.iter().all(|&w| w == 0) {
            continue;
        }
        let first_page = i as u64 * KVM_CLEAR_STEP_PAGES;
        // Whole words, except the slot's last step, which ends at its last page.
        let count = (pages - first_page).min(KVM_CLEAR_STEP_PAGES) as u32;
        retrying_io(|| crate::sys::kvm_clear_dirty_log(vm, slot, first_page, count, words))?;
    }
    Ok(())
}
