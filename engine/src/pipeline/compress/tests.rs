//! Unit tests of per-shard compression: round trips, refusals, levels, when `auto` compresses.
use super::*;

fn text(len: usize) -> Vec<u8> {
    let words = [
        "page ",
        "kernel ",
        "migration ",
        "the ",
        "of ",
        "buffer ",
        "42 ",
        "\n",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = 12345u64;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn random(len: usize) -> Vec<u8> {
    let mut x = 99u64;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

#[test]
fn both_codecs_round_trip_frame_after_frame() {
    let mut c = Compressor::new(1).unwrap();
    let mut d = Decompressor::new().unwrap();
    // One context for frames of every size, as a shard uses it.
    for pages in [128, 1, 37, 128] {
        let src = text(pages * 4096);
        let mut comp = vec![0u8; src.len()];
        for codec in [Codec::Zstd, Codec::Zlib] {
            let n = c.compress(codec, &src, &mut comp).expect("text shrinks");
            assert!(n < src.len() / 2, "{codec:?}: {n}");
            let mut out = vec![0u8; src.len()];
            d.decompress(codec, &comp[..n], &mut out).unwrap();
            assert_eq!(out, src, "{codec:?}, {pages} pages");
        }
    }
}

#[test]
fn incompressible_data_is_left_raw() {
    let src = random(64 * 4096);
    let mut c = Compressor::new(1).unwrap();
    let mut comp = vec![0u8; src.len()];
    assert_eq!(c.compress(Codec::Zstd, &src, &mut comp), None);
    assert_eq!(c.compress(Codec::Zlib, &src, &mut comp), None);
}

#[test]
fn wrong_sizes_and_garbage_are_refused_without_writing_past_the_outputs() {
    let src = text(16 * 4096);
    let mut c = Compressor::new(1).unwrap();
    let mut d = Decompressor::new().unwrap();
    let mut comp = vec![0u8; src.len()];
    for codec in [Codec::Zstd, Codec::Zlib] {
        let n = c.compress(codec, &src, &mut comp).unwrap();
        // Declares more pages than the payload holds.
        let mut big = vec![0u8; 17 * 4096];
        assert!(matches!(
            d.decompress(codec, &comp[..n], &mut big),
            Err(DecompressError::Short { .. })
        ));
        // Declares fewer: the decoder stops at the outputs' end, and says so.
        let mut guard = vec![0xeeu8; 16 * 4096];
        let (small, after) = guard.split_at_mut(15 * 4096);
        assert!(matches!(
            d.decompress(codec, &comp[..n], small),
            Err(DecompressError::Long { .. })
        ));
        assert!(
            after.iter().all(|&b| b == 0xee),
            "{codec:?} wrote past its outputs"
        );
        // Garbage and truncation.
        let mut out = vec![0u8; 16 * 4096];
        let mut bad = comp[..n].to_vec();
        bad[n / 2] ^= 0xff;
        bad[0] ^= 0xff;
        assert!(d.decompress(codec, &bad, &mut out).is_err());
        assert!(d.decompress(codec, &comp[..n / 2], &mut out).is_err());
        // Trailing bytes after the compressed stream: refused.
        let mut trailing = comp[..n].to_vec();
        trailing.push(0);
        assert!(d.decompress(codec, &trailing, &mut out).is_err());
    }
}

#[test]
fn a_zstd_frame_declaring_a_huge_window_costs_no_window() {
    use std::io::Write;
    use zstd::zstd_safe::CParameter;
    // 256 KiB streamed with no declared size and a 128 MiB window: decoded in one shot into
    // the frame's own buffer, which is the window, so the declared size allocates nothing.
    let src = text(256 << 10);
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    enc.set_parameter(CParameter::WindowLog(27)).unwrap();
    enc.include_contentsize(false).unwrap();
    enc.write_all(&src).unwrap();
    let packed = enc.finish().unwrap();
    let mut out = vec![0u8; src.len()];
    let mut d = Decompressor::new().unwrap();
    d.decompress(Codec::Zstd, &packed, &mut out).unwrap();
    assert_eq!(out, src);
    // Declared smaller than it holds: refused at the buffer's end.
    let mut short = vec![0u8; src.len() - 4096];
    assert!(matches!(
        d.decompress(Codec::Zstd, &packed, &mut short),
        Err(DecompressError::Long { .. })
    ));
}

#[test]
fn levels_are_checked_against_the_library() {
    assert!(check_zstd_level(1).is_ok());
    assert!(check_zstd_level(-5).is_ok());
    assert!(check_zstd_level(19).is_ok());
    assert!(check_zstd_level(1000).is_err());
    assert!(check_zstd_level(-1_000_000).is_err());
}

/// A simulated shard on a link of `link` bytes/s, with raw sending limited by the CPU at
/// `raw_cpu` bytes/s: what the kernel would report after each frame.
fn simulate(a: &mut Auto, link: f64, raw_cpu: f64, ratio: f64, frames: usize) -> usize {
    let frame = 512 * 1024;
    let compress_rate = 350e6;
    let mut compressed = 0;
    for _ in 0..frames {
        let compress = a.compress_next();
        let offered = if compress {
            compressed += 1;
            let out = (frame as f64 / ratio) as usize;
            let took = Duration::from_secs_f64(frame as f64 / compress_rate);
            a.observe_compression(frame, out.min(frame), took);
            // Wire bytes offered per second while compressing.
            compress_rate / ratio
        } else {
            raw_cpu
        };
        // The link delivers what is offered, up to its capacity; below capacity the sample
        // is app-limited.
        a.observe_delivery(offered.min(link) as u64, offered < link, !compress);
    }
    compressed
}

#[test]
fn auto_turns_on_for_slow_links_and_off_for_fast_ones() {
    // Slow links (100 Mbit/s, 1 Gbit/s): compressing text (ratio 3) pays, even where the
    // compressor's output (117 MB/s) cannot quite fill the link (125 MB/s).
    for link in [12.5e6, 125e6] {
        let mut a = Auto::new();
        simulate(&mut a, link, 3e9, 3.0, 200);
        assert!(a.is_on(), "link {link} B/s");
    }
    // A fast link (10 Gbit/s): the compressor cannot keep up, raw wins; probes continue.
    let mut a = Auto::new();
    let compressed = simulate(&mut a, 1.25e9, 3e9, 3.0, 200);
    assert!(!a.is_on());
    assert!(
        (5..20).contains(&compressed),
        "{compressed} frames compressed"
    );
    // Loopback, where even raw sending is CPU-bound: off.
    let mut a = Auto::new();
    simulate(&mut a, 1e12, 3e9, 3.0, 200);
    assert!(!a.is_on());
    // Incompressible memory: off even on a slow link.
    let mut a = Auto::new();
    simulate(&mut a, 12.5e6, 3e9, 1.0, 200);
    assert!(!a.is_on());
}

#[test]
fn auto_without_link_samples_follows_the_ratio_both_ways() {
    // A UNIX socket has no delivery-rate samples: a stretch of incompressible pages turns
    // compression off, and the probes' later ratios of 3 turn it on again.
    let ms = Duration::from_millis(1);
    let mut a = Auto::new();
    a.observe_compression(512 << 10, 512 << 10, ms);
    assert!(!a.is_on());
    for _ in 0..(AUTO_PROBE_FRAMES * 20) {
        if a.compress_next() {
            a.observe_compression(512 << 10, 170 << 10, ms);
        }
    }
    assert!(a.is_on());
}
