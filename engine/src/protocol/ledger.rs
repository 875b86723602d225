//! The receiver's page ledger: which pages of the layout have been placed, and which have ever
//! held data written by this transfer. Shared by every receiver shard (atomic bitmaps, one bit
//! per page: 32 KiB per GiB of guest memory each).
//!
//! *Placed* means a frame naming the page was checked in full and its bytes (or its zeros) are
//! in destination memory. The receiver reports success only when every page of the layout was
//! placed at least once, so a sender that ends its stream early, or a stranger that forges an
//! end of stream over an empty image, gets an error naming the first page never received
//! instead of a success over a partial image.
//!
//! *Written* serves the zero-page rule on memory that started out zero (fresh anonymous memory,
//! a new file): a zero page arriving for a page nothing has written yet needs no store.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits per bitmap word.
const WORD_BITS: u64 = 64;

#[derive(Debug)]
struct RegionLedger {
    pages: u64,
    placed: Vec<AtomicU64>,
    /// `Some` when the region started out zero.
    written: Option<Vec<AtomicU64>>,
}

fn bitmap(pages: u64) -> Vec<AtomicU64> {
    (0..pages.div_ceil(WORD_BITS))
        .map(|_| AtomicU64::new(0))
        .collect()
}

/// Sets bits `first..first + n` of `bits`, a word at a time.
fn set_range(bits: &[AtomicU64], first: u64, n: u64) {
    let (mut at, end) = (first, first + n);
    while at < end {
        let word = at / WORD_BITS;
        let lo = at % WORD_BITS;
        let hi = (end - word * WORD_BITS).min(WORD_BITS);
        let mask = if hi - lo == WORD_BITS {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        bits[word as usize].fetch_or(mask, Ordering::Relaxed);
        at = word * WORD_BITS + hi;
    }
}

/// Which pages of a layout a receiver has placed and written (see the module docs).
#[derive(Debug)]
pub struct PageLedger {
    regions: Vec<RegionLedger>,
}

/// The first page a finished transfer never placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    /// Region index.
    pub region: u32,
    /// Page index within the region.
    pub page: u64,
    /// Pages missing across the layout.
    pub pages: u64,
}

impl PageLedger {
    /// A ledger for regions of `(pages, initially_zero)`.
    pub fn new(regions: impl IntoIterator<Item = (u64, bool)>) -> Self {
        PageLedger {
            regions: regions
                .into_iter()
                .map(|(pages, zero)| RegionLedger {
                    pages,
                    placed: bitmap(pages),
                    written: zero.then(|| bitmap(pages)),
                })
                .collect(),
        }
    }

    /// Records that `n` pages from `first` of `region` are placed. The caller checked the range
    /// against the layout (an out-of-range call panics: it is our bug, not peer input).
    pub fn mark_placed(&self, region: u32, first: u64, n: u64) {
        let r = &self.regions[region as usize];
        assert!(first + n <= r.pages, "placed range outside region {region}");
        set_range(&r.placed, first, n);
    }

    /// Records that `n` pages from `first` of `region` no longer hold a checked copy (a torn page
    /// of a live round overwrote it): they must arrive again before the transfer can succeed.
    pub fn mark_unplaced(&self, region: u32, first: u64, n: u64) {
        let r = &self.regions[region as usize];
        assert!(
            first + n <= r.pages,
            "unplaced range outside region {region}"
        );
        for page in first..first + n {
            r.placed[(page / WORD_BITS) as usize]
                .fetch_and(!(1 << (page % WORD_BITS)), Ordering::Relaxed);
        }
    }

    /// Records that `n` pages from `first` of `region` now hold data written by this transfer.
    pub fn mark_written(&self, region: u32, first: u64, n: u64) {
        let r = &self.regions[region as usize];
        assert!(
            first + n <= r.pages,
            "written range outside region {region}"
        );
        if let Some(bits) = &r.written {
            set_range(bits, first, n);
        }
    }

    /// True when `page` of `region` is known to hold zeros (its region started zero and this
    /// transfer has not written it).
    pub fn known_zero(&self, region: u32, page: u64) -> bool {
        match &self.regions[region as usize].written {
            Some(bits) => {
                bits[(page / WORD_BITS) as usize].load(Ordering::Relaxed)
                    & (1 << (page % WORD_BITS))
                    == 0
            }
            None => false,
        }
    }

    /// The first page never placed, with the count of all such pages; `None` when the layout is
    /// complete.
    pub fn first_missing(&self) -> Option<Missing> {
        let mut first = None;
        let mut pages = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            for (w, word) in r.placed.iter().enumerate() {
                let in_word = (r.pages - w as u64 * WORD_BITS).min(WORD_BITS);
                let full = if in_word == WORD_BITS {
                    u64::MAX
                } else {
                    (1u64 << in_word) - 1
                };
                let missing = !word.load(Ordering::Relaxed) & full;
                if missing != 0 {
                    pages += u64::from(missing.count_ones());
                    first.get_or_insert(Missing {
                        region: i as u32,
                        page: w as u64 * WORD_BITS + u64::from(missing.trailing_zeros()),
                        pages: 0,
                    });
                }
            }
        }
        first.map(|m| Missing { pages, ..m })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_set_exactly_their_bits() {
        for (first, n) in [
            (0, 1),
            (3, 61),
            (63, 2),
            (0, 64),
            (5, 200),
            (64, 64),
            (127, 1),
        ] {
            let bits = bitmap(300);
            set_range(&bits, first, n);
            for page in 0..300u64 {
                let set =
                    bits[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0;
                assert_eq!(
                    set,
                    (first..first + n).contains(&page),
                    "{first}+{n} page {page}"
                );
            }
        }
    }

    #[test]
    fn the_first_missing_page_is_named_until_every_page_is_placed() {
        let l = PageLedger::new([(70, true), (3, false)]);
        assert_eq!(
            l.first_missing(),
            Some(Missing {
                region: 0,
                page: 0,
                pages: 73
            })
        );
        l.mark_placed(0, 0, 70);
        l.mark_placed(1, 0, 1);
        l.mark_placed(1, 2, 1);
        assert_eq!(
            l.first_missing(),
            Some(Missing {
                region: 1,
                page: 1,
                pages: 1
            })
        );
        l.mark_placed(1, 1, 1);
        assert_eq!(l.first_missing(), None);
        l.mark_unplaced(0, 65, 1);
        assert_eq!(
            l.first_missing(),
            Some(Missing {
                region: 0,
                page: 65,
                pages: 1
            })
        );
    }

    #[test]
    fn known_zero_follows_writes_only_where_memory_started_zero() {
        let l = PageLedger::new([(10, true), (10, false)]);
        assert!(l.known_zero(0, 4));
        l.mark_written(0, 3, 2);
        assert!(!l.known_zero(0, 4) && l.known_zero(0, 5));
        assert!(!l.known_zero(1, 0));
    }
}
