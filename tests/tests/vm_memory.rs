//! rust-vmm's `GuestMemoryMmap` as pagewire memory (the `vm-memory` feature): a VMM's guest
//! memory object migrates as it is, written and checked through vm-memory's own API.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use pagewire::adapters::vm_memory::from_mmap;
use pagewire::{Pinning, Receiver, ReceiverConfig, Sender, SenderConfig};
use pagewire_tests::{join_within, skip_without_uring};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn guest() -> Arc<GuestMemoryMmap> {
    // Low RAM, and high RAM above a hole, as a PC guest has.
    let ranges = [(GuestAddress(0), 8 << 20), (GuestAddress(4 << 30), 4 << 20)];
    Arc::new(GuestMemoryMmap::from_ranges(&ranges).unwrap())
}

#[test]
fn a_guest_memory_mmap_migrates_as_it_is() {
    if skip_without_uring() {
        return;
    }
    let src = guest();
    for (i, addr) in [0x1000u64, 0x7f_f000, (4 << 30) + 0x2000]
        .into_iter()
        .enumerate()
    {
        src.write_slice(&[0xA0 + i as u8; 4096], GuestAddress(addr))
            .unwrap();
    }
    let dst = guest();
    let (src_pw, dst_pw) = (
        Arc::new(from_mmap(src.clone()).unwrap()),
        Arc::new(from_mmap(dst.clone()).unwrap()),
    );
    assert_eq!(src_pw.regions().len(), 2);
    assert_eq!(src_pw.regions()[1].gpa(), 4 << 30);
    let receiver = Receiver::bind(
        "127.0.0.1:0",
        dst_pw.clone(),
        ReceiverConfig {
            pinning: Pinning::None,
            ..ReceiverConfig::default()
        },
    )
    .unwrap();
    let addr = receiver.local_addr().unwrap();
    let rx = std::thread::spawn(move || receiver.run());
    let mut sender = Sender::connect(
        addr,
        src_pw.clone(),
        &SenderConfig {
            pinning: Pinning::None,
            ..SenderConfig::default()
        },
    )
    .unwrap();
    sender.send_all().unwrap();
    sender.finish().unwrap();
    join_within(rx, Duration::from_secs(10), "receiver").unwrap();
    // Read back through vm-memory: the destination VMM's own view of its memory.
    for (i, addr) in [0x1000u64, 0x7f_f000, (4 << 30) + 0x2000]
        .into_iter()
        .enumerate()
    {
        let mut page = [0u8; 4096];
        dst.read_slice(&mut page, GuestAddress(addr)).unwrap();
        assert_eq!(page, [0xA0 + i as u8; 4096], "page at {addr:#x}");
    }
    assert_eq!(src_pw.first_difference(&dst_pw), None);
    // pagewire's handles keep the mappings alive after the VMM drops its own.
    drop((src, dst));
    assert_eq!(src_pw.first_difference(&dst_pw), None);
}

/// A region the VMM mapped read-only (a ROM) stays read-only: a receiver refuses the memory
/// with a reason instead of faulting when it writes there.
#[test]
fn a_read_only_region_is_refused_as_a_destination() {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::GuestRegionMmap;
    let ram = MmapRegionBuilder::new(1 << 20)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .unwrap();
    let rom = MmapRegionBuilder::new(64 << 10)
        .with_mmap_prot(libc::PROT_READ)
        .build()
        .unwrap();
    let regions = vec![
        GuestRegionMmap::new(ram, GuestAddress(0)).unwrap(),
        GuestRegionMmap::new(rom, GuestAddress(0xfff0_0000)).unwrap(),
    ];
    let guest = Arc::new(GuestMemoryMmap::from_regions(regions).unwrap());
    let memory = Arc::new(from_mmap(guest).unwrap());
    let writable: Vec<_> = memory.regions().iter().map(|r| r.is_writable()).collect();
    assert_eq!(writable, [true, false]);
    let err = Receiver::bind("127.0.0.1:0", memory, ReceiverConfig::default()).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}
