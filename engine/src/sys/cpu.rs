//! Time and scheduling: CPU clocks of this thread, this process and other threads, page-fault
//! counts, the host's CPU ticks (`/proc/stat`) and the scheduler's per-thread figures
//! (`schedstat`).

use std::time::Duration;

/// CPU time (user + system) the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time (user + system) the whole process has used.
pub fn process_cpu_time() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Page faults the calling thread has taken so far: (minor, major). A minor fault maps a page
/// that needs no I/O (a fresh zeroed page, a page-cache page); a major one waits for I/O.
pub fn thread_page_faults() -> (u64, u64) {
    // SAFETY: all-zero is a valid rusage (plain integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage; getrusage only writes it.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return (0, 0);
    }
    (usage.ru_minflt as u64, usage.ru_majflt as u64)
}

/// CPU time (user + system) another thread of this process has used, through its handle;
/// `None` once the thread has exited or the clock is not offered.
///
/// It takes the `JoinHandle`, not a raw `pthread_t`: glibc reads the thread's descriptor
/// behind the handle, so a handle of a joined thread (or a made-up one) would be a read of
/// freed memory, and a borrowed `JoinHandle` cannot have been joined.
pub fn thread_cpu_time_of<T>(thread: &std::thread::JoinHandle<T>) -> Option<Duration> {
    use std::os::unix::thread::JoinHandleExt;
    let mut id: libc::clockid_t = 0;
    // SAFETY: from a JoinHandle borrowed for this call: not joined, so its descriptor is
    // valid (an exited thread keeps it until joined); `id` is a writable clockid_t.
    if unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut id) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    if unsafe { libc::clock_gettime(id, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The host's CPU time so far, all CPUs together, from `/proc/stat` (in `USER_HZ` ticks,
/// usually 10 ms): busy (user, nice, system, irq, softirq, steal) and total (busy, idle,
/// iowait), and how many CPUs it counts. `None` where `/proc/stat` cannot be read.
pub fn host_cpu_ticks() -> Option<HostCpuTicks> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let mut lines = text.lines();
    let (busy, total) = busy_and_total(lines.next()?.strip_prefix("cpu ")?);
    let cpus = lines
        .take_while(|l| l.starts_with("cpu"))
        .filter(|l| l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    Some(HostCpuTicks {
        busy,
        total,
        cpus: cpus.max(1),
    })
}

/// Busy and total ticks of one `/proc/stat` CPU line's counters (after its `cpu` name):
/// user nice system idle iowait irq softirq steal (guest time is inside user already).
fn busy_and_total(counters: &str) -> (u64, u64) {
    let f: Vec<u64> = counters
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, busy + at(3) + at(4))
}

/// Each CPU's ticks so far, from `/proc/stat` (see [`host_cpu_ticks`]): (CPU number, busy,
/// total), in the file's order. `None` where `/proc/stat` cannot be read.
pub fn cpu_ticks_each() -> Option<Vec<CpuTicks>> {
    Some(parse_cpu_ticks_each(
        &std::fs::read_to_string("/proc/stat").ok()?,
    ))
}

/// One CPU's ticks (see [`cpu_ticks_each`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// The CPU's number (`cpuN`).
    pub cpu: usize,
    /// Ticks it spent running anything.
    pub busy: u64,
    /// Ticks in all.
    pub total: u64,
}

fn parse_cpu_ticks_each(text: &str) -> Vec<CpuTicks> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cpu")?;
            let (n, counters) = rest.split_once(char::is_whitespace)?;
            let cpu = n.parse().ok()?;
            let (busy, total) = busy_and_total(counters);
            Some(CpuTicks { cpu, busy, total })
        })
        .collect()
}

/// The CPUs that ran anything for at least `fraction` of the time from `before` to `after`
/// (two [`cpu_ticks_each`] readings), with that share, in CPU order; CPUs on which no tick
/// passed (or that one reading lacks) are left out.
pub fn busy_cpus_between(
    before: &[CpuTicks],
    after: &[CpuTicks],
    fraction: f64,
) -> Vec<(usize, f64)> {
    let mut busy: Vec<(usize, f64)> = after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.cpu == a.cpu)?;
            let total = a.total.checked_sub(b.total).filter(|&t| t > 0)?;
            let share = a.busy.saturating_sub(b.busy).min(total) as f64 / total as f64;
            (share >= fraction).then_some((a.cpu, share))
        })
        .collect();
    busy.sort_by_key(|&(cpu, _)| cpu);
    busy
}

/// See [`host_cpu_ticks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpuTicks {
    /// Ticks the CPUs spent running anything.
    pub busy: u64,
    /// Ticks in all (busy, idle, waiting for I/O).
    pub total: u64,
    /// CPUs counted.
    pub cpus: u32,
}

impl HostCpuTicks {
    /// CPUs busy on average from `earlier` to `self` (0 to `cpus`); `None` when no tick
    /// passed.
    pub fn busy_cpus_since(&self, earlier: &HostCpuTicks) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| busy.min(total) as f64 / total as f64 * self.cpus as f64)
    }
}

/// Lets the calling thread run on any of `cores` (and only those), leaving the choice among
/// them to the scheduler. An empty list, a core past `CPU_SETSIZE` or a set the kernel refuses
/// (no allowed core in it) is an error, and the thread's affinity is left as it was.
pub fn set_thread_affinity(cores: &[usize]) -> std::io::Result<()> {
    let setsize = libc::CPU_SETSIZE as usize;
    if cores.is_empty() || cores.iter().any(|&c| c >= setsize) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cores {
        // SAFETY: `c < CPU_SETSIZE` (checked above), so the bit lies inside `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid `cpu_set_t` of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The cores the calling thread may run on, ascending.
pub fn thread_affinity() -> std::io::Result<Vec<usize>> {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a valid, writable `cpu_set_t` of `size` bytes; pid 0 is this thread.
    let rc = unsafe { libc::sched_getaffinity(0, size, &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cores = Vec::new();
    for c in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `c < CPU_SETSIZE`, so the bit lies inside `set`.
        if unsafe { libc::CPU_ISSET(c, &set) } {
            cores.push(c);
        }
    }
    Ok(cores)
}

/// What the scheduler counted for one thread so far (`/proc/self/task/TID/schedstat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSched {
    /// The thread's id.
    pub tid: u32,
    /// Time it ran on a CPU (the file's first field).
    pub on_cpu: Duration,
    /// Time it was runnable but waited for a CPU, its run delay (the second field).
    pub run_delay: Duration,
}

/// The scheduler's figures of the threads of this process whose name starts with `prefix`
/// (the shards: `pw-send-`, `pw-recv-`), one entry per such thread. Empty where the kernel
/// keeps no scheduler statistics (`CONFIG_SCHED_INFO`).
pub fn threads_sched(prefix: &str) -> Vec<ThreadSched> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for task in tasks.flatten() {
        let path = task.path();
        let named = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|comm| comm.trim_end().starts_with(prefix));
        if !named {
            continue;
        }
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(path.join("schedstat")) else {
            continue;
        };
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        if let (Some(Some(on_cpu)), Some(Some(run_delay))) = (fields.next(), fields.next()) {
            found.push(ThreadSched {
                tid,
                on_cpu: Duration::from_nanos(on_cpu),
                run_delay: Duration::from_nanos(run_delay),
            });
        }
    }
    found
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_figures_are_read_for_the_named_threads_only() {
        if !std::path::Path::new("/proc/self/schedstat").exists() {
            eprintln!("skipped: this kernel keeps no scheduler statistics (CONFIG_SCHED_INFO)");
            return;
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let named = std::thread::Builder::new()
            .name("pw-delaytest-0".into())
            .spawn(move || {
                ready_tx.send(()).unwrap();
                let _ = done_rx.recv();
            })
            .unwrap();
        ready_rx.recv().unwrap();
        let found = threads_sched("pw-delaytest-");
        let others = threads_sched("pw-no-such-thread-");
        done_tx.send(()).unwrap();
        named.join().unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].on_cpu > Duration::ZERO, "{found:?}");
        assert!(others.is_empty(), "{others:?}");
    }

    #[test]
    fn a_thread_spreads_over_a_set_of_cores_and_refuses_nonsense() {
        let allowed = std::thread::spawn(thread_affinity).join().unwrap().unwrap();
        assert!(!allowed.is_empty());
        let t = std::thread::spawn(move || {
            let first = allowed[..allowed.len().min(2)].to_vec();
            set_thread_affinity(&first).unwrap();
            let now = thread_affinity().unwrap();
            let empty = set_thread_affinity(&[]).unwrap_err();
            let huge = set_thread_affinity(&[libc::CPU_SETSIZE as usize]).unwrap_err();
            (
                first,
                now,
                empty.raw_os_error(),
                huge.raw_os_error(),
                thread_affinity().unwrap(),
            )
        });
        let (wanted, got, empty, huge, after) = t.join().unwrap();
        assert_eq!(got, wanted);
        assert_eq!((empty, huge), (Some(libc::EINVAL), Some(libc::EINVAL)));
        assert_eq!(after, wanted, "a refused set leaves the affinity as it was");
    }

    #[test]
    fn each_cpus_ticks_are_parsed_and_busy_ones_found() {
        let before = parse_cpu_ticks_each(
            "cpu  30 0 10 100 0 0 0 0 0 0\ncpu0 10 0 5 50 0 0 0 0 0 0\ncpu1 20 0 5 50 0 0 0 0 0 0\nintr 1 2\n",
        );
        assert_eq!(
            before,
            [
                CpuTicks {
                    cpu: 0,
                    busy: 15,
                    total: 65
                },
                CpuTicks {
                    cpu: 1,
                    busy: 25,
                    total: 75
                }
            ]
        );
        // Over 20 ticks each: cpu0 ran 2 of them, cpu1 19 (18 user, 1 steal).
        let after = parse_cpu_ticks_each(
            "cpu0 12 0 5 68 0 0 0 0 0 0\ncpu1 38 0 5 51 0 0 0 1 0 0\ncpu2 1 0 0 1 0 0 0 0 0 0\n",
        );
        assert_eq!(busy_cpus_between(&before, &after, 0.5), [(1, 0.95)]);
        let all = busy_cpus_between(&before, &after, 0.0);
        assert_eq!(all, [(0, 0.1), (1, 0.95)], "cpu2 is in one reading only");
        assert!(
            busy_cpus_between(&before, &before, 0.0).is_empty(),
            "no tick passed"
        );
        // This host: one line per CPU, each named once.
        if let Some(here) = cpu_ticks_each() {
            let mut cpus: Vec<usize> = here.iter().map(|c| c.cpu).collect();
            cpus.sort_unstable();
            cpus.dedup();
            assert_eq!(cpus.len(), here.len(), "{here:?}");
            assert!(!here.is_empty());
        }
    }

    #[test]
    fn the_host_cpu_ticks_add_up_and_a_busy_thread_shows() {
        let Some(a) = host_cpu_ticks() else {
            eprintln!("skipped: /proc/stat cannot be read here");
            return;
        };
        assert!(a.cpus >= 1 && a.busy <= a.total, "{a:?}");
        // Spin until the host's clock has ticked enough to measure (bounded).
        let start = std::time::Instant::now();
        let mut b = a;
        while b.total < a.total + 20 * u64::from(a.cpus) && start.elapsed() < Duration::from_secs(2)
        {
            std::hint::black_box((0..10_000u64).sum::<u64>());
            b = host_cpu_ticks().unwrap();
        }
        let busy = b.busy_cpus_since(&a).expect("ticks passed");
        assert!(busy > 0.5 && busy <= f64::from(a.cpus), "{busy} of {a:?}");
        assert_eq!(a.busy_cpus_since(&a), None, "no tick, no figure");
        // A thread's CPU clock through its handle, while the thread lives.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let s = std::time::Instant::now();
            while s.elapsed() < Duration::from_millis(30) {
                std::hint::black_box((0..1000u64).sum::<u64>());
            }
            let _ = wait.recv_timeout(Duration::from_secs(5));
        });
        std::thread::sleep(Duration::from_millis(60));
        let cpu = thread_cpu_time_of(&t);
        release.send(()).unwrap();
        t.join().unwrap();
        let cpu = cpu.expect("a live thread has a CPU clock");
        assert!(cpu >= Duration::from_millis(10), "{cpu:?}");
    }
}
