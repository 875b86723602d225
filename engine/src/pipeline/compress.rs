//! Compression per shard: zstd (default) or zlib, with contexts reused for every frame, applied
//! to a chunk's normal pages as one block (128 pages compress about twice as fast, and smaller,
//! than page-sized blocks). A block that does not shrink travels raw, flagged as such.
//!
//! # When compression pays: the `auto` rule
//! Compressing trades CPU for wire bytes, so it pays only while the link, not the core, is the
//! bottleneck. Per shard, with `L` the link rate (wire bytes per second the connection delivers),
//! `C` the compression rate (raw bytes per second of compressing) and `R` the ratio (raw /
//! compressed), guest memory moves at about `L` raw and at `min(C, L × R)` compressed. [`Auto`]
//! compresses while `min(C, L × R) > 1.1 × L`, i.e. while `C > 1.1 L` and `R > 1.1`.
//!
//! `L` comes from the kernel's own delivery-rate estimate (`TCP_INFO`), which also says whether a
//! sample was *app-limited* (we, not the link, were the bottleneck). Socket buffers and the
//! frames a shard builds ahead make timing our own sends useless: megabytes are queued before a
//! slow link shows. So the policy starts *on* (when the first frame shows the memory compresses)
//! and reads samples by what the frames before them were:
//! - compressed, link-limited: compression keeps the link busy, and raw would only send more
//!   bytes through it: stay on;
//! - compressed, app-limited: the compressor cannot fill the link; whether raw would be faster
//!   depends on `L`, so the next `AUTO_RAW_WINDOW` frames go raw to measure it (at most once per
//!   `AUTO_REMEASURE_FRAMES`);
//! - raw, link-limited: that is `L`; raw, app-limited: `L` is at least that (even raw sending
//!   cannot fill the link). Either way the rule decides.
//!
//! Estimates are exponentially weighted; while compression is off, one frame in every
//! `AUTO_PROBE_FRAMES` is compressed anyway to keep `C` and `R` current (it still travels
//! compressed if it shrank).
//!
//! Sans-IO like the protocol core: [`Auto`] is fed durations by its caller, never reads a clock,
//! so tests drive it with a simulated link.

use std::time::Duration;

use crate::limits::FRAME_PAYLOAD_BYTES_MAX;

/// Wire value of a frame's codec (low bits of the frame flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Codec {
    /// Payload is the normal pages as they are.
    Raw = 0,
    /// Payload is one zstd frame holding the normal pages.
    Zstd = 1,
    /// Payload is one zlib stream holding the normal pages.
    Zlib = 2,
}

impl Codec {
    /// Decodes the codec bits of a frame's flags.
    pub fn from_bits(bits: u8) -> Option<Codec> {
        match bits {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Zlib),
            _ => None,
        }
    }
}

/// What a sender does with normal pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Never compress.
    #[default]
    None,
    /// zstd every frame (raw when a frame does not shrink).
    Zstd,
    /// zlib every frame (raw when a frame does not shrink).
    Zlib,
    /// zstd while the link is the bottleneck (see the module docs).
    Auto,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "zlib" => Ok(Compression::Zlib),
            "auto" => Ok(Compression::Auto),
            other => Err(format!(
                "compression must be none, zstd, zlib or auto, not {other:?}"
            )),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Zlib => "zlib",
            Compression::Auto => "auto",
        })
    }
}

/// zstd level 1: ~0.35 GB/s per core with a ratio near 3 on text-like memory.
pub const ZSTD_LEVEL_DEFAULT: i32 = 1;

/// zlib level 1 (fastest), as QEMU's multifd zlib default.
pub const ZLIB_LEVEL: u32 = 1;

/// Checks a zstd level against the library's range (negative "fast" levels included).
pub fn check_zstd_level(level: i32) -> Result<(), String> {
    let range = zstd::compression_level_range();
    if range.contains(&level) {
        Ok(())
    } else {
        Err(format!(
            "zstd level {level} is outside the library's range {}..={}",
            range.start(),
            range.end()
        ))
    }
}

/// Why a compressed payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecompressError {
    /// The codec's decoder rejected the data.
    #[error("corrupt {0:?} payload: {1}")]
    Corrupt(Codec, String),
    /// The payload decodes to fewer bytes than the frame's pages.
    #[error("compressed payload ends after {got} of {expected} bytes")]
    Short {
        /// Bytes the page list declares.
        expected: usize,
        /// Bytes decoded.
        got: usize,
    },
    /// The payload decodes to more bytes than the frame's pages (nothing beyond them is written).
    #[error("compressed payload holds more than the {expected} bytes its pages declare")]
    Long {
        /// Bytes the page list declares.
        expected: usize,
    },
}

/// A shard's compression contexts, created once and reused for every frame.
pub struct Compressor {
    zstd: zstd::bulk::Compressor<'static>,
    zlib: flate2::Compress,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    /// Contexts for zstd at `zstd_level` and zlib at level 1.
    pub fn new(zstd_level: i32) -> std::io::Result<Self> {
        Ok(Compressor {
            zstd: zstd::bulk::Compressor::new(zstd_level)?,
            zlib: flate2::Compress::new(flate2::Compression::new(ZLIB_LEVEL), true),
        })
    }

    /// Compresses `src` into `dst` with `codec`; `None` when the result would not be smaller
    /// than `src` (the frame then travels raw).
    pub fn compress(&mut self, codec: Codec, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        let room = dst.len().min(src.len().saturating_sub(1));
        let dst = &mut dst[..room];
        match codec {
            Codec::Raw => None,
            Codec::Zstd => self.zstd.compress_to_buffer(src, dst).ok(),
            Codec::Zlib => {
                self.zlib.reset();
                match self
                    .zlib
                    .compress(src, dst, flate2::FlushCompress::Finish)
                    .ok()?
                {
                    flate2::Status::StreamEnd => Some(self.zlib.total_out() as usize),
                    _ => None,
                }
            }
        }
    }
}

/// A shard's decompression contexts.
pub struct Decompressor {
    zstd: zstd::zstd_safe::DCtx<'static>,
    zlib: flate2::Decompress,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    /// Fresh contexts.
    ///
    /// zstd decodes in one shot into the caller's buffer (`ZSTD_decompressDCtx`): the output
    /// is the window, so a frame declaring any window size costs no allocation, and the
    /// context keeps no stream buffers that it would resize (free and allocate again) as frame
    /// sizes vary. A streaming decoder did both, and copied every byte once more through its
    /// own buffer.
    pub fn new() -> std::io::Result<Self> {
        let zstd = zstd::zstd_safe::DCtx::try_create().ok_or_else(|| {
            std::io::Error::other("zstd could not allocate a decompression context")
        })?;
        Ok(Decompressor {
            zstd,
            zlib: flate2::Decompress::new(true),
        })
    }

    /// Decompresses `src` into `out`, filling it exactly. Fails unless the payload decodes to
    /// exactly `out.len()` bytes; nothing is ever written beyond `out` (a decompression bomb
    /// stops at its end).
    pub fn decompress(
        &mut self,
        codec: Codec,
        src: &[u8],
        out: &mut [u8],
    ) -> Result<(), DecompressError> {
        let expected = out.len();
        let corrupt = |e: &dyn std::fmt::Display| DecompressError::Corrupt(codec, e.to_string());
        match codec {
            Codec::Raw => Err(corrupt(&"raw payload given to the decompressor")),
            Codec::Zstd => match self.zstd.decompress(out, src) {
                Ok(got) if got == expected => Ok(()),
                Ok(got) => Err(DecompressError::Short { expected, got }),
                Err(code) => {
                    let name = zstd::zstd_safe::get_error_name(code);
                    // The frames hold more than `out`: zstd stopped at its end.
                    if name == ZSTD_DST_TOO_SMALL {
                        Err(DecompressError::Long { expected })
                    } else {
                        Err(corrupt(&name))
                    }
                }
            },
            Codec::Zlib => {
                self.zlib.reset(true);
                let status = self
                    .zlib
                    .decompress(src, out, flate2::FlushDecompress::Finish)
                    .map_err(|e| corrupt(&e))?;
                let (read, written) = (
                    self.zlib.total_in() as usize,
                    self.zlib.total_out() as usize,
                );
                match status {
                    flate2::Status::StreamEnd if written < expected => {
                        Err(DecompressError::Short {
                            expected,
                            got: written,
                        })
                    }
                    // The stream ended exactly at `out`'s end: all of the payload, no more.
                    flate2::Status::StreamEnd if read == src.len() => Ok(()),
                    flate2::Status::StreamEnd => Err(DecompressError::Long { expected }),
                    // Not ended: `out` is full with input left (too long), the input ran out
                    // inside the stream's end (its checksum cut), or before `out` was full.
                    _ if written == expected && read < src.len() => {
                        Err(DecompressError::Long { expected })
                    }
                    _ if written == expected => Err(corrupt(&"the stream ends inside its trailer")),
                    _ => Err(DecompressError::Short {
                        expected,
                        got: written,
                    }),
                }
            }
        }
    }
}

/// zstd's name for the error of a destination too small for the frames (`dstSize_tooSmall`).
const ZSTD_DST_TOO_SMALL: &str = "Destination buffer is too small";

/// Frames between two forced compressions while `auto` has compression off.
pub const AUTO_PROBE_FRAMES: u32 = 32;
/// At most one raw measuring window per this many frames while compression is on.
pub const AUTO_REMEASURE_FRAMES: u32 = 64;
/// Frames sent raw to measure the link (a whole chain, so its sample is a raw one).
pub const AUTO_RAW_WINDOW: u32 = crate::limits::CHAIN_FRAMES_MAX as u32;
/// Weight of a new sample in the moving averages.
const AUTO_EWMA_WEIGHT: f64 = 0.25;
/// Margin a rate must beat another by before compression is chosen.
const AUTO_MARGIN: f64 = 1.1;

/// The `auto` policy for one shard (see the module docs for the rule).
#[derive(Debug, Clone)]
pub struct Auto {
    compress_bytes_per_s: Option<f64>,
    ratio: Option<f64>,
    link_bytes_per_s: Option<f64>,
    on: bool,
    frames: u32,
    raw_window_left: u32,
    last_window_at: Option<u32>,
}

impl Default for Auto {
    fn default() -> Self {
        Auto {
            compress_bytes_per_s: None,
            ratio: None,
            link_bytes_per_s: None,
            on: true,
            frames: 0,
            raw_window_left: 0,
            last_window_at: None,
        }
    }
}

fn ewma(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(match old {
        None => sample,
        Some(o) => o + AUTO_EWMA_WEIGHT * (sample - o),
    })
}

impl Auto {
    /// A fresh policy: on, until samples say otherwise.
    pub fn new() -> Self {
        Auto::default()
    }

    /// Whether the next frame should be compressed.
    pub fn compress_next(&mut self) -> bool {
        self.frames = self.frames.wrapping_add(1);
        if self.raw_window_left > 0 {
            self.raw_window_left -= 1;
            return false;
        }
        self.on || self.frames.is_multiple_of(AUTO_PROBE_FRAMES)
    }

    /// Records a compression of `raw` bytes into `compressed` bytes (`raw` when it did not
    /// shrink) that took `cpu` time.
    pub fn observe_compression(&mut self, raw: usize, compressed: usize, cpu: Duration) {
        let secs = cpu.as_secs_f64().max(1e-9);
        self.compress_bytes_per_s = ewma(self.compress_bytes_per_s, raw as f64 / secs);
        self.ratio = ewma(self.ratio, raw as f64 / compressed.max(1) as f64);
        self.decide();
    }

    /// Records the kernel's delivery-rate sample, taken after frames that were all `raw` (or
    /// not); see the module docs for what each kind of sample means.
    pub fn observe_delivery(&mut self, bytes_per_s: u64, app_limited: bool, raw: bool) {
        if bytes_per_s == 0 {
            return;
        }
        if !raw {
            let due = self
                .last_window_at
                .is_none_or(|at| self.frames.wrapping_sub(at) >= AUTO_REMEASURE_FRAMES);
            if app_limited && self.on && self.raw_window_left == 0 && due {
                self.raw_window_left = AUTO_RAW_WINDOW;
                self.last_window_at = Some(self.frames);
            }
            return;
        }
        let sample = bytes_per_s as f64;
        self.link_bytes_per_s = if app_limited {
            Some(self.link_bytes_per_s.map_or(sample, |l| l.max(sample)))
        } else {
            ewma(self.link_bytes_per_s, sample)
        };
        self.decide();
    }

    /// True while compression is on.
    pub fn is_on(&self) -> bool {
        self.on
    }

    fn decide(&mut self) {
        if self.ratio.is_some_and(|r| r <= AUTO_MARGIN) {
            self.on = false;
            return;
        }
        self.on = match (self.compress_bytes_per_s, self.link_bytes_per_s) {
            (Some(c), Some(l)) => c > AUTO_MARGIN * l,
            // No link samples (a UNIX socket has no TCP_INFO): the ratio alone decides, as it
            // did at the start, both ways; a pause for incompressible pages is not for good.
            // (Nothing compressed yet: as it was.)
            _ => self.on || self.ratio.is_some(),
        };
    }
}

/// Bytes of the largest compressed payload pagewire sends (it never sends one that did not
/// shrink, so this is the raw maximum).
pub const COMPRESSED_PAYLOAD_BYTES_MAX: usize = FRAME_PAYLOAD_BYTES_MAX;

#[cfg(test)]
mod tests;
