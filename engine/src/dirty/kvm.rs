//! The KVM dirty log as a [`DirtySource`] (the `kvm` feature): the pages vCPUs wrote, per
//! memory slot, through `KVM_GET_DIRTY_LOG` ([`kvm_ioctls::VmFd::get_dirty_log`]).
//!
//! The VMM registers each region of the layout as a KVM memory slot with
//! `KVM_MEM_LOG_DIRTY_PAGES` and tells the source which slot holds which region. Without
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled on the VM (the default), `KVM_GET_DIRTY_LOG`
//! both returns and clears a slot's bits and write-protects the pages again, which is exactly
//! this trait's get-and-clear contract. (With manual protect enabled, the bits would only be
//! cleared by `KVM_CLEAR_DIRTY_LOG`, which this source does not issue: leave it off.)

use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::{words_for, DirtyBitmaps, DirtySource};
use crate::error::{Error, Result};
use crate::limits::PAGE_BYTES;

/// `op`, again while a signal interrupts it (`EINTR`), at most
/// [`KVM_EINTR_TRIES_MAX`](crate::limits::KVM_EINTR_TRIES_MAX) times in all.
pub(crate) fn retrying<T>(
    mut op: impl FnMut() -> std::result::Result<T, kvm_ioctls::Error>,
) -> std::result::Result<T, kvm_ioctls::Error> {
    let mut tries = 1;
    loop {
        match op() {
            Err(e) if e.errno() == libc::EINTR && tries < crate::limits::KVM_EINTR_TRIES_MAX => {
                tries += 1
            }
            r => return r,
        }
    }
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
}

impl std::fmt::Debug for KvmDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirtyLog")
            .field("slots", &self.slots)
            .field("left_out", &self.left_out)
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
        }
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
        for s in &self.slots {
            let pages = s.bytes / PAGE_BYTES as u64;
            // Interrupted by a signal, nothing was collected: it asks again.
            let words =
                retrying(|| self.vm.get_dirty_log(s.slot, s.bytes as usize)).map_err(|e| {
                    Error::io(
                        format!("KVM_GET_DIRTY_LOG of memory slot {}", s.slot),
                        std::io::Error::from_raw_os_error(e.errno()),
                    )
                })?;
            if words.len() != words_for(pages) {
                return Err(Error::Internal(format!(
                    "KVM's dirty log of slot {} has {} words, not {}",
                    s.slot,
                    words.len(),
                    words_for(pages)
                )));
            }
            into.or_words(s.region, &words)?;
        }
        Ok(())
    }
}
