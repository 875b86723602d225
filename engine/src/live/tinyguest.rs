//! A tiny KVM VMM for demos and tests of live migration (the `kvm` feature): it runs the guest
//! of [`super::guestcode`] (hand-written 32-bit code that dirties a working set at a rate it
//! reads from its own memory and counts its stores) on one vCPU, tick by tick.
//!
//! The vCPU thread resumes the halted guest every [`TICK`] (missed ticks are lost, as with a
//! periodic LAPIC timer); the guest writes its burst of pages and halts again. Its LAPIC setup
//! exits as MMIO writes, which this VMM ignores: it has no in-kernel LAPIC and paces the guest
//! itself. QEMU boots the same code as its firmware, so the two engines can be compared on the
//! same guest. [`TinyGuest`] is the source side ([`Vmm`]: pausing kicks the vCPU out of
//! `KVM_RUN` with a signal, as real VMMs do, so the pause does not wait for the guest; its
//! registers are the device state) and [`TinyGuest::resume`] the destination side. The kick
//! installs a do-nothing handler for the first real-time signal, once per process.
//!
//! Unmodified Linux guests do not boot under every nested KVM; this guest needs nothing but
//! flat protected mode, so it runs wherever `/dev/kvm` creates a VM.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::guestcode::{self, Params, CODE_GPA, COUNTER_GPA, PARAMS_GPA, STACK_TOP_GPA};
use super::Vmm;
use crate::dirty::kvm::{enable_manual_protect, retrying, KvmDirtyLog, SlotRegion};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::protocol::blob::DeviceBlob;

/// The guest's tick: it halts after each burst and runs again at the next one.
pub const TICK: Duration = Duration::from_millis(1);
/// Tag of the vCPU registers blob.
pub const REGS_TAG: u32 = u32::from_le_bytes(*b"regs");
/// The registers blob: 18 general registers (with `rip` and `rflags`), little-endian u64s.
const REGS_BLOB_BYTES: usize = 18 * 8;

fn kvm_error(what: &str, e: kvm_ioctls::Error) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(e.errno()))
}

/// The guest's progress counter in `memory`.
pub fn counter(memory: &GuestMemory) -> u32 {
    let mut b = [0u8; 4];
    memory.regions()[0].read(COUNTER_GPA, &mut b);
    u32::from_le_bytes(b)
}

/// A VM over region 0 of `memory` (slot 0, dirty logging on, with manual protect where KVM
/// offers it: the third value) with one vCPU in flat 32-bit protected mode (no paging). The
/// VM fd must be dropped before `memory` (callers keep both in one struct, VM first).
fn vm(memory: &GuestMemory, memory_bytes_min: u64) -> Result<(Arc<VmFd>, VcpuFd, bool)> {
    let region = memory
        .regions()
        .first()
        .filter(|r| r.gpa() == 0 && r.len() >= memory_bytes_min && r.is_writable())
        .ok_or_else(|| {
            Error::Config(format!(
                "the tiny guest needs writable memory from address 0, at least {memory_bytes_min} bytes"
            ))
        })?;
    let kvm = Kvm::new().map_err(|e| kvm_error("opening /dev/kvm", e))?;
    let vm = retrying(|| kvm.create_vm()).map_err(|e| kvm_error("creating a VM", e))?;
    // Before the slot: its bits then start set instead of its pages write-protected.
    let manual_protect = enable_manual_protect(&vm)?;
    let slot = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: region.host_addr() as u64,
    };
    // SAFETY: the slot maps region 0 of `memory`, whole; the callers keep the memory (an Arc)
    // alive for as long as the VM, which they drop first.
    unsafe { vm.set_user_memory_region(slot) }.map_err(|e| kvm_error("adding guest memory", e))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| kvm_error("creating a vCPU", e))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| kvm_error("reading segment registers", e))?;
    // What the firmware's entry sets up under QEMU: code 0x08 and data 0x10, flat 4 GiB.
    let flat = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0x08, 0xb);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        *s = flat(0x10, 0x3);
    }
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs)
        .map_err(|e| kvm_error("setting segment registers", e))?;
    Ok((Arc::new(vm), vcpu, manual_protect))
}

/// How long a pause kicks the vCPU thread before it simply waits for it (a guest's burst ends
/// within a few ticks anyway).
const KICK_WAIT_MAX: Duration = Duration::from_millis(100);
/// Between two kicks of the vCPU thread.
const KICK_RETRY: Duration = Duration::from_micros(50);

/// The signal that kicks the vCPU thread out of `KVM_RUN` (the first real-time signal, as
/// Firecracker's vCPU kick; QEMU's `SIG_IPI` is the same idea), its do-nothing handler
/// installed once per process; `None` where that failed.
fn kick_signal() -> Option<libc::c_int> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static SIGNAL: std::sync::OnceLock<Option<libc::c_int>> = std::sync::OnceLock::new();
    *SIGNAL.get_or_init(|| {
        let signal = vmm_sys_util::signal::SIGRTMIN();
        match vmm_sys_util::signal::register_signal_handler(signal, on_kick) {
            Ok(()) => Some(signal),
            Err(e) => {
                tracing::warn!(%e, "no vCPU kick signal: a pause waits for the guest's burst");
                None
            }
        }
    })
}

/// Kicks a vCPU thread whose stop flag is set until it has left its loop. A pause must not wait
/// for the guest: a burst at a high dirty rate keeps the vCPU in `KVM_RUN` for milliseconds
/// (measured on 16 cores: pauses of up to 6 ms at 3200 MiB/s). The signal makes `KVM_RUN`
/// return `EINTR` at an instruction boundary, and the loop then sees the flag. A kick that
/// lands just before the thread enters `KVM_RUN` is lost, so it is sent again until the thread
/// is out.
fn kick_until_out<T>(thread: &JoinHandle<T>) {
    use vmm_sys_util::signal::Killable;
    let Some(signal) = kick_signal() else {
        return;
    };
    let deadline = Instant::now() + KICK_WAIT_MAX;
    let mut next_kick = Instant::now();
    // Yields rather than sleeps between looks: on a busy host a sleep's wake-up alone took
    // ~0.2 ms, and the vCPU thread may need this CPU to leave.
    while !thread.is_finished() && Instant::now() < deadline {
        if Instant::now() >= next_kick {
            if thread.kill(signal).is_err() {
                return;
            }
            next_kick = Instant::now() + KICK_RETRY;
        }
        std::thread::yield_now();
    }
}

/// The vCPU thread: runs the guest tick by tick until `stop`, then hands the vCPU back. A
/// throttle of `p` percent stretches the period between ticks to `TICK × 100 / (100 − p)`, so
/// the guest runs (and writes) `100 − p` percent as often, as under QEMU's CPU throttle.
fn run_vcpu(
    mut vcpu: VcpuFd,
    stop: Arc<AtomicBool>,
    throttle: Arc<AtomicU8>,
) -> Result<JoinHandle<Result<VcpuFd>>> {
    std::thread::Builder::new()
        .name("pw-tiny-vcpu".into())
        .spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Acquire) {
                let exit = match vcpu.run() {
                    // A signal interrupted the run (a pause kicks it so): the flag decides.
                    Err(e) if e.errno() == libc::EINTR => continue,
                    r => r.map_err(|e| kvm_error("running the vCPU", e))?,
                };
                match exit {
                    VcpuExit::Hlt => {}
                    // The guest's LAPIC timer setup: this VMM paces it itself.
                    VcpuExit::MmioWrite(..) => continue,
                    exit => return Err(Error::Internal(format!("unexpected vCPU exit {exit:?}"))),
                }
                // Like a periodic LAPIC timer (what paces the same guest under QEMU): ticks
                // missed while the thread was not running are lost, not caught up, so a starved
                // guest writes less, as it would there.
                let share = f64::from(100 - throttle.load(Ordering::Relaxed).min(99)) / 100.0;
                next = (next + TICK.div_f64(share)).max(Instant::now());
                // Parked, not asleep, so that `stop` wakes it at once (a burst under way is
                // kicked out of KVM_RUN, see `kick_until_out`); a sleep made a pause wait out
                // the tick (measured: 0.4–2 ms).
                while let Some(wait) = next.checked_duration_since(Instant::now()) {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::park_timeout(wait);
                }
            }
            Ok(vcpu)
        })
        .map_err(|e| Error::io("starting the vCPU thread", e))
}

/// A running tiny guest (see the module docs). Fields drop in order: the VM before the memory.
pub struct TinyGuest {
    vm: Arc<VmFd>,
    stop: Arc<AtomicBool>,
    /// Percent of the vCPU's ticks taken away ([`Vmm::throttle`]).
    throttle: Arc<AtomicU8>,
    thread: Option<JoinHandle<Result<VcpuFd>>>,
    vcpu: Option<VcpuFd>,
    memory: Arc<GuestMemory>,
    /// The VM's dirty log is cleared by `KVM_CLEAR_DIRTY_LOG` (manual protect, where offered).
    manual_protect: bool,
    /// The counter when the vCPU stopped.
    pub counter_at_pause: Option<u32>,
}

impl std::fmt::Debug for TinyGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TinyGuest")
            .field("counter_at_pause", &self.counter_at_pause)
            .finish_non_exhaustive()
    }
}

impl TinyGuest {
    /// Loads the guest into `memory` (region 0 from address 0, at least
    /// [`Params::memory_bytes_min`]; the rest is left as it is) and starts it.
    pub fn start(memory: Arc<GuestMemory>, params: Params) -> Result<Self> {
        params.check().map_err(Error::Config)?;
        let (vm, vcpu, manual_protect) = vm(&memory, params.memory_bytes_min())?;
        let region = &memory.regions()[0];
        region.write(CODE_GPA, guestcode::code());
        region.write(PARAMS_GPA, &params.block());
        let mut regs = vcpu
            .get_regs()
            .map_err(|e| kvm_error("reading registers", e))?;
        regs.rip = CODE_GPA;
        regs.rsp = STACK_TOP_GPA;
        regs.rflags = 2;
        vcpu.set_regs(&regs)
            .map_err(|e| kvm_error("setting registers", e))?;
        Self::running(vm, vcpu, memory, manual_protect)
    }

    /// Starts `vcpu`'s thread.
    fn running(
        vm: Arc<VmFd>,
        vcpu: VcpuFd,
        memory: Arc<GuestMemory>,
        manual_protect: bool,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let throttle = Arc::new(AtomicU8::new(0));
        let thread = run_vcpu(vcpu, stop.clone(), throttle.clone())?;
        Ok(TinyGuest {
            vm,
            stop,
            throttle,
            thread: Some(thread),
            vcpu: None,
            memory,
            manual_protect,
            counter_at_pause: None,
        })
    }

    /// The guest's memory as a dirty source: the KVM dirty log of its slot.
    pub fn dirty_log(&self) -> KvmDirtyLog {
        // SAFETY: slot 0 was registered with region 0's length (`vm`), and never changes.
        let log = unsafe {
            KvmDirtyLog::new(
                self.vm.clone(),
                vec![SlotRegion {
                    slot: 0,
                    region: 0,
                    bytes: self.memory.regions()[0].len(),
                }],
            )
        };
        // The vCPU maps region 0 only: nothing writes the others.
        let others: Vec<u32> = (1..self.memory.regions().len() as u32).collect();
        log.leaving_out(&others).manual_protect(self.manual_protect)
    }

    /// Whether its VM's dirty log has manual protect on (where KVM offers it).
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// The progress counter now.
    pub fn counter(&self) -> u32 {
        counter(&self.memory)
    }

    /// Stops the vCPU at once, mid-burst if need be, and keeps it for its registers.
    pub fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        thread.thread().unpark();
        kick_until_out(&thread);
        let vcpu = thread
            .join()
            .map_err(|_| Error::Internal("the vCPU thread panicked".into()))??;
        self.vcpu = Some(vcpu);
        self.counter_at_pause = Some(self.counter());
        Ok(())
    }

    /// Destination side: a guest from migrated `memory` and its registers blob (from
    /// [`Vmm::device_state`]), running again.
    pub fn resume(memory: Arc<GuestMemory>, blobs: &[DeviceBlob]) -> Result<Self> {
        let blob = blobs
            .iter()
            .find(|b| b.tag == REGS_TAG)
            .ok_or_else(|| Error::Config("no register blob among the device state".into()))?;
        if blob.bytes.len() != REGS_BLOB_BYTES {
            return Err(Error::Config(format!(
                "a register blob of {} bytes, not {REGS_BLOB_BYTES}",
                blob.bytes.len()
            )));
        }
        let (vm, vcpu, manual_protect) = vm(&memory, CODE_GPA + guestcode::code().len() as u64)?;
        let u = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&blob.bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let regs = kvm_bindings::kvm_regs {
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
        vcpu.set_regs(&regs)
            .map_err(|e| kvm_error("setting registers", e))?;
        Self::running(vm, vcpu, memory, manual_protect)
    }
}

impl Vmm for TinyGuest {
    fn guest_cpu_time(&self) -> Option<std::time::Duration> {
        crate::sys::thread_cpu_time_of(self.thread.as_ref()?)
    }

    fn pause(&mut self) -> Result<()> {
        self.stop()
    }

    /// Runs the guest's ticks `100 − percent` percent as often from the next tick on.
    fn throttle(&mut self, percent: u8) -> Result<bool> {
        self.throttle
            .store(percent.min(super::THROTTLE_PERCENT_MAX), Ordering::Relaxed);
        Ok(true)
    }

    /// The registers this guest needs: the 18 general registers (its segments are the fixed
    /// flat ones that [`TinyGuest::resume`] sets up again).
    fn device_state(&mut self) -> Result<Vec<DeviceBlob>> {
        let vcpu = self
            .vcpu
            .as_ref()
            .ok_or_else(|| Error::Internal("device state before the pause".into()))?;
        let r = vcpu
            .get_regs()
            .map_err(|e| kvm_error("reading registers", e))?;
        let mut bytes = Vec::with_capacity(REGS_BLOB_BYTES);
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Ok(vec![DeviceBlob {
            tag: REGS_TAG,
            bytes,
        }])
    }
}

impl Drop for TinyGuest {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// True when `/dev/kvm` can create a VM here; otherwise the reason.
pub fn probe() -> std::result::Result<(), String> {
    Kvm::new()
        .and_then(|k| retrying(|| k.create_vm()).map(drop))
        .map_err(|e| format!("/dev/kvm cannot create a VM here: {e}"))
}

/// A source guest for demos and benchmarks: the tiny KVM guest where `/dev/kvm` runs it
/// ([`probe`]), else a software dirtier. Either is the migration's [`Vmm`].
#[derive(Debug)]
pub enum AnyGuest {
    /// The tiny KVM guest.
    Kvm(TinyGuest),
    /// A thread writing pages (see [`crate::live::dirtier`]).
    Software(crate::live::dirtier::SoftwareDirtier),
}

impl Vmm for AnyGuest {
    fn pause(&mut self) -> Result<()> {
        match self {
            AnyGuest::Kvm(g) => g.pause(),
            AnyGuest::Software(g) => g.pause(),
        }
    }

    fn device_state(&mut self) -> Result<Vec<DeviceBlob>> {
        match self {
            AnyGuest::Kvm(g) => g.device_state(),
            AnyGuest::Software(g) => g.device_state(),
        }
    }

    fn guest_cpu_time(&self) -> Option<std::time::Duration> {
        match self {
            AnyGuest::Kvm(g) => g.guest_cpu_time(),
            AnyGuest::Software(g) => g.guest_cpu_time(),
        }
    }

    fn throttle(&mut self, percent: u8) -> Result<bool> {
        match self {
            AnyGuest::Kvm(g) => g.throttle(percent),
            AnyGuest::Software(g) => g.throttle(percent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionSpec;

    /// The guest's `rip` after a `hlt` exit: just past its one `sti; hlt`.
    fn rip_after_hlt() -> u64 {
        let code = guestcode::code();
        let at = code
            .windows(2)
            .position(|w| w == [0xfb, 0xf4])
            .expect("the guest code has its sti; hlt");
        CODE_GPA + at as u64 + 2
    }

    /// A guest writing 64 pages per tick over a 64-page working set.
    const PARAMS_64: Params = Params {
        burst: 64,
        working_set_pages: 64,
    };

    /// Fresh memory for a guest of `params`.
    fn memory_for(params: &Params) -> Arc<GuestMemory> {
        Arc::new(
            GuestMemory::anonymous(&[RegionSpec {
                gpa: 0,
                len: params.memory_bytes_min(),
            }])
            .unwrap(),
        )
    }

    /// How long the test waits for a pause (see the test).
    const PAUSE_WAIT_MAX: Duration = Duration::from_secs(10);

    fn rip(blobs: &[DeviceBlob]) -> u64 {
        let b = &blobs[0].bytes[16 * 8..17 * 8];
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    }

    /// A burst of 2^30 stores (over a small working set) keeps the vCPU inside `KVM_RUN` for
    /// a second or more on any host (minutes where nested KVM emulates the guest): a pause
    /// must kick it out there, mid-burst, not at its next `hlt`, and the guest resumed from
    /// those registers must count on. Without the kick a pause waits out the burst: the
    /// pause runs on a helper thread, and the test fails when it has not returned after
    /// [`PAUSE_WAIT_MAX`] (a hang guard; a kicked pause takes microseconds).
    #[test]
    fn a_pause_stops_the_vcpu_mid_burst_and_the_guest_resumes_from_there() {
        if let Err(why) = probe() {
            eprintln!("SKIPPED: {why}");
            return;
        }
        let memory = memory_for(&PARAMS_64);
        let params = Params {
            burst: 1 << 30,
            ..PARAMS_64
        };
        let mut guest = TinyGuest::start(memory.clone(), params).unwrap();
        let mut mid_burst = 0;
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(20));
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(guest.pause().map(|()| guest));
            });
            let mut paused = rx
                .recv_timeout(PAUSE_WAIT_MAX)
                .expect("the pause returned (a kick stops the vCPU at once)")
                .unwrap();
            let paused_at = paused.counter_at_pause.unwrap();
            let blobs = paused.device_state().unwrap();
            mid_burst += usize::from(rip(&blobs) != rip_after_hlt());
            drop(paused);
            guest = TinyGuest::resume(memory.clone(), &blobs).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while guest.counter() <= paused_at && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(guest.counter() > paused_at, "the resumed guest counts on");
        }
        assert_eq!(
            mid_burst, 5,
            "pauses that stopped the vCPU inside its burst"
        );
    }
    /// A throttle of 75% runs the guest's ticks a quarter as often: its counter grows at most
    /// 0.6 times as fast as unthrottled (0.25 expected), and lifting it restores the pace.
    #[test]
    fn a_throttled_guest_runs_fewer_ticks() {
        if let Err(why) = probe() {
            eprintln!("SKIPPED: {why}");
            return;
        }
        let mut guest = TinyGuest::start(memory_for(&PARAMS_64), PARAMS_64).unwrap();
        let rate = |guest: &TinyGuest| {
            let (start, at) = (guest.counter(), Instant::now());
            std::thread::sleep(Duration::from_millis(200));
            f64::from(guest.counter().wrapping_sub(start)) / at.elapsed().as_secs_f64()
        };
        std::thread::sleep(Duration::from_millis(20));
        let free = rate(&guest);
        assert!(guest.throttle(75).unwrap());
        std::thread::sleep(Duration::from_millis(10));
        let throttled = rate(&guest);
        assert!(guest.throttle(0).unwrap());
        std::thread::sleep(Duration::from_millis(10));
        let lifted = rate(&guest);
        guest.pause().unwrap();
        assert!(
            free > 0.0 && throttled < 0.6 * free,
            "{throttled} against {free} stores/s"
        );
        assert!(
            lifted > 1.5 * throttled,
            "{lifted} against {throttled} stores/s"
        );
    }
}
