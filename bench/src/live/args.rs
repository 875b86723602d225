//! The arguments of `pagewire-bench live`, and what follows from them (the working set, the
//! guest's parameters per dirty rate).

use pagewire::live::guestcode::{Params, WORKING_SET_GPA};
use pagewire::ZeroCopy;

use crate::matrix::OnOff;

/// Arguments of `pagewire-bench live`.
#[derive(clap::Args)]
pub struct LiveArgs {
    /// Guest memory per run.
    #[arg(long, default_value = "512MiB", value_parser = pagewire::units::parse_size)]
    pub(super) size: u64,
    /// Dirty rates, bytes per second written by the guest, e.g. 50MiB,200MiB,1GiB.
    #[arg(long, value_delimiter = ',', default_value = "50MB,200MB,800MB", value_parser = pagewire::units::parse_rate)]
    pub(super) dirty_rate: Vec<u64>,
    /// Channel counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(super) channels: Vec<u16>,
    /// TLS: off, on (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "off,on", value_parser = ["off", "on"])]
    pub(super) tls: Vec<String>,
    /// The downtime limit.
    #[arg(long, default_value = "300ms", value_parser = pagewire::units::parse_duration_ms)]
    pub(super) downtime_limit: u64,
    /// Live rounds at most before a run gives up (not converged).
    #[arg(long, default_value_t = 30)]
    pub(super) rounds_max: u32,
    /// How long pre-copy may run before a run gives up (not converged), e.g. `15s` (a bare
    /// number is seconds).
    #[arg(long, default_value = "20s", value_parser = pagewire::units::parse_duration_ms)]
    pub(super) time_max: u64,
    /// Repetitions of every cell (interleaved).
    #[arg(long, default_value_t = 3)]
    pub(super) reps: usize,
    /// Migrations of the grid's first cell (pagewire's, with the first dirty rate, channel
    /// count and TLS setting) run before the grid and left out of its results. On a freshly
    /// booted host the first runs are no measure: on the 2-core VM measured, 12 of the first 13
    /// paused for 76–246 ms where later ones paused for 2.5–16 ms.
    #[arg(long, default_value_t = 0)]
    pub(super) discard_first: usize,
    /// The guest: a software dirtier or the tiny KVM guest.
    #[arg(long, value_enum, default_value_t = GuestKind::Software)]
    pub(super) guest: GuestKind,
    /// The working set the guest writes (default: a quarter of memory; the KVM guest's starts
    /// at 1 MiB).
    #[arg(long, value_parser = pagewire::units::parse_size)]
    pub(super) working_set: Option<u64>,
    /// How long the guest runs before each migration starts, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub(super) warmup_ms: u64,
    /// Also migrate the same KVM guest with QEMU multifd, side by side (implies `--guest kvm`).
    #[arg(long)]
    pub(super) with_qemu: bool,
    /// Both engines throttle the guest's vCPU while it dirties memory faster than the rounds
    /// send it: pagewire's `live::AutoConverge` and QEMU's `auto-converge` capability, each
    /// with QEMU's default steps (20%, then 10% more, up to 99%).
    #[arg(long)]
    pub(super) auto_converge: bool,
    /// TCP congestion control of pagewire's channels (one this kernel offers); default: the
    /// host's, which QEMU's channels always get.
    #[arg(long)]
    pub(super) congestion: Option<String>,
    /// After the grid, per channels × TLS: one session sends the same round this many times
    /// at each of three sizes, with no guest running, to show how much an identical round's
    /// time varies on this machine (0: skip).
    #[arg(long, default_value_t = 6)]
    pub(super) repeat_rounds: usize,
    /// Place pagewire's shards as the library does by default (the sender's one core each
    /// from the first, the receiver's on the cores of their node); without it the scheduler
    /// places them.
    #[arg(long)]
    pub(super) pin: bool,
    /// pagewire's zero-copy policy (`pagewire send --zero-copy`): auto falls back to plain
    /// sends where the kernel copies anyway (loopback); on sends from the guest's memory
    /// registered as fixed buffers whatever the kernel does with them.
    #[arg(long, default_value_t = ZeroCopy::Auto)]
    pub(super) zero_copy: ZeroCopy,
    /// Page checksums of pagewire's plaintext runs: on (the default), off (`pagewire send
    /// --no-page-checksums`: TCP's checksum only, as QEMU's multifd). Runs with TLS are covered
    /// by their AEAD either way.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub(super) page_checksums: OnOff,
    /// A bandwidth limit on both engines' migrations, in bytes per second of wire traffic
    /// (pagewire's `--max-bandwidth`, QEMU's `max-bandwidth`), e.g. 100MB: makes the link, not
    /// this host's CPU, what a guest's dirty rate is measured against. Unlimited by default.
    #[arg(long, value_parser = pagewire::units::parse_rate)]
    pub(super) max_bandwidth: Option<u64>,
    /// Also write the results (summary and runs) as JSON to this file, and the report's tables
    /// as Markdown beside it (the same name, ending in `.md`).
    #[arg(long)]
    pub(super) out: Option<std::path::PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub(super) json: bool,
    /// Whether the report goes to standard output at all (not when `matrix --json` prints its
    /// own JSON there: the live rows are then in `live.json` and `live.md` only).
    #[arg(skip = true)]
    pub(super) print: bool,
}

impl LiveArgs {
    /// The live rows of `pagewire-bench matrix --live RATES`: the matrix's size, channels, TLS,
    /// repetitions and QEMU choice; the tiny KVM guest where `/dev/kvm` runs it, else the
    /// software dirtier (said on stderr); the other settings at their defaults. With `print`
    /// false the report goes only to the files [`run_for_matrix`](super::run_for_matrix)
    /// writes.
    #[allow(clippy::too_many_arguments)]
    pub fn for_matrix(
        size: u64,
        dirty_rate: Vec<u64>,
        working_set: Option<u64>,
        channels: Vec<u16>,
        tls: Vec<String>,
        reps: usize,
        with_qemu: bool,
        congestion: Option<String>,
        print: bool,
    ) -> LiveArgs {
        let guest = match pagewire::live::tinyguest::probe() {
            Ok(()) => GuestKind::Kvm,
            Err(why) => {
                eprintln!("live rows: the software dirtier writes the source ({why})");
                GuestKind::Software
            }
        };
        LiveArgs {
            size,
            dirty_rate,
            channels,
            tls,
            downtime_limit: 300,
            rounds_max: 30,
            time_max: 20_000,
            reps,
            discard_first: 0,
            guest,
            working_set,
            warmup_ms: 200,
            with_qemu: with_qemu && guest == GuestKind::Kvm,
            auto_converge: false,
            congestion,
            repeat_rounds: 0,
            pin: false,
            zero_copy: ZeroCopy::Auto,
            page_checksums: OnOff::On,
            max_bandwidth: None,
            out: None,
            json: false,
            print,
        }
    }
}

/// Which guest writes the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum GuestKind {
    /// A thread writing random pages of the working set.
    Software,
    /// The tiny KVM guest (pagewire::live::guestcode) on /dev/kvm.
    Kvm,
}

impl LiveArgs {
    pub(super) fn working_set_bytes(&self) -> u64 {
        let ws = self.working_set.unwrap_or(self.size / 4).max(4096);
        match self.guest {
            GuestKind::Software => ws.min(self.size),
            GuestKind::Kvm => ws.min(self.size.saturating_sub(WORKING_SET_GPA)),
        }
    }

    pub(super) fn guest_params(&self, dirty_rate: u64) -> Params {
        Params::for_rate(dirty_rate, (self.working_set_bytes() / 4096) as u32)
    }
}
