//! `pagewire-tune` as a user meets it.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

#[test]
fn version_and_a_closed_pipe_are_quiet() {
    let exe = env!("CARGO_BIN_EXE_pagewire-tune");
    let out = std::process::Command::new(exe)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pagewire-tune "));
    // Standard output closed before the first line: no panic message.
    let child = std::process::Command::new(exe)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn probe_json_names_each_finding_and_what_pagewire_does() {
    let exe = env!("CARGO_BIN_EXE_pagewire-tune");
    let out = std::process::Command::new(exe)
        .args(["probe", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let findings = v["findings"].as_array().unwrap();
    assert!(findings.len() >= 10, "{text}");
    for f in findings {
        assert!(f["name"].is_string() && f["value"].is_string() && f["pagewire"].is_string());
    }
    assert!(findings
        .iter()
        .any(|f| f["name"] == "transparent huge pages"));
}

fn tune(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-tune"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn plan_for_this_machine_pins_every_channel_to_an_allowed_core() {
    let out = tune(&["plan", "--channels", "3", "--peer", "127.0.0.1:9", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shards = v["plan"]["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3);
    assert!(shards.iter().all(|s| s["core"].is_u64()), "{v}");
    assert_eq!(v["plan"]["nic"], "lo", "loopback's route leaves through lo");
    let text = tune(&["plan", "--channels", "2"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("channel   1  core"), "{text}");
}

#[test]
fn plan_for_another_machine_from_its_sysfs() {
    let dir = tempfile::tempdir().unwrap();
    for (node, list) in [(0, "0-3"), (1, "4-7")] {
        let d = dir.path().join(format!("devices/system/node/node{node}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpulist"), list).unwrap();
    }
    let nic = dir.path().join("class/net/ens1f0/device");
    std::fs::create_dir_all(&nic).unwrap();
    std::fs::write(nic.join("numa_node"), "1\n").unwrap();
    let root = dir.path().to_str().unwrap();
    // Memory unknown: the NIC's node first.
    let out = tune(&[
        "plan",
        "--sysfs",
        root,
        "--channels",
        "2",
        "--nic",
        "ens1f0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: Vec<_> = v["plan"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["node"].as_u64())
        .collect();
    assert_eq!(nodes, [Some(1), Some(1)], "{v}");
    // Three quarters of the memory on node 0: three of four shards there.
    let out = tune(&[
        "plan",
        "--sysfs",
        root,
        "--channels",
        "4",
        "--nic",
        "ens1f0",
        "--memory",
        "0:3GiB,1:1GiB",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let on0 = v["plan"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["node"] == 0)
        .count();
    assert_eq!(on0, 3, "{v}");
    // Mistakes are one clear line and exit status 2.
    for (args, says) in [
        (
            vec!["plan", "--sysfs", root, "--memory", "zero:1GiB"],
            "not a node number",
        ),
        (vec!["plan", "--cores", "3-1"], "not a core list"),
        (vec!["plan", "--sysfs", "/nonexistent"], "sysfs copy"),
    ] {
        let out = tune(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn plan_from_a_hwloc_xml_file() {
    let xml = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/src/placement/testdata/four-nodes.xml"
    );
    let out = tune(&[
        "plan",
        "--topology",
        xml,
        "--channels",
        "8",
        "--nic",
        "ens1f0",
        "--json",
    ]);
    if cfg!(feature = "hwloc") {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["topology"]["nodes"].as_array().unwrap().len(), 4);
        assert_eq!(v["plan"]["shards"][0]["node"], 1, "{v}");
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2));
        assert!(err.contains("without hwloc"), "{err}");
    }
    // An error with --json is one JSON object on standard output too.
    let out = tune(&["plan", "--topology", "/nonexistent/topology.xml", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    });
    assert!(v["error"].is_string() && v["cause"].is_string(), "{v}");
}

/// The server's exit once the sweep is done; a server whose sweep failed may wait for
/// transfers that never come, so it is killed first (the caller's assertion then says why).
fn wait_unless_failed(
    server: &mut std::process::Child,
    sweep: &std::process::Output,
) -> std::process::ExitStatus {
    if !sweep.status.success() {
        let _ = server.kill();
    }
    server.wait().unwrap()
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A sweep of 8 MiB to `addr`, 1 and 2 channels × 2 repetitions, copying, reno (every
/// kernel's), writing the profile to `out`, in JSON; then `extra`.
fn small_sweep<'a>(addr: &'a str, out: &'a std::path::Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "sweep",
        "--peer",
        addr,
        "--size",
        "8MiB",
        "--channels",
        "1,2",
        "--zero-copy",
        "off",
        "--congestion",
        "reno",
        "--reps",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn sweep_against_serve_writes_a_profile_that_loads() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    let addr = free_loopback_addr();
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire-tune"))
        .args([
            "serve",
            "--listen",
            &addr,
            "--size",
            "8MiB",
            "--transfers",
            // 2 cells × 2 reps, and the sweep's warm-up.
            "5",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profile.toml");
    let sweep = tune(&small_sweep(&addr, &out, &["--content", "mixed"]));
    let status = wait_unless_failed(&mut serve, &sweep);
    assert!(
        sweep.status.success(),
        "{}",
        String::from_utf8_lossy(&sweep.stderr)
    );
    assert!(status.success());
    let v: serde_json::Value = serde_json::from_slice(&sweep.stdout).unwrap();
    assert_eq!(v["cells"].as_array().unwrap().len(), 2, "{v}");
    let profile = pagewire::profile::Profile::load(&out).unwrap();
    let measured = profile.measured.as_ref().unwrap();
    assert_eq!((measured.reps, measured.cells.len()), (2, 2));
    assert!(measured.cells.iter().all(|c| c.gib_per_s > 0.0));
    assert_eq!(profile.send.zero_copy.as_deref(), Some("off"));
    // Reno is part of every kernel's TCP: the chosen algorithm is the one measured.
    assert_eq!(profile.send.congestion.as_deref(), Some("reno"));
    assert!(measured.cells.iter().all(|c| c.congestion == "reno"));
    assert!(matches!(profile.send.channels, Some(1 | 2)));
    let mut served = String::new();
    std::io::Read::read_to_string(&mut serve.stdout.take().unwrap(), &mut served).unwrap();
    // The warm-up, then 2 cells × 2 reps, in alternating order: 1, 2 channels, then 2, 1.
    let channels: Vec<&str> = served
        .lines()
        .filter(|l| l.contains("GiB/s"))
        .map(|l| l.split(": ").nth(1).unwrap().split(' ').next().unwrap())
        .collect();
    assert_eq!(channels, ["1", "1", "2", "2", "1"], "{served}");
}

#[test]
fn sweep_against_the_bench_server_measures_both_sides() {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return;
    }
    // `cargo test --workspace` (the README's command) builds every binary before any test
    // runs; `-p pagewire-tune` alone may not have built this one.
    let bench =
        std::path::Path::new(env!("CARGO_BIN_EXE_pagewire-tune")).with_file_name("pagewire-bench");
    if !bench.exists() {
        eprintln!(
            "SKIPPED: {} is not built (`cargo test --workspace` builds it)",
            bench.display()
        );
        return;
    }
    let addr = free_loopback_addr();
    // One control session carries the whole sweep: warm-up and every repetition.
    let mut serve = std::process::Command::new(&bench)
        .args(["serve", "--listen", &addr, "--sessions", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("profile.toml");
    let sweep_args = small_sweep(&addr, &out, &["--server", "bench", "--content", "random"]);
    let sweep = tune(&sweep_args);
    let status = wait_unless_failed(&mut serve, &sweep);
    let mut served = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut served).unwrap();
    assert!(
        sweep.status.success(),
        "{}\nserver: {served}",
        String::from_utf8_lossy(&sweep.stderr)
    );
    assert!(status.success(), "{served}");
    // The session ended cleanly, not with an error the server only logs.
    assert!(!served.contains("ended:"), "{served}");
    let v: serde_json::Value = serde_json::from_slice(&sweep.stdout).unwrap();
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2, "{v}");
    for c in cells {
        // 8 MiB of random pages cost the receiver CPU: a figure the server measured.
        let r = c["receiver_cpu_s_per_gib"].as_f64();
        assert!(r.is_some_and(|r| r > 0.0), "{c}");
    }
    let profile = pagewire::profile::Profile::load(&out).unwrap();
    let measured = profile.measured.as_ref().unwrap();
    assert!(measured
        .cells
        .iter()
        .all(|c| c.gib_per_s > 0.0 && c.receiver_cpu_s_per_gib.is_some()));
    assert!(matches!(profile.send.channels, Some(1 | 2)));

    // A key cannot go to a server that receives plaintext only.
    std::fs::write(dir.path().join("k.psk"), "x").unwrap();
    let psk = dir.path().join("k.psk");
    let mut with_key = sweep_args.clone();
    with_key.extend(["--psk-file", psk.to_str().unwrap()]);
    let refused = tune(&with_key);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("plaintext only"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
