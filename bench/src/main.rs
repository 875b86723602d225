//! `pagewire-bench`: pagewire against the machine's own ceilings, measured side by side in one
//! run on the same memory.
//!
//! `transfer` measures, interleaved A B A B over `--reps` repetitions (these machines drift):
//! (a) raw TCP: the same bytes through the same number of plain loopback sockets, 1 MiB blocking
//!     writes from the source memory and `MSG_WAITALL` reads into the destination memory;
//! (b) pagewire over loopback with the same channel count, source and destination;
//! (c) all-zero memory (written zero pages, so DRAM is really read) sent by pagewire, against a
//!     one-core read scan of the same buffer with the engine's zero scanner.
//! Destinations are pre-faulted fresh for every run of either engine, so page faults are not
//! measured. Reported: median and spread of throughput, the ratios, and CPU-seconds per GiB on
//! each side.

mod live;
mod matrix;
mod qemu;
mod remote;
mod seal;
mod shaped;
mod svg;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use pagewire::pipeline::compress::Compression;
use pagewire::pipeline::zero::ZeroScanner;
use pagewire::synth::{fill, Content};
use pagewire::sys::thread_cpu_time;
use pagewire::tls::{certs, TlsClient, TlsServer};
use pagewire::{
    GuestMemory, Pinning, Receiver, ReceiverConfig, RegionSpec, Sender, SenderConfig, ZeroCopy,
};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "pagewire-bench",
    version,
    about = "pagewire benchmarks against measured ceilings"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// pagewire vs raw TCP on the same memory, and zero pages vs a one-core scan.
    Transfer(TransferArgs),
    /// Plain vs TLS at 1 and 2 channels, and one-core seal rates (AEAD, pagewire, rustls).
    Tls(TlsBenchArgs),
    /// none / zstd / zlib / auto over shaped links between two network namespaces (needs root).
    Compress(CompressBenchArgs),
    /// Live migrations while a software dirtier writes the source: dirty rate × channels × TLS,
    /// with downtime, expected downtime, rounds, convergence and CPU.
    Live(live::LiveArgs),
    /// Every combination of channels, content, TLS, compression and zero-copy, against the
    /// machine's ceilings measured in the same run.
    Matrix(matrix::MatrixArgs),
    /// Payload checksum candidates, one core: XXH3 (pagewire's raw-pointer AVX-512, AVX2 and scalar, the
    /// xxhash-rust crate) and CRC32C (the crc32c crate), in cache and from DRAM.
    Checksum(ChecksumArgs),
    /// Seeded fault injection below the shards, thousands of runs: each must end complete and
    /// verified, or failed on both sides naming one cause (prints the seed of any that did not).
    Faults(FaultsArgs),
    /// The destination side of a two-host matrix (`matrix --peer` on the source).
    Serve {
        /// Address to listen on for the source's control connection, e.g. 0.0.0.0:7700.
        #[arg(long)]
        listen: String,
        /// Stop after this many sessions (default: serve until stopped).
        #[arg(long)]
        sessions: Option<u32>,
    },
}

#[derive(clap::Args)]
struct CompressBenchArgs {
    /// Link rates in Mbit/s.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    links: Vec<u64>,
    /// Memory contents.
    #[arg(long, value_delimiter = ',', default_value = "text,mixed")]
    content: Vec<Content>,
    /// Repetitions (interleaved across modes); the median is reported.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Small images (about half a second per cell).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct FaultsArgs {
    /// Seeds to run (each a whole transfer), split between plaintext and TLS.
    #[arg(long, default_value_t = 2000)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// The idle bound of both sides, e.g. 600ms.
    #[arg(long, default_value = "600ms", value_parser = pagewire::units::parse_duration_ms)]
    idle: u64,
    /// Where the faults sit: under the shards on io_uring and loopback sockets (`uring`), on
    /// the simulated transport (`sim`), or alternating seed by seed (`both`).
    #[arg(long, default_value = "both", value_parser = ["uring", "sim", "both"])]
    transport: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ChecksumArgs {
    /// Bytes hashed per call (a frame's payload is at most 512 KiB).
    #[arg(long, default_value = "512KiB", value_parser = pagewire::units::parse_size)]
    chunk: u64,
    /// Memory streamed from DRAM for the out-of-cache figures.
    #[arg(long, default_value = "1GiB", value_parser = pagewire::units::parse_size)]
    size: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TlsBenchArgs {
    /// Memory to move (random pages), e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = pagewire::units::parse_size)]
    size: u64,
    /// Repetitions of each transfer (interleaved plain, TLS).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Do not pin threads.
    #[arg(long)]
    no_pin: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TransferArgs {
    /// Memory for the raw-TCP comparison, e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = pagewire::units::parse_size)]
    size: u64,
    /// Memory for the zero-page comparison, e.g. 4GiB.
    #[arg(long, default_value = "4GiB", value_parser = pagewire::units::parse_size)]
    zero_size: u64,
    /// Channels (pagewire) and streams (raw TCP).
    #[arg(long, default_value_t = 2)]
    channels: u16,
    /// Content for the raw-TCP comparison.
    #[arg(long, default_value = "random")]
    content: Content,
    /// Repetitions of each measurement (interleaved).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Zero-copy policy for pagewire.
    #[arg(long, default_value_t = ZeroCopy::Auto)]
    zero_copy: ZeroCopy,
    /// Do not pin threads (applies to both engines).
    #[arg(long)]
    no_pin: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// One timed run.
#[derive(Debug, Clone, Copy, Serialize)]
struct Run {
    seconds: f64,
    sender_cpu_s: f64,
    receiver_cpu_s: f64,
}

/// Median and spread of several runs of one engine.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    engine: &'static str,
    bytes: u64,
    gib_per_s_median: f64,
    gib_per_s_min: f64,
    gib_per_s_max: f64,
    sender_cpu_s_per_gib: f64,
    receiver_cpu_s_per_gib: f64,
}

/// The median of `v` (sorted in place): the mean of the two middle values for an even count,
/// so two repetitions report their mean, not the faster one. NaN when empty.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn summarize(engine: &'static str, bytes: u64, runs: &[Run]) -> Summary {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let mut rates: Vec<f64> = runs.iter().map(|r| gib / r.seconds).collect();
    let mut s: Vec<f64> = runs.iter().map(|r| r.sender_cpu_s / gib).collect();
    let mut r: Vec<f64> = runs.iter().map(|r| r.receiver_cpu_s / gib).collect();
    Summary {
        engine,
        bytes,
        gib_per_s_median: median(&mut rates),
        gib_per_s_min: rates[0],
        gib_per_s_max: rates[rates.len() - 1],
        sender_cpu_s_per_gib: median(&mut s),
        receiver_cpu_s_per_gib: median(&mut r),
    }
}

fn cores(no_pin: bool) -> Vec<core_affinity::CoreId> {
    if no_pin {
        Vec::new()
    } else {
        core_affinity::get_core_ids().unwrap_or_default()
    }
}

fn pin(cores: &[core_affinity::CoreId], i: usize, reversed: bool) {
    if cores.is_empty() {
        return;
    }
    let k = i % cores.len();
    let core = if reversed {
        cores[cores.len() - 1 - k]
    } else {
        cores[k]
    };
    core_affinity::set_for_current(core);
}

/// Byte range of stream `i` of `streams` over `total` bytes (the last takes the remainder).
fn share(total: usize, streams: usize, i: usize) -> (usize, usize) {
    let each = total / streams;
    let len = if i == streams - 1 {
        total - i * each
    } else {
        each
    };
    (i * each, len)
}

/// Sends `len` bytes from `src_addr + offset` over `stream` in 1 MiB blocking writes; returns the
/// thread's CPU seconds. `src_addr` is the host address of a mapping that outlives the call.
fn raw_send_share(stream: &TcpStream, src_addr: usize, offset: usize, len: usize) -> Result<f64> {
    const WRITE_BYTES: usize = 1 << 20;
    let cpu = thread_cpu_time();
    let mut done = 0;
    while done < len {
        let n = WRITE_BYTES.min(len - done);
        // SAFETY: the caller's mapping covers src_addr + offset .. + len and outlives the call;
        // the kernel only reads it.
        let rc = unsafe {
            libc::send(
                stream.as_raw_fd(),
                (src_addr + offset + done) as *const libc::c_void,
                n,
                libc::MSG_NOSIGNAL,
            )
        };
        if rc <= 0 {
            bail!("raw send failed: {}", std::io::Error::last_os_error());
        }
        done += rc as usize;
    }
    Ok((thread_cpu_time() - cpu).as_secs_f64())
}

/// Receives `len` bytes into `dst_addr + offset` with `MSG_WAITALL`; returns CPU seconds.
fn raw_recv_share(stream: &TcpStream, dst_addr: usize, offset: usize, len: usize) -> Result<f64> {
    let cpu = thread_cpu_time();
    let mut done = 0;
    while done < len {
        // SAFETY: the caller's mapping covers dst_addr + offset .. + len and outlives the call;
        // each stream writes a disjoint range.
        let rc = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                (dst_addr + offset + done) as *mut libc::c_void,
                len - done,
                libc::MSG_WAITALL,
            )
        };
        if rc <= 0 {
            bail!("raw recv ended early: {}", std::io::Error::last_os_error());
        }
        done += rc as usize;
    }
    Ok((thread_cpu_time() - cpu).as_secs_f64())
}

/// (a) raw TCP: stream i moves bytes [i*share, (i+1)*share) of the single region, from the
/// source mapping straight into the same range of the destination mapping.
fn raw_tcp(src: &GuestMemory, dst: &GuestMemory, channels: usize, no_pin: bool) -> Result<Run> {
    let total = src.regions()[0].len() as usize;
    let src_addr = src.regions()[0].host_addr() as usize;
    let dst_addr = dst.regions()[0].host_addr() as usize;
    let cores = cores(no_pin);
    let start = Instant::now();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(channels);
    for _ in 0..channels {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        pairs.push((client, server));
    }
    let mut threads = Vec::with_capacity(2 * channels);
    for (i, (client, server)) in pairs.into_iter().enumerate() {
        let (offset, len) = share(total, channels, i);
        let c = cores.clone();
        threads.push(std::thread::spawn(move || -> Result<(bool, f64)> {
            pin(&c, i, false);
            Ok((true, raw_send_share(&client, src_addr, offset, len)?))
        }));
        let c = cores.clone();
        threads.push(std::thread::spawn(move || -> Result<(bool, f64)> {
            pin(&c, i, true);
            Ok((false, raw_recv_share(&server, dst_addr, offset, len)?))
        }));
    }
    let (mut sender_cpu, mut receiver_cpu) = (0.0, 0.0);
    for t in threads {
        let (is_sender, cpu) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a raw TCP thread panicked"))??;
        if is_sender {
            sender_cpu += cpu;
        } else {
            receiver_cpu += cpu;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if src.first_difference(dst).is_some() {
        bail!("raw TCP destination differs from the source");
    }
    Ok(Run {
        seconds,
        sender_cpu_s: sender_cpu,
        receiver_cpu_s: receiver_cpu,
    })
}

/// (b) pagewire over loopback, end to end: from connect until the receiver confirmed every page.
/// How a benchmarked pagewire transfer protects its channels.
#[derive(Clone, Copy)]
enum Security<'a> {
    /// Plaintext (payload checksums only).
    Plain,
    /// TLS 1.3 with these certificates.
    Tls(&'a (TlsClient, TlsServer)),
    /// A pre-shared key.
    Psk(&'a pagewire::auth::Psk),
}

impl<'a> From<Option<&'a (TlsClient, TlsServer)>> for Security<'a> {
    fn from(tls: Option<&'a (TlsClient, TlsServer)>) -> Self {
        tls.map_or(Security::Plain, Security::Tls)
    }
}

fn pagewire_run<'a>(
    src: Arc<GuestMemory>,
    dst: Arc<GuestMemory>,
    channels: u16,
    zero_copy: ZeroCopy,
    no_pin: bool,
    security: impl Into<Security<'a>>,
    compression: Compression,
) -> Result<(Run, pagewire::TransferStats)> {
    let security = security.into();
    let (tls, psk) = match security {
        Security::Plain => (None, None),
        Security::Tls(t) => (Some(t), None),
        Security::Psk(k) => (None, Some(k.clone())),
    };
    let (send_pin, recv_pin) = if no_pin {
        (Pinning::None, Pinning::None)
    } else {
        (Pinning::Cores, Pinning::CoresReversed)
    };
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst,
        ReceiverConfig {
            pinning: recv_pin,
            accept_timeout_ms: Some(30_000),
            tls: tls.map(|t| t.1.clone()),
            psk: psk.clone(),
            ..ReceiverConfig::default()
        },
    )?;
    let addr = receiver.local_addr()?;
    let start = Instant::now();
    let rx = std::thread::spawn(move || receiver.run());
    let config = SenderConfig {
        channels,
        pinning: send_pin,
        zero_copy,
        tls: tls.map(|t| t.0.clone()),
        psk,
        compression,
        ..SenderConfig::default()
    };
    let mut sender = Sender::connect(addr, src, &config)?;
    sender.send_all()?;
    let sent = sender.finish()?;
    let received = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let seconds = start.elapsed().as_secs_f64();
    Ok((
        Run {
            seconds,
            sender_cpu_s: sent.cpu_ms / 1e3,
            receiver_cpu_s: received.cpu_ms / 1e3,
        },
        sent,
    ))
}

/// (c) one core reads the whole buffer through the zero scanner.
fn scan_run(mem: &GuestMemory) -> Run {
    let scanner = ZeroScanner::detect();
    let cpu = thread_cpu_time();
    let start = Instant::now();
    let mut zero = 0u64;
    for r in mem.regions() {
        for p in 0..r.pages() {
            zero += u64::from(r.page_is_zero(&scanner, p));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(zero, mem.total_pages(), "zero memory must scan as zero");
    Run {
        seconds,
        sender_cpu_s: (thread_cpu_time() - cpu).as_secs_f64(),
        receiver_cpu_s: 0.0,
    }
}

#[derive(Serialize)]
struct Report {
    machine: String,
    channels: u16,
    content: &'static str,
    reps: usize,
    raw_tcp: Summary,
    pagewire: Summary,
    pagewire_over_raw_tcp: f64,
    zero_pagewire: Summary,
    zero_one_core_scan: Summary,
    zero_pagewire_over_scan: f64,
    zero_copy_fallbacks: u64,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1u64 << 20) as f64);
    format!("{cpu}, {cores} cores, {memory_gib:.0} GiB memory, Linux {kernel}")
}

fn transfer(a: TransferArgs) -> Result<()> {
    if a.reps == 0 || a.channels == 0 {
        bail!("--reps and --channels must be positive");
    }
    pagewire::probe_uring().context("pagewire needs io_uring")?;
    let say = |s: &str| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let src = Arc::new(GuestMemory::anonymous(&spec)?);
    fill(&src, a.content, 11);
    let bytes = src.total_bytes();
    let mut raw = Vec::new();
    let mut pw = Vec::new();
    let mut fallbacks = 0;
    for rep in 0..a.reps {
        // A B A B: drift hits both engines alike.
        let dst = GuestMemory::anonymous_populated(&spec)?;
        raw.push(raw_tcp(&src, &dst, usize::from(a.channels), a.no_pin)?);
        drop(dst);
        let dst = Arc::new(GuestMemory::anonymous_populated(&spec)?);
        let (run, stats) = pagewire_run(
            src.clone(),
            dst.clone(),
            a.channels,
            a.zero_copy,
            a.no_pin,
            None,
            Compression::None,
        )?;
        if rep == 0 && src.first_difference(&dst).is_some() {
            bail!("pagewire's destination differs from the source");
        }
        fallbacks = stats.zero_copy.fallbacks;
        pw.push(run);
        say(&format!(
            "rep {}/{}: raw TCP {:.2} GiB/s, pagewire {:.2} GiB/s",
            rep + 1,
            a.reps,
            bytes as f64 / (1u64 << 30) as f64 / raw[rep].seconds,
            bytes as f64 / (1u64 << 30) as f64 / pw[rep].seconds
        ));
    }
    drop(src);
    let zspec = [RegionSpec {
        gpa: 0,
        len: a.zero_size,
    }];
    let zsrc = Arc::new(GuestMemory::anonymous(&zspec)?);
    fill(&zsrc, Content::Zero, 0); // written zeros: real pages, not the shared zero page
    let zbytes = zsrc.total_bytes();
    let mut zpw = Vec::new();
    let mut zscan = Vec::new();
    for rep in 0..a.reps {
        zscan.push(scan_run(&zsrc));
        let dst = Arc::new(GuestMemory::anonymous(&zspec)?);
        zpw.push(
            pagewire_run(
                zsrc.clone(),
                dst,
                a.channels,
                a.zero_copy,
                a.no_pin,
                None,
                Compression::None,
            )?
            .0,
        );
        say(&format!(
            "rep {}/{}: zero memory: one-core scan {:.2} GiB/s, pagewire {:.2} GiB/s",
            rep + 1,
            a.reps,
            zbytes as f64 / (1u64 << 30) as f64 / zscan[rep].seconds,
            zbytes as f64 / (1u64 << 30) as f64 / zpw[rep].seconds
        ));
    }
    let raw = summarize("raw-tcp", bytes, &raw);
    let pw = summarize("pagewire", bytes, &pw);
    let zpw = summarize("pagewire", zbytes, &zpw);
    let zscan = summarize("one-core-scan", zbytes, &zscan);
    let report = Report {
        machine: machine(),
        channels: a.channels,
        content: a.content.name(),
        reps: a.reps,
        pagewire_over_raw_tcp: pw.gib_per_s_median / raw.gib_per_s_median,
        zero_pagewire_over_scan: zpw.gib_per_s_median / zscan.gib_per_s_median,
        raw_tcp: raw,
        pagewire: pw,
        zero_pagewire: zpw,
        zero_one_core_scan: zscan,
        zero_copy_fallbacks: fallbacks,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("machine: {}", report.machine);
    println!(
        "{} channel(s), {} MiB of {} memory, {} interleaved reps (median [min..max])",
        report.channels,
        a.size >> 20,
        report.content,
        report.reps
    );
    println!(
        "{:<34} {:>22} {:>14} {:>14}",
        "", "GiB/s", "send CPU-s/GiB", "recv CPU-s/GiB"
    );
    let row = |name: &str, s: &Summary| {
        println!(
            "{:<34} {:>6.2} [{:.2}..{:.2}] {:>14.3} {:>14.3}",
            name,
            s.gib_per_s_median,
            s.gib_per_s_min,
            s.gib_per_s_max,
            s.sender_cpu_s_per_gib,
            s.receiver_cpu_s_per_gib
        );
    };
    row("(a) raw TCP, same streams", &report.raw_tcp);
    row("(b) pagewire", &report.pagewire);
    println!(
        "    pagewire / raw TCP = {:.2}",
        report.pagewire_over_raw_tcp
    );
    row(
        &format!("(c) pagewire, {} MiB zero", a.zero_size >> 20),
        &report.zero_pagewire,
    );
    row(
        "    one-core read scan, same buffer",
        &report.zero_one_core_scan,
    );
    println!(
        "    pagewire / one-core scan = {:.2}",
        report.zero_pagewire_over_scan
    );
    Ok(())
}

#[derive(Serialize)]
struct TlsRow {
    channels: u16,
    plain: Summary,
    tls: Summary,
    tls_over_plain: f64,
    /// Plaintext authenticated and protected with a pre-shared key.
    psk: Summary,
    psk_over_plain: f64,
}

#[derive(Serialize)]
struct TlsReport {
    machine: String,
    content: &'static str,
    reps: usize,
    rows: Vec<TlsRow>,
    seal: crate::seal::SealRates,
    pagewire_seal_over_rustls_encrypt: f64,
}

fn tls_bench(a: TlsBenchArgs) -> Result<()> {
    if a.reps == 0 {
        bail!("--reps must be positive");
    }
    pagewire::probe_uring().context("pagewire needs io_uring")?;
    let say = |s: &str| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    let dir = tempfile::tempdir()?;
    certs::generate(&certs::CertOptions::default())?.write(dir.path())?;
    let pki = (
        TlsClient::new(certs::client_files(dir.path()).load()?, "localhost")?,
        TlsServer::new(certs::server_files(dir.path()).load()?)?,
    );
    let psk = pagewire::auth::Psk::generate();
    let spec = [RegionSpec {
        gpa: 0,
        len: a.size,
    }];
    let src = Arc::new(GuestMemory::anonymous(&spec)?);
    fill(&src, Content::Random, 17);
    let bytes = src.total_bytes();
    let mut rows = Vec::new();
    for channels in [1u16, 2] {
        let (mut plain, mut sealed, mut keyed) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..a.reps {
            for mode in 0..3 {
                let dst = Arc::new(GuestMemory::anonymous_populated(&spec)?);
                let security = match mode {
                    0 => Security::Plain,
                    1 => Security::Tls(&pki),
                    _ => Security::Psk(&psk),
                };
                let (run, _) = pagewire_run(
                    src.clone(),
                    dst.clone(),
                    channels,
                    ZeroCopy::Auto,
                    a.no_pin,
                    security,
                    Compression::None,
                )?;
                if rep == 0 && src.first_difference(&dst).is_some() {
                    bail!("destination differs from the source (mode {mode})");
                }
                [&mut plain, &mut sealed, &mut keyed][mode].push(run);
            }
            let rate = |r: &Run| bytes as f64 / (1u64 << 30) as f64 / r.seconds;
            say(&format!(
                "{channels} channel(s), rep {}/{}: plain {:.2} GiB/s, TLS {:.2} GiB/s, pre-shared key {:.2} GiB/s",
                rep + 1,
                a.reps,
                rate(&plain[rep]),
                rate(&sealed[rep]),
                rate(&keyed[rep])
            ));
        }
        let plain = summarize("plain", bytes, &plain);
        let tls = summarize("tls", bytes, &sealed);
        let psk_row = summarize("psk", bytes, &keyed);
        rows.push(TlsRow {
            channels,
            psk_over_plain: psk_row.gib_per_s_median / plain.gib_per_s_median,
            psk: psk_row,
            tls_over_plain: tls.gib_per_s_median / plain.gib_per_s_median,
            plain,
            tls,
        });
    }
    say("measuring one-core seal rates ...");
    let seal = crate::seal::seal_rates(&src)?;
    let report = TlsReport {
        machine: machine(),
        content: "random",
        reps: a.reps,
        rows,
        pagewire_seal_over_rustls_encrypt: seal.pagewire_seal_gib_s / seal.rustls_encrypt_gib_s,
        seal,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("machine: {}", report.machine);
    println!(
        "{} MiB of random memory, {} interleaved reps (median [min..max]), suite {}",
        a.size >> 20,
        report.reps,
        report.seal.suite
    );
    println!(
        "{:<12} {:>22} {:>22} {:>10}   CPU-s/GiB send/recv: plain | TLS",
        "channels", "plain GiB/s", "TLS GiB/s", "TLS/plain"
    );
    for r in &report.rows {
        println!(
            "{:<12} {:>6.2} [{:.2}..{:.2}] {:>6.2} [{:.2}..{:.2}] {:>10.2}   {:.3}/{:.3} | {:.3}/{:.3}",
            r.channels,
            r.plain.gib_per_s_median,
            r.plain.gib_per_s_min,
            r.plain.gib_per_s_max,
            r.tls.gib_per_s_median,
            r.tls.gib_per_s_min,
            r.tls.gib_per_s_max,
            r.tls_over_plain,
            r.plain.sender_cpu_s_per_gib,
            r.plain.receiver_cpu_s_per_gib,
            r.tls.sender_cpu_s_per_gib,
            r.tls.receiver_cpu_s_per_gib
        );
        println!(
            "{:<12} pre-shared key {:.2} GiB/s [{:.2}..{:.2}], {:.2}× plain, CPU-s/GiB {:.3}/{:.3}",
            "",
            r.psk.gib_per_s_median,
            r.psk.gib_per_s_min,
            r.psk.gib_per_s_max,
            r.psk_over_plain,
            r.psk.sender_cpu_s_per_gib,
            r.psk.receiver_cpu_s_per_gib
        );
    }
    println!("one core, GiB/s of plaintext:");
    println!(
        "  AEAD alone, in cache (ceiling)      {:>6.2}",
        report.seal.aead_in_cache_gib_s
    );
    println!(
        "  pagewire copy + seal in place       {:>6.2}",
        report.seal.pagewire_seal_gib_s
    );
    println!(
        "  rustls WriteTraffic::encrypt        {:>6.2}",
        report.seal.rustls_encrypt_gib_s
    );
    println!(
        "  pagewire / rustls = {:.2}",
        report.pagewire_seal_over_rustls_encrypt
    );
    Ok(())
}

fn faults_bench(a: FaultsArgs) -> Result<()> {
    use pagewire::faults::{run_seed, Outcome, RunOptions};
    let dir = tempfile::tempdir()?;
    certs::generate(&certs::CertOptions::default())?.write(dir.path())?;
    let tls = (
        TlsServer::new(certs::server_files(dir.path()).load()?)?,
        TlsClient::new(certs::client_files(dir.path()).load()?, "localhost")?,
    );
    let idle = std::time::Duration::from_millis(a.idle);
    let started = Instant::now();
    let (mut complete, mut confirmed, mut failed) = (0u64, 0u64, 0u64);
    let mut violations = Vec::new();
    let bar = indicatif::ProgressBar::new(a.seeds);
    for seed in a.from..a.from + a.seeds {
        let options = RunOptions {
            // Even seeds plaintext, odd seeds TLS; with `both`, seeds 2 and 3 mod 4 simulated.
            tls: (seed % 2 == 1).then(|| tls.clone()),
            idle,
            simulated: match a.transport.as_str() {
                "sim" => true,
                "uring" => false,
                _ => seed % 4 >= 2,
            },
        };
        match run_seed(seed, &options) {
            Ok(Outcome::Complete) => complete += 1,
            Ok(Outcome::ConfirmedButSenderFailed(_)) => confirmed += 1,
            Ok(Outcome::BothFailed(_)) => failed += 1,
            Err(v) => {
                eprintln!("VIOLATION: {}", v.0);
                violations.push(v.0);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let v = serde_json::json!({
        "seeds": a.seeds,
        "transport": a.transport,
        "complete": complete,
        "confirmed_but_sender_failed": confirmed,
        "failed_on_both_sides_with_one_cause": failed,
        "violations": violations,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        println!("{v}");
    } else {
        println!(
            "{} seeds ({} transport) in {:.0} s: {complete} complete and verified, {confirmed} confirmed by the receiver but the sender failed, {failed} failed on both sides naming one cause, {} violations",
            a.seeds,
            a.transport,
            started.elapsed().as_secs_f64(),
            violations.len()
        );
    }
    if !violations.is_empty() {
        bail!("{} seed(s) broke an invariant", violations.len());
    }
    Ok(())
}

/// GiB/s of `hash` over `total` bytes taken as `chunk`-sized calls over `buf` (wrapping).
fn hash_rate(buf: &[u8], chunk: usize, total: usize, mut hash: impl FnMut(&[u8]) -> u64) -> f64 {
    let mut sink = 0u64;
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        let at = done % buf.len();
        let n = chunk.min(buf.len() - at);
        sink ^= hash(&buf[at..at + n]);
        done += n;
    }
    std::hint::black_box(sink);
    total as f64 / (1u64 << 30) as f64 / start.elapsed().as_secs_f64()
}

fn checksum_bench(a: ChecksumArgs) -> Result<()> {
    const LINE_BYTES: usize = 64;
    use pagewire::simd::xxh3::Xxh3;
    let chunk = a.chunk as usize;
    let mut hot = vec![0u8; chunk];
    let mut cold = vec![0u8; a.size as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in hot.iter_mut().chain(cold.iter_mut()) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // The first pass over freshly written memory runs slower than later ones (measured: by a
    // third): read it once untimed so the first row is not penalised.
    std::hint::black_box(cold.chunks(LINE_BYTES).fold(0u8, |a, p| a ^ p[0]));
    // pagewire hashes each 4 KiB page on its own (a checksum per page names a corrupt page).
    let per_page = |h: Xxh3| {
        move |bytes: &[u8]| {
            bytes
                .chunks(pagewire::limits::PAGE_BYTES)
                .fold(0u64, |a, p| a ^ h.hash(p))
        }
    };
    let scalar = per_page(Xxh3::scalar());
    let crate_xxh3 = xxhash_rust::xxh3::xxh3_64;
    let crc = |bytes: &[u8]| u64::from(crc32c::crc32c(bytes));
    let in_cache = 4usize << 30;
    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    for (name, h) in [
        ("xxh3 per 4 KiB page, pagewire AVX2", Xxh3::avx2()),
        ("xxh3 per 4 KiB page, pagewire AVX-512", Xxh3::avx512()),
    ] {
        if let Some(h) = h {
            let f = per_page(h);
            rows.push((
                name,
                hash_rate(&hot, chunk, in_cache, f),
                hash_rate(&cold, chunk, cold.len(), f),
            ));
        }
    }
    rows.extend([
        (
            "xxh3 per 4 KiB page, pagewire scalar reference",
            hash_rate(&hot, chunk, in_cache / 4, scalar),
            hash_rate(&cold, chunk, cold.len(), scalar),
        ),
        (
            "xxh3 whole chunk, xxhash-rust crate",
            hash_rate(&hot, chunk, in_cache, crate_xxh3),
            hash_rate(&cold, chunk, cold.len(), crate_xxh3),
        ),
        (
            "crc32c whole chunk, crc32c crate (SSE4.2)",
            hash_rate(&hot, chunk, in_cache, crc),
            hash_rate(&cold, chunk, cold.len(), crc),
        ),
    ]);
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(name, hot, cold)| serde_json::json!({"name": name, "in_cache_gib_s": hot, "from_dram_gib_s": cold}))
            .collect();
        println!("{}", serde_json::json!({"chunk_bytes": chunk, "rows": v}));
        return Ok(());
    }
    println!(
        "| checksum, one core, {} KiB per call | in cache GiB/s | from DRAM GiB/s |",
        chunk >> 10
    );
    println!("|---|---|---|");
    for (name, hot, cold) in rows {
        println!("| {name} | {hot:.2} | {cold:.2} |");
    }
    Ok(())
}

fn main() {
    // A closed standard output ends the program quietly (`pagewire-bench ... | head`).
    // SAFETY: setting a signal disposition has no memory-safety preconditions; no other thread
    // exists yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Transfer(a) => transfer(a),
        Cmd::Checksum(a) => checksum_bench(a),
        Cmd::Faults(a) => faults_bench(a),
        Cmd::Tls(a) => tls_bench(a),
        Cmd::Matrix(a) => matrix::run(a),
        Cmd::Live(a) => live::run(a),
        Cmd::Serve { listen, sessions } => remote::serve(&listen, sessions),
        Cmd::Compress(a) => {
            if a.reps == 0 {
                Err(anyhow::anyhow!("--reps must be positive"))
            } else {
                shaped::run_bench(&a.links, &a.content, a.reps, a.quick, a.json)
            }
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0]), 2.5);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
