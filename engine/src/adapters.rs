//! Adapters from VMM crates' guest memory types to [`crate::GuestMemory`].

/// rust-vmm's `vm-memory` (the `vm-memory` feature): a `GuestMemoryMmap` as pagewire memory.
#[cfg(feature = "vm-memory")]
pub mod vm_memory {
    use std::ptr::NonNull;
    use std::sync::Arc;

    use vm_memory::{
        Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
    };

    use crate::error::{Error, Result};
    use crate::memory::{GuestMemory, RegionSpec};

    /// `memory`'s regions, in guest-physical order, as [`GuestMemory`]: the same mappings,
    /// never copied, kept alive as long as pagewire uses them. The VMM must not write guest
    /// memory while a receiver fills it; a sender reads it while vCPUs run (live rounds). A
    /// region mapped without `PROT_WRITE` (a ROM) is read-only here too: a receiver refuses
    /// such memory instead of faulting on it.
    pub fn from_mmap(memory: Arc<GuestMemoryMmap>) -> Result<GuestMemory> {
        let mut regions = Vec::new();
        let mut read_only = Vec::new();
        for r in memory.iter() {
            if r.prot() & libc::PROT_WRITE == 0 {
                read_only.push(r.start_addr().raw_value());
            }
            let host = r.get_host_address(MemoryRegionAddress(0)).map_err(|e| {
                Error::Config(format!("a vm-memory region has no host mapping: {e}"))
            })?;
            let host = NonNull::new(host)
                .ok_or_else(|| Error::Config("a vm-memory region is mapped at null".into()))?;
            let spec = RegionSpec {
                gpa: r.start_addr().raw_value(),
                len: r.len(),
            };
            regions.push((spec, host));
        }
        regions.sort_by_key(|(s, _)| s.gpa);
        // SAFETY: each region's mapping belongs to `memory`, which the result keeps alive; the
        // contract above is the VMM's, as for any guest memory it hands over.
        let mut out = unsafe { GuestMemory::from_raw_kept(&regions, memory) }?;
        out.mark_read_only(|gpa| read_only.contains(&gpa));
        Ok(out)
    }
}
