//! The machine's ceilings, measured in the same run as the matrix: a one-core DRAM read scan
//! and memcpy, every core copying at once, the seal rates, zstd level 1 on text (compressing
//! and decoding), and the raw TCP medians by stream count.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use pagewire::pipeline::compress::{Codec, Compressor, Decompressor};
use pagewire::pipeline::zero::ZeroScanner;
use pagewire::synth::{fill, Content};
use pagewire::{GuestMemory, RegionSpec};
use serde::Serialize;

use super::{ContentSpec, MatrixArgs};
use crate::measure::{summarize, Run};

/// One-core ceilings, GiB/s.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Ceilings {
    pub(super) dram_read_scan_gib_s: f64,
    pub(super) memcpy_gib_s: f64,
    /// Every allowed core copying its share of the memory at once: the host's memory bandwidth
    /// (GiB copied per second, each read once and written once), the ceiling many shards meet.
    pub(super) memcpy_all_cores_gib_s: (usize, f64),
    pub(super) aead_seal_in_cache_gib_s: f64,
    pub(super) pagewire_seal_gib_s: f64,
    pub(super) rustls_encrypt_gib_s: f64,
    pub(super) zstd1_text_gib_s: f64,
    /// Decoding what zstd level 1 made of the text, GiB of text per second.
    pub(super) zstd1_text_decode_gib_s: f64,
    pub(super) raw_tcp_gib_s_by_channels: Vec<(u16, f64)>,
}

pub(super) fn measure(
    a: &MatrixArgs,
    memories: &[(ContentSpec, Arc<GuestMemory>)],
    raw: &[Vec<Run>],
) -> Result<Ceilings> {
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let gib = a.size as f64 / (1u64 << 30) as f64;
    // DRAM read scan: written zero pages, read whole by the zero scanner.
    let zero = match memories
        .iter()
        .find(|(c, _)| *c == ContentSpec::Synthetic(Content::Zero))
    {
        Some((_, m)) => m.clone(),
        None => {
            let m = Arc::new(GuestMemory::anonymous(&spec)?);
            fill(&m, Content::Zero, 0);
            m
        }
    };
    let scanner = ZeroScanner::detect();
    let r = &zero.regions()[0];
    let t = Instant::now();
    let zeros = (0..r.pages())
        .filter(|&p| r.page_is_zero(&scanner, p))
        .count() as u64;
    let scan = gib / t.elapsed().as_secs_f64();
    if zeros != r.pages() {
        bail!("the zero memory did not scan as zero");
    }
    // memcpy: the source copied out in 64 MiB pieces into one buffer.
    let src = &memories[0].1.regions()[0];
    // Buffers are written before timing, so first-touch page faults are not measured.
    let mut buf = vec![1u8; (64 << 20).min(a.size as usize)];
    let t = Instant::now();
    let mut at = 0u64;
    while at < src.len() {
        let n = (buf.len() as u64).min(src.len() - at) as usize;
        src.read(at, &mut buf[..n]);
        at += n as u64;
    }
    let memcpy = gib / t.elapsed().as_secs_f64();
    let memcpy_all = memcpy_all_cores(src)?;
    // Seal rates on the first content's memory.
    let seal = crate::seal::seal_rates(&memories[0].1)?;
    // zstd level 1 on text-like memory, 512 KiB blocks.
    let text = match memories
        .iter()
        .find(|(c, _)| *c == ContentSpec::Synthetic(Content::Text))
    {
        Some((_, m)) => m.clone(),
        None => {
            let m = Arc::new(GuestMemory::anonymous(&spec)?);
            fill(&m, Content::Text, 11);
            m
        }
    };
    let mut comp = Compressor::new(1)?;
    let mut block = vec![1u8; 512 << 10];
    let mut packed = vec![1u8; 512 << 10];
    let tr = &text.regions()[0];
    let t = Instant::now();
    let mut at = 0u64;
    while at < tr.len() {
        let n = (block.len() as u64).min(tr.len() - at) as usize;
        tr.read(at, &mut block[..n]);
        let _ = comp.compress(Codec::Zstd, &block[..n], &mut packed);
        at += n as u64;
    }
    let zstd = gib / t.elapsed().as_secs_f64();
    // Decoding it, block by block as a receiving shard does: each block compressed untimed,
    // then decoded timed, over at most the first 256 MiB.
    let mut dec = Decompressor::new()?;
    let mut decoded = vec![1u8; block.len()];
    let (mut decode_s, mut decoded_bytes, mut at) = (0.0, 0u64, 0u64);
    while at < tr.len().min(256 << 20) {
        let n = (block.len() as u64).min(tr.len() - at) as usize;
        tr.read(at, &mut block[..n]);
        at += n as u64;
        let Some(m) = comp.compress(Codec::Zstd, &block[..n], &mut packed) else {
            continue;
        };
        let t = Instant::now();
        dec.decompress(Codec::Zstd, &packed[..m], &mut decoded[..n])?;
        decode_s += t.elapsed().as_secs_f64();
        if decoded[..n] != block[..n] {
            bail!("zstd decoded the text into something else");
        }
        decoded_bytes += n as u64;
    }
    let zstd_decode = decoded_bytes as f64 / (1u64 << 30) as f64 / decode_s.max(1e-9);
    Ok(Ceilings {
        dram_read_scan_gib_s: scan,
        memcpy_gib_s: memcpy,
        memcpy_all_cores_gib_s: memcpy_all,
        aead_seal_in_cache_gib_s: seal.aead_in_cache_gib_s,
        pagewire_seal_gib_s: seal.pagewire_seal_gib_s,
        rustls_encrypt_gib_s: seal.rustls_encrypt_gib_s,
        zstd1_text_gib_s: zstd,
        zstd1_text_decode_gib_s: zstd_decode,
        raw_tcp_gib_s_by_channels: a
            .channels
            .iter()
            .zip(raw)
            .map(|(&ch, runs)| (ch, summarize("raw-tcp", a.size, runs).gib_per_s_median))
            .collect(),
    })
}

/// Every allowed core copies its slice of `src` into a 64 MiB buffer of its own (written before
/// timing), as the one-core memcpy ceiling does, all at once: (cores, GiB/s in all).
fn memcpy_all_cores(src: &pagewire::Region) -> Result<(usize, f64)> {
    let cores = crate::measure::cores(false);
    let n = cores.len().max(1);
    let slice = (src.len() / n as u64) & !4095;
    let barrier = std::sync::Barrier::new(n + 1);
    let seconds = std::thread::scope(|scope| {
        let joins: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, cores) = (&barrier, &cores);
                scope.spawn(move || {
                    crate::measure::pin(cores, i);
                    let mut buf = vec![1u8; (64 << 20).min(slice as usize).max(4096)];
                    barrier.wait();
                    let t = Instant::now();
                    let mut at = i as u64 * slice;
                    let end = at + slice;
                    while at < end {
                        let len = (buf.len() as u64).min(end - at) as usize;
                        src.read(at, &mut buf[..len]);
                        at += len as u64;
                    }
                    std::hint::black_box(&buf);
                    t.elapsed().as_secs_f64()
                })
            })
            .collect();
        barrier.wait();
        joins
            .into_iter()
            .map(|j| j.join().unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max)
    });
    let bytes = slice * n as u64;
    Ok((n, bytes as f64 / (1u64 << 30) as f64 / seconds))
}
