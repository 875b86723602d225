//! `pagewire`: move guest memory between hosts, or run the loopback demo.
//!
//! Every option is checked before anything listens, connects or maps memory; errors are one
//! clear line (or, with `--json`, one JSON object `{"error": ..., "cause": ...}`) and a non-zero
//! exit. A closed standard output (`pagewire demo | head -1`) ends the program quietly.

mod demo;
mod interrupt;
mod report;
mod transfer;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pagewire::auth::Psk;
use pagewire::dirty::SharedBitmap;
use pagewire::limits::{CHANNELS_MAX, IDLE_TIMEOUT_MS_MAX, IDLE_TIMEOUT_MS_MIN};
use pagewire::live::dirtier::{DirtierConfig, SoftwareDirtier};
use pagewire::live::{DowntimeLimit, Migration, MigrationHandle, Status};
use pagewire::pipeline::compress::Compression;
use pagewire::profile::Profile;
use pagewire::synth::{self, Content};
use pagewire::tls::{certs, TlsClient, TlsFiles, TlsServer};
use pagewire::units::{parse_duration_ms, parse_rate, parse_size};
use pagewire::{
    GuestMemory, ImageFile, Pinning, Progress, Receiver, ReceiverConfig, RegionSpec, Sender,
    SenderConfig, TransferStats, ZeroCopy,
};

use demo::demo;
use report::{finish_display, report, start_display};
use transfer::{recv, send};

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
    /// Write a new pre-shared key (QEMU's keys.psk format) for --psk-file.
    Psk(PskArgs),
}

#[derive(Args)]
struct PskArgs {
    /// File to write (refuses to overwrite one that exists).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct TlsArgs {
    /// This side's certificate chain (PEM). TLS is on when --tls-cert, --tls-key and --tls-ca
    /// are given (or --tls-dir).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// CA certificate the peer's chain must lead to (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// A directory with QEMU's x509 file names (what `pagewire certs` writes): ca-cert.pem, and
    /// server-cert.pem/server-key.pem (recv) or client-cert.pem/client-key.pem (send).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    tls_dir: Option<PathBuf>,
    /// Without TLS: a pre-shared key both ends hold (QEMU's keys.psk format, `pagewire psk`
    /// writes one). It authenticates both ends and protects every byte.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_dir"])]
    psk_file: Option<PathBuf>,
}

impl TlsArgs {
    fn psk(&self) -> Result<Option<Psk>> {
        self.psk_file
            .as_deref()
            .map(Psk::from_file)
            .transpose()
            .map_err(Into::into)
    }
}

impl TlsArgs {
    /// The files to load, for a receiver (`server`) or a sender; checked to exist now.
    fn files(&self, server: bool) -> Result<Option<TlsFiles>> {
        let files = match (&self.tls_dir, &self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(dir), ..) => {
                if !dir.is_dir() {
                    bail!("--tls-dir {} is not a directory", dir.display());
                }
                if server {
                    certs::server_files(dir)
                } else {
                    certs::client_files(dir)
                }
            }
            (None, Some(cert), Some(key), Some(ca)) => TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            },
            _ => return Ok(None),
        };
        for (path, what) in [
            (&files.cert, "certificate"),
            (&files.key, "private key"),
            (&files.ca, "CA certificate"),
        ] {
            if !path.is_file() {
                bail!(
                    "the TLS {what} {} does not exist or is not a file",
                    path.display()
                );
            }
        }
        Ok(Some(files))
    }
}

/// Options both ends share.
#[derive(Args)]
struct CommonArgs {
    /// Give up on the peer after this long without a byte moving on a channel, e.g. 30s, 500ms,
    /// 2m. Senders keep idle channels alive with keepalive frames, so it can stay short.
    #[arg(long, value_parser = parse_duration_ms, default_value = "30s")]
    idle_timeout: u64,
    /// Print statistics as one JSON object (errors too: {"error": ..., "cause": ...}).
    #[arg(long)]
    json: bool,
    /// Print one JSON progress line per second (instead of the progress bar), then the
    /// statistics as the last line (like iperf3's --json-stream).
    #[arg(long)]
    json_stream: bool,
}

#[derive(Args)]
struct CertsArgs {
    /// Directory to write ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem,
    /// client-cert.pem and client-key.pem into (created if missing; refused if it holds any of
    /// them already: nothing is replaced).
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
    /// Destination RAM image: an existing file of the sender's size, or a new one (of --size,
    /// or of the size the sender announces).
    #[arg(long)]
    into: Option<PathBuf>,
    /// Destination size (e.g. 4GiB). Without it, a new destination takes the size the sender's
    /// hello announces (up to --max-size). Without --into the memory is anonymous and
    /// discarded (a throughput test).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// The largest destination a sender may ask for when --size is not given.
    #[arg(long, value_parser = parse_size, default_value = "4TiB")]
    max_size: u64,
    /// Channels to expect (default: whatever the sender uses).
    #[arg(long, value_parser = parse_channels)]
    channels: Option<u16>,
    /// Do not pin shards to cores: the scheduler places them (on a host where other work keeps
    /// some cores busy, see `pagewire-tune probe`).
    #[arg(long)]
    no_pin: bool,
    /// Pin shards only to these cores, e.g. 0-3,8 (leave out the cores that run vCPUs or other
    /// busy work). Within them shards go near the memory they move (NUMA) and the NIC. Default:
    /// every allowed core.
    #[arg(long, value_parser = parse_cores, conflicts_with = "no_pin")]
    cores: Option<Vec<usize>>,
    /// Listen on a non-loopback address with neither TLS nor --psk-file (anyone who can
    /// connect could write the destination memory).
    #[arg(long)]
    insecure: bool,
    /// Accept a plaintext sender that sends pages without checksums (its --no-page-checksums):
    /// pages are then covered by TCP's checksum only, and success means every page was
    /// placed, not verified. Without it such a sender is refused.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_dir", "psk_file"])]
    accept_unchecked_pages: bool,
    /// How long to wait for a sender to complete its handshake, e.g. 60s (default: forever).
    /// Connections that fail theirs are logged and dropped meanwhile.
    #[arg(long, value_parser = parse_wait_ms)]
    timeout: Option<u64>,
    #[command(flatten)]
    common: CommonArgs,
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
    /// Channels (shards): a count, or auto (the --profile's; without one, measured briefly:
    /// enough channels for the link's speed at the rate one channel moves this memory here).
    /// Default: the --profile's, else 2.
    #[arg(long, value_parser = parse_channel_choice)]
    channels: Option<ChannelChoice>,
    /// A tuning profile (`pagewire-tune sweep` writes one): its channels, zero-copy and
    /// compression, unless given here.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Do not pin shards to cores: the scheduler places them (on a host where other work keeps
    /// some cores busy, see `pagewire-tune probe`).
    #[arg(long)]
    no_pin: bool,
    /// Pin shards only to these cores, e.g. 0-3,8 (leave out the cores that run vCPUs or other
    /// busy work). Within them shards go near the memory they move (NUMA) and the NIC. Default:
    /// every allowed core.
    #[arg(long, value_parser = parse_cores, conflicts_with = "no_pin")]
    cores: Option<Vec<usize>>,
    /// Zero-copy sends: auto (try, fall back when the kernel copies), on, off. Default: auto
    /// (or the --profile's).
    #[arg(long)]
    zero_copy: Option<ZeroCopy>,
    /// Plaintext only: send pages without their checksums, covered by TCP's checksum alone (as
    /// QEMU's multifd sends them). Saves CPU on both sides where the CPU, not the link, is the
    /// bound; the receiver must run with --accept-unchecked-pages.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_dir", "psk_file"])]
    no_page_checksums: bool,
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Name the receiver's certificate must carry (default: the host part of --connect).
    #[arg(long)]
    tls_hostname: Option<String>,
    #[command(flatten)]
    compress: CompressArgs,
}

#[derive(Args)]
struct CompressArgs {
    /// Compression of normal pages: none, zstd, zlib, or auto (zstd while the link is the
    /// bottleneck). Default: none (for `send`, a --profile's).
    #[arg(long)]
    compress: Option<Compression>,
    /// zstd level (default 1); negative levels are zstd's fast modes. Only with --compress zstd
    /// or auto.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_zstd_level)]
    zstd_level: Option<i32>,
    /// Limit on the wire rate over all channels, e.g. 100Mbit, 1Gbit, 10Gbit, 1Tbit, 125MiB
    /// (per second; plain numbers are bytes). Unlimited by default.
    #[arg(long, value_parser = parse_rate)]
    max_bandwidth: Option<u64>,
    /// TCP congestion control of the channels, e.g. cubic or bbr (one this kernel offers:
    /// /proc/sys/net/ipv4/tcp_available_congestion_control). Default: the host's.
    #[arg(long)]
    congestion: Option<String>,
}

impl CompressArgs {
    /// The compression asked for (none when not given).
    fn compression(&self) -> Compression {
        self.compress.unwrap_or(Compression::None)
    }

    /// The zstd level to use, refusing a level that no codec would use.
    fn level(&self) -> Result<i32> {
        match (self.compression(), self.zstd_level) {
            (Compression::Zstd | Compression::Auto, Some(l)) => Ok(l),
            (c, Some(_)) => bail!("--zstd-level applies to --compress zstd or auto, not {c}"),
            (_, None) => Ok(pagewire::pipeline::compress::ZSTD_LEVEL_DEFAULT),
        }
    }
}

fn parse_zstd_level(text: &str) -> Result<i32, String> {
    let level: i32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a zstd level (an integer such as 1 or -5)"))?;
    pagewire::pipeline::compress::check_zstd_level(level)?;
    Ok(level)
}

fn parse_channels(text: &str) -> Result<u16, String> {
    let n: u64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a channel count"))?;
    if n == 0 || n > CHANNELS_MAX as u64 {
        return Err(format!(
            "channels must be between 1 and {CHANNELS_MAX}, got {n}"
        ));
    }
    Ok(n as u16)
}

/// A wait that must be able to end in anything but failure: above zero.
fn parse_wait_ms(text: &str) -> Result<u64, String> {
    match parse_duration_ms(text)? {
        0 => Err(format!(
            "{text:?}: a wait of zero would give up at once; leave the option out to wait for ever"
        )),
        ms => Ok(ms),
    }
}

/// An idle timeout within the library's bounds.
/// `--channels`: a count or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelChoice {
    Auto,
    Count(u16),
}

fn parse_channel_choice(text: &str) -> Result<ChannelChoice, String> {
    if text == "auto" {
        Ok(ChannelChoice::Auto)
    } else {
        parse_channels(text).map(ChannelChoice::Count)
    }
}

fn parse_cores(text: &str) -> Result<Vec<usize>, String> {
    match pagewire::placement::parse_cpu_list(text) {
        Some(list) if !list.is_empty() => Ok(list),
        _ => Err(format!("{text:?} is not a core list (like 0-3,8,10-11)")),
    }
}

fn idle_ms(ms: u64) -> Result<u64> {
    if !(IDLE_TIMEOUT_MS_MIN..=IDLE_TIMEOUT_MS_MAX).contains(&ms) {
        bail!(
            "--idle-timeout must be between {IDLE_TIMEOUT_MS_MIN} ms and {} s, got {ms} ms",
            IDLE_TIMEOUT_MS_MAX / 1000
        );
    }
    Ok(ms)
}

#[derive(Args)]
struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Channels (shards) on each side.
    #[arg(long, default_value_t = 2, value_parser = parse_channels)]
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
    #[arg(long, conflicts_with = "psk")]
    tls: bool,
    /// Authenticate and protect every channel with a pre-shared key generated for the run.
    #[arg(long)]
    psk: bool,
    /// Send plaintext pages without checksums (the receiver accepts them), as QEMU's multifd
    /// does: see `pagewire send --no-page-checksums`.
    #[arg(long, conflicts_with_all = ["tls", "psk"])]
    no_page_checksums: bool,
    /// Migrate a running guest live: the tiny KVM guest (or, where /dev/kvm cannot run one, a
    /// software dirtier, which the demo says) writes memory while pre-copy rounds run, until
    /// the rest fits the downtime limit and the guest is paused for the last round.
    #[arg(long)]
    live: bool,
    /// With --live: bytes per second the guest writes, e.g. 200MB/s, 1GiB.
    #[arg(long, default_value = "200MB", value_parser = parse_rate, requires = "live")]
    dirty_rate: u64,
    /// With --live: the longest pause the guest may see, e.g. 300ms.
    #[arg(long, default_value = "300ms", value_parser = parse_duration_ms, requires = "live")]
    downtime_limit: u64,
    /// With --live: throttle the guest's vCPU while it dirties memory faster than the rounds
    /// send it, as QEMU's auto-converge does (20%, then 10% more every two such rounds, up to
    /// 99%), e.g. with --dirty-rate 1GB --max-bandwidth 200MB.
    #[arg(long, requires = "live")]
    auto_converge: bool,
    #[command(flatten)]
    compress: CompressArgs,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() {
    // Writing to a closed pipe ends the process quietly, as for any Unix filter, instead of a
    // panic in `println!` (sockets use MSG_NOSIGNAL, so only standard output is affected). The
    // live display of a running transfer blocks it in its thread and cancels the transfer
    // first, so nothing is left behind (see `interrupt`).
    // SAFETY: setting a signal disposition to SIG_DFL has no memory-safety preconditions; no
    // other thread exists yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; none in a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let wants_json = std::env::args_os().any(|a| a == "--json" || a == "--json-stream");
            if wants_json && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
            {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
                let v = serde_json::json!({
                    "error": first.trim_start_matches("error: "),
                    "cause": text.trim(),
                });
                let _ = writeln!(std::io::stdout(), "{v}");
                std::process::exit(2);
            }
            e.exit()
        }
    };
    let (json, stream) = match &cli.command {
        Command::Recv(a) => (a.common.json || a.common.json_stream, a.common.json_stream),
        Command::Send(a) => (a.common.json || a.common.json_stream, a.common.json_stream),
        Command::Demo(a) => (a.common.json || a.common.json_stream, a.common.json_stream),
        Command::Certs(_) | Command::Psk(_) => (false, false),
    };
    interrupt::install();
    let result = match cli.command {
        Command::Recv(a) => recv(a),
        Command::Send(a) => send(a),
        Command::Demo(a) => demo(a),
        Command::Certs(a) => certs(a),
        Command::Psk(a) => psk_file(a),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            if json {
                let mut v = serde_json::json!({
                    "error": e.to_string(),
                    "cause": format!("{e:#}"),
                });
                // A --json-stream reader waits for the last line's event, on failure too.
                if stream {
                    v["event"] = "error".into();
                }
                let _ = writeln!(std::io::stdout(), "{v}");
            } else {
                eprintln!("error: {e:#}");
            }
            if let Some(signal) = interrupt::taken() {
                // Cancelled and reported: now end as the signal would have.
                interrupt::die_by(signal);
            }
            std::process::exit(1);
        }
    }
}

/// The library's placement for each side unless `--no-pin`: a sender's shards on one core
/// each, a receiver's on the cores of their node (`Pinning::Nodes`, so that a core other
/// work keeps busy does not hold up every wake-up of a receive shard).
fn pinning(no_pin: bool, receiver: bool) -> Pinning {
    match (no_pin, receiver) {
        (true, _) => Pinning::None,
        (false, false) => Pinning::Cores,
        (false, true) => Pinning::Nodes,
    }
}

fn psk_file(a: PskArgs) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.out)
        .with_context(|| format!("creating {}", a.out.display()))?;
    f.write_all(Psk::generate_line().as_bytes())?;
    println!(
        "wrote a new pre-shared key to {} (mode 0600); copy it to both hosts and give both --psk-file {}",
        a.out.display(),
        a.out.display()
    );
    Ok(true)
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
