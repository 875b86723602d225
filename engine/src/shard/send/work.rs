//! What the coordinator hands a send shard through its queue: chunks of page runs, round and
//! stream ends, device state.

use std::sync::Arc;

/// Runs of pages of one region that one frame carries: at most `CHUNK_RUNS_MAX` runs and
/// `CHUNK_PAGES_MAX` pages in all, in increasing page order. A dirty round's pages are often
/// scattered: packing their runs into frames, rather than a frame per run, keeps per-frame
/// costs off the last round's downtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkRuns {
    runs: [(u64, u32); CHUNK_RUNS_MAX],
    len: usize,
    pages: u32,
}

/// Runs one work item may carry (its frame may hold more: zero pages split runs further).
pub(crate) const CHUNK_RUNS_MAX: usize = 32;

impl ChunkRuns {
    /// No runs yet.
    pub(crate) fn new() -> Self {
        ChunkRuns {
            runs: [(0, 0); CHUNK_RUNS_MAX],
            len: 0,
            pages: 0,
        }
    }

    /// Pages it may still take.
    pub(crate) fn room(&self) -> u32 {
        if self.len == CHUNK_RUNS_MAX {
            0
        } else {
            crate::limits::CHUNK_PAGES_MAX as u32 - self.pages
        }
    }

    /// Adds `pages` pages from `first_page` (at most [`room`](Self::room)), after the others.
    pub(crate) fn push(&mut self, first_page: u64, pages: u32) {
        assert!(
            pages > 0 && pages <= self.room(),
            "a chunk run that does not fit"
        );
        debug_assert!(
            self.len == 0 || {
                let (f, n) = self.runs[self.len - 1];
                f + u64::from(n) <= first_page
            },
            "chunk runs in page order"
        );
        self.runs[self.len] = (first_page, pages);
        self.len += 1;
        self.pages += pages;
    }

    /// Pages in all.
    pub(crate) fn pages(&self) -> u32 {
        self.pages
    }

    /// The runs, as (first page, pages).
    pub(crate) fn runs(&self) -> &[(u64, u32)] {
        &self.runs[..self.len]
    }
}

/// A unit of work from the coordinator.
// A chunk's runs travel inline (about 0.5 KiB) through the bounded queue: boxing them would
// allocate once per chunk on the data path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Work {
    /// Send the pages of `runs` of `region`; `live` when vCPUs may write them meanwhile (a
    /// pre-copy round).
    Chunk {
        region: u32,
        runs: ChunkRuns,
        live: bool,
    },
    /// End the current round on this channel. `live`: a pre-copy round, whose `RoundPlaced`
    /// the coordinator waits for before it sends anything more, so the shard watches its ring
    /// for it rather than its queue.
    EndRound { live: bool },
    /// End the stream and wait for the receiver's confirmation.
    Finish,
    /// Tell the receiver this channel is alive (the shard makes these itself when idle).
    Keepalive,
    /// Tell the receiver why this side failed (the shard makes it itself on the way out).
    Abort,
    /// One chunk of a device state blob (at most `DEVICE_CHUNK_BYTES_MAX` bytes).
    DeviceState {
        tag: u32,
        total: u64,
        last: bool,
        chunk: Arc<[u8]>,
    },
}
