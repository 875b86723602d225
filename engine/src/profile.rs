//! Tuning profiles: the sender settings `pagewire-tune sweep` measured best on a host and link,
//! written as TOML, read by `pagewire send --profile FILE` and by VMMs through
//! [`Profile::load`] and [`Profile::apply`].
//!
//! A profile holds the choice (`[send]`) and, beside it, what it was chosen from (`[measured]`:
//! the peer, the memory, every cell's median), so a reader can see why and when it was made.
//!
//! ```toml
//! [send]
//! channels = 4
//! zero_copy = "auto"
//! compress = "none"
//!
//! [measured]
//! peer = "10.0.0.2:7979"
//! ...
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pipeline::compress::Compression;
use crate::{SenderConfig, ZeroCopy};

/// A tuning profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The sender settings to use.
    pub send: SendSettings,
    /// What the choice was made from (absent in a hand-written profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

/// Sender settings of a profile; each absent one keeps the sender's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendSettings {
    /// Channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u16>,
    /// Zero-copy policy: `auto`, `on` or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_copy: Option<String>,
    /// Compression: `none`, `zstd`, `zlib` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<String>,
    /// zstd level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd_level: Option<i32>,
    /// TCP congestion control of the channels (`cubic`, `bbr`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub congestion: Option<String>,
}

/// The measurements behind a profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// The receiver measured against (`HOST:PORT`).
    pub peer: String,
    /// When (UTC, RFC 3339).
    pub at: String,
    /// Guest memory per transfer, in bytes.
    pub size_bytes: u64,
    /// Its content (`blend`, `random`, ..., or `file:PATH`).
    pub content: String,
    /// Interleaved repetitions of every cell.
    pub reps: u32,
    /// Every cell, in the order measured.
    pub cells: Vec<Cell>,
}

/// One measured combination. A record of what was measured, not a setting: figures a later
/// `sweep` adds are skipped by builds that do not know them (a profile with the receiver's CPU
/// still loads), while `[send]` and `[measured]` refuse unknown keys (a mistyped setting).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Channels.
    pub channels: u16,
    /// Zero-copy policy.
    pub zero_copy: String,
    /// Compression.
    pub compress: String,
    /// TCP congestion control (empty in profiles written before it was measured).
    #[serde(default)]
    pub congestion: String,
    /// Median throughput, GiB of guest memory per second.
    pub gib_per_s: f64,
    /// Slowest and fastest repetition.
    pub gib_per_s_range: [f64; 2],
    /// Median sender CPU seconds per GiB.
    pub cpu_s_per_gib: f64,
    /// Median receiver CPU seconds per GiB, where the receiver reported it (a sweep against
    /// `pagewire-bench serve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver_cpu_s_per_gib: Option<f64>,
}

impl Profile {
    /// Reads and checks a profile file. The congestion control it names is checked against
    /// this kernel only by [`Profile::apply`]: a profile made on another host may name one this
    /// kernel lacks, and a caller can replace it before applying (`--congestion`).
    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading profile {}: {e}", path.display())))?;
        let profile: Profile = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("profile {}: {e}", path.display())))?;
        let mut host_free = profile.clone();
        host_free.send.congestion = None;
        host_free
            .apply(&mut SenderConfig::default())
            .and_then(|()| match &profile.send.congestion {
                Some(c) => crate::config::check_congestion_name(c),
                None => Ok(()),
            })
            .map_err(|e| Error::Config(format!("profile {}: {e}", path.display())))?;
        Ok(profile)
    }

    /// The profile as TOML text.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("writing a profile as TOML: {e}")))
    }

    /// Writes the profile to `path` whole or not at all: into a file beside it, synced, then
    /// renamed over it, so a sender reading `path` meanwhile, or a crash, never sees half a
    /// profile (which could still parse, saying less), and a failed write keeps the old one.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let text = self.to_toml()?;
        let io = |what: &str, p: &Path, e| Error::io(format!("{what} {}", p.display()), e);
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("writing", path, e));
        }
        Ok(())
    }

    /// Sets what the profile says on `config` (and checks it: a value out of range is an
    /// error, not a silent default).
    pub fn apply(&self, config: &mut SenderConfig) -> Result<()> {
        let s = &self.send;
        if let Some(c) = s.channels {
            config.channels = c;
        }
        if let Some(z) = &s.zero_copy {
            config.zero_copy = z.parse::<ZeroCopy>().map_err(Error::Config)?;
        }
        if let Some(c) = &s.compress {
            config.compression = c.parse::<Compression>().map_err(Error::Config)?;
        }
        if let Some(l) = s.zstd_level {
            config.zstd_level = l;
        }
        if let Some(c) = &s.congestion {
            config.congestion = Some(c.clone());
        }
        config.validate()
    }
}

/// What `--channels auto` chose without a profile, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoChannels {
    /// Channels to use.
    pub channels: u16,
    /// One channel's rate on a sample of the memory here, GiB/s (sender and receiver on this
    /// host, over loopback).
    pub one_channel_gib_per_s: f64,
    /// The interface towards the peer and its link speed in GiB/s, when the kernel knows it.
    pub link: Option<(String, Option<f64>)>,
    /// The reasoning, one line.
    pub reason: String,
}

/// Chooses a channel count without a profile, by measuring briefly: a sample of `memory` (up
/// to [`AUTO_SAMPLE_BYTES`](crate::limits::AUTO_SAMPLE_BYTES), spread over it) is sent over
/// loopback with one channel and `config`'s compression (with a generated pre-shared key where
/// `config` encrypts, which costs what TLS's AES-GCM does), which gives one shard's rate for this
/// content on this CPU. Then:
/// - a link whose speed the kernel reports (`/sys/class/net/IF/speed`) gets enough channels to
///   fill it with a quarter to spare;
/// - a loopback peer gets half the allowed cores, but two where there are two (the receiver
///   runs on the same cores; measured: 8 channels beat 16 on 16 cores, 2 beat 1 on 2);
/// - a link of unknown speed (virtual NICs report none) gets one channel per allowed core, up
///   to [`AUTO_UNKNOWN_LINK_CHANNELS`](crate::limits::AUTO_UNKNOWN_LINK_CHANNELS);
///
/// always within the allowed cores (or `config.cores`).
pub fn auto_channels(
    memory: &crate::GuestMemory,
    peer: std::net::SocketAddr,
    config: &SenderConfig,
) -> Result<AutoChannels> {
    let rate = one_channel_rate(memory, config)?;
    let cores = crate::placement::pin_order(config.cores.as_deref(), crate::Pinning::Cores)?
        .len()
        .max(1);
    let link = crate::placement::interface_to(peer).map(|name| {
        let speed = crate::placement::nic_speed_mbit(std::path::Path::new("/sys"), &name)
            .map(|mbit| mbit as f64 * 1e6 / 8.0 / (1u64 << 30) as f64);
        (name, speed)
    });
    let loopback = peer.ip().is_loopback();
    let link_rate = link.as_ref().and_then(|l| l.1);
    let channels = decide(rate, link_rate, loopback, cores);
    let reason = match (&link, link_rate) {
        _ if loopback => format!(
            "loopback: about half of {cores} allowed core(s), as the receiver shares them (one channel moves {rate:.2} GiB/s of this memory here)"
        ),
        (Some((name, _)), Some(l)) => format!(
            "{name} links at {:.0} Gbit/s = {l:.2} GiB/s; one channel moves {rate:.2} GiB/s of this memory here, so {channels} fill it with a quarter to spare (at most {cores} allowed core(s))",
            l * (1u64 << 30) as f64 * 8.0 / 1e9
        ),
        _ => format!(
            "link speed unknown: one channel per allowed core ({cores}), at most {}; one channel moves {rate:.2} GiB/s of this memory here",
            crate::limits::AUTO_UNKNOWN_LINK_CHANNELS
        ),
    };
    Ok(AutoChannels {
        channels,
        one_channel_gib_per_s: rate,
        link,
        reason,
    })
}

/// The channel count for one channel's `rate` and the link's, both GiB/s.
fn decide(rate: f64, link: Option<f64>, loopback: bool, cores: usize) -> u16 {
    let cores = cores.clamp(1, crate::limits::CHANNELS_MAX);
    let n = if loopback {
        (cores / 2).max(cores.min(2))
    } else {
        match link {
            Some(l) if rate > 0.0 => (l * crate::limits::AUTO_LINK_HEADROOM / rate).ceil() as usize,
            _ => cores.min(crate::limits::AUTO_UNKNOWN_LINK_CHANNELS),
        }
    };
    n.clamp(1, cores) as u16
}

/// One channel's rate on a sample of `memory`, over loopback, GiB/s.
fn one_channel_rate(memory: &crate::GuestMemory, config: &SenderConfig) -> Result<f64> {
    use std::sync::Arc;
    let page = crate::limits::PAGE_BYTES as u64;
    let total = memory.total_pages() * page;
    let sample = total.min(crate::limits::AUTO_SAMPLE_BYTES as u64);
    let slices = crate::limits::AUTO_SAMPLE_SLICES as u64;
    let slice = (sample / slices / page).max(1) * page;
    let spec = [crate::RegionSpec {
        gpa: 0,
        len: (sample / slice).max(1) * slice,
    }];
    let src = Arc::new(crate::GuestMemory::anonymous_populated(&spec)?);
    let mut buf = vec![0u8; slice as usize];
    let mut at = 0u64;
    // Slices spread evenly over the guest's memory (region by region, in order).
    let stride = total / (spec[0].len / slice);
    for k in 0..spec[0].len / slice {
        let mut want = k * stride;
        for r in memory.regions() {
            if want + slice <= r.len() {
                r.read(want, &mut buf);
                src.regions()[0].write(at, &buf);
                break;
            }
            want = want.saturating_sub(r.len());
        }
        at += slice;
    }
    let dst = Arc::new(crate::GuestMemory::anonymous_populated(&spec)?);
    let psk = (config.tls.is_some() || config.psk.is_some()).then(crate::auth::Psk::generate);
    let receiver = crate::Receiver::bind(
        "127.0.0.1:0",
        dst,
        crate::ReceiverConfig {
            pinning: crate::Pinning::None,
            psk: psk.clone(),
            prefault: false,
            accept_timeout_ms: Some(crate::limits::HANDSHAKE_TIMEOUT_MS),
            ..crate::ReceiverConfig::default()
        },
    )?;
    let addr = receiver.local_addr()?;
    let rx = std::thread::spawn(move || receiver.run());
    let sent = (|| {
        let mut s = crate::Sender::connect(
            addr,
            src,
            &SenderConfig {
                channels: 1,
                pinning: crate::Pinning::None,
                psk,
                tls: None,
                zero_copy: ZeroCopy::Off,
                compression: config.compression,
                zstd_level: config.zstd_level,
                ..SenderConfig::default()
            },
        )?;
        s.send_all()?;
        s.finish()
    })();
    let received = rx
        .join()
        .map_err(|_| Error::Internal("the measuring receiver panicked".into()))?;
    let sent = sent?;
    received?;
    Ok(sent.gib_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_counts_follow_the_link_and_the_cores() {
        // 100 Gbit/s is 11.6 GiB/s; at 3 GiB/s a channel that needs 5 with a quarter to spare.
        let gbit = |g: f64| g * 1e9 / 8.0 / (1u64 << 30) as f64;
        assert_eq!(decide(3.0, Some(gbit(100.0)), false, 16), 5);
        assert_eq!(
            decide(3.0, Some(gbit(100.0)), false, 4),
            4,
            "no more than the cores"
        );
        assert_eq!(decide(3.0, Some(gbit(10.0)), false, 16), 1);
        assert_eq!(decide(3.0, None, false, 4), 4, "unknown link: every core");
        assert_eq!(decide(3.0, None, false, 64), 8, "but no more than 8");
        assert_eq!(decide(3.0, None, true, 16), 8, "loopback: half");
        assert_eq!(decide(3.0, None, true, 2), 2, "two cores: two channels");
        assert_eq!(decide(3.0, None, true, 1), 1);
    }

    #[test]
    fn auto_measures_one_channel_on_loopback() {
        if crate::uring::probe().is_err() {
            println!("skipped: io_uring is not usable here");
            return;
        }
        let spec = [
            crate::RegionSpec {
                gpa: 0,
                len: 8 << 20,
            },
            crate::RegionSpec {
                gpa: 1 << 32,
                len: 8 << 20,
            },
        ];
        let memory = crate::GuestMemory::anonymous(&spec).unwrap();
        crate::synth::fill(&memory, crate::synth::Content::Random, 3);
        let auto = auto_channels(
            &memory,
            "127.0.0.1:9".parse().unwrap(),
            &SenderConfig::default(),
        )
        .unwrap();
        assert!(auto.one_channel_gib_per_s > 0.0, "{auto:?}");
        let cores = crate::shard::allowed_cores().len().max(1);
        assert_eq!(
            usize::from(auto.channels),
            (cores / 2).max(cores.min(2)),
            "{auto:?}"
        );
        assert!(auto.reason.contains("loopback"), "{auto:?}");
    }

    #[test]
    fn a_profile_round_trips_and_applies() {
        let p = Profile {
            send: SendSettings {
                channels: Some(4),
                zero_copy: Some("off".into()),
                compress: Some("zstd".into()),
                zstd_level: Some(3),
                congestion: Some("reno".into()),
            },
            measured: Some(Measured {
                peer: "10.0.0.2:7979".into(),
                at: "2026-11-30T18:00:00Z".into(),
                size_bytes: 1 << 30,
                content: "blend".into(),
                reps: 3,
                cells: vec![Cell {
                    channels: 4,
                    zero_copy: "off".into(),
                    compress: "zstd".into(),
                    congestion: "reno".into(),
                    gib_per_s: 2.5,
                    gib_per_s_range: [2.4, 2.6],
                    cpu_s_per_gib: 0.4,
                    receiver_cpu_s_per_gib: Some(0.3),
                }],
            }),
        };
        let text = p.to_toml().unwrap();
        assert!(
            text.contains("[send]") && text.contains("channels = 4"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[send]\nchannels = 1\n").unwrap();
        p.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the profile is left: {names:?}");
        let back = Profile::load(&path).unwrap();
        assert_eq!(back, p);
        let mut c = SenderConfig::default();
        back.apply(&mut c).unwrap();
        assert_eq!(
            (c.channels, c.zero_copy, c.compression, c.zstd_level),
            (4, ZeroCopy::Off, Compression::Zstd, 3)
        );
        assert_eq!(c.congestion.as_deref(), Some("reno"));
    }

    #[test]
    fn a_hand_written_profile_may_say_little_but_nothing_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[send]\nchannels = 8\n").unwrap();
        let p = Profile::load(&path).unwrap();
        let mut c = SenderConfig::default();
        p.apply(&mut c).unwrap();
        assert_eq!((c.channels, c.zero_copy), (8, ZeroCopy::Auto));
        for (text, says) in [
            ("[send]\nchannels = 0\n", "channels must be between"),
            ("[send]\nzero_copy = \"sometimes\"\n", "zero-copy mode"),
            ("[send]\nchanels = 2\n", "unknown field"),
            (
                "[measured]\npeer = \"h:1\"\nat = \"\"\nsize_bytes = 1\ncontent = \"\"\nreps = 1\ncells = []\nchanels = 4\n",
                "unknown field",
            ),
            ("[send]\ncompress = \"lz4\"\n", "lz4"),
            (
                "[send]\ncongestion = \"no such\"\n",
                "congestion control name",
            ),
            ("not toml", "profile"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Profile::load(&path).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        let e = Profile::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(e.to_string().contains("reading profile"), "{e}");
        // A figure a later sweep adds to its cells does not stop the profile from loading.
        std::fs::write(
            &path,
            "[send]\nchannels = 2\n[measured]\npeer = \"h:1\"\nat = \"\"\nsize_bytes = 1\ncontent = \"\"\nreps = 1\n[[measured.cells]]\nchannels = 2\nzero_copy = \"off\"\ncompress = \"none\"\ngib_per_s = 1.0\ngib_per_s_range = [1.0, 1.0]\ncpu_s_per_gib = 0.1\nfuture_figure = 7\n",
        )
        .unwrap();
        let p = Profile::load(&path).unwrap();
        assert_eq!(p.measured.unwrap().cells.len(), 1);
    }

    #[test]
    fn a_congestion_control_this_kernel_lacks_is_refused_only_when_applied() {
        // A profile measured on a host with another congestion control: it loads, applying it
        // as it is fails, and with the name replaced first (`--congestion`) it applies.
        let Some((default, _)) = crate::sys::host_congestion() else {
            eprintln!("skipped: this kernel does not list its congestion controls");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[send]\nchannels = 3\ncongestion = \"nosuchcc\"\n").unwrap();
        let p = Profile::load(&path).unwrap();
        let e = p.apply(&mut SenderConfig::default()).unwrap_err();
        assert!(e.to_string().contains("not offered"), "{e}");
        let mut replaced = p.clone();
        replaced.send.congestion = Some(default.clone());
        let mut c = SenderConfig::default();
        replaced.apply(&mut c).unwrap();
        assert_eq!((c.channels, c.congestion), (3, Some(default)));
    }
}
