//! Placing a checked frame: zero pages, the payload, the page checksums, and the ledger.
//!
//! Where a payload lands first:
//! - Plaintext: straight into destination memory (one vectored receive), where every page is
//!   checked against its checksum before it counts as placed; a page that fails is refused (or,
//!   in a live frame, left un-placed for a later round to bring again, which the ledger
//!   enforces). Receiving into a staging slot first and copying the pages out after the check
//!   (so that nothing unchecked touches destination memory) was measured and undone: the extra
//!   copy cost the receiver 0.02–0.04 CPU-s/GiB and 1–4% of throughput (`pagewire-bench
//!   transfer`, 1 GiB random, 1 and 2 channels, interleaved), and a failed frame fails the
//!   transfer or is resent anyway.
//! - TLS: ciphertext arrives in the staging slot; a record whose data fits the destination
//!   range is opened straight into the pages (AES-GCM with aws-lc-rs: `tls::direct`, which says
//!   why that is safe before the tag is checked); the rest (the plaintext that shares a record
//!   with a frame's header, a key update, ChaCha20 or `ring`) is opened in place and copied.
//!   No checksums travel: the AEAD checks every byte.
//! - Compressed: staged, decoded into this shard's buffer, checked there, then copied.

use super::*;

impl RecvShard {
    /// Places a checked `Pages` frame: zero pages first (no I/O), then the payload, then the
    /// ledger.
    pub(super) fn place(&mut self) -> Result<()> {
        self.place_zero_pages();
        let frame = &*self.frame;
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
        let payload = u64::from(frame.payload_bytes);
        let mut torn = 0u128;
        if frame.codec != Codec::Raw {
            torn = self.place_compressed(payload as usize)?;
        } else if payload > 0 {
            self.receive_raw(payload)?;
        }
        // A user-space store or load that took SIGBUS on a file mapping (see `crate::sigbus`).
        self.p.memory.take_fault()?;
        // A raw plaintext payload landed in destination memory: check it there before its
        // pages count.
        if self.frame.codec == Codec::Raw && self.p.tls.is_none() && payload > 0 {
            torn = self.check_in_place()?;
        }
        self.count_placed(torn);
        let frame = &*self.frame;
        let (normal, zero) = (frame.normal_pages(), frame.zero_pages());
        self.stats.normal_pages += normal;
        self.stats.zero_pages += zero;
        self.stats.wire_bytes += payload;
        add(&self.p.progress.wire_bytes, payload);
        add(&self.p.progress.pages_done, normal + zero);
        Ok(())
    }

    /// Zero runs: skipped where the destination is known to be zero (or is), zeroed otherwise.
    fn place_zero_pages(&mut self) {
        let frame = &*self.frame;
        let region = &self.p.memory.regions()[frame.region as usize];
        for run in frame.zero_runs() {
            for page in run.first_page..run.end() {
                if !self.p.ledger.known_zero(frame.region, page)
                    && !region.page_is_zero(&self.scanner, page)
                {
                    region.zero_pages(page, 1);
                }
            }
        }
    }

    /// Receives a raw payload into its destination pages (`bufs`): out of TLS records, or with
    /// one vectored receive.
    fn receive_raw(&mut self, payload: u64) -> Result<()> {
        let bufs = std::mem::take(&mut self.bufs);
        let got = if self.p.tls.is_some() {
            self.tls_place(&bufs)
        } else {
            self.recv(&bufs, payload, false).map(drop)
        };
        self.bufs = bufs;
        // The kernel could not write the destination (a truncated or unbackable file).
        got.map_err(|e| match &e {
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::EFAULT) => {
                Error::MemoryFault {
                    region: self.frame.region,
                    page: self.frame.normal_runs().first().map_or(0, |r| r.first_page),
                }
            }
            _ => e,
        })
    }

    /// Every byte of the frame is in place and checked: its pages count as received (a torn
    /// page of a live frame, a bit of `torn`, does not, until it arrives intact).
    fn count_placed(&mut self, torn: u128) {
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
    }

    /// Checks a raw payload's pages where they landed in destination memory.
    fn check_in_place(&mut self) -> Result<u128> {
        let frame = &*self.frame;
        let region = &self.p.memory.regions()[frame.region as usize];
        let hash = self.hash;
        let mut pages = frame
            .normal_runs()
            .iter()
            .flat_map(|r| r.first_page..r.end());
        let checked = check_pages(frame, |_| {
            let page = pages
                .next()
                .expect("one page per checksum, in payload order");
            region.page_checksum(hash, page)
        });
        let torn = checked.map_err(|e| self.protocol(e))?;
        self.stats.torn_pages += u64::from(torn.count_ones());
        Ok(torn)
    }

    /// Receives a compressed payload whole (into the staging slot, or out of TLS records into
    /// `packed`), decodes it into `unpacked`, checks its pages there, and only then copies them
    /// to their place. Returns the mask of torn pages (see [`check_pages`]).
    pub(super) fn place_compressed(&mut self, len: usize) -> Result<u128> {
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
        // Decode into this shard's buffer, then place: decoding straight into guest memory
        // would need `&mut` slices of it, and a hostile peer could name the same page in frames
        // on two channels at once. The copy costs a few percent of the decode.
        let frame = &*self.frame;
        let expected = frame.normal_pages() as usize * PAGE_BYTES;
        let src = if self.p.tls.is_some() {
            &self.packed[..len]
        } else {
            &self.ring.slot_mut(STAGING_SLOT)[..len]
        };
        let out = &mut self.unpacked[..expected];
        self.decompressor
            .decompress(frame.codec, src, out)
            .map_err(|e| Error::Protocol {
                channel: self.channel,
                source: ProtocolError::Compressed(e),
            })?;
        self.stats.compressed_frames += 1;
        self.stats.compressed_raw_bytes += expected as u64;
        self.stats.compressed_bytes += len as u64;
        // Checked before a byte is placed; a torn page of a live frame is not written.
        let hash = self.hash;
        let unpacked = &self.unpacked[..expected];
        let checked = check_pages(frame, |i| {
            hash.hash(&unpacked[i * PAGE_BYTES..(i + 1) * PAGE_BYTES])
        });
        let torn = checked.map_err(|e| self.protocol(e))?;
        self.stats.torn_pages += u64::from(torn.count_ones());
        let region = &self.p.memory.regions()[frame.region as usize];
        let mut i = 0;
        for run in frame.normal_runs() {
            for page in run.first_page..run.end() {
                if torn & (1 << i) == 0 {
                    let b = &self.unpacked[i * PAGE_BYTES..(i + 1) * PAGE_BYTES];
                    region.write(page * PAGE_BYTES as u64, b);
                }
                i += 1;
            }
        }
        Ok(torn)
    }
}

/// Checks `frame`'s normal pages against its checksums; `hash_of(i)` hashes the `i`-th normal
/// page (called once per page, in payload order). Returns the mask of pages that did not match
/// in a live frame (a vCPU tore them under the send; the dirty log resends them, so they are
/// only left un-placed); a mismatch in any other frame is refused, naming the page. A frame
/// without checksums (TLS) passes.
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
