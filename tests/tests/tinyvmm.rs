//! A running KVM guest migrated live between two processes of the tiny VMM example
//! (`src/bin/tinyvmm.rs`) over loopback, plaintext and TLS: rounds run while the guest runs, the
//! vCPU is paused for the last round, its registers travel as a device state blob, the
//! destination's memory equals the source's at the pause, and the resumed guest's counter keeps
//! increasing from where it stopped. Skips with a reason without a usable `/dev/kvm`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use pagewire::tls::certs::{self, CertOptions};
use pagewire_tests::{join_within, skip_without_kvm, skip_without_uring};

fn migrate(tls: bool) {
    let bin = env!("CARGO_BIN_EXE_tinyvmm");
    let dir = tempfile::tempdir().unwrap();
    let mut tls_args = Vec::new();
    if tls {
        certs::generate(&CertOptions::default())
            .unwrap()
            .write(dir.path())
            .unwrap();
        tls_args = vec!["--tls-dir".to_string(), dir.path().display().to_string()];
    }
    let mut dest = Command::new(bin)
        .args(["dest", "--listen", "127.0.0.1:0", "--resume-ms", "150"])
        .args(&tls_args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dest.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.strip_prefix("listening on ").unwrap().to_string();
    let source = Command::new(bin)
        .args([
            "source",
            "--to",
            &addr,
            "--burst",
            "16",
            "--warmup-ms",
            "150",
        ])
        .args(&tls_args)
        .output()
        .unwrap();
    assert!(
        source.status.success(),
        "source: {}",
        String::from_utf8_lossy(&source.stderr)
    );
    let reader = std::thread::spawn(move || lines.next().unwrap().unwrap());
    let dest_line = join_within(reader, Duration::from_secs(20), "destination");
    assert!(dest.wait().unwrap().success());
    let s: serde_json::Value = serde_json::from_slice(&source.stdout).unwrap();
    let d: serde_json::Value = serde_json::from_str(&dest_line).unwrap();
    eprintln!("tls {tls}: source {s}\ndestination {d}");
    // The guest ran during the migration, and rounds ran while it did.
    assert!(s["counter_at_pause"].as_u64() > s["counter_at_migration_start"].as_u64());
    assert!(s["rounds"].as_array().unwrap().len() >= 2);
    assert_eq!(s["converged"], true);
    // At the pause the destination holds exactly the source's memory...
    let field = |v: &serde_json::Value, name: &str| {
        v[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no number {name} in {v}"))
    };
    assert_eq!(field(&s, "digest_at_pause"), field(&d, "digest_received"));
    assert_eq!(field(&s, "counter_at_pause"), field(&d, "counter_received"));
    // ...and the resumed guest counts on from there.
    assert!(d["counter_after_resume"].as_u64() > d["counter_received"].as_u64());
    // ...where it stopped, with its registers: not started over.
    assert_eq!(d["started_over"], false);
    assert_eq!(d["blobs"], 1);
    // The destination's own `query-migrate` agrees: completed, with the source's rounds and
    // the vCPU's registers in its device state.
    let q = &d["destination"];
    assert_eq!(q["status"], "completed", "{q}");
    assert_eq!(
        q["rounds"].as_u64(),
        Some(s["rounds"].as_array().unwrap().len() as u64),
        "{q}"
    );
    assert!(field(q, "device_state_bytes") > 0, "{q}");
}

#[test]
fn a_running_guest_migrates_live_and_resumes_plaintext() {
    if skip_without_kvm() || skip_without_uring() {
        return;
    }
    migrate(false);
}

#[test]
fn a_running_guest_migrates_live_and_resumes_tls() {
    if skip_without_kvm() || skip_without_uring() {
        return;
    }
    migrate(true);
}
