//! Configuration of senders and receivers, with defaults a demanding user would pick.

use std::fmt;
use std::str::FromStr;

/// Zero-copy send policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopy {
    /// Try `SEND_ZC`; fall back to plain sends per connection when the kernel reports it copied.
    /// Where it really sends from our pages (a NIC, not loopback), guest memory is registered
    /// as fixed buffers, which asks of the VMM what [`ZeroCopy::On`] says.
    #[default]
    Auto,
    /// Always `SEND_ZC`, from guest memory registered as fixed buffers where it can be (not a
    /// read-only image); fail if the kernel lacks `SEND_ZC`. Registered pages stay pinned
    /// while the sender runs: the VMM must not discard guest memory meanwhile (balloon,
    /// free page reporting, `MADV_DONTNEED`), as with VFIO, or sends read the pinned pages,
    /// not the new ones (page checksums catch it; without them the destination is wrong).
    On,
    /// Plain sends only.
    Off,
}

impl FromStr for ZeroCopy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ZeroCopy::Auto),
            "on" => Ok(ZeroCopy::On),
            "off" => Ok(ZeroCopy::Off),
            other => Err(format!(
                "zero-copy mode must be auto, on or off, not {other:?}"
            )),
        }
    }
}

impl fmt::Display for ZeroCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ZeroCopy::Auto => "auto",
            ZeroCopy::On => "on",
            ZeroCopy::Off => "off",
        })
    }
}

/// How shards are placed on cores. Pinned shards follow a NUMA-aware plan
/// ([`crate::placement`]): near the memory they move, on the allowed cores (or the configured
/// `cores`), which each node's shards take in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pinning {
    /// Cores in ascending order: on one node, shard i on the i-th allowed core (wrapping).
    #[default]
    Cores,
    /// Cores counted from the last: a receiver sharing a host with its sender (loopback) then
    /// pairs each sender shard with a receiver shard on another core.
    CoresReversed,
    /// Each shard may run on every core of the node the plan gives it (within
    /// [`ReceiverConfig::cores`] or [`SenderConfig::cores`]), the scheduler choosing among them: NUMA placement is kept,
    /// and a shard is not held to a core that other work keeps busy. The receiver's default: a
    /// receive shard sleeps whenever its channel is drained, and pinned to one core that
    /// another task keeps busy it waits for that task's time slice at every wake-up (measured
    /// with a busy loop on one of two cores: a live migration's downtime 27–45 ms pinned,
    /// 3–16 ms with the receiver's shards placed by the scheduler; README, "Another tenant on
    /// one core"). On one node this is the scheduler's placement within the allowed cores.
    Nodes,
    /// Let the scheduler place threads.
    None,
}

/// Sender settings.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Channels (connections, shards); 1 to `CHANNELS_MAX`.
    pub channels: u16,
    /// Core placement of shards.
    pub pinning: Pinning,
    /// The cores shards may be pinned to (`None`: every core this process may run on). A VMM
    /// leaves out the cores its vCPUs run on. Within them shards are placed NUMA-aware
    /// ([`crate::placement`]).
    pub cores: Option<Vec<usize>>,
    /// Zero-copy policy.
    pub zero_copy: ZeroCopy,
    /// TLS 1.3 on every channel (`None`: plaintext).
    pub tls: Option<crate::tls::TlsClient>,
    /// A pre-shared key (plaintext only; see [`crate::auth`]): authenticates both ends and
    /// protects every record.
    pub psk: Option<crate::auth::Psk>,
    /// Compression of normal pages.
    pub compression: crate::pipeline::compress::Compression,
    /// zstd level (validated against the library's range; negative levels are fast modes).
    pub zstd_level: i32,
    /// Upper bound on guest memory sent per second over all channels, in bytes of wire traffic
    /// (QEMU's `max-bandwidth`); `None`: unlimited. A channel still sends a frame (up to
    /// 512 KiB) at least every keepalive interval, a quarter of the receiver's idle bound, so
    /// that the receiver does not take it for dead: a lower limit sends at that floor.
    pub max_bandwidth_bytes_per_s: Option<u64>,
    /// Milliseconds without progress (sends not taken, no confirmation) before the sender gives
    /// up on the receiver.
    pub idle_timeout_ms: u64,
    /// The TCP congestion control algorithm of every channel (`TCP_CONGESTION`, e.g. `cubic`,
    /// `bbr`); `None`: the host's default, as QEMU's channels get. It decides how the sender's
    /// data goes out; see the README's measurements for what it changed on loopback.
    pub congestion: Option<String>,
    /// A checksum (XXH3-64) of every page in every plaintext frame, checked by the receiver
    /// before it counts the page placed (on by default). Under TLS or a pre-shared key the
    /// records' AEAD covers the pages and frames carry none, so it applies to plaintext only.
    ///
    /// Off, a plaintext transfer's pages are covered by TCP's 16-bit checksum alone, as QEMU's
    /// multifd channels are, and the receiver must consent
    /// ([`ReceiverConfig::accept_unchecked_pages`]). The checksums cost CPU on both sides: on
    /// a 2-core loopback, where the CPU is the link, 21–28% of plain throughput (README,
    /// "Trust"). Pages a vCPU tears during a live round then go uncaught until the dirty log
    /// resends them, which it does; the paused round is whole.
    pub page_checksums: bool,
    /// A handle made before the sender ([`Canceller::new`](crate::sender::Canceller::new)) that
    /// cancels it from the start: while it connects and handshakes too, which against a
    /// receiver that does not answer (or a host that drops the connection attempts) take up to
    /// [`HANDSHAKE_TIMEOUT_MS`](crate::limits::HANDSHAKE_TIMEOUT_MS); `connect` then returns
    /// [`Error::Cancelled`](crate::Error::Cancelled) within a few tens of milliseconds. One
    /// sender per handle: a second one (a config cloned for a retry) is refused. `None`: only
    /// [`Sender::canceller`](crate::Sender::canceller), once connected.
    pub canceller: Option<crate::sender::Canceller>,
    /// Records sealed with one TLS key before a key update. Lowered only by tests.
    #[doc(hidden)]
    pub tls_records_per_key: u64,
    /// Seed of the fault injection between every shard and its ring ([`crate::faults`]).
    #[cfg(feature = "faults")]
    pub fault_seed: Option<u64>,
    /// Run the data path over the simulated transport ([`crate::faults::sim`]) instead of
    /// io_uring and the socket; the receiver must say the same.
    #[cfg(feature = "faults")]
    pub simulated: bool,
    /// Place the shards on this many NUMA nodes that the host need not have, unpinned, and
    /// region `r` of the memory on node `r % fault_nodes`: routing chunks by node, with one
    /// pool of shards per node, runs on a one-node test host. 0 or 1: the host's own topology.
    #[cfg(feature = "faults")]
    pub fault_nodes: u32,
}

impl SenderConfig {
    /// Checks every setting, so a bad one is reported before anything connects.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::limits::CHANNELS_MAX;
        let bad = |m: String| Err(crate::Error::Config(m));
        if self.channels == 0 || usize::from(self.channels) > CHANNELS_MAX {
            return bad(format!(
                "channels must be between 1 and {CHANNELS_MAX}, got {}",
                self.channels
            ));
        }
        crate::pipeline::compress::check_zstd_level(self.zstd_level)
            .map_err(crate::Error::Config)?;
        if self.max_bandwidth_bytes_per_s == Some(0) {
            return bad("max bandwidth must be positive".into());
        }
        if self.tls.is_some() && self.psk.is_some() {
            return bad(
                "choose TLS or a pre-shared key, not both (TLS already authenticates)".into(),
            );
        }
        check_cores(self.pinning, &self.cores)?;
        if let Some(name) = &self.congestion {
            check_congestion(name)?;
        }
        if !self.page_checksums && (self.tls.is_some() || self.psk.is_some()) {
            return bad(PAGE_CHECKSUMS_PLAINTEXT_ONLY.into());
        }
        check_idle_timeout(self.idle_timeout_ms)
    }
}

/// Where a sender gets a TLS identity, in each interface pagewire has: error messages name
/// all three, since the library's errors reach CLI users and VMMs alike.
pub(crate) const HINT_SENDER_TLS: &str = "CLI: --tls-cert, --tls-key and --tls-ca; C: \
     pw_options.tls_dir; Rust: SenderConfig::tls";
/// Where a receiver gets a TLS identity (see [`HINT_SENDER_TLS`]).
pub(crate) const HINT_RECEIVER_TLS: &str = "CLI: --tls-cert, --tls-key and --tls-ca; C: \
     pw_options.tls_dir; Rust: ReceiverConfig::tls";
/// Where a sender gets a pre-shared key (see [`HINT_SENDER_TLS`]).
pub(crate) const HINT_SENDER_PSK: &str =
    "CLI: --psk-file; C: pw_options.psk_file; Rust: SenderConfig::psk";
/// Where a receiver agrees to pages without checksums (see [`HINT_SENDER_TLS`]).
pub(crate) const HINT_ACCEPT_UNCHECKED: &str = "CLI: recv --accept-unchecked-pages; C: \
     pw_options.unchecked_pages; Rust: ReceiverConfig::accept_unchecked_pages";

/// Why turning page checksums off (or accepting pages without them) is refused with TLS or a
/// pre-shared key.
const PAGE_CHECKSUMS_PLAINTEXT_ONLY: &str = "page checksums apply to plaintext only: under TLS \
     or a pre-shared key every record is authenticated and frames carry none";

/// Checks a TCP congestion control name: one the kernel offers now, where `/proc` says which
/// (an algorithm built as a module is offered once loaded: `modprobe tcp_<name>`).
pub fn check_congestion(name: &str) -> crate::Result<()> {
    check_congestion_name(name)?;
    match crate::sys::host_congestion() {
        Some((_, offered)) if !offered.iter().any(|o| o == name) => {
            Err(crate::Error::Config(format!(
                "TCP congestion control {name:?} is not offered by this kernel now (offered: {}; \
                 one built as a module is offered once loaded)",
                offered.join(", ")
            )))
        }
        _ => Ok(()),
    }
}

/// Checks that `name` could name a TCP congestion control (short, alphanumeric and `_`),
/// whatever this kernel offers.
pub fn check_congestion_name(name: &str) -> crate::Result<()> {
    let plausible = !name.is_empty()
        && name.len() < 16
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !plausible {
        return Err(crate::Error::Config(format!(
            "{name:?} is not a TCP congestion control name (such as cubic or bbr)"
        )));
    }
    Ok(())
}

/// Checks an idle bound against `IDLE_TIMEOUT_MS_MIN..=IDLE_TIMEOUT_MS_MAX`.
pub fn check_idle_timeout(ms: u64) -> crate::Result<()> {
    use crate::limits::{IDLE_TIMEOUT_MS_MAX, IDLE_TIMEOUT_MS_MIN};
    if (IDLE_TIMEOUT_MS_MIN..=IDLE_TIMEOUT_MS_MAX).contains(&ms) {
        Ok(())
    } else {
        Err(crate::Error::Config(format!(
            "the idle timeout must be between {IDLE_TIMEOUT_MS_MIN} ms and {IDLE_TIMEOUT_MS_MAX} ms, got {ms} ms"
        )))
    }
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            channels: 2,
            pinning: Pinning::Cores,
            cores: None,
            zero_copy: ZeroCopy::Auto,
            tls: None,
            psk: None,
            compression: crate::pipeline::compress::Compression::None,
            zstd_level: crate::pipeline::compress::ZSTD_LEVEL_DEFAULT,
            max_bandwidth_bytes_per_s: None,
            idle_timeout_ms: crate::limits::IDLE_TIMEOUT_MS_DEFAULT,
            congestion: None,
            page_checksums: true,
            canceller: None,
            tls_records_per_key: crate::tls::RECORDS_PER_KEY_MAX,
            #[cfg(feature = "faults")]
            fault_seed: None,
            #[cfg(feature = "faults")]
            simulated: false,
            #[cfg(feature = "faults")]
            fault_nodes: 0,
        }
    }
}

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Channels to expect; `None` takes the sender's count.
    pub channels: Option<u16>,
    /// Core placement of shards ([`Pinning::Nodes`] by default: each shard on the cores of
    /// the node it is planned near).
    pub pinning: Pinning,
    /// The cores shards may be pinned to (`None`: every core this process may run on); see
    /// [`SenderConfig::cores`].
    pub cores: Option<Vec<usize>>,
    /// Milliseconds to wait for a sender to complete its handshakes; `None` waits indefinitely.
    /// Connections that fail their handshake (strangers, wrong version or layout, bad
    /// certificates) are logged and dropped, and the receiver keeps waiting until this deadline.
    pub accept_timeout_ms: Option<u64>,
    /// Milliseconds without a byte on a channel (or, at a round barrier, on any channel) before
    /// the receiver gives up on the sender. Senders keep idle channels alive with keepalive
    /// frames, at a quarter of this bound, which the handshake tells them.
    pub idle_timeout_ms: u64,
    /// TLS 1.3 on every channel, client certificates required (`None`: plaintext).
    pub tls: Option<crate::tls::TlsServer>,
    /// A pre-shared key every sender must prove it holds (plaintext only; see [`crate::auth`]).
    pub psk: Option<crate::auth::Psk>,
    /// Listen on a non-loopback address with neither TLS nor a pre-shared key. Without it such
    /// a receiver refuses to start: anyone who can connect could write its memory.
    pub insecure: bool,
    /// Accept a plaintext sender whose frames carry no page checksums
    /// ([`SenderConfig::page_checksums`] off); without it such a sender is refused
    /// ([`Refusal::ChecksumsRequired`](crate::protocol::handshake::Refusal::ChecksumsRequired)).
    /// Its pages are then checked by TCP's checksum only, and the final confirmation means
    /// every page was placed, not that every page was verified.
    pub accept_unchecked_pages: bool,
    /// Fault a destination given up front in ahead of the pages (`MADV_POPULATE_WRITE`, one
    /// thread per allowed core), in the background while the receiver waits for the sender's
    /// channels (from 100 ms after it starts, so a sender that connects at once has every
    /// core), as QEMU's `-mem-prealloc` does before a migration: otherwise every first touch
    /// faults on a shard thread, inside the transfer. Never waited for, and stopped once every
    /// channel is in: from then on it would take cores from the shards and fill in pages that
    /// only zero pages name (a fresh destination skips those and stays sparse). Its time is
    /// reported as `prefault_ms`. For a destination that must be wholly faulted in before the
    /// transfer starts, call
    /// [`GuestMemory::prefault_in_parallel`](crate::GuestMemory::prefault_in_parallel) first.
    pub prefault: bool,
    /// Maximum random delay, in microseconds, before each frame is processed (seeded by
    /// `fault_seed`), to shake out ordering bugs across channels.
    #[cfg(feature = "faults")]
    pub fault_frame_delay_max_us: u32,
    /// Seed of the frame delays and of the fault injection between every shard and its ring
    /// ([`crate::faults`]); ring faults only when `fault_ring` is set.
    #[cfg(feature = "faults")]
    pub fault_seed: u64,
    /// Inject ring faults (seeded by `fault_seed`).
    #[cfg(feature = "faults")]
    pub fault_ring: bool,
    /// Run the data path over the simulated transport ([`crate::faults::sim`]) instead of
    /// io_uring and the socket; the sender must say the same.
    #[cfg(feature = "faults")]
    pub simulated: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            channels: None,
            pinning: Pinning::Nodes,
            cores: None,
            accept_timeout_ms: None,
            idle_timeout_ms: crate::limits::IDLE_TIMEOUT_MS_DEFAULT,
            tls: None,
            psk: None,
            insecure: false,
            accept_unchecked_pages: false,
            prefault: true,
            #[cfg(feature = "faults")]
            fault_frame_delay_max_us: 0,
            #[cfg(feature = "faults")]
            fault_seed: 0,
            #[cfg(feature = "faults")]
            fault_ring: false,
            #[cfg(feature = "faults")]
            simulated: false,
        }
    }
}

impl ReceiverConfig {
    /// Checks every setting, so a bad one is reported before anything listens.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::limits::CHANNELS_MAX;
        if let Some(c) = self.channels {
            if c == 0 || usize::from(c) > CHANNELS_MAX {
                return Err(crate::Error::Config(format!(
                    "channels must be between 1 and {CHANNELS_MAX}, got {c}"
                )));
            }
        }
        if self.tls.is_some() && self.psk.is_some() {
            return Err(crate::Error::Config(
                "choose TLS or a pre-shared key, not both (TLS already authenticates)".into(),
            ));
        }
        if self.accept_unchecked_pages && (self.tls.is_some() || self.psk.is_some()) {
            return Err(crate::Error::Config(PAGE_CHECKSUMS_PLAINTEXT_ONLY.into()));
        }
        check_cores(self.pinning, &self.cores)?;
        check_idle_timeout(self.idle_timeout_ms)
    }
}

/// Refuses `cores` with pinning off: unpinned shards would run on any core of the process,
/// the vCPUs' ones included, which is what a list of cores is there to prevent.
fn check_cores(pinning: Pinning, cores: &Option<Vec<usize>>) -> crate::Result<()> {
    if pinning == Pinning::None && cores.is_some() {
        return Err(crate::Error::Config(
            "cores are given but pinning is off: unpinned shards would run on any core, the vCPUs' too (pin them, or give no cores)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_without_pinning_are_refused() {
        let cores = Some(vec![0]);
        let s = SenderConfig {
            pinning: Pinning::None,
            cores: cores.clone(),
            ..SenderConfig::default()
        };
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pinning is off"));
        let r = ReceiverConfig {
            pinning: Pinning::None,
            cores: cores.clone(),
            ..ReceiverConfig::default()
        };
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pinning is off"));
        let pinned = SenderConfig {
            cores,
            ..SenderConfig::default()
        };
        assert!(pinned.validate().is_ok());
    }

    #[test]
    fn page_checksums_can_be_turned_off_for_plaintext_only() {
        let plain = SenderConfig {
            page_checksums: false,
            ..SenderConfig::default()
        };
        assert!(plain.validate().is_ok());
        let keyed = SenderConfig {
            psk: Some(crate::auth::Psk::generate()),
            ..plain.clone()
        };
        let err = keyed.validate().unwrap_err().to_string();
        assert!(err.contains("plaintext only"), "{err}");
        assert!(SenderConfig {
            page_checksums: true,
            ..keyed
        }
        .validate()
        .is_ok());

        let receiver = ReceiverConfig {
            accept_unchecked_pages: true,
            ..ReceiverConfig::default()
        };
        assert!(receiver.validate().is_ok());
        let err = ReceiverConfig {
            psk: Some(crate::auth::Psk::generate()),
            ..receiver
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("plaintext only"), "{err}");
    }
}
