//! # pagewire
//!
//! An io_uring transfer engine for VM live migration: guest memory moves over N parallel TCP
//! channels, each driven by a *shard* (one thread with its own io_uring, socket and registered
//! buffers, pinned to one core on the sender, on the cores of its NUMA node on the receiver). Zero pages are found on the shards with SIMD and cost a
//! header entry instead of 4 KiB; normal pages go out with zero-copy sends straight from guest
//! memory where the kernel really sends from it, and with one plain vectored send per frame where
//! it would copy anyway. The receiver checks every field before it places a byte, and receives
//! payload straight into destination memory.
//!
//! ```text
//! VMM / CLI ──regions + page runs──▶ Sender (coordinator) ──chunks──▶ send shards 0..N
//!                                                                       │ zero scan → header → send
//!                                         TCP channel per shard ◀───────┘
//! Receiver ──▶ recv shards 0..N: check header → place pages → round barrier → Done
//! ```
//!
//! Layers: [`protocol`] is sans-IO (bytes in, events out); `uring` is the only code that
//! talks to io_uring; [`memory`] is the only code that forms pointers to guest memory (and
//! `tls::direct` hands its checked ranges to AES-GCM); the shards tie them together. `unsafe`
//! is denied everywhere else.
//!
//! ```no_run
//! use std::sync::Arc;
//! use pagewire::{GuestMemory, RegionSpec, Receiver, ReceiverConfig, Sender, SenderConfig};
//!
//! # fn main() -> pagewire::Result<()> {
//! let spec = [RegionSpec { gpa: 0, len: 64 << 20 }];
//! let dst = Arc::new(GuestMemory::anonymous(&spec)?);
//! let receiver = Receiver::bind("127.0.0.1:0", dst, ReceiverConfig::default())?;
//! let addr = receiver.local_addr()?;
//! let rx = std::thread::spawn(move || receiver.run());
//!
//! let src = Arc::new(GuestMemory::anonymous(&spec)?);
//! let mut sender = Sender::connect(addr, src, &SenderConfig::default())?;
//! sender.send_all()?; // round 0: every page; later rounds send dirty runs with send_round
//! let stats = sender.finish()?;
//! rx.join().unwrap()?;
//! println!("{} Mbit/s", stats.mbps);
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]

// The AEAD behind TLS record sealing: aws-lc-rs by default, ring with `--no-default-features
// --features ring` (same API).
#[cfg(feature = "aws-lc-rs")]
pub(crate) use aws_lc_rs as crypto;
#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
pub(crate) use ring as crypto;
#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!(
    "pagewire needs a crypto provider: enable the `aws-lc-rs` (default) or `ring` feature"
);

#[allow(unsafe_code)]
pub mod adapters;
pub mod auth;
pub mod config;
pub mod dirty;
pub mod error;
#[cfg(feature = "faults")]
pub mod faults;
pub mod limits;
pub mod live;
#[allow(unsafe_code)]
pub mod memory;
pub mod pipeline;
pub mod placement;
pub mod profile;
pub mod protocol;
pub mod receiver;
pub mod sender;
pub(crate) mod shard;
#[allow(unsafe_code)]
pub(crate) mod sigbus;
#[allow(unsafe_code)]
pub mod simd;
pub mod stats;
pub mod stream;
pub mod synth;
#[allow(unsafe_code)]
pub mod sys;
pub mod tls;
pub mod units;
#[allow(unsafe_code)]
pub(crate) mod uring;

pub use config::{Pinning, ReceiverConfig, SenderConfig, ZeroCopy};
pub use error::{AbortCode, Error, Result};
pub use memory::{GuestMemory, ImageFile, Region, RegionSpec};
pub use receiver::Receiver;
pub use sender::{PageRun, Sender};
pub use shard::error_chain;
pub use stats::{Progress, RoundStats, ShardStats, TransferStats};
pub use stream::Stream;
pub use uring::{
    features as uring_features, probe as probe_uring, Caps as UringCaps, UringFeature,
};
