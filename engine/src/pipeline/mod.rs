//! Per-chunk work on the sender shards, in pipeline order: zero scan (compression and TLS sealing
//! slot in after it in later versions).

#[allow(unsafe_code)]
pub mod zero;
