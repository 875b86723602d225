//! `pagewire`: move guest memory between hosts, or run the loopback demo.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pagewire::pipeline::compress::Compression;
use pagewire::synth::{self, Content};
use pagewire::tls::{certs, TlsClient, TlsFiles, TlsServer};
use pagewire::{
    GuestMemory, Pinning, Progress, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig,
    TransferStats, ZeroCopy,
};

#[derive(Parser)]
#[command(
    name = "pagewire",
    version,
    about = "io_uring transfer engine for VM live migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive guest memory from a sender.
    Recv(RecvArgs),
    /// Send guest memory (a RAM image) to a receiver.
    Send(SendArgs),
    /// Migrate a synthetic guest memory over loopback and verify it (the embedded default).
    Demo(DemoArgs),
    /// Write a CA plus server and client certificate pairs for trying TLS (QEMU's file names).
    Certs(CertsArgs),
}

#[derive(Args)]
struct TlsArgs {
    /// This side's certificate chain (PEM). TLS is on when --tls-cert, --tls-key and --tls-ca
    /// are given.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// CA certificate the peer's chain must lead to (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }
}

#[derive(Args)]
struct CertsArgs {
    /// Directory to write ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem and
    /// client-key.pem into.
    #[arg(long)]
    out: PathBuf,
    /// Name in the server certificate (what senders pass as --tls-hostname).
    #[arg(long, default_value = "localhost")]
    hostname: String,
}

#[derive(Args)]
struct RecvArgs {
    /// Address to listen on, e.g. 0.0.0.0:7878.
    #[arg(long)]
    listen: String,
    /// Destination RAM image: an existing file of the sender's size, or a new one of --size.
    #[arg(long, required_unless_present = "size")]
    into: Option<PathBuf>,
    /// Destination size (e.g. 4GiB); without --into the memory is anonymous and discarded.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Channels to expect (default: whatever the sender uses).
    #[arg(long)]
    channels: Option<u16>,
    /// Do not pin shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Seconds to wait for a sender (default: indefinitely).
    #[arg(long)]
    timeout: Option<u64>,
    /// Print statistics as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args)]
struct SendArgs {
    /// Receiver address, e.g. dst-host:7878.
    #[arg(long)]
    connect: String,
    /// Source RAM image.
    #[arg(long)]
    from: PathBuf,
    /// Channels (shards), one per core is a good start.
    #[arg(long, default_value_t = 2)]
    channels: u16,
    /// Do not pin shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Zero-copy sends: auto (try, fall back when the kernel copies), on, off.
    #[arg(long, default_value_t = ZeroCopy::Auto)]
    zero_copy: ZeroCopy,
    /// Print statistics as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// Name the receiver's certificate must carry (default: the host part of --connect).
    #[arg(long, requires = "tls_cert")]
    tls_hostname: Option<String>,
    #[command(flatten)]
    compress: CompressArgs,
}

#[derive(Args)]
struct CompressArgs {
    /// Compression of normal pages: none, zstd, zlib, or auto (zstd while the link is the
    /// bottleneck).
    #[arg(long, default_value_t = Compression::None)]
    compress: Compression,
    /// zstd level; negative levels are zstd's fast modes.
    #[arg(long, default_value_t = pagewire::pipeline::compress::ZSTD_LEVEL_DEFAULT, allow_negative_numbers = true)]
    zstd_level: i32,
    /// Limit on the wire rate over all channels, e.g. 100Mbit, 1Gbit, 125MiB (per second; plain
    /// numbers are bytes). Unlimited by default.
    #[arg(long, value_parser = parse_rate)]
    max_bandwidth: Option<u64>,
}

/// Parses a rate per second: `125000000`, `125M`, `119MiB`, `1Gbit`, `100Mbit`, `10gbit`.
fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim().trim_end_matches("/s");
    let lower = t.to_ascii_lowercase();
    if let Some(bits) = lower
        .strip_suffix("bit")
        .or_else(|| lower.strip_suffix("bps"))
    {
        let split = bits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(bits.len());
        let (n, unit) = bits.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{text:?} is not a rate such as 100Mbit or 125MiB"))?;
        let mult: u64 = match unit {
            "" => 1,
            "k" => 1_000,
            "m" => 1_000_000,
            "g" => 1_000_000_000,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?}bit (use kbit, Mbit or Gbit)"
                ))
            }
        };
        let bytes = n.checked_mul(mult).ok_or("rate too large")? / 8;
        return if bytes == 0 {
            Err(format!("{text:?} is less than a byte per second"))
        } else {
            Ok(bytes)
        };
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a rate such as 100Mbit or 125MiB"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        other => return Err(format!("{text:?}: unknown unit {other:?}")),
    };
    let bytes = n.checked_mul(1 << shift).ok_or("rate too large")?;
    if bytes == 0 {
        return Err("the rate must be positive".into());
    }
    Ok(bytes)
}

#[derive(Args)]
struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Channels (shards) on each side.
    #[arg(long, default_value_t = 2)]
    channels: u16,
    /// Memory content: zero, random, mixed (half zero, half random), text, blend (realistic mix).
    #[arg(long, default_value = "blend")]
    content: Content,
    /// Seed of the synthetic content.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Zero-copy sends: auto, on, off.
    #[arg(long, default_value_t = ZeroCopy::Auto)]
    zero_copy: ZeroCopy,
    /// Do not pin shards to cores.
    #[arg(long)]
    no_pin: bool,
    /// Encrypt every channel with TLS 1.3, using certificates generated for the run.
    #[arg(long)]
    tls: bool,
    #[command(flatten)]
    compress: CompressArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Parses sizes like `4096`, `64K`, `512MiB`, `1G`, `2GiB` (binary units, as QEMU reads them).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a size: expected a number with an optional unit (K, M, G, T, KiB, MiB, GiB, TiB), e.g. 1GiB"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: number too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use K, M, G, T, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?}: size too large"))?;
    if bytes == 0 || bytes % pagewire::limits::PAGE_BYTES as u64 != 0 {
        return Err(format!(
            "{text:?} is {bytes} bytes; sizes must be a positive multiple of {} bytes (one page)",
            pagewire::limits::PAGE_BYTES
        ));
    }
    Ok(bytes)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Recv(a) => recv(a),
        Command::Send(a) => send(a),
        Command::Demo(a) => demo(a),
        Command::Certs(a) => certs(a),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn pinning(no_pin: bool, reversed: bool) -> Pinning {
    match (no_pin, reversed) {
        (true, _) => Pinning::None,
        (false, false) => Pinning::Cores,
        (false, true) => Pinning::CoresReversed,
    }
}

/// Shows a progress bar on a terminal while `progress` advances; call `finish` on the result.
fn progress_bar(
    progress: Arc<Progress>,
    label: &'static str,
) -> Option<(ProgressBar, std::thread::JoinHandle<()>)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} pages  {msg}  eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label);
    let b = bar.clone();
    let join = std::thread::spawn(move || {
        let started = Instant::now();
        while !b.is_finished() {
            let (done, total) = progress.pages();
            b.set_length(total.max(done));
            b.set_position(done);
            let wire = progress
                .wire_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            b.set_message(format!(
                "{:.0} MiB/s on the wire",
                wire as f64 / secs / (1 << 20) as f64
            ));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Some((bar, join))
}

fn finish_bar(bar: Option<(ProgressBar, std::thread::JoinHandle<()>)>) {
    if let Some((b, j)) = bar {
        b.finish_and_clear();
        let _ = j.join();
    }
}

fn recv(a: RecvArgs) -> Result<bool> {
    let tls = match a.tls.files() {
        Some(files) => Some(TlsServer::new(files.load()?)?),
        None => None,
    };
    let memory = match (&a.into, a.size) {
        (Some(path), size) if path.exists() => {
            let len = std::fs::metadata(path)
                .with_context(|| format!("reading the size of {}", path.display()))?
                .len();
            if let Some(size) = size.filter(|&s| s != len) {
                bail!(
                    "{} is {len} bytes but --size says {size}; refusing to resize an existing RAM image (remove it or drop --size)",
                    path.display()
                );
            }
            GuestMemory::from_file(path, true)?
        }
        (Some(path), Some(size)) => GuestMemory::create_file(path, size)?,
        (Some(path), None) => bail!(
            "{} does not exist; give --size to create it",
            path.display()
        ),
        (None, Some(size)) => GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: size }])?,
        (None, None) => bail!("give --into FILE or --size N"),
    };
    let config = ReceiverConfig {
        channels: a.channels,
        pinning: pinning(a.no_pin, false),
        accept_timeout_ms: a.timeout.map(|s| s * 1000),
        tls,
        ..ReceiverConfig::default()
    };
    let receiver = Receiver::bind(a.listen.as_str(), Arc::new(memory), config)?;
    eprintln!("pagewire: listening on {}", receiver.local_addr()?);
    let bar = progress_bar(receiver.progress(), "recv");
    let stats = receiver.run();
    finish_bar(bar);
    let stats = stats.context("receiving failed")?;
    report(&stats, None, a.json, "received")?;
    Ok(true)
}

fn send(a: SendArgs) -> Result<bool> {
    // Settings first: a bad TLS file is reported before any memory is mapped.
    let tls = match a.tls.files() {
        Some(files) => {
            let host = match &a.tls_hostname {
                Some(h) => h.clone(),
                None => host_of(&a.connect),
            };
            Some(TlsClient::new(files.load()?, &host)?)
        }
        None => None,
    };
    let memory = Arc::new(GuestMemory::from_file(&a.from, false)?);
    let config = SenderConfig {
        channels: a.channels,
        pinning: pinning(a.no_pin, false),
        zero_copy: a.zero_copy,
        tls,
        compression: a.compress.compress,
        zstd_level: a.compress.zstd_level,
        max_bandwidth_bytes_per_s: a.compress.max_bandwidth,
        ..SenderConfig::default()
    };
    let mut sender = Sender::connect(a.connect.as_str(), memory, &config).context("connecting")?;
    let bar = progress_bar(sender.progress(), "send");
    let result = sender.send_all().and_then(|_| sender.finish());
    finish_bar(bar);
    let stats = result.context("sending failed")?;
    report(&stats, None, a.json, "sent")?;
    Ok(true)
}

fn demo(a: DemoArgs) -> Result<bool> {
    pagewire::probe_uring()?;
    // Like a PC guest: RAM below 3 GiB at 0, the rest from 4 GiB.
    let low = a.size.min(3 << 30);
    let mut specs = vec![RegionSpec { gpa: 0, len: low }];
    if a.size > low {
        specs.push(RegionSpec {
            gpa: 4 << 30,
            len: a.size - low,
        });
    }
    let say = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    let t = Instant::now();
    let src = Arc::new(GuestMemory::anonymous(&specs)?);
    synth::fill(&src, a.content, a.seed);
    say(format!(
        "pagewire demo: {} MiB of {} memory generated in {:.2} s; migrating over loopback with {} channel(s){}",
        a.size >> 20,
        a.content.name(),
        t.elapsed().as_secs_f64(),
        a.channels,
        if a.tls { " over TLS 1.3" } else { "" }
    ));
    let dst = Arc::new(GuestMemory::anonymous(&specs)?);
    // With --tls: certificates made for this run, in a directory removed when the demo ends.
    let cert_dir = if a.tls {
        let dir =
            tempfile::tempdir().context("creating a directory for the demo's certificates")?;
        certs::generate(&certs::CertOptions::default())?.write(dir.path())?;
        Some(dir)
    } else {
        None
    };
    let (server_tls, client_tls) = match &cert_dir {
        Some(dir) => (
            Some(TlsServer::new(certs::server_files(dir.path()).load()?)?),
            Some(TlsClient::new(
                certs::client_files(dir.path()).load()?,
                "localhost",
            )?),
        ),
        None => (None, None),
    };
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst.clone(),
        ReceiverConfig {
            pinning: pinning(a.no_pin, true),
            accept_timeout_ms: Some(30_000),
            tls: server_tls,
            ..ReceiverConfig::default()
        },
    )?;
    let addr = receiver.local_addr()?;
    let rx = std::thread::spawn(move || receiver.run());
    let config = SenderConfig {
        channels: a.channels,
        pinning: pinning(a.no_pin, false),
        zero_copy: a.zero_copy,
        tls: client_tls,
        compression: a.compress.compress,
        zstd_level: a.compress.zstd_level,
        max_bandwidth_bytes_per_s: a.compress.max_bandwidth,
        ..SenderConfig::default()
    };
    let sent = Sender::connect(addr, src.clone(), &config).and_then(|mut sender| {
        let bar = if a.json {
            None
        } else {
            progress_bar(sender.progress(), "demo")
        };
        let r = sender.send_all().and_then(|_| sender.finish());
        finish_bar(bar);
        r
    });
    let received = rx
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?;
    let (sent, received) = match (sent, received) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), Ok(_)) => return Err(e).context("sending failed"),
        (Ok(_), Err(e)) => return Err(e).context("receiving failed"),
        (Err(s), Err(r)) => bail!(
            "the migration failed: the sender reports: {}; the receiver reports: {}",
            pagewire::error_chain(&s),
            pagewire::error_chain(&r)
        ),
    };
    let t = Instant::now();
    let difference = src.first_difference(&dst);
    say(format!(
        "verified destination against source in {:.2} s",
        t.elapsed().as_secs_f64()
    ));
    let verified = difference.is_none();
    report(&sent, Some((&received, verified)), a.json, "migrated")?;
    if let Some((region, page)) = difference {
        eprintln!("error: destination differs from source at region {region}, page {page}");
    }
    Ok(verified)
}

fn certs(a: CertsArgs) -> Result<bool> {
    let set = certs::generate(&certs::CertOptions {
        hostname: a.hostname.clone(),
        ..certs::CertOptions::default()
    })?;
    set.write(&a.out)?;
    println!(
        "wrote a CA and server/client pairs for {:?} to {}",
        a.hostname,
        a.out.display()
    );
    let d = a.out.display();
    println!("  receiver: --tls-cert {d}/server-cert.pem --tls-key {d}/server-key.pem --tls-ca {d}/ca-cert.pem");
    println!("  sender:   --tls-cert {d}/client-cert.pem --tls-key {d}/client-key.pem --tls-ca {d}/ca-cert.pem --tls-hostname {}", a.hostname);
    Ok(true)
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> String {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    match addr.rsplit_once(':') {
        Some((host, _)) => host.to_string(),
        None => addr.to_string(),
    }
}

fn report(
    stats: &TransferStats,
    receiver: Option<(&TransferStats, bool)>,
    json: bool,
    verb: &str,
) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(stats)?;
        if let Some((r, verified)) = receiver {
            v["verified"] = serde_json::Value::Bool(verified);
            v["sender_cpu_ms"] = stats.cpu_ms.into();
            v["receiver_cpu_ms"] = r.cpu_ms.into();
            v["receiver_cpu_s_per_gib"] = r.cpu_s_per_gib.into();
            v["receiver"] = serde_json::to_value(r)?;
        }
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let gib = ((stats.normal_pages + stats.zero_pages) * 4096) as f64 / (1u64 << 30) as f64;
    println!(
        "pagewire: {verb} {gib:.2} GiB over {} channel(s)",
        stats.channels
    );
    let rows: Vec<(&str, String)> = vec![
        ("total time", format!("{:.1} ms", stats.total_time_ms)),
        (
            "throughput",
            format!(
                "{:.0} Mbit/s ({:.2} GiB/s of guest memory)",
                stats.mbps, stats.gib_per_s
            ),
        ),
        (
            "transferred (wire)",
            format!("{} bytes", stats.transferred_bytes),
        ),
        (
            "normal pages",
            format!("{} ({} bytes)", stats.normal_pages, stats.normal_bytes),
        ),
        ("zero (duplicate) pages", stats.zero_pages.to_string()),
        (
            "cpu, this side",
            format!(
                "{:.0} ms ({:.2} CPU-s/GiB)",
                stats.cpu_ms, stats.cpu_s_per_gib
            ),
        ),
        (
            "zero-copy sends",
            format!(
                "{} completed, {} copied by the kernel, {} shard(s) fell back to plain sends",
                stats.zero_copy.completed, stats.zero_copy.copied, stats.zero_copy.fallbacks
            ),
        ),
        ("zero scan", stats.zero_scan.to_string()),
        (
            "compressed frames",
            format!(
                "{} (ratio {:.2})",
                stats.compressed_frames, stats.compression_ratio
            ),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<24} {v}");
    }
    if let Some((r, verified)) = receiver {
        println!(
            "  {:<24} {:.0} ms ({:.2} CPU-s/GiB)",
            "cpu, receiver", r.cpu_ms, r.cpu_s_per_gib
        );
        println!(
            "  {:<24} {}",
            "verified",
            if verified {
                "yes: destination equals source"
            } else {
                "NO"
            }
        );
    }
    println!("  per shard:");
    for s in &stats.shards {
        println!(
            "    channel {:>2}  core {:>4}  {:>8.1} MiB  {:>6} frames  busy {:>7.1} ms  cpu {:>7.1} ms{}",
            s.channel,
            s.core.map_or("-".to_string(), |c| c.to_string()),
            s.wire_bytes as f64 / (1 << 20) as f64,
            s.frames,
            s.busy_ms,
            s.cpu_ms,
            if s.zc_fallback { "  (zero-copy fell back)" } else { "" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn rates_parse_in_bits_or_bytes() {
        use super::parse_rate;
        assert_eq!(parse_rate("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("10gbit/s"), Ok(1_250_000_000));
        assert_eq!(parse_rate("125MiB"), Ok(125 << 20));
        assert_eq!(parse_rate("4096"), Ok(4096));
        for bad in ["", "fast", "0", "3parsec", "1xbit"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_units_and_reject_nonsense() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        for bad in ["", "GiB", "12 parsecs", "100", "0", "99999999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
