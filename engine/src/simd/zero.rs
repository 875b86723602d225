//! Zero-page detection, runtime-dispatched: AVX-512, AVX2, a portable 64-bit OR-reduce, and a
//! byte-at-a-time scalar reference the others are tested against.
//!
//! Detection is memory-bound: OR-reducing 256-byte blocks with an early exit reads ~25 GB/s per
//! core from DRAM, while a byte-wise loop is 7–30× slower. Non-zero pages usually exit on the
//! first block, so the scan costs almost nothing for them.
//!
//! All variants read through raw pointers (guest memory is never borrowed as a slice, see
//! [`crate::memory`]); a page changing under the scan gives an answer for some mix of old and
//! new bytes, which is fine because the dirty log resends it.

/// Bytes each vector variant reduces between early-exit checks.
const BLOCK_BYTES: usize = 256;

/// Which implementation a scanner uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroScanKind {
    /// One byte at a time: the reference.
    Scalar,
    /// 64-bit words, 256-byte blocks: any CPU.
    Portable,
    /// 32-byte AVX2 vectors.
    Avx2,
    /// 64-byte AVX-512 vectors.
    Avx512,
}

impl ZeroScanKind {
    /// Stable lowercase name (for stats and benchmarks).
    pub fn name(self) -> &'static str {
        match self {
            ZeroScanKind::Scalar => "scalar",
            ZeroScanKind::Portable => "portable",
            ZeroScanKind::Avx2 => "avx2",
            ZeroScanKind::Avx512 => "avx512",
        }
    }
}

type ScanFn = unsafe fn(*const u8, usize) -> bool;

/// A zero scanner bound to one implementation at construction (no per-call dispatch).
#[derive(Clone, Copy)]
pub struct ZeroScanner {
    kind: ZeroScanKind,
    scan: ScanFn,
}

impl std::fmt::Debug for ZeroScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ZeroScanner").field(&self.kind).finish()
    }
}

impl ZeroScanner {
    /// The fastest implementation this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                return Self::with_kind(ZeroScanKind::Avx512).unwrap_or_else(Self::portable);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Self::with_kind(ZeroScanKind::Avx2).unwrap_or_else(Self::portable);
            }
        }
        Self::portable()
    }

    fn portable() -> Self {
        ZeroScanner {
            kind: ZeroScanKind::Portable,
            scan: scan_portable,
        }
    }

    /// A scanner of the given kind, or `None` when this CPU cannot run it.
    pub fn with_kind(kind: ZeroScanKind) -> Option<Self> {
        let scan: ScanFn = match kind {
            ZeroScanKind::Scalar => scan_scalar,
            ZeroScanKind::Portable => scan_portable,
            #[cfg(target_arch = "x86_64")]
            ZeroScanKind::Avx2 if std::arch::is_x86_feature_detected!("avx2") => scan_avx2_entry,
            #[cfg(target_arch = "x86_64")]
            ZeroScanKind::Avx512
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw") =>
            {
                scan_avx512_entry
            }
            _ => return None,
        };
        Some(ZeroScanner { kind, scan })
    }

    /// Every kind this CPU can run, reference first.
    pub fn available() -> Vec<ZeroScanner> {
        [
            ZeroScanKind::Scalar,
            ZeroScanKind::Portable,
            ZeroScanKind::Avx2,
            ZeroScanKind::Avx512,
        ]
        .into_iter()
        .filter_map(Self::with_kind)
        .collect()
    }

    /// The implementation in use.
    pub fn kind(&self) -> ZeroScanKind {
        self.kind
    }

    /// True when all `len` bytes from `ptr` are zero.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be readable memory for the duration of the call.
    pub unsafe fn is_zero_raw(&self, ptr: *const u8, len: usize) -> bool {
        // SAFETY: forwarded from the caller; `scan` was chosen only if the CPU supports it.
        unsafe { (self.scan)(ptr, len) }
    }

    /// True when `bytes` is all zero (for ordinary Rust buffers).
    pub fn is_zero(&self, bytes: &[u8]) -> bool {
        // SAFETY: a slice is readable for its whole length.
        unsafe { self.is_zero_raw(bytes.as_ptr(), bytes.len()) }
    }
}

/// # Safety
/// `ptr..ptr + len` readable.
unsafe fn scan_scalar(ptr: *const u8, len: usize) -> bool {
    for i in 0..len {
        // SAFETY: i < len, inside the caller's readable range.
        if unsafe { ptr.add(i).read_volatile() } != 0 {
            return false;
        }
    }
    true
}

/// # Safety
/// `ptr..ptr + len` readable.
unsafe fn scan_portable(ptr: *const u8, len: usize) -> bool {
    let blocks = len / BLOCK_BYTES;
    for b in 0..blocks {
        let mut acc = 0u64;
        for w in 0..BLOCK_BYTES / 8 {
            // SAFETY: b * 256 + w * 8 + 8 <= blocks * 256 <= len; unaligned reads are allowed.
            acc |= unsafe {
                ptr.add(b * BLOCK_BYTES + w * 8)
                    .cast::<u64>()
                    .read_unaligned()
            };
        }
        if acc != 0 {
            return false;
        }
    }
    // SAFETY: the tail lies within the caller's range.
    unsafe { scan_scalar(ptr.add(blocks * BLOCK_BYTES), len % BLOCK_BYTES) }
}

/// # Safety
/// `ptr..ptr + len` readable.
#[cfg(target_arch = "x86_64")]
unsafe fn scan_avx2_entry(ptr: *const u8, len: usize) -> bool {
    // SAFETY: only installed by `with_kind` after checking the CPU has AVX2.
    unsafe { scan_avx2(ptr, len) }
}

/// # Safety
/// `ptr..ptr + len` readable, CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(ptr: *const u8, len: usize) -> bool {
    use std::arch::x86_64::*;
    let blocks = len / BLOCK_BYTES;
    for b in 0..blocks {
        // SAFETY: b < blocks, so the block lies inside the caller's range.
        let base = unsafe { ptr.add(b * BLOCK_BYTES) };
        let mut acc = _mm256_setzero_si256();
        for v in 0..BLOCK_BYTES / 32 {
            // SAFETY: base + v*32 + 32 <= ptr + blocks*256 <= ptr + len; loadu allows unaligned.
            acc = _mm256_or_si256(acc, unsafe { _mm256_loadu_si256(base.add(v * 32).cast()) });
        }
        if _mm256_testz_si256(acc, acc) == 0 {
            return false;
        }
    }
    // SAFETY: the tail lies within the caller's range.
    unsafe { scan_portable(ptr.add(blocks * BLOCK_BYTES), len % BLOCK_BYTES) }
}

/// # Safety
/// `ptr..ptr + len` readable.
#[cfg(target_arch = "x86_64")]
unsafe fn scan_avx512_entry(ptr: *const u8, len: usize) -> bool {
    // SAFETY: only installed by `with_kind` after checking the CPU has AVX-512 F and BW.
    unsafe { scan_avx512(ptr, len) }
}

/// # Safety
/// `ptr..ptr + len` readable, CPU has AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn scan_avx512(ptr: *const u8, len: usize) -> bool {
    use std::arch::x86_64::*;
    let blocks = len / BLOCK_BYTES;
    for b in 0..blocks {
        // SAFETY: b < blocks, so the block lies inside the caller's range.
        let base = unsafe { ptr.add(b * BLOCK_BYTES) };
        // SAFETY: all four loads lie in base..base + 256 <= ptr + len; loadu allows unaligned
        // addresses.
        let (v0, v1, v2, v3) = unsafe {
            (
                _mm512_loadu_si512(base.cast()),
                _mm512_loadu_si512(base.add(64).cast()),
                _mm512_loadu_si512(base.add(128).cast()),
                _mm512_loadu_si512(base.add(192).cast()),
            )
        };
        let acc = _mm512_or_si512(_mm512_or_si512(v0, v1), _mm512_or_si512(v2, v3));
        if _mm512_test_epi64_mask(acc, acc) != 0 {
            return false;
        }
    }
    // SAFETY: the tail lies within the caller's range.
    unsafe { scan_portable(ptr.add(blocks * BLOCK_BYTES), len % BLOCK_BYTES) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const PAGE: usize = crate::limits::PAGE_BYTES;

    #[test]
    fn every_variant_agrees_with_the_reference_on_single_bytes_at_every_offset() {
        let scanners = ZeroScanner::available();
        assert!(scanners.len() >= 2, "at least scalar and portable");
        let reference = ZeroScanner::with_kind(ZeroScanKind::Scalar).unwrap();
        // One page plus slack so we can also start at unaligned addresses.
        let mut buf = vec![0u8; PAGE + 64];
        for start in [0usize, 1, 7, 31, 63] {
            for len in [PAGE, PAGE - 1, 255, 257, 0] {
                let window = start..start + len;
                for s in &scanners {
                    assert!(s.is_zero(&buf[window.clone()]), "{:?} on zeros", s.kind());
                }
                for pos in window.clone() {
                    for value in [1u8, 0x80, 0xff] {
                        buf[pos] = value;
                        let want = reference.is_zero(&buf[window.clone()]);
                        assert!(!want);
                        for s in &scanners {
                            assert_eq!(
                                s.is_zero(&buf[window.clone()]),
                                want,
                                "{:?}: byte {value:#x} at {pos} of window {window:?}",
                                s.kind()
                            );
                        }
                        buf[pos] = 0;
                    }
                }
            }
        }
    }

    #[test]
    fn every_variant_agrees_on_random_pages() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let reference = ZeroScanner::with_kind(ZeroScanKind::Scalar).unwrap();
        let mut page = vec![0u8; PAGE];
        for _ in 0..2000 {
            page.fill(0);
            // Sparse pages: a few set bytes at random places, sometimes none.
            for _ in 0..rng.gen_range(0..3) {
                let at = rng.gen_range(0..PAGE);
                page[at] = rng.gen();
            }
            let want = reference.is_zero(&page);
            for s in ZeroScanner::available() {
                assert_eq!(s.is_zero(&page), want, "{:?}", s.kind());
            }
        }
    }

    #[test]
    fn detect_picks_a_vector_unit_when_present() {
        let s = ZeroScanner::detect();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            assert_ne!(s.kind(), ZeroScanKind::Portable);
        }
        assert!(s.is_zero(&[0u8; 4096]));
    }
}
