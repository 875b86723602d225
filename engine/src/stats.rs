//! Transfer statistics, named after QEMU's `query-migrate` where one fits (`total-time`,
//! `transferred`, `normal`, `duplicate`, `normal-bytes`, `mbps`), plus per-shard figures, CPU
//! time and zero-copy outcomes.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters a progress bar can read while a transfer runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Pages queued for the transfer so far (grows with each round).
    pub pages_total: AtomicU64,
    /// Pages sent (sender) or placed (receiver).
    pub pages_done: AtomicU64,
    /// Bytes put on (or taken off) the wire.
    pub wire_bytes: AtomicU64,
    /// Of [`wire_bytes`](Self::wire_bytes), the device state's (a live migration's blobs,
    /// chunk headers included): nonzero once the source's guest is paused and its device
    /// state is on its way.
    pub device_state_bytes: AtomicU64,
}

impl Progress {
    /// (done, total) pages.
    pub fn pages(&self) -> (u64, u64) {
        (
            self.pages_done.load(Ordering::Relaxed),
            self.pages_total.load(Ordering::Relaxed),
        )
    }
}

/// One shard's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardStats {
    /// Channel index.
    pub channel: u16,
    /// CPU core the shard was pinned to, if any (`Pinning::Cores`; none under
    /// `Pinning::Nodes`, the receiver's default, whose shards may use every core of their node).
    pub core: Option<usize>,
    /// NUMA node the shard was placed on, if it was placed (one core, or a node's cores) and
    /// the node is known.
    pub node: Option<u32>,
    /// Bytes on the wire (headers and payload).
    pub wire_bytes: u64,
    /// Frames, markers included.
    pub frames: u64,
    /// Normal pages.
    pub normal_pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Milliseconds the shard had work (wall time not spent idle waiting for work).
    pub busy_ms: f64,
    /// CPU milliseconds the shard thread used.
    pub cpu_ms: f64,
    /// Minor page faults the shard thread took during the transfer (first touches of memory
    /// not faulted in before: a destination not pre-faulted, a RAM image not yet mapped).
    pub faults_minor: u64,
    /// Major page faults (waits for I/O: a RAM image on disk not in the page cache).
    pub faults_major: u64,
    /// Zero-copy sends whose notification arrived.
    pub zc_completed: u64,
    /// Of those, sends the kernel copied anyway (loopback, veth, no NIC support).
    pub zc_copied: u64,
    /// True when the shard switched to plain sends because the kernel kept copying.
    pub zc_fallback: bool,
    /// True when guest memory was registered as fixed buffers on this shard's ring.
    pub fixed_buffers: bool,
    /// Frames whose payload travelled compressed.
    pub compressed_frames: u64,
    /// Receiver: pages of live rounds that did not match their checksum (torn by a vCPU write
    /// during the send); they stay un-placed until they arrive intact.
    pub torn_pages: u64,
    /// Bytes of normal pages in those frames, before compression.
    pub compressed_raw_bytes: u64,
    /// Plaintext without page checksums: this channel's pages were covered by TCP's checksum
    /// only ([`crate::SenderConfig::page_checksums`] off).
    pub unchecked_pages: bool,
    /// Receiver, TLS: payload bytes opened straight into destination memory (the rest was
    /// opened in the staging slot and copied; see `tls::direct`).
    pub tls_direct_bytes: u64,
    /// Bytes of those frames' payloads after compression.
    pub compressed_bytes: u64,
    /// Receiver: a live migration's downtime began on this channel (pages sent with the vCPUs
    /// paused followed live ones here), so its waits poll before they sleep from then on
    /// ([`DOWNTIME_POLL_US`](crate::limits::DOWNTIME_POLL_US)). A channel that carries none
    /// of the last round's pages does not see it begin.
    pub downtime_began: bool,
    /// Sender: when the receiver's `Done` arrived on this channel, the moment the destination
    /// was known to hold every page, verified (before the connection's close and this shard's
    /// teardown). Not serialised: an instant means nothing outside this process.
    #[serde(skip)]
    pub confirmed_at: Option<std::time::Instant>,
}

/// Zero-copy totals over all shards.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ZeroCopyStats {
    /// Zero-copy sends completed (notification seen).
    pub completed: u64,
    /// Zero-copy sends the kernel reported as copied.
    pub copied: u64,
    /// Shards that fell back to plain sends.
    pub fallbacks: u64,
}

/// Statistics of one side of a finished transfer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransferStats {
    /// Wall time from the first connection to the end, in milliseconds (`total-time`).
    pub total_time_ms: f64,
    /// Receiver: milliseconds it spent faulting destination memory in, in the background while
    /// it waited for the sender's channels (see `ReceiverConfig::prefault`); pages it had not
    /// reached by then faulted on first touch (`page_faults_minor`).
    pub prefault_ms: f64,
    /// Bytes on the wire, headers included (`transferred`): frames, as sent. Under TLS the
    /// sender counts the records that carry them, framing included; the receiver, which
    /// opens them, counts the frames inside.
    pub transferred_bytes: u64,
    /// Pages sent with their contents (`normal`).
    pub normal_pages: u64,
    /// Zero pages sent as a header entry only (`duplicate`).
    pub zero_pages: u64,
    /// Bytes of normal pages (`normal-bytes`).
    pub normal_bytes: u64,
    /// Wire megabits per second over the total time (`mbps`, which QEMU computes from the
    /// bytes it transferred: a zero page counts its header entry, not 4 KiB).
    /// [`gib_per_s`](Self::gib_per_s) is the guest memory moved.
    pub mbps: f64,
    /// Guest memory moved per second, in GiB.
    pub gib_per_s: f64,
    /// Rounds completed.
    pub rounds: u32,
    /// Channels used.
    pub channels: u16,
    /// CPU milliseconds used by this side (shards plus coordinator; in a live migration's
    /// report the coordinator is the migrating thread for the whole run).
    pub cpu_ms: f64,
    /// CPU seconds per GiB of guest memory moved.
    pub cpu_s_per_gib: f64,
    /// Minor page faults of all shard threads during the transfer.
    pub page_faults_minor: u64,
    /// Major page faults of all shard threads during the transfer.
    pub page_faults_major: u64,
    /// Zero-copy outcomes.
    pub zero_copy: ZeroCopyStats,
    /// Zero-scan implementation used.
    pub zero_scan: &'static str,
    /// Frames sent compressed, over all shards.
    pub compressed_frames: u64,
    /// Receiver: pages of live rounds refused by their checksum (torn, resent later).
    pub torn_pages: u64,
    /// Plaintext pages travelled without page checksums, covered by TCP's checksum only
    /// ([`crate::SenderConfig::page_checksums`] off): the receiver placed every page but could
    /// not verify them. False when every page was checked (a checksum, or TLS's AEAD).
    pub unchecked_pages: bool,
    /// Normal bytes / compressed bytes over the compressed frames (1.0 when none were).
    pub compression_ratio: f64,
    /// Whether rings ran with DEFER_TASKRUN.
    pub defer_taskrun: bool,
    /// Sender: the TCP congestion control algorithm its channels used (`None` over UNIX
    /// sockets, and on the receiver).
    pub congestion: Option<String>,
    /// Per-shard figures.
    pub shards: Vec<ShardStats>,
}

impl TransferStats {
    /// Replaces the coordinating thread's share of [`TransferStats::cpu_ms`] (and with it
    /// `cpu_s_per_gib`) by `coordinator_cpu_ms`, a figure that covers more of its work.
    pub(crate) fn count_coordinator_cpu(&mut self, coordinator_cpu_ms: f64) {
        let shards: f64 = self.shards.iter().map(|s| s.cpu_ms).sum();
        let moved_gib = ((self.normal_pages + self.zero_pages) * crate::limits::PAGE_BYTES as u64)
            as f64
            / (1u64 << 30) as f64;
        self.cpu_ms = shards + coordinator_cpu_ms;
        if moved_gib > 0.0 {
            self.cpu_s_per_gib = self.cpu_ms / 1e3 / moved_gib;
        }
    }

    /// Fills the totals from the shards and the elapsed time.
    pub(crate) fn finalize(&mut self, elapsed_s: f64, coordinator_cpu_ms: f64) {
        self.total_time_ms = elapsed_s * 1e3;
        self.transferred_bytes = self.shards.iter().map(|s| s.wire_bytes).sum();
        self.normal_pages = self.shards.iter().map(|s| s.normal_pages).sum();
        self.zero_pages = self.shards.iter().map(|s| s.zero_pages).sum();
        self.normal_bytes = self.normal_pages * crate::limits::PAGE_BYTES as u64;
        let moved = (self.normal_pages + self.zero_pages) * crate::limits::PAGE_BYTES as u64;
        if elapsed_s > 0.0 {
            self.mbps = self.transferred_bytes as f64 * 8.0 / 1e6 / elapsed_s;
            self.gib_per_s = moved as f64 / (1u64 << 30) as f64 / elapsed_s;
        }
        self.cpu_ms = coordinator_cpu_ms + self.shards.iter().map(|s| s.cpu_ms).sum::<f64>();
        if moved > 0 {
            self.cpu_s_per_gib = self.cpu_ms / 1e3 / (moved as f64 / (1u64 << 30) as f64);
        }
        self.page_faults_minor = self.shards.iter().map(|s| s.faults_minor).sum();
        self.page_faults_major = self.shards.iter().map(|s| s.faults_major).sum();
        self.compressed_frames = self.shards.iter().map(|s| s.compressed_frames).sum();
        self.torn_pages = self.shards.iter().map(|s| s.torn_pages).sum();
        self.unchecked_pages = self.shards.iter().any(|s| s.unchecked_pages);
        let raw: u64 = self.shards.iter().map(|s| s.compressed_raw_bytes).sum();
        let packed: u64 = self.shards.iter().map(|s| s.compressed_bytes).sum();
        self.compression_ratio = if packed > 0 {
            raw as f64 / packed as f64
        } else {
            1.0
        };
        self.zero_copy = ZeroCopyStats {
            completed: self.shards.iter().map(|s| s.zc_completed).sum(),
            copied: self.shards.iter().map(|s| s.zc_copied).sum(),
            fallbacks: self.shards.iter().filter(|s| s.zc_fallback).count() as u64,
        };
    }
}

/// Figures of one finished round, for a VMM's convergence decisions.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RoundStats {
    /// Round number.
    pub round: u32,
    /// Pages in the round.
    pub pages: u64,
    /// Wall milliseconds from the round's start until every shard had handed it to the kernel.
    pub time_ms: f64,
}

/// Megabits per second of `bytes` over `ms` milliseconds, as QEMU's `mbps` (a running
/// migration's snapshots on either side; `ms` near 0 reads as a microsecond).
pub(crate) fn mbps(bytes: u64, ms: f64) -> f64 {
    bytes as f64 * 8.0 / 1e6 / (ms / 1e3).max(1e-6)
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mbps` is what went on the wire, as QEMU's; `gib_per_s` the guest memory moved.
    #[test]
    fn mbps_counts_wire_bytes_and_gib_per_s_guest_memory() {
        let mut t = TransferStats {
            shards: vec![ShardStats {
                zero_pages: 262_144, // 1 GiB of zero pages
                wire_bytes: 1_000_000,
                ..ShardStats::default()
            }],
            ..TransferStats::default()
        };
        t.finalize(1.0, 0.0);
        assert!((t.mbps - 8.0).abs() < 1e-9, "{}", t.mbps);
        assert!((t.gib_per_s - 1.0).abs() < 1e-9, "{}", t.gib_per_s);
    }
}
