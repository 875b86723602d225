//! A tiny VMM that migrates a running KVM guest with pagewire (issue 9's example): the guest is
//! [`pagewire::live::tinyguest`], hand-written real-mode code that dirties a working set at a
//! chosen rate and counts its stores.
//!
//! ```text
//!  tinyvmm dest   --listen 127.0.0.1:0 [--tls-dir D] [--resume-ms 200]
//!  tinyvmm source --to ADDR [--tls-dir D] [--burst 8] [--warmup-ms 200] [--downtime-ms 50]
//!                 [--auto-converge]
//! ```
//! The destination prints `listening on ADDR`, receives memory and the vCPU's registers (a
//! device state blob), checksums the memory it holds, resumes the guest for `--resume-ms`, and
//! prints one JSON line. The source runs the guest for `--warmup-ms`, migrates it live (KVM
//! dirty log, pause at convergence; with `--auto-converge` the vCPU is throttled while the guest
//! outruns the rounds), checksums its memory at the pause, and prints one JSON line. The integration test `tests/tinyvmm.rs` runs both and compares.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use pagewire::live::guestcode::Params;
use pagewire::live::tinyguest::{self, TinyGuest};
use pagewire::live::{DowntimeLimit, Migration, Vmm};
use pagewire::tls::certs;
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{GuestMemory, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig};

/// Guest memory: 16 MiB (the guest itself only reaches the first MiB, in real mode).
const MEMORY_BYTES: u64 = 16 << 20;

#[derive(clap::Parser)]
#[command(
    version,
    about = "A tiny VMM that migrates a running KVM guest with pagewire"
)]
enum Cli {
    /// Receive a guest and resume it.
    Dest {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Directory with QEMU-style x509 files (`pagewire certs` writes them).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// How long to run the resumed guest.
        #[arg(long, default_value_t = 200)]
        resume_ms: u64,
    },
    /// Run a guest and migrate it live.
    Source {
        #[arg(long)]
        to: String,
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// Pages the guest writes per 1 ms tick.
        #[arg(long, default_value_t = 8)]
        burst: u32,
        /// Pages of the working set, from 1 MiB up.
        #[arg(long, default_value_t = 256)]
        working_set: u32,
        /// How long the guest runs before the migration starts.
        #[arg(long, default_value_t = 200)]
        warmup_ms: u64,
        /// The downtime limit.
        #[arg(long, default_value_t = 50)]
        downtime_ms: u64,
        #[arg(long, default_value_t = 2)]
        channels: u16,
        /// Throttle the vCPU while the guest outruns the rounds (QEMU's auto-converge).
        #[arg(long)]
        auto_converge: bool,
    },
}

/// CRC32C of all guest memory (what the test compares across the two sides).
fn digest(memory: &GuestMemory) -> u32 {
    let region = &memory.regions()[0];
    let mut page = vec![0u8; 4096];
    (0..region.pages()).fold(0, |crc, p| {
        region.read(p * 4096, &mut page);
        crc32c::crc32c_append(crc, &page)
    })
}

fn tls(dir: &Option<PathBuf>) -> Result<(Option<TlsServer>, Option<TlsClient>)> {
    let Some(dir) = dir else {
        return Ok((None, None));
    };
    Ok((
        Some(TlsServer::new(certs::server_files(dir).load()?)?),
        Some(TlsClient::new(
            certs::client_files(dir).load()?,
            "localhost",
        )?),
    ))
}

fn memory() -> Result<Arc<GuestMemory>> {
    Ok(Arc::new(GuestMemory::anonymous(&[RegionSpec {
        gpa: 0,
        len: MEMORY_BYTES,
    }])?))
}

/// The source as the migration sees it: the guest, checksummed at the pause.
struct Source(TinyGuest, Arc<GuestMemory>, Option<u32>);

impl Vmm for Source {
    fn pause(&mut self) -> pagewire::Result<()> {
        self.0.pause()?;
        self.2 = Some(digest(&self.1));
        Ok(())
    }
    fn device_state(&mut self) -> pagewire::Result<Vec<pagewire::protocol::blob::DeviceBlob>> {
        self.0.device_state()
    }
    fn guest_cpu_time(&self) -> Option<Duration> {
        self.0.guest_cpu_time()
    }
    fn throttle(&mut self, percent: u8) -> pagewire::Result<bool> {
        self.0.throttle(percent)
    }
}

fn source(
    to: &str,
    tls_dir: &Option<PathBuf>,
    a: (u32, u32, u64, u64, u16),
    auto_converge: bool,
) -> Result<()> {
    let (burst, working_set, warmup_ms, downtime_ms, channels) = a;
    let memory = memory()?;
    let guest = TinyGuest::start(
        memory.clone(),
        Params {
            burst,
            working_set_pages: working_set,
        },
    )?;
    std::thread::sleep(Duration::from_millis(warmup_ms));
    let counter_at_start = guest.counter();
    let (_, client) = tls(tls_dir)?;
    let sender = Sender::connect(
        to,
        memory.clone(),
        &SenderConfig {
            channels,
            pinning: Pinning::None,
            tls: client,
            ..SenderConfig::default()
        },
    )?;
    let dirty = guest.dirty_log();
    let limit = DowntimeLimit {
        downtime_limit_ms: downtime_ms,
        ..DowntimeLimit::default()
    };
    let policy = limit.policy(auto_converge);
    let mut vmm = Source(guest, memory, None);
    let report = Migration::new(sender, Box::new(dirty), policy).run(&mut vmm)?;
    let s = &report.snapshot;
    println!(
        "{}",
        serde_json::json!({
            "counter_at_migration_start": counter_at_start,
            "counter_at_pause": vmm.0.counter_at_pause,
            "digest_at_pause": vmm.2,
            "rounds": s.rounds,
            "downtime_ms": s.downtime_ms,
            "expected_downtime_ms": s.expected_downtime_ms,
            "total_time_ms": s.total_time_ms,
            "converged": report.converged,
            "cpu_throttle_percentage": s.cpu_throttle_percentage,
        })
    );
    Ok(())
}

/// Where the guest's GDT begins: its null descriptor (see `guestcode.S`).
const NULL_DESCRIPTOR_GPA: u64 = 0x5c0;
/// What the destination writes there before resuming.
const RESUME_MARKER: [u8; 8] = *b"resumed!";

fn dest(listen: &str, tls_dir: &Option<PathBuf>, resume_ms: u64) -> Result<()> {
    let memory = memory()?;
    let (server, _) = tls(tls_dir)?;
    let receiver = Receiver::bind(
        listen,
        memory.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            tls: server,
            accept_timeout_ms: Some(30_000),
            ..ReceiverConfig::default()
        },
    )?;
    println!("listening on {}", receiver.local_addr()?);
    let device_state = receiver.device_state();
    // What a management thread would poll (`query-migrate` on the destination).
    let handle = receiver.handle();
    receiver.run()?;
    let received = handle.snapshot();
    let blobs = device_state.take();
    let digest_received = digest(&memory);
    let counter_received = tinyguest::counter(&memory);
    // A marker in the GDT's null descriptor, which the guest's start-up code zeroes and the
    // CPU never reads: a guest resumed where it stopped leaves it; one started over (its
    // registers lost) wipes it, while its counter would keep rising all the same.
    memory.regions()[0].write(NULL_DESCRIPTOR_GPA, &RESUME_MARKER);
    let mut guest = TinyGuest::resume(memory.clone(), &blobs)?;
    std::thread::sleep(Duration::from_millis(resume_ms));
    guest.pause()?;
    let mut marker = [0u8; 8];
    memory.regions()[0].read(NULL_DESCRIPTOR_GPA, &mut marker);
    println!(
        "{}",
        serde_json::json!({
            "digest_received": digest_received,
            "counter_received": counter_received,
            "counter_after_resume": guest.counter(),
            "started_over": marker != RESUME_MARKER,
            "blobs": blobs.len(),
            "destination": received,
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    use clap::Parser;
    match Cli::parse() {
        Cli::Dest {
            listen,
            tls_dir,
            resume_ms,
        } => dest(&listen, &tls_dir, resume_ms),
        Cli::Source {
            to,
            tls_dir,
            burst,
            working_set,
            warmup_ms,
            downtime_ms,
            channels,
            auto_converge,
        } => source(
            &to,
            &tls_dir,
            (burst, working_set, warmup_ms, downtime_ms, channels),
            auto_converge,
        ),
    }
}
