//! Helpers for pagewire's end-to-end tests: run a loopback transfer, bound every wait.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagewire::synth::{self, Content};
use pagewire::{
    GuestMemory, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig, TransferStats,
};

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
