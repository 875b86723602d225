//! A tiny VMM on `kvm-ioctls` that migrates a running guest with pagewire (issue 9's example).
//!
//! The guest is 48 bytes of hand-written real-mode code. Every tick it writes `burst` pages of
//! its working set (one 16-bit store of its counter into each, walking the pages in turn) and
//! increments a 32-bit progress counter per store, then halts; the VMM's vCPU thread wakes it
//! again at the next tick (1 ms). The guest reads `burst` and its working set from its own
//! memory, so the caller chooses the dirty rate: `burst` × 1000 page writes per second.
//!
//! ```text
//!  tinyvmm dest   --listen 127.0.0.1:0 [--tls-dir D] [--resume-ms 200]
//!  tinyvmm source --to ADDR [--tls-dir D] [--burst 8] [--warmup-ms 200] [--downtime-ms 50]
//! ```
//! The destination prints `listening on ADDR`, receives memory and the vCPU's registers (a
//! device state blob), checksums the memory it holds, resumes the guest for `--resume-ms`, and
//! prints one JSON line. The source runs the guest for `--warmup-ms`, migrates it live (KVM
//! dirty log, pause at convergence), checksums its memory at the pause, and prints one JSON
//! line. The integration test `tests/tinyvmm.rs` runs both and compares.

#![allow(clippy::unwrap_used)] // an example: failures end it loudly

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use pagewire::dirty::kvm::{KvmDirtyLog, SlotRegion};
use pagewire::live::{DowntimeLimit, Migration, Vmm};
use pagewire::protocol::blob::DeviceBlob;
use pagewire::tls::certs;
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{GuestMemory, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig};

const PAGE: u64 = 4096;
/// Guest memory: 16 MiB (the guest itself only reaches the first MiB, in real mode).
const MEMORY_BYTES: u64 = 16 << 20;
const CODE_GPA: u64 = 0x1000;
/// The guest's variables: burst (u16), first and end segment of the working set (u16 each),
/// the next segment (u16), the progress counter (u32).
const BURST_GPA: u64 = 0x500;
const WS_FIRST_GPA: u64 = 0x502;
const WS_END_GPA: u64 = 0x506;
const NEXT_GPA: u64 = 0x504;
const COUNTER_GPA: u64 = 0x508;
const TICK: Duration = Duration::from_millis(1);
/// Tag of the vCPU registers blob.
const REGS_TAG: u32 = u32::from_le_bytes(*b"regs");

/// The guest (real mode, DS = 0): see the module docs.
const GUEST: [u8; 48] = [
    0x8B, 0x0E, 0x00, 0x05, // top: mov cx, [0x500]        burst
    0xA1, 0x04, 0x05, // body: mov ax, [0x504]             next page's segment
    0x8E, 0xC0, // mov es, ax
    0x83, 0x06, 0x08, 0x05, 0x01, // add word [0x508], 1  counter, low word
    0x83, 0x16, 0x0A, 0x05, 0x00, // adc word [0x50a], 0  counter, high word
    0x8B, 0x16, 0x08, 0x05, // mov dx, [0x508]
    0x26, 0x89, 0x16, 0x00, 0x00, // mov es:[0], dx      dirty the page
    0x05, 0x00, 0x01, // add ax, 0x100                    next page
    0x3B, 0x06, 0x06, 0x05, // cmp ax, [0x506]            past the working set?
    0x72, 0x03, // jb store
    0xA1, 0x02, 0x05, // mov ax, [0x502]                  wrap to its first page
    0xA3, 0x04, 0x05, // store: mov [0x504], ax
    0xE2, 0xD7, // loop body
    0xF4, // hlt                                          end of tick
    0xEB, 0xD0, // jmp top
];

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
        burst: u16,
        /// Pages of the working set (at most 200).
        #[arg(long, default_value_t = 200)]
        working_set: u16,
        /// How long the guest runs before the migration starts.
        #[arg(long, default_value_t = 200)]
        warmup_ms: u64,
        /// The downtime limit.
        #[arg(long, default_value_t = 50)]
        downtime_ms: u64,
        #[arg(long, default_value_t = 2)]
        channels: u16,
    },
}

fn read_u32(memory: &GuestMemory, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    memory.regions()[0].read(gpa, &mut b);
    u32::from_le_bytes(b)
}

fn write_u16(memory: &GuestMemory, gpa: u64, v: u16) {
    memory.regions()[0].write(gpa, &v.to_le_bytes());
}

/// CRC32C of all guest memory (what the test compares across the two sides).
fn digest(memory: &GuestMemory) -> u32 {
    let mut crc = 0;
    let mut page = vec![0u8; PAGE as usize];
    for p in 0..memory.regions()[0].pages() {
        memory.regions()[0].read(p * PAGE, &mut page);
        crc = crc32c::crc32c_append(crc, &page);
    }
    crc
}

/// A VM with `memory` as slot 0 (dirty logging on) and one vCPU.
fn vm(memory: &GuestMemory) -> Result<(Arc<VmFd>, VcpuFd)> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("creating a VM")?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: memory.regions()[0].len(),
        userspace_addr: memory.regions()[0].host_addr() as u64,
    };
    // SAFETY: the slot maps `memory`'s only region, which outlives the VM (main keeps both to
    // the end, and the VM fd is dropped first).
    unsafe { vm.set_user_memory_region(slot) }.context("adding guest memory")?;
    let vcpu = vm.create_vcpu(0).context("creating a vCPU")?;
    Ok((Arc::new(vm), vcpu))
}

/// Real mode with every segment at 0.
fn flat_real_mode(vcpu: &VcpuFd) -> Result<()> {
    let mut sregs = vcpu.get_sregs()?;
    for s in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        s.base = 0;
        s.selector = 0;
    }
    vcpu.set_sregs(&sregs)?;
    Ok(())
}

/// The registers this guest needs, as a blob: the 18 general registers, then the ES segment
/// (selector and base; the others stay 0).
fn regs_blob(vcpu: &VcpuFd) -> Result<DeviceBlob> {
    let r = vcpu.get_regs()?;
    let es = vcpu.get_sregs()?.es;
    let mut bytes = Vec::new();
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags, es.base,
    ] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend_from_slice(&es.selector.to_le_bytes());
    Ok(DeviceBlob {
        tag: REGS_TAG,
        bytes,
    })
}

fn restore_regs(vcpu: &VcpuFd, blob: &DeviceBlob) -> Result<()> {
    if blob.tag != REGS_TAG || blob.bytes.len() != 19 * 8 + 2 {
        bail!("not a register blob ({} bytes)", blob.bytes.len());
    }
    let u = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&blob.bytes[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let r = kvm_regs {
        rax: u(0),
        rbx: u(1),
        rcx: u(2),
        rdx: u(3),
        rsi: u(4),
        rdi: u(5),
        rsp: u(6),
        rbp: u(7),
        r8: u(8),
        r9: u(9),
        r10: u(10),
        r11: u(11),
        r12: u(12),
        r13: u(13),
        r14: u(14),
        r15: u(15),
        rip: u(16),
        rflags: u(17),
    };
    flat_real_mode(vcpu)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.es.base = u(18);
    sregs.es.selector = u16::from_le_bytes([blob.bytes[152], blob.bytes[153]]);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&r)?;
    Ok(())
}

/// The vCPU thread: runs the guest tick by tick until `stop`, then hands the vCPU back.
fn run_vcpu(mut vcpu: VcpuFd, stop: Arc<AtomicBool>) -> JoinHandle<Result<VcpuFd>> {
    std::thread::spawn(move || {
        let mut next = Instant::now();
        while !stop.load(Ordering::Acquire) {
            match vcpu.run().context("running the vCPU")? {
                VcpuExit::Hlt => {}
                exit => bail!("unexpected vCPU exit {exit:?}"),
            }
            next += TICK;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Ok(vcpu)
    })
}

/// The source VMM as the migration sees it: pausing stops the vCPU at its next halt.
struct SourceVmm {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<VcpuFd>>>,
    vcpu: Option<VcpuFd>,
    memory: Arc<GuestMemory>,
    counter_at_pause: u32,
    digest_at_pause: u32,
}

impl Vmm for SourceVmm {
    fn pause(&mut self) -> pagewire::Result<()> {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("paused once");
        let vcpu = thread
            .join()
            .map_err(|_| pagewire::Error::Internal("the vCPU thread panicked".into()))?
            .map_err(|e| pagewire::Error::Internal(format!("{e:#}")))?;
        self.vcpu = Some(vcpu);
        self.counter_at_pause = read_u32(&self.memory, COUNTER_GPA);
        self.digest_at_pause = digest(&self.memory);
        Ok(())
    }

    fn device_state(&mut self) -> pagewire::Result<Vec<DeviceBlob>> {
        let vcpu = self.vcpu.as_ref().expect("paused first");
        let blob = regs_blob(vcpu).map_err(|e| pagewire::Error::Internal(format!("{e:#}")))?;
        Ok(vec![blob])
    }
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

fn layout() -> [RegionSpec; 1] {
    [RegionSpec {
        gpa: 0,
        len: MEMORY_BYTES,
    }]
}

fn source(
    to: &str,
    tls_dir: &Option<PathBuf>,
    burst: u16,
    working_set: u16,
    warmup_ms: u64,
    downtime_ms: u64,
    channels: u16,
) -> Result<()> {
    if working_set == 0 || working_set > 200 {
        bail!("--working-set must be 1..=200 pages (the guest runs in real mode, below 1 MiB)");
    }
    let memory = Arc::new(GuestMemory::anonymous(&layout())?);
    let region = &memory.regions()[0];
    region.write(CODE_GPA, &GUEST);
    // The working set: pages 16.. (segments 0x1000..), first MiB only.
    let first_segment = 0x1000u16;
    write_u16(&memory, BURST_GPA, burst);
    write_u16(&memory, WS_FIRST_GPA, first_segment);
    write_u16(&memory, NEXT_GPA, first_segment);
    write_u16(&memory, WS_END_GPA, first_segment + working_set * 0x100);
    let (vm, vcpu) = vm(&memory)?;
    flat_real_mode(&vcpu)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = run_vcpu(vcpu, stop.clone());
    std::thread::sleep(Duration::from_millis(warmup_ms));
    let counter_at_start = read_u32(&memory, COUNTER_GPA);
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
    let dirty = KvmDirtyLog::new(
        vm.clone(),
        vec![SlotRegion {
            slot: 0,
            region: 0,
            bytes: MEMORY_BYTES,
        }],
    );
    let mut vmm = SourceVmm {
        stop,
        thread: Some(thread),
        vcpu: None,
        memory: memory.clone(),
        counter_at_pause: 0,
        digest_at_pause: 0,
    };
    let policy = DowntimeLimit {
        downtime_limit_ms: downtime_ms,
        ..DowntimeLimit::default()
    };
    let report = Migration::new(sender, Box::new(dirty), Box::new(policy)).run(&mut vmm)?;
    let s = &report.snapshot;
    println!(
        "{}",
        serde_json::json!({
            "counter_at_migration_start": counter_at_start,
            "counter_at_pause": vmm.counter_at_pause,
            "digest_at_pause": vmm.digest_at_pause,
            "rounds": s.rounds,
            "downtime_ms": s.downtime_ms,
            "expected_downtime_ms": s.expected_downtime_ms,
            "total_time_ms": s.total_time_ms,
            "converged": report.converged,
        })
    );
    drop(vm);
    Ok(())
}

fn dest(listen: &str, tls_dir: &Option<PathBuf>, resume_ms: u64) -> Result<()> {
    let memory = Arc::new(GuestMemory::anonymous(&layout())?);
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
    receiver.run()?;
    let blobs = device_state.take();
    let regs = blobs
        .iter()
        .find(|b| b.tag == REGS_TAG)
        .context("no register blob arrived")?;
    let digest_received = digest(&memory);
    let counter_received = read_u32(&memory, COUNTER_GPA);
    let (vm, vcpu) = vm(&memory)?;
    restore_regs(&vcpu, regs)?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = run_vcpu(vcpu, stop.clone());
    std::thread::sleep(Duration::from_millis(resume_ms));
    stop.store(true, Ordering::Release);
    let _vcpu = thread
        .join()
        .map_err(|_| anyhow::anyhow!("the vCPU thread panicked"))??;
    println!(
        "{}",
        serde_json::json!({
            "digest_received": digest_received,
            "counter_received": counter_received,
            "counter_after_resume": read_u32(&memory, COUNTER_GPA),
            "blobs": blobs.len(),
        })
    );
    drop(vm);
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
        } => source(
            &to,
            &tls_dir,
            burst,
            working_set,
            warmup_ms,
            downtime_ms,
            channels,
        ),
    }
}
