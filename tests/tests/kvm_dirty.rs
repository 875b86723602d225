//! The KVM dirty log as a dirty-page source: a hand-written real-mode guest writes chosen pages
//! and halts; the source reports exactly those pages, as runs, and reports them once (a second
//! run of the guest writing other pages reports only those), with the log cleared on get and,
//! where KVM offers it, with manual protect (`KVM_CLEAR_DIRTY_LOG`). Skips with a reason
//! without a usable `/dev/kvm`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit};
use pagewire::dirty::kvm::{enable_manual_protect, KvmDirtyLog, SlotRegion};
use pagewire::dirty::{DirtyBitmaps, DirtySource};
use pagewire::{GuestMemory, RegionSpec};
use pagewire_tests::skip_without_kvm;

const PAGE: u64 = 4096;
const GUEST_PAGES: u64 = 128;
const CODE_GPA: u64 = 0x1000;

/// Real-mode code at `CODE_GPA`: writes one byte into each of `count` pages from page `first`
/// (moving the data segment a page at a time, so any page below 1 MiB is reachable), then halts.
fn writer(first: u16, count: u16) -> Vec<u8> {
    let segment = (first * 0x100).to_le_bytes();
    let count = count.to_le_bytes();
    vec![
        0xB8, segment[0], segment[1], // mov ax, first page's segment
        0xB9, count[0], count[1], // mov cx, count
        0x8E, 0xD8, // loop: mov ds, ax
        0xC6, 0x06, 0x00, 0x00, 0x55, // mov byte [0], 0x55
        0x05, 0x00, 0x01, // add ax, 0x100 (4 KiB)
        0xE2, 0xF4, // loop (back 12 bytes)
        0xF4, // hlt
    ]
}

#[test]
fn the_kvm_dirty_log_reports_exactly_what_the_guest_wrote() {
    if skip_without_kvm() {
        return;
    }
    reports_exactly_what_the_guest_wrote(false);
}

#[test]
fn with_manual_protect_the_kvm_dirty_log_reports_exactly_what_the_guest_wrote() {
    if skip_without_kvm() {
        return;
    }
    reports_exactly_what_the_guest_wrote(true);
}

/// The test, on a VM with manual protect (`manual`, where offered) or without.
fn reports_exactly_what_the_guest_wrote(manual: bool) {
    let memory = GuestMemory::anonymous(&[RegionSpec {
        gpa: 0,
        len: GUEST_PAGES * PAGE,
    }])
    .unwrap();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    // Asked for before the slot's logging starts, as a VMM must.
    let initially_set = manual
        && vm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into())
            & kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET as i32
            != 0;
    if manual && !enable_manual_protect(&vm).unwrap() {
        eprintln!("SKIPPED: KVM does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 here");
        return;
    }
    let vm = Arc::new(vm);
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: GUEST_PAGES * PAGE,
        userspace_addr: memory.regions()[0].host_addr() as u64,
    };
    // SAFETY: the slot maps `memory`'s region, which lives until the end of the test, after the
    // VM (dropped first, declared later).
    unsafe { vm.set_user_memory_region(slot).unwrap() };
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let log = |slots: Vec<SlotRegion>| {
        // SAFETY: slot 0 is registered with GUEST_PAGES pages; every slot named here is said
        // to be at most that (the refused ones are refused before KVM is asked).
        unsafe { KvmDirtyLog::new(vm.clone(), slots) }.manual_protect(manual)
    };
    let slot0 = |bytes| SlotRegion {
        slot: 0,
        region: 0,
        bytes,
    };
    let mut source = log(vec![slot0(GUEST_PAGES * PAGE)]);
    let mut bitmaps = DirtyBitmaps::for_memory(&memory);
    // Where logging started with every bit set, the first collect reports (and clears) them
    // all; otherwise nothing has run yet.
    source.collect(&mut bitmaps).unwrap();
    let expected = if initially_set { GUEST_PAGES } else { 0 };
    assert_eq!(bitmaps.dirty_pages(), expected, "before the guest ran");
    let mut run_guest = |first: u16, count: u16| -> Vec<(u64, u64)> {
        memory.regions()[0].write(CODE_GPA, &writer(first, count));
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        match vcpu.run().unwrap() {
            VcpuExit::Hlt => {}
            exit => panic!("unexpected exit {exit:?}"),
        }
        bitmaps.clear();
        source.collect(&mut bitmaps).unwrap();
        let mut runs = Vec::new();
        bitmaps.runs(&mut runs);
        runs.iter().map(|r| (r.first_page, r.pages)).collect()
    };
    let written = |memory: &GuestMemory| -> Vec<u64> {
        (0..GUEST_PAGES)
            .filter(|&p| {
                let mut b = [0u8];
                memory.regions()[0].read(p * PAGE, &mut b);
                b[0] == 0x55
            })
            .collect()
    };
    assert_eq!(run_guest(2, 16), [(2, 16)], "the pages the guest wrote");
    assert_eq!(written(&memory), (2..18).collect::<Vec<_>>());
    // Taken: later runs report only their own pages.
    assert_eq!(run_guest(30, 10), [(30, 10)]);
    assert_eq!(run_guest(63, 1), [(63, 1)]);
    // Across a word of the bitmap, and up to the slot's last page.
    assert_eq!(run_guest(60, 10), [(60, 10)]);
    assert_eq!(run_guest(120, 8), [(120, 8)]);
    // Nothing ran since: nothing to report.
    bitmaps.clear();
    source.collect(&mut bitmaps).unwrap();
    assert_eq!(bitmaps.dirty_pages(), 0);
    // A slot said to be smaller than its region (in the same number of bitmap words) would
    // leave the pages past it unreported: refused before KVM is asked.
    let err = log(vec![slot0((GUEST_PAGES - 1) * PAGE)])
        .collect(&mut bitmaps)
        .unwrap_err();
    assert!(err.to_string().contains("does not match region 0"), "{err}");
    // A region named by two slots, or by none: refused. A region nothing watches would keep
    // its first copy on the destination while the guest writes it.
    let twice = SlotRegion {
        slot: 1,
        ..slot0(GUEST_PAGES * PAGE)
    };
    let err = log(vec![slot0(GUEST_PAGES * PAGE), twice])
        .collect(&mut bitmaps)
        .unwrap_err();
    assert!(
        err.to_string().contains("both said to hold region 0"),
        "{err}"
    );
    let two_regions = GuestMemory::anonymous(&[
        RegionSpec {
            gpa: 0,
            len: GUEST_PAGES * PAGE,
        },
        RegionSpec {
            gpa: 1 << 32,
            len: PAGE,
        },
    ])
    .unwrap();
    let mut both = DirtyBitmaps::for_memory(&two_regions);
    let err = log(vec![slot0(GUEST_PAGES * PAGE)])
        .collect(&mut both)
        .unwrap_err();
    assert!(
        err.to_string().contains("region 1 has no KVM slot"),
        "{err}"
    );
    // Left out for another source that watches it: accepted.
    log(vec![slot0(GUEST_PAGES * PAGE)])
        .leaving_out(&[1])
        .collect(&mut both)
        .unwrap();
}
