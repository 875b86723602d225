//! Live migration from C.
//!
//! [`pw_sender_migrate`] runs pagewire's own pre-copy session over a connected sender: round 0
//! sends all memory, then rounds of the pages the VMM reports dirty, measured and decided by the
//! downtime-limit policy ([`pw_policy`]), until the expected downtime fits; then it asks the VMM
//! to pause, sends the last round and the device state, and returns once the receiver confirmed
//! it holds everything, verified. The VMM answers through callbacks ([`pw_vmm`]), all called on
//! the thread that called `pw_sender_migrate`.
//!
//! Another thread watches and steers it through a [`pw_control`] (`control.rs`).

use std::ffi::c_void;
use std::sync::Mutex;

use pw::dirty::{words_for, DirtyBitmaps, DirtySource};
use pw::live::{DowntimeLimit, Migration, MigrationHandle, Policy, Snapshot, Status, Vmm};

use super::*;

/// Where a sender's live migration publishes its handle once started, for the controls handed
/// out before.
pub(crate) type MigrationSlot = Arc<Mutex<Option<MigrationHandle>>>;

/// Where a live migration stands (QEMU's `query-migrate` status), on the source
/// ([`pw_migration_info`]) or the destination ([`pw_receiver_info`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum pw_migration_status {
    /// Not started: the source before round 0, the destination while it waits for the sender
    /// and gathers its channels.
    Setup = 0,
    /// Pages move: pre-copy rounds while the guest runs (a destination stays here through
    /// the paused round, until device state arrives).
    Active = 1,
    /// The guest is paused: the source's last round and device state are on their way, or
    /// the destination's device state is arriving.
    Device = 2,
    /// The receiver confirmed it holds everything, verified.
    Completed = 3,
    /// Failed (a policy that gave up, the peer's failure or cancel included).
    Failed = 4,
    /// Cancelled on this side, through a [`pw_control`].
    Cancelled = 5,
}

impl From<Status> for pw_migration_status {
    fn from(s: Status) -> Self {
        match s {
            Status::Setup => pw_migration_status::Setup,
            Status::Active => pw_migration_status::Active,
            Status::Device => pw_migration_status::Device,
            Status::Completed => pw_migration_status::Completed,
            Status::Failed => pw_migration_status::Failed,
            Status::Cancelled => pw_migration_status::Cancelled,
        }
    }
}

/// A moment of a live migration; the names in parentheses are QEMU's `query-migrate` fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pw_migration_info {
    /// Where it stands (`status`).
    pub status: pw_migration_status,
    /// Milliseconds of setup before round 0 (`setup-time`).
    pub setup_ms: f64,
    /// Milliseconds since the start (`total-time`).
    pub total_time_ms: f64,
    /// The last estimate of the downtime, in milliseconds (`expected-downtime`).
    pub expected_downtime_ms: f64,
    /// The measured downtime once completed, from the pause to the receiver's confirmation
    /// (`downtime`); negative before.
    pub downtime_ms: f64,
    /// Bytes put on the wire so far, a running round's included (`ram.transferred`).
    pub transferred_bytes: u64,
    /// Pages dirty after the last round: what the next one carries (`ram.remaining`, in pages).
    pub remaining_pages: u64,
    /// Times the dirty pages were collected (`ram.dirty-sync-count`).
    pub dirty_sync_count: u32,
    /// Pages the guest dirtied per second during the last round (`ram.dirty-pages-rate`).
    pub dirty_pages_rate: f64,
    /// Megabits per second over the migration so far (`ram.mbps`).
    pub mbps: f64,
    /// Rounds finished, the paused one included once the receiver confirmed it.
    pub rounds: u32,
    /// The vCPU throttle applied last, percent (`cpu-throttle-percentage`; see
    /// [`pw_policy::auto_converge`]); lifted when the migration ends, this keeps its value.
    pub cpu_throttle_percentage: u8,
    /// Nonzero once the policy chose to stop and copy: the expected downtime fitted the limit.
    /// It stays nonzero when the migration fails after that (in the pause, the last round, the
    /// device state or the confirmation).
    pub converged: u8,
}

impl pw_migration_info {
    pub(crate) fn of(s: &Snapshot) -> Self {
        pw_migration_info {
            status: s.status.into(),
            setup_ms: s.setup_ms,
            total_time_ms: s.total_time_ms,
            expected_downtime_ms: s.expected_downtime_ms,
            downtime_ms: s.downtime_ms.unwrap_or(-1.0),
            transferred_bytes: s.transferred,
            remaining_pages: s.remaining,
            dirty_sync_count: s.dirty_sync_count,
            dirty_pages_rate: s.dirty_pages_rate,
            mbps: s.mbps,
            rounds: u32::try_from(s.rounds.len()).unwrap_or(u32::MAX),
            cpu_throttle_percentage: s.cpu_throttle_percentage,
            converged: u8::from(s.converged),
        }
    }
}

/// When a live migration stops pre-copying; zero in a field (or a null pointer) means its
/// default, QEMU's where QEMU has one.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pw_policy {
    /// The longest pause the guest may see, in milliseconds (`downtime-limit`); 0: 300.
    pub downtime_limit_ms: u64,
    /// Live rounds at most before giving up with `PW_STATUS_NOT_CONVERGING`; 0: 30.
    pub rounds_max: u32,
    /// Milliseconds of pre-copy at most before giving up; 0: 600000 (10 minutes).
    pub total_ms_max: u64,
    /// Nonzero: QEMU's auto-converge. While the guest dirties memory faster than the rounds
    /// send it, throttle its vCPUs through [`pw_vmm::throttle`] with QEMU's steps (20%, then 10%
    /// more after every two rounds that dirtied half of what they sent, up to 99%).
    pub auto_converge: u8,
}

/// The policy `p` asks for.
///
/// # Safety
/// `p` is null or points to a valid `pw_policy`.
unsafe fn policy(p: *const pw_policy) -> Box<dyn Policy> {
    // SAFETY: as the caller promises.
    let limit = unsafe { downtime_limit(p) };
    // SAFETY: null or valid (caller).
    limit.policy(unsafe { p.as_ref() }.is_some_and(|p| p.auto_converge != 0))
}

/// # Safety
/// `p` is null or points to a valid `pw_policy`.
unsafe fn downtime_limit(p: *const pw_policy) -> DowntimeLimit {
    let d = DowntimeLimit::default();
    if p.is_null() {
        return d;
    }
    // SAFETY: non-null and valid (caller).
    let p = unsafe { &*p };
    let or = |v: u64, default: u64| if v == 0 { default } else { v };
    DowntimeLimit {
        downtime_limit_ms: or(p.downtime_limit_ms, d.downtime_limit_ms),
        rounds_max: if p.rounds_max == 0 {
            d.rounds_max
        } else {
            p.rounds_max
        },
        total_ms_max: or(p.total_ms_max, d.total_ms_max),
    }
}

/// The device state a VMM hands over after the pause, blob by blob
/// ([`pw_device_state_add`]).
pub struct pw_device_state(Vec<DeviceBlob>);

/// What a live migration needs of the VMM on the source. Every callback gets `ctx` first and is
/// called on the thread that called [`pw_sender_migrate`]; one returning nonzero fails the
/// migration with `PW_STATUS_VMM` (the receiver is told).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pw_vmm {
    /// The VMM's own pointer, passed to every callback.
    pub ctx: *mut c_void,
    /// Required. Sets the bits of the pages of region `region` written since the previous call
    /// (since the migration started, on the first call) in `bitmap`, `words` words of KVM's
    /// layout (one bit per 4 KiB page, bit `p % 64` of word `p / 64`; it arrives zeroed), and
    /// clears them at the source, so the next call reports only later writes:
    /// `KVM_GET_DIRTY_LOG` into `bitmap`, a VMM's own bitmap swapped out word by word, or both
    /// ORed. Called once per region at each collection.
    pub collect_dirty: Option<
        unsafe extern "C" fn(ctx: *mut c_void, region: u32, bitmap: *mut u64, words: usize) -> i32,
    >,
    /// Required. Pauses every vCPU and every device that writes guest memory: when it returns
    /// 0, nothing writes guest memory any more. Called once, when the expected downtime fits.
    pub pause: Option<unsafe extern "C" fn(ctx: *mut c_void) -> i32>,
    /// Optional. Called once after the pause: adds the device state (vCPU registers, device
    /// models) with [`pw_device_state_add`]; the destination gets the blobs from
    /// [`pw_receiver_blob`]. `state` is valid during the call only.
    pub device_state:
        Option<unsafe extern "C" fn(ctx: *mut c_void, state: *mut pw_device_state) -> i32>,
    /// Optional. Nanoseconds of CPU the guest's vCPU threads have used so far, or a negative
    /// number when unknown (`pthread_getcpuclockid` gives it). On a host whose CPUs are all
    /// busy, the paused round gets that CPU back, and the expected downtime counts on it.
    pub guest_cpu_ns: Option<unsafe extern "C" fn(ctx: *mut c_void) -> i64>,
    /// Optional (needed for [`pw_policy::auto_converge`]). Throttles the vCPUs so that they run
    /// at most `100 − percent` percent of the time (QEMU's `cpu-throttle-percentage`; 0 lifts
    /// it, which the migration does when it ends, whatever the outcome). Null: this VMM cannot
    /// throttle, and the migration goes on unthrottled.
    pub throttle: Option<unsafe extern "C" fn(ctx: *mut c_void, percent: u8) -> i32>,
}

fn vmm_error(what: &str, rc: i32) -> Error {
    Error::Vmm(format!("{what} returned {rc}"))
}

/// The VMM's dirty pages, through [`pw_vmm::collect_dirty`].
struct CDirty {
    ctx: *mut c_void,
    collect: unsafe extern "C" fn(*mut c_void, u32, *mut u64, usize) -> i32,
    /// Pages of each region.
    pages: Vec<u64>,
    words: Vec<u64>,
}

// SAFETY: a `CDirty` lives inside one `pw_sender_migrate` call and is used only on its thread
// (`Migration::run` collects on the calling thread); `ctx` is the VMM's, which the callback
// contract says is called there. `Send` is asked of every dirty source, not used here.
unsafe impl Send for CDirty {}

impl DirtySource for CDirty {
    fn collect(&mut self, into: &mut DirtyBitmaps) -> Result<(), Error> {
        for (region, &pages) in self.pages.iter().enumerate() {
            self.words.clear();
            self.words.resize(words_for(pages), 0);
            // SAFETY: the callback may write `words.len()` words at the pointer, which is
            // valid and exclusive for the call; `ctx` is the VMM's own (caller of migrate).
            let rc = unsafe {
                (self.collect)(
                    self.ctx,
                    region as u32,
                    self.words.as_mut_ptr(),
                    self.words.len(),
                )
            };
            if rc != 0 {
                return Err(vmm_error(&format!("collect_dirty (region {region})"), rc));
            }
            into.or_words(region as u32, &self.words)?;
        }
        Ok(())
    }
}

/// The VMM's pause, device state and guest CPU time, through [`pw_vmm`].
struct CVmm(pw_vmm);

impl Vmm for CVmm {
    fn pause(&mut self) -> Result<(), Error> {
        let pause = self.0.pause.ok_or_else(|| invalid("pause is null"))?;
        // SAFETY: the VMM's callback with its own `ctx` (pw_sender_migrate's contract).
        match unsafe { pause(self.0.ctx) } {
            0 => Ok(()),
            rc => Err(vmm_error("pause", rc)),
        }
    }

    fn device_state(&mut self) -> Result<Vec<DeviceBlob>, Error> {
        let Some(add) = self.0.device_state else {
            return Ok(Vec::new());
        };
        let mut state = pw_device_state(Vec::new());
        // SAFETY: the VMM's callback with its own `ctx`; `state` is valid for the call.
        match unsafe { add(self.0.ctx, &mut state) } {
            0 => Ok(state.0),
            rc => Err(vmm_error("device_state", rc)),
        }
    }

    fn guest_cpu_time(&self) -> Option<std::time::Duration> {
        let cpu = self.0.guest_cpu_ns?;
        // SAFETY: the VMM's callback with its own `ctx`.
        let ns = unsafe { cpu(self.0.ctx) };
        u64::try_from(ns).ok().map(std::time::Duration::from_nanos)
    }

    fn throttle(&mut self, percent: u8) -> Result<bool, Error> {
        let Some(throttle) = self.0.throttle else {
            return Ok(false);
        };
        // SAFETY: the VMM's callback with its own `ctx`.
        match unsafe { throttle(self.0.ctx, percent) } {
            0 => Ok(true),
            rc => Err(vmm_error("throttle", rc)),
        }
    }
}

/// Adds one blob of device state, from inside [`pw_vmm::device_state`]; the bytes are copied.
///
/// # Safety
/// `state` is the pointer the callback got; `bytes` points to `len` bytes (or `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn pw_device_state_add(
    state: *mut pw_device_state,
    tag: u32,
    bytes: *const u8,
    len: usize,
) -> pw_status {
    guard(|| {
        if state.is_null() || (bytes.is_null() && len > 0) {
            return Err(invalid("a null pointer"));
        }
        let bytes = if len == 0 {
            Vec::new()
        } else {
            // SAFETY: `len` bytes (caller).
            unsafe { std::slice::from_raw_parts(bytes, len) }.to_vec()
        };
        // SAFETY: the callback's valid, exclusive `state` (caller).
        unsafe { &mut *state }.0.push(DeviceBlob { tag, bytes });
        Ok(())
    })
}

/// Migrates the sender's memory live, the guest running, until the receiver confirmed it holds
/// everything, verified (see [`pw_vmm`]): round 0 sends all of
/// it, then rounds of dirty pages until the expected downtime fits `policy`; then `vmm->pause`,
/// the last round, `vmm->device_state`, and the receiver's confirmation. Blocks until then.
///
/// `out` (may be null) gets the final figures, on failure too (status `FAILED` or
/// `CANCELLED`), once the migration started: a call refused for its arguments
/// (`PW_STATUS_INVALID`) leaves it as it was. Afterwards the sender is done: [`pw_sender_stats`] has its transfer
/// statistics after a success; free it either way. A policy that gives up returns
/// `PW_STATUS_NOT_CONVERGING` with the guest still running, not paused.
///
/// # Safety
/// `sender` from [`pw_sender_connect`] (or [`pw_sender_over_fds`]), no round sent yet, used by
/// this thread only; `vmm` valid, its callbacks as documented; `policy` null or valid; `out`
/// null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pw_sender_migrate(
    sender: *mut pw_sender,
    vmm: *const pw_vmm,
    policy: *const pw_policy,
    out: *mut pw_migration_info,
) -> pw_status {
    guard(|| {
        if sender.is_null() || vmm.is_null() {
            return Err(invalid("a null pointer"));
        }
        // SAFETY: valid (caller).
        let vmm = unsafe { *vmm };
        let (Some(collect), Some(_)) = (vmm.collect_dirty, vmm.pause) else {
            return Err(invalid("pw_vmm needs collect_dirty and pause"));
        };
        // SAFETY: null or valid (caller).
        let policy = unsafe { self::policy(policy) };
        // SAFETY: valid, this thread only (caller).
        let handle = unsafe { &mut *sender };
        let s = handle
            .sender
            .take()
            .ok_or_else(|| invalid("the sender already finished"))?;
        let source = CDirty {
            ctx: vmm.ctx,
            collect,
            pages: s.memory().region_pages(),
            words: Vec::new(),
        };
        let migration = Migration::new(s, Box::new(source), policy);
        let control = migration.handle();
        *lock(&handle.migration) = Some(control.clone());
        let result = migration.run(&mut CVmm(vmm));
        if !out.is_null() {
            let info = pw_migration_info::of(&control.snapshot());
            // SAFETY: non-null and valid for a write (caller).
            unsafe { out.write(info) };
        }
        let report = result?;
        handle.stats = Some(pw_stats::from(&report.transfer));
        Ok(())
    })
}

/// The guarded value, also after a panic elsewhere poisoned the lock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_of_zeros_or_none_is_qemus_defaults_and_fields_override_them() {
        let d = DowntimeLimit::default();
        // SAFETY: null, and a valid policy.
        let (none, zeros, set) = unsafe {
            (
                downtime_limit(std::ptr::null()),
                downtime_limit(&pw_policy {
                    downtime_limit_ms: 0,
                    rounds_max: 0,
                    total_ms_max: 0,
                    auto_converge: 0,
                }),
                downtime_limit(&pw_policy {
                    downtime_limit_ms: 50,
                    rounds_max: 4,
                    total_ms_max: 1000,
                    auto_converge: 1,
                }),
            )
        };
        assert_eq!(none, d);
        assert_eq!(zeros, d);
        assert_eq!(
            set,
            DowntimeLimit {
                downtime_limit_ms: 50,
                rounds_max: 4,
                total_ms_max: 1000
            }
        );
    }

    #[test]
    fn the_info_says_no_downtime_until_there_is_one() {
        let mut s = Snapshot {
            status: Status::Active,
            ..Snapshot::default()
        };
        let info = pw_migration_info::of(&s);
        assert_eq!(info.status, pw_migration_status::Active);
        assert!(info.downtime_ms < 0.0);
        s.status = Status::Completed;
        s.downtime_ms = Some(12.5);
        s.rounds = vec![Default::default(); 3];
        s.converged = true;
        let info = pw_migration_info::of(&s);
        assert_eq!(
            (info.status, info.downtime_ms, info.rounds, info.converged),
            (pw_migration_status::Completed, 12.5, 3, 1)
        );
    }

    #[test]
    fn a_vmm_without_its_required_callbacks_is_refused_before_the_sender_is_looked_at() {
        let vmm = pw_vmm {
            ctx: std::ptr::null_mut(),
            collect_dirty: None,
            pause: None,
            device_state: None,
            guest_cpu_ns: None,
            throttle: None,
        };
        let mut sender = pw_sender {
            sender: None,
            stats: None,
            migration: MigrationSlot::default(),
        };
        let (policy, info) = (std::ptr::null(), std::ptr::null_mut());
        // SAFETY: valid pointers (null policy and info are allowed).
        let status = unsafe { pw_sender_migrate(&mut sender, &vmm, policy, info) };
        assert_eq!(status, pw_status::Invalid);
        // SAFETY: the thread's message is a valid C string.
        let message = unsafe { CStr::from_ptr(pw_last_error()) };
        assert!(
            message
                .to_str()
                .unwrap_or("")
                .contains("collect_dirty and pause"),
            "{message:?}"
        );
    }
}
