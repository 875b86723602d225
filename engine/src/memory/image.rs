//! RAM images received into files: a new one under a temporary name until it is complete, an
//! existing one (a VMM's) marked incomplete while it is written.

use std::fs::{File, OpenOptions};
use std::path::Path;

use super::GuestMemory;
use crate::error::{Error, Result};

/// Temporary names a new image tries, passing over ones that exist, before it gives up.
const IMAGE_TEMP_NAMES_MAX: u32 = 16;

/// Reserves `len` bytes of disk (or tmpfs) space for `file`, extending it to `len`. Only while
/// nothing else writes the file: where the filesystem has no `fallocate`, glibc emulates it by
/// reading and writing back a byte of every block.
pub(crate) fn reserve(file: &File, path: &Path, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let count = libc::off_t::try_from(len)
        .map_err(|_| Error::Config(format!("{len} bytes is too large for a file")))?;
    // SAFETY: a valid open fd and a byte range; posix_fallocate touches no user memory.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, count) };
    match rc {
        0 => Ok(()),
        rc => Err(reserve_error(
            path,
            len,
            std::io::Error::from_raw_os_error(rc),
        )),
    }
}

fn reserve_error(path: &Path, len: u64, e: std::io::Error) -> Error {
    Error::io(format!("reserving {len} bytes for {}", path.display()), e)
}

/// Reserves bytes `offset..offset + len` of `file` with `fallocate(2)` itself, never glibc's
/// emulation (see [`reserve`]), so it is safe while the file's pages are being written: a
/// filesystem without it answers `EOPNOTSUPP`. Retried while a signal interrupts it (a tmpfs
/// answers `EINTR` to any pending signal), at most `RESERVE_EINTR_TRIES_MAX` times.
fn fallocate_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let too_large = || std::io::Error::from_raw_os_error(libc::EFBIG);
    let start = libc::off_t::try_from(offset).map_err(|_| too_large())?;
    let count = libc::off_t::try_from(len).map_err(|_| too_large())?;
    start.checked_add(count).ok_or_else(too_large)?;
    let mut tries = 1;
    loop {
        // SAFETY: a valid open fd and a byte range; fallocate touches no user memory.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, start, count) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted
            || tries >= crate::limits::RESERVE_EINTR_TRIES_MAX
        {
            return Err(e);
        }
        tries += 1;
    }
}

/// A new file's space, reserved later: by a receiver in the background while it receives into
/// the file, then what is left by [`ImageFile::commit`] (see
/// [`ImageFile::create_reserving_while_received`]).
#[derive(Debug)]
pub(crate) struct Reservation {
    pub(super) file: File,
    pub(super) path: std::path::PathBuf,
    pub(super) len: u64,
    /// Bytes from the start reserved so far.
    pub(super) done: u64,
}

impl Reservation {
    /// Reserves from where it got to,
    /// [`RESERVE_STEP_BYTES`](crate::limits::RESERVE_STEP_BYTES) at a time, while pages are
    /// being written: until done (`Ok(true)`), until `stop` is raised between two steps
    /// (`Ok(false)`), or until the filesystem turns out to have no `fallocate` (`Ok(false)`:
    /// its emulation is not safe now, [`finish_alone`](Self::finish_alone) does the rest).
    /// Its error is the system's; [`error`](Self::error) names the file.
    pub(crate) fn run_beside_writers(
        &mut self,
        stop: &std::sync::atomic::AtomicBool,
    ) -> std::io::Result<bool> {
        while self.done < self.len {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(false);
            }
            let step = (self.len - self.done).min(crate::limits::RESERVE_STEP_BYTES);
            match fallocate_range(&self.file, self.done, step) {
                Ok(()) => self.done += step,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reserves whatever is left, once nothing else writes the file.
    pub(crate) fn finish_alone(&self) -> Result<()> {
        if self.done >= self.len {
            return Ok(());
        }
        reserve(&self.file, &self.path, self.len)
    }

    /// What a failed [`run_beside_writers`](Self::run_beside_writers) means, naming the file.
    pub(crate) fn error(&self, e: std::io::Error) -> Error {
        reserve_error(&self.path, self.len, e)
    }

    /// Bytes to reserve in all.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

/// A RAM image being received, which cannot be mistaken for a complete one if the transfer
/// fails. A new image is written under a temporary name of its own in the same directory
/// (`.NAME.PID-N.pagewire-partial`, so two receivers never share one), with its space reserved
/// (up front, or, for a receiver's destination, while pages arrive and then by the commit: see
/// [`create_reserving_while_received`](Self::create_reserving_while_received)), and renamed into
/// place by [`commit`](Self::commit) only after the transfer
/// succeeded, the data reached the file (`msync`) and the file still has its length, and only
/// if nothing has taken the name meanwhile; a failed or abandoned one is removed. An existing
/// image (a VMM's) is written in place, so it gets a marker file beside it
/// (`NAME.pagewire-incomplete`), on disk before the image is mapped, for the duration, left
/// behind with the reason on failure.
///
/// The sender's success means the receiver holds every page, verified, in memory: the commit
/// follows it, so whether the image reached its file is the receiver's to report.
#[derive(Debug)]
pub struct ImageFile {
    path: std::path::PathBuf,
    /// The temporary name of a new image.
    temp: Option<std::path::PathBuf>,
    /// The marker beside an existing image, and the text of the one an earlier failed run
    /// left there, if any.
    marker: Option<(std::path::PathBuf, Option<String>)>,
    memory: std::sync::Arc<GuestMemory>,
    settled: bool,
}

impl ImageFile {
    /// A new image of `len` bytes at `path` (which must not exist yet), its space reserved
    /// before this returns.
    pub fn create(path: &Path, len: u64) -> Result<Self> {
        Self::create_as(path, len, true)
    }

    /// Like [`create`](Self::create), for a [`Receiver`](crate::Receiver)'s destination made
    /// once the sender said how large ([`crate::receiver::MakeDestination`]): the file gets its
    /// length at once, the receiver reserves its space in the background while pages arrive
    /// (`fallocate`, in steps of [`RESERVE_STEP_BYTES`](crate::limits::RESERVE_STEP_BYTES)),
    /// and [`commit`](Self::commit) reserves whatever is left before the image counts as
    /// complete.
    ///
    /// Why: the sender is already sending when the destination is made, and reserving a
    /// tmpfs or hugetlbfs file zeroes every page (about 1 s per 4 GiB here), so reserving
    /// first held a large image's channels past the sender's idle bound. A full filesystem
    /// still fails the transfer while it runs: with the reservation's error where the
    /// reservation gets there first, or as a [`MemoryFault`](crate::Error::MemoryFault) where a
    /// page write does; found at the commit, it fails the commit. The receiver's `run` does
    /// not wait for the reservation (a VMM resuming the guest after it would pay for it as
    /// downtime). On a filesystem without `fallocate` the whole reservation waits for the
    /// commit (glibc's emulation writes to the file, which is only safe alone). Where the
    /// file cannot take the length at once (a hugetlbfs file whose length is not a whole
    /// number of huge pages), it is reserved up front, as by [`create`](Self::create).
    pub fn create_reserving_while_received(path: &Path, len: u64) -> Result<Self> {
        Self::create_as(path, len, false)
    }

    fn create_as(path: &Path, len: u64, reserve_now: bool) -> Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| Error::Config(format!("{} names no file", path.display())))?;
        // Checked first: a failure from here on is about the file.
        super::check_specs(&[super::RegionSpec { gpa: 0, len }])?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        // The name is guessable, so it is created exclusively: a file or symbolic link
        // planted under it (in a directory others write) is never followed or truncated, and
        // one left by a crashed process of the same pid is passed over for the next name.
        let mut attempts = 0;
        let (temp, memory) = loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let temp = path.with_file_name(format!(
                ".{}.{}-{n}.pagewire-partial",
                name.to_string_lossy(),
                std::process::id()
            ));
            let exists = |e: &Error| matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists);
            match GuestMemory::create_file_as(&temp, len, true, reserve_now) {
                Ok(memory) => break (temp, memory),
                Err(e) if exists(&e) && attempts < IMAGE_TEMP_NAMES_MAX => attempts += 1,
                // (A file it created and could not reserve or map, it removed itself.)
                Err(e) => return Err(e),
            }
        };
        Ok(ImageFile {
            path: path.to_path_buf(),
            temp: Some(temp),
            marker: None,
            memory: std::sync::Arc::new(memory),
            settled: false,
        })
    }

    /// An existing image at `path`, written in place. Holes in a sparse file are reserved first.
    pub fn open_existing(path: &Path) -> Result<Self> {
        let marker = {
            let mut m = path.as_os_str().to_owned();
            m.push(".pagewire-incomplete");
            std::path::PathBuf::from(m)
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?
            .len();
        reserve(&file, path, len)?;
        // An earlier run's marker says the image is incomplete; it is kept to be put back if
        // this run writes nothing. (Its name is guessable: read without following a link.)
        let earlier = read_marker(&marker)
            .map_err(|e| Error::io(format!("reading the marker {}", marker.display()), e))?;
        write_durably(
            &marker,
            &format!(
                "pagewire is receiving into {}; until this file is gone the image is not complete\n",
                path.display()
            ),
        )
        .map_err(|e| Error::io(format!("writing the marker {}", marker.display()), e))?;
        let memory = GuestMemory::map_file(&file, path, true)
            .inspect_err(|_| restore_marker(&marker, earlier.as_deref()))?;
        Ok(ImageFile {
            path: path.to_path_buf(),
            temp: None,
            marker: Some((marker, earlier)),
            memory: std::sync::Arc::new(memory),
            settled: false,
        })
    }

    /// The image's memory, to receive into.
    pub fn memory(&self) -> std::sync::Arc<GuestMemory> {
        self.memory.clone()
    }

    /// After a successful transfer: flushes the image to its file, then gives it its name (or
    /// removes the marker).
    pub fn commit(mut self) -> Result<()> {
        // A new image's space the receiver had not reserved yet (see
        // `create_reserving_while_received`): nothing writes it now.
        if let Some(r) = self.memory.take_reservation() {
            r.finish_alone()?;
        }
        self.memory.sync()?;
        if let Some(temp) = &self.temp {
            // A file cut short since (its tail all zero pages, never written) is no image.
            let on_disk = std::fs::metadata(temp)
                .map_err(|e| Error::io(format!("reading the size of {}", temp.display()), e))?
                .len();
            let len = self.memory.total_bytes();
            if on_disk != len {
                return Err(Error::Config(format!(
                    "{} is {on_disk} bytes, not the {len} received: it was changed meanwhile",
                    temp.display()
                )));
            }
            rename_new(temp, &self.path).map_err(|e| {
                Error::io(
                    format!("renaming {} to {}", temp.display(), self.path.display()),
                    e,
                )
            })?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        if let Some((marker, _)) = &self.marker {
            std::fs::remove_file(marker)
                .map_err(|e| Error::io(format!("removing the marker {}", marker.display()), e))?;
        }
        self.settled = true;
        Ok(())
    }

    /// After a failed transfer: removes a new image, or records `reason` in the marker beside an
    /// existing one.
    pub fn fail(mut self, reason: &str) {
        self.abandon(reason);
    }

    /// After a failure before any page arrived (nothing listened, no sender came): nothing was
    /// written, so a new image is removed and an existing one is left as it was: with the
    /// marker an earlier failed run left (its text put back), else without one.
    pub fn untouched(mut self) {
        self.settled = true;
        if let Some(temp) = &self.temp {
            let _ = std::fs::remove_file(temp);
        }
        if let Some((marker, earlier)) = &self.marker {
            restore_marker(marker, earlier.as_deref());
        }
    }

    fn abandon(&mut self, reason: &str) {
        if self.settled {
            return;
        }
        self.settled = true;
        if let Some(temp) = &self.temp {
            let _ = std::fs::remove_file(temp);
        }
        if let Some((marker, _)) = &self.marker {
            let _ = write_marker(
                marker,
                &format!(
                    "pagewire failed to receive {}: {reason}\nThe image is NOT complete.\n",
                    self.path.display()
                ),
            );
        }
    }
}

/// Bytes of an earlier marker kept to be put back (see [`read_marker`]).
const MARKER_BYTES_MAX: u64 = 64 << 10;

/// The text of the marker at `path`, if there is one (`O_NOFOLLOW`: a symbolic link planted
/// under its guessable name is an error, not followed).
fn read_marker(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    match opened {
        Ok(f) => {
            // Ours are a line or two; whatever else lies there is kept to its first KiBs, as
            // text, however it was encoded.
            let mut bytes = Vec::new();
            f.take(MARKER_BYTES_MAX).read_to_end(&mut bytes)?;
            Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the marker at `path` to write it anew, never through a symbolic link.
fn open_marker(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Writes `text` into the marker at `path` (best effort after a failure).
fn write_marker(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    open_marker(path)?.write_all(text.as_bytes())
}

/// Leaves the marker at `path` as it was before this run: `earlier`'s text, or none.
fn restore_marker(path: &Path, earlier: Option<&str>) {
    let _ = match earlier {
        Some(text) => write_marker(path, text),
        None => std::fs::remove_file(path),
    };
}

/// Writes `text` to the marker at `path` and syncs it and its directory, so that it is on disk
/// before anything that relies on it.
fn write_durably(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = open_marker(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Renames `from` to `to` unless `to` exists (`renameat2(RENAME_NOREPLACE)`; where the
/// filesystem lacks it, a check just before a plain rename).
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that live across the call; no memory is written.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    if to.exists() {
        return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
    }
    std::fs::rename(from, to)
}

impl Drop for ImageFile {
    fn drop(&mut self) {
        self.abandon("the transfer did not complete");
    }
}
