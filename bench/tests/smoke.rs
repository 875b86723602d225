//! The benchmark cannot rot: a tiny run of every measurement, checked for sane output.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

#[test]
fn transfer_benchmark_runs_and_reports_ratios() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    // Unpinned, and pinned with each stream's receiver on another core than its sender (where
    // the cores pair up; else on its sender's core).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = if cores.is_multiple_of(2) {
        "crossed"
    } else {
        "with-sender"
    };
    for placement in [&["--no-pin"][..], &["--receiver-placement", pinned]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
            .args([
                "transfer",
                "--size",
                "8MiB",
                "--zero-size",
                "8MiB",
                "--reps",
                "1",
            ])
            .args(placement)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{placement:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in ["pagewire_over_raw_tcp", "zero_pagewire_over_scan"] {
            assert!(v[key].as_f64().is_some_and(|r| r > 0.0), "{key} in {v}");
        }
        assert!(v["raw_tcp"]["gib_per_s_median"].as_f64().unwrap() > 0.0);
        assert!(v["pagewire"]["sender_cpu_s_per_gib"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn tls_benchmark_runs_and_reports_seal_rates() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args(["tls", "--size", "4MiB", "--reps", "1", "--no-pin", "--json"])
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
fn matrix_runs_every_cell_writes_its_reports_and_refuses_impossible_combinations() {
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
            "--page-checksums",
            "on,off",
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
    // Contents × channels × (plaintext: compressions × checksums on/off; TLS: compressions).
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2 * 2 * (2 * 2 + 2));
    let unchecked = cells.iter().filter(|c| c["page_checksums"] == "off");
    assert!(unchecked.clone().all(|c| c["tls"] == "off"));
    assert_eq!(unchecked.count(), 2 * 2 * 2);
    for c in v["cells"].as_array().unwrap() {
        assert!(
            c["pagewire"]["gib_per_s_median"].as_f64().unwrap() > 0.0,
            "{c}"
        );
        assert!(c["pagewire_over_raw_tcp"].as_f64().unwrap() > 0.0, "{c}");
        // Zero-copy `auto` starts with zero-copy sends: whether the kernel copied them is known.
        assert!(c["zero_copy_copied_by_kernel"].is_boolean(), "{c}");
    }
    assert!(v["ceilings"]["dram_read_scan_gib_s"].as_f64().unwrap() > 0.0);
    assert!(v["ceilings"]["zstd1_text_decode_gib_s"].as_f64().unwrap() > 0.0);
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
    assert_eq!(csv.lines().count(), 1 + 24);

    // A real RAM image as content: the run takes its size from the file. With a live row
    // (plaintext only), whose tables join report.md, while stdout stays one JSON object.
    let image = dir.path().join("ram.img");
    let bytes: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&image, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args([
            "matrix",
            "--channels",
            "1",
            "--reps",
            "1",
            "--no-pin",
            "--zero-copy",
            "off",
            "--tls",
            "off",
            "--live",
            "50MB",
            "--json",
            "--content",
        ])
        .arg(format!("file:{}", image.display()))
        .arg("--out")
        .arg(dir.path().join("file-run"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["size_bytes"], 4 << 20);
    assert!(v["cells"][0]["content"]
        .as_str()
        .unwrap()
        .starts_with("file:"));
    // No zero-copy send was made, so none was copied by the kernel either.
    assert!(
        v["cells"][0]["zero_copy_copied_by_kernel"].is_null(),
        "{}",
        v["cells"][0]
    );
    let live: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("file-run/live.json")).unwrap())
            .unwrap();
    assert_eq!(live["runs"].as_array().unwrap().len(), 1, "{live}");
    let report = std::fs::read_to_string(dir.path().join("file-run/report.md")).unwrap();
    let tables = report
        .split_once("## Live migrations")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no live rows in report.md:\n{report}"));
    assert!(
        tables.contains("| pagewire | 50 MiB/s |") && tables.contains("pagewire: 1 of 1 runs"),
        "{tables}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("file-run/live.md")).unwrap(),
        tables.trim_start()
    );

    // A combination that cannot be measured is refused with a message, not skipped.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args([
            "matrix",
            "--size",
            "8MiB",
            "--with-qemu",
            "--peer",
            "192.0.2.9:7700",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be combined with --peer"));
    // Receivers placed beside pinned senders need the senders pinned.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args(["matrix", "--size", "8MiB", "--no-pin"])
        .args(["--receiver-placement", "crossed"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be combined with --no-pin"));
    // Refused before anything runs: no connection to the (unreachable) peer is tried first.
    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args([
            "matrix",
            "--size",
            "8MiB",
            "--live",
            "100MB",
            "--peer",
            "192.0.2.9:7700",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--live runs both sides on this host"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// `live`: one small cell per policy, the software dirtier writing the source; every run
/// converges, and with `--auto-converge` each reports the throttle it ended at. The second
/// run also turns page checksums and zero-copy off, which both ends must agree on (a receiver
/// left requiring checksums refuses the sender's hello), and the JSON says so. The first
/// discards a run before the grid: the JSON keeps it apart from the grid's one run.
#[test]
fn live_benchmark_runs_with_and_without_auto_converge() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    for auto in [false, true] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"));
        cmd.args([
            "live",
            "--size",
            "16MiB",
            "--dirty-rate",
            "50MB",
            "--channels",
            "1",
            "--tls",
            "off",
            "--reps",
            "1",
            "--repeat-rounds",
            "0",
            "--json",
        ]);
        if auto {
            cmd.args([
                "--auto-converge",
                "--page-checksums",
                "off",
                "--zero-copy",
                "off",
            ]);
        } else {
            cmd.args(["--discard-first", "1"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let runs = v["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 1, "{v}");
        assert_eq!(runs[0]["converged"], true, "{v}");
        assert!(runs[0]["throttle_percent"].is_u64(), "{v}");
        let settings = &v["settings"];
        let (checksums, zero_copy) = if auto { ("off", "off") } else { ("on", "auto") };
        assert_eq!(settings["page_checksums"], checksums, "{v}");
        assert_eq!(settings["zero_copy"], zero_copy, "{v}");
        let discarded = usize::from(!auto);
        assert_eq!(settings["discarded_first_runs"], discarded, "{v}");
        let dropped = v["discarded_runs"].as_array().unwrap();
        assert_eq!(dropped.len(), discarded, "{v}");
        assert!(dropped.iter().all(|r| r["converged"] == true), "{v}");
    }
    // The JSON's name must leave room for the Markdown written beside it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args(["live", "--size", "16MiB", "--out", "grid.md"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("another name"),
        "{stderr}"
    );
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Namespaces(String, String);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.0, &self.1] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn matrix_runs_across_two_hosts_in_network_namespaces() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    let id = std::process::id() % 100_000;
    let (a, b) = (format!("pwt-a-{id}"), format!("pwt-b-{id}"));
    let (dev, peer) = (format!("pwt{id}"), format!("pwt{id}p"));
    if !ip(&["netns", "add", &a]) {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and iproute2)");
        return;
    }
    let _guard = Namespaces(a.clone(), b.clone());
    assert!(ip(&["netns", "add", &b]));
    assert!(ip(&[
        "link", "add", &dev, "netns", &a, "type", "veth", "peer", "name", &peer, "netns", &b
    ]));
    assert!(ip(&["-n", &a, "addr", "add", "192.0.2.1/24", "dev", &dev]));
    assert!(ip(&["-n", &b, "addr", "add", "192.0.2.2/24", "dev", &peer]));
    for (ns, d) in [(&a, &dev), (&b, &peer)] {
        assert!(ip(&["-n", ns, "link", "set", d, "up"]));
        assert!(ip(&["-n", ns, "link", "set", "lo", "up"]));
    }
    let bench = env!("CARGO_BIN_EXE_pagewire-bench");
    let mut server = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &b,
            bench,
            "serve",
            "--listen",
            "192.0.2.2:7700",
            "--sessions",
            "1",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut result = None;
    for _ in 0..50 {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &a,
                bench,
                "matrix",
                "--peer",
                "192.0.2.2:7700",
            ])
            .args(["--size", "8MiB", "--channels", "1,2", "--content", "random"])
            .args(["--tls", "off,on", "--page-checksums", "on,off"])
            .args(["--reps", "1", "--json", "--out"])
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() || !err.contains("refused") {
            result = Some(out);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = result.expect("the bench server never listened");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["peer"], "192.0.2.2:7700");
    // Channels × (plaintext with and without page checksums, TLS).
    assert_eq!(v["cells"].as_array().unwrap().len(), 2 * 3);
    for c in v["cells"].as_array().unwrap() {
        assert!(
            c["pagewire"]["gib_per_s_median"].as_f64().unwrap() > 0.0,
            "{c}"
        );
        assert!(c["raw_tcp_gib_per_s"].as_f64().unwrap() > 0.0, "{c}");
    }
}

#[test]
fn matrix_runs_qemu_multifd_side_by_side_or_says_why_not() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .args([
            "matrix",
            "--size",
            "32MiB",
            "--channels",
            "2",
            "--content",
            "random",
        ])
        .args([
            "--tls",
            "off,on",
            "--reps",
            "1",
            "--no-pin",
            "--with-qemu",
            "--json",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if let Some(line) = err.lines().find(|l| l.starts_with("SKIPPED")) {
        eprintln!("{line}");
        assert!(v["cells"][0]["qemu"].is_null());
        return;
    }
    for c in v["cells"].as_array().unwrap() {
        let q = &c["qemu"];
        assert!(
            q["summary"]["gib_per_s_median"].as_f64().unwrap() > 0.0,
            "{c}"
        );
        // QEMU's own counters: every page of 32 MiB was sent, as normal or duplicate.
        let pages = q["normal"].as_u64().unwrap() + q["duplicate"].as_u64().unwrap();
        assert!(pages >= 8192, "{c}");
        assert!(c["pagewire_over_qemu"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn version_is_printed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-bench"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pagewire-bench "));
}
