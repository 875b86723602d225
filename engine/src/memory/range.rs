//! Checked ranges of guest memory for code that reads or writes it through a raw pointer
//! outside this module (AES-GCM in `tls::direct`). Made only by [`Region::range`](super::Region::range) and
//! [`Region::range_mut`](super::Region::range_mut), which check them against the mapping.

/// A range of a region's mapping, checked against it when made ([`Region::range`](super::Region::range)):
/// readable through [`as_ptr`](Self::as_ptr) for [`len`](Self::len) bytes for as long as its
/// [`GuestMemory`](super::GuestMemory) lives (vCPUs may write it meanwhile: readers get some mix of old and new
/// bytes). No reference to guest memory is ever formed from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuestSrc {
    pub(super) ptr: *const u8,
    pub(super) len: usize,
}

impl GuestSrc {
    /// The range's first byte.
    #[cfg_attr(not(feature = "aws-lc-rs"), allow(dead_code))]
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Bytes in the range.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies the range into `out`, which must be as long.
    pub(crate) fn copy_to(&self, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            self.len,
            "a copy of a guest range needs its length"
        );
        // SAFETY: ptr..ptr+len is inside the mapping while its GuestMemory lives (checked
        // when made); `out` is a distinct Rust buffer of the same length; raw pointers only.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), self.len) }
    }
}

/// A range of a writable region's mapping, checked against it when made
/// ([`Region::range_mut`](super::Region::range_mut)): writable through [`as_mut_ptr`](Self::as_mut_ptr) for
/// [`len`](Self::len) bytes for as long as its [`GuestMemory`](super::GuestMemory) lives. No reference to guest
/// memory is ever formed from it.
#[derive(Debug)]
#[cfg_attr(not(feature = "aws-lc-rs"), allow(dead_code))] // only the aws-lc-rs open writes it
pub(crate) struct GuestRange {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

#[cfg_attr(not(feature = "aws-lc-rs"), allow(dead_code))]
impl GuestRange {
    /// The range's first byte.
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes in the range.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}
