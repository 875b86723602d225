//! `pagewire-bench compress`: compression over shaped links. Two network namespaces joined by a
//! veth pair, the sender's side shaped with `tc tbf`, the `pagewire` CLI run inside each; every
//! mode (none, zstd, zlib, auto) on the same RAM image, interleaved. The namespaces are removed
//! afterwards, also on failure. Skips with a printed reason without root, `ip` or `tc`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pagewire::synth::{fill, Content};
use pagewire::GuestMemory;
use serde::Serialize;

use crate::measure::median;

const TX_IP: &str = "192.0.2.1";
const RX_IP: &str = "192.0.2.2";
const MODES: [&str; 4] = ["none", "zstd", "zlib", "auto"];

/// Two namespaces and a veth pair, removed on drop.
struct Link {
    tx: String,
    rx: String,
    dev: String,
}

fn run(cmd: &[&str]) -> Result<()> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {}", cmd[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Link {
    fn new() -> Result<Link> {
        let id = std::process::id() % 100_000;
        let link = Link {
            tx: format!("pwb-tx-{id}"),
            rx: format!("pwb-rx-{id}"),
            dev: format!("pwb{id}"),
        };
        let peer = format!("{}p", link.dev);
        run(&["ip", "netns", "add", &link.tx])?;
        run(&["ip", "netns", "add", &link.rx])?;
        run(&[
            "ip", "link", "add", &link.dev, "netns", &link.tx, "type", "veth", "peer", "name",
            &peer, "netns", &link.rx,
        ])?;
        run(&[
            "ip",
            "-n",
            &link.tx,
            "addr",
            "add",
            &format!("{TX_IP}/24"),
            "dev",
            &link.dev,
        ])?;
        run(&[
            "ip",
            "-n",
            &link.rx,
            "addr",
            "add",
            &format!("{RX_IP}/24"),
            "dev",
            &peer,
        ])?;
        for (ns, dev) in [(&link.tx, link.dev.as_str()), (&link.rx, peer.as_str())] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(link)
    }

    /// Shapes the sender-to-receiver direction to `mbit` Mbit/s.
    fn shape(&self, mbit: u64) -> Result<()> {
        // A token bucket needs a burst of at least rate / HZ; 1/100 s of traffic, 64 KiB minimum.
        let burst = (mbit * 1_000_000 / 8 / 100).max(64 << 10);
        run(&[
            "tc",
            "-n",
            &self.tx,
            "qdisc",
            "replace",
            "dev",
            &self.dev,
            "root",
            "tbf",
            "rate",
            &format!("{mbit}mbit"),
            "burst",
            &burst.to_string(),
            "latency",
            "50ms",
        ])
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.tx]);
        let _ = run(&["ip", "netns", "del", &self.rx]);
    }
}

/// Why shaped links cannot be made here, if they cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "tc"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("`{tool}` (iproute2) is not installed"));
        }
    }
    None
}

/// One transfer's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    link_mbit: u64,
    content: &'static str,
    mode: &'static str,
    bytes: u64,
    seconds: f64,
    wire_bytes: u64,
    compressed_frames: u64,
    sender_cpu_s_per_gib: f64,
    receiver_cpu_s_per_gib: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    cells: Vec<Cell>,
    /// Per (link, content): none's time / zstd's time.
    zstd_speedup: Vec<(u64, &'static str, f64)>,
    /// Per (link, content): auto's time / the better of none and zstd.
    auto_over_best: Vec<(u64, &'static str, f64)>,
}

fn pagewire_binary() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("pagewire");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p pagewire-cli` (the benchmark runs the CLI in each namespace)",
            bin.display()
        );
    }
    Ok(bin)
}

fn json_of(out: &std::process::Output, who: &str) -> Result<serde_json::Value> {
    if !out.status.success() {
        // With --json the command reports its error as JSON on standard output.
        bail!(
            "{who} failed: {} {}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing the {who}'s JSON"))
}

fn one(
    bin: &Path,
    link: &Link,
    image: &Path,
    bytes: u64,
    mode: &'static str,
    port: u16,
) -> Result<(f64, serde_json::Value, serde_json::Value)> {
    let listen = format!("{RX_IP}:{port}");
    let mut recv = Command::new("ip")
        .args(["netns", "exec", &link.rx])
        .arg(bin)
        .args(["recv", "--listen", &listen, "--size", &bytes.to_string()])
        // A private veth link the benchmark made itself: plaintext on purpose.
        .args(["--timeout", "30", "--json", "--no-pin", "--insecure"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the receiver")?;
    // Start the sender only once the receiver says it listens (its first line on standard
    // error): racing it would make an early channel's refusal look like a sender failure, and
    // a receiver keeps a half-connected session for a while.
    let stderr = recv
        .stderr
        .take()
        .context("the receiver's standard error")?;
    let (listening_tx, listening) = std::sync::mpsc::channel();
    let drain = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if line.contains("listening on") {
                let _ = listening_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if listening.recv_timeout(Duration::from_secs(10)).is_err() {
        let _ = recv.kill();
        let err = drain.join().unwrap_or_default();
        bail!(
            "the receiver did not start listening within 10 s: {}",
            err.trim()
        );
    }
    let sent = Command::new("ip")
        .args(["netns", "exec", &link.tx])
        .arg(bin)
        .args(["send", "--connect", &listen, "--from"])
        .arg(image)
        .args(["--compress", mode, "--json", "--no-pin", "--channels", "2"])
        .output()
        .context("running the sender")?;
    let mut received = recv
        .wait_with_output()
        .context("waiting for the receiver")?;
    received.stderr = drain.join().unwrap_or_default().into_bytes();
    let s = json_of(&sent, "sender")?;
    let r = json_of(&received, "receiver")?;
    let seconds = s["total_time_ms"].as_f64().unwrap_or(0.0) / 1e3;
    Ok((seconds, s, r))
}

/// One mode's repetitions as one cell: the median time and CPU figures (for an even count, the
/// mean of the middle two, as everywhere in the benchmarks); the wire figures of a middle run.
/// `runs` is not empty (`--reps` is at least 1).
fn median_cell(mut runs: Vec<Cell>) -> Cell {
    let of = |f: fn(&Cell) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    let (seconds, send, recv) = (
        of(|c| c.seconds),
        of(|c| c.sender_cpu_s_per_gib),
        of(|c| c.receiver_cpu_s_per_gib),
    );
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let mut cell = runs[(runs.len() - 1) / 2].clone();
    cell.seconds = seconds;
    cell.sender_cpu_s_per_gib = send;
    cell.receiver_cpu_s_per_gib = recv;
    cell
}

/// Runs the benchmark; `quick` uses small images.
pub fn run_bench(
    links: &[u64],
    contents: &[Content],
    reps: usize,
    quick: bool,
    json: bool,
) -> Result<()> {
    if let Some(why) = unavailable() {
        println!("SKIPPED: shaped links unavailable: {why}");
        return Ok(());
    }
    let bin = pagewire_binary()?;
    let link = Link::new().context("creating the network namespaces")?;
    let mut cells = Vec::new();
    let mut port = 7900u16;
    for &mbit in links {
        link.shape(mbit)?;
        // About 4 s of uncompressed transfer per cell (less with --quick), whole MiB.
        let seconds = if quick { 0.5 } else { 4.0 };
        let bytes = (((mbit as f64 * 1e6 / 8.0 * seconds) as u64) >> 20).clamp(4, 2048) << 20;
        for &content in contents {
            let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
            let image = dir.path().join("ram.img");
            fill(&GuestMemory::create_file(&image, bytes)?, content, 7);
            let mut per_mode: Vec<Vec<Cell>> = vec![Vec::new(); MODES.len()];
            for rep in 0..reps {
                for (m, mode) in MODES.iter().enumerate() {
                    port = port.wrapping_add(1).max(7900);
                    let (seconds, s, r) = one(&bin, &link, &image, bytes, mode, port)?;
                    let gib = bytes as f64 / (1u64 << 30) as f64;
                    let cell = Cell {
                        link_mbit: mbit,
                        content: content.name(),
                        mode,
                        bytes,
                        seconds,
                        wire_bytes: s["transferred_bytes"].as_u64().unwrap_or(0),
                        compressed_frames: s["compressed_frames"].as_u64().unwrap_or(0),
                        sender_cpu_s_per_gib: s["cpu_ms"].as_f64().unwrap_or(0.0) / 1e3 / gib,
                        receiver_cpu_s_per_gib: r["cpu_ms"].as_f64().unwrap_or(0.0) / 1e3 / gib,
                    };
                    if !json {
                        eprintln!(
                            "{mbit:>6} Mbit/s {:<6} {mode:<5} rep {}: {:.2} s, {} MiB on the wire",
                            content.name(),
                            rep + 1,
                            seconds,
                            cell.wire_bytes >> 20
                        );
                    }
                    per_mode[m].push(cell);
                }
            }
            cells.extend(per_mode.into_iter().map(median_cell));
        }
    }
    drop(link);
    let time = |mbit: u64, content: &str, mode: &str| {
        cells
            .iter()
            .find(|c| c.link_mbit == mbit && c.content == content && c.mode == mode)
            .map(|c| c.seconds)
            .unwrap_or(f64::NAN)
    };
    let mut zstd_speedup = Vec::new();
    let mut auto_over_best = Vec::new();
    for &mbit in links {
        for &content in contents {
            let (none, zstd, auto) = (
                time(mbit, content.name(), "none"),
                time(mbit, content.name(), "zstd"),
                time(mbit, content.name(), "auto"),
            );
            zstd_speedup.push((mbit, content.name(), none / zstd));
            auto_over_best.push((mbit, content.name(), auto / none.min(zstd)));
        }
    }
    let report = Report {
        machine: crate::measure::machine(),
        cells,
        zstd_speedup,
        auto_over_best,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("machine: {}", report.machine);
    println!("2 channels, veth between two namespaces shaped with tc tbf; median of {reps} interleaved rep(s)");
    println!(
        "{:>8} {:<7} {:<5} {:>9} {:>8} {:>11} {:>9} {:>16}",
        "Mbit/s", "content", "mode", "MiB", "seconds", "wire MiB", "ratio", "CPU-s/GiB s/r"
    );
    for c in &report.cells {
        println!(
            "{:>8} {:<7} {:<5} {:>9} {:>8.2} {:>11.1} {:>9.2} {:>8.2}/{:.2}",
            c.link_mbit,
            c.content,
            c.mode,
            c.bytes >> 20,
            c.seconds,
            c.wire_bytes as f64 / (1 << 20) as f64,
            c.bytes as f64 / c.wire_bytes.max(1) as f64,
            c.sender_cpu_s_per_gib,
            c.receiver_cpu_s_per_gib
        );
    }
    for ((mbit, content, z), (_, _, a)) in report.zstd_speedup.iter().zip(&report.auto_over_best) {
        println!("{mbit:>6} Mbit/s {content:<6}: zstd {z:.2}x faster than none; auto takes {a:.2}x the better of none and zstd");
    }
    Ok(())
}
