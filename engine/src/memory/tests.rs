//! Unit tests of guest memory: layouts, mappings, images.
use super::*;
use crate::pipeline::zero::ZeroScanner;

#[test]
fn layouts_are_validated() {
    let spec = |gpa, len| RegionSpec { gpa, len };
    assert!(GuestMemory::anonymous(&[]).is_err());
    assert!(GuestMemory::anonymous(&[spec(0, 100)]).is_err());
    assert!(GuestMemory::anonymous(&[spec(0, 8192), spec(4096, 4096)]).is_err());
    let m = GuestMemory::anonymous(&[spec(0, 8192), spec(1 << 20, 4096)]).unwrap();
    assert_eq!(m.total_pages(), 3);
    assert_eq!(m.region_pages(), vec![2, 1]);
}

#[test]
fn read_write_and_compare() {
    let spec = [RegionSpec {
        gpa: 0,
        len: 4 * 4096,
    }];
    let a = GuestMemory::anonymous(&spec).unwrap();
    let b = GuestMemory::anonymous(&spec).unwrap();
    assert_eq!(a.first_difference(&b), None);
    a.regions()[0].write(3 * 4096 + 5, b"hello");
    assert_eq!(a.first_difference(&b), Some((0, 3)));
    let mut out = [0u8; 5];
    a.regions()[0].read(3 * 4096 + 5, &mut out);
    assert_eq!(&out, b"hello");
    a.regions()[0].zero_pages(3, 1);
    assert_eq!(a.first_difference(&b), None);
}

/// Pages of `r` resident now (`mincore`).
fn resident_pages(r: &Region) -> usize {
    let pages = r.pages() as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: the region's mapping covers `len` bytes from its page-aligned start, and
    // `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(r.host.as_ptr().cast(), r.len as usize, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|b| **b & 1 != 0).count()
}

#[test]
fn prefaulting_faults_memory_in_and_keeps_its_contents() {
    let spec = [
        RegionSpec {
            gpa: 0,
            len: 24 << 20,
        },
        RegionSpec {
            gpa: 1 << 30,
            len: (40 << 20) + 4096,
        },
    ];
    let m = GuestMemory::anonymous(&spec).unwrap();
    m.regions()[0].write(5 * 4096, b"kept");
    m.regions()[1].write((40 << 20) - 3, b"kept too");
    assert!(resident_pages(&m.regions()[1]) < 1000);
    let go = AtomicBool::new(false);
    if !m.prefault_in_parallel(3, &go).unwrap() {
        eprintln!("skipped: no MADV_POPULATE_WRITE on this kernel (5.14+)");
        return;
    }
    for r in m.regions() {
        assert_eq!(
            resident_pages(r) as u64,
            r.pages(),
            "every page is resident"
        );
    }
    let mut b = [0u8; 8];
    m.regions()[0].read(5 * 4096, &mut b[..4]);
    assert_eq!(&b[..4], b"kept");
    m.regions()[1].read((40 << 20) - 3, &mut b);
    assert_eq!(&b, b"kept too");
    // Parts split the memory between them: any part count covers it all, once.
    for parts in [1, 2, 7, 64] {
        for part in 0..parts {
            assert!(m.prefault(part, parts, &go).unwrap());
        }
    }
    // Stopped before it starts, it touches nothing.
    let fresh = GuestMemory::anonymous(&spec).unwrap();
    assert!(fresh
        .prefault_in_parallel(2, &AtomicBool::new(true))
        .unwrap());
    assert_eq!(resident_pages(&fresh.regions()[1]), 0);
}

#[test]
fn a_truncated_file_mapping_faults_into_an_error_not_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ram.img");
    let image = ImageFile::create(&path, 8 * 4096).unwrap();
    let memory = image.memory();
    let region = &memory.regions()[0];
    region.write(0, b"before");
    assert!(memory.take_fault().is_ok());
    // Someone truncates the file under the mapping: touching page 5 would be SIGBUS.
    let temp = partial(dir.path());
    cut(&temp, 4096);
    region.write(5 * 4096 + 7, b"after");
    let scanner = ZeroScanner::detect();
    let _ = region.page_is_zero(&scanner, 6);
    match memory.take_fault() {
        Err(Error::MemoryFault { region: 0, page: 5 }) => {}
        other => panic!("expected a fault at page 5, got {other:?}"),
    }
    // The second fault (page 6) happened after the first was recorded; once taken, the
    // guard reports nothing more until the next one.
    assert!(memory.take_fault().is_ok());
    drop(memory);
    image.fail("test");
    assert!(
        !temp.exists() && !path.exists(),
        "a failed new image is removed"
    );
}

/// Cuts the file at `path` to `len` bytes (someone truncating an image under its mapping).
fn cut(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// The one temporary file of an image in progress in `dir`.
fn partial(dir: &std::path::Path) -> std::path::PathBuf {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".pagewire-partial"))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// Two receivers of the same new image (a retry while the first still runs) each write their
/// own file: the one that completes gets the name with its pages, and the other cannot take
/// the name over it, nor cut it short.
#[test]
fn two_images_in_progress_at_one_path_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.img");
    let a = ImageFile::create(&path, 4 * 4096).unwrap();
    a.memory().regions()[0].write(0, b"data");
    let b = ImageFile::create(&path, 4 * 4096).unwrap();
    a.commit().unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[..4], b"data");
    let err = b.commit().unwrap_err();
    assert!(err.to_string().contains("renaming"), "{err}");
    assert_eq!(&std::fs::read(&path).unwrap()[..4], b"data");
    // A temporary file cut short is not committed.
    let path = dir.path().join("short.img");
    let c = ImageFile::create(&path, 4 * 4096).unwrap();
    let temp = partial(dir.path());
    cut(&temp, 2 * 4096);
    assert!(c.commit().is_err());
    assert!(!path.exists() && !temp.exists());
}

#[test]
fn images_get_their_name_only_when_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.img");
    let image = ImageFile::create(&path, 4 * 4096).unwrap();
    image.memory().regions()[0].write(4096, b"data");
    assert!(!path.exists(), "an image in progress has a temporary name");
    image.commit().unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[4096..4100], b"data");
    // An existing image gets a marker while in progress, and keeps it (with the reason)
    // when the transfer fails.
    let marker = dir.path().join("new.img.pagewire-incomplete");
    let image = ImageFile::open_existing(&path).unwrap();
    assert!(marker.exists());
    image.fail("the sender vanished");
    let text = std::fs::read_to_string(&marker).unwrap();
    assert!(
        text.contains("the sender vanished") && text.contains("NOT complete"),
        "{text}"
    );
    std::fs::remove_file(&marker).unwrap();
    let image = ImageFile::open_existing(&path).unwrap();
    image.commit().unwrap();
    assert!(!marker.exists());
}

/// A failed run leaves its marker beside the half-written image; a retry that then fails
/// before any page arrived (no sender came, the port was taken) must leave that marker, since
/// the image is as incomplete as before. And the marker's guessable name is never followed
/// through a symbolic link planted under it.
#[test]
fn an_earlier_failure_s_marker_outlives_a_retry_that_received_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.img");
    std::fs::write(&path, vec![1u8; 4 * 4096]).unwrap();
    let marker = dir.path().join("vm.img.pagewire-incomplete");
    ImageFile::open_existing(&path)
        .unwrap()
        .fail("the sender vanished");
    let earlier = std::fs::read_to_string(&marker).unwrap();
    ImageFile::open_existing(&path).unwrap().untouched();
    assert_eq!(std::fs::read_to_string(&marker).ok(), Some(earlier));
    // One that is not text (another tool's, say) does not stop the run, and stays.
    std::fs::write(&marker, b"\xff\xfe not ours\n").unwrap();
    ImageFile::open_existing(&path).unwrap().untouched();
    assert!(std::fs::read(&marker).unwrap().ends_with(b" not ours\n"));
    // Without an earlier marker, a run that received nothing leaves none.
    std::fs::remove_file(&marker).unwrap();
    ImageFile::open_existing(&path).unwrap().untouched();
    assert!(!marker.exists());

    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    std::os::unix::fs::symlink(&victim, &marker).unwrap();
    assert!(ImageFile::open_existing(&path).is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
}

#[test]
#[should_panic(expected = "outside region")]
fn out_of_bounds_access_panics_instead_of_writing() {
    let a = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 4096 }]).unwrap();
    a.regions()[0].write(4095, b"xy");
}

#[test]
#[should_panic(expected = "outside region")]
fn page_ranges_past_the_address_space_panic_instead_of_wrapping() {
    // 2^52 pages × 4 KiB wraps to offset 0 in u64: it must not land on page 0.
    let a = GuestMemory::anonymous(&[RegionSpec { gpa: 0, len: 8192 }]).unwrap();
    a.regions()[0].zero_pages(1 << 52, 1);
}

/// The `start-end` span of the mapping holding `addr`, from /proc/self/maps.
fn mapping_of(addr: usize) -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let (start, end) = l.split_whitespace().next()?.split_once('-')?;
        let (start, end) = (
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        );
        (start <= addr && addr < end).then_some((start, end))
    })
}

#[test]
fn a_file_mapping_is_as_long_as_its_region_while_the_file_changes_size() {
    // A file whose size changes while it is mapped: the region's length (which every bounds
    // check trusts) must be the mapping's, whatever size the file has by the time it is mapped.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flip.img");
    let big = 4u64 << 20;
    std::fs::write(&path, vec![0u8; big as usize]).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            let start = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed().as_secs() < 10 {
                let _ = f.set_len(4096);
                let _ = f.set_len(big);
            }
        })
    };
    let start = std::time::Instant::now();
    let mut checked = 0;
    while checked < 3000 && start.elapsed().as_millis() < 1500 {
        let Ok(m) = GuestMemory::from_file(&path, false) else {
            continue;
        };
        let r = &m.regions()[0];
        let (s, e) = mapping_of(r.host_addr() as usize).expect("the region is mapped");
        // A neighbouring mapping may merge with it, so the span may be longer, never shorter.
        assert!(
            e - (r.host_addr() as usize) >= r.len() as usize && s <= r.host_addr() as usize,
            "region of {} bytes in a mapping of {} bytes",
            r.len(),
            e - r.host_addr() as usize
        );
        checked += 1;
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    assert!(checked > 0, "no mapping was made");
}
