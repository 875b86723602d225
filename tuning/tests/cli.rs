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
