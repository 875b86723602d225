//! Memory: which NUMA node holds a page (`move_pages`) or a mapping's policy names
//! (`get_mempolicy`), and whether a page is resident (`mincore`).

/// The NUMA node of each page at `pages` (page-aligned addresses in this process), as
/// `move_pages(2)` reports it without moving anything: a node number, or a negative errno
/// (`-ENOENT`: not faulted in yet; `-EFAULT`: not mapped). An error when the call itself fails
/// (a kernel without NUMA support answers `ENOSYS`).
pub fn page_nodes(pages: &[*const u8]) -> std::io::Result<Vec<i32>> {
    let mut status = vec![0i32; pages.len()];
    // SAFETY: `pages` and `status` hold `pages.len()` entries; with null `nodes` the kernel reads
    // the addresses (dereferencing none) and writes an int per entry to `status`; pid 0: this one.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(status)
}

/// Nodes a NUMA memory policy names at most here (the mask's bits).
const POLICY_NODES_MAX: usize = 1024;

/// The node the memory policy of the mapping at `addr` puts its pages on, before they are
/// faulted in (`get_mempolicy(2)` with `MPOL_F_ADDR`): the one node of an `MPOL_BIND` or
/// `MPOL_PREFERRED` policy over one node (a VMM's `host-nodes=N,policy=bind`). `None` for the
/// default policy (the faulting thread's node), interleaving, several nodes, or an error.
pub fn policy_node(addr: *const u8) -> Option<u32> {
    const MPOL_PREFERRED: i32 = 1;
    const MPOL_BIND: i32 = 2;
    const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
    let mut mode: i32 = 0;
    let mut mask = [0 as libc::c_ulong; POLICY_NODES_MAX / libc::c_ulong::BITS as usize];
    // SAFETY: `mode` and `mask` (POLICY_NODES_MAX bits) are valid for the kernel's writes;
    // with MPOL_F_ADDR the kernel only looks `addr` up among this process' mappings.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut i32,
            mask.as_mut_ptr(),
            POLICY_NODES_MAX as libc::c_ulong,
            addr as usize as libc::c_ulong,
            MPOL_F_ADDR,
        )
    };
    // Mode flags ride in the high bits. With MPOL_F_RELATIVE_NODES the mask is relative to
    // the cpuset's nodes (bit 0: its first), not node numbers.
    const MPOL_F_RELATIVE_NODES: i32 = 1 << 14;
    if rc != 0
        || mode & MPOL_F_RELATIVE_NODES != 0
        || !matches!(mode & 0xff, MPOL_PREFERRED | MPOL_BIND)
    {
        return None;
    }
    let mut nodes = mask.iter().enumerate().flat_map(|(w, &bits)| {
        (0..libc::c_ulong::BITS)
            .filter(move |b| bits >> b & 1 == 1)
            .map(move |b| w as u32 * libc::c_ulong::BITS + b)
    });
    match (nodes.next(), nodes.next()) {
        (Some(n), None) => Some(n),
        _ => None,
    }
}

/// Whether the page at `page` (a page-aligned address in this process) is in memory now
/// (`mincore(2)`): for a file mapping, whether the page cache holds it. False when the call
/// fails.
pub fn page_resident(page: *const u8) -> bool {
    let mut vec = [0u8; 1];
    // SAFETY: one page from a page-aligned address, and a one-byte vector for it; mincore only
    // writes the vector (an unmapped address is an error, not a fault).
    let rc = unsafe { libc::mincore(page.cast_mut().cast(), 4096, vec.as_mut_ptr()) };
    rc == 0 && vec[0] & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_bound_to_a_node_names_it_before_any_page_is_touched() {
        let len = 4 << 20;
        let m = crate::GuestMemory::anonymous(&[crate::RegionSpec { gpa: 0, len }]).unwrap();
        let addr = m.regions()[0].host_addr();
        assert_eq!(policy_node(addr), None, "the default policy names no node");
        // Node 0 only.
        let mask: libc::c_ulong = 1;
        // SAFETY: `addr..addr + len` is this test's own mapping; the mask holds one word.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                addr,
                len as libc::c_ulong,
                2, // MPOL_BIND
                &mask as *const libc::c_ulong,
                libc::c_ulong::BITS as libc::c_ulong,
                0,
            )
        };
        if rc != 0 {
            println!(
                "skipped: mbind fails here ({})",
                std::io::Error::last_os_error()
            );
            return;
        }
        assert_eq!(policy_node(addr), Some(0));
        assert_eq!(policy_node(addr.wrapping_add(len as usize / 2)), Some(0));
        // Untouched, so move_pages knows no node; the placement's query takes the policy's.
        if let Ok(status) = page_nodes(&[addr.cast_const()]) {
            assert!(status[0] < 0, "untouched: {status:?}");
            let map = crate::placement::MemoryNodes::query(&m, false);
            assert_eq!(map.node_of(0, 0), Some(0), "{map:?}");
        }
    }
}
