//! The two KVM dirty-log ioctls `kvm-ioctls` lacks in the form a large guest needs: reading a
//! slot's log into a buffer kept from one round to the next (`VmFd::get_dirty_log` allocates
//! the bitmap on every call: 128 MiB per collect of a 4 TiB guest, faulted in within the
//! downtime on the last one), and clearing it with `KVM_CLEAR_DIRTY_LOG`, which `kvm-ioctls`
//! does not wrap at all.

use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1,
};

/// `KVMIO`, the ioctl type of every KVM request.
const KVMIO: u32 = 0xAE;
/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: libc::Ioctl = libc::_IOW::<kvm_dirty_log>(KVMIO, 0x42);
/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::Ioctl = libc::_IOWR::<kvm_clear_dirty_log>(KVMIO, 0xc0);

/// Reads memory slot `slot`'s dirty log into `bitmap` (KVM's layout: one bit per page, `u64`
/// words). Without manual protect KVM also clears it and write-protects the pages again; with
/// it, only [`kvm_clear_dirty_log`] does.
///
/// # Safety
///
/// `bitmap` holds at least the slot's whole bitmap: one bit per page of the `memory_size` the
/// slot was registered with, rounded up to whole `u64` words. KVM writes that many bytes and
/// cannot be told the buffer's length.
pub(crate) unsafe fn kvm_get_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    bitmap: &mut [u64],
) -> std::io::Result<()> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `log` is a valid `kvm_dirty_log` for the duration of the call; KVM writes the
    // slot's bitmap to `bitmap`, which the caller promises is large enough.
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_DIRTY_LOG, &log) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Clears the pages whose bits are set in `bitmap` from memory slot `slot`'s dirty log and
/// write-protects them again, for `pages` pages from `first_page` (bit `i` of `bitmap` is page
/// `first_page + i`). KVM requires `first_page` to be a multiple of 64, and `pages` one too
/// unless the range ends at the slot's last page. Only on a VM with
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled does the log keep bits for this to clear.
pub(crate) fn kvm_clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    pages: u32,
    bitmap: &[u64],
) -> std::io::Result<()> {
    // KVM reads `pages` bits, rounded up to whole words.
    if (pages as usize).div_ceil(64) > bitmap.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let clear = kvm_clear_dirty_log {
        slot,
        num_pages: pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            // KVM only reads it (the ioctl is _IOWR for the struct, not the bitmap).
            dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
        },
    };
    // SAFETY: `clear` is a valid `kvm_clear_dirty_log` for the duration of the call, which KVM
    // only copies in (the request is _IOWR, but KVM writes nothing back to it); KVM reads
    // `pages` bits rounded up to whole words from `bitmap`, which holds them (checked above),
    // and writes nothing through it.
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &clear) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request numbers, against the values `<linux/kvm.h>` gives on x86-64.
    #[test]
    #[allow(clippy::unnecessary_cast)] // `libc::Ioctl` is not a u64 on every libc
    fn request_numbers_are_the_kernel_s() {
        assert_eq!(KVM_GET_DIRTY_LOG as u64, 0x4010_AE42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG as u64, 0xC018_AEC0);
    }
}
