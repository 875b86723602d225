//! Seeded fault injection below the shards (short sends and receives, EAGAIN, reordered
//! completions, late zero-copy notifications, stalls, resets) on 1–4 channels, plaintext and
//! TLS: every run ends complete and verified, or failed on both sides naming the same cause;
//! never a panic, a hang past its bound, or a success over a partial image. The seed of a
//! failing run is printed; `pagewire-bench faults --seeds N` runs thousands.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use pagewire::faults::{run_seed, Outcome, RunOptions};
use pagewire::tls::certs::{self, CertOptions};
use pagewire::tls::{TlsClient, TlsServer};
use pagewire_tests::skip_without_uring;

/// Seeds per mode in the normal suite (a few hundred in all).
const SEEDS: u64 = 120;

fn run(tls: bool, simulated: bool) {
    let dir = tempfile::tempdir().unwrap();
    certs::generate(&CertOptions::default())
        .unwrap()
        .write(dir.path())
        .unwrap();
    let options = RunOptions {
        tls: tls.then(|| {
            (
                TlsServer::new(certs::server_files(dir.path()).load().unwrap()).unwrap(),
                TlsClient::new(certs::client_files(dir.path()).load().unwrap(), "localhost")
                    .unwrap(),
            )
        }),
        idle: Duration::from_millis(600),
        simulated,
    };
    let (mut complete, mut confirmed, mut failed) = (0, 0, 0);
    let base = if tls { 1_000_000 } else { 0 } + if simulated { 2_000_000 } else { 0 };
    for seed in base..base + SEEDS {
        match run_seed(seed, &options) {
            Ok(Outcome::Complete) => complete += 1,
            Ok(Outcome::ConfirmedButSenderFailed(_)) => confirmed += 1,
            Ok(Outcome::BothFailed(_)) => failed += 1,
            Err(v) => panic!("tls {tls}, simulated {simulated}: {}", v.0),
        }
    }
    eprintln!(
        "tls {tls}, simulated {simulated}: {SEEDS} seeds: {complete} complete, {confirmed} confirmed but the sender failed, {failed} failed on both sides with one cause"
    );
    assert!(complete > SEEDS / 2, "most runs must survive their faults");
}

#[test]
fn seeded_faults_below_the_shards_plaintext() {
    if skip_without_uring() {
        return;
    }
    run(false, false);
}

#[test]
fn seeded_faults_below_the_shards_tls() {
    if skip_without_uring() {
        return;
    }
    run(true, false);
}

/// The same seeded faults, on the simulated transport: the shards and their channel machines
/// run over an in-memory link, with no io_uring or network stack under the data path.
#[test]
fn seeded_faults_on_the_simulated_transport_plaintext() {
    run(false, true);
}

#[test]
fn seeded_faults_on_the_simulated_transport_tls() {
    run(true, true);
}
