//! Per-chunk work on the shards, in pipeline order: zero scan, then (with TLS) sealing into
//! records. Compression slots in between them with its own issue.

pub mod compress;
pub mod seal;
#[allow(unsafe_code)]
pub mod zero;
