//! QEMU's own multifd migration of the same memory, for the matrix's side-by-side rows.
//!
//! Two `qemu-system-x86_64` processes on this host: the source's guest RAM is a shared
//! `memory-backend-file` on a `tmpfs -o huge=always` mount, prefilled with the cell's content, and
//! its vCPU runs a firmware of `HLT` bytes, so memory stays as written; the destination starts
//! with `-incoming defer` and `prealloc=on` (first-touch faults would swamp the result). Both get
//! the same multifd channel count, compression (level 1) and TLS as pagewire's cell, and
//! `max-bandwidth` far above the link (QEMU's default is 128 MiB/s). The figures are QEMU's own
//! (`query-migrate`: total time, transferred, duplicate, normal) and the CPU time of both
//! processes; the destination file must equal the source's afterwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pagewire::live::guestcode::{self, Params};
use pagewire::pipeline::compress::Compression;
use pagewire::tls::certs::CertSet;
use pagewire::GuestMemory;
use serde::Serialize;
use serde_json::{json, Value};

mod live;
pub use live::{migrate_live, LiveSpec};

/// Seconds a migration may take before the cell fails.
const MIGRATION_TIMEOUT_S: u64 = 300;

/// Why QEMU cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Some("qemu-system-x86_64 is not installed (Debian 12: `apt-get install -t bookworm-backports qemu-system-x86`)".into());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm is not usable".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("mounting the huge-page tmpfs for guest RAM needs root".into());
    }
    None
}

/// A `tmpfs -o huge=always` mount for guest RAM files, unmounted on drop.
pub struct RamDir {
    dir: tempfile::TempDir,
}

impl RamDir {
    /// Mounts a tmpfs big enough for three RAM files of `bytes`.
    pub fn new(bytes: u64) -> Result<RamDir> {
        let dir = tempfile::tempdir()?;
        // QEMU's source and destination files, and pagewire's destination file.
        let size = format!("huge=always,size={}", 3 * bytes + (64 << 20));
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
            .arg(dir.path())
            .status()?;
        if !st.success() {
            bail!("mounting a tmpfs at {} failed", dir.path().display());
        }
        std::fs::write(dir.path().join("hlt.bin"), vec![0xf4u8; 64 << 10])?;
        Ok(RamDir { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// pagewire between RAM files, as QEMU's cell just ran: the source file QEMU migrated
    /// (mapped read-only) and a fresh, sparse destination file on the same huge-page tmpfs
    /// (QEMU's destination file is removed first, to free its memory).
    pub fn pagewire_files(&self) -> Result<(Arc<GuestMemory>, Arc<GuestMemory>)> {
        let src = self.path("src.ram");
        let len = std::fs::metadata(&src)
            .context("the source RAM file (run QEMU's cell first)")?
            .len();
        for stale in ["dst.ram", "pagewire-dst.ram"] {
            let _ = std::fs::remove_file(self.path(stale));
        }
        let dst = GuestMemory::create_file(&self.path("pagewire-dst.ram"), len)?;
        // Faulted in before the timed run, as QEMU's destination is (`prealloc=on`): tmpfs
        // zeroes a page on its first touch, which neither engine should pay in its time.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        dst.prefault_in_parallel(cores, &std::sync::atomic::AtomicBool::new(false))?;
        Ok((
            Arc::new(GuestMemory::from_file(&src, false)?),
            Arc::new(dst),
        ))
    }
}

impl Drop for RamDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// One QEMU migration's figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QemuRun {
    /// `total-time`, in seconds.
    pub seconds: f64,
    /// `ram.transferred`.
    pub transferred: u64,
    /// `ram.duplicate` (zero pages).
    pub duplicate: u64,
    /// `ram.normal`.
    pub normal: u64,
    /// CPU seconds of the source QEMU during the migration.
    pub source_cpu_s: f64,
    /// CPU seconds of the destination QEMU during the migration.
    pub destination_cpu_s: f64,
}

struct Qmp {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn start(
        ram: &RamDir,
        name: &str,
        bytes: u64,
        incoming: bool,
        tls: Option<(&Path, &str)>,
        bios: &Path,
    ) -> Result<Qmp> {
        let sock = ram.path(&format!("{name}.qmp"));
        let _ = std::fs::remove_file(&sock);
        let mem = format!(
            "memory-backend-file,id=mem,size={bytes},mem-path={},share=on,prealloc=on,align=2M",
            ram.path(&format!("{name}.ram")).display()
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-machine", "pc,memory-backend=mem", "-m"])
            .arg(format!("{}M", bytes >> 20))
            .args(["-object", &mem, "-nodefaults", "-display", "none"])
            // Thread names ("CPU 0/KVM") let the live rows leave the vCPU out of QEMU's CPU.
            .args(["-name", &format!("{name},debug-threads=on"), "-bios"])
            .arg(bios)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
        if let Some((dir, endpoint)) = tls {
            // The cipher pagewire negotiates (AES-128-GCM): GnuTLS's NORMAL would pick
            // AES-256-GCM, four more AES rounds per block, and the TLS rows would compare
            // ciphers as well as engines.
            cmd.arg("-object").arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on,priority=NORMAL:-CIPHER-ALL:+AES-128-GCM",
                dir.display()
            ));
        }
        if incoming {
            // Paused after the migration, so its memory can be compared with the source's.
            cmd.args(["-incoming", "defer", "-S"]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let (stream, writer) = match open_qmp(&mut child, &sock, name) {
            Ok(pair) => pair,
            Err(e) => {
                // Not left running (it would keep the RAM mount busy).
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        // From here on `Qmp`'s drop kills and reaps QEMU on any error.
        let mut q = Qmp {
            child,
            writer,
            reader: BufReader::new(stream),
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting)?;
        q.cmd("qmp_capabilities", None)?;
        Ok(q)
    }

    fn cmd(&mut self, execute: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": execute });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        writeln!(self.writer, "{msg}")?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("QEMU closed QMP during {execute}");
            }
            let v: Value = serde_json::from_str(&line)?;
            if let Some(e) = v.get("error") {
                bail!("QMP {execute} failed: {e}");
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            // An asynchronous event: skip it.
        }
    }

    fn cpu_s(&self) -> f64 {
        process_cpu_s(self.child.id())
    }

    /// CPU seconds of the process without its vCPU threads: what migration costs the host.
    fn cpu_s_without_vcpus(&self) -> f64 {
        let pid = self.child.id();
        let vcpus: f64 = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.starts_with("CPU ") && c.trim_end().ends_with("/KVM"))
            })
            .map(|t| stat_cpu_s(&t.path().join("stat")))
            .sum();
        self.cpu_s() - vcpus
    }
}

/// Waits (up to 30 s) for QEMU `child` to open its QMP socket `sock`; the socket and a second
/// handle on it for writing.
fn open_qmp(child: &mut Child, sock: &Path, name: &str) -> Result<(UnixStream, UnixStream)> {
    let started = Instant::now();
    let stream = loop {
        if let Ok(s) = UnixStream::connect(sock) {
            break s;
        }
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("QEMU ({name}) exited ({status}): {}", err.trim());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("QEMU ({name}) did not open its QMP socket within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stream.set_read_timeout(Some(Duration::from_secs(MIGRATION_TIMEOUT_S)))?;
    let writer = stream.try_clone()?;
    Ok((stream, writer))
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn process_cpu_s(pid: u32) -> f64 {
    stat_cpu_s(Path::new(&format!("/proc/{pid}/stat")))
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn stat_cpu_s(path: &Path) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/PID/stat (indices 11 and 12 here).
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// A source and a destination QEMU, configured alike and the destination listening.
struct Pair {
    src: Qmp,
    dst: Qmp,
    port: u16,
}

impl Pair {
    /// Writes the RAM files (the source prefilled from region 0 of `src`, the destination
    /// empty), starts both QEMUs on `bios`, sets multifd with `channels`, `compression`, TLS and
    /// the extra migration parameters `extra`, and lets the destination listen.
    fn start(
        ram: &RamDir,
        src: &GuestMemory,
        bios: &Path,
        channels: u16,
        compression: Compression,
        tls: Option<&CertSet>,
        extra: Value,
    ) -> Result<Pair> {
        let region = &src.regions()[0];
        let bytes = region.len();
        {
            let mut f = std::fs::File::create(ram.path("src.ram"))?;
            let mut buf = vec![0u8; 8 << 20];
            let mut at = 0;
            while at < bytes {
                let n = (buf.len() as u64).min(bytes - at) as usize;
                region.read(at, &mut buf[..n]);
                f.write_all(&buf[..n])?;
                at += n as u64;
            }
            std::fs::File::create(ram.path("dst.ram"))?.set_len(bytes)?;
        }
        let tls_dir = match tls {
            Some(set) => {
                // This run's own: `write` replaces no files, and the last run's are there.
                let dir = ram.path("tls");
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
                set.write(&dir)?;
                Some(dir)
            }
            None => None,
        };
        let side = |endpoint| tls_dir.as_deref().map(|d| (d, endpoint));
        let mut dst = Qmp::start(ram, "dst", bytes, true, side("server"), bios)?;
        let mut srcq = Qmp::start(ram, "src", bytes, false, side("client"), bios)?;
        let method = match compression {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Zlib => "zlib",
            Compression::Auto => bail!("QEMU has no adaptive compression"),
        };
        for q in [&mut dst, &mut srcq] {
            q.cmd(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [{ "capability": "multifd", "state": true }] })),
            )?;
            let mut params = json!({
                "multifd-channels": channels,
                "multifd-compression": method,
                "multifd-zstd-level": 1,
                "multifd-zlib-level": 1,
                "max-bandwidth": 1u64 << 40,
            });
            if tls.is_some() {
                params["tls-creds"] = json!("tls0");
                params["tls-hostname"] = json!("localhost");
            }
            if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
                p.extend(e.clone());
            }
            q.cmd("migrate-set-parameters", Some(params))?;
        }
        dst.cmd(
            "migrate-incoming",
            Some(json!({ "uri": "tcp:127.0.0.1:0" })),
        )?;
        let info = dst.cmd("query-migrate", None)?;
        let port = info["socket-address"][0]["port"]
            .as_str()
            .and_then(|p| p.parse::<u16>().ok())
            .context("the destination QEMU did not report its listening port")?;
        Ok(Pair {
            src: srcq,
            dst,
            port,
        })
    }

    /// Waits (bounded) until the destination has loaded what the source sent.
    fn wait_loaded(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            let r = self.dst.cmd("query-status", None)?;
            if r["status"] != "inmigrate" {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the destination QEMU was still loading 30 s after the source completed");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Migrates `src` (region 0) with QEMU multifd and returns QEMU's figures; checks the destination
/// equals the source.
pub fn migrate(
    ram: &RamDir,
    src: &GuestMemory,
    channels: u16,
    compression: Compression,
    tls: Option<&CertSet>,
) -> Result<QemuRun> {
    let bios = ram.path("hlt.bin");
    let mut pair = Pair::start(ram, src, &bios, channels, compression, tls, json!({}))?;
    crate::measure::wait_quiet(crate::measure::QUIET_WAIT_MS_MAX);
    let (src_cpu0, dst_cpu0) = (pair.src.cpu_s(), pair.dst.cpu_s());
    pair.src.cmd(
        "migrate",
        Some(json!({ "uri": format!("tcp:127.0.0.1:{}", pair.port) })),
    )?;
    let started = Instant::now();
    let done = loop {
        let r = pair.src.cmd("query-migrate", None)?;
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {r}"),
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(MIGRATION_TIMEOUT_S) {
            bail!("QEMU migration did not complete within {MIGRATION_TIMEOUT_S} s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The destination finishes loading after the source reports completion.
    pair.wait_loaded()?;
    let run = QemuRun {
        seconds: done["total-time"].as_f64().unwrap_or(0.0) / 1e3,
        transferred: done["ram"]["transferred"].as_u64().unwrap_or(0),
        duplicate: done["ram"]["duplicate"].as_u64().unwrap_or(0),
        normal: done["ram"]["normal"].as_u64().unwrap_or(0),
        source_cpu_s: pair.src.cpu_s() - src_cpu0,
        destination_cpu_s: pair.dst.cpu_s() - dst_cpu0,
    };
    drop(pair);
    if !files_equal(&ram.path("src.ram"), &ram.path("dst.ram"))? {
        bail!("QEMU's destination memory differs from the source");
    }
    Ok(run)
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// QEMU's channels get the host's default TCP congestion control (QEMU has no setting for
/// it), so a comparison side by side under another one is refused, saying how to run one.
pub(crate) fn check_congestion(with_qemu: bool, congestion: Option<&str>) -> Result<()> {
    let Some(name) = congestion.filter(|_| with_qemu) else {
        return Ok(());
    };
    let default = pagewire::sys::host_congestion().map(|(d, _)| d);
    if default.as_deref() != Some(name) {
        bail!(
            "--congestion {name} with --with-qemu: QEMU's channels use the host's default ({}); \
             to compare both under {name}, set it for the host instead (sysctl \
             net.ipv4.tcp_congestion_control={name})",
            default.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}
