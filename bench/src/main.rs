//! `pagewire-bench`: pagewire against the machine's own ceilings, measured side by side in one
//! run on the same memory. Each subcommand is a module (`transfer`, `tls_bench`, `live`,
//! `matrix`, `checksum`, `faults`, `shaped` for `compress`, `remote` for `serve`); `measure`
//! holds what they share.

mod checksum;
mod faults;
mod live;
mod matrix;
mod measure;
mod qemu;
mod remote;
mod seal;
mod shaped;
mod svg;
mod tls_bench;
mod transfer;

use clap::{Parser, Subcommand};
use pagewire::synth::Content;

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
    Transfer(transfer::TransferArgs),
    /// Plain vs TLS at 1 and 2 channels, and one-core seal rates (AEAD, pagewire, rustls).
    Tls(tls_bench::TlsBenchArgs),
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
    Checksum(checksum::ChecksumArgs),
    /// Seeded fault injection below the shards, thousands of runs: each must end complete and
    /// verified, or failed on both sides naming one cause (prints the seed of any that did not).
    Faults(faults::FaultsArgs),
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

fn main() {
    // A closed standard output ends the program quietly (`pagewire-bench ... | head`).
    // SAFETY: setting a signal disposition has no memory-safety preconditions; no other thread
    // exists yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The engine's warnings (and, with RUST_LOG=pagewire=debug, where each downtime went) on
    // standard error; the results stay on standard output.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Transfer(a) => transfer::run(a),
        Cmd::Checksum(a) => checksum::run(a),
        Cmd::Faults(a) => faults::run(a),
        Cmd::Tls(a) => tls_bench::run(a),
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
