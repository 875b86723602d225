//! Deterministic synthetic guest memory: the demo's embedded default, and the same bytes for
//! every engine a benchmark compares. Every page is a pure function of (content, seed, page
//! index), so two runs, or two engines, see identical memory.
//!
//! Zero pages are *written* zeros: the pages are faulted in, so scanning them reads DRAM, not the
//! kernel's shared zero page.

use std::str::FromStr;

use crate::limits::PAGE_BYTES;
use crate::memory::GuestMemory;

/// What the pages hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    /// Every page zero.
    Zero,
    /// Every page random bytes (incompressible).
    Random,
    /// Half zero, half random pages, interleaved pseudo-randomly.
    Mixed,
    /// Text-like pages (words, numbers, punctuation).
    Text,
    /// A realistic blend: in clusters of 8 pages, 45% zero, 35% text, 20% random.
    Blend,
}

impl Content {
    /// Every content kind.
    pub const ALL: [Content; 5] = [
        Content::Zero,
        Content::Random,
        Content::Mixed,
        Content::Text,
        Content::Blend,
    ];

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Content::Zero => "zero",
            Content::Random => "random",
            Content::Mixed => "mixed",
            Content::Text => "text",
            Content::Blend => "blend",
        }
    }
}

impl FromStr for Content {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Content::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!("content must be one of zero, random, mixed, text, blend; not {s:?}")
            })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PageKind {
    Zero,
    Random,
    Text,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn kind_of(content: Content, seed: u64, page: u64) -> PageKind {
    match content {
        Content::Zero => PageKind::Zero,
        Content::Random => PageKind::Random,
        Content::Text => PageKind::Text,
        Content::Mixed => {
            if splitmix(seed ^ page.wrapping_mul(0xa076_1d64_78bd_642f)) & 1 == 0 {
                PageKind::Zero
            } else {
                PageKind::Random
            }
        }
        Content::Blend => {
            match splitmix(seed ^ (page / 8).wrapping_mul(0xe703_7ed1_a0b4_28db)) % 100 {
                0..=44 => PageKind::Zero,
                45..=79 => PageKind::Text,
                _ => PageKind::Random,
            }
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "memory",
    "page",
    "kernel",
    "struct",
    "return",
    "value",
    "error",
    "buffer",
    "socket",
    "thread",
    "virtual",
    "machine",
    "migration",
    "state",
    "device",
    "queue",
    "index",
    "count",
    "length",
    "offset",
    "pointer",
    "const",
    "static",
    "inline",
    "unsigned",
    "int",
    "long",
    "char",
    "void",
    "if",
    "else",
    "while",
    "for",
    "case",
    "break",
    "default",
    "switch",
    "fn",
    "let",
    "mut",
    "impl",
    "pub",
    "use",
    "mod",
    "self",
    "match",
    "Some",
    "None",
    "Ok",
    "Err",
    "true",
    "false",
    "request",
    "response",
    "client",
    "server",
    "config",
    "debug",
    "info",
    "warn",
    "trace",
    "timestamp",
];

/// A pool of text the text pages are cut from (generated once per fill).
struct TextPool {
    bytes: Vec<u8>,
}

impl TextPool {
    const BYTES: usize = 4 << 20;

    fn new(seed: u64) -> Self {
        let mut bytes = Vec::with_capacity(Self::BYTES + 64);
        let mut state = seed ^ 0x7465_7874;
        let mut column = 0;
        while bytes.len() < Self::BYTES {
            state = splitmix(state);
            let word = WORDS[(state % WORDS.len() as u64) as usize];
            bytes.extend_from_slice(word.as_bytes());
            column += word.len() + 1;
            match (state >> 20) % 16 {
                0 => {
                    // A number, as logs and tables have.
                    let n = (state >> 32) % 100_000;
                    bytes.extend_from_slice(format!(" {n}").as_bytes());
                }
                1 => bytes.push(b','),
                2 => bytes.push(b'.'),
                _ => {}
            }
            if column > 72 {
                bytes.push(b'\n');
                column = 0;
            } else {
                bytes.push(b' ');
            }
        }
        TextPool { bytes }
    }
}

/// Writes page `page` (global index over the layout) of `content` into `out`.
fn fill_page(content: Content, seed: u64, page: u64, pool: &TextPool, out: &mut [u8; PAGE_BYTES]) {
    match kind_of(content, seed, page) {
        PageKind::Zero => out.fill(0),
        PageKind::Random => {
            let mut state = seed ^ page.wrapping_mul(0x8ebc_6af0_9c88_c6e3);
            for word in out.chunks_exact_mut(8) {
                state = splitmix(state);
                word.copy_from_slice(&state.to_le_bytes());
            }
        }
        PageKind::Text => {
            let at = (splitmix(seed ^ page) % (TextPool::BYTES - PAGE_BYTES) as u64) as usize;
            out.copy_from_slice(&pool.bytes[at..at + PAGE_BYTES]);
        }
    }
}

/// Fills every page of `memory` with `content` (seeded), writing zero pages too.
pub fn fill(memory: &GuestMemory, content: Content, seed: u64) {
    let pool = TextPool::new(seed);
    let mut page = [0u8; PAGE_BYTES];
    let mut global = 0u64;
    for region in memory.regions() {
        for p in 0..region.pages() {
            fill_page(content, seed, global, &pool, &mut page);
            region.write(p * PAGE_BYTES as u64, &page);
            global += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionSpec;

    #[test]
    fn fill_is_deterministic_and_matches_the_mix() {
        let spec = [RegionSpec {
            gpa: 0,
            len: 1 << 20,
        }];
        let scanner = crate::pipeline::zero::ZeroScanner::detect();
        for content in Content::ALL {
            let a = GuestMemory::anonymous(&spec).unwrap();
            let b = GuestMemory::anonymous(&spec).unwrap();
            fill(&a, content, 7);
            fill(&b, content, 7);
            assert_eq!(a.first_difference(&b), None, "{content:?}");
            let r = &a.regions()[0];
            let zeros = (0..r.pages())
                .filter(|&p| r.page_is_zero(&scanner, p))
                .count();
            let expect = match content {
                Content::Zero => 256..=256,
                Content::Random | Content::Text => 0..=0,
                Content::Mixed => 90..=166,
                Content::Blend => 60..=170,
            };
            assert!(
                expect.contains(&zeros),
                "{content:?}: {zeros} zero pages of 256"
            );
        }
    }
}
