//! Building frames: the zero scan, page checksums, compression and sealing of one chunk (or a
//! marker) into a slot, ready for the ring.

use super::*;
use crate::pipeline::frame::{seal_frame, Payload};

impl SendShard {
    /// Scans a chunk (or makes a marker) and encodes its frame into `slot`: header plus payload
    /// pieces straight from guest memory, or, with TLS, the whole frame sealed into records. A
    /// frame that fails to build gives its number (and round) back, and under TLS its record
    /// numbers too, so the stream stays gapless for the abort frame that tells the receiver
    /// why.
    pub(super) fn build(&mut self, slot: u16, work: Work) -> Result<()> {
        let machine = self.m;
        self.sealed_from = None;
        let built = self.build_frame(slot, work);
        if built.is_err() {
            self.m = machine;
            // The slot's records never reach the ring (it stays free), so their numbers can be
            // sealed again: the abort's records must take them, or the receiver's opener,
            // expecting them, fails it as forged and never hears the reason.
            if let (Some(seq), Some(tls)) = (self.sealed_from.take(), self.tls.as_mut()) {
                tls.sealer.rewind(seq);
            }
        }
        built
    }

    fn build_frame(&mut self, slot: u16, work: Work) -> Result<()> {
        let s = &mut self.slots[usize::from(slot)];
        s.marker = Marker::None;
        s.pages = 0;
        s.n_pieces = 1;
        let now = Instant::now();
        // Only a chunk reads guest memory: markers, device state and an abort never take a
        // fault (the flag is the region's, and another shard's fault must not cost this
        // channel its abort).
        let reads_guest = matches!(work, Work::Chunk { .. });
        let payload = match work {
            Work::Chunk { region, runs, live } => {
                self.m.begin_pages(&mut self.frame, region, live, now);
                self.scan_chunk(slot, &runs)?
            }
            Work::EndRound { live } => {
                self.awaited_round = live;
                s.marker = self.m.end_round(&mut self.frame, now);
                0
            }
            Work::Finish => {
                s.marker = self.m.end_stream(&mut self.frame, now);
                0
            }
            Work::Keepalive => {
                self.m.keepalive(&mut self.frame, now);
                0
            }
            Work::Abort => {
                let (code, reason) = self
                    .abort
                    .first_reason()
                    .unwrap_or((crate::error::AbortCode::Other, "aborted".into()));
                let body: &mut [u8; 4 + crate::protocol::control::CONTROL_REASON_BYTES_MAX] =
                    (&mut self.body[..4 + crate::protocol::control::CONTROL_REASON_BYTES_MAX])
                        .try_into()
                        .expect("the body holds an abort's");
                let n = crate::protocol::control::encode_abort_body(code, &reason, body);
                self.m.abort(&mut self.frame, n as u32, now);
                n as u64
            }
            Work::DeviceState {
                tag,
                total,
                last,
                chunk,
            } => {
                let n = CHUNK_HEADER_BYTES + chunk.len();
                let header = ChunkHeader::of(tag, total, &chunk, last);
                let (head, rest) = self.body.split_at_mut(CHUNK_HEADER_BYTES);
                header.encode(head.try_into().expect("the chunk header's size"));
                rest[..chunk.len()].copy_from_slice(&chunk);
                self.m.device_state(&mut self.frame, n as u32, now);
                add(&self.progress.device_state_bytes, n as u64);
                n as u64
            }
        };
        // The scan, the checksums, a compression copy and the seal read the pages: a truncated
        // source file faulted there, and the handler gave those reads zeros, which must not
        // leave as the pages (the kernel's own reads of it fail with EFAULT instead). Taken
        // before the seal too, so that a fault of the scan never costs a sealed frame (nor a
        // key rotation, which cannot be taken back); after it, for the seal's own reads.
        if reads_guest {
            self.memory.take_fault()?;
        }
        let bytes = if self.tls.is_some() {
            self.seal(slot, payload)?
        } else {
            self.encode_plain(slot, payload)
        };
        if reads_guest {
            #[cfg(feature = "faults")]
            if crate::faults::take_seal_fault() {
                return Err(Error::MemoryFault { region: 0, page: 0 });
            }
            self.memory.take_fault()?;
        }
        let s = &mut self.slots[usize::from(slot)];
        s.bytes = bytes;
        s.state = SlotState::Ready;
        s.codec = self.frame.codec;
        self.stats.frames += 1;
        self.stats.wire_bytes += bytes;
        add(&self.progress.wire_bytes, bytes);
        self.ready.push_back(slot);
        Ok(())
    }

    /// Fills the started `Pages` frame with `pages` pages from `first_page`: zero scan, normal
    /// runs as payload pieces straight from guest memory, checksums, and compression when it
    /// is chosen. Returns the payload bytes.
    fn scan_chunk(&mut self, slot: u16, runs: &ChunkRuns) -> Result<u64> {
        let frame = &mut *self.frame;
        let region = frame.region;
        let r = &self.memory.regions()[region as usize];
        let pages = runs.pages();
        for &(first_page, n) in runs.runs() {
            for page in first_page..first_page + u64::from(n) {
                let zero = r.page_is_zero(&self.scanner, page);
                frame
                    .push_page(page, zero)
                    .expect("a chunk has at most CHUNK_PAGES_MAX = FRAME_RUNS_MAX pages");
            }
        }
        let s = &mut self.slots[usize::from(slot)];
        let normal = frame.normal_pages();
        for run in frame.normal_runs() {
            s.pieces[s.n_pieces] = Buf::Guest {
                region,
                offset: run.first_page * PAGE_BYTES as u64,
                len: run.pages * PAGE_BYTES as u32,
            };
            s.n_pieces += 1;
        }
        s.pages = u64::from(pages);
        self.stats.normal_pages += normal;
        self.stats.zero_pages += u64::from(pages) - normal;
        let codec = match self.compression {
            _ if normal == 0 || self.compressor.is_none() => Codec::Raw,
            Compression::None => Codec::Raw,
            Compression::Zstd => Codec::Zstd,
            Compression::Zlib => Codec::Zlib,
            Compression::Auto if self.auto.compress_next() => Codec::Zstd,
            Compression::Auto => Codec::Raw,
        };
        // One checksum per normal page (plaintext only: under TLS the AEAD covers the payload;
        // none where the sender turned them off), over the copy the compressor reads when
        // there is one, else over guest memory.
        let checksums = self.page_checksums && normal > 0;
        if checksums {
            frame.begin_checksums();
        }
        let mut payload = normal * PAGE_BYTES as u64;
        if codec != Codec::Raw {
            if let Some(packed) = self.compress(slot, codec, checksums) {
                payload = packed;
            }
        } else if checksums {
            for i in 0..frame.normal_runs().len() {
                let run = frame.normal_runs()[i];
                for page in run.first_page..run.end() {
                    frame.push_checksum(r.page_checksum(self.hash, page));
                }
            }
        }
        self.frame.payload_bytes = payload as u32;
        Ok(payload)
    }

    /// Copies the frame's normal pages out of guest memory (checksumming the copy when
    /// `checksums`), then compresses the copy: into the slot right after the header's place
    /// (plaintext), or aside for sealing (TLS). Returns the compressed bytes when the payload
    /// shrank (the frame then carries `codec`), `None` when it goes raw.
    fn compress(&mut self, slot: u16, codec: Codec, checksums: bool) -> Option<u64> {
        let frame = &mut *self.frame;
        let r = &self.memory.regions()[frame.region as usize];
        let compressor = self.compressor.as_mut()?;
        let mut raw = 0;
        for run in frame.normal_runs() {
            let n = run.pages as usize * PAGE_BYTES;
            r.read(
                run.first_page * PAGE_BYTES as u64,
                &mut self.scratch[raw..raw + n],
            );
            raw += n;
        }
        if checksums {
            for page in self.scratch[..raw].chunks_exact(PAGE_BYTES) {
                frame.push_checksum(self.hash.hash(page));
            }
        }
        let started = Instant::now();
        let out = if self.tls.is_some() {
            &mut self.packed[..]
        } else {
            &mut self.ring.slot_mut(slot)[PAYLOAD_OFFSET..]
        };
        let packed = compressor.compress(codec, &self.scratch[..raw], out);
        if self.compression == Compression::Auto {
            self.auto
                .observe_compression(raw, packed.unwrap_or(raw), started.elapsed());
        }
        let n = packed?;
        frame.codec = codec;
        self.slots[usize::from(slot)].n_pieces = 1;
        self.stats.compressed_frames += 1;
        self.stats.compressed_raw_bytes += raw as u64;
        self.stats.compressed_bytes += n as u64;
        Some(n as u64)
    }

    /// TLS: seals the whole frame (header, then payload) into `slot` as records. Returns the
    /// bytes to send.
    fn seal(&mut self, slot: u16, payload: u64) -> Result<u64> {
        let frame = &*self.frame;
        let tls = self.tls.as_mut().expect("seal is called under TLS");
        let header = frame
            .encode(&mut self.header)
            .expect("the header buffer holds FRAME_HEADER_BYTES_MAX");
        let out = self.ring.slot_mut(slot);
        let body = if has_body(frame) {
            Payload::Bytes(&self.body[..payload as usize])
        } else if frame.codec == Codec::Raw {
            Payload::Guest(
                &self.memory.regions()[frame.region as usize],
                frame.normal_runs(),
            )
        } else {
            Payload::Bytes(&self.packed[..payload as usize])
        };
        let records_per_key = if self.m.take_key_update() {
            0
        } else {
            self.tls_records_per_key
        };
        // The seal's records, from here, can be taken back if the frame fails (see `build`),
        // unless it begins with a key update: the schedule cannot step back.
        let first = tls.sealer.sequence();
        self.sealed_from = (first < records_per_key).then_some(first);
        let s = &mut self.slots[usize::from(slot)];
        let close = s.marker == Marker::EndOfStream;
        let sealed = seal_frame(
            tls,
            records_per_key,
            &self.header[..header],
            body,
            close,
            out,
        )
        .map_err(|source| Error::TlsRecord {
            channel: self.channel,
            source,
        })?;
        s.pieces[0] = Buf::Slab {
            slot,
            offset: 0,
            len: sealed as u32,
        };
        s.n_pieces = 1;
        Ok(sealed as u64)
    }

    /// Plaintext: encodes the header into `slot`. A raw frame's payload pieces (guest memory)
    /// follow it as they are; a compressed or abort payload sits in the slot right after the
    /// header, so the two leave as one piece. Returns the bytes to send.
    fn encode_plain(&mut self, slot: u16, payload: u64) -> u64 {
        let frame = &*self.frame;
        let s = &mut self.slots[usize::from(slot)];
        if frame.codec == Codec::Raw && !has_body(frame) {
            let header = frame
                .encode(self.ring.slot_mut(slot))
                .expect("a slot holds FRAME_HEADER_BYTES_MAX");
            s.pieces[0] = Buf::Slab {
                slot,
                offset: 0,
                len: header as u32,
            };
            return header as u64 + payload;
        }
        if has_body(frame) {
            let n = payload as usize;
            self.ring.slot_mut(slot)[PAYLOAD_OFFSET..PAYLOAD_OFFSET + n]
                .copy_from_slice(&self.body[..n]);
        }
        let header = frame
            .encode(&mut self.header)
            .expect("the header buffer holds FRAME_HEADER_BYTES_MAX");
        let at = PAYLOAD_OFFSET - header;
        self.ring.slot_mut(slot)[at..PAYLOAD_OFFSET].copy_from_slice(&self.header[..header]);
        s.pieces[0] = Buf::Slab {
            slot,
            offset: at as u32,
            len: (header as u64 + payload) as u32,
        };
        header as u64 + payload
    }
}

/// True for frames whose payload is a body built in the shard (`SendShard::body`), not pages.
fn has_body(frame: &Frame) -> bool {
    matches!(frame.kind, FrameKind::Abort | FrameKind::DeviceState)
}
