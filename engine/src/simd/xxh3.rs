//! XXH3-64 (seed 0, default secret) over raw pointers: the payload checksum of plaintext
//! transfers, one per page.
//!
//! # Why XXH3, and why written here
//! The checksum must cost little next to two kernel copies per byte. Measured with
//! `pagewire-bench checksum` on this project's 2-core machine, one core, 512 KiB at a time:
//! this XXH3 runs at ~39 GiB/s in cache and ~9.7 GiB/s from DRAM, CRC32C with the `crc32`
//! instruction (the `crc32c` crate) at ~27 and ~11; the receiver hashes pages the kernel has
//! just written (in cache), so XXH3 was chosen. No crate can hash guest memory without a
//! `&[u8]` over it, which pagewire never forms (vCPUs write it concurrently), so XXH3's
//! long-input path is implemented here over raw pointers and checked against `xxhash-rust`.
//! Only inputs over 240 bytes are supported (pages are 4 KiB).
//!
//! Three loops, picked at run time: AVX-512 (one register holds the eight accumulators; whole
//! blocks keep their keys in registers), AVX2, and the scalar reference. On the same machine
//! (2026-11, a noisier host: DRAM figures vary run to run) AVX-512 measured 36–38 GiB/s in cache
//! and 7.0–8.2 from DRAM, AVX2 33–35 and 6.1–6.8. The in-cache rate is bound by the vector
//! ports (a stripe is about six 512-bit operations on two ports), not by loads.
//!
//! The algorithm (XXH3 long input): 8 × u64 accumulators consume 64-byte stripes, each keyed
//! with the secret at an 8-byte step; every 16 stripes (a 1 KiB block) the accumulators are
//! scrambled; the last 64 bytes are always consumed as a final stripe with their own key; the
//! accumulators are merged and avalanched with the length.

use std::fmt;

const STRIPE_BYTES: usize = 64;
const SECRET_BYTES: usize = 192;
const STRIPES_PER_BLOCK: usize = (SECRET_BYTES - STRIPE_BYTES) / 8;
/// How far ahead the vector loop asks for data (see `consume_avx2`).
const PREFETCH_AHEAD_BYTES: usize = 1024;
const SECRET_LIMIT: usize = SECRET_BYTES - STRIPE_BYTES;
const SECRET_LASTACC_START: usize = 7;
const SECRET_MERGEACCS_START: usize = 11;
/// Shorter inputs take other XXH3 paths, which payloads (whole pages) never need.
pub const INPUT_BYTES_MIN: u64 = 241;

const PRIME32_1: u64 = 0x9E37_79B1;
const PRIME32_2: u64 = 0x85EB_CA77;
const PRIME32_3: u64 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

/// XXH3's default secret (`kSecret`).
const SECRET: [u8; SECRET_BYTES] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

/// Consumes `stripes` consecutive stripes at `input` into the accumulators, the first keyed as
/// stripe `in_block` of its 1 KiB block, scrambling at every block end; returns the new
/// position in the block.
type ConsumeFn = unsafe fn(&mut [u64; 8], usize, *const u8, usize) -> usize;

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// # Safety
/// `input..input + 64 * stripes` must be readable; `in_block < STRIPES_PER_BLOCK`.
unsafe fn consume_scalar(
    acc: &mut [u64; 8],
    mut in_block: usize,
    input: *const u8,
    stripes: usize,
) -> usize {
    for n in 0..stripes {
        let key_at = 8 * in_block;
        for i in 0..8 {
            // SAFETY: stripe n lies within the readable range (caller), i * 8 + 8 <= 64.
            let data = unsafe {
                input
                    .add(n * STRIPE_BYTES + 8 * i)
                    .cast::<u64>()
                    .read_unaligned()
            };
            let data = u64::from_le(data);
            let keyed = data ^ read_u64(&SECRET, key_at + 8 * i);
            acc[i ^ 1] = acc[i ^ 1].wrapping_add(data);
            acc[i] = acc[i].wrapping_add((keyed & 0xFFFF_FFFF).wrapping_mul(keyed >> 32));
        }
        in_block += 1;
        if in_block == STRIPES_PER_BLOCK {
            scramble(acc);
            in_block = 0;
        }
    }
    in_block
}

/// # Safety
/// As [`consume_scalar`], and the CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn consume_avx2(
    acc: &mut [u64; 8],
    mut in_block: usize,
    input: *const u8,
    stripes: usize,
) -> usize {
    use std::arch::x86_64::*;
    // SAFETY: `acc` is 64 bytes; unaligned loads of its two 32-byte halves stay in it.
    let (mut a0, mut a1) = unsafe {
        (
            _mm256_loadu_si256(acc.as_ptr().cast()),
            _mm256_loadu_si256(acc.as_ptr().add(4).cast()),
        )
    };
    let prime = _mm256_set1_epi32(PRIME32_1 as i32);
    for n in 0..stripes {
        // SAFETY: stripe n is readable (caller); the key lies within SECRET because
        // 8 * in_block + 64 <= 8 * (STRIPES_PER_BLOCK - 1) + 64 < SECRET_BYTES.
        let (d0, d1, k0, k1) = unsafe {
            let p = input.add(n * STRIPE_BYTES);
            // A single sequential stream is bound by the hardware prefetcher; asking for the
            // line 1 KiB ahead lifts the rate from DRAM (a hint: never faults, even past the end).
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD_BYTES).cast());
            let k = SECRET.as_ptr().add(8 * in_block);
            (
                _mm256_loadu_si256(p.cast()),
                _mm256_loadu_si256(p.add(32).cast()),
                _mm256_loadu_si256(k.cast()),
                _mm256_loadu_si256(k.add(32).cast()),
            )
        };
        for (a, d, k) in [(&mut a0, d0, k0), (&mut a1, d1, k1)] {
            let keyed = _mm256_xor_si256(d, k);
            let hi = _mm256_shuffle_epi32(keyed, 0x31);
            let product = _mm256_mul_epu32(keyed, hi);
            let swapped = _mm256_shuffle_epi32(d, 0x4E);
            *a = _mm256_add_epi64(_mm256_add_epi64(*a, swapped), product);
        }
        in_block += 1;
        if in_block == STRIPES_PER_BLOCK {
            // Scramble: a ^= a >> 47; a ^= key; a *= PRIME32_1 (64 × 32-bit, as two halves).
            // SAFETY: SECRET_LIMIT + 64 == SECRET_BYTES.
            let (s0, s1) = unsafe {
                let k = SECRET.as_ptr().add(SECRET_LIMIT);
                (
                    _mm256_loadu_si256(k.cast()),
                    _mm256_loadu_si256(k.add(32).cast()),
                )
            };
            for (a, k) in [(&mut a0, s0), (&mut a1, s1)] {
                let x = _mm256_xor_si256(_mm256_xor_si256(*a, _mm256_srli_epi64(*a, 47)), k);
                let lo = _mm256_mul_epu32(x, prime);
                let hi = _mm256_mul_epu32(_mm256_shuffle_epi32(x, 0x31), prime);
                *a = _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
            }
            in_block = 0;
        }
    }
    // SAFETY: as for the loads.
    unsafe {
        _mm256_storeu_si256(acc.as_mut_ptr().cast(), a0);
        _mm256_storeu_si256(acc.as_mut_ptr().add(4).cast(), a1);
    }
    in_block
}

/// # Safety
/// As [`consume_scalar`], and the CPU must support AVX-512F. One 512-bit register holds all
/// eight accumulators. Whole 1 KiB blocks keep their 16 keys in registers (no loads of the
/// secret, which straddle cache lines at its 8-byte step) and sum even and odd stripes in two
/// registers, so consecutive stripes do not wait on each other's adds; the sum is the same, as
/// addition modulo 2^64 is associative.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn consume_avx512(
    acc: &mut [u64; 8],
    mut in_block: usize,
    input: *const u8,
    stripes: usize,
) -> usize {
    use std::arch::x86_64::*;
    /// One stripe's addend: lo32(d ^ k) * hi32(d ^ k) into lane i, d[i] into lane i ^ 1.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn addend(d: __m512i, k: __m512i) -> __m512i {
        let keyed = _mm512_xor_si512(d, k);
        let product = _mm512_mul_epu32(keyed, _mm512_srli_epi64::<32>(keyed));
        _mm512_add_epi64(product, _mm512_shuffle_epi32::<0x4E>(d))
    }
    /// The block-end scramble: a ^= a >> 47; a ^= key; a *= PRIME32_1.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn scramble(a: __m512i, key: __m512i, prime: __m512i) -> __m512i {
        // Three-way XOR in one instruction (truth table 0x96).
        let x = _mm512_ternarylogic_epi64::<0x96>(a, _mm512_srli_epi64::<47>(a), key);
        let lo = _mm512_mul_epu32(x, prime);
        let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(x), prime);
        _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi))
    }
    // SAFETY: `acc` is 64 bytes; an unaligned 64-byte load stays in it.
    let mut a = unsafe { _mm512_loadu_si512(acc.as_ptr().cast()) };
    let prime = _mm512_set1_epi32(PRIME32_1 as i32);
    // SAFETY: 8 * i + 64 <= 8 * (STRIPES_PER_BLOCK - 1) + 64 < SECRET_BYTES, and
    // SECRET_LIMIT + 64 == SECRET_BYTES.
    let (keys, scramble_key): ([__m512i; STRIPES_PER_BLOCK], __m512i) = unsafe {
        (
            std::array::from_fn(|i| _mm512_loadu_si512(SECRET.as_ptr().add(8 * i).cast())),
            _mm512_loadu_si512(SECRET.as_ptr().add(SECRET_LIMIT).cast()),
        )
    };
    let stripe = |n: usize| {
        // One sequential stream is bound by the hardware prefetcher; this hint runs 1 KiB ahead.
        // SAFETY: called only for n < stripes, so the stripe is readable (caller); the prefetch
        // is a hint and never faults, even past the end.
        unsafe {
            let p = input.add(n * STRIPE_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD_BYTES).cast());
            _mm512_loadu_si512(p.cast())
        }
    };
    let mut n = 0;
    while n < stripes {
        if in_block == 0 && stripes - n >= STRIPES_PER_BLOCK {
            let (mut even, mut odd) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for j in (0..STRIPES_PER_BLOCK).step_by(2) {
                even = _mm512_add_epi64(even, addend(stripe(n + j), keys[j]));
                odd = _mm512_add_epi64(odd, addend(stripe(n + j + 1), keys[j + 1]));
            }
            a = scramble(
                _mm512_add_epi64(a, _mm512_add_epi64(even, odd)),
                scramble_key,
                prime,
            );
            n += STRIPES_PER_BLOCK;
            continue;
        }
        a = _mm512_add_epi64(a, addend(stripe(n), keys[in_block]));
        n += 1;
        in_block += 1;
        if in_block == STRIPES_PER_BLOCK {
            a = scramble(a, scramble_key, prime);
            in_block = 0;
        }
    }
    // SAFETY: as for the load.
    unsafe { _mm512_storeu_si512(acc.as_mut_ptr().cast(), a) };
    in_block
}

fn scramble(acc: &mut [u64; 8]) {
    for (i, a) in acc.iter_mut().enumerate() {
        let key = read_u64(&SECRET, SECRET_LIMIT + 8 * i);
        let mut x = *a;
        x ^= x >> 47;
        x ^= key;
        *a = x.wrapping_mul(PRIME32_1);
    }
}

fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

fn mul_fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Which loop hashes here: AVX-512 or AVX2 when the CPU has it, else the scalar reference.
#[derive(Clone, Copy)]
pub struct Xxh3 {
    consume: ConsumeFn,
}

impl fmt::Debug for Xxh3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Xxh3")
    }
}

impl Default for Xxh3 {
    fn default() -> Self {
        Self::detect()
    }
}

impl Xxh3 {
    /// The fastest implementation this CPU supports.
    pub fn detect() -> Self {
        Self::avx512()
            .or_else(Self::avx2)
            .unwrap_or_else(Self::scalar)
    }

    /// The AVX-512 loop, when this CPU has AVX-512F.
    pub fn avx512() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Xxh3 {
                consume: consume_avx512,
            });
        }
        None
    }

    /// The AVX2 loop, when this CPU has AVX2.
    pub fn avx2() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Some(Xxh3 {
                consume: consume_avx2,
            });
        }
        None
    }

    /// The portable scalar loop (the reference the vector one is tested against).
    pub fn scalar() -> Self {
        Xxh3 {
            consume: consume_scalar,
        }
    }

    /// XXH3-64 of the `len` bytes at `ptr`. Panics below [`INPUT_BYTES_MIN`] bytes.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be readable for the duration of the call. The bytes may change
    /// concurrently (guest memory): the hash is then of some mix of old and new bytes.
    pub unsafe fn hash_raw(self, ptr: *const u8, len: usize) -> u64 {
        assert!(
            len as u64 >= INPUT_BYTES_MIN,
            "XXH3 long path needs at least {INPUT_BYTES_MIN} bytes, got {len}"
        );
        let mut acc = [
            PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
        ];
        // Every whole stripe but the last byte's, then the last 64 bytes as the final stripe.
        let stripes = (len - 1) / STRIPE_BYTES;
        // SAFETY: stripes * 64 < len readable bytes (caller).
        unsafe { (self.consume)(&mut acc, 0, ptr, stripes) };
        let mut last = [0u8; STRIPE_BYTES];
        // SAFETY: the last 64 of `len` (>= 241) readable bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                ptr.add(len - STRIPE_BYTES),
                last.as_mut_ptr(),
                STRIPE_BYTES,
            )
        };
        for i in 0..8 {
            let data = read_u64(&last, 8 * i);
            let keyed = data ^ read_u64(&SECRET, SECRET_LIMIT - SECRET_LASTACC_START + 8 * i);
            acc[i ^ 1] = acc[i ^ 1].wrapping_add(data);
            acc[i] = acc[i].wrapping_add((keyed & 0xFFFF_FFFF).wrapping_mul(keyed >> 32));
        }
        let mut result = (len as u64).wrapping_mul(PRIME64_1);
        for i in 0..4 {
            let at = SECRET_MERGEACCS_START + 16 * i;
            result = result.wrapping_add(mul_fold(
                acc[2 * i] ^ read_u64(&SECRET, at),
                acc[2 * i + 1] ^ read_u64(&SECRET, at + 8),
            ));
        }
        avalanche(result)
    }

    /// XXH3-64 of `bytes` (an ordinary Rust buffer).
    pub fn hash(self, bytes: &[u8]) -> u64 {
        // SAFETY: a slice is readable for its length.
        unsafe { self.hash_raw(bytes.as_ptr(), bytes.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(bytes: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(bytes)
    }

    #[test]
    fn matches_the_reference_for_every_length() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let data: Vec<u8> = (0..70_000).map(|_| rng.gen()).collect();
        let mut lengths: Vec<usize> = (241..1400).collect();
        lengths.extend([4096, 8192, 16384, 65536, 69_999]);
        for len in lengths {
            let input = &data[len % 7..len % 7 + len.min(70_000 - 7)];
            let want = reference(input);
            assert_eq!(Xxh3::detect().hash(input), want, "len {len}");
            assert_eq!(Xxh3::scalar().hash(input), want, "len {len} scalar");
            if let Some(h) = Xxh3::avx2() {
                assert_eq!(h.hash(input), want, "len {len} AVX2");
            }
            if let Some(h) = Xxh3::avx512() {
                assert_eq!(h.hash(input), want, "len {len} AVX-512");
            }
        }
    }
}
