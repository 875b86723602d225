//! Small operating-system calls that have no safe wrapper in std: per-thread CPU time, waiting
//! for a listening socket to become readable, socket options.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
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
    let first = lines.next()?;
    let f: Vec<u64> = first
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    let cpus = lines
        .take_while(|l| l.starts_with("cpu"))
        .filter(|l| l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    Some(HostCpuTicks {
        busy,
        total: busy + at(3) + at(4),
        cpus: cpus.max(1),
    })
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

/// The address family (`AF_INET`, `AF_UNIX`, ...) and type (`SOCK_STREAM`, ...) of the socket
/// `fd`; an error when it is no socket.
pub fn socket_domain_and_type(fd: &impl AsRawFd) -> std::io::Result<(i32, i32)> {
    let get = |name: i32| -> std::io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid fd, and a pointer/length pair describing one writable c_int.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    Ok((get(libc::SO_DOMAIN)?, get(libc::SO_TYPE)?))
}

/// Reads into `buf` without taking the bytes off `stream` (`MSG_PEEK`, plus `flags`), again
/// when a signal interrupts it.
fn recv_peek(stream: &impl AsRawFd, buf: &mut [u8], flags: i32) -> std::io::Result<usize> {
    loop {
        // SAFETY: a valid fd, and a pointer/length pair describing `buf`, which is writable.
        let rc = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | flags,
            )
        };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads into `buf` without taking the bytes off `stream` (`MSG_PEEK`), blocking as a read
/// would (the socket's read timeout applies).
pub fn peek(stream: &impl AsRawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    recv_peek(stream, buf, 0)
}

/// True when `stream` has ended: a non-blocking peek (`MSG_PEEK | MSG_DONTWAIT`) reads 0 bytes
/// or fails with anything but "would block". Works for TCP and UNIX stream sockets alike.
pub fn peek_closed(stream: &impl AsRawFd) -> bool {
    match recv_peek(stream, &mut [0u8], libc::MSG_DONTWAIT) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Waits until `listener` has a connection to accept; false on timeout.
pub fn wait_acceptable(listener: &TcpListener, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `pfd` is one valid pollfd and we pass a count of 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn setsockopt_int(stream: &impl AsRawFd, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: a valid fd, and a pointer/length pair describing one c_int.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where the kernel lists the congestion control algorithms it has (Linux).
const CONGESTION_AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
/// Where the kernel names the algorithm new TCP sockets get.
const CONGESTION_DEFAULT: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

/// Sets the TCP congestion control algorithm of one socket (`TCP_CONGESTION`). The kernel
/// refuses a name it does not have (`ENOENT`) and, for a process without `CAP_NET_ADMIN`, one
/// not listed in `tcp_allowed_congestion_control` (`EPERM`).
pub fn set_tcp_congestion(stream: &impl AsRawFd, name: &str) -> std::io::Result<()> {
    // SAFETY: a valid fd, and a pointer/length pair describing `name`'s bytes (the kernel
    // copies at most TCP_CA_NAME_MAX of them and needs no terminator).
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The congestion control algorithm a TCP socket uses; `None` when the kernel does not say.
pub fn tcp_congestion(stream: &impl AsRawFd) -> Option<String> {
    let mut buf = [0u8; 32];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: a valid fd, and a buffer/length pair the kernel fills with at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let name = &buf[..(len as usize).min(buf.len())];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned()).filter(|n| !n.is_empty())
}

/// The host's TCP congestion control: the default new sockets get, and every algorithm the
/// kernel offers now; `None` where `/proc` does not say.
pub fn host_congestion() -> Option<(String, Vec<String>)> {
    let default = std::fs::read_to_string(CONGESTION_DEFAULT).ok()?;
    let available = std::fs::read_to_string(CONGESTION_AVAILABLE).ok()?;
    Some((
        default.trim().to_string(),
        available.split_whitespace().map(str::to_string).collect(),
    ))
}

/// Turns on TCP keepalive probing after `idle_s` seconds of silence, every `interval_s`, giving
/// up after `count` unanswered probes: a receiver waiting for its next frame notices a sender
/// host that vanished without a FIN.
pub fn set_keepalive(
    stream: &impl AsRawFd,
    idle_s: i32,
    interval_s: i32,
    count: i32,
) -> std::io::Result<()> {
    setsockopt_int(stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle_s)?;
    setsockopt_int(stream, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, interval_s)?;
    setsockopt_int(stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count)
}

/// Sets `TCP_USER_TIMEOUT` (how long sent data may stay unacknowledged before the kernel gives
/// up on the connection), so a vanished host fails the transfer in bounded time.
pub fn set_tcp_user_timeout(stream: &impl AsRawFd, ms: u32) -> std::io::Result<()> {
    let ms = i32::try_from(ms).unwrap_or(i32::MAX);
    setsockopt_int(stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

/// What the kernel measured of a TCP connection's recent delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Bytes per second the peer acknowledged, recently (`tcpi_delivery_rate`).
    pub bytes_per_s: u64,
    /// True when the sample was limited by the application not sending enough, not by the link.
    pub app_limited: bool,
}

/// Reads the kernel's delivery-rate estimate of `stream` (Linux 4.9+); `None` when unavailable.
pub fn tcp_delivery(stream: &impl AsRawFd) -> Option<Delivery> {
    const SIZE: usize = std::mem::size_of::<libc::tcp_info>();
    let mut buf = [0u8; SIZE];
    let mut len = SIZE as libc::socklen_t;
    // SAFETY: a valid fd, and a buffer/length pair the kernel fills with at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let at = std::mem::offset_of!(libc::tcp_info, tcpi_delivery_rate);
    if rc != 0 || (len as usize) < at + 8 {
        return None;
    }
    let mut rate = [0u8; 8];
    rate.copy_from_slice(&buf[at..at + 8]);
    Some(Delivery {
        bytes_per_s: u64::from_ne_bytes(rate),
        // Byte 7 of struct tcp_info holds the bitfield `tcpi_delivery_rate_app_limited:1` (libc's
        // struct shows it as padding, hence the byte buffer).
        app_limited: buf[7] & 1 != 0,
    })
}

/// Bytes the kernel has received on `stream` so far (`tcpi_bytes_received`, Linux 4.1+): the
/// idle bound's measure of progress, which a pending `MSG_WAITALL` receive does not show. 0 when
/// unavailable (the bound then runs from the last completed receive).
pub fn tcp_bytes_received(stream: &impl AsRawFd) -> u64 {
    // SAFETY: all-zero is a valid tcp_info (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, and a pointer/length pair describing `info`, which the kernel fills
    // with at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    if rc != 0 || (len as usize) < end {
        return 0;
    }
    info.tcpi_bytes_received
}

/// The NUMA node of each page at `pages` (page-aligned addresses in this process), as
/// `move_pages(2)` reports it without moving anything: a node number, or a negative errno
/// (`-ENOENT`: not faulted in yet; `-EFAULT`: not mapped). An error when the call itself fails
/// (a kernel without NUMA support answers `ENOSYS`).
pub fn page_nodes(pages: &[*const u8]) -> std::io::Result<Vec<i32>> {
    let mut status = vec![0i32; pages.len()];
    // SAFETY: `pages` and `status` hold `pages.len()` entries; with null `nodes` the kernel reads
    // the addresses (dereferencing none) and writes an int per entry to `status`; pid 0: this one.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(status)
}

/// Nodes a NUMA memory policy names at most here (the mask's bits).
const POLICY_NODES_MAX: usize = 1024;

/// The node the memory policy of the mapping at `addr` puts its pages on, before they are
/// faulted in (`get_mempolicy(2)` with `MPOL_F_ADDR`): the one node of an `MPOL_BIND` or
/// `MPOL_PREFERRED` policy over one node (a VMM's `host-nodes=N,policy=bind`). `None` for the
/// default policy (the faulting thread's node), interleaving, several nodes, or an error.
pub fn policy_node(addr: *const u8) -> Option<u32> {
    const MPOL_PREFERRED: i32 = 1;
    const MPOL_BIND: i32 = 2;
    const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
    let mut mode: i32 = 0;
    let mut mask = [0 as libc::c_ulong; POLICY_NODES_MAX / libc::c_ulong::BITS as usize];
    // SAFETY: `mode` and `mask` (POLICY_NODES_MAX bits) are valid for the kernel's writes;
    // with MPOL_F_ADDR the kernel only looks `addr` up among this process' mappings.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut i32,
            mask.as_mut_ptr(),
            POLICY_NODES_MAX as libc::c_ulong,
            addr as usize as libc::c_ulong,
            MPOL_F_ADDR,
        )
    };
    // Mode flags ride in the high bits. With MPOL_F_RELATIVE_NODES the mask is relative to
    // the cpuset's nodes (bit 0: its first), not node numbers.
    const MPOL_F_RELATIVE_NODES: i32 = 1 << 14;
    if rc != 0
        || mode & MPOL_F_RELATIVE_NODES != 0
        || !matches!(mode & 0xff, MPOL_PREFERRED | MPOL_BIND)
    {
        return None;
    }
    let mut nodes = mask.iter().enumerate().flat_map(|(w, &bits)| {
        (0..libc::c_ulong::BITS)
            .filter(move |b| bits >> b & 1 == 1)
            .map(move |b| w as u32 * libc::c_ulong::BITS + b)
    });
    match (nodes.next(), nodes.next()) {
        (Some(n), None) => Some(n),
        _ => None,
    }
}

/// Whether the page at `page` (a page-aligned address in this process) is in memory now
/// (`mincore(2)`): for a file mapping, whether the page cache holds it. False when the call
/// fails.
pub fn page_resident(page: *const u8) -> bool {
    let mut vec = [0u8; 1];
    // SAFETY: one page from a page-aligned address, and a one-byte vector for it; mincore only
    // writes the vector (an unmapped address is an error, not a fault).
    let rc = unsafe { libc::mincore(page.cast_mut().cast(), 4096, vec.as_mut_ptr()) };
    rc == 0 && vec[0] & 1 != 0
}

/// The name of the network interface that holds the local address `addr` (`getifaddrs(3)`),
/// e.g. the interface a connected socket's `local_addr()` leaves through.
pub fn interface_with_address(addr: std::net::IpAddr) -> Option<String> {
    // A dual-stack socket names an IPv4 peer's address as `::ffff:a.b.c.d`; interfaces list
    // it as IPv4.
    let addr = addr.to_canonical();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut at = list;
    while !at.is_null() && found.is_none() {
        // SAFETY: `at` is a node of getifaddrs' list, alive until freeifaddrs; `ifa_addr` is null
        // or a sockaddr of the family it names, `ifa_name` a NUL-terminated string.
        unsafe {
            let ifa = &*at;
            if !ifa.ifa_addr.is_null() {
                let family = i32::from((*ifa.ifa_addr).sa_family);
                let here = match family {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(std::net::IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(std::net::IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if here == Some(addr) {
                    found = Some(
                        std::ffi::CStr::from_ptr(ifa.ifa_name)
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
            at = ifa.ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(list) };
    found
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
    fn memory_bound_to_a_node_names_it_before_any_page_is_touched() {
        let len = 4 << 20;
        let m = crate::GuestMemory::anonymous(&[crate::RegionSpec { gpa: 0, len }]).unwrap();
        let addr = m.regions()[0].host_addr();
        assert_eq!(policy_node(addr), None, "the default policy names no node");
        // Node 0 only.
        let mask: libc::c_ulong = 1;
        // SAFETY: `addr..addr + len` is this test's own mapping; the mask holds one word.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                addr,
                len as libc::c_ulong,
                2, // MPOL_BIND
                &mask as *const libc::c_ulong,
                libc::c_ulong::BITS as libc::c_ulong,
                0,
            )
        };
        if rc != 0 {
            println!(
                "skipped: mbind fails here ({})",
                std::io::Error::last_os_error()
            );
            return;
        }
        assert_eq!(policy_node(addr), Some(0));
        assert_eq!(policy_node(addr.wrapping_add(len as usize / 2)), Some(0));
        // Untouched, so move_pages knows no node; the placement's query takes the policy's.
        if let Ok(status) = page_nodes(&[addr.cast_const()]) {
            assert!(status[0] < 0, "untouched: {status:?}");
            let map = crate::placement::MemoryNodes::query(&m, false);
            assert_eq!(map.node_of(0, 0), Some(0), "{map:?}");
        }
    }

    #[test]
    fn the_loopback_interface_is_found_by_either_form_of_its_address() {
        let lo = interface_with_address("127.0.0.1".parse().unwrap());
        assert!(lo.is_some(), "loopback has 127.0.0.1");
        // A dual-stack listener's view of an IPv4 connection.
        assert_eq!(
            interface_with_address("::ffff:127.0.0.1".parse().unwrap()),
            lo
        );
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
