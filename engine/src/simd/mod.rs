//! Hand-vectorised loops over guest memory: the zero-page scan and the payload checksum. They
//! read through raw pointers (guest memory is never borrowed as a slice, see
//! [`crate::memory`]), pick AVX-512 or AVX2 at run time, and are tested against a scalar
//! reference (the checksum also against the `xxhash-rust` crate). This is one of the few modules
//! allowed `unsafe`; `pipeline/` and `protocol/` forbid it.

pub mod xxh3;
pub mod zero;
