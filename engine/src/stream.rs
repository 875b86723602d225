//! A channel's connection: TCP, or a UNIX stream socket that a VMM or management software
//! connected and handed in (QEMU and libvirt pass migration sockets as file descriptors).
//!
//! The shards drive either with the same io_uring operations (send, receive, zero-copy sends
//! where the kernel offers them); what differs is only what a kind of socket supports: TCP
//! gets `TCP_NODELAY`, keepalive probes and `TCP_USER_TIMEOUT` (a vanished host fails in
//! bounded time) and reports its delivery rate; a UNIX socket is local by nature, so a peer
//! that vanishes closes it, and the idle bound covers a peer that stops.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::limits::{
    TCP_KEEPALIVE_IDLE_S, TCP_KEEPALIVE_INTERVAL_S, TCP_KEEPALIVE_PROBES, TCP_USER_TIMEOUT_MS,
};

/// A connected stream socket carrying one channel.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A UNIX stream socket (a socketpair or a connected `AF_UNIX` socket).
    Unix(UnixStream),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

impl Stream {
    /// The stream of a connected socket handed in as a descriptor (a VMM's or management
    /// software's): TCP over IPv4 or IPv6, or a UNIX stream socket. Anything else (a file, a
    /// datagram socket) is refused, and the descriptor closed. A socket an event loop left
    /// non-blocking is made blocking: the handshakes read and write it that way.
    pub fn from_fd(fd: OwnedFd) -> Result<Stream> {
        let (domain, kind) = crate::sys::socket_domain_and_type(&fd)
            .map_err(|e| Error::io("reading a handed-in descriptor's socket type", e))?;
        if kind != libc::SOCK_STREAM {
            return Err(Error::Config(
                "a handed-in descriptor is not a stream socket".into(),
            ));
        }
        let stream = match domain {
            libc::AF_INET | libc::AF_INET6 => Stream::Tcp(TcpStream::from(fd)),
            libc::AF_UNIX => Stream::Unix(UnixStream::from(fd)),
            other => {
                return Err(Error::Config(format!(
                    "a handed-in descriptor is a socket of family {other}, neither TCP nor UNIX"
                )))
            }
        };
        match &stream {
            Stream::Tcp(s) => s.set_nonblocking(false),
            Stream::Unix(s) => s.set_nonblocking(false),
        }
        .map_err(|e| Error::io("making a handed-in socket blocking", e))?;
        Ok(stream)
    }

    /// Options every channel gets: for TCP, no Nagle delay for markers, keepalive for silent
    /// peers and bounded time for unacknowledged data; a UNIX socket needs none.
    pub(crate) fn configure(&self) -> Result<()> {
        let Stream::Tcp(s) = self else {
            return Ok(());
        };
        s.set_nodelay(true)
            .map_err(|e| Error::io("setting TCP_NODELAY", e))?;
        crate::sys::set_keepalive(
            s,
            TCP_KEEPALIVE_IDLE_S,
            TCP_KEEPALIVE_INTERVAL_S,
            TCP_KEEPALIVE_PROBES,
        )
        .map_err(|e| Error::io("setting TCP keepalive", e))?;
        crate::sys::set_tcp_user_timeout(s, TCP_USER_TIMEOUT_MS)
            .map_err(|e| Error::io("setting TCP_USER_TIMEOUT", e))
    }

    /// Sets this TCP connection's congestion control algorithm (nothing for a UNIX socket). An
    /// error names the algorithms the kernel offers.
    pub(crate) fn set_congestion(&self, name: &str) -> Result<()> {
        let Stream::Tcp(s) = self else {
            return Ok(());
        };
        crate::sys::set_tcp_congestion(s, name).map_err(|e| {
            let offered = crate::sys::host_congestion()
                .map_or_else(|| "unknown".into(), |(_, all)| all.join(", "));
            Error::Config(format!(
                "TCP congestion control {name:?} cannot be used here ({e}; this kernel offers: \
                 {offered})"
            ))
        })
    }

    /// The congestion control algorithm this TCP connection uses (`None` for a UNIX socket).
    pub fn congestion(&self) -> Option<String> {
        crate::sys::tcp_congestion(self.tcp()?)
    }

    /// The TCP connection, if this is one.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }

    /// The network interface this TCP connection leaves through (its local address's
    /// interface: `lo` on loopback); `None` for a UNIX socket.
    pub fn interface(&self) -> Option<String> {
        let local = self.tcp()?.local_addr().ok()?.ip();
        crate::sys::interface_with_address(local)
    }

    /// A description of the peer for messages: its address, or the socket's path.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "an unknown TCP peer".into(), |a| a.to_string()),
            Stream::Unix(s) => match s
                .peer_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(path) => format!("unix:{path}"),
                None => "unix:(unnamed)".into(),
            },
        }
    }

    /// True when the peer runs on this host: a UNIX socket, or TCP to a loopback address or to
    /// this end's own address.
    pub fn peer_on_this_host(&self) -> bool {
        match self {
            Stream::Tcp(s) => match (s.peer_addr(), s.local_addr()) {
                (Ok(peer), Ok(local)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
                _ => false,
            },
            Stream::Unix(_) => true,
        }
    }

    /// True when this end is on this host only: a UNIX socket, or TCP on a loopback address.
    pub fn is_local(&self) -> Result<bool> {
        match self {
            Stream::Tcp(s) => s
                .local_addr()
                .map(|a| a.ip().is_loopback())
                .map_err(|e| Error::io("reading a connection's address", e)),
            Stream::Unix(_) => Ok(true),
        }
    }

    /// Sets the timeout of blocking reads (`None`: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the timeout of blocking writes (`None`: wait forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Shuts down reading, writing or both.
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// A second handle to the same socket.
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    /// Reads into `buf` without consuming (`MSG_PEEK`); the read timeout applies.
    pub fn peek(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        crate::sys::peek(self, buf)
    }

    /// True when the stream has ended: a non-blocking peek reads nothing or fails for good.
    pub(crate) fn closed(&self) -> bool {
        crate::sys::peek_closed(self)
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_pair_reads_writes_and_reports_its_end() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Stream::from(a), Stream::from(b));
        assert!(a.is_local().unwrap());
        assert_eq!(a.peer(), "unix:(unnamed)");
        a.configure().unwrap();
        (&a).write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        (&b).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert!(!b.closed());
        drop(a);
        assert!(b.closed());
    }

    #[test]
    fn descriptors_are_taken_by_their_socket_family() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            Stream::from_fd(OwnedFd::from(a)).unwrap(),
            Stream::Unix(_)
        ));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(matches!(
            Stream::from_fd(OwnedFd::from(c)).unwrap(),
            Stream::Tcp(_)
        ));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(Stream::from_fd(OwnedFd::from(file)).is_err());
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = Stream::from_fd(OwnedFd::from(udp)).unwrap_err();
        assert!(e.to_string().contains("not a stream socket"), "{e}");
    }

    #[test]
    fn tcp_on_loopback_is_local() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = Stream::from(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        let (s, _) = l.accept().unwrap();
        assert!(c.is_local().unwrap());
        assert!(c.tcp().is_some());
        assert_eq!(c.peer(), l.local_addr().unwrap().to_string());
        drop(s);
        assert!(
            (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(5));
                c.closed()
            }),
            "a closed TCP peer is noticed"
        );
    }
}
