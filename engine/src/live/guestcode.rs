//! The tiny guest's code, shared by pagewire's tiny VMM (`live::tinyguest`, the `kvm`
//! feature) and QEMU (which boots [`firmware`] with `-bios`), so that both engines migrate a
//! guest that runs the same instructions (the source is `guestcode.S` beside this file).
//!
//! Every 1 ms tick (the LAPIC timer under QEMU; the VMM's own tick where the vCPU exits on
//! `hlt`) the guest stores its 32-bit progress counter into the next [`Params::burst`] pages of
//! its working set, walking them in turn and wrapping at the end, incrementing the counter per
//! store, then halts. So the caller chooses the dirty rate (`burst` × 1000 pages per second)
//! and the working set, which starts at 1 MiB (above the PC's legacy hole) and may span the
//! rest of guest memory. The guest runs in flat 32-bit protected mode without paging.

/// Guest-physical address of the parameter block ([`Params`], 24 bytes).
pub const PARAMS_GPA: u64 = 0x500;
/// Guest-physical address of the progress counter (u32).
pub const COUNTER_GPA: u64 = 0x510;
/// Guest-physical address where the guest's code runs.
pub const CODE_GPA: u64 = 0x1000;
/// The guest's stack top (the tick handler's frame; below it, nothing).
pub const STACK_TOP_GPA: u64 = 0x9000;
/// Guest-physical address of the working set's first page.
pub const WORKING_SET_GPA: u64 = 1 << 20;
/// Where the working set must end, at most: the guest addresses 32 bits (a larger end would
/// wrap, and a burst would write one page), and QEMU's `pc` machine ends its RAM below 4 GiB at
/// 3 GiB once the guest has 3.5 GiB or more (the rest goes above 4 GiB, past the PCI hole):
/// below this, every address is RAM in both VMMs.
pub const WORKING_SET_END_GPA_MAX: u64 = 0xC000_0000;
/// Size of the firmware image: QEMU maps it below 4 GiB, the reset vector in its last 16 bytes.
pub const FIRMWARE_BYTES: usize = 64 << 10;
/// LAPIC timer counts per 1 ms tick (KVM's LAPIC counts nanoseconds at divide-by-one).
pub const TIMER_COUNT_PER_TICK: u32 = 1_000_000;
/// Page size the guest strides by.
const PAGE_BYTES: u64 = 4096;

/// The guest's parameters, at [`PARAMS_GPA`] (copied there from the ROM under QEMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Pages written per 1 ms tick (at least 1).
    pub burst: u32,
    /// Pages of the working set, from [`WORKING_SET_GPA`] (at least 1).
    pub working_set_pages: u32,
}

impl Params {
    /// The largest working set, in pages: up to [`WORKING_SET_END_GPA_MAX`].
    pub const WORKING_SET_PAGES_MAX: u32 =
        ((WORKING_SET_END_GPA_MAX - WORKING_SET_GPA) / PAGE_BYTES) as u32;

    /// Params for `bytes_per_s` of page writes (rounded to whole pages per tick, at least one)
    /// over `working_set_pages` (at least one, at most
    /// [`WORKING_SET_PAGES_MAX`](Self::WORKING_SET_PAGES_MAX)).
    pub fn for_rate(bytes_per_s: u64, working_set_pages: u32) -> Params {
        let burst = (bytes_per_s / PAGE_BYTES / 1000).clamp(1, u64::from(u32::MAX)) as u32;
        Params {
            burst,
            working_set_pages: working_set_pages.clamp(1, Self::WORKING_SET_PAGES_MAX),
        }
    }

    /// Refuses params the guest cannot run as asked: no burst, no working set, or one past
    /// [`WORKING_SET_END_GPA_MAX`].
    pub fn check(&self) -> Result<(), String> {
        if self.burst == 0 || self.working_set_pages == 0 {
            return Err(
                "the tiny guest takes a burst and a working set of at least one page".into(),
            );
        }
        if self.working_set_pages > Self::WORKING_SET_PAGES_MAX {
            return Err(format!(
                "the tiny guest's working set ends at {:#x} at most ({} pages), not {:#x}",
                WORKING_SET_END_GPA_MAX,
                Self::WORKING_SET_PAGES_MAX,
                self.memory_bytes_min()
            ));
        }
        Ok(())
    }

    /// The dirty rate these params ask for, in bytes per second.
    pub fn bytes_per_s(&self) -> u64 {
        u64::from(self.burst) * PAGE_BYTES * 1000
    }

    /// Guest memory these params need: up to the end of the working set.
    pub fn memory_bytes_min(&self) -> u64 {
        WORKING_SET_GPA + u64::from(self.working_set_pages) * PAGE_BYTES
    }

    /// The 24-byte parameter block: burst, working set start and end, next page, counter
    /// (zero), timer count. A working set past [`WORKING_SET_END_GPA_MAX`] (refused by
    /// [`check`](Self::check)) ends there.
    pub fn block(&self) -> [u8; 24] {
        let end = self.memory_bytes_min().min(WORKING_SET_END_GPA_MAX) as u32;
        let mut b = [0u8; 24];
        for (i, v) in [
            self.burst,
            WORKING_SET_GPA as u32,
            end,
            WORKING_SET_GPA as u32,
            0,
            TIMER_COUNT_PER_TICK,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// The guest's code, to be loaded at [`CODE_GPA`] and entered in flat 32-bit mode.
pub fn code() -> &'static [u8] {
    &GUEST
}

/// The 64 KiB firmware image for QEMU's `-bios`: from the reset vector it enters flat 32-bit
/// mode, copies `params` to [`PARAMS_GPA`] and the guest to [`CODE_GPA`], and jumps there.
pub fn firmware(params: &Params) -> Vec<u8> {
    let mut rom = vec![0u8; FIRMWARE_BYTES];
    rom[..24].copy_from_slice(&params.block());
    for (at, bytes) in [
        (0x100, &GUEST[..]),
        (0xfe00, &GDT[..]),
        (0xff00, &STUB[..]),
        (0xfff0, &RESET[..]),
    ] {
        rom[at..at + bytes.len()].copy_from_slice(bytes);
    }
    rom
}

/// The guest proper (`guest` to `guest_end`), run at [`CODE_GPA`].
const GUEST: [u8; 268] = [
    0xc7, 0x05, 0xc0, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x05, 0xc4, 0x05, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0xc7, 0x05, 0xc8, 0x05, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xc7, 0x05,
    0xcc, 0x05, 0x00, 0x00, 0x00, 0x9b, 0xcf, 0x00, 0xc7, 0x05, 0xd0, 0x05, 0x00, 0x00, 0xff, 0xff,
    0x00, 0x00, 0xc7, 0x05, 0xd4, 0x05, 0x00, 0x00, 0x00, 0x93, 0xcf, 0x00, 0x66, 0xc7, 0x05, 0xe0,
    0x05, 0x00, 0x00, 0x17, 0x00, 0xc7, 0x05, 0xe2, 0x05, 0x00, 0x00, 0xc0, 0x05, 0x00, 0x00, 0x0f,
    0x01, 0x15, 0xe0, 0x05, 0x00, 0x00, 0xbf, 0x00, 0x08, 0x00, 0x00, 0xb9, 0x00, 0x01, 0x00, 0x00,
    0xb8, 0xfb, 0x10, 0x00, 0x00, 0x66, 0x89, 0x07, 0x66, 0xc7, 0x47, 0x02, 0x08, 0x00, 0x66, 0xc7,
    0x47, 0x04, 0x00, 0x8e, 0x66, 0xc7, 0x47, 0x06, 0x00, 0x00, 0x83, 0xc7, 0x08, 0xe2, 0xe6, 0x66,
    0xc7, 0x05, 0xf0, 0x05, 0x00, 0x00, 0xff, 0x07, 0xc7, 0x05, 0xf2, 0x05, 0x00, 0x00, 0x00, 0x08,
    0x00, 0x00, 0x0f, 0x01, 0x1d, 0xf0, 0x05, 0x00, 0x00, 0xc7, 0x05, 0xf0, 0x00, 0xe0, 0xfe, 0xff,
    0x01, 0x00, 0x00, 0xc7, 0x05, 0xe0, 0x03, 0xe0, 0xfe, 0x0b, 0x00, 0x00, 0x00, 0xc7, 0x05, 0x20,
    0x03, 0xe0, 0xfe, 0x20, 0x00, 0x02, 0x00, 0xa1, 0x14, 0x05, 0x00, 0x00, 0xa3, 0x80, 0x03, 0xe0,
    0xfe, 0xfb, 0xf4, 0xfa, 0x8b, 0x0d, 0x00, 0x05, 0x00, 0x00, 0x8b, 0x3d, 0x0c, 0x05, 0x00, 0x00,
    0xff, 0x05, 0x10, 0x05, 0x00, 0x00, 0xa1, 0x10, 0x05, 0x00, 0x00, 0x89, 0x07, 0x81, 0xc7, 0x00,
    0x10, 0x00, 0x00, 0x3b, 0x3d, 0x08, 0x05, 0x00, 0x00, 0x72, 0x06, 0x8b, 0x3d, 0x04, 0x05, 0x00,
    0x00, 0xe2, 0xdd, 0x89, 0x3d, 0x0c, 0x05, 0x00, 0x00, 0xeb, 0xc6, 0xc7, 0x05, 0xb0, 0x00, 0xe0,
    0xfe, 0x00, 0x00, 0x00, 0x00, 0xbc, 0x00, 0x90, 0x00, 0x00, 0xeb, 0xb8,
];
/// The ROM's GDT and its pseudo-descriptor (`gdt`, `gdtr`), at ROM offset 0xfe00.
const GDT: [u8; 30] = [
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9b, 0xcf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x93, 0xcf, 0x00, 0x17, 0x00, 0x00, 0xfe, 0xff, 0xff,
];
/// The real-mode entry and the copy to RAM (`real`, `protected`), at ROM offset 0xff00.
const STUB: [u8; 85] = [
    0xfa, 0xfc, 0x2e, 0x66, 0x0f, 0x01, 0x16, 0x18, 0xfe, 0x0f, 0x20, 0xc0, 0x0c, 0x01, 0x0f, 0x22,
    0xc0, 0x66, 0xea, 0x19, 0xff, 0xff, 0xff, 0x08, 0x00, 0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e,
    0xc0, 0x8e, 0xd0, 0x8e, 0xe0, 0x8e, 0xe8, 0xbe, 0x00, 0x00, 0xff, 0xff, 0xbf, 0x00, 0x05, 0x00,
    0x00, 0xb9, 0x08, 0x00, 0x00, 0x00, 0xf3, 0xa5, 0xbe, 0x00, 0x01, 0xff, 0xff, 0xbf, 0x00, 0x10,
    0x00, 0x00, 0xb9, 0x43, 0x00, 0x00, 0x00, 0xf3, 0xa5, 0xbc, 0x00, 0x90, 0x00, 0x00, 0xb8, 0x00,
    0x10, 0x00, 0x00, 0xff, 0xe0,
];
/// The reset vector's jump to `real`, at ROM offset 0xfff0.
const RESET: [u8; 3] = [0xe9, 0x0d, 0xff];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_the_rate_to_whole_pages_per_tick() {
        let p = Params::for_rate(200_000_000, 1000);
        assert_eq!(p.burst, 48);
        assert_eq!(p.bytes_per_s(), 48 * 4096 * 1000);
        assert_eq!(Params::for_rate(1, 0).burst, 1);
        assert_eq!(Params::for_rate(1, 0).working_set_pages, 1);
        assert_eq!(p.memory_bytes_min(), (1 << 20) + 1000 * 4096);
        let b = p.block();
        assert_eq!(&b[..4], &48u32.to_le_bytes());
        assert_eq!(&b[8..12], &(((1u32 << 20) + 1000 * 4096).to_le_bytes()));
    }

    #[test]
    fn working_sets_end_below_the_pci_hole_and_never_wrap() {
        // 4 GiB of working set would end past 32 bits: its end wrapped to the start, and the
        // guest wrote one page per tick whatever the burst.
        let big = Params::for_rate(400_000_000, 1 << 20);
        assert_eq!(big.working_set_pages, Params::WORKING_SET_PAGES_MAX);
        assert_eq!(big.memory_bytes_min(), WORKING_SET_END_GPA_MAX);
        assert!(big.check().is_ok());
        let b = big.block();
        assert_eq!(&b[8..12], &(WORKING_SET_END_GPA_MAX as u32).to_le_bytes());
        let over = Params {
            burst: 64,
            working_set_pages: 1 << 20,
        };
        assert!(over.check().unwrap_err().contains("ends at"));
        assert!(
            u32::from_le_bytes(over.block()[8..12].try_into().unwrap()) > WORKING_SET_GPA as u32
        );
        assert!(Params {
            burst: 0,
            working_set_pages: 1
        }
        .check()
        .is_err());
    }

    #[test]
    fn firmware_places_the_parts_and_the_reset_vector() {
        let rom = firmware(&Params::for_rate(4096 * 1000, 16));
        assert_eq!(rom.len(), FIRMWARE_BYTES);
        assert_eq!(&rom[0x100..0x100 + GUEST.len()], &GUEST[..]);
        // The reset vector jumps back (a short jmp, 0xe9 near) to the real-mode entry.
        assert_eq!(rom[0xfff0], 0xe9);
        assert_eq!(&rom[..4], &1u32.to_le_bytes());
    }

    /// The bytes above are `guestcode.S` assembled; reassembles it where binutils is installed.
    #[test]
    fn firmware_matches_its_source() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/live/guestcode.S");
        let obj = dir.path().join("g.o");
        let bin = dir.path().join("g.bin");
        let ok = std::process::Command::new("as")
            .args(["--32", "-o"])
            .arg(&obj)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new("ld")
                .args(["-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o"])
                .arg(&bin)
                .arg(&obj)
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: binutils (as, ld) for i386 is not usable here");
            return;
        }
        let assembled = std::fs::read(&bin).expect("reading the assembled firmware");
        // The assembled image carries the default params (burst 1, 256 pages).
        let ours = firmware(&Params {
            burst: 1,
            working_set_pages: 256,
        });
        assert_eq!(assembled.len(), ours.len());
        assert!(
            assembled == ours,
            "guestcode.rs is stale: reassemble guestcode.S"
        );
    }
}
