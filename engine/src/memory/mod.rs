//! Guest memory: regions of guest-physical space backed by host mappings, and the only code that
//! touches their bytes.
//!
//! # Contract
//! Guest memory is shared with running vCPUs (and, on the receiver, with the kernel copying
//! socket data into it), so pagewire never forms a `&[u8]` or `&mut [u8]` over it: the compiler
//! would be entitled to assume nobody else writes it. All access goes through raw pointers in
//! this module (bulk copies with `copy_nonoverlapping`, as rust-vmm's `vm-memory` does for
//! volatile slices), through the zero scanner's raw-pointer loads, or through the kernel (send
//! and receive straight from and into the mapping). A page a vCPU writes while it is being sent
//! may go out torn; that is expected, because the dirty log marks it and a later round sends it
//! again.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::limits::{PAGE_BYTES, PREFAULT_STEP_BYTES, REGIONS_MAX};
use crate::protocol::handshake::layout_digest;

mod image;
mod range;
mod region;

pub use image::ImageFile;
pub(crate) use image::{reserve, Reservation};
pub(crate) use range::{GuestRange, GuestSrc};
use region::Backing;
pub use region::Region;

/// A guest memory layout: ordered, non-overlapping regions.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
    /// A new file's space, not reserved yet (see [`take_reservation`](Self::take_reservation)).
    reservation: std::sync::Mutex<Option<image::Reservation>>,
}

/// Place and size of one region to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes (a positive multiple of the page size).
    pub len: u64,
}

fn check_specs(specs: &[RegionSpec]) -> Result<()> {
    if specs.is_empty() || specs.len() > REGIONS_MAX {
        return Err(Error::Config(format!(
            "a layout needs 1 to {REGIONS_MAX} regions, got {}",
            specs.len()
        )));
    }
    let mut end = 0u64;
    for (i, s) in specs.iter().enumerate() {
        if s.len == 0 || s.len % PAGE_BYTES as u64 != 0 || s.gpa % PAGE_BYTES as u64 != 0 {
            return Err(Error::Config(format!(
                "region {i} (start {:#x}, {} bytes) is not a positive whole number of {PAGE_BYTES}-byte pages",
                s.gpa, s.len
            )));
        }
        if i > 0 && s.gpa < end {
            return Err(Error::Config(format!(
                "region {i} starts at {:#x}, before the end of region {} ({end:#x}): regions must be sorted and disjoint",
                s.gpa,
                i - 1
            )));
        }
        end = s.gpa.checked_add(s.len).ok_or_else(|| {
            Error::Config(format!("region {i} wraps the guest-physical address space"))
        })?;
    }
    Ok(())
}

impl GuestMemory {
    /// Fresh zero-filled anonymous memory for each region (transparent huge pages advised, so
    /// first touches fault 2 MiB at a time).
    pub fn anonymous(specs: &[RegionSpec]) -> Result<Self> {
        Self::anonymous_with(specs, false)
    }

    /// Like [`anonymous`](Self::anonymous), but faulted in up front (`MADV_POPULATE_WRITE`), so first
    /// touches cost nothing later: benchmarks use it to measure the transport, not page faults.
    pub fn anonymous_populated(specs: &[RegionSpec]) -> Result<Self> {
        Self::anonymous_with(specs, true)
    }

    fn anonymous_with(specs: &[RegionSpec], populate: bool) -> Result<Self> {
        check_specs(specs)?;
        let mut regions = Vec::with_capacity(specs.len());
        for s in specs {
            let len = usize::try_from(s.len)
                .map_err(|_| Error::Config(format!("region of {} bytes is too large", s.len)))?;
            let mut map = MmapOptions::new()
                .len(len)
                .map_anon()
                .map_err(|e| Error::io(format!("mapping {len} bytes of anonymous memory"), e))?;
            // Best effort: THP may be disabled; the mapping works either way. Advised before
            // anything is faulted in, so that populating it below takes 2 MiB pages where the
            // kernel has them (QEMU marks guest RAM the same way).
            let _ = map.advise(memmap2::Advice::HugePage);
            if populate {
                // MADV_POPULATE_WRITE (Linux 5.14) faults it all in with one call; older
                // kernels get a write to every page.
                if map.advise(memmap2::Advice::PopulateWrite).is_err() {
                    for page in map.chunks_mut(crate::limits::PAGE_BYTES) {
                        page[0] = 0;
                    }
                }
            }
            let raw = MmapRaw::from(map);
            regions.push(Region {
                gpa: s.gpa,
                len: s.len,
                host: NonNull::new(raw.as_mut_ptr())
                    .ok_or_else(|| Error::Config("the kernel returned a null mapping".into()))?,
                initially_zero: AtomicBool::new(true),
                writable: true,
                guard: None,
                _backing: Backing::Mapped(raw),
            });
        }
        Ok(GuestMemory {
            regions,
            reservation: Default::default(),
        })
    }

    /// One region at guest-physical 0 backed by the file at `path` (a RAM image), mapped shared.
    /// `writable` maps it for writing (a receiver's destination).
    pub fn from_file(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Self::map_file(&file, path, writable)
    }

    /// Creates (or truncates) the file at `path` to `len` bytes of zeros, reserves its space
    /// (`posix_fallocate`, so a full filesystem fails here and not mid-transfer), and maps it
    /// writable. See [`ImageFile`] for a destination that cannot be mistaken for a complete
    /// image when the transfer fails.
    pub fn create_file(path: &Path, len: u64) -> Result<Self> {
        Self::create_file_as(path, len, false, true)
    }

    /// [`create_file`](Self::create_file), where `exclusive` refuses a `path` that exists
    /// (a symbolic link included) instead of truncating it: for names of our own making in a
    /// directory others may write. Without `reserve_now` the file only gets its length, and
    /// its space is left to [`take_reservation`](Self::take_reservation)'s taker.
    pub(crate) fn create_file_as(
        path: &Path,
        len: u64,
        exclusive: bool,
        reserve_now: bool,
    ) -> Result<Self> {
        check_specs(&[RegionSpec { gpa: 0, len }])?;
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if exclusive {
            options.create_new(true);
        } else {
            options.create(true).truncate(true);
        }
        let file = options
            .open(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        // A hugetlbfs file takes only a whole number of huge pages as its length: reserved now,
        // as if asked to.
        let reserve_now = reserve_now
            || match file.set_len(len) {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => true,
                Err(e) => {
                    if exclusive {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(Error::io(
                        format!("sizing {} to {len} bytes", path.display()),
                        e,
                    ));
                }
            };
        let sized = if reserve_now {
            reserve(&file, path, len)
        } else {
            Ok(())
        };
        let mapped = sized.and_then(|()| Self::map_file(&file, path, true));
        let mut mem = mapped.inspect_err(|_| {
            // Created here, so ours to remove (an existing file it truncated stays).
            if exclusive {
                let _ = std::fs::remove_file(path);
            }
        })?;
        mem.regions[0].initially_zero = AtomicBool::new(true);
        if !reserve_now {
            mem.reservation = std::sync::Mutex::new(Some(image::Reservation {
                file,
                path: path.to_path_buf(),
                len,
                done: 0,
            }));
        }
        Ok(mem)
    }

    /// The space of a file this memory was made on and that is not reserved yet
    /// ([`ImageFile::create_reserving_while_received`]), for the caller to reserve; `None`
    /// once taken, and for all other memory.
    pub(crate) fn take_reservation(&self) -> Option<image::Reservation> {
        self.reservation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Puts back what is left of a reservation taken with
    /// [`take_reservation`](Self::take_reservation), for the next taker (the image's commit).
    pub(crate) fn put_reservation(&self, r: image::Reservation) {
        *self.reservation.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    fn map_file(file: &File, path: &Path, writable: bool) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?
            .len();
        if len == 0 || len % PAGE_BYTES as u64 != 0 {
            return Err(Error::Config(format!(
                "{} is {len} bytes; a RAM image must be a positive multiple of {PAGE_BYTES} bytes",
                path.display()
            )));
        }
        // The length mapped is the length measured: mapped without one, memmap2 would ask the
        // file again, and a file truncated in between would leave `len` (which every bounds
        // check trusts) longer than the mapping. Mapped pages past a shrunken file's end raise
        // SIGBUS, which the guard turns into an error.
        let map_len = usize::try_from(len).map_err(|_| {
            Error::Config(format!(
                "{} is too large to map ({len} bytes)",
                path.display()
            ))
        })?;
        let mut options = MmapOptions::new();
        options.len(map_len);
        let raw = if writable {
            options.map_raw(file)
        } else {
            options.map_raw_read_only(file)
        }
        .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        // Best effort, as for anonymous memory: a tmpfs mounted `huge=advise` gives 2 MiB pages
        // only to mappings advised so (QEMU advises guest RAM the same way); elsewhere it
        // changes nothing (hugetlbfs refuses it, and has huge pages anyway).
        let _ = raw.advise(memmap2::Advice::HugePage);
        let host = NonNull::new(raw.as_mut_ptr())
            .ok_or_else(|| Error::Config("the kernel returned a null mapping".into()))?;
        Ok(GuestMemory {
            regions: vec![Region {
                gpa: 0,
                len,
                host,
                initially_zero: AtomicBool::new(false),
                writable,
                guard: crate::sigbus::guard(raw.as_mut_ptr(), raw.len()),
                _backing: Backing::Mapped(raw),
            }],
            reservation: Default::default(),
        })
    }

    /// The first SIGBUS a file-backed region took since the last call (the file was truncated
    /// or could not be backed), as an error naming the region and page. Shards check it after
    /// each frame. (A handler maps an anonymous page over the faulting one and records the
    /// fault, so the process lives on to report it.)
    pub fn take_fault(&self) -> Result<()> {
        for (i, r) in self.regions.iter().enumerate() {
            if let Some(offset) = r.guard.as_ref().and_then(|g| g.take_fault()) {
                return Err(Error::MemoryFault {
                    region: i as u32,
                    page: offset as u64 / PAGE_BYTES as u64,
                });
            }
        }
        Ok(())
    }

    /// Flushes file-backed regions to their files (`msync(MS_SYNC)`).
    pub fn sync(&self) -> Result<()> {
        for r in &self.regions {
            if let Backing::Mapped(map) = &r._backing {
                map.flush()
                    .map_err(|e| Error::io("writing the received image back to its file", e))?;
            }
        }
        Ok(())
    }

    /// Wraps memory the caller already has mapped (a VMM's guest RAM).
    ///
    /// # Safety
    /// Each `(spec, host)` pair must describe `spec.len` bytes mapped readable and writable at
    /// `host`, staying mapped until the `GuestMemory` and everything holding it
    /// (senders, receivers) are dropped. The caller must not hold Rust references to that memory
    /// while pagewire uses it.
    pub unsafe fn from_raw(regions: &[(RegionSpec, NonNull<u8>)]) -> Result<Self> {
        let specs: Vec<RegionSpec> = regions.iter().map(|(s, _)| *s).collect();
        check_specs(&specs)?;
        Ok(GuestMemory {
            regions: regions
                .iter()
                .map(|&(s, host)| Region {
                    gpa: s.gpa,
                    len: s.len,
                    host,
                    initially_zero: AtomicBool::new(false),
                    writable: true,
                    guard: None,
                    _backing: Backing::External,
                })
                .collect(),
            reservation: Default::default(),
        })
    }

    /// Like [`from_raw`](Self::from_raw), keeping `owner` (what owns the mappings, such as a
    /// VMM crate's guest memory object) alive for as long as this memory.
    ///
    /// # Safety
    /// As for [`from_raw`](Self::from_raw), except that the mappings need only live as long
    /// as `owner` does.
    pub unsafe fn from_raw_kept(
        regions: &[(RegionSpec, NonNull<u8>)],
        owner: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<Self> {
        // SAFETY: the caller's promise, with "until dropped" provided by `owner` below.
        let mut memory = unsafe { Self::from_raw(regions) }?;
        for r in &mut memory.regions {
            r._backing = Backing::Kept(owner.clone());
        }
        Ok(memory)
    }

    /// Marks the regions whose guest-physical start `read_only` picks as mapped read-only
    /// (a VMM's ROM), so that nothing writes them.
    #[cfg_attr(not(feature = "vm-memory"), allow(dead_code))]
    pub(crate) fn mark_read_only(&mut self, read_only: impl Fn(u64) -> bool) {
        for r in &mut self.regions {
            if read_only(r.gpa) {
                r.writable = false;
            }
        }
    }

    /// The regions, in guest-physical order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes across regions.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Faults in part `part` of `parts` of the writable memory (its bytes split evenly, in
    /// 2 MiB-aligned pieces) with `MADV_POPULATE_WRITE`, so that pages placed later cost no
    /// fault on the hot path; contents are left as they are, so it may run while others read
    /// and write the memory. Read-only regions are skipped. Works in steps of
    /// `PREFAULT_STEP_BYTES` and returns early once `stop` is set. `Ok(false)` when the kernel
    /// lacks `MADV_POPULATE_WRITE` (before 5.14): nothing was done.
    pub fn prefault(&self, part: usize, parts: usize, stop: &AtomicBool) -> Result<bool> {
        const PIECE_BYTES: u64 = 2 << 20;
        let parts = parts.max(1) as u64;
        let writable: Vec<&Region> = self.regions.iter().filter(|r| r.writable).collect();
        let total: u64 = writable.iter().map(|r| r.len).sum();
        let share = total.div_ceil(parts).div_ceil(PIECE_BYTES) * PIECE_BYTES;
        let (from, to) = (share * part as u64, (share * (part as u64 + 1)).min(total));
        let mut at = 0u64;
        for r in writable {
            let (mut lo, hi) = (from.max(at), to.min(at + r.len));
            while lo < hi {
                if stop.load(Ordering::Relaxed) {
                    return Ok(true);
                }
                let step = (hi - lo).min(PREFAULT_STEP_BYTES);
                // MADV_POPULATE_WRITE gives a page of the shared zero page a private zeroed copy.
                // SAFETY: `lo - at + step` is in the mapping, alive as long as `self`; populating
                // leaves contents unchanged, so it is sound beside readers and writers.
                let rc = unsafe {
                    libc::madvise(
                        r.host.as_ptr().add((lo - at) as usize).cast(),
                        step as usize,
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                if rc != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        return Ok(false);
                    }
                    return Err(Error::io("pre-faulting destination memory", e));
                }
                lo += step;
            }
            at += r.len;
        }
        Ok(true)
    }

    /// Faults all writable memory in with `threads` threads (see [`prefault`](Self::prefault)),
    /// as QEMU's `-mem-prealloc` does: done before a transfer, no page it places costs a fault.
    /// `Ok(false)` when the kernel lacks `MADV_POPULATE_WRITE`.
    pub fn prefault_in_parallel(&self, threads: usize, stop: &AtomicBool) -> Result<bool> {
        let threads = threads.max(1);
        std::thread::scope(|scope| {
            let parts: Vec<_> = (0..threads)
                .map(|part| scope.spawn(move || self.prefault(part, threads, stop)))
                .collect();
            let mut supported = true;
            for p in parts {
                supported &= p
                    .join()
                    .map_err(|_| Error::Internal("a pre-fault thread panicked".into()))??;
            }
            Ok(supported)
        })
    }

    /// Total pages across regions.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(Region::pages).sum()
    }

    /// Pages per region, in order (what a receiver checks frames against).
    pub fn region_pages(&self) -> Vec<u64> {
        self.regions.iter().map(Region::pages).collect()
    }

    /// Digest of the layout as exchanged in the handshake.
    pub fn layout_digest(&self) -> u64 {
        layout_digest(self.regions.iter().map(|r| (r.gpa, r.len)))
    }

    /// The first page (region index, page index) where `self` and `other` differ, or `None` when
    /// the layouts and every byte are equal. Layout differences report page 0 of region 0.
    pub fn first_difference(&self, other: &GuestMemory) -> Option<(usize, u64)> {
        let same_layout = self.regions.len() == other.regions.len()
            && self
                .regions
                .iter()
                .zip(&other.regions)
                .all(|(a, b)| a.gpa == b.gpa && a.len == b.len);
        if !same_layout {
            return Some((0, 0));
        }
        // Compare in 1 MiB steps with memcmp (fast), then find the page inside a differing step.
        const STEP_PAGES: u64 = 256;
        for (i, (a, b)) in self.regions.iter().zip(&other.regions).enumerate() {
            let mut page = 0;
            while page < a.pages() {
                let n = STEP_PAGES.min(a.pages() - page);
                let equal = ranges_equal(a, b, page, n);
                // A page of a file that cannot be backed read as the handler's zeros (see
                // `crate::sigbus`): it differs, whatever it compared as.
                if let Err(Error::MemoryFault { region, page }) =
                    self.take_fault().and_then(|()| other.take_fault())
                {
                    return Some((region as usize, page));
                }
                if !equal {
                    let bad = (page..page + n)
                        .find(|&p| !ranges_equal(a, b, p, 1))
                        .unwrap_or(page);
                    return Some((i, bad));
                }
                page += n;
            }
        }
        None
    }
}

fn ranges_equal(a: &Region, b: &Region, first_page: u64, pages: u64) -> bool {
    let pa = a.pages_ptr(first_page, pages);
    let pb = b.pages_ptr(first_page, pages);
    // SAFETY: both ranges are inside their mappings (pages_ptr checked); memcmp reads through raw
    // pointers and forms no Rust references.
    unsafe { libc::memcmp(pa.cast(), pb.cast(), (pages as usize) * PAGE_BYTES) == 0 }
}

#[cfg(test)]
mod tests;
