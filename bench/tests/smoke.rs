//! The benchmark cannot rot: a tiny run of every measurement, checked for sane output.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

#[test]
fn transfer_benchmark_runs_and_reports_ratios() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args([
            "transfer",
            "--size-mib",
            "8",
            "--zero-size-mib",
            "8",
            "--reps",
            "1",
        ])
        .args(["--no-pin", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["pagewire_over_raw_tcp", "zero_pagewire_over_scan"] {
        assert!(v[key].as_f64().is_some_and(|r| r > 0.0), "{key} in {v}");
    }
    assert!(v["raw_tcp"]["gib_per_s_median"].as_f64().unwrap() > 0.0);
    assert!(v["pagewire"]["sender_cpu_s_per_gib"].as_f64().unwrap() > 0.0);
}

#[test]
fn tls_benchmark_runs_and_reports_seal_rates() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args([
            "tls",
            "--size-mib",
            "4",
            "--reps",
            "1",
            "--no-pin",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 2);
    for key in [
        "aead_in_cache_gib_s",
        "pagewire_seal_gib_s",
        "rustls_encrypt_gib_s",
    ] {
        assert!(
            v["seal"][key].as_f64().is_some_and(|r| r > 0.0),
            "{key} in {v}"
        );
    }
}
