//! Dirty-page sources: what tells a live migration which pages changed since the last round.
//!
//! Every source speaks one format, KVM's: a bitmap per region, one bit per 4 KiB page, in
//! `u64` words (bit `p % 64` of word `p / 64` is page `p`). A source ORs what it saw into a
//! [`DirtyBitmaps`] and clears it at the source, so the next call reports only later writes
//! ("get and clear"). Several sources (the vCPUs' KVM dirty log, a VMM's own bitmap for device
//! DMA) combine by ORing into the same bitmaps ([`Union`]), and the round's page runs come out
//! of the union once ([`DirtyBitmaps::runs`], built on [`bitmap_to_runs`]).
//!
//! Sources here: [`SharedBitmap`] (a VMM marks pages from any thread; also the software source
//! of tests), [`Union`], and with the `kvm` feature `kvm::KvmDirtyLog`.

// No unsafe operation here; one `unsafe fn` (`kvm::KvmDirtyLog::new`) states a contract
// the kernel relies on and Rust cannot check, and allows itself.
#![deny(unsafe_code)]

#[cfg(feature = "kvm")]
pub mod kvm;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::sender::PageRun;

/// Pages one bitmap word covers.
pub const PAGES_PER_WORD: u64 = 64;

/// Appends to `out` the runs of set bits among the first `pages` bits of `words` (pages of
/// `region`), in page order, each as long as possible. Bits past `pages` are ignored. Runs of
/// whole words cost one comparison per word, so sparse and dense bitmaps are both fast.
pub fn bitmap_to_runs(region: u32, words: &[u64], pages: u64, out: &mut Vec<PageRun>) {
    out.extend(BitmapRuns::new(vec![(region, words, pages)]));
}

/// The runs of set bits of bitmaps in KVM's layout, one per region, as an iterator: what a
/// round sends ([`crate::Sender::send_runs`]) without a list of them, which for a scattered
/// dirty set of a multi-TiB guest would take GiBs. Runs come in the order of the bitmaps, then
/// of pages, each as long as possible; bits past a region's pages are ignored. Cheap to clone
/// (a sender walks the runs twice: to check them, then to send them).
#[derive(Debug, Clone)]
pub struct BitmapRuns<'a> {
    /// Each bitmap's region index, words and pages.
    maps: Vec<(u32, &'a [u64], u64)>,
    /// The bitmap being walked, and the first page in it not walked yet.
    map: usize,
    page: u64,
}

impl<'a> BitmapRuns<'a> {
    /// The runs of `maps`: `(region, words, pages)` each, in the order runs are wanted.
    pub fn new(maps: Vec<(u32, &'a [u64], u64)>) -> Self {
        BitmapRuns {
            maps,
            map: 0,
            page: 0,
        }
    }
}

/// The first page from `from` on whose bit is `set` (or clear), among `end` pages of `words`.
fn next_bit(words: &[u64], end: u64, from: u64, set: bool) -> Option<u64> {
    let flip = if set { 0 } else { u64::MAX };
    let mut w = usize::try_from(from / PAGES_PER_WORD).ok()?;
    let mut x = (words.get(w)? ^ flip) & (u64::MAX << (from % PAGES_PER_WORD));
    // Whole words of the other kind cost one comparison each.
    while x == 0 {
        w += 1;
        x = words.get(w)? ^ flip;
    }
    let page = w as u64 * PAGES_PER_WORD + u64::from(x.trailing_zeros());
    (page < end).then_some(page)
}

impl Iterator for BitmapRuns<'_> {
    type Item = PageRun;

    fn next(&mut self) -> Option<PageRun> {
        while let Some(&(region, words, pages)) = self.maps.get(self.map) {
            let end = pages.min(words.len() as u64 * PAGES_PER_WORD);
            if let Some(first) = next_bit(words, end, self.page, true) {
                let last = next_bit(words, end, first, false).unwrap_or(end);
                self.page = last;
                return Some(PageRun {
                    region,
                    first_page: first,
                    pages: last - first,
                });
            }
            self.map += 1;
            self.page = 0;
        }
        None
    }
}

/// Words a bitmap of `pages` pages needs.
pub fn words_for(pages: u64) -> usize {
    pages.div_ceil(PAGES_PER_WORD) as usize
}

/// One dirty bitmap per region of a layout (see the module docs).
#[derive(Debug, Clone)]
pub struct DirtyBitmaps {
    regions: Vec<Vec<u64>>,
    pages: Vec<u64>,
}

impl DirtyBitmaps {
    /// Clear bitmaps for the regions of `memory`.
    pub fn for_memory(memory: &GuestMemory) -> Self {
        let pages = memory.region_pages();
        DirtyBitmaps {
            regions: pages.iter().map(|&p| vec![0; words_for(p)]).collect(),
            pages,
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.fill(0);
        }
    }

    /// The regions it has bitmaps for.
    pub fn regions(&self) -> u32 {
        self.pages.len() as u32
    }

    /// Pages in region `region`.
    pub fn region_pages(&self, region: u32) -> Option<u64> {
        self.pages.get(region as usize).copied()
    }

    /// ORs `words` (KVM's layout) into region `region`'s bitmap. Fails when the region does not
    /// exist or `words` is not exactly its bitmap's length. Bits past the region's last page
    /// (a VMM that marks whole words) are dropped, so [`dirty_pages`](Self::dirty_pages) never
    /// counts pages the region does not have.
    pub fn or_words(&mut self, region: u32, words: &[u64]) -> Result<()> {
        let bitmap = self.regions.get_mut(region as usize).ok_or_else(|| {
            Error::Config(format!(
                "dirty bitmap for region {region}, which the layout does not have"
            ))
        })?;
        if words.len() != bitmap.len() {
            return Err(Error::Config(format!(
                "dirty bitmap for region {region} has {} words; its {} pages need {}",
                words.len(),
                self.pages[region as usize],
                bitmap.len()
            )));
        }
        for (b, w) in bitmap.iter_mut().zip(words) {
            *b |= w;
        }
        let tail_bits = self.pages[region as usize] % PAGES_PER_WORD;
        if let (Some(last), true) = (bitmap.last_mut(), tail_bits != 0) {
            *last &= (1u64 << tail_bits) - 1;
        }
        Ok(())
    }

    /// Marks `pages` pages of `region` from `first_page` (clipped to the region).
    pub fn mark(&mut self, region: u32, first_page: u64, pages: u64) {
        let Some(&limit) = self.pages.get(region as usize) else {
            return;
        };
        let bitmap = &mut self.regions[region as usize];
        for p in first_page..first_page.saturating_add(pages).min(limit) {
            bitmap[(p / PAGES_PER_WORD) as usize] |= 1 << (p % PAGES_PER_WORD);
        }
    }

    /// Pages marked dirty, in all regions.
    pub fn dirty_pages(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Replaces `out` with the dirty pages as runs, sorted by region and page (what
    /// [`crate::Sender::send_round`] takes).
    pub fn runs(&self, out: &mut Vec<PageRun>) {
        out.clear();
        out.extend(self.iter_runs());
    }

    /// The dirty pages as runs, sorted by region and page, without a list of them (what
    /// [`crate::Sender::send_runs`] takes).
    pub fn iter_runs(&self) -> BitmapRuns<'_> {
        BitmapRuns::new(
            self.regions
                .iter()
                .zip(&self.pages)
                .enumerate()
                .map(|(i, (words, &pages))| (i as u32, words.as_slice(), pages))
                .collect(),
        )
    }
}

/// Something that knows which pages were written (see the module docs).
pub trait DirtySource: Send {
    /// ORs every page written since the previous call (or since tracking began) into `into`,
    /// and clears them here, so the next call reports only later writes.
    fn collect(&mut self, into: &mut DirtyBitmaps) -> Result<()>;
}

/// A VMM's own dirty bitmap: any thread marks the pages it writes (an emulated device's DMA,
/// a software dirtier in tests); a round takes and clears them word by word, atomically, so a
/// mark is never lost between two rounds.
#[derive(Debug)]
pub struct SharedBitmap {
    regions: Vec<Box<[AtomicU64]>>,
    pages: Vec<u64>,
}

impl SharedBitmap {
    /// A clear bitmap for the regions of `memory`.
    pub fn new(memory: &GuestMemory) -> Self {
        let pages = memory.region_pages();
        SharedBitmap {
            regions: pages
                .iter()
                .map(|&p| (0..words_for(p)).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            pages,
        }
    }

    /// Marks `pages` pages of `region` from `first_page` as written (clipped to the region;
    /// an unknown region is ignored).
    pub fn mark(&self, region: u32, first_page: u64, pages: u64) {
        let Some(&limit) = self.pages.get(region as usize) else {
            return;
        };
        let words = &self.regions[region as usize];
        let end = first_page.saturating_add(pages).min(limit);
        let mut p = first_page;
        while p < end {
            let bit = p % PAGES_PER_WORD;
            let n = (PAGES_PER_WORD - bit).min(end - p);
            let mask = if n == PAGES_PER_WORD {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            words[(p / PAGES_PER_WORD) as usize].fetch_or(mask, Ordering::Release);
            p += n;
        }
    }
}

impl DirtySource for std::sync::Arc<SharedBitmap> {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> Result<()> {
        // Checked whole before anything is taken: a bitmap of another layout would drop the
        // marks that do not fit (and with them, pages the guest wrote).
        if self.pages != into.pages {
            return Err(Error::Config(format!(
                "a shared dirty bitmap made for another layout (region pages {:?}, the migration's {:?})",
                self.pages, into.pages
            )));
        }
        for (bitmap, words) in into.regions.iter_mut().zip(self.regions.iter()) {
            for (b, w) in bitmap.iter_mut().zip(words.iter()) {
                // Most words of a large guest are clean: a plain load passes them without a
                // locked write each (16 M of them at 4 TiB). A bit set just after the load
                // stays set for the next collect, as if this one had come a moment earlier.
                if w.load(Ordering::Relaxed) != 0 {
                    *b |= w.swap(0, Ordering::AcqRel);
                }
            }
        }
        Ok(())
    }
}

/// Several sources as one: a page is dirty when any of them says so.
pub struct Union(pub Vec<Box<dyn DirtySource>>);

impl DirtySource for Union {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> Result<()> {
        for s in &mut self.0 {
            s.collect(into)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionSpec;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn reference(region: u32, words: &[u64], pages: u64) -> Vec<PageRun> {
        let mut out: Vec<PageRun> = Vec::new();
        for p in 0..pages.min(words.len() as u64 * 64) {
            if words[(p / 64) as usize] >> (p % 64) & 1 == 0 {
                continue;
            }
            match out.last_mut() {
                Some(r) if r.first_page + r.pages == p => r.pages += 1,
                _ => out.push(PageRun {
                    region,
                    first_page: p,
                    pages: 1,
                }),
            }
        }
        out
    }

    fn word() -> impl Strategy<Value = u64> {
        // Whole words of zeros and ones are the fast paths; mix them with random ones.
        prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            any::<u64>(),
            (0u32..64).prop_map(|b| 1 << b)
        ]
    }

    proptest! {
        #[test]
        fn runs_match_the_bit_by_bit_reference(
            words in proptest::collection::vec(word(), 0..40),
            cut in 0u64..64,
        ) {
            let pages = (words.len() as u64 * 64).saturating_sub(cut);
            let mut out = Vec::new();
            bitmap_to_runs(3, &words, pages, &mut out);
            prop_assert_eq!(out, reference(3, &words, pages));
        }
    }

    proptest! {
        #[test]
        fn runs_of_several_bitmaps_come_in_their_order_and_resume_from_a_clone(
            maps in proptest::collection::vec(
                (proptest::collection::vec(word(), 0..12), 0u64..64), 0..5),
            taken in 0usize..40,
        ) {
            let maps: Vec<(u32, Vec<u64>, u64)> = maps
                .into_iter()
                .enumerate()
                .map(|(i, (words, cut))| {
                    let pages = (words.len() as u64 * 64).saturating_sub(cut);
                    (2 * i as u32, words, pages)
                })
                .collect();
            let expected: Vec<PageRun> = maps
                .iter()
                .flat_map(|(r, words, pages)| reference(*r, words, *pages))
                .collect();
            let mut runs =
                BitmapRuns::new(maps.iter().map(|(r, w, p)| (*r, w.as_slice(), *p)).collect());
            let first: Vec<PageRun> = runs.by_ref().take(taken).collect();
            let rest = runs.clone();
            prop_assert_eq!(first.len(), taken.min(expected.len()));
            prop_assert_eq!(&first[..], &expected[..first.len()]);
            prop_assert_eq!(rest.collect::<Vec<_>>(), &expected[first.len()..]);
            prop_assert_eq!(runs.collect::<Vec<_>>(), &expected[first.len()..]);
        }
    }

    #[test]
    fn edges_of_words_and_regions() {
        let mut out = Vec::new();
        bitmap_to_runs(0, &[1 << 63, 1], 128, &mut out);
        assert_eq!(out, reference(0, &[1 << 63, 1], 128));
        assert_eq!(out.len(), 1, "a run across a word boundary is one run");
        out.clear();
        bitmap_to_runs(0, &[u64::MAX], 10, &mut out);
        assert_eq!(
            (out[0].first_page, out[0].pages),
            (0, 10),
            "bits past the region"
        );
    }

    #[test]
    fn shared_marks_are_taken_once_and_unions_add_up() {
        let specs = [
            RegionSpec {
                gpa: 0,
                len: 200 * 4096,
            },
            RegionSpec {
                gpa: 1 << 30,
                len: 70 * 4096,
            },
        ];
        let memory = GuestMemory::anonymous(&specs).unwrap();
        let a = Arc::new(SharedBitmap::new(&memory));
        let b = Arc::new(SharedBitmap::new(&memory));
        a.mark(0, 60, 10);
        a.mark(1, 65, 100); // clipped to the region's 70 pages
        b.mark(0, 63, 2);
        b.mark(0, 199, 1);
        let mut bitmaps = DirtyBitmaps::for_memory(&memory);
        let mut union = Union(vec![Box::new(a.clone()), Box::new(b.clone())]);
        union.collect(&mut bitmaps).unwrap();
        assert_eq!(bitmaps.dirty_pages(), 10 + 5 + 1);
        let mut runs = Vec::new();
        bitmaps.runs(&mut runs);
        let got: Vec<_> = runs
            .iter()
            .map(|r| (r.region, r.first_page, r.pages))
            .collect();
        assert_eq!(got, [(0, 60, 10), (0, 199, 1), (1, 65, 5)]);
        // Taken: the next round sees only later marks.
        bitmaps.clear();
        union.collect(&mut bitmaps).unwrap();
        assert_eq!(bitmaps.dirty_pages(), 0);
        a.mark(1, 0, 1);
        union.collect(&mut bitmaps).unwrap();
        assert_eq!(bitmaps.dirty_pages(), 1);
        // Whole words from a VMM: the bits past a region's 70 pages are not pages.
        bitmaps.clear();
        bitmaps.or_words(1, &[u64::MAX, u64::MAX]).unwrap();
        assert_eq!(bitmaps.dirty_pages(), 70);
        bitmaps.or_words(0, &[0, 0, 0, u64::MAX]).unwrap();
        assert_eq!(bitmaps.dirty_pages(), 70 + 200 - 192);
        assert!(bitmaps.or_words(0, &[0; 3]).is_err(), "wrong length");
        assert!(bitmaps.or_words(2, &[0; 4]).is_err(), "no such region");
        // A shared bitmap of another layout is refused, and keeps its marks: fewer regions,
        // more, or a region of another size would drop some.
        let one = |pages: u64| {
            GuestMemory::anonymous(&[RegionSpec {
                gpa: 0,
                len: pages * 4096,
            }])
            .unwrap()
        };
        for other in [one(200), one(300)] {
            let mut bitmaps = DirtyBitmaps::for_memory(&other);
            a.mark(0, 150, 1);
            assert!(a.clone().collect(&mut bitmaps).is_err());
            assert_eq!(bitmaps.dirty_pages(), 0);
        }
        let mut bitmaps = DirtyBitmaps::for_memory(&memory);
        let small = Arc::new(SharedBitmap::new(&one(200)));
        small.mark(0, 150, 1);
        assert!(small.clone().collect(&mut bitmaps).is_err());
        a.clone().collect(&mut bitmaps).unwrap();
        assert_eq!(bitmaps.dirty_pages(), 1, "the marks stay until taken");
    }
}
