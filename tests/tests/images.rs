//! Destination images that cannot be backed: a truncated file fails the transfer cleanly on
//! both sides, with and without TLS, and never kills the receiving process.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use pagewire::synth::{fill, Content};
use pagewire::{
    error_chain, Error, GuestMemory, ImageFile, Pinning, Receiver, ReceiverConfig, RegionSpec,
    Sender, SenderConfig, TransferStats,
};
use pagewire_tests::{
    join_within, send_all_to, skip_without_uring, start_receiver, tls_identities, transfer_unpinned,
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

/// A mounted tmpfs, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// Mounts one with `options`, or says why not (not root, not allowed).
    fn mount(options: &str) -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("mounting a tmpfs needs root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("mount -t tmpfs -o {options} failed"));
        }
        Ok(Tmpfs(dir))
    }

    /// A `huge=<when>` one (`always`, `advise`), or why not (as [`mount`](Self::mount), or no
    /// tmpfs huge pages).
    fn huge_as(when: &str) -> Result<Tmpfs, String> {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
        if thp.contains("[deny]") || thp.contains("[force]") || thp.is_empty() {
            return Err(format!(
                "tmpfs huge pages are not available ({})",
                thp.trim()
            ));
        }
        Self::mount(&format!("huge={when},size=64m"))
    }
}

impl Drop for Tmpfs {
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
    huge_tmpfs_files_are_mapped_with_huge_pages("always");
}

/// On a `huge=advise` tmpfs only mappings advised `MADV_HUGEPAGE` get huge pages: pagewire
/// advises its file mappings as it does its anonymous memory. (Pages the file got through
/// `write` or `fallocate` stay small: this is a sparse image written through the mapping, as
/// a receiver writes one.)
#[test]
fn ram_files_on_an_advise_tmpfs_are_written_with_huge_pages() {
    let tmpfs = match Tmpfs::huge_as("advise") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let path = tmpfs.0.path().join("ram.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let memory = GuestMemory::from_file(&path, true).unwrap();
    let r = &memory.regions()[0];
    let addr = r.host_addr() as usize;
    assert_eq!(
        addr % (2 << 20),
        0,
        "mapped at {addr:#x}, not 2 MiB aligned"
    );
    for page in (0..r.pages()).step_by(512) {
        r.write(page * 4096, &[7]);
    }
    let pmd = smaps_kb(addr, "ShmemPmdMapped");
    assert!(
        pmd.is_some_and(|kb| kb >= 2048),
        "pages written through the mapping are not 2 MiB ones (ShmemPmdMapped: {pmd:?} kB)"
    );
}

fn huge_tmpfs_files_are_mapped_with_huge_pages(when: &str) {
    let tmpfs = match Tmpfs::huge_as(when) {
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
    // Its two huge pages back to the pool, for a memfd with huge pages (what a VMM's
    // `memory-backend-memfd,hugetlb=on` is), by its /proc path.
    std::fs::remove_file(&path).unwrap();
    // SAFETY: a NUL-terminated name and flags; returns a new descriptor or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"pagewire-test".as_ptr(),
            libc::MFD_HUGETLB | libc::MFD_CLOEXEC,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just made and owned by nothing else.
    let memfd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    memfd.set_len(4 << 20).unwrap();
    let image =
        Arc::new(GuestMemory::from_file(format!("/proc/self/fd/{fd}").as_ref(), true).unwrap());
    assert_eq!(image.regions()[0].host_addr() as usize % (2 << 20), 0);
    let (addr, rx) = start_receiver(image.clone(), ReceiverConfig::default());
    let mut s = Sender::connect(addr, src.clone(), &config).unwrap();
    s.send_all().unwrap();
    s.finish().unwrap();
    join_within(rx, LIMIT, "receiver").unwrap();
    assert_eq!(src.first_difference(&image), None);
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

/// Memory of `len` bytes whose first `data` bytes are random and the rest zero (never touched,
/// so it costs no memory here and only headers on the wire).
fn mostly_zero(len: u64, data: u64) -> Arc<GuestMemory> {
    let src = Arc::new(GuestMemory::anonymous(&[RegionSpec { gpa: 0, len }]).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for offset in (0..data).step_by(chunk.len()) {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        src.regions()[0].write(offset, &chunk);
    }
    src
}

/// `src` sent on 2 channels into a new image at `path` of the size the sender announces, made
/// as `pagewire recv --into` makes it, both sides with an idle bound of `idle_ms`: each side's
/// result, and the image (to commit or fail) if it was made.
fn into_new_image(
    src: Arc<GuestMemory>,
    path: &std::path::Path,
    idle_ms: u64,
) -> (
    pagewire::Result<TransferStats>,
    pagewire::Result<TransferStats>,
    Option<ImageFile>,
) {
    let made: Arc<std::sync::Mutex<Option<ImageFile>>> = Arc::default();
    let (slot, path) = (made.clone(), path.to_path_buf());
    let make: pagewire::receiver::MakeDestination = Box::new(move |len| {
        let file = ImageFile::create_reserving_while_received(&path, len)?;
        let memory = file.memory();
        *slot.lock().unwrap() = Some(file);
        Ok(memory)
    });
    let config = ReceiverConfig {
        pinning: Pinning::None,
        idle_timeout_ms: idle_ms,
        accept_timeout_ms: Some(20_000),
        ..ReceiverConfig::default()
    };
    let receiver = Receiver::bind_sized_by_sender("127.0.0.1:0", 64 << 30, make, config).unwrap();
    let addr = receiver.local_addr().unwrap();
    let rx = std::thread::spawn(move || receiver.run());
    let config = SenderConfig {
        channels: 2,
        pinning: Pinning::None,
        idle_timeout_ms: idle_ms,
        ..SenderConfig::default()
    };
    let tx = std::thread::spawn(move || send_all_to(addr, src, &config));
    let sent = join_within(tx, LIMIT, "sender");
    let received = join_within(rx, LIMIT, "receiver");
    let image = made.lock().unwrap().take();
    (sent, received, image)
}

/// io_uring and a tmpfs mounted with `options` to receive into, or `None` after saying why not.
fn transfer_into_tmpfs(options: &str) -> Option<Tmpfs> {
    if skip_without_uring() {
        return None;
    }
    Tmpfs::mount(options)
        .inspect_err(|why| eprintln!("SKIPPED: {why}"))
        .ok()
}

/// A new image sized by the sender was reserved (posix_fallocate) before the receiver read a
/// byte. A tmpfs zeroes every page it reserves (about 1 s per 4 GiB here), so for a large image
/// the sender, already sending, timed out waiting for the receiver to take data (reproduced
/// with `pagewire recv --into` on /dev/shm and a 400 ms idle bound, 2 GiB of random pages).
/// Its space is now reserved while the pages arrive, and what is left by the image's commit:
/// whole once it is committed.
#[test]
fn a_large_new_image_on_a_tmpfs_is_reserved_while_its_pages_arrive() {
    let Some(tmpfs) = transfer_into_tmpfs("size=5g") else {
        return;
    };
    let (len, data) = (4u64 << 30, 64u64 << 20);
    let src = mostly_zero(len, data);
    let path = tmpfs.0.path().join("vm.img");
    // The minimum idle bound: reserving 4 GiB takes longer here.
    let (sent, received, image) = into_new_image(src.clone(), &path, 400);
    let received = received.unwrap_or_else(|e| panic!("receiver: {}", error_chain(&e)));
    sent.unwrap_or_else(|e| panic!("sender: {}", error_chain(&e)));
    assert_eq!(received.normal_pages + received.zero_pages, len / 4096);
    image.unwrap().commit().unwrap();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), len);
    assert!(
        meta.blocks() * 512 >= len,
        "only {} of {len} bytes reserved",
        meta.blocks() * 512
    );
    // (The pages past `data` are zero pages, which a fresh image skips.)
    let mut written = Vec::new();
    use std::io::Read;
    std::fs::File::open(&path)
        .unwrap()
        .take(data)
        .read_to_end(&mut written)
        .unwrap();
    let mut expected = vec![0u8; data as usize];
    src.regions()[0].read(0, &mut expected);
    assert!(written == expected, "the image's data differs");
}

/// A full filesystem fails the background reservation: the transfer, when the reservation gets
/// there first, or else the image's commit, which reserves what is left; either way with the
/// reservation's error (not a memory fault somewhere later), and no image appears.
#[test]
fn a_new_image_the_filesystem_cannot_hold_fails_with_the_reservation_s_error() {
    let Some(tmpfs) = transfer_into_tmpfs("size=64m") else {
        return;
    };
    let path = tmpfs.0.path().join("vm.img");
    // Pages land only in the first MiB: what cannot be held is the reservation's to find.
    let (sent, received, image) = into_new_image(mostly_zero(256 << 20, 1 << 20), &path, 5_000);
    let image = image.unwrap();
    let text = match received {
        Err(e) => {
            let text = error_chain(&e);
            image.fail(&text);
            text
        }
        Ok(_) => error_chain(&image.commit().unwrap_err()),
    };
    assert!(
        text.contains("reserving") && text.contains("No space left"),
        "receiver: {text} (sender: {:?})",
        sent.map_err(|e| error_chain(&e))
    );
    let left: Vec<_> = std::fs::read_dir(tmpfs.0.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
