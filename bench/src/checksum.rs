//! `pagewire-bench checksum`: the payload checksum candidates on one core, in cache and from
//! DRAM.

use std::time::Instant;

use anyhow::Result;

#[derive(clap::Args)]
pub(crate) struct ChecksumArgs {
    /// Bytes hashed per call (a frame's payload is at most 512 KiB).
    #[arg(long, default_value = "512KiB", value_parser = pagewire::units::parse_size)]
    chunk: u64,
    /// Memory streamed from DRAM for the out-of-cache figures.
    #[arg(long, default_value = "1GiB", value_parser = pagewire::units::parse_size)]
    size: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// GiB/s of `hash` over `total` bytes taken as `chunk`-sized calls over `buf` (wrapping).
fn hash_rate(buf: &[u8], chunk: usize, total: usize, mut hash: impl FnMut(&[u8]) -> u64) -> f64 {
    let mut sink = 0u64;
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        let at = done % buf.len();
        let n = chunk.min(buf.len() - at);
        sink ^= hash(&buf[at..at + n]);
        done += n;
    }
    std::hint::black_box(sink);
    total as f64 / (1u64 << 30) as f64 / start.elapsed().as_secs_f64()
}

pub(crate) fn run(a: ChecksumArgs) -> Result<()> {
    const LINE_BYTES: usize = 64;
    use pagewire::simd::xxh3::Xxh3;
    let chunk = a.chunk as usize;
    let mut hot = vec![0u8; chunk];
    let mut cold = vec![0u8; a.size as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in hot.iter_mut().chain(cold.iter_mut()) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // The first pass over freshly written memory runs slower than later ones (measured: by a
    // third): read it once untimed so the first row is not penalised.
    std::hint::black_box(cold.chunks(LINE_BYTES).fold(0u8, |a, p| a ^ p[0]));
    // pagewire hashes each 4 KiB page on its own (a checksum per page names a corrupt page).
    let per_page = |h: Xxh3| {
        move |bytes: &[u8]| {
            bytes
                .chunks(pagewire::limits::PAGE_BYTES)
                .fold(0u64, |a, p| a ^ h.hash(p))
        }
    };
    let scalar = per_page(Xxh3::scalar());
    let crate_xxh3 = xxhash_rust::xxh3::xxh3_64;
    let crc = |bytes: &[u8]| u64::from(crc32c::crc32c(bytes));
    let in_cache = 4usize << 30;
    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    for (name, h) in [
        ("xxh3 per 4 KiB page, pagewire AVX2", Xxh3::avx2()),
        ("xxh3 per 4 KiB page, pagewire AVX-512", Xxh3::avx512()),
    ] {
        if let Some(h) = h {
            let f = per_page(h);
            rows.push((
                name,
                hash_rate(&hot, chunk, in_cache, f),
                hash_rate(&cold, chunk, cold.len(), f),
            ));
        }
    }
    rows.extend([
        (
            "xxh3 per 4 KiB page, pagewire scalar reference",
            hash_rate(&hot, chunk, in_cache / 4, scalar),
            hash_rate(&cold, chunk, cold.len(), scalar),
        ),
        (
            "xxh3 whole chunk, xxhash-rust crate",
            hash_rate(&hot, chunk, in_cache, crate_xxh3),
            hash_rate(&cold, chunk, cold.len(), crate_xxh3),
        ),
        (
            "crc32c whole chunk, crc32c crate (SSE4.2)",
            hash_rate(&hot, chunk, in_cache, crc),
            hash_rate(&cold, chunk, cold.len(), crc),
        ),
    ]);
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(name, hot, cold)| serde_json::json!({"name": name, "in_cache_gib_s": hot, "from_dram_gib_s": cold}))
            .collect();
        println!("{}", serde_json::json!({"chunk_bytes": chunk, "rows": v}));
        return Ok(());
    }
    println!(
        "| checksum, one core, {} KiB per call | in cache GiB/s | from DRAM GiB/s |",
        chunk >> 10
    );
    println!("|---|---|---|");
    for (name, hot, cold) in rows {
        println!("| {name} | {hot:.2} | {cold:.2} |");
    }
    Ok(())
}
