//! Destination images that cannot be backed: a truncated file fails the transfer cleanly on
//! both sides, with and without TLS, and never kills the receiving process.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use pagewire::synth::{fill, Content};
use pagewire::{
    error_chain, Error, GuestMemory, ImageFile, Pinning, ReceiverConfig, RegionSpec, Sender,
    SenderConfig,
};
use pagewire_tests::{
    join_within, skip_without_uring, start_receiver, tls_identities, transfer_unpinned,
};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_destination_file_truncated_under_the_receiver_fails_both_sides_cleanly() {
    if skip_without_uring() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for tls in [false, true] {
        let len = 16u64 << 20;
        let path = dir.path().join(format!("dst-{tls}.img"));
        std::fs::write(&path, vec![0u8; len as usize]).unwrap();
        let image = ImageFile::open_existing(&path).unwrap();
        // Someone truncates the image under the receiver's mapping.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let src = Arc::new(GuestMemory::anonymous(&[RegionSpec { gpa: 0, len }]).unwrap());
        fill(&src, Content::Random, 1);
        let identities = tls_identities(dir.path(), tls);
        let (sent, received) = transfer_unpinned(src, image.memory(), 2, identities, LIMIT);
        let (sent, received) = (sent.unwrap_err(), received.unwrap_err());
        assert!(
            matches!(received, Error::MemoryFault { region: 0, page } if page >= 256),
            "tls {tls}: {}",
            error_chain(&received)
        );
        assert!(
            error_chain(&sent).contains("cannot be accessed"),
            "tls {tls}: the sender should hear why: {}",
            error_chain(&sent)
        );
        image.fail(&error_chain(&received));
        let marker = dir
            .path()
            .join(format!("dst-{tls}.img.pagewire-incomplete"));
        assert!(std::fs::read_to_string(marker)
            .unwrap()
            .contains("NOT complete"));
    }
}

#[test]
fn a_sender_that_fails_tells_the_receiver_why() {
    if skip_without_uring() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Under TLS the faulting frame has already been sealed (records numbered, perhaps a key
    // rotated) when its fault is taken: the abort must still open on the receiver.
    for tls in [false, true] {
        let len = 16u64 << 20;
        let path = dir.path().join(format!("src-{tls}.img"));
        std::fs::write(&path, vec![0x33u8; len as usize]).unwrap();
        let src = Arc::new(GuestMemory::from_file(&path, false).unwrap());
        // The source image is truncated under the sender: its scan faults past 1 MiB.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let identities = tls_identities(dir.path(), tls);
        let dst = Arc::new(GuestMemory::anonymous(&[RegionSpec { gpa: 0, len }]).unwrap());
        let (sent, received) = transfer_unpinned(src, dst, 1, identities, LIMIT);
        let (sent, received) = (sent.unwrap_err(), received.unwrap_err());
        assert!(
            matches!(sent, Error::MemoryFault { .. }),
            "tls {tls}: {}",
            error_chain(&sent)
        );
        assert!(
            matches!(&received, Error::PeerAborted { reason, .. } if reason.contains("cannot be accessed")),
            "tls {tls}: the receiver should hear the sender's reason: {}",
            error_chain(&received)
        );
    }
}

/// A mounted `tmpfs -o huge=always`, unmounted on drop.
struct HugeTmpfs(tempfile::TempDir);

impl HugeTmpfs {
    /// Mounts one, or says why not (not root, no tmpfs huge pages).
    fn mount() -> Result<HugeTmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("mounting a tmpfs needs root".into());
        }
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
        if thp.contains("[deny]") || thp.contains("[force]") || thp.is_empty() {
            return Err(format!(
                "tmpfs huge pages are not available ({})",
                thp.trim()
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "huge=always,size=64m", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("mount -t tmpfs -o huge=always failed".into());
        }
        Ok(HugeTmpfs(dir))
    }
}

impl Drop for HugeTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// The smaps field `field` (kB) of the mapping that starts at `addr`.
fn smaps_kb(addr: usize, field: &str) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut in_it = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = usize::from_str_radix(start, 16) {
                    in_it = start == addr;
                    continue;
                }
            }
        }
        if in_it {
            if let Some(rest) = line.strip_prefix(field) {
                return rest
                    .trim_start_matches(':')
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok();
            }
        }
    }
    None
}

#[test]
fn ram_files_on_a_huge_page_tmpfs_are_mapped_with_huge_pages() {
    let tmpfs = match HugeTmpfs::mount() {
        Ok(t) => t,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let path = tmpfs.0.path().join("ram.img");
    std::fs::write(&path, vec![7u8; 8 << 20]).unwrap();
    for writable in [false, true] {
        let memory = GuestMemory::from_file(&path, writable).unwrap();
        let r = &memory.regions()[0];
        let addr = r.host_addr() as usize;
        assert_eq!(
            addr % (2 << 20),
            0,
            "mapped at {addr:#x}, not 2 MiB aligned"
        );
        let mut byte = [0u8; 1];
        for page in (0..r.pages()).step_by(512) {
            r.read(page * 4096, &mut byte);
            assert_eq!(byte[0], 7);
        }
        // tmpfs pages count as ShmemPmdMapped (FilePmdMapped is for other filesystems).
        let pmd = smaps_kb(addr, "ShmemPmdMapped").max(smaps_kb(addr, "FilePmdMapped"));
        assert!(
            pmd.is_some_and(|kb| kb >= 2048),
            "touched pages are not mapped by 2 MiB entries (ShmemPmdMapped: {pmd:?} kB)"
        );
    }
}

/// Two free 2 MiB huge pages and a hugetlbfs mount, or why not; the page reservation is put
/// back and the mount undone on drop.
struct Hugetlbfs {
    dir: tempfile::TempDir,
    restore_pages: Option<String>,
}

impl Hugetlbfs {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";

    fn mount() -> Result<Hugetlbfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("reserving huge pages and mounting hugetlbfs need root".into());
        }
        let free = |field: &str| -> u64 {
            std::fs::read_to_string("/proc/meminfo")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut restore_pages = None;
        if free("HugePages_Free:") < 2 {
            let old = std::fs::read_to_string(Self::NR).map_err(|e| e.to_string())?;
            let want = old.trim().parse::<u64>().unwrap_or(0) + 2;
            if std::fs::write(Self::NR, want.to_string()).is_err() {
                return Err(format!("cannot reserve huge pages in {}", Self::NR));
            }
            restore_pages = Some(old);
        }
        // From here on, dropping `me` puts the reservation back.
        let me = Hugetlbfs {
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            restore_pages,
        };
        if free("HugePages_Free:") < 2 {
            return Err("the kernel could not reserve 2 huge pages".into());
        }
        let ok = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(me.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("mount -t hugetlbfs failed".into());
        }
        Ok(me)
    }
}

impl Drop for Hugetlbfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .stderr(std::process::Stdio::null())
            .status();
        if let Some(old) = &self.restore_pages {
            let _ = std::fs::write(Self::NR, old.trim());
        }
    }
}

#[test]
fn ram_files_on_hugetlbfs_are_destinations_and_sources() {
    if skip_without_uring() {
        return;
    }
    let fs = match Hugetlbfs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let spec = [RegionSpec {
        gpa: 0,
        len: 4 << 20,
    }];
    let src = Arc::new(GuestMemory::anonymous(&spec).unwrap());
    fill(&src, Content::Mixed, 5);
    let config = SenderConfig {
        pinning: Pinning::None,
        ..SenderConfig::default()
    };
    // Into a RAM file on hugetlbfs (reserved with fallocate, mapped 2 MiB aligned)...
    let path = fs.dir.path().join("vm.img");
    let image = Arc::new(GuestMemory::create_file(&path, 4 << 20).unwrap());
    assert_eq!(image.regions()[0].host_addr() as usize % (2 << 20), 0);
    let (addr, rx) = start_receiver(image.clone(), ReceiverConfig::default());
    let mut s = Sender::connect(addr, src.clone(), &config).unwrap();
    s.send_all().unwrap();
    s.finish().unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&image), None);
    drop(image);
    // ...and out of it again.
    let from = Arc::new(GuestMemory::from_file(&path, false).unwrap());
    let dst = Arc::new(GuestMemory::anonymous(&spec).unwrap());
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    let mut s = Sender::connect(addr, from, &config).unwrap();
    s.send_all().unwrap();
    s.finish().unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
}

/// `--zero-copy on` from a RAM image mapped read-only: its pages cannot be registered as fixed
/// buffers (the kernel pins those for writing), so the sends go zero-copy without them.
#[test]
fn forced_zero_copy_sends_a_read_only_image() {
    if skip_without_uring() {
        return;
    }
    if !pagewire::probe_uring().is_ok_and(|c| c.send_zc) {
        eprintln!("SKIPPED: this kernel has no IORING_OP_SEND_ZC");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let len = 4u64 << 20;
    let path = dir.path().join("src.img");
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let src = Arc::new(GuestMemory::from_file(&path, false).unwrap());
    let dst = Arc::new(GuestMemory::anonymous(&[RegionSpec { gpa: 0, len }]).unwrap());
    let (addr, rx) = start_receiver(dst.clone(), ReceiverConfig::default());
    let sent = pagewire_tests::send_all_to(
        addr,
        src.clone(),
        &SenderConfig {
            channels: 2,
            pinning: Pinning::None,
            zero_copy: pagewire::ZeroCopy::On,
            ..SenderConfig::default()
        },
    )
    .unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&dst), None);
    assert!(sent.shards.iter().all(|s| !s.fixed_buffers));
}

/// A new image's temporary name can be guessed (name, pid, a counter): links planted under
/// those names, in a directory others write, are neither followed nor truncated, and the
/// image takes the next free name. (The only test of this binary that creates an image, so
/// the counter starts at 0 here.)
#[test]
fn a_new_image_never_follows_a_link_planted_at_its_temporary_name() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    for n in 0..4 {
        let planted = dir.path().join(format!(
            ".vm.img.{}-{n}.pagewire-partial",
            std::process::id()
        ));
        std::os::unix::fs::symlink(&victim, planted).unwrap();
    }
    let image = ImageFile::create(&dir.path().join("vm.img"), 1 << 20).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    image.memory().regions()[0].write(0, b"pages");
    image.commit().unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let img = std::fs::read(dir.path().join("vm.img")).unwrap();
    assert_eq!((img.len(), &img[..5]), (1 << 20, &b"pages"[..]));
}
