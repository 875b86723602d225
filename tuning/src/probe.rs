//! `pagewire-tune probe`: what pagewire will find on this host, and what it will do about each
//! finding. Everything is read from `/proc`, `/sys`, the CPU and small probes (an io_uring, a
//! one-page `madvise`); nothing is changed.

use std::path::Path;

use pagewire::pipeline::zero::ZeroScanner;
use pagewire::placement::{cpu_list_text, Topology, TopologySource};
use serde::Serialize;

/// One fact about the host and pagewire's answer to it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was probed, e.g. `transparent huge pages`.
    pub name: &'static str,
    /// What was found.
    pub value: String,
    /// What pagewire does about it.
    pub pagewire: String,
}

fn finding(name: &'static str, value: impl Into<String>, pagewire: impl Into<String>) -> Finding {
    Finding {
        name,
        value: value.into(),
        pagewire: pagewire.into(),
    }
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The selected value of a sysfs choice file ("always [madvise] never" → "madvise").
fn selected(choices: &str) -> Option<&str> {
    let start = choices.find('[')? + 1;
    let end = start + choices[start..].find(']')?;
    Some(&choices[start..end])
}

/// A `/proc/meminfo` field, in kB (or a plain count for `HugePages_*`).
fn meminfo(field: &str) -> Option<u64> {
    read("/proc/meminfo")?.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Whether `MADV_POPULATE_WRITE` works here (Linux 5.14+), tried on one anonymous page.
fn populate_write() -> bool {
    let memory = pagewire::GuestMemory::anonymous(&[pagewire::RegionSpec { gpa: 0, len: 4096 }]);
    memory.is_ok_and(|m| {
        m.prefault(0, 1, &std::sync::atomic::AtomicBool::new(false))
            .unwrap_or(false)
    })
}

/// The soft `RLIMIT_MEMLOCK`, in bytes (`None`: unlimited).
fn memlock() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit; getrlimit only writes it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! has {
            ($($name:tt),*) => {
                $(if std::is_x86_feature_detected!($name) { f.push($name); })*
            };
        }
        has!(
            "aes",
            "pclmulqdq",
            "avx2",
            "vaes",
            "vpclmulqdq",
            "avx512f",
            "avx512bw"
        );
    }
    f
}

/// How long `probe` watches the cores for other work.
const BUSY_SAMPLE_MS: u64 = 300;
/// The share of that time a core must run other work to count as busy.
const BUSY_FRACTION: f64 = 0.5;

/// Which of the `allowed` cores run other work now: watched for [`BUSY_SAMPLE_MS`] through
/// `/proc/stat` (while `probe` itself sleeps).
fn busy_cores_finding(allowed: &[usize]) -> Finding {
    let before = pagewire::sys::cpu_ticks_each();
    std::thread::sleep(std::time::Duration::from_millis(BUSY_SAMPLE_MS));
    let after = pagewire::sys::cpu_ticks_each();
    let busy = match (before, after) {
        (Some(b), Some(a)) => Some(pagewire::sys::busy_cpus_between(&b, &a, BUSY_FRACTION)),
        _ => None,
    };
    busy_cores_said(allowed, busy)
}

/// The finding for `busy` (core, share of the time it ran) among the `allowed` cores.
fn busy_cores_said(allowed: &[usize], busy: Option<Vec<(usize, f64)>>) -> Finding {
    let Some(busy) = busy else {
        return finding(
            "busy cores",
            "unknown (/proc/stat cannot be read)",
            "a sender pins its shards to the allowed cores in order",
        );
    };
    let busy: Vec<(usize, f64)> = busy
        .into_iter()
        .filter(|(c, _)| allowed.is_empty() || allowed.contains(c))
        .collect();
    if busy.is_empty() {
        return finding(
            "busy cores",
            format!("none ({} ms watched)", BUSY_SAMPLE_MS),
            "a sender pins its shards to the allowed cores in order",
        );
    }
    let listed: Vec<String> = busy
        .iter()
        .map(|(c, share)| format!("core {c} {:.0}%", share * 100.0))
        .collect();
    let free: Vec<String> = allowed
        .iter()
        .filter(|c| !busy.iter().any(|(b, _)| b == *c))
        .map(usize::to_string)
        .collect();
    finding(
        "busy cores",
        format!("{} ({} ms watched)", listed.join(", "), BUSY_SAMPLE_MS),
        format!(
            "a shard pinned to a busy core waits a scheduler slice at each wake-up (with a busy \
             loop on one of two cores a live migration's downtime was 33.6 ms pinned, 4.8 ms \
             unpinned, medians of 5); a receiver's shards may use every core of their node, a \
             sender's are pinned one per core: if that work stays, {}",
            if free.is_empty() {
                "leave placement to the scheduler (`--no-pin`)".to_string()
            } else {
                format!(
                    "pin to the others (`--cores {}`) or leave placement to the scheduler (`--no-pin`)",
                    free.join(",")
                )
            }
        ),
    )
}

/// What the CPU idle setup means for a migration's pause: `governor` is the cpuidle governor in
/// use, `halt_poll_ns` the `haltpoll` module's `guest_halt_poll_ns` where it is loaded (a VM
/// guest's idle driver).
///
/// Measured on a two-core VM guest with `haltpoll` at 0 ns (README, "Why the paused round was
/// slow"): with the guest paused, a send shard waking a receive shard asleep on an idle vCPU
/// paid an interrupt through the hypervisor each time, and one channel's paused round moved
/// pages at about half a quiet session's rate. With the receive shards' own polling (as
/// shipped), 200 µs of halt polling still raised it from 788 to 968 pages per ms, and cut the
/// median downtime from 22.3 to 14.6 ms.
fn cpuidle_finding(governor: Option<&str>, halt_poll_ns: Option<u64>) -> Finding {
    let value = match (governor, halt_poll_ns) {
        (Some(g), Some(ns)) => format!("{g} governor, guest_halt_poll_ns {ns} (a VM guest)"),
        (Some(g), None) => format!("{g} governor"),
        (None, Some(ns)) => format!("guest_halt_poll_ns {ns} (a VM guest)"),
        (None, None) => "unknown (no cpuidle in sysfs)".into(),
    };
    let polls = format!(
        "receive shards poll their rings for up to {} µs during a migration's downtime, so \
         the paused round does not wait on sleeping shards",
        pagewire::limits::DOWNTIME_POLL_US
    );
    let pagewire = match halt_poll_ns {
        Some(0) => format!(
            "{polls}; idle vCPUs here halt at once, so waking a shard on an idle vCPU costs an \
             interrupt through the hypervisor: with both sides on such a VM, \
             guest_halt_poll_ns 200000 cut one channel's median pause from 22.3 to 14.6 ms \
             (README), at the cost of idle vCPUs that poll"
        ),
        Some(_) => format!("{polls}; idle vCPUs poll before they halt, which shortens wake-ups"),
        None => polls,
    };
    finding("CPU idle", value, pagewire)
}

/// What this kernel does with memory it frees: with free page reporting (a virtio-balloon
/// device offering `VIRTIO_BALLOON_F_REPORTING`), free blocks of `2^order` pages go back to
/// the hypervisor, and the next first touch of such memory costs a host fault per page.
///
/// `order`: `page_reporting_order` (absent where the kernel lacks page reporting);
/// `device_reports`: whether a bound virtio-balloon device offers reporting (`None`: no
/// such device); `min_free_ms` and `reported_kib`: the extra counters some hypervisor kernels
/// add (absent on mainline).
fn page_reporting_finding(
    order: Option<u32>,
    device_reports: Option<bool>,
    min_free_ms: Option<u64>,
    reported_kib: Option<u64>,
) -> Finding {
    const NAME: &str = "free page reporting";
    let prefault = "a receiver faults its destination in while it waits for the channels, as \
                    QEMU's -mem-prealloc does (`prefault_ms`; the demo's `setup_ms`)";
    let off = |value: &str| finding(NAME, value, "freed memory stays with this kernel");
    let on = match (order, device_reports) {
        (Some(order), Some(true)) => order,
        (Some(_), Some(false)) => return off("off (the balloon device does not offer it)"),
        (Some(_), None) => return off("off (no virtio-balloon device)"),
        (None, _) => return off("not in this kernel"),
    };
    let block_kib = 4u64 << on.min(30);
    let mut value = format!(
        "on: free blocks of {} go back to the host",
        if block_kib >= 1024 {
            format!("{} MiB", block_kib / 1024)
        } else {
            format!("{block_kib} KiB")
        }
    );
    match min_free_ms {
        Some(0) => value.push_str(" at once"),
        Some(ms) => value.push_str(&format!(" after {ms} ms free")),
        None => {}
    }
    if let Some(kib) = reported_kib {
        value.push_str(&format!(
            " ({:.1} GiB so far)",
            kib as f64 / f64::from(1 << 20)
        ));
    }
    finding(
        NAME,
        value,
        format!(
            "memory handed out after others freed it may fault in the host on first touch \
             (up to seconds per GiB; socket buffers too): {prefault}; benchmarks touch memory \
             once before they measure (README, \"A second correction\")"
        ),
    )
}

/// Whether a virtio-balloon device is bound and offers free page reporting (feature bit 5);
/// `None` where no such device is bound.
fn balloon_reports() -> Option<bool> {
    let dir = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon").ok()?;
    let mut any = None;
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("virtio") {
            continue;
        }
        // `features`: one '0'/'1' per feature bit, bit 0 first.
        let bits = read(entry.path().join("features")).unwrap_or_default();
        let reports = bits.as_bytes().get(VIRTIO_BALLOON_F_REPORTING) == Some(&b'1');
        any = Some(any.unwrap_or(false) || reports);
    }
    any
}

/// The virtio-balloon feature bit for free page reporting (virtio spec 5.5.3).
const VIRTIO_BALLOON_F_REPORTING: usize = 5;

/// Everything `probe` reports, in order.
pub fn probe() -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(finding(
        "kernel",
        read("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
        "needs io_uring (6.0+ for zero-copy sends, 6.1+ for DEFER_TASKRUN)",
    ));
    // The cores shards are pinned to (the affinity mask), which `plan`, `sweep` and
    // `--channels auto` use too; a cgroup CPU quota (which `available_parallelism` would count)
    // does not keep a pinned shard off a core.
    let allowed =
        pagewire::placement::pin_order(None, pagewire::Pinning::Cores).unwrap_or_default();
    let cores = allowed.len().max(1);
    out.push(finding(
        "cores allowed",
        cores.to_string(),
        format!(
            "one shard per channel, pinned to these cores; {} channels by default, up to {} here (`--channels N`, or `auto`, or a `sweep` profile)",
            pagewire::SenderConfig::default().channels,
            cores.min(pagewire::limits::CHANNELS_MAX)
        ),
    ));
    out.push(busy_cores_finding(&allowed));
    // The topology the shards are placed by (sysfs, or hwloc with that feature).
    let topology = Topology::detect();
    let nodes = &topology.nodes;
    out.push(finding(
        "NUMA nodes",
        if topology.source == TopologySource::Assumed {
            "1 (no NUMA information)".into()
        } else {
            nodes
                .iter()
                .map(|n| format!("node {}: cpus {}", n.id, cpu_list_text(&n.cpus)))
                .collect::<Vec<_>>()
                .join("; ")
        },
        if nodes.len() > 1 {
            "shards go to the nodes that hold guest memory, on their own cores (`pagewire-tune plan` shows where)"
        } else {
            "one node: shard i on the i-th allowed core"
        },
    ));
    match pagewire::probe_uring() {
        Ok(_) => {
            // Each opcode, setup flag and feature the engine uses, and what it does about it.
            for f in pagewire::uring_features().unwrap_or_default() {
                out.push(finding(
                    "io_uring",
                    format!("{}: {}", f.name, if f.available { "yes" } else { "no" }),
                    f.role,
                ));
            }
        }
        Err(e) => out.push(finding(
            "io_uring",
            format!("NOT usable: {e}"),
            "cannot run: every transfer needs io_uring",
        )),
    }
    let lock = memlock();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    out.push(finding(
        "memlock limit",
        lock.map_or("unlimited".into(), |b| format!("{} KiB", b / 1024)),
        if root || lock.is_none() {
            "guest memory can be registered as fixed buffers (--zero-copy on)".to_string()
        } else {
            format!(
                "registering more than {} KiB as fixed buffers needs a higher limit (ulimit -l) or CAP_IPC_LOCK; --zero-copy auto sends from unregistered memory",
                lock.unwrap_or(0) / 1024
            )
        },
    ));
    let thp = read("/sys/kernel/mm/transparent_hugepage/enabled");
    let thp_mode = thp.as_deref().and_then(selected).unwrap_or("unknown");
    out.push(finding(
        "transparent huge pages",
        format!(
            "{thp_mode} (defrag {})",
            read("/sys/kernel/mm/transparent_hugepage/defrag")
                .as_deref()
                .and_then(selected)
                .unwrap_or("unknown")
        ),
        match thp_mode {
            "never" => "anonymous memory gets 4 KiB pages (more faults and TLB misses)",
            _ => "anonymous memory is advised MADV_HUGEPAGE before it is faulted in",
        },
    ));
    let huge_total = meminfo("HugePages_Total").unwrap_or(0);
    out.push(finding(
        "huge pages (hugetlbfs)",
        format!(
            "{} of {huge_total} free, {} KiB each",
            meminfo("HugePages_Free").unwrap_or(0),
            meminfo("Hugepagesize").unwrap_or(0)
        ),
        "a RAM image on hugetlbfs or a huge=always tmpfs is mapped with huge pages by the kernel",
    ));
    let reporting = Path::new("/sys/module/page_reporting/parameters");
    let number = |name: &str| read(reporting.join(name)).and_then(|v| v.parse::<u64>().ok());
    out.push(page_reporting_finding(
        number("page_reporting_order").and_then(|o| u32::try_from(o).ok()),
        balloon_reports(),
        number("min_free_ms"),
        number("reported_kib"),
    ));
    let populate = populate_write();
    out.push(finding(
        "MADV_POPULATE_WRITE",
        if populate { "yes" } else { "no" },
        if populate {
            "destinations are faulted in ahead of the pages, one thread per core"
        } else {
            "pages fault on first touch, inside the transfer (kernel before 5.14)"
        },
    ));
    let features = cpu_features();
    let has = |f: &str| features.contains(&f);
    out.push(finding(
        "CPU features",
        if features.is_empty() {
            "none of aes, avx2, vaes, avx512".into()
        } else {
            features.join(" ")
        },
        format!(
            "zero scan {}; AES-GCM {}",
            ZeroScanner::detect().kind().name(),
            if has("vaes") && has("avx512f") {
                "with VAES (fastest)"
            } else if has("aes") {
                "with AES-NI"
            } else {
                "in software (TLS will be slow)"
            }
        ),
    ));
    let ktls = Path::new("/sys/module/tls").exists();
    out.push(finding(
        "kernel TLS",
        if ktls {
            "tls module loaded"
        } else {
            "tls module not loaded"
        },
        "not used: records are sealed in userspace (rustls) into the send buffers",
    ));
    out.push(finding(
        "network interfaces",
        if topology.nics.is_empty() {
            "none but loopback".into()
        } else {
            topology
                .nics
                .iter()
                .map(|nic| {
                    format!(
                        "{} ({}, node {})",
                        nic.name,
                        nic.speed_mbit
                            .map_or("speed unknown".into(), |s| format!("{s} Mbit/s")),
                        nic.node.map_or("unknown".into(), |n| n.to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
        "where guest memory's node is unknown, shards start on the node of the NIC towards the peer",
    ));
    out.push(match pagewire::sys::host_congestion() {
        Some((default, offered)) => finding(
            "TCP congestion control",
            format!("{default} by default (offered: {})", offered.join(", ")),
            if default == "bbr" {
                "channels use the host's default unless --congestion says; bbr paces every \
                 connection, so on short links compare with --congestion cubic"
            } else {
                "channels use the host's default unless --congestion says"
            },
        ),
        None => finding(
            "TCP congestion control",
            "unknown",
            "channels use the host's default unless --congestion says",
        ),
    });
    let governor = read("/sys/devices/system/cpu/cpuidle/current_governor_ro")
        .or_else(|| read("/sys/devices/system/cpu/cpuidle/current_governor"));
    let halt_poll_ns = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .and_then(|s| s.parse::<u64>().ok());
    out.push(cpuidle_finding(governor.as_deref(), halt_poll_ns));
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    out.push(finding(
        "/dev/kvm",
        if kvm { "usable" } else { "not usable" },
        if kvm {
            "`pagewire demo --live` runs the tiny KVM guest"
        } else {
            "`pagewire demo --live` uses the software dirtier"
        },
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_choices_name_the_selected_one() {
        assert_eq!(selected("always [madvise] never"), Some("madvise"));
        assert_eq!(selected("[never]"), Some("never"));
        assert_eq!(selected("always madvise"), None);
    }

    #[test]
    fn halt_polling_at_zero_is_named_with_the_setting_that_helps() {
        let vm = cpuidle_finding(Some("haltpoll"), Some(0));
        assert_eq!(
            vm.value,
            "haltpoll governor, guest_halt_poll_ns 0 (a VM guest)"
        );
        assert!(vm.pagewire.contains("guest_halt_poll_ns 200000"), "{vm:?}");
        let polling = cpuidle_finding(Some("haltpoll"), Some(200_000));
        assert!(!polling.pagewire.contains("200000"), "{polling:?}");
        let poll = format!("{} µs", pagewire::limits::DOWNTIME_POLL_US);
        assert!(polling.pagewire.contains(&poll), "{polling:?}");
        let metal = cpuidle_finding(Some("menu"), None);
        assert_eq!(metal.value, "menu governor");
        assert!(!metal.pagewire.contains("vCPU"), "{metal:?}");
        assert!(cpuidle_finding(None, None).value.starts_with("unknown"));
    }

    #[test]
    fn free_page_reporting_is_named_with_its_block_size_and_what_pagewire_does() {
        let on = page_reporting_finding(Some(9), Some(true), Some(0), Some(3 << 20));
        assert_eq!(
            on.value,
            "on: free blocks of 2 MiB go back to the host at once (3.0 GiB so far)"
        );
        assert!(on.pagewire.contains("prefault_ms"), "{on:?}");
        let mainline = page_reporting_finding(Some(10), Some(true), None, None);
        assert_eq!(
            mainline.value,
            "on: free blocks of 4 MiB go back to the host"
        );
        let delayed = page_reporting_finding(Some(9), Some(true), Some(2000), None);
        assert!(delayed.value.ends_with("after 2000 ms free"), "{delayed:?}");
        for off in [
            page_reporting_finding(Some(9), Some(false), Some(0), None),
            page_reporting_finding(Some(9), None, None, None),
            page_reporting_finding(None, Some(true), None, None),
        ] {
            assert!(
                off.value.starts_with("off") || off.value.starts_with("not"),
                "{off:?}"
            );
            assert!(!off.pagewire.contains("prefault_ms"), "{off:?}");
        }
    }

    #[test]
    fn busy_cores_name_the_others_to_pin_to() {
        let quiet = busy_cores_said(&[0, 1], Some(vec![]));
        assert!(quiet.value.starts_with("none"), "{quiet:?}");
        let one = busy_cores_said(&[0, 1, 2], Some(vec![(1, 0.98)]));
        assert!(one.value.starts_with("core 1 98%"), "{one:?}");
        assert!(one.pagewire.contains("`--cores 0,2`"), "{one:?}");
        // A busy core this process may not use is not its concern.
        let outside = busy_cores_said(&[0, 1], Some(vec![(5, 1.0)]));
        assert!(outside.value.starts_with("none"), "{outside:?}");
        let all = busy_cores_said(&[0, 1], Some(vec![(0, 0.6), (1, 0.7)]));
        assert!(
            all.pagewire.contains("`--no-pin`") && !all.pagewire.contains("--cores"),
            "{all:?}"
        );
        assert!(busy_cores_said(&[0], None).value.starts_with("unknown"));
    }

    #[test]
    fn the_probe_reports_every_fact_with_an_answer() {
        let found = probe();
        for name in [
            "kernel",
            "cores allowed",
            "memlock limit",
            "transparent huge pages",
            "free page reporting",
            "MADV_POPULATE_WRITE",
            "CPU features",
            "kernel TLS",
            "network interfaces",
            "TCP congestion control",
            "CPU idle",
            "busy cores",
        ] {
            let f = found
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("no {name} in {found:?}"));
            assert!(!f.value.is_empty() && !f.pagewire.is_empty(), "{f:?}");
        }
        let kernel = &found[0].value;
        assert!(
            kernel.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{kernel}"
        );
    }
}
