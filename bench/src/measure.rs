//! Measurement primitives the benchmarks share: timed runs and their summaries, raw TCP over
//! the same memory as pagewire, a pagewire transfer end to end, a one-core scan, pinning, and
//! the machine's description.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pagewire::pipeline::compress::Compression;
use pagewire::pipeline::zero::ZeroScanner;
use pagewire::sys::thread_cpu_time;
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{GuestMemory, Pinning, Receiver, ReceiverConfig, Sender, SenderConfig, ZeroCopy};
use serde::Serialize;

/// One timed run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Run {
    pub(crate) seconds: f64,
    pub(crate) sender_cpu_s: f64,
    pub(crate) receiver_cpu_s: f64,
}

/// Median and spread of several runs of one engine.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub(crate) engine: &'static str,
    pub(crate) bytes: u64,
    pub(crate) gib_per_s_median: f64,
    pub(crate) gib_per_s_min: f64,
    pub(crate) gib_per_s_max: f64,
    pub(crate) sender_cpu_s_per_gib: f64,
    pub(crate) receiver_cpu_s_per_gib: f64,
}

/// The median of `v` (sorted in place): the mean of the two middle values for an even count,
/// so two repetitions report their mean, not the faster one. NaN when empty.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn summarize(engine: &'static str, bytes: u64, runs: &[Run]) -> Summary {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let mut rates: Vec<f64> = runs.iter().map(|r| gib / r.seconds).collect();
    let mut s: Vec<f64> = runs.iter().map(|r| r.sender_cpu_s / gib).collect();
    let mut r: Vec<f64> = runs.iter().map(|r| r.receiver_cpu_s / gib).collect();
    Summary {
        engine,
        bytes,
        gib_per_s_median: median(&mut rates),
        gib_per_s_min: rates[0],
        gib_per_s_max: rates[rates.len() - 1],
        sender_cpu_s_per_gib: median(&mut s),
        receiver_cpu_s_per_gib: median(&mut r),
    }
}

/// How the benchmarks set up their TCP connections, raw TCP's and pagewire's alike.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Net {
    /// Do not pin threads (applies to both engines).
    #[arg(long)]
    pub no_pin: bool,
    /// TCP congestion control of the data connections, raw TCP's and pagewire's alike (one
    /// this kernel offers, e.g. cubic or bbr). Default: the host's, as QEMU's connections get.
    #[arg(long)]
    pub congestion: Option<String>,
    /// Where each stream's receiving thread runs, raw TCP's and pagewire's alike, relative to
    /// its sending thread (which is pinned to the stream's core). Over loopback a receiver on
    /// its sender's core copies out of socket buffers still in that core's cache; on the other
    /// core it reads them from the shared cache or memory.
    #[arg(long, value_enum, default_value_t = ReceiverPlacement::Free)]
    pub receiver_placement: ReceiverPlacement,
}

/// Where a stream's receiving thread runs ([`Net::receiver_placement`]).
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReceiverPlacement {
    /// Left to the scheduler within the allowed cores (pagewire's receiver default,
    /// `Pinning::Nodes`, on one node).
    #[default]
    Free,
    /// Pinned to its sender's core (pagewire: `Pinning::Cores` on both sides).
    WithSender,
    /// Pinned to another core than its sender's, counted from the last (pagewire:
    /// `Pinning::CoresReversed`); needs an even number of allowed cores on one NUMA node, where
    /// the two engines pair the cores alike.
    Crossed,
}

impl ReceiverPlacement {
    /// Pins a receiving thread of stream `i` accordingly, `cores` being the allowed cores the
    /// senders are pinned to in order (empty: nothing is pinned).
    fn pin(self, cores: &[core_affinity::CoreId], i: usize) {
        match self {
            ReceiverPlacement::Free => {}
            ReceiverPlacement::WithSender => pin(cores, i),
            ReceiverPlacement::Crossed if !cores.is_empty() => {
                pin(cores, cores.len() - 1 - i % cores.len())
            }
            ReceiverPlacement::Crossed => {}
        }
    }

    /// pagewire's receiver pinning for this placement.
    fn pinning(self) -> Pinning {
        match self {
            ReceiverPlacement::Free => Pinning::Nodes,
            ReceiverPlacement::WithSender => Pinning::Cores,
            ReceiverPlacement::Crossed => Pinning::CoresReversed,
        }
    }
}

impl Net {
    /// Checks the congestion control name before anything runs.
    pub(crate) fn check(&self) -> Result<()> {
        if let Some(name) = &self.congestion {
            pagewire::config::check_congestion(name)?;
        }
        if self.no_pin && self.receiver_placement != ReceiverPlacement::Free {
            bail!("--receiver-placement pins receivers beside pinned senders: it cannot be combined with --no-pin");
        }
        if self.receiver_placement == ReceiverPlacement::Crossed {
            // Counted from the last core, stream i's receiver is on another core than its
            // sender only with an even number of cores; and pagewire reverses the order within
            // each node's cores, raw TCP over all of them, which agree on one node only.
            let cores = cores(false).len();
            let nodes = pagewire::placement::Topology::detect().nodes.len();
            if !cores.is_multiple_of(2) || nodes > 1 {
                bail!(
                    "--receiver-placement crossed needs an even number of allowed cores on one NUMA node (here {cores} cores on {nodes} nodes): pin the run with taskset to such a set"
                );
            }
        }
        Ok(())
    }
}

pub(crate) fn cores(no_pin: bool) -> Vec<core_affinity::CoreId> {
    if no_pin {
        Vec::new()
    } else {
        core_affinity::get_core_ids().unwrap_or_default()
    }
}

/// Pins the calling thread to the `i`-th of `cores` (wrapping); nothing when `cores` is empty.
pub(crate) fn pin(cores: &[core_affinity::CoreId], i: usize) {
    if cores.is_empty() {
        return;
    }
    core_affinity::set_for_current(cores[i % cores.len()]);
}

/// Byte range of stream `i` of `streams` over `total` bytes (the last takes the remainder).
pub(crate) fn share(total: usize, streams: usize, i: usize) -> (usize, usize) {
    let each = total / streams;
    let len = if i == streams - 1 {
        total - i * each
    } else {
        each
    };
    (i * each, len)
}

/// Sends `len` bytes from `src_addr + offset` over `stream` in 1 MiB blocking writes; returns the
/// thread's CPU seconds. `src_addr` is the host address of a mapping that outlives the call.
pub(crate) fn raw_send_share(
    stream: &TcpStream,
    src_addr: usize,
    offset: usize,
    len: usize,
) -> Result<f64> {
    const WRITE_BYTES: usize = 1 << 20;
    let cpu = thread_cpu_time();
    let mut done = 0;
    while done < len {
        let n = WRITE_BYTES.min(len - done);
        // SAFETY: the caller's mapping covers src_addr + offset .. + len and outlives the call;
        // the kernel only reads it.
        let rc = unsafe {
            libc::send(
                stream.as_raw_fd(),
                (src_addr + offset + done) as *const libc::c_void,
                n,
                libc::MSG_NOSIGNAL,
            )
        };
        if rc <= 0 {
            bail!("raw send failed: {}", std::io::Error::last_os_error());
        }
        done += rc as usize;
    }
    Ok((thread_cpu_time() - cpu).as_secs_f64())
}

/// Receives `len` bytes into `dst_addr + offset` with `MSG_WAITALL`; returns CPU seconds.
pub(crate) fn raw_recv_share(
    stream: &TcpStream,
    dst_addr: usize,
    offset: usize,
    len: usize,
) -> Result<f64> {
    let cpu = thread_cpu_time();
    let mut done = 0;
    while done < len {
        // SAFETY: the caller's mapping covers dst_addr + offset .. + len and outlives the call;
        // each stream writes a disjoint range.
        let rc = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                (dst_addr + offset + done) as *mut libc::c_void,
                len - done,
                libc::MSG_WAITALL,
            )
        };
        if rc <= 0 {
            bail!("raw recv ended early: {}", std::io::Error::last_os_error());
        }
        done += rc as usize;
    }
    Ok((thread_cpu_time() - cpu).as_secs_f64())
}

/// (a) raw TCP: stream i moves bytes [i*share, (i+1)*share) of the single region, from the
/// source mapping straight into the same range of the destination mapping, once the host is
/// quiet ([`wait_quiet`]).
pub(crate) fn raw_tcp(
    src: &GuestMemory,
    dst: &GuestMemory,
    channels: usize,
    net: &Net,
) -> Result<Run> {
    let total = src.regions()[0].len() as usize;
    let src_addr = src.regions()[0].host_addr() as usize;
    let dst_addr = dst.regions()[0].host_addr() as usize;
    let cores = cores(net.no_pin);
    wait_quiet(QUIET_WAIT_MS_MAX);
    let start = Instant::now();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(channels);
    for _ in 0..channels {
        let client = TcpStream::connect(addr)?;
        if let Some(name) = &net.congestion {
            pagewire::sys::set_tcp_congestion(&client, name)
                .with_context(|| format!("setting TCP congestion control {name}"))?;
        }
        let (server, _) = listener.accept()?;
        pairs.push((client, server));
    }
    let mut threads = Vec::with_capacity(2 * channels);
    for (i, (client, server)) in pairs.into_iter().enumerate() {
        let (offset, len) = share(total, channels, i);
        let c = cores.clone();
        threads.push(std::thread::spawn(move || -> Result<(bool, f64)> {
            pin(&c, i);
            Ok((true, raw_send_share(&client, src_addr, offset, len)?))
        }));
        // The receiving thread is placed as pagewire's receive shards are: by default left
        // to the scheduler within the allowed cores (`Pinning::Nodes` on one node).
        let (c, placement) = (cores.clone(), net.receiver_placement);
        threads.push(std::thread::spawn(move || -> Result<(bool, f64)> {
            placement.pin(&c, i);
            Ok((false, raw_recv_share(&server, dst_addr, offset, len)?))
        }));
    }
    let (mut sender_cpu, mut receiver_cpu) = (0.0, 0.0);
    for t in threads {
        let (is_sender, cpu) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a raw TCP thread panicked"))??;
        if is_sender {
            sender_cpu += cpu;
        } else {
            receiver_cpu += cpu;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if src.first_difference(dst).is_some() {
        bail!("raw TCP destination differs from the source");
    }
    Ok(Run {
        seconds,
        sender_cpu_s: sender_cpu,
        receiver_cpu_s: receiver_cpu,
    })
}

/// How a benchmarked pagewire transfer protects its channels.
#[derive(Clone, Copy)]
pub(crate) enum Security<'a> {
    /// Plaintext (payload checksums only).
    Plain,
    /// Plaintext without page checksums (`SenderConfig::page_checksums` off, the receiver
    /// consenting): TCP's checksum only, as QEMU's multifd.
    PlainUnchecked,
    /// TLS 1.3 with these certificates.
    Tls(&'a (TlsClient, TlsServer)),
    /// A pre-shared key.
    Psk(&'a pagewire::auth::Psk),
}

impl<'a> From<Option<&'a (TlsClient, TlsServer)>> for Security<'a> {
    fn from(tls: Option<&'a (TlsClient, TlsServer)>) -> Self {
        tls.map_or(Security::Plain, Security::Tls)
    }
}

/// (b) pagewire over loopback, end to end: from connect until the receiver confirmed every
/// page. Like (a), it waits for a quiet host first ([`wait_quiet`]).
pub(crate) fn pagewire_run<'a>(
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    channels: u16,
    zero_copy: ZeroCopy,
    net: &Net,
    security: impl Into<Security<'a>>,
    compression: Compression,
) -> Result<(Run, pagewire::TransferStats)> {
    let security = security.into();
    wait_quiet(QUIET_WAIT_MS_MAX);
    let unchecked = matches!(security, Security::PlainUnchecked);
    let (tls, psk) = match security {
        Security::Plain | Security::PlainUnchecked => (None, None),
        Security::Tls(t) => (Some(t), None),
        Security::Psk(k) => (None, Some(k.clone())),
    };
    let (send_pin, recv_pin) = if net.no_pin {
        (Pinning::None, Pinning::None)
    } else {
        // The sender's library default; the receiver's unless another placement is asked.
        (Pinning::Cores, net.receiver_placement.pinning())
    };
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst,
        ReceiverConfig {
            pinning: recv_pin,
            accept_timeout_ms: Some(30_000),
            tls: tls.map(|t| t.1.clone()),
            psk: psk.clone(),
            accept_unchecked_pages: unchecked,
            ..ReceiverConfig::default()
        },
    )?;
    let addr = receiver.local_addr()?;
    let start = Instant::now();
    let rx = std::thread::spawn(move || receiver.run());
    let config = SenderConfig {
        channels,
        pinning: send_pin,
        zero_copy,
        congestion: net.congestion.clone(),
        tls: tls.map(|t| t.0.clone()),
        psk,
        compression,
        page_checksums: !unchecked,
        ..SenderConfig::default()
    };
    let mut sender = Sender::connect(addr, src, &config)?;
    sender.send_all()?;
    let sent = sender.finish()?;
    let received = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let seconds = start.elapsed().as_secs_f64();
    Ok((
        Run {
            seconds,
            sender_cpu_s: sent.cpu_ms / 1e3,
            receiver_cpu_s: received.cpu_ms / 1e3,
        },
        sent,
    ))
}

/// (c) one core reads the whole buffer through the zero scanner.
pub(crate) fn scan_run(mem: &GuestMemory) -> Run {
    let scanner = ZeroScanner::detect();
    let cpu = thread_cpu_time();
    let start = Instant::now();
    let mut zero = 0u64;
    for r in mem.regions() {
        for p in 0..r.pages() {
            zero += u64::from(r.page_is_zero(&scanner, p));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(zero, mem.total_pages(), "zero memory must scan as zero");
    Run {
        seconds,
        sender_cpu_s: (thread_cpu_time() - cpu).as_secs_f64(),
        receiver_cpu_s: 0.0,
    }
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory_gib = meminfo_kib("MemTotal:").map_or(0.0, |kib| kib as f64 / (1u64 << 20) as f64);
    let congestion = pagewire::sys::host_congestion().map_or("unknown".into(), |(d, _)| d);
    format!(
        "{cpu}, {cores} cores, {memory_gib:.0} GiB memory, Linux {kernel}, TCP congestion control {congestion} by default"
    )
}

/// The host counts as quiet below this many busy CPUs (all of them together) over one window
/// of [`QUIET_WINDOW_MS`].
const QUIET_BUSY_CPUS_MAX: f64 = 0.1;
/// Milliseconds of one look at the host's load while waiting for quiet.
const QUIET_WINDOW_MS: u64 = 200;
/// The longest wait for a quiet host before a measurement starts anyway.
pub(crate) const QUIET_WAIT_MS_MAX: u64 = 10_000;

/// Reads 8 bytes of every page of `mem`.
///
/// On this nested host, after a KVM guest's process exits (QEMU's, in `matrix --with-qemu`), the
/// first pass over *any* memory runs at about 60% of the speed of the next one, whatever the
/// wait in between: a one-core scan of 2 GiB of zero pages measured 8.5–10.0 GiB/s right after
/// QEMU's run and 13.6–13.8 GiB/s on the pass after it (5 s of waiting did not help). One 8-byte
/// read per page, 50–110 ms for 2 GiB, is enough: the scan after it ran at 13.6–14.0. Without
/// it, the pagewire cell measured right after a QEMU run lost 10–25% (2 GiB of zero pages at
/// 1 channel: 7.0–8.4 GiB/s against 9.1–9.2 in the cell before it), and in earlier versions of
/// the matrix every pagewire cell but the first ran right after one. A running migration's
/// guest memory is in use all along, so this is the state it moves memory in. The matrix
/// touches the source of each in-memory run (raw TCP's and pagewire's; their destinations are
/// faulted in just before, which is such a pass); runs between RAM files are timed end to end,
/// page faults included, so their mappings are left as they come.
pub(crate) fn touch(mem: &GuestMemory) {
    let mut word = [0u8; 8];
    for r in mem.regions() {
        for page in 0..r.pages() {
            r.read(page * 4096, &mut word);
            std::hint::black_box(&word);
        }
    }
}

/// Writes one byte of every 4 KiB page of fresh anonymous memory, then frees it: twice
/// `bytes`, at most [`REFRESH_AVAILABLE_SHARE`] of the host's available memory. Returns the
/// bytes refreshed.
///
/// [`touch`] mends the memory a run reads, but not the memory it is handed: after a KVM guest
/// has run on this nested host (QEMU's in `matrix --with-qemu`; a `pagewire demo --live` with
/// the tiny guest did the same), the pages the kernel hands out next are slow on their first
/// use, socket buffers included, so even raw TCP slows down. Measured on an AMD EPYC host
/// (December 2026, 2 GiB of random pages, 2 channels, 3 repetitions): with no KVM guest before
/// them, pagewire moved 3.95 GiB/s, raw TCP 4.69, pagewire with TLS 1.86; after one QEMU
/// migration of 2 GiB, 2.61, 2.93 and 1.27, in all three repetitions; after QEMU and then 4 GiB
/// written this way and freed, 3.49, 4.43 and 1.81 (after 18 GiB, 3.70, 4.34, 1.89). Why it
/// works is inferred, not traced: freed pages go back to the head of the kernel's free lists,
/// so the next runs are handed pages just written. The matrix refreshes once before it starts
/// and after every QEMU migration, so each engine's runs (QEMU's too: each follows a QEMU run)
/// start from the same state. `live` does not: a KVM guest runs through every live run of either engine, and its
/// grid refreshed before every run was no different (the estimate within 25% of the downtime
/// in 24 of 30 converged runs, against 27 of 28 without).
pub(crate) fn refresh_free_memory(bytes: u64) -> u64 {
    let available = meminfo_kib("MemAvailable:").map_or(0, |kib| kib * 1024);
    let len = refresh_bytes(bytes, available);
    // A page at a time, as the kernel hands pages to socket buffers: populating whole 2 MiB
    // pages (`GuestMemory::anonymous_populated`) restored only half of the loss (3.11 and
    // 1.55 GiB/s in the measurement above), as those come from other free lists.
    let mut pages = vec![0u8; len as usize];
    for page in pages.chunks_mut(pagewire::limits::PAGE_BYTES) {
        page[0] = 1;
    }
    std::hint::black_box(&pages);
    len
}

/// The value of the `/proc/meminfo` line that starts with `key` (`"MemTotal:"`), in KiB.
fn meminfo_kib(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse().ok())
    })
}

/// How much [`refresh_free_memory`] takes for a cell of `bytes` on a host with `available`
/// bytes available: twice the cell, at most [`REFRESH_AVAILABLE_SHARE`] of `available`, in
/// whole pages.
fn refresh_bytes(bytes: u64, available: u64) -> u64 {
    let page_bytes = pagewire::limits::PAGE_BYTES as u64;
    bytes
        .saturating_mul(2)
        .min((available as f64 * REFRESH_AVAILABLE_SHARE) as u64)
        / page_bytes
        * page_bytes
}

/// The most of the host's available memory (`MemAvailable`) that [`refresh_free_memory`]
/// takes at once.
const REFRESH_AVAILABLE_SHARE: f64 = 0.5;

/// Waits until the host is quiet (under [`QUIET_BUSY_CPUS_MAX`] busy CPUs for a window of
/// [`QUIET_WINDOW_MS`]), at most `max_ms`, and returns how long it waited.
///
/// A guard against work a run leaves behind (a process exiting, kernel workers freeing its
/// memory) sharing the cores with the next measurement; on a quiet host it costs one window.
/// (It did not explain the slow runs after QEMU's: those were first uses of memory, see
/// [`touch`] and [`refresh_free_memory`].) Without `/proc/stat` it does not wait.
pub(crate) fn wait_quiet(max_ms: u64) -> Duration {
    let start = Instant::now();
    let Some(mut before) = pagewire::sys::host_cpu_ticks() else {
        return Duration::ZERO;
    };
    while start.elapsed() < Duration::from_millis(max_ms) {
        std::thread::sleep(Duration::from_millis(QUIET_WINDOW_MS));
        let Some(now) = pagewire::sys::host_cpu_ticks() else {
            break;
        };
        if now
            .busy_cpus_since(&before)
            .is_some_and(|busy| busy < QUIET_BUSY_CPUS_MAX)
        {
            break;
        }
        before = now;
    }
    start.elapsed()
}

#[cfg(test)]
mod tests {
    use super::{median, refresh_bytes, refresh_free_memory, wait_quiet};

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0]), 2.5);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn a_refresh_takes_twice_the_cell_in_whole_pages_and_never_most_of_the_host() {
        let gib = 1u64 << 30;
        assert_eq!(refresh_bytes(2 * gib, 20 * gib), 4 * gib);
        assert_eq!(refresh_bytes(5000, 20 * gib), 8192);
        assert_eq!(refresh_bytes(8 * gib, 20 * gib), 10 * gib);
        assert_eq!(refresh_bytes(u64::MAX, 20 * gib), 10 * gib);
        assert_eq!(refresh_bytes(gib, 0), 0);
        // And the refresh takes that much of this host.
        assert_eq!(refresh_free_memory(1 << 20), 2 << 20);
    }

    #[test]
    fn waiting_for_a_quiet_host_keeps_its_bound() {
        // However busy the host (other tests run beside this one), the wait ends within its
        // bound and one window.
        let waited = wait_quiet(300);
        assert!(
            waited < std::time::Duration::from_millis(300 + 2 * 200),
            "{waited:?}"
        );
    }
}
