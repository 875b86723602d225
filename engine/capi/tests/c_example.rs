//! The C example (`examples/migrate.c`) against libpagewire: installed into a temporary prefix
//! with its header and pkg-config file, compiled with the system C compiler using what
//! `pkg-config --cflags --libs pagewire` says, and run, plaintext and over TLS. It migrates two
//! `mmap`ed regions over three bitmap-driven rounds plus a device state blob, and checks the
//! destination with `memcmp`. The live example (`examples/live.c`) lets pagewire run the
//! pre-copy through C callbacks while a thread writes the memory, and cancels one from another
//! thread. Both skip with a reason without a C compiler or io_uring.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;

/// Installs the library (shared and static), header and pkg-config file under `prefix` with
/// `install.sh`, as a user would, from the libraries cargo built for this test: the crate's
/// own library, which `crate-type` makes an rlib too so that cargo builds it for its tests,
/// with the workspace's features, into `target/<profile>/deps`. A nested `cargo build -p
/// pagewire-capi` would resolve other features and build the engine again, about 50 s of a
/// fresh CI run.
fn install(prefix: &Path) {
    // This test runs from target/<profile>/deps/, beside the libraries.
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("install.sh");
    let status = Command::new("sh")
        .arg(&script)
        .arg("--from")
        .arg(&deps)
        .arg(prefix)
        .status()
        .unwrap();
    assert!(status.success(), "install.sh failed");
    for file in [
        "lib/libpagewire.so",
        "lib/libpagewire.a",
        "include/pagewire.h",
        "lib/pkgconfig/pagewire.pc",
    ] {
        assert!(prefix.join(file).exists(), "install.sh left out {file}");
    }
}

/// `install.sh` refuses what it cannot do, with the reason and before it builds or copies
/// anything: an unknown option or contradicting ones (exit 2), a directory without the
/// libraries (exit 1).
#[test]
fn install_sh_refuses_bad_arguments_with_the_reason() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("install.sh");
    let empty = tempfile::tempdir().unwrap();
    let prefix = empty.path().join("prefix");
    let (from, to) = (empty.path().to_str().unwrap(), prefix.to_str().unwrap());
    for (args, code, says) in [
        (vec!["--bogus", to], 2, "unknown option --bogus"),
        (
            vec!["--debug", "--from", from, to],
            2,
            "--from builds nothing",
        ),
        (vec!["--from"], 2, "--from needs a directory"),
        (
            vec!["--from", from, to],
            1,
            "libpagewire_capi.so is missing",
        ),
    ] {
        let out = Command::new("sh")
            .arg(&script)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(code) && stderr.contains(says),
            "{args:?}: {:?} {stderr}",
            out.status
        );
        assert!(!prefix.exists(), "{args:?} installed something");
    }
}

/// Compiler flags for libpagewire: pkg-config's when it is installed, else the same by hand.
fn flags(prefix: &Path) -> Vec<String> {
    let pkg = Command::new("pkg-config")
        .args(["--cflags", "--libs", "pagewire"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output();
    match pkg {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect(),
        _ => {
            eprintln!("(pkg-config is not installed: passing the same flags by hand)");
            vec![
                format!("-I{}", prefix.join("include").display()),
                format!("-L{}", prefix.join("lib").display()),
                "-lpagewire".into(),
            ]
        }
    }
}

/// Whether the C examples can run here: a C compiler and io_uring (else why not).
fn unusable() -> Option<String> {
    if Command::new("cc").arg("--version").output().is_err() {
        return Some("no C compiler (cc) on this machine".into());
    }
    pw::probe_uring()
        .err()
        .map(|e| format!("io_uring is not usable on this machine: {e}"))
}

/// Installs libpagewire under `prefix` and compiles `examples/{name}.c` against it there.
fn compile(prefix: &Path, name: &str) -> PathBuf {
    install(prefix);
    let exe = prefix.join(name);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.c"));
    let built = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg(&example)
        .args(flags(prefix))
        .arg("-lpthread")
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    exe
}

/// The static library links on its own: `migrate.c` against `libpagewire.a` and the system
/// libraries the installed `pagewire.pc` names in `Libs.private` (what `pkg-config --static`
/// adds), with no shared libpagewire anywhere it could be found, and migrates.
#[test]
fn the_c_example_links_statically() {
    if let Some(why) = unusable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let prefix = tempfile::tempdir().unwrap();
    install(prefix.path());
    let pc = std::fs::read_to_string(prefix.path().join("lib/pkgconfig/pagewire.pc")).unwrap();
    let private: Vec<&str> = pc
        .lines()
        .find_map(|l| l.strip_prefix("Libs.private:"))
        .expect("pagewire.pc has Libs.private")
        .split_whitespace()
        .collect();
    std::fs::remove_file(prefix.path().join("lib/libpagewire.so")).unwrap();
    let exe = prefix.path().join("migrate-static");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/migrate.c");
    let built = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg(format!("-I{}", prefix.path().join("include").display()))
        .arg(&example)
        .arg(prefix.path().join("lib/libpagewire.a"))
        .args(&private)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "static link with {private:?} failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("verified"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn certificates() -> tempfile::TempDir {
    let certs = tempfile::tempdir().unwrap();
    pw::tls::certs::generate(&pw::tls::certs::CertOptions::default())
        .unwrap()
        .write(certs.path())
        .unwrap();
    certs
}

#[test]
fn the_c_example_migrates_and_verifies() {
    if let Some(why) = unusable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let prefix = tempfile::tempdir().unwrap();
    let exe = compile(prefix.path(), "migrate");
    let certs = certificates();
    // The first allowed core: shards of both sides pinned to it alone.
    let core = core_affinity::get_core_ids()
        .and_then(|c| c.first().map(|c| c.id.to_string()))
        .unwrap_or_else(|| "0".into());
    for (tls, cores) in [
        (None, None),
        (Some(certs.path()), None),
        (None, Some(core.as_str())),
    ] {
        let mut run = Command::new(&exe);
        run.args(tls);
        if let Some(c) = cores {
            run.env("PAGEWIRE_CORES", c);
        }
        let out = run.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.starts_with("verified"),
            "tls {}, cores {cores:?}: {stdout}{}",
            tls.is_some(),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("tls {}, cores {cores:?}: {}", tls.is_some(), stdout.trim());
    }
    // A core list that is no list is refused with the reason.
    let (ok, all) = run_with(&exe, "PAGEWIRE_CORES", "3-1");
    assert!(!ok && all.contains("CPU list"), "{all}");
    // The sender's congestion control: reno is in every kernel; a name none offers is refused.
    let (ok, all) = run_with(&exe, "PAGEWIRE_CONGESTION", "reno");
    assert!(ok && all.starts_with("verified"), "{all}");
    let (ok, all) = run_with(&exe, "PAGEWIRE_CONGESTION", "no_such_cc");
    assert!(!ok && all.contains("no_such_cc"), "{all}");
    // Pages without checksums: accepted where the receiver agrees, refused where it does not.
    let (ok, all) = run_with(&exe, "PAGEWIRE_UNCHECKED_PAGES", "1");
    assert!(ok && all.starts_with("verified"), "{all}");
    let (ok, all) = run_with(&exe, "PAGEWIRE_UNCHECKED_PAGES", "sender");
    assert!(!ok && all.contains("without checksums"), "{all}");
    // A pre-shared key: the same on both sides migrates; another one on the sender is refused.
    let (psk, other) = (
        certs.path().join("keys.psk"),
        certs.path().join("other.psk"),
    );
    std::fs::write(&psk, pw::auth::Psk::generate_line()).unwrap();
    std::fs::write(&other, pw::auth::Psk::generate_line()).unwrap();
    let (ok, all) = run_with(&exe, "PAGEWIRE_PSK_FILE", psk.to_str().unwrap());
    assert!(ok && all.starts_with("verified"), "{all}");
    let out = Command::new(&exe)
        .env("PAGEWIRE_PSK_FILE", &psk)
        .env("PAGEWIRE_SENDER_PSK_FILE", &other)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a sender with another key migrated");
    // zstd shrinks the example's patterned pages; a compression nobody knows is refused.
    let (ok, plain) = run_with(&exe, "PAGEWIRE_UNUSED", "");
    assert!(ok, "{plain}");
    let (ok, zstd) = run_with(&exe, "PAGEWIRE_COMPRESS", "zstd");
    assert!(ok && zstd.starts_with("verified"), "{zstd}");
    assert!(
        wire_bytes(&zstd) * 4 < wire_bytes(&plain),
        "zstd did not shrink the wire bytes: {zstd} against {plain}"
    );
    let (ok, all) = run_with(&exe, "PAGEWIRE_COMPRESS", "lz5");
    assert!(!ok && all.contains("lz5"), "{all}");
}

/// The "N bytes on the wire" the example printed.
fn wire_bytes(output: &str) -> u64 {
    let before = output
        .split(" bytes on the wire")
        .next()
        .unwrap_or_default();
    before
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no wire bytes in {output:?}"))
}

/// `examples/live.c`: pagewire runs the pre-copy of memory a thread keeps writing, through the
/// C callbacks, plaintext and over TLS, and the destination equals the paused source; then a
/// management thread raises the bandwidth limit and cancels, and both sides stop within a
/// second; a control made before the sender connects cancels a connect that waits on a
/// receiver that never answers; then auto-converge throttles a writer that outruns the link, through its callback,
/// until the policy gives up with the guest still running.
#[test]
fn the_live_c_example_migrates_a_writing_guest_limits_cancels_and_throttles() {
    if let Some(why) = unusable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let prefix = tempfile::tempdir().unwrap();
    let exe = compile(prefix.path(), "live");
    let certs = certificates();
    let tls = certs.path().to_str().unwrap();
    for args in [
        vec![],
        vec![tls],
        vec!["cancel"],
        vec!["cancel-connect"],
        vec!["throttle"],
    ] {
        let out = Command::new(&exe).args(&args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let expected = match args.first() {
            Some(&"cancel") => "cancel:",
            Some(&"cancel-connect") => "cancel-connect:",
            Some(&"throttle") => "throttle:",
            _ => "verified live",
        };
        assert!(
            out.status.success() && stdout.starts_with(expected),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{args:?}: {}", stdout.trim());
    }
}

/// Runs the example with one environment variable set: whether it succeeded, and its standard
/// output followed by its standard error.
fn run_with(exe: &Path, key: &str, value: &str) -> (bool, String) {
    let out = Command::new(exe).env(key, value).output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), all)
}
