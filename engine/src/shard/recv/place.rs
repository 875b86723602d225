//! Placing a checked frame: zero pages, the payload, the page checksums, and the ledger.
//!
//! Where a payload lands first:
//! - TLS: records are opened in the staging slot and their plaintext copied to its place (the
//!   AEAD has checked every byte first; no checksums travel).
//! - Plaintext: into the staging slot, where every page is checked against its checksum, and
//!   only then copied to its place (a torn page of a live frame is not written at all). The
//!   staging slot is reused frame after frame, so it stays in cache: the kernel's copy writes
//!   warm lines and the checksum reads them there. Received straight into destination memory
//!   instead, the pages were no longer in cache when hashed: measured with `pagewire-bench
//!   transfer` (1 GiB random, 1 channel), checking in place cost the receiver 0.065 CPU-s/GiB;
//!   a second hash pass over the same pages cost only ~0.01.
//! - Compressed: staged, decoded into this shard's buffer, checked there, then copied.

use super::*;

impl RecvShard {
    /// Places a checked `Pages` frame: zero pages first (no I/O), then the payload.
    pub(super) fn place(&mut self) -> Result<()> {
        let frame = &*self.frame;
        let region_index = frame.region as usize;
        let region = &self.p.memory.regions()[region_index];
        for run in frame.zero_runs() {
            for page in run.first_page..run.end() {
                if !self.p.ledger.known_zero(frame.region, page)
                    && !region.page_is_zero(&self.scanner, page)
                {
                    region.zero_pages(page, 1);
                }
            }
        }
        self.bufs.clear();
        for run in frame.normal_runs() {
            self.p
                .ledger
                .mark_written(frame.region, run.first_page, u64::from(run.pages));
            self.bufs.push(Buf::Guest {
                region: frame.region,
                offset: run.first_page * PAGE_BYTES as u64,
                len: run.pages * PAGE_BYTES as u32,
            });
        }
        let normal = frame.normal_pages();
        let zero = frame.zero_pages();
        let payload = u64::from(frame.payload_bytes);
        let mut torn = 0u128;
        if frame.codec != Codec::Raw || (payload > 0 && self.p.tls.is_none()) {
            torn = self.place_staged(payload as usize)?;
        } else if payload > 0 {
            let bufs = std::mem::take(&mut self.bufs);
            let got = self.tls_place(&bufs);
            self.bufs = bufs;
            got?;
        }
        // Every payload reaches destination memory through a user-space copy: a store that
        // took SIGBUS on a file mapping (see `crate::sigbus`) shows up here.
        self.p.memory.take_fault()?;
        // Every byte of the frame is in place and checked: its pages count as received (a torn
        // page of a live frame does not, until it arrives intact).
        let frame = &*self.frame;
        let mut i = 0;
        for run in frame.normal_runs() {
            if torn == 0 {
                self.p
                    .ledger
                    .mark_placed(frame.region, run.first_page, u64::from(run.pages));
                continue;
            }
            for page in run.first_page..run.end() {
                if torn & (1 << i) == 0 {
                    self.p.ledger.mark_placed(frame.region, page, 1);
                } else {
                    self.p.ledger.mark_unplaced(frame.region, page, 1);
                }
                i += 1;
            }
        }
        for run in frame.zero_runs() {
            self.p
                .ledger
                .mark_placed(frame.region, run.first_page, u64::from(run.pages));
        }
        self.stats.normal_pages += normal;
        self.stats.zero_pages += zero;
        self.stats.wire_bytes += payload;
        add(&self.p.progress.wire_bytes, payload);
        add(&self.p.progress.pages_done, normal + zero);
        Ok(())
    }

    /// Receives a plaintext or compressed payload whole (into the staging slot, or out of TLS
    /// records into `packed`), decodes it into `unpacked` when compressed, checks its pages,
    /// and only then copies them to their place. Returns the mask of torn pages (see
    /// [`verify`](Self::verify)).
    pub(super) fn place_staged(&mut self, len: usize) -> Result<u128> {
        if self.p.tls.is_some() {
            let mut done = 0;
            while done < len {
                let Some(r) = self.tls_plain(len - done, false)? else {
                    return Err(self.cut_short());
                };
                let n = r.len();
                self.packed[done..done + n].copy_from_slice(&self.ring.slot_mut(STAGING_SLOT)[r]);
                done += n;
            }
        } else {
            let buf = [Buf::Slab {
                slot: STAGING_SLOT,
                offset: 0,
                len: len as u32,
            }];
            self.recv(&buf, len as u64, false)?;
        }
        let frame = &*self.frame;
        let hash = self.hash;
        let expected = frame.normal_pages() as usize * PAGE_BYTES;
        let page = |bytes: &[u8], i: usize| hash.hash(&bytes[i * PAGE_BYTES..(i + 1) * PAGE_BYTES]);
        let checked = if frame.codec == Codec::Raw {
            let staged = &self.ring.slot_mut(STAGING_SLOT)[..len];
            check_pages(frame, |i| page(staged, i))
        } else {
            // Decode into this shard's buffer, then place: decoding straight into guest memory
            // would need `&mut` slices of it, and a hostile peer could name the same page in
            // frames on two channels at once. The copy costs a few percent of the decode.
            let src = if self.p.tls.is_some() {
                &self.packed[..len]
            } else {
                &self.ring.slot_mut(STAGING_SLOT)[..len]
            };
            let out = &mut self.unpacked[..expected];
            self.decompressor
                .decompress(frame.codec, src, expected, std::iter::once(out))
                .map_err(|e| Error::Protocol {
                    channel: self.channel,
                    source: ProtocolError::Compressed(e),
                })?;
            self.stats.compressed_frames += 1;
            let unpacked = &self.unpacked[..expected];
            check_pages(frame, |i| page(unpacked, i))
        };
        // Checked before a byte is placed; a torn page of a live frame is not written.
        let torn = checked.map_err(|e| self.protocol(e))?;
        self.stats.torn_pages += u64::from(torn.count_ones());
        self.write_checked(len, torn);
        Ok(torn)
    }

    /// Copies a checked payload's pages (out of the staging slot, or decoded) to their place,
    /// all but the torn ones (`torn`: a mask over the frame's normal pages).
    fn write_checked(&mut self, len: usize, torn: u128) {
        let frame = &*self.frame;
        let expected = frame.normal_pages() as usize * PAGE_BYTES;
        let region = &self.p.memory.regions()[frame.region as usize];
        let src = if frame.codec == Codec::Raw {
            &self.ring.slot_mut(STAGING_SLOT)[..len]
        } else {
            &self.unpacked[..expected]
        };
        let mut at = 0;
        for run in frame.normal_runs() {
            let bytes = run.pages as usize * PAGE_BYTES;
            if torn == 0 {
                region.write(run.first_page * PAGE_BYTES as u64, &src[at..at + bytes]);
            } else {
                for (n, page) in (run.first_page..run.end()).enumerate() {
                    let i = at / PAGE_BYTES + n;
                    if torn & (1 << i) == 0 {
                        let b = &src[i * PAGE_BYTES..(i + 1) * PAGE_BYTES];
                        region.write(page * PAGE_BYTES as u64, b);
                    }
                }
            }
            at += bytes;
        }
    }
}

/// Checks `frame`'s normal pages against its checksums; `hash_of(i)` hashes the `i`-th normal
/// page. Returns the mask of pages that did not match in a live frame (a vCPU tore them under
/// the send; the dirty log resends them, so they are only left un-placed); a mismatch in any
/// other frame is refused, naming the page. A frame without checksums (TLS) passes.
fn check_pages(
    frame: &Frame,
    mut hash_of: impl FnMut(usize) -> u64,
) -> std::result::Result<u128, ProtocolError> {
    let Some(sums) = frame.checksums() else {
        return Ok(0);
    };
    let mut torn = 0u128;
    let mut i = 0;
    for run in frame.normal_runs() {
        for page in run.first_page..run.end() {
            if hash_of(i) != sums[i] {
                if !frame.live {
                    return Err(ProtocolError::PayloadChecksum {
                        frame: frame.frame_number,
                        region: frame.region,
                        page,
                    });
                }
                torn |= 1 << i;
            }
            i += 1;
        }
    }
    Ok(torn)
}
