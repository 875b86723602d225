//! One region of guest memory and the raw-pointer access to its bytes (see the contract in
//! the [module docs](super)).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::MmapRaw;

use crate::limits::PAGE_BYTES;
use crate::pipeline::zero::ZeroScanner;

use super::{GuestRange, GuestSrc};
/// Where a region's bytes live.
#[derive(Debug)]
pub(super) enum Backing {
    /// A mapping pagewire made and unmaps on drop.
    Mapped(#[allow(dead_code)] MmapRaw),
    /// Memory owned by the caller (a VMM's guest RAM).
    External,
    /// Memory owned by a value kept alive here (a VMM crate's guest memory object).
    Kept(#[allow(dead_code)] std::sync::Arc<dyn std::any::Any + Send + Sync>),
}

/// One region: `len` bytes of guest-physical space from `gpa`, mapped at `host`.
#[derive(Debug)]
pub struct Region {
    pub(super) gpa: u64,
    pub(super) len: u64,
    pub(super) host: NonNull<u8>,
    /// Zero as pagewire made it, and not written since (see [`Region::initially_zero`]).
    pub(super) initially_zero: AtomicBool,
    pub(super) writable: bool,
    /// SIGBUS protection of a file mapping; dropped (unregistered) before the mapping is.
    pub(super) guard: Option<crate::sigbus::Guard>,
    pub(super) _backing: Backing,
}

// SAFETY: a Region is a pointer to memory that stays mapped for the Region's lifetime (it owns the
// mapping, or the caller of `from_raw` promised it). pagewire only accesses it through raw
// pointers, never through references, so sharing it across threads creates no aliasing
// references; concurrent writes to the same page are the caller's business (torn pages are
// resent by the dirty log), exactly as for a vCPU.
unsafe impl Send for Region {}
// SAFETY: see `Send` above; all methods take `&self` and access memory through raw pointers.
unsafe impl Sync for Region {}

impl Region {
    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-length region (never constructed by pagewire).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_BYTES as u64
    }

    /// True while the region is known to hold only zeros: pagewire mapped it fresh (anonymous
    /// memory, a new image file) and nothing has written it since, so a zero page needs no
    /// store. The first receiver into the region takes the promise (a second transfer into
    /// the same memory stores its zero pages), and [`Region::write`] ends it. Writes through
    /// [`Region::host_addr`] are the caller's: memory written that way before a transfer into
    /// it must not be fresh memory.
    pub fn initially_zero(&self) -> bool {
        self.initially_zero.load(Ordering::Acquire)
    }

    /// Takes the promise of [`initially_zero`](Self::initially_zero) for a transfer that is
    /// about to write the region: true at most once.
    pub(crate) fn take_initially_zero(&self) -> bool {
        self.initially_zero.swap(false, Ordering::AcqRel)
    }

    /// Host address of the region's first byte, for callers that hand memory to the kernel
    /// themselves (benchmarks, VMM glue). Dereferencing it is the caller's `unsafe` business.
    pub fn host_addr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// Host address of byte `offset`. Panics when the range `offset..offset + len` is outside the
    /// region: callers check peer input before they get here, so this is our own invariant.
    pub(crate) fn host_ptr(&self, offset: u64, len: u64) -> *mut u8 {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "range {offset}+{len} outside region of {} bytes",
            self.len
        );
        // SAFETY: offset + len <= self.len (asserted), so the result stays inside the mapping.
        unsafe { self.host.as_ptr().add(offset as usize) }
    }

    /// Host address and length of a page range, checked.
    pub(crate) fn pages_ptr(&self, first_page: u64, pages: u64) -> *mut u8 {
        let bytes = |pages: u64| {
            pages.checked_mul(PAGE_BYTES as u64).unwrap_or_else(|| {
                panic!(
                    "page range {first_page}+{pages} outside region of {} bytes",
                    self.len
                )
            })
        };
        self.host_ptr(bytes(first_page), bytes(pages))
    }

    /// Copies `out.len()` bytes from `offset` into `out`.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let src = self.host_ptr(offset, out.len() as u64);
        // SAFETY: src..src+len is inside the mapping (host_ptr checked); `out` is a distinct Rust
        // buffer, so the ranges do not overlap; raw pointers, no reference to guest memory.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
    }

    /// True when the mapping may be written (destinations; sources may be read-only images).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn assert_writable(&self) {
        assert!(self.writable, "write to a region mapped read-only");
    }

    /// Copies `data` to `offset`. Panics on a read-only region.
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.assert_writable();
        let dst = self.host_ptr(offset, data.len() as u64);
        // Read first: a receiver's shards write page after page, and have taken the flag.
        if self.initially_zero.load(Ordering::Relaxed) {
            self.initially_zero.store(false, Ordering::Release);
        }
        // SAFETY: dst..dst+len is inside the mapping (host_ptr checked) and disjoint from `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
    }

    /// The range of `len` bytes at `offset`, checked against the mapping, for code that reads
    /// guest memory through a raw pointer (the TLS direct seal). Panics on a range outside it.
    pub(crate) fn range(&self, offset: u64, len: usize) -> GuestSrc {
        GuestSrc {
            ptr: self.host_ptr(offset, len as u64),
            len,
        }
    }

    /// The writable range of `len` bytes at `offset`, checked against the mapping, for code
    /// that writes guest memory through a raw pointer (the TLS direct open). Panics on a
    /// read-only region or a range outside it.
    pub(crate) fn range_mut(&self, offset: u64, len: usize) -> GuestRange {
        self.assert_writable();
        GuestRange {
            ptr: self.host_ptr(offset, len as u64),
            len,
        }
    }

    /// Writes zeros over `pages` pages from `first_page`. Panics on a read-only region.
    pub fn zero_pages(&self, first_page: u64, pages: u64) {
        self.assert_writable();
        let dst = self.pages_ptr(first_page, pages);
        // SAFETY: the range is inside the mapping (pages_ptr checked).
        unsafe { std::ptr::write_bytes(dst, 0, (pages as usize) * PAGE_BYTES) }
    }

    /// True when page `page` is all zero.
    pub fn page_is_zero(&self, scanner: &ZeroScanner, page: u64) -> bool {
        let ptr = self.pages_ptr(page, 1);
        // SAFETY: one whole page inside the mapping (pages_ptr checked).
        unsafe { scanner.is_zero_raw(ptr, PAGE_BYTES) }
    }

    /// The payload checksum (XXH3-64) of page `page`, read through raw pointers (a page a
    /// vCPU writes meanwhile hashes as some mix of old and new bytes).
    pub fn page_checksum(&self, hash: crate::simd::xxh3::Xxh3, page: u64) -> u64 {
        let ptr = self.pages_ptr(page, 1);
        // SAFETY: one whole page inside the mapping (pages_ptr checked), mapped while `self`
        // lives; the hash only reads it.
        unsafe { hash.hash_raw(ptr, PAGE_BYTES) }
    }
}
