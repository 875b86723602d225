//! Opening a TLS record straight into destination memory: AES-GCM decryption whose output is
//! guest pages, not the record's own buffer.
//!
//! # Why
//! A receiving TLS channel used to open each record in place in its staging slot and then copy
//! the plaintext to the destination pages: on this 2-core machine that copy was 18% of all CPU
//! of a pre-shared-key transfer (`perf`, 2 channels, random pages), the one copy plaintext does
//! not need. Decrypting is a copy already (CTR mode: ciphertext XOR keystream), so it can write
//! the pages itself.
//!
//! # Why this is safe to do before the tag is checked
//! AES-GCM checks the tag only after the whole record is decrypted, so the pages hold the
//! record's plaintext before anyone knows it is authentic. That is acceptable here because:
//! - nothing reads destination pages while a transfer runs (the destination guest is not
//!   running), and a page counts as placed only after its whole frame was opened and checked;
//! - a record that fails authentication fails the transfer, which then never reports success,
//!   so forged bytes in a page are never mistaken for the guest's (the same holds for the
//!   plaintext path, which receives straight into the pages before its checksums are checked);
//! - the bytes go only where the frame's authenticated header (opened in place before any of
//!   its payload) says this frame's pages are: never outside the region, never to a page of
//!   another frame.
//!
//! # Why aws-lc-sys
//! aws-lc-rs opens in place only, over a `&mut [u8]`, and pagewire never forms a reference over
//! guest memory (vCPUs or the kernel may write it). The streaming `EVP_CIPHER` interface of
//! AWS-LC decrypts to any output pointer, in pieces: the record's data to the pages, its inner
//! content type (one byte after the data) to a scratch byte, so not one byte lands past the
//! data. It runs the same AVX-512 AES-GCM code as aws-lc-rs's AEAD. ChaCha20-Poly1305 and the
//! `ring` provider keep the in-place open and the copy.

use std::ptr::NonNull;

use aws_lc_sys as sys;

use crate::memory::GuestRange;
use crate::pipeline::seal::Piece;

/// Bytes of the AES-GCM tag.
const TAG_BYTES: usize = 16;
/// Bytes of the AES-GCM nonce.
const NONCE_BYTES: usize = 12;

/// An AWS-LC cipher context keyed for AES-GCM, one direction: owned, freed on drop.
#[derive(Debug)]
struct GcmCtx {
    ctx: NonNull<sys::EVP_CIPHER_CTX>,
    encrypt: bool,
}

// SAFETY: the EVP_CIPHER_CTX is owned by this value alone and used only through `&mut` of its
// owner; AWS-LC contexts hold no thread-local state, so moving one to another thread is fine.
unsafe impl Send for GcmCtx {}

impl GcmCtx {
    /// A context for AES-GCM with `key` (16 bytes: AES-128, 32: AES-256), for encrypting or
    /// decrypting; `None` for any other key length or when AWS-LC refuses.
    fn new(key: &[u8], encrypt: bool) -> Option<GcmCtx> {
        let cipher = match key.len() {
            // SAFETY: returns a pointer to a static cipher description; no arguments.
            16 => unsafe { sys::EVP_aes_128_gcm() },
            // SAFETY: as above.
            32 => unsafe { sys::EVP_aes_256_gcm() },
            _ => return None,
        };
        // SAFETY: a fresh context or null; ownership passes to `GcmCtx`, freed in Drop.
        let fresh = unsafe { sys::EVP_CIPHER_CTX_new() };
        let ctx = GcmCtx {
            ctx: NonNull::new(fresh)?,
            encrypt,
        };
        // SAFETY: `ctx` is valid, `cipher` static, `key` `key.len()` readable bytes (the cipher's
        // key length); a null engine and IV are allowed (the IV is set per record).
        let ok = unsafe {
            let init = if encrypt {
                sys::EVP_EncryptInit_ex
            } else {
                sys::EVP_DecryptInit_ex
            };
            init(
                ctx.ctx.as_ptr(),
                cipher,
                std::ptr::null_mut(),
                key.as_ptr(),
                std::ptr::null(),
            )
        };
        (ok == 1).then_some(ctx)
    }

    /// Starts a record: sets its `nonce` and feeds the additional data `aad` (the record
    /// header). Returns the context pointer for the record's updates, or `None` when AWS-LC
    /// fails.
    fn begin(&mut self, nonce: &[u8; NONCE_BYTES], aad: &[u8]) -> Option<*mut sys::EVP_CIPHER_CTX> {
        let ctx = self.ctx.as_ptr();
        let mut n: std::ffi::c_int = 0;
        let aad_len = aad.len() as std::ffi::c_int;
        // SAFETY: `ctx` is keyed (`new`); null cipher/engine/key keep it and set the 12-byte IV
        // `nonce` only; the AAD update reads `aad.len()` bytes of `aad`, writes nothing (null out).
        let ok = unsafe {
            if self.encrypt {
                sys::EVP_EncryptInit_ex(
                    ctx,
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    nonce.as_ptr(),
                ) == 1
                    && sys::EVP_EncryptUpdate(
                        ctx,
                        std::ptr::null_mut(),
                        &mut n,
                        aad.as_ptr(),
                        aad_len,
                    ) == 1
            } else {
                sys::EVP_DecryptInit_ex(
                    ctx,
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    nonce.as_ptr(),
                ) == 1
                    && sys::EVP_DecryptUpdate(
                        ctx,
                        std::ptr::null_mut(),
                        &mut n,
                        aad.as_ptr(),
                        aad_len,
                    ) == 1
            }
        };
        ok.then_some(ctx)
    }
}

impl Drop for GcmCtx {
    fn drop(&mut self) {
        // SAFETY: the context came from EVP_CIPHER_CTX_new and is freed once, here.
        unsafe { sys::EVP_CIPHER_CTX_free(self.ctx.as_ptr()) }
    }
}

/// One direction's AES-GCM key, for opening records straight into guest memory.
#[derive(Debug)]
pub struct DirectOpener {
    ctx: GcmCtx,
}

impl DirectOpener {
    /// An opener for AES-GCM with `key` (16 bytes: AES-128, 32: AES-256); `None` for any
    /// other key length or when AWS-LC refuses.
    pub fn aes_gcm(key: &[u8]) -> Option<DirectOpener> {
        Some(DirectOpener {
            ctx: GcmCtx::new(key, false)?,
        })
    }

    /// Opens one record body (`ciphertext || tag`) sealed with `nonce` over `aad` (the record
    /// header): the first `dest.len()` plaintext bytes go to `dest`, the rest (the inner
    /// content type and any padding) to `tail`. Returns false, with `dest` and `tail` holding
    /// bytes of no meaning, when the record is not authentic.
    ///
    /// Panics unless `body.len() == dest.len() + tail.len() + 16`.
    pub fn open(
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        body: &[u8],
        dest: &GuestRange,
        tail: &mut [u8],
    ) -> bool {
        assert_eq!(
            body.len(),
            dest.len() + tail.len() + TAG_BYTES,
            "a record body is its plaintext and a tag"
        );
        let (ciphertext, tag) = body.split_at(body.len() - TAG_BYTES);
        let (to_dest, to_tail) = ciphertext.split_at(dest.len());
        let mut tag = <[u8; TAG_BYTES]>::try_from(tag).expect("split at TAG_BYTES");
        let Some(ctx) = self.ctx.begin(nonce, aad) else {
            return false;
        };
        let mut n: std::ffi::c_int = 0;
        let mut scratch = [0u8; 32];
        // Every call below: `ctx` is valid, keyed and started (`begin`). Inputs are slices
        // of the stated lengths. Outputs: `dest` is writable for `dest.len()` bytes for as
        // long as its GuestMemory lives (GuestRange's invariant, checked against the
        // mapping when it was made), and disjoint from `body` (a shard's staging slot);
        // `tail` is a slice of `to_tail.len()` bytes; GCM writes exactly as many bytes as it
        // reads, and the final call writes none (`scratch` is there for the API).
        // SAFETY: see the paragraph above; each FFI call gets only the pointers it names.
        unsafe {
            let parts = [(dest.as_mut_ptr(), to_dest), (tail.as_mut_ptr(), to_tail)];
            for (out, input) in parts {
                if input.is_empty() {
                    continue;
                }
                let len = input.len() as std::ffi::c_int;
                if sys::EVP_DecryptUpdate(ctx, out, &mut n, input.as_ptr(), len) != 1 || n != len {
                    return false;
                }
            }
            if sys::EVP_CIPHER_CTX_ctrl(
                ctx,
                sys::EVP_CTRL_GCM_SET_TAG as std::ffi::c_int,
                TAG_BYTES as std::ffi::c_int,
                tag.as_mut_ptr().cast(),
            ) != 1
            {
                return false;
            }
            sys::EVP_DecryptFinal_ex(ctx, scratch.as_mut_ptr(), &mut n) == 1
        }
    }
}

/// One direction's AES-GCM key, for sealing records whose plaintext is read where it lies
/// (guest memory, a header buffer): the encryption is the only pass over the data, with no
/// copy into the record first. The same streaming interface as [`DirectOpener`].
#[derive(Debug)]
pub struct DirectSealer {
    ctx: GcmCtx,
}

impl DirectSealer {
    /// A sealer for AES-GCM with `key` (16 or 32 bytes); `None` otherwise.
    pub fn aes_gcm(key: &[u8]) -> Option<DirectSealer> {
        Some(DirectSealer {
            ctx: GcmCtx::new(key, true)?,
        })
    }

    /// Seals the plaintext `pieces` followed by the inner `content_type` byte with `nonce`
    /// over `aad` into `out`: ciphertext, then the tag. Returns false when AWS-LC fails.
    ///
    /// Panics unless `out.len()` is the pieces' length + 1 + 16.
    pub fn seal(
        &mut self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        pieces: &[Piece<'_>],
        content_type: u8,
        out: &mut [u8],
    ) -> bool {
        let plain: usize = pieces.iter().map(Piece::len).sum();
        assert_eq!(
            out.len(),
            plain + 1 + TAG_BYTES,
            "a sealed record is its plaintext, a content type and a tag"
        );
        let Some(ctx) = self.ctx.begin(nonce, aad) else {
            return false;
        };
        let mut n: std::ffi::c_int = 0;
        let ct = [content_type];
        // Every call below: `ctx` is valid, keyed and started (`begin`). Inputs are Rust slices of
        // their lengths, or guest ranges readable for theirs (GuestSrc's invariant; a vCPU
        // may write them meanwhile, and the record then seals whatever bytes were read, as
        // the copy it replaces did). Each output is the next `len` bytes of `out`, within it
        // (asserted above), and GCM writes exactly as many bytes as it reads; `out` is a
        // Rust buffer disjoint from every input.
        // SAFETY: see the paragraph above; each FFI call gets only the pointers it names.
        unsafe {
            let mut at = 0usize;
            let inputs = pieces
                .iter()
                .map(|p| match p {
                    Piece::Bytes(b) => (b.as_ptr(), b.len()),
                    Piece::Guest(g) => (g.as_ptr(), g.len()),
                })
                .chain(std::iter::once((ct.as_ptr(), 1)));
            for (input, len) in inputs {
                if len == 0 {
                    continue;
                }
                let out_ptr = out.as_mut_ptr().add(at);
                let l = len as std::ffi::c_int;
                if sys::EVP_EncryptUpdate(ctx, out_ptr, &mut n, input, l) != 1 || n != l {
                    return false;
                }
                at += len;
            }
            if sys::EVP_EncryptFinal_ex(ctx, out.as_mut_ptr().add(at), &mut n) != 1 || n != 0 {
                return false;
            }
            sys::EVP_CIPHER_CTX_ctrl(
                ctx,
                sys::EVP_CTRL_GCM_GET_TAG as std::ffi::c_int,
                TAG_BYTES as std::ffi::c_int,
                out.as_mut_ptr().add(at).cast(),
            ) == 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
    use crate::memory::{GuestMemory, RegionSpec};

    fn sealed(alg: &'static crate::crypto::aead::Algorithm, key: &[u8], plain: &[u8]) -> Vec<u8> {
        let k = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
        let mut body = plain.to_vec();
        k.seal_in_place_append_tag(
            Nonce::assume_unique_for_key([7; 12]),
            Aad::from([1u8, 2, 3, 4, 5]),
            &mut body,
        )
        .unwrap();
        body
    }

    #[test]
    fn opens_into_guest_memory_and_not_a_byte_past_it() {
        for (alg, key) in [(&AES_128_GCM, vec![9u8; 16]), (&AES_256_GCM, vec![3u8; 32])] {
            let plain: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 1) as u8).collect();
            let mut record = plain.clone();
            record.push(0x17); // inner content type
            let body = sealed(alg, &key, &record);
            let memory = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 8192 }]).unwrap();
            let region = &memory.regions()[0];
            region.write(0, &[0xAA; 8192]);
            let dest = region.range_mut(100, plain.len());
            let mut tail = [0u8; 1];
            let mut o = DirectOpener::aes_gcm(&key).unwrap();
            assert!(o.open(&[7; 12], &[1, 2, 3, 4, 5], &body, &dest, &mut tail));
            assert_eq!(tail, [0x17]);
            let mut back = vec![0u8; 8192];
            region.read(0, &mut back);
            assert_eq!(&back[100..100 + plain.len()], &plain[..]);
            assert!(back[..100].iter().all(|&b| b == 0xAA), "nothing before");
            assert!(
                back[100 + plain.len()..].iter().all(|&b| b == 0xAA),
                "nothing after, not even the content type"
            );
        }
    }

    #[test]
    fn a_gathered_seal_is_the_aead_seal_of_the_pieces_together() {
        for key in [vec![9u8; 16], vec![3u8; 32]] {
            let alg = if key.len() == 16 {
                &AES_128_GCM
            } else {
                &AES_256_GCM
            };
            let memory = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 8192 }]).unwrap();
            let region = &memory.regions()[0];
            let page: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 5) as u8).collect();
            region.write(0, &page);
            let header = [1u8, 2, 3, 4, 5, 6, 7];
            let pieces = [
                Piece::Bytes(&header),
                Piece::Guest(region.range(100, 3000)),
                Piece::Bytes(&[]),
                Piece::Guest(region.range(5000, 2000)),
            ];
            let mut plain = header.to_vec();
            plain.extend_from_slice(&page[100..3100]);
            plain.extend_from_slice(&page[5000..7000]);
            plain.push(0x17);
            let want = sealed(alg, &key, &plain);
            let mut out = vec![0u8; want.len()];
            let mut s = DirectSealer::aes_gcm(&key).unwrap();
            assert!(s.seal(&[7; 12], &[1, 2, 3, 4, 5], &pieces, 0x17, &mut out));
            assert_eq!(out, want);
            // And the opener opens it.
            let dest_memory = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 8192 }]).unwrap();
            let dest = dest_memory.regions()[0].range_mut(0, plain.len() - 1);
            let mut tail = [0u8; 1];
            let mut o = DirectOpener::aes_gcm(&key).unwrap();
            assert!(o.open(&[7; 12], &[1, 2, 3, 4, 5], &out, &dest, &mut tail));
        }
    }

    #[test]
    fn a_forged_record_or_a_wrong_nonce_or_header_is_refused() {
        let key = [5u8; 16];
        let mut record = vec![0x42u8; 300];
        record.push(0x17);
        let body = sealed(&AES_128_GCM, &key, &record);
        let memory = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 4096 }]).unwrap();
        let dest = memory.regions()[0].range_mut(0, 300);
        let mut o = DirectOpener::aes_gcm(&key).unwrap();
        let mut tail = [0u8; 1];
        for i in [0, 150, 300, body.len() - 1] {
            let mut bad = body.clone();
            bad[i] ^= 1;
            assert!(!o.open(&[7; 12], &[1, 2, 3, 4, 5], &bad, &dest, &mut tail));
        }
        assert!(!o.open(&[8; 12], &[1, 2, 3, 4, 5], &body, &dest, &mut tail));
        assert!(!o.open(&[7; 12], &[1, 2, 3, 4, 6], &body, &dest, &mut tail));
        // And the context is still good for the next record.
        assert!(o.open(&[7; 12], &[1, 2, 3, 4, 5], &body, &dest, &mut tail));
        assert!(DirectOpener::aes_gcm(&[0; 24]).is_none());
    }
}
