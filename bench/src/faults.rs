//! `pagewire-bench faults`: seeded fault injection below the shards, many whole transfers.

use std::time::Instant;

use anyhow::{bail, Result};
use pagewire::tls::{certs, TlsClient, TlsServer};

#[derive(clap::Args)]
pub(crate) struct FaultsArgs {
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

pub(crate) fn run(a: FaultsArgs) -> Result<()> {
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
