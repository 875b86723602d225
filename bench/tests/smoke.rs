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

#[test]
fn compression_benchmark_runs_over_a_shaped_link_or_says_why_not() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pagewire-bench"));
    if !exe.with_file_name("pagewire").exists() {
        eprintln!("SKIPPED: the pagewire CLI is not built next to pagewire-bench (cargo test --workspace builds it)");
        return;
    }
    let out = std::process::Command::new(&exe)
        .args([
            "compress",
            "--links",
            "1000",
            "--content",
            "text",
            "--quick",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(reason) = text.strip_prefix("SKIPPED") {
        eprintln!("SKIPPED{reason}");
        return;
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4, "one cell per mode");
    for c in cells {
        assert!(c["seconds"].as_f64().unwrap() > 0.0, "{c}");
    }
    let zstd = cells.iter().find(|c| c["mode"] == "zstd").unwrap();
    let none = cells.iter().find(|c| c["mode"] == "none").unwrap();
    assert!(zstd["wire_bytes"].as_u64().unwrap() < none["wire_bytes"].as_u64().unwrap() / 2);
}

#[test]
fn matrix_runs_every_cell_writes_its_reports_and_refuses_missing_axes() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args([
            "matrix",
            "--size",
            "8MiB",
            "--channels",
            "1,2",
            "--content",
            "zero,random",
        ])
        .args([
            "--tls",
            "off,on",
            "--compress",
            "none,zstd",
            "--reps",
            "1",
            "--no-pin",
            "--json",
        ])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cells"].as_array().unwrap().len(), 2 * 2 * 2 * 2);
    for c in v["cells"].as_array().unwrap() {
        assert!(
            c["pagewire"]["gib_per_s_median"].as_f64().unwrap() > 0.0,
            "{c}"
        );
        assert!(c["pagewire_over_raw_tcp"].as_f64().unwrap() > 0.0, "{c}");
    }
    assert!(v["ceilings"]["dram_read_scan_gib_s"].as_f64().unwrap() > 0.0);
    for f in [
        "results.json",
        "results.csv",
        "report.md",
        "throughput.svg",
        "cpu.svg",
        "ratio.svg",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 16);

    // Axes whose feature is not built are refused with a message, not skipped.
    for flag in [&["--with-qemu"][..], &["--peer", "192.0.2.9:7000"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
            .args(["matrix", "--size", "8MiB"])
            .args(flag)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not built yet"),
            "{flag:?}"
        );
    }
}
