//! Helpers for pagewire's end-to-end tests: run a loopback transfer, bound every wait.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagewire::synth::{self, Content};
use pagewire::tls::certs::{self, CertOptions};
use pagewire::tls::{TlsClient, TlsServer};
use pagewire::{
    GuestMemory, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig, TransferStats,
};

/// The receiver's and the sender's TLS identities from fresh certificates written to `dir`
/// (the sender checks the name `localhost`), or none without `tls`.
pub fn tls_identities(dir: &std::path::Path, tls: bool) -> (Option<TlsServer>, Option<TlsClient>) {
    if !tls {
        return (None, None);
    }
    certs::generate(&CertOptions::default())
        .and_then(|set| set.write(dir))
        .expect("writing test certificates");
    let server = TlsServer::new(certs::server_files(dir).load().expect("server identity"))
        .expect("a TLS server");
    let client = TlsClient::new(
        certs::client_files(dir).load().expect("client identity"),
        "localhost",
    )
    .expect("a TLS client");
    (Some(server), Some(client))
}

/// Prints why a test is skipped and returns true when io_uring is unusable here.
pub fn skip_without_uring() -> bool {
    match pagewire::probe_uring() {
        Ok(_) => false,
        Err(e) => {
            eprintln!("SKIPPED: io_uring is not usable on this machine: {e}");
            true
        }
    }
}

/// True (after printing why) when `/dev/kvm` cannot run a VM here: the caller skips.
pub fn skip_without_kvm() -> bool {
    match kvm_ioctls::Kvm::new().and_then(|kvm| kvm.create_vm().map(drop)) {
        Ok(()) => false,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm cannot create a VM here: {e}");
            true
        }
    }
}

/// Joins `handle`, failing the test if it takes longer than `limit` (no hangs in the suite).
pub fn join_within<T>(handle: JoinHandle<T>, limit: Duration, what: &str) -> T {
    let start = Instant::now();
    while !handle.is_finished() {
        assert!(
            start.elapsed() < limit,
            "{what} did not finish within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.join().expect("thread panicked")
}

/// Anonymous guest memory: one region of `len` bytes at guest-physical 0.
pub fn memory(len: u64) -> Arc<GuestMemory> {
    Arc::new(GuestMemory::anonymous(&[RegionSpec { gpa: 0, len }]).expect("anonymous memory"))
}

/// Connects to the receiver at `addr`, sends all of `src` in one round and finishes: the
/// sender's statistics, or its error.
pub fn send_all_to(
    addr: SocketAddr,
    src: Arc<GuestMemory>,
    config: &SenderConfig,
) -> pagewire::Result<TransferStats> {
    let mut s = Sender::connect(addr, src, config)?;
    s.send_all()?;
    s.finish()
}

/// Starts a receiver into `dst` on loopback; returns its address and its thread.
pub fn start_receiver(
    dst: Arc<GuestMemory>,
    config: ReceiverConfig,
) -> (
    std::net::SocketAddr,
    JoinHandle<pagewire::Result<TransferStats>>,
) {
    let config = ReceiverConfig {
        accept_timeout_ms: Some(config.accept_timeout_ms.unwrap_or(20_000)),
        ..config
    };
    let receiver = Receiver::bind("127.0.0.1:0", dst, config).expect("bind loopback");
    let addr = receiver.local_addr().expect("local addr");
    (addr, std::thread::spawn(move || receiver.run()))
}

/// Sends all of `src` into `dst` over loopback, unpinned, on `channels` channels with the
/// identities [`tls_identities`] gave: the sender's result and the receiver's, both joined
/// within `limit` (for transfers expected to fail, whose errors the caller checks).
pub fn transfer_unpinned(
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    channels: u16,
    (server, client): (Option<TlsServer>, Option<TlsClient>),
    limit: Duration,
) -> (
    pagewire::Result<TransferStats>,
    pagewire::Result<TransferStats>,
) {
    let (addr, rx) = start_receiver(
        dst,
        ReceiverConfig {
            tls: server,
            pinning: pagewire::Pinning::None,
            ..ReceiverConfig::default()
        },
    );
    let config = SenderConfig {
        channels,
        pinning: pagewire::Pinning::None,
        tls: client,
        ..SenderConfig::default()
    };
    let tx = std::thread::spawn(move || send_all_to(addr, src, &config));
    let sent = join_within(tx, limit, "sender");
    (sent, join_within(rx, limit, "receiver"))
}

/// Fills a fresh memory with `content`, migrates it in one round over loopback, and returns
/// source, destination and both sides' statistics.
pub fn migrate_once(
    specs: &[RegionSpec],
    content: Content,
    sender: &SenderConfig,
) -> (
    Arc<GuestMemory>,
    Arc<GuestMemory>,
    TransferStats,
    TransferStats,
) {
    let src = Arc::new(GuestMemory::anonymous(specs).expect("source memory"));
    synth::fill(&src, content, 42);
    let dst = Arc::new(GuestMemory::anonymous(specs).expect("destination memory"));
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    let mut s = Sender::connect(addr, src.clone(), sender).expect("connect");
    s.send_all().expect("send round");
    let sent = s.finish().expect("finish");
    let received = join_within(rx, Duration::from_secs(60), "receiver").expect("receive");
    (src, dst, sent, received)
}

/// What the proxy does to the client-to-server stream.
#[derive(Debug, Clone, Copy)]
pub enum Tamper {
    /// Flip the lowest bit of the byte at this offset.
    Flip(usize),
    /// Forward this many bytes, then cut both directions.
    Cut(usize),
    /// Forward everything, at most this many bytes per second (a slow path).
    Slow(u64),
}

/// The receive buffer of a [`Tamper::Slow`] proxy's client side, bytes.
const SLOW_PATH_RECEIVE_BUFFER_BYTES: libc::c_int = 256 << 10;

/// Sets `SO_RCVBUF` on `listener` (see [`pagewire::sys::set_receive_buffer`]); a failure
/// leaves the default, which only makes the slow path hold more.
fn set_receive_buffer(listener: &TcpListener, bytes: libc::c_int) {
    if let Err(e) = pagewire::sys::set_receive_buffer(listener, bytes) {
        eprintln!("the slow proxy keeps the default receive buffer: {e}");
    }
}

/// Forwards both directions between a client and `server`, tampering with the client's stream.
pub fn tampering_proxy(server: SocketAddr, tamper: Tamper) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let addr = listener.local_addr().expect("proxy address");
    if matches!(tamper, Tamper::Slow(_)) {
        // A fixed receive buffer (inherited by the accepted socket): what the slow path holds
        // does not grow with the host's `tcp_rmem`.
        set_receive_buffer(&listener, SLOW_PATH_RECEIVE_BUFFER_BYTES);
    }
    std::thread::spawn(move || {
        let Ok((client, _)) = listener.accept() else {
            return;
        };
        let Ok(upstream) = TcpStream::connect(server) else {
            return;
        };
        let (Ok(mut c_read), Ok(mut u_write)) = (client.try_clone(), upstream.try_clone()) else {
            return;
        };
        let (mut u_read, mut c_write) = (upstream, client);
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = u_read.read(&mut buf) {
                if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = c_write.shutdown(std::net::Shutdown::Both);
        });
        let mut seen = 0usize;
        let mut buf = [0u8; 65536];
        let started = Instant::now();
        // A slow path reads little at a time, so its pace is even.
        let read_max = match tamper {
            Tamper::Slow(_) => 8192,
            _ => buf.len(),
        };
        while let Ok(n) = c_read.read(&mut buf[..read_max]) {
            if n == 0 {
                break;
            }
            let mut n = n;
            match tamper {
                Tamper::Flip(at) if (seen..seen + n).contains(&at) => buf[at - seen] ^= 0x01,
                Tamper::Cut(at) if seen + n >= at => n = at - seen,
                _ => {}
            }
            seen += n;
            if let Tamper::Slow(bytes_per_s) = tamper {
                let due = Duration::from_secs_f64(seen as f64 / bytes_per_s.max(1) as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            if u_write.write_all(&buf[..n]).is_err() {
                break;
            }
            if matches!(tamper, Tamper::Cut(at) if seen >= at) {
                break;
            }
        }
        // A slow path is a path, not a tap: the client's end of stream reaches the server as
        // its end of stream, and what the server says after that still travels back (its
        // thread above closes the client side once the server closes). The other kinds cut.
        let how = match tamper {
            Tamper::Slow(_) => std::net::Shutdown::Write,
            _ => std::net::Shutdown::Both,
        };
        let _ = u_write.shutdown(how);
    });
    addr
}
