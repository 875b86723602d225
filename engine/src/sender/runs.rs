//! What a round sends: runs of pages, checked against the layout and packed into chunks for
//! the shards.

use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::shard::send::ChunkRuns;

/// Consecutive pages of one region to send in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Region index in the layout.
    pub region: u32,
    /// First page (index within the region).
    pub first_page: u64,
    /// Number of pages.
    pub pages: u64,
}

impl PageRun {
    /// One run per region covering all of `memory` (round 0 of a live migration).
    pub fn whole(memory: &GuestMemory) -> Vec<PageRun> {
        memory
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| PageRun {
                region: i as u32,
                first_page: 0,
                pages: r.pages(),
            })
            .collect()
    }
}

/// `runs` (sorted, disjoint) packed into chunks of one region each, of up to
/// `CHUNK_PAGES_MAX` pages and `CHUNK_RUNS_MAX` runs: long runs split, scattered ones shared.
pub(super) fn pack_chunks(
    runs: impl Iterator<Item = PageRun>,
) -> impl Iterator<Item = (u32, ChunkRuns)> {
    let mut pending = runs.map(|r| (r.region, r.first_page, r.pages));
    let mut carry: Option<(u32, u64, u64)> = None;
    std::iter::from_fn(move || {
        let mut chunk = ChunkRuns::new();
        let mut region = None;
        while let Some((r, first, pages)) = carry.take().or_else(|| pending.next()) {
            if region.is_some_and(|c| c != r) || chunk.room() == 0 {
                carry = Some((r, first, pages));
                break;
            }
            region = Some(r);
            let n = pages.min(u64::from(chunk.room())) as u32;
            chunk.push(first, n);
            if u64::from(n) < pages {
                carry = Some((r, first + u64::from(n), pages - u64::from(n)));
            }
        }
        region.map(|r| (r, chunk))
    })
}

/// Checks a round's runs against `memory`'s layout (each inside its region, none empty, sorted
/// and disjoint) and returns their pages in all.
pub(super) fn check_runs(memory: &GuestMemory, runs: impl Iterator<Item = PageRun>) -> Result<u64> {
    let regions = memory.regions();
    let mut total = 0u64;
    let mut last: Option<(u32, u64)> = None;
    for run in runs {
        let Some(region) = regions.get(run.region as usize) else {
            return Err(Error::Config(format!(
                "page run names region {} but the layout has {}",
                run.region,
                regions.len()
            )));
        };
        let end = run.first_page.checked_add(run.pages);
        if run.pages == 0 || end.is_none_or(|e| e > region.pages()) {
            return Err(Error::Config(format!(
                "page run {}+{} is empty or outside region {} ({} pages)",
                run.first_page,
                run.pages,
                run.region,
                region.pages()
            )));
        }
        if let Some((r, e)) = last {
            if (run.region, run.first_page) < (r, e) {
                return Err(Error::Config(format!(
                    "page runs must be sorted and disjoint: region {} page {} comes after region {r} page {e}",
                    run.region, run.first_page
                )));
            }
        }
        last = Some((run.region, run.first_page + run.pages));
        total += run.pages;
    }
    Ok(total)
}
