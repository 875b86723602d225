//! Per-chunk work on the shards, in pipeline order: zero scan ([`crate::simd`]), compression,
//! then (with TLS) sealing into records ([`seal`]; the sender seals each whole frame with
//! `frame::seal_frame`). No `unsafe` here: the raw-pointer loops live in `simd/`, guest memory
//! access in `memory`.

#![forbid(unsafe_code)]

pub mod compress;
pub(crate) mod frame;
pub mod seal;
/// The zero scan lives with the other raw-pointer loops in [`crate::simd`].
pub use crate::simd::zero;
