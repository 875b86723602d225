//! Sockets: what a handed-in descriptor is, peeking, waiting for a listener, connecting
//! cancellably, TCP options
//! (congestion control, keepalive, user timeout), `TCP_INFO` figures, and which interface holds
//! an address.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::Duration;

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
    poll_one(listener, libc::POLLIN, timeout)
}

/// Waits up to `timeout` for `fd` to have one of `events` (or an error or hang-up); true when it
/// does.
fn poll_one(fd: &impl AsRawFd, events: libc::c_short, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
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

/// Connects a TCP socket to `addr`, giving up at `deadline` (`TimedOut`) or as soon as
/// `cancelled()` says so (`Interrupted`), which it asks every
/// [`HANDSHAKE_WATCH_SLICE_MS`](crate::limits::HANDSHAKE_WATCH_SLICE_MS): a blocking connect to
/// a host that drops the SYNs could not be cancelled for its whole timeout. The socket is
/// blocking once connected, and closed on exec.
pub fn connect_cancellable(
    addr: &std::net::SocketAddr,
    deadline: std::time::Instant,
    cancelled: impl Fn() -> bool,
) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    match socket.connect(&(*addr).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => loop {
            if cancelled() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "cancelled while connecting",
                ));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
            }
            // (At least a millisecond: poll counts whole ones, and 0 would spin.)
            let slice = left
                .min(Duration::from_millis(
                    crate::limits::HANDSHAKE_WATCH_SLICE_MS,
                ))
                .max(Duration::from_millis(1));
            if poll_one(&socket, libc::POLLOUT, slice)? {
                break;
            }
        },
        Err(e) => return Err(e),
    }
    // Writable: connected, or refused (the error is the socket's); a hang-up without one is
    // no connection either.
    if let Some(e) = socket.take_error()? {
        return Err(e);
    }
    socket.peer_addr()?;
    socket.set_nonblocking(false)?;
    Ok(socket.into())
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

/// Sets `SO_RCVBUF` (the kernel doubles `bytes` for its bookkeeping and stops autotuning the
/// socket's receive buffer); set on a listener, accepted sockets inherit it.
pub fn set_receive_buffer(socket: &impl AsRawFd, bytes: i32) -> std::io::Result<()> {
    setsockopt_int(socket, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)
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
    fn the_loopback_interface_is_found_by_either_form_of_its_address() {
        let lo = interface_with_address("127.0.0.1".parse().unwrap());
        assert!(lo.is_some(), "loopback has 127.0.0.1");
        // A dual-stack listener's view of an IPv4 connection.
        assert_eq!(
            interface_with_address("::ffff:127.0.0.1".parse().unwrap()),
            lo
        );
    }
}
