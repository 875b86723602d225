//! The io_uring [`Ring`]: set-up, the op table that owns `user_data`, the ops a shard pushes
//! ([`RingIo`]), completion decoding, and the cancel-and-drain that runs before anything the
//! kernel may still touch is freed. The contract is in the parent module's docs.

use super::*;

impl Ring {
    /// A ring for `socket` with a slab of `slots` × `slot_bytes` (page-aligned, registered as
    /// fixed buffer 0 when the kernel lets us).
    pub(crate) fn new(
        socket: Stream,
        memory: Arc<GuestMemory>,
        slots: usize,
        slot_bytes: usize,
    ) -> Result<Ring> {
        let mut caps = probe()?;
        let (ring, _) = build_ring(crate::limits::RING_ENTRIES)?;
        let slab = MmapMut::map_anon(slots * slot_bytes)
            .map_err(|e| Error::io("mapping the header slab", e))?;
        // A sparse table lets guest memory be added later (after the zero-copy probe).
        let registered = ring
            .submitter()
            .register_buffers_sparse(REGISTERED_BUFFERS_MAX as u32)
            .and_then(|()| {
                let iov = [libc::iovec {
                    iov_base: slab.as_ptr() as *mut _,
                    iov_len: slab.len(),
                }];
                // SAFETY: the slab mapping lives as long as the ring (both fields of `Ring`, and
                // Drop drains the ring first), so the registered range stays valid.
                unsafe { ring.submitter().register_buffers_update(0, &iov, None) }
            });
        caps.slab_registered = registered.is_ok();
        if let Err(e) = registered {
            tracing::debug!("header slab not registered, sends use plain buffers: {e}");
        }
        let vectored = (0..VECTORED_OPS_MAX)
            .map(|_| VectoredSlot {
                // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid.
                msg: unsafe { std::mem::zeroed() },
                // SAFETY: as above.
                iov: unsafe { std::mem::zeroed() },
            })
            .collect();
        Ok(Ring {
            ring,
            caps,
            socket,
            memory,
            slab,
            slot_bytes,
            slot_busy: vec![0; slots],
            vectored,
            vectored_free: (0..VECTORED_OPS_MAX as u16).rev().collect(),
            ops: vec![None; OPS_MAX],
            ops_free: (0..OPS_MAX as u32).rev().collect(),
            ops_generation: vec![0; OPS_MAX],
            in_flight: 0,
            guest_fixed: None,
        })
    }

    /// What this ring can do.
    pub(crate) fn caps(&self) -> Caps {
        self.caps
    }

    fn addr(&self, buf: Buf) -> *mut u8 {
        match buf {
            Buf::Slab { slot, offset, len } => {
                let at = usize::from(slot) * self.slot_bytes + offset as usize;
                assert!(
                    usize::from(slot) < self.slot_busy.len()
                        && offset as usize + len as usize <= self.slot_bytes,
                    "slab range outside its slot"
                );
                // SAFETY: at + len stays within the slot (asserted), so within the slab.
                unsafe { self.slab.as_ptr().add(at) as *mut u8 }
            }
            Buf::Guest {
                region,
                offset,
                len,
            } => self.memory.regions()[region as usize].host_ptr(offset, u64::from(len)),
        }
    }

    fn fixed_index(&self, buf: Buf) -> Option<u16> {
        match buf {
            Buf::Slab { .. } => self.caps.slab_registered.then_some(0),
            Buf::Guest {
                region,
                offset,
                len,
            } => {
                let pieces = self.guest_fixed.as_ref()?.get(region as usize)?;
                // The piece holding `offset`; a range crossing a 1 GiB piece boundary goes plain.
                let &(index, start) = pieces.iter().rev().find(|(_, s)| *s <= offset)?;
                let end = offset + u64::from(len);
                (end <= start + REGISTERED_BUFFER_BYTES_MAX as u64).then_some(index)
            }
        }
    }

    /// Takes a table entry for an op; returns the `user_data` to push it with.
    fn take_op(&mut self, tag: u64, slot: Option<u16>, vectored: Option<u16>) -> u64 {
        let id = self
            .ops_free
            .pop()
            .expect("op table full: callers bound ops in flight below OPS_MAX");
        let generation = &mut self.ops_generation[id as usize];
        *generation = generation.wrapping_add(1);
        let user_data = (u64::from(*generation) << 32) | u64::from(id);
        self.ops[id as usize] = Some(OpEntry {
            user_data,
            tag,
            slot,
            vectored,
        });
        if let Some(s) = slot {
            self.slot_busy[usize::from(s)] += 1;
        }
        self.in_flight += 1;
        user_data
    }

    /// The table index of `user_data`, when it names the op that holds the index now.
    fn live_op(&self, user_data: u64) -> Option<usize> {
        let id = (user_data & 0xffff_ffff) as usize;
        self.ops
            .get(id)
            .copied()
            .flatten()
            .filter(|e| e.user_data == user_data)
            .map(|_| id)
    }

    fn push_entry(&mut self, entry: squeue::Entry) {
        // SAFETY: every pointer in `entry` refers to memory the ring keeps alive until the op's
        // final completion (slab, vectored slots, guest memory; see the module docs).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        assert!(
            pushed.is_ok(),
            "submission queue full: callers check sq_space before pushing a chain"
        );
    }

    fn slot_of(buf: Buf) -> Option<u16> {
        match buf {
            Buf::Slab { slot, .. } => Some(slot),
            Buf::Guest { .. } => None,
        }
    }

    fn vectored_entry(
        &mut self,
        bufs: &[Buf],
        mut skip: u64,
        send: bool,
    ) -> (squeue::Entry, Option<u16>, u16) {
        assert!(
            bufs.len() <= IOVECS_PER_OP_MAX,
            "too many buffers for one op"
        );
        let v = self
            .vectored_free
            .pop()
            .expect("vectored slots exhausted: callers check vectored_space");
        let mut n = 0;
        let mut slot = None;
        for &buf in bufs {
            if let Some(s) = Self::slot_of(buf) {
                assert!(slot.is_none(), "at most one slab buffer per vectored op");
                slot = Some(s);
            }
            let len = u64::from(buf.len());
            if skip >= len {
                skip -= len;
                continue;
            }
            let base = self.addr(buf);
            // SAFETY: skip < len, so base + skip stays inside the buffer.
            let base = unsafe { base.add(skip as usize) };
            self.vectored[usize::from(v)].iov[n] = libc::iovec {
                iov_base: base.cast(),
                iov_len: (len - skip) as usize,
            };
            skip = 0;
            n += 1;
        }
        let vs = &mut self.vectored[usize::from(v)];
        // SAFETY: all-zero is a valid msghdr.
        vs.msg = unsafe { std::mem::zeroed() };
        vs.msg.msg_iov = vs.iov.as_mut_ptr();
        vs.msg.msg_iovlen = n;
        let fd = types::Fd(self.socket.as_raw_fd());
        let flags = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
        let entry = if send {
            opcode::SendMsg::new(fd, &vs.msg).flags(flags).build()
        } else {
            opcode::RecvMsg::new(fd, &mut vs.msg)
                .flags(libc::MSG_WAITALL as u32)
                .build()
        };
        (entry, slot, v)
    }

    /// Releases op `id` after its final completion: its table entry, its slot, its iovecs.
    fn release(&mut self, id: usize) {
        let Some(entry) = self.ops.get_mut(id).and_then(Option::take) else {
            return;
        };
        self.ops_free.push(id as u32);
        self.in_flight -= 1;
        if let Some(s) = entry.slot {
            self.slot_busy[usize::from(s)] -= 1;
        }
        if let Some(v) = entry.vectored {
            self.vectored_free.push(v);
        }
    }

    /// Cancels every op and waits (bounded) until the kernel has let go of all buffers.
    pub(crate) fn cancel_all_and_drain(&mut self, timeout: Duration) {
        if self.in_flight == 0 {
            return;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(u64::MAX);
        // SAFETY: a cancel request carries no buffer.
        let _ = unsafe { self.ring.submission().push(&cancel) };
        let deadline = std::time::Instant::now() + timeout;
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            let _ = self.submit_and_wait(1, Duration::from_millis(50));
            loop {
                let Some(cqe) = self.ring.completion().next() else {
                    break;
                };
                if let (Some(id), false) =
                    (self.live_op(cqe.user_data()), cqueue::more(cqe.flags()))
                {
                    self.release(id);
                }
            }
        }
        if self.in_flight > 0 {
            // The kernel still holds buffers: leak the memory rather than free it under the
            // kernel. Shutting the socket down first makes this practically unreachable.
            tracing::error!(
                in_flight = self.in_flight,
                "io_uring ops did not drain; leaking their buffers"
            );
            std::mem::forget(self.memory.clone());
            std::mem::forget(std::mem::take(&mut self.vectored));
            std::mem::forget(std::mem::replace(
                &mut self.slab,
                MmapMut::map_anon(1).unwrap_or_else(|_| std::process::abort()),
            ));
        }
    }
}

impl RingIo for Ring {
    /// Ops whose final completion has not arrived.
    fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Free submission queue entries (a chain must fit whole before it is pushed).
    fn sq_space(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Free vectored-op slots.
    fn vectored_space(&self) -> usize {
        self.vectored_free.len()
    }

    /// Free op-table entries.
    fn ops_space(&self) -> usize {
        self.ops_free.len()
    }

    /// True when no op uses slab slot `slot`.
    fn slot_idle(&self, slot: u16) -> bool {
        self.slot_busy[usize::from(slot)] == 0
    }

    /// The bytes of slab slot `slot`, to write a header or read a received one.
    fn slot_mut(&mut self, slot: u16) -> &mut [u8] {
        assert!(
            self.slot_idle(slot),
            "slab slot {slot} is still in use by the kernel"
        );
        let at = usize::from(slot) * self.slot_bytes;
        &mut self.slab[at..at + self.slot_bytes]
    }

    /// Registers guest memory as fixed buffers (≤1 GiB pieces), so zero-copy sends skip the
    /// per-send page pinning. Pins and faults in the memory: ~0.1–1 s per GiB.
    fn register_guest_memory(&mut self) -> Result<()> {
        if self.guest_fixed.is_some() {
            return Ok(());
        }
        let mut iovecs = Vec::new();
        let mut table = Vec::new();
        for region in self.memory.regions() {
            let mut pieces = Vec::new();
            let mut offset = 0u64;
            while offset < region.len() {
                let len = (region.len() - offset).min(REGISTERED_BUFFER_BYTES_MAX as u64);
                let index = 1 + iovecs.len();
                if index >= REGISTERED_BUFFERS_MAX {
                    return Err(Error::Config(
                        "guest memory needs more fixed buffers than pagewire registers".into(),
                    ));
                }
                iovecs.push(libc::iovec {
                    iov_base: region.host_ptr(offset, len).cast(),
                    iov_len: len as usize,
                });
                pieces.push((index as u16, offset));
                offset += len;
            }
            table.push(pieces);
        }
        // SAFETY: every iovec lies inside a region of `self.memory`, which the ring keeps alive
        // (Arc field) until after Drop has drained every op.
        unsafe {
            self.ring
                .submitter()
                .register_buffers_update(1, &iovecs, None)
        }
        .map_err(|e| Error::io("registering guest memory as io_uring fixed buffers", e))?;
        self.guest_fixed = Some(table);
        Ok(())
    }

    /// Pushes a send of one buffer. `zero_copy` uses `SEND_ZC` (with a fixed buffer when the
    /// buffer is registered) and asks for usage reports. `link` chains the next op after it.
    /// `owner` is the slab slot the op counts against when `buf` is guest memory, so a frame's
    /// slot stays busy until every piece's notification has arrived.
    fn push_send(&mut self, tag: u64, buf: Buf, zero_copy: bool, link: bool, owner: Option<u16>) {
        let ptr = self.addr(buf);
        let fd = types::Fd(self.socket.as_raw_fd());
        let flags = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;
        let entry = if zero_copy {
            opcode::SendZc::new(fd, ptr, buf.len())
                .buf_index(self.fixed_index(buf))
                .flags(flags)
                .zc_flags(IORING_SEND_ZC_REPORT_USAGE)
                .build()
        } else {
            opcode::Send::new(fd, ptr, buf.len()).flags(flags).build()
        };
        let id = self.take_op(tag, Self::slot_of(buf).or(owner), None);
        let entry = entry.user_data(id);
        self.push_entry(if link {
            entry.flags(squeue::Flags::IO_LINK)
        } else {
            entry
        });
    }

    /// Pushes a vectored send (`sendmsg`) of `bufs`, at most one slab buffer among them. Skips the
    /// first `skip` bytes (to resume a short send).
    fn push_sendmsg(&mut self, tag: u64, bufs: &[Buf], skip: u64, link: bool) {
        let entry = self.vectored_entry(bufs, skip, true);
        let (entry, slot, v) = entry;
        let id = self.take_op(tag, slot, Some(v));
        let entry = entry.user_data(id);
        self.push_entry(if link {
            entry.flags(squeue::Flags::IO_LINK)
        } else {
            entry
        });
    }

    /// Pushes a receive filling all of `bufs` in order (`MSG_WAITALL`), skipping the first
    /// `skip` bytes (already received by an earlier, short, receive).
    fn push_recv(&mut self, tag: u64, bufs: &[Buf], skip: u64) {
        let fd = types::Fd(self.socket.as_raw_fd());
        if let [buf] = bufs {
            let buf = &advance(*buf, skip);
            let ptr = self.addr(*buf);
            let entry = opcode::Recv::new(fd, ptr, buf.len())
                .flags(libc::MSG_WAITALL)
                .build();
            let id = self.take_op(tag, Self::slot_of(*buf), None);
            self.push_entry(entry.user_data(id));
        } else {
            let (entry, slot, v) = self.vectored_entry(bufs, skip, false);
            let id = self.take_op(tag, slot, Some(v));
            self.push_entry(entry.user_data(id));
        }
    }

    /// Pushes a receive of whatever is available, up to `buf`'s length (no `MSG_WAITALL`).
    fn push_recv_some(&mut self, tag: u64, buf: Buf) {
        let fd = types::Fd(self.socket.as_raw_fd());
        let ptr = self.addr(buf);
        let entry = opcode::Recv::new(fd, ptr, buf.len()).build();
        let id = self.take_op(tag, Self::slot_of(buf), None);
        self.push_entry(entry.user_data(id));
    }

    /// Submits queued ops and waits up to `slice` for at least `want` completions.
    fn submit_and_wait(&mut self, want: usize, slice: Duration) -> Result<Wait> {
        let ts = types::Timespec::from(slice);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(Wait::Ready),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(Wait::TimedOut),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(Wait::Ready),
            // CQ overflow pending: the caller reaps, then calls again.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(Wait::Ready),
            Err(e) => Err(Error::io("waiting on io_uring", e)),
        }
    }

    /// Submits queued ops without waiting.
    fn submit(&mut self) -> Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(Error::io("submitting to io_uring", e)),
        }
    }

    /// The next completion, if any. A completion for an op already retired (a notification the
    /// kernel posted after the op's final completion) is logged and skipped.
    fn next_completion(&mut self) -> Option<Completion> {
        loop {
            let cqe = self.ring.completion().next()?;
            let flags = cqe.flags();
            let more = cqueue::more(flags);
            let notif = cqueue::notif(flags);
            let Some(id) = self.live_op(cqe.user_data()) else {
                tracing::warn!(
                    user_data = cqe.user_data(),
                    result = cqe.result(),
                    flags,
                    "io_uring completion for an op already retired; skipped"
                );
                continue;
            };
            let tag = self.ops[id].map_or(0, |e| e.tag);
            if !more {
                self.release(id);
            }
            return Some(Completion {
                tag,
                result: cqe.result(),
                more,
                notif,
                zc_copied: notif && (cqe.result() as u32 & IORING_NOTIF_USAGE_ZC_COPIED) != 0,
            });
        }
    }

    fn bytes_received(&self) -> u64 {
        crate::sys::tcp_bytes_received(&self.socket)
    }

    fn delivery(&self) -> Option<crate::sys::Delivery> {
        crate::sys::tcp_delivery(&self.socket)
    }

    fn shutdown(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        self.cancel_all_and_drain(Duration::from_secs(5));
    }
}
