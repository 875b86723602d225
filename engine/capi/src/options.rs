//! `pw_options`: the settings a C caller gives a sender or receiver, read into the Rust
//! configs (zero or null fields mean the defaults).

use super::*;
use pw::Pinning;

/// Settings of a sender or receiver; zero (or a null pointer) means the default.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pw_options {
    /// Channels (connections) of a sender; 0: 2. Receivers take what the sender asks.
    pub channels: u16,
    /// A directory with QEMU's x509 files (ca-cert.pem, server-cert.pem, server-key.pem,
    /// client-cert.pem, client-key.pem), or null for plaintext (loopback only).
    pub tls_dir: *const c_char,
    /// Milliseconds without progress before giving up on the peer; 0: 30000.
    pub idle_timeout_ms: u64,
    /// The cores shards may be pinned to, as a CPU list ("0-3,8"), or null for every core the
    /// process may run on. Leave out the cores that run vCPUs; within the list shards go near
    /// the memory they move (NUMA) and the NIC.
    pub cores: *const c_char,
    /// A sender's TCP congestion control ("cubic", "bbr", one the kernel offers), or null for
    /// the host's default.
    pub congestion: *const c_char,
    /// Plaintext only. Nonzero on a sender: pages go without their checksums, covered by TCP's
    /// checksum alone (as QEMU's multifd sends them), which saves CPU on both sides. Nonzero on
    /// a receiver: such a sender is accepted (otherwise it is refused). 0: page checksums.
    pub unchecked_pages: u8,
    /// A pre-shared key file both ends hold (QEMU's `keys.psk` format, `identity:hexkey`), or
    /// null. Without TLS it authenticates both ends and seals every record (AES-GCM), so a
    /// receiver may then listen beyond loopback; with neither, it listens on loopback only.
    pub psk_file: *const c_char,
    /// A sender's compression of normal pages: "none" (or null), "zstd", "zlib", or "auto"
    /// (zstd while the link, not the CPU, is the bottleneck). Receivers take what comes.
    pub compress: *const c_char,
    /// A sender's bandwidth limit from the start, in wire bytes per second over all channels
    /// (QEMU's `max-bandwidth`); 0: unlimited. [`pw_control_set_max_bandwidth`] changes it
    /// while the sender runs. Each channel still sends a frame (up to 512 KiB) at least every
    /// quarter of the receiver's idle bound, so a lower limit sends at that floor.
    pub max_bandwidth_bytes_per_s: u64,
    /// With `tls_dir` on a sender: the name the receiver's certificate must carry (QEMU's
    /// `tls-hostname`), or null for the host part of the address [`pw_sender_connect`]
    /// connects to. [`pw_sender_over_fds`] has no address to take it from and needs it.
    pub tls_hostname: *const c_char,
    /// A sender's control made beforehand with [`pw_control_new`], or null: a cancel through
    /// it also ends [`pw_sender_connect`] (or [`pw_sender_over_fds`]) while it connects and
    /// handshakes, and once connected it controls the sender as one from
    /// [`pw_sender_control`] would. One sender per control; a receiver refuses one.
    pub control: *const pw_control,
    /// Where shards run, or null for the side's default: "cores" (each shard pinned to one
    /// core of its NUMA node, within `cores`: a sender's default), "cores-reversed" (the same,
    /// the cores taken from the last: a receiver on the sender's host then pairs each of its
    /// shards with a sender shard on another core), "nodes" (each shard on all the cores of its
    /// node, the scheduler choosing: a receiver's default, since a shard pinned to a core other
    /// work keeps busy waits for that work's time slice at every wake-up), or "none" (the
    /// scheduler places them; refused together with `cores`).
    pub pinning: *const c_char,
}

/// # Safety
/// `o` is null or points to a valid `pw_options` whose strings (`tls_dir`, `cores`,
/// `congestion`, `psk_file`, `compress`, `tls_hostname`, `pinning`) are null or NUL-terminated.
unsafe fn options(o: *const pw_options) -> Result<Options, Error> {
    if o.is_null() {
        return Ok(Options {
            channels: 2,
            tls_dir: None,
            idle_timeout_ms: 30_000,
            cores: None,
            congestion: None,
            unchecked_pages: false,
            psk_file: None,
            compression: Compression::None,
            max_bandwidth_bytes_per_s: None,
            tls_hostname: None,
            pinning: None,
        });
    }
    // SAFETY: non-null and valid (caller).
    let o = unsafe { &*o };
    let dir = if o.tls_dir.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (caller).
        Some(unsafe { text(o.tls_dir, "tls_dir") }?.to_string())
    };
    let cores = if o.cores.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (caller).
        let list = unsafe { text(o.cores, "cores") }?;
        match pw::placement::parse_cpu_list(list) {
            Some(cores) if !cores.is_empty() => Some(cores),
            _ => {
                return Err(invalid(&format!(
                    "cores {list:?} is not a CPU list like 0-3,8"
                )))
            }
        }
    };
    let congestion = if o.congestion.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (caller).
        Some(unsafe { text(o.congestion, "congestion") }?.to_string())
    };
    let psk_file = if o.psk_file.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (caller).
        Some(unsafe { text(o.psk_file, "psk_file") }?.to_string())
    };
    let tls_hostname = if o.tls_hostname.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (caller).
        Some(unsafe { text(o.tls_hostname, "tls_hostname") }?.to_string())
    };
    let pinning = if o.pinning.is_null() {
        None
    } else {
        // SAFETY: non-null and NUL-terminated (caller).
        Some(match unsafe { text(o.pinning, "pinning") }? {
            "cores" => Pinning::Cores,
            "cores-reversed" => Pinning::CoresReversed,
            "nodes" => Pinning::Nodes,
            "none" => Pinning::None,
            other => {
                return Err(invalid(&format!(
                "pinning {other:?} is none of \"cores\", \"cores-reversed\", \"nodes\", \"none\""
            )))
            }
        })
    };
    let compression = if o.compress.is_null() {
        Compression::None
    } else {
        // SAFETY: non-null and NUL-terminated (caller).
        unsafe { text(o.compress, "compress") }?
            .parse()
            .map_err(|e: String| invalid(&e))?
    };
    Ok(Options {
        channels: if o.channels == 0 { 2 } else { o.channels },
        tls_dir: dir,
        idle_timeout_ms: if o.idle_timeout_ms == 0 {
            30_000
        } else {
            o.idle_timeout_ms
        },
        cores,
        congestion,
        unchecked_pages: o.unchecked_pages != 0,
        psk_file,
        compression,
        max_bandwidth_bytes_per_s: (o.max_bandwidth_bytes_per_s > 0)
            .then_some(o.max_bandwidth_bytes_per_s),
        tls_hostname,
        pinning,
    })
}

/// `pw_options` read and defaulted.
struct Options {
    channels: u16,
    tls_dir: Option<String>,
    idle_timeout_ms: u64,
    cores: Option<Vec<usize>>,
    congestion: Option<String>,
    unchecked_pages: bool,
    psk_file: Option<String>,
    compression: Compression,
    max_bandwidth_bytes_per_s: Option<u64>,
    tls_hostname: Option<String>,
    /// `None`: the side's default.
    pinning: Option<Pinning>,
}

impl Options {
    /// The pre-shared key, read from its file.
    fn psk(&self) -> Result<Option<pw::auth::Psk>, Error> {
        self.psk_file
            .as_deref()
            .map(|f| pw::auth::Psk::from_file(Path::new(f)))
            .transpose()
    }
}

fn tls_files(dir: &str, side: &str) -> TlsFiles {
    let dir = Path::new(dir);
    TlsFiles {
        cert: dir.join(format!("{side}-cert.pem")),
        key: dir.join(format!("{side}-key.pem")),
        ca: dir.join("ca-cert.pem"),
    }
}

/// A receiver's settings from `opts`.
///
/// # Safety
/// As for [`options`].
pub(crate) unsafe fn receiver_config(opts: *const pw_options) -> Result<ReceiverConfig, Error> {
    // SAFETY: null or valid (caller).
    if unsafe { opts.as_ref() }.is_some_and(|o| !o.control.is_null()) {
        return Err(invalid(
            "pw_options.control is for senders: take a receiver's with pw_receiver_control",
        ));
    }
    // SAFETY: as the caller promises.
    let o = unsafe { options(opts) }?;
    let tls = match &o.tls_dir {
        Some(d) => Some(TlsServer::new(tls_files(d, "server").load()?)?),
        None => None,
    };
    let defaults = ReceiverConfig::default();
    Ok(ReceiverConfig {
        tls,
        psk: o.psk()?,
        idle_timeout_ms: o.idle_timeout_ms,
        cores: o.cores,
        accept_unchecked_pages: o.unchecked_pages,
        pinning: o.pinning.unwrap_or(defaults.pinning),
        ..defaults
    })
}

/// A sender's settings from `opts`; `addr`, the address it connects to, if any, names the
/// receiver whose certificate TLS checks unless `tls_hostname` does.
///
/// # Safety
/// As for [`options`].
unsafe fn sender_config(
    opts: *const pw_options,
    addr: Option<&str>,
) -> Result<SenderConfig, Error> {
    // SAFETY: as the caller promises.
    let o = unsafe { options(opts) }?;
    let tls = match &o.tls_dir {
        Some(d) => {
            let host = match (&o.tls_hostname, addr) {
                (Some(h), _) => h.as_str(),
                (None, Some(a)) => pw::tls::host_of(a),
                (None, None) => {
                    return Err(invalid(
                        "tls_hostname must name the receiver's certificate: handed-in connections have no address to take it from",
                    ))
                }
            };
            Some(TlsClient::new(tls_files(d, "client").load()?, host)?)
        }
        None => None,
    };
    let defaults = SenderConfig::default();
    Ok(SenderConfig {
        channels: o.channels,
        tls,
        psk: o.psk()?,
        compression: o.compression,
        max_bandwidth_bytes_per_s: o.max_bandwidth_bytes_per_s,
        idle_timeout_ms: o.idle_timeout_ms,
        cores: o.cores,
        congestion: o.congestion,
        page_checksums: !o.unchecked_pages,
        pinning: o.pinning.unwrap_or(defaults.pinning),
        ..defaults
    })
}

/// A connecting sender's settings ([`sender_config`]) with the canceller of the control in
/// `opts`, if any, which this claims (see [`pw_control::claim`]). Called before the connect
/// blocks: the control itself is not touched afterwards.
///
/// # Safety
/// As for [`options`], and `control` null or from a `pw_control_*` constructor, not freed.
pub(crate) unsafe fn claimed_config(
    opts: *const pw_options,
    addr: Option<&str>,
) -> Result<(SenderConfig, Option<Claim>), Error> {
    // SAFETY: as the caller promises.
    let mut config = unsafe { sender_config(opts, addr) }?;
    // SAFETY: null or valid, and `control` null or live (caller).
    let claim = unsafe { opts.as_ref().and_then(|o| o.control.as_ref()) }
        .map(pw_control::claim)
        .transpose()?;
    config.canceller = claim.as_ref().map(|c| c.canceller.clone());
    Ok((config, claim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn with_tls(dir: &CString, hostname: Option<&CString>) -> pw_options {
        pw_options {
            channels: 0,
            tls_dir: dir.as_ptr(),
            idle_timeout_ms: 0,
            cores: std::ptr::null(),
            congestion: std::ptr::null(),
            unchecked_pages: 0,
            psk_file: std::ptr::null(),
            compress: std::ptr::null(),
            max_bandwidth_bytes_per_s: 0,
            tls_hostname: hostname.map_or(std::ptr::null(), |h| h.as_ptr()),
            control: std::ptr::null(),
            pinning: std::ptr::null(),
        }
    }

    /// Each side's default placement unless `pinning` names one; a name pagewire does not know
    /// is refused with the ones it does.
    #[test]
    fn pinning_is_each_sides_default_unless_named() {
        let plain = pw_options {
            tls_dir: std::ptr::null(),
            ..with_tls(&CString::new("unused").unwrap(), None)
        };
        let sent = |o: &pw_options| {
            // SAFETY: the options' strings outlive the call.
            unsafe { sender_config(o, Some("127.0.0.1:1")) }
        };
        let received = |o: &pw_options| {
            // SAFETY: the options' strings outlive the call.
            unsafe { receiver_config(o) }
        };
        assert_eq!(sent(&plain).unwrap().pinning, Pinning::Cores);
        assert_eq!(received(&plain).unwrap().pinning, Pinning::Nodes);
        for (name, want) in [
            ("cores", Pinning::Cores),
            ("cores-reversed", Pinning::CoresReversed),
            ("nodes", Pinning::Nodes),
            ("none", Pinning::None),
        ] {
            let name = CString::new(name).unwrap();
            let o = pw_options {
                pinning: name.as_ptr(),
                ..plain
            };
            assert_eq!(sent(&o).unwrap().pinning, want);
            assert_eq!(received(&o).unwrap().pinning, want);
        }
        let bad = CString::new("numa").unwrap();
        let o = pw_options {
            pinning: bad.as_ptr(),
            ..plain
        };
        let err = sent(&o).unwrap_err().to_string();
        assert!(
            err.contains("\"numa\"") && err.contains("\"nodes\""),
            "{err}"
        );
    }

    /// The receiver's certificate is checked against the name given, else the host the sender
    /// connects to; never a fixed name that every receiver's certificate would have to carry.
    #[test]
    fn the_receiver_name_tls_checks_is_given_or_the_connected_host() {
        let certs = tempfile::tempdir().unwrap();
        pw::tls::certs::generate(&pw::tls::certs::CertOptions::default())
            .unwrap()
            .write(certs.path())
            .unwrap();
        let dir = CString::new(certs.path().to_str().unwrap()).unwrap();
        let name = |o: &pw_options, addr| {
            // SAFETY: the strings outlive the call.
            let config = unsafe { sender_config(o, addr) }?;
            Ok::<_, Error>(format!("{:?}", config.tls.unwrap().server_name()))
        };
        let host = CString::new("receiver.example").unwrap();
        let given = name(&with_tls(&dir, Some(&host)), Some("10.0.0.2:4444")).unwrap();
        assert!(given.contains("receiver.example"), "{given}");
        let connected = name(&with_tls(&dir, None), Some("10.0.0.2:4444")).unwrap();
        assert!(connected.contains("[10, 0, 0, 2]"), "{connected}");
        // Handed-in connections: no address to take the name from.
        let err = name(&with_tls(&dir, None), None).unwrap_err();
        assert!(err.to_string().contains("tls_hostname"), "{err}");
    }
}
