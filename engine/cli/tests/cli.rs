//! The `pagewire` binary as a user meets it: the demo verifies, bad input fails cleanly.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Command;

fn pagewire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pagewire"))
}

fn uring_missing() -> bool {
    if let Err(e) = pagewire::probe_uring() {
        eprintln!("SKIPPED: io_uring is not usable here: {e}");
        return true;
    }
    false
}

#[test]
fn demo_json_reports_a_verified_transfer() {
    if uring_missing() {
        return;
    }
    let out = pagewire()
        .args([
            "demo",
            "--size",
            "16MiB",
            "--channels",
            "2",
            "--json",
            "--no-pin",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["channels"], 2);
    let pages = v["normal_pages"].as_u64().unwrap() + v["zero_pages"].as_u64().unwrap();
    assert_eq!(pages, 16 << 8);
    for key in [
        "total_time_ms",
        "setup_ms",
        "transfer_ms",
        "transferred_bytes",
        "mbps",
        "receiver_cpu_ms",
        "sender_cpu_ms",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x > 0.0),
            "{key} missing or zero in {text}"
        );
    }
    // As QEMU's total-time holds its setup-time.
    let ms = |key: &str| v[key].as_f64().unwrap();
    assert!(
        (ms("total_time_ms") - ms("setup_ms") - ms("transfer_ms")).abs() < 1e-6,
        "{text}"
    );
}

/// `demo --live --auto-converge`: a guest that writes its working set faster than the capped
/// link sends it converges only once throttled; the JSON says so, round by round.
#[test]
fn a_live_demo_with_auto_converge_throttles_the_guest_and_converges() {
    if uring_missing() {
        return;
    }
    let out = pagewire()
        .args([
            "demo",
            "--live",
            "--size",
            "32MiB",
            "--dirty-rate",
            "200MB",
            "--max-bandwidth",
            "40MB",
            "--downtime-limit",
            "50ms",
            "--auto-converge",
            "--json",
            "--no-pin",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        (&v["verified"], &v["converged"]),
        (&true.into(), &true.into())
    );
    let throttle = v["cpu_throttle_percentage"].as_u64().unwrap();
    let rounds = v["rounds"].as_array().unwrap();
    let steps: Vec<u64> = rounds
        .iter()
        .map(|r| r["throttle_percent"].as_u64().unwrap())
        .collect();
    assert!(
        throttle >= 20 && steps.contains(&throttle),
        "throttle {throttle}%, by round {steps:?}"
    );
    // The static demo's fields mean the same here; the migration's setup has its own name.
    for field in [
        "setup_ms",
        "migration_setup_ms",
        "sender_cpu_ms",
        "receiver_cpu_ms",
        "receiver_cpu_s_per_gib",
    ] {
        assert!(v[field].is_number(), "{field} in {text}");
    }
}

#[test]
fn bad_input_fails_with_a_message_and_no_panic() {
    let cases: [&[&str]; 19] = [
        &["demo", "--size", "12parsecs"],
        &["demo", "--tls", "--no-page-checksums"],
        &[
            "send",
            "--connect",
            "127.0.0.1:9",
            "--from",
            "/dev/null",
            "--psk-file",
            "/dev/null",
            "--no-page-checksums",
        ],
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            "/tmp",
            "--accept-unchecked-pages",
        ],
        &["demo", "--size", "100"],
        &["demo", "--channels", "0"],
        &["demo", "--channels", "1000"],
        &["demo", "--compress", "zstd", "--zstd-level", "99"],
        &["demo", "--compress", "none", "--zstd-level", "3"],
        &["demo", "--max-bandwidth", "3parsec"],
        &["demo", "--idle-timeout", "1ms"],
        &["demo", "--idle-timeout", "1 fortnight"],
        &["demo", "--max-bandwidth", "100MBps"],
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--size",
            "1MiB",
            "--timeout",
            "0",
        ],
        &["send", "--connect", "127.0.0.1:9", "--from", "/tmp"],
        &["recv", "--listen", "127.0.0.1:0", "--into", "/tmp"],
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--size",
            "1MiB",
            "--tls-dir",
            "/nonexistent",
        ],
        &[
            "send",
            "--connect",
            "127.0.0.1:9",
            "--from",
            "/nonexistent/ram.img",
        ],
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--into",
            "/nonexistent/dir/ram.img",
        ],
    ];
    for args in cases {
        let started = std::time::Instant::now();
        let out = pagewire().args(args).output().unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{args:?} took {:?} to fail",
            started.elapsed()
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains("error"),
            "{args:?}: no error message in {err:?}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn errors_are_json_with_json() {
    for args in [
        &["demo", "--channels", "0", "--json"][..],
        &["demo", "--compress", "none", "--zstd-level", "3", "--json"],
        &[
            "demo",
            "--compress",
            "none",
            "--zstd-level",
            "3",
            "--json-stream",
        ],
    ] {
        let out = pagewire().args(args).output().unwrap();
        assert!(!out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text:?}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert!(v["cause"].as_str().is_some(), "{v}");
        // A stream's last line names its event, as the progress and end lines do.
        if args.contains(&"--json-stream") {
            assert_eq!(v["event"], "error", "{v}");
        }
    }
}

#[test]
fn logs_into_a_pipe_carry_no_terminal_colours() {
    if uring_missing() {
        return;
    }
    let out = pagewire()
        .args(["demo", "--size", "8MiB", "--json"])
        .env("RUST_LOG", "pagewire=debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("DEBUG"), "no log lines to check: {logs}");
    assert!(
        !logs.contains('\x1b'),
        "escape codes in a piped log: {logs:?}"
    );
}

#[test]
fn a_closed_standard_output_ends_quietly() {
    if uring_missing() {
        return;
    }
    use std::io::{BufRead, BufReader};
    let mut child = pagewire()
        .args([
            "demo",
            "--size",
            "64MiB",
            "--no-pin",
            "--json-stream",
            "--max-bandwidth",
            "32MiB",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is dropped here: the pipe closes while the demo still has lines to print.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let v: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
    assert_eq!(v["event"], "progress", "{first}");
    for field in [
        "elapsed_ms",
        "moving_ms",
        "mbps",
        "interval_mbps",
        "wire_bytes",
    ] {
        assert!(v[field].is_number(), "{field} in {first}");
    }
    assert!(
        v["moving_ms"].as_u64() <= v["elapsed_ms"].as_u64(),
        "{first}"
    );
}

#[test]
fn version_is_printed() {
    let out = pagewire().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pagewire "));
}

/// Runs `pagewire recv` (with `recv_extra`) and `pagewire send` of `src` (with `send_extra`)
/// between two processes over loopback; both must succeed.
fn send_recv(src: &std::path::Path, recv_extra: &[&str], send_extra: &[&str]) -> serde_json::Value {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut recv = pagewire()
        .args(["recv", "--listen", &addr])
        .args(recv_extra)
        .args(["--timeout", "20", "--json", "--no-pin"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut sent = None;
    for _ in 0..100 {
        let out = pagewire()
            .args(["send", "--connect", &addr, "--from", src.to_str().unwrap()])
            .args(["--no-pin", "--json"])
            .args(
                if send_extra
                    .iter()
                    .any(|a| *a == "--channels" || *a == "--profile")
                {
                    &[][..]
                } else {
                    &["--channels", "3"][..]
                },
            )
            .args(send_extra)
            .output()
            .unwrap();
        if out.status.success() {
            sent = Some(out);
            break;
        }
        // The receiver may not be listening yet.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sent = sent.expect("the sender never got through");
    let status = recv.wait().unwrap();
    assert!(status.success());
    serde_json::from_slice(&sent.stdout).unwrap()
}

#[test]
fn send_and_recv_move_a_file_between_processes() {
    if uring_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    // A new image of a given size.
    let dst = dir.path().join("dst.img");
    let into = dst.to_str().unwrap();
    send_recv(&src, &["--into", into, "--size", "2MiB"], &[]);
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    // A new image sized by the sender's hello, with a pre-shared key on both sides.
    let key = dir.path().join("keys.psk");
    let out = pagewire()
        .args(["psk", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = key.to_str().unwrap();
    let dst2 = dir.path().join("sized-by-sender.img");
    let into = dst2.to_str().unwrap();
    send_recv(
        &src,
        &["--into", into, "--psk-file", key],
        &["--psk-file", key],
    );
    assert_eq!(std::fs::read(&dst2).unwrap(), data);
    // Plaintext pages without checksums, which the receiver must accept.
    let dst4 = dir.path().join("unchecked.img");
    let v = send_recv(
        &src,
        &["--into", dst4.to_str().unwrap(), "--accept-unchecked-pages"],
        &["--no-page-checksums"],
    );
    assert_eq!(v["unchecked_pages"], true, "{v}");
    assert_eq!(std::fs::read(&dst4).unwrap(), data);
    // Settings from a tuning profile, and a flag that overrides one of them.
    let profile = dir.path().join("profile.toml");
    std::fs::write(
        &profile,
        "[send]\nchannels = 2\nzero_copy = \"off\"\ncongestion = \"reno\"\n",
    )
    .unwrap();
    let p = profile.to_str().unwrap();
    let dst3 = dir.path().join("profiled.img");
    let v = send_recv(&src, &["--into", dst3.to_str().unwrap()], &["--profile", p]);
    assert_eq!(v["channels"], 2, "{v}");
    assert_eq!(v["zero_copy"]["completed"], 0, "zero-copy off: {v}");
    assert_eq!(v["congestion"], "reno", "{v}");
    let v = send_recv(
        &src,
        &["--into", dst3.to_str().unwrap()],
        &["--profile", p, "--channels", "1"],
    );
    assert_eq!(v["channels"], 1, "{v}");
    // The command line's congestion control wins over the profile's too.
    let offered = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default();
    if let Some(other) = offered.split_whitespace().find(|a| *a != "reno") {
        let v = send_recv(
            &src,
            &["--into", dst3.to_str().unwrap()],
            &["--profile", p, "--congestion", other],
        );
        assert_eq!(v["congestion"], other, "{v}");
    }
    // --channels auto without a profile measures, and says what it chose (not in JSON mode).
    let v = send_recv(
        &src,
        &["--into", dst3.to_str().unwrap()],
        &["--channels", "auto"],
    );
    assert!(v["channels"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(std::fs::read(&dst3).unwrap(), data);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("pagewire"))
        .collect();
    assert!(left.is_empty(), "temporary or marker files left: {left:?}");
}

#[test]
fn tls_demo_certs_and_clear_errors_for_bad_tls_files() {
    if uring_missing() {
        return;
    }
    let out = pagewire()
        .args(["demo", "--size", "8MiB", "--tls", "--json", "--no-pin"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true);

    let dir = std::env::temp_dir().join(format!("pagewire-certs-{}", std::process::id()));
    let out = pagewire()
        .args([
            "certs",
            "--out",
            dir.to_str().unwrap(),
            "--hostname",
            "dst.example",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    for f in [
        "ca-cert.pem",
        "server-cert.pem",
        "server-key.pem",
        "client-cert.pem",
        "client-key.pem",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    // A second run into the same directory replaces nothing.
    let key_before = std::fs::read(dir.join("ca-key.pem")).unwrap();
    let out = pagewire()
        .args(["certs", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("refusing"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(dir.join("ca-key.pem")).unwrap(), key_before);
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let cases: [(Vec<String>, &str); 3] = [
        (
            vec![p("client-cert.pem"), p("missing-key.pem"), p("ca-cert.pem")],
            "missing-key.pem",
        ),
        (
            vec![p("client-cert.pem"), p("server-key.pem"), p("ca-cert.pem")],
            "does not match the certificate",
        ),
        (
            vec![p("client-key.pem"), p("client-key.pem"), p("ca-cert.pem")],
            "holds no PEM certificate",
        ),
    ];
    for (files, want) in cases {
        let out = pagewire()
            .args(["send", "--connect", "127.0.0.1:9", "--from", "/dev/null"])
            .args([
                "--tls-cert",
                &files[0],
                "--tls-key",
                &files[1],
                "--tls-ca",
                &files[2],
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(want), "expected {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallTmpfs(std::path::PathBuf);

impl SmallTmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("pagewire-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !ok.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "mount -t tmpfs failed (not root?): {}",
                String::from_utf8_lossy(&ok.stderr).trim()
            ));
        }
        Ok(SmallTmpfs(dir))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn recv_into_a_full_filesystem_fails_cleanly_and_leaves_no_image() {
    let fs = match SmallTmpfs::mount("4m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let target = fs.0.join("dst.img");
    let started = std::time::Instant::now();
    let out = pagewire()
        .args([
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--size",
            "64MiB",
            "--into",
        ])
        .arg(&target)
        .args(["--timeout", "10s"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("reserving") && err.contains("No space left"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("listening"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let left: Vec<_> = std::fs::read_dir(&fs.0).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// Reads standard error of `child` until a line starting with `prefix`; returns that line.
fn wait_for_line(child: &mut std::process::Child, prefix: &str) -> String {
    use std::io::{BufRead, BufReader};
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("the process ended before printing {prefix:?}");
        }
        if line.starts_with(prefix) {
            // Keep draining in the background so the child never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut sink = String::new();
                while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
                    sink.clear();
                }
            });
            return line;
        }
    }
}

#[test]
fn kill_9_of_either_side_mid_transfer_is_reported_by_the_other_within_its_bound() {
    if uring_missing() {
        return;
    }
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![0x5au8; 64 << 20]).unwrap();
    for victim in ["send", "recv"] {
        let mut recv = pagewire()
            .args([
                "recv",
                "--listen",
                "127.0.0.1:0",
                "--size",
                "64MiB",
                "--idle-timeout",
                "2s",
                "--no-pin",
            ])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let line = wait_for_line(&mut recv, "pagewire: listening on ");
        let addr = line
            .trim()
            .trim_start_matches("pagewire: listening on ")
            .to_string();
        let mut send = pagewire()
            .args(["send", "--connect", &addr, "--from"])
            .arg(&src)
            .args([
                "--max-bandwidth",
                "16MiB",
                "--idle-timeout",
                "2s",
                "--no-pin",
            ])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(700));
        let (killed, survivor) = if victim == "send" {
            (&mut send, &mut recv)
        } else {
            (&mut recv, &mut send)
        };
        killed.kill().unwrap();
        let _ = killed.wait();
        let status = wait_within(survivor, &format!("the other side of a killed {victim}"));
        assert!(
            !status.success(),
            "killing {victim} left the other side successful"
        );
    }
}

/// A SIGBUS sent by another process (`kill -BUS`) ends the receiver as it would any program,
/// even while its image file's mapping is guarded against faults (which only a fault may
/// turn into an error).
#[test]
fn a_sigbus_sent_by_kill_ends_the_receiver() {
    if uring_missing() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut recv = pagewire()
        .args([
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--size",
            "1MiB",
            "--into",
        ])
        .arg(dir.path().join("dst.img"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The image is mapped (and guarded) before the receiver listens.
    wait_for_line(&mut recv, "pagewire: listening on");
    let pid = recv.id() as libc::pid_t;
    // SAFETY: signalling our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGBUS) }, 0);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = recv.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > std::time::Duration::from_secs(5) {
            let _ = recv.kill();
            panic!("the receiver survived a SIGBUS sent to it");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}

/// A receiver into an existing image that fails before any page arrived (it may not listen
/// there, or no sender came) leaves the image as it was, without a marker calling it
/// incomplete; one that received nothing into a new image leaves no file.
#[test]
fn a_receiver_that_received_nothing_leaves_the_image_as_it_was() {
    if uring_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let marker = dir.path().join("vm.img.pagewire-incomplete");
    for listen in ["0.0.0.0:0", "127.0.0.1:0"] {
        let out = pagewire()
            .args(["recv", "--listen", listen, "--timeout", "300ms", "--into"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{listen}");
        assert!(!marker.exists(), "{listen}: {:?}", out);
        assert_eq!(std::fs::read(&img).unwrap(), vec![0x42u8; 1 << 20]);
    }
    // A key file that cannot be read is an option error: found before the image is opened, so
    // neither the existing image nor a new one is touched.
    let new = dir.path().join("new.img");
    for (into, size) in [(&img, None), (&new, Some("1MiB"))] {
        let mut cmd = pagewire();
        cmd.args(["recv", "--listen", "127.0.0.1:0", "--timeout", "300ms"])
            .arg("--psk-file")
            .arg(dir.path().join("no-such.key"))
            .arg("--into")
            .arg(into);
        if let Some(size) = size {
            cmd.args(["--size", size]);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("no-such.key"),
            "{stderr}"
        );
        assert!(!marker.exists(), "{stderr}");
        assert_eq!(std::fs::read(&img).unwrap(), vec![0x42u8; 1 << 20]);
    }
    let out = pagewire()
        .args(["recv", "--listen", "127.0.0.1:0", "--timeout", "300ms"])
        .args(["--size", "1MiB", "--into"])
        .arg(&new)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["vm.img"], "files left behind");
}

/// Waits (up to 10 s) until the file `log` holds a line starting with `prefix`; returns it.
fn wait_for_log_line(log: &std::path::Path, prefix: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
            return line.to_string();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "no line {prefix:?} in: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits (up to 10 s) for `child` to end.
fn wait_within(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            panic!("{what} kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Starts `pagewire recv --json-stream --into <into>` (standard output to `recv_stdout`,
/// standard error to `dir/recv.log`) and, once it listens, `pagewire send --from <src>` to it,
/// paced at `max_bandwidth` (standard error to `dir/send.log`).
fn paced_transfer(
    dir: &std::path::Path,
    src: &std::path::Path,
    into: &std::path::Path,
    recv_stdout: std::process::Stdio,
    max_bandwidth: &str,
) -> (std::process::Child, std::process::Child) {
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let recv = pagewire()
        .args([
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--no-pin",
            "--json-stream",
        ])
        .arg("--into")
        .arg(into)
        .stderr(log("recv.log"))
        .stdout(recv_stdout)
        .spawn()
        .unwrap();
    let line = wait_for_log_line(&dir.join("recv.log"), "pagewire: listening on ");
    let addr = line
        .trim_start_matches("pagewire: listening on ")
        .to_string();
    let send = pagewire()
        .args(["send", "--connect", &addr, "--no-pin", "--from"])
        .arg(src)
        .args(["--max-bandwidth", max_bandwidth])
        .stderr(log("send.log"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (recv, send)
}

/// The names of the files in `dir` (hidden ones included) but the tests' `.log` files, sorted.
fn files_but_logs(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    names.sort();
    names
}

/// Ctrl-C or SIGTERM cancels a transfer as any failure ends it: the peer hears that it was
/// cancelled, a new image's temporary file is removed and an existing image is marked
/// incomplete (killed by the signal, the receiver would leave a hidden file of the image's
/// size, or an image without its marker); then the process ends by that signal. A signal the
/// process was started with ignored (`nohup`) stays ignored.
#[test]
fn a_signal_cancels_the_transfer_and_cleans_up_like_any_failure() {
    if uring_missing() {
        return;
    }
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![0x5au8; 64 << 20]).unwrap();
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let files = || files_but_logs(dir.path());
    let signal = |child: &std::process::Child, signal: i32| {
        // SAFETY: signalling a child process this test spawned and has not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
    };

    // A receiver that waits for a sender into a new image: Ctrl-C leaves no file.
    let new = dir.path().join("new.img");
    let mut recv = pagewire()
        .args([
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--size",
            "64MiB",
            "--into",
        ])
        .arg(&new)
        .stderr(log("recv0.log"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_log_line(&dir.path().join("recv0.log"), "pagewire: listening on ");
    signal(&recv, libc::SIGINT);
    let status = wait_within(&mut recv, "a receiver after Ctrl-C");
    let stderr = read("recv0.log");
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}: {stderr}");
    assert!(stderr.contains("cancel"), "{stderr}");
    assert_eq!(files(), ["src.img"], "{stderr}");

    // Started with SIGINT ignored, as `nohup` or a script's background job would: Ctrl-C
    // changes nothing; SIGTERM still cancels.
    let mut cmd = pagewire();
    cmd.args([
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--size",
        "64MiB",
        "--into",
    ])
    .arg(&new)
    .stderr(log("recv1.log"))
    .stdout(Stdio::null());
    // SAFETY: between fork and exec only `signal` runs, which is async-signal-safe.
    let mut recv = unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        })
    }
    .spawn()
    .unwrap();
    wait_for_log_line(&dir.path().join("recv1.log"), "pagewire: listening on ");
    signal(&recv, libc::SIGINT);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(recv.try_wait().unwrap().is_none(), "{}", read("recv1.log"));
    signal(&recv, libc::SIGTERM);
    let status = wait_within(&mut recv, "a receiver after SIGTERM");
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "{}",
        read("recv1.log")
    );
    assert_eq!(files(), ["src.img"], "{}", read("recv1.log"));

    // Mid-transfer, into an existing image: SIGTERM to either side, once pages move.
    let dst = dir.path().join("dst.img");
    for victim in ["recv", "send"] {
        std::fs::write(&dst, vec![0u8; 64 << 20]).unwrap();
        let _ = std::fs::remove_file(dir.path().join("dst.img.pagewire-incomplete"));
        let (mut recv, mut send) =
            paced_transfer(dir.path(), &src, &dst, log("recv.json.log").into(), "16MiB");
        // Pages on the wire: both sides are past their set-up (the sender's frames follow its
        // connect, where its cancel is registered).
        let started = std::time::Instant::now();
        while !read("recv.json.log").lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["wire_bytes"].as_u64().is_some_and(|b| b > 0))
        }) {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "no pages moved: {}",
                read("recv.log")
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let (killed, other) = if victim == "recv" {
            (&mut recv, &mut send)
        } else {
            (&mut send, &mut recv)
        };
        signal(killed, libc::SIGTERM);
        let killed_status = wait_within(killed, "the signalled side");
        let other_status = wait_within(other, "the other side");
        // With --json-stream the receiver's error is the last line of its standard output.
        let recv_log = read("recv.log") + &read("recv.json.log");
        let send_log = read("send.log");
        let both = format!("recv: {recv_log}\nsend: {send_log}");
        assert_eq!(killed_status.signal(), Some(libc::SIGTERM), "{both}");
        assert!(!other_status.success(), "{both}");
        // The signalled side went through the failure path first, and the other side heard
        // why.
        assert!(
            recv_log.contains("cancel") && send_log.contains("cancel"),
            "{both}"
        );
        assert_eq!(
            files(),
            ["dst.img", "dst.img.pagewire-incomplete", "src.img"],
            "{both}"
        );
    }
}

/// A `--json-stream` reader that goes away mid-transfer (`pagewire recv --json-stream ... |
/// head -n 2`) ends the receiver as `SIGPIPE` ends a Unix filter, but only after the transfer
/// is cancelled as for any failure: the sender hears why, and a new image's temporary file is
/// removed (killed at the write, the receiver would leave a hidden file of the image's size).
#[test]
fn a_closed_json_stream_cancels_the_transfer_and_cleans_up() {
    if uring_missing() {
        return;
    }
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![0x5au8; 64 << 20]).unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    // 8 seconds at this pace: the reader closes after the first second with pages moved.
    let new = dir.path().join("new.img");
    let (mut recv, mut send) = paced_transfer(dir.path(), &src, &new, Stdio::piped(), "8MiB");
    let mut lines = BufReader::new(recv.stdout.take().unwrap()).lines();
    let started = std::time::Instant::now();
    loop {
        let line = lines.next().expect("the receiver's output ended").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        // Each line says where the receiver stands: waiting for the sender, then receiving.
        assert!(v["rounds"].is_u64(), "{line}");
        if v["wire_bytes"].as_u64().is_some_and(|b| b > 0) {
            assert_eq!(v["status"], "active", "{line}");
            break;
        }
        assert!(v["status"] == "setup" || v["status"] == "active", "{line}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no pages moved: {}",
            read("recv.log")
        );
    }
    drop(lines);
    let recv_status = wait_within(&mut recv, "a receiver whose output closed");
    let send_status = wait_within(&mut send, "its sender");
    let both = format!("recv: {}\nsend: {}", read("recv.log"), read("send.log"));
    assert_eq!(recv_status.signal(), Some(libc::SIGPIPE), "{both}");
    assert!(both.contains("standard output closed"), "{both}");
    assert!(!send_status.success(), "{both}");
    assert!(read("send.log").contains("cancel"), "{both}");
    assert_eq!(files_but_logs(dir.path()), ["src.img"], "{both}");
}

/// A profile made on a host with a congestion control this one lacks serves here once
/// `--congestion` replaces it; without that flag the error names the profile.
#[test]
fn a_profile_from_another_host_serves_with_its_congestion_replaced() {
    let Ok(default) = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control") else {
        eprintln!("SKIPPED: this kernel does not say its congestion control");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.toml");
    std::fs::write(
        &profile,
        "[send]\nchannels = 1\ncongestion = \"nosuchcc\"\n",
    )
    .unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![1u8; 1 << 20]).unwrap();
    // Port 9 on loopback: nothing listens, so a run that gets past its options fails to connect.
    let run = |extra: &[&str]| {
        let out = pagewire()
            .args(["send", "--connect", "127.0.0.1:9", "--profile"])
            .arg(&profile)
            .arg("--from")
            .arg(&src)
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(
        err.contains("p.toml") && err.contains("not offered"),
        "{err}"
    );
    let err = run(&["--congestion", default.trim()]);
    assert!(
        !err.contains("not offered") && err.contains("connect"),
        "{err}"
    );
}
