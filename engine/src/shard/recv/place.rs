//! Placing a checked frame: zero pages, the payload (straight into destination memory, out of
//! TLS records, or decoded), the page checksums, and the ledger.

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
        if frame.codec != Codec::Raw {
            torn = self.place_compressed(payload as usize)?;
        } else if payload > 0 {
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
            })?;
        }
        // A user-space store or load that took SIGBUS on a file mapping (see `crate::sigbus`).
        self.p.memory.take_fault()?;
        // A raw payload landed in destination memory: check it there before its pages count.
        if self.frame.codec == Codec::Raw {
            let (memory, hash, region) = (self.p.memory.clone(), self.hash, self.frame.region);
            let region = &memory.regions()[region as usize];
            torn = self.verify(|_, page| region.page_checksum(hash, page))?;
        }
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

    /// Checks the frame's normal pages against their checksums; `hash_of(i, page)` hashes the
    /// `i`-th normal page (region page `page`). Returns the mask of pages that did not match
    /// in a live frame (a vCPU tore them under the send; the dirty log resends them, so they
    /// are only left un-placed); a mismatch in any other frame fails the transfer, naming the
    /// page.
    pub(super) fn verify(&mut self, mut hash_of: impl FnMut(usize, u64) -> u64) -> Result<u128> {
        let frame = &*self.frame;
        let Some(sums) = frame.checksums() else {
            return Ok(0);
        };
        let mut torn = 0u128;
        let mut i = 0;
        for run in frame.normal_runs() {
            for page in run.first_page..run.end() {
                if hash_of(i, page) != sums[i] {
                    if !frame.live {
                        return Err(self.protocol(ProtocolError::PayloadChecksum {
                            frame: frame.frame_number,
                            region: frame.region,
                            page,
                        }));
                    }
                    torn |= 1 << i;
                }
                i += 1;
            }
        }
        if torn != 0 {
            self.stats.torn_pages += u64::from(torn.count_ones());
        }
        Ok(torn)
    }

    /// Receives a compressed payload whole (into the staging slot, or out of TLS records into
    /// `packed`), decodes it into `unpacked`, checks it, and places the frame's pages from
    /// there. Returns the mask of torn pages (see [`verify`](Self::verify)).
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
            .decompress(frame.codec, src, expected, std::iter::once(out))
            .map_err(|e| Error::Protocol {
                channel: self.channel,
                source: ProtocolError::Compressed(e),
            })?;
        // Checked before a byte is placed; a torn page of a live frame is not written.
        let hash = self.hash;
        let unpacked = std::mem::take(&mut self.unpacked);
        let torn = self.verify(|i, _| hash.hash(&unpacked[i * PAGE_BYTES..(i + 1) * PAGE_BYTES]));
        self.unpacked = unpacked;
        let torn = torn?;
        let frame = &*self.frame;
        let region = &self.p.memory.regions()[frame.region as usize];
        let mut i = 0;
        for run in frame.normal_runs() {
            for page in run.first_page..run.end() {
                if torn & (1 << i) == 0 {
                    region.write(
                        page * PAGE_BYTES as u64,
                        &self.unpacked[i * PAGE_BYTES..(i + 1) * PAGE_BYTES],
                    );
                }
                i += 1;
            }
        }
        self.stats.compressed_frames += 1;
        Ok(torn)
    }
}
