//! Small operating-system calls that have no safe wrapper in std: per-thread CPU time and
//! scheduler figures (`cpu.rs`), sockets and their options (`net.rs`), where memory lies
//! (`mem.rs`), and KVM's dirty log (`kvm.rs`). Each answers with a Rust value (an `io::Error`, `None` or a stated default where
//! the call fails); the `unsafe` blocks behind them each name the invariant they rely on.

mod cpu;
#[cfg(feature = "kvm")]
mod kvm;
mod mem;
mod net;

pub use cpu::*;
#[cfg(feature = "kvm")]
pub(crate) use kvm::*;
pub use mem::*;
pub use net::*;
