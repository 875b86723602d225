use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

/// `nodes` nodes of `cores` CPUs each (node k holds CPUs k*cores..), a NIC `ens1f0` on
/// `nic_node`.
fn machine(nodes: u32, cores: usize, nic_node: Option<u32>) -> Topology {
    Topology {
        nodes: (0..nodes)
            .map(|id| Node {
                id,
                cpus: (id as usize * cores..(id as usize + 1) * cores).collect(),
            })
            .collect(),
        nics: vec![Nic {
            name: "ens1f0".into(),
            node: nic_node,
            speed_mbit: None,
        }],
        source: TopologySource::Sysfs,
    }
}

fn input(
    channels: u16,
    cores: impl IntoIterator<Item = usize>,
    memory: &[(u32, u64)],
) -> PlanInput {
    PlanInput {
        channels,
        cores: cores.into_iter().collect(),
        memory_pages_by_node: memory.iter().copied().collect(),
        nic: Some("ens1f0".into()),
    }
}

fn cores_of(p: &Plan) -> Vec<Option<usize>> {
    p.shards.iter().map(|s| s.core).collect()
}

fn nodes_of(p: &Plan) -> Vec<Option<u32>> {
    p.shards.iter().map(|s| s.node).collect()
}

#[test]
fn cpu_lists_parse_like_the_kernel_writes_them() {
    assert_eq!(
        parse_cpu_list("0-3,8,10-11"),
        Some(vec![0, 1, 2, 3, 8, 10, 11])
    );
    assert_eq!(parse_cpu_list(""), Some(vec![]));
    assert_eq!(parse_cpu_list("5"), Some(vec![5]));
    assert_eq!(parse_cpu_list("3,1-2,2"), Some(vec![1, 2, 3]));
    assert_eq!(parse_cpu_list("3-1"), None);
    assert_eq!(parse_cpu_list("a"), None);
    assert_eq!(parse_cpu_list("0-99999999"), None, "bounded, not allocated");
}

#[test]
fn sysfs_tree_gives_nodes_and_nic_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (node, list) in [(0, "0-3\n"), (1, "4-7\n")] {
        let d = root.join(format!("devices/system/node/node{node}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpulist"), list).unwrap();
    }
    std::fs::create_dir_all(root.join("devices/system/node/possible_not_a_node")).unwrap();
    for (nic, node) in [
        ("eth0", Some("-1\n")),
        ("ens1f0", Some("1\n")),
        ("lo", None),
        ("veth0", None),
    ] {
        let d = root.join(format!("class/net/{nic}"));
        std::fs::create_dir_all(&d).unwrap();
        if let Some(n) = node {
            std::fs::create_dir_all(d.join("device")).unwrap();
            std::fs::write(d.join("device/numa_node"), n).unwrap();
        }
    }
    // Stacked: a bond over ens1f0, a VLAN on the bond, a bridge with ens1f0 as its port, and
    // a bond whose ports sit on two nodes (no one node).
    std::fs::create_dir_all(root.join("devices/system/node/node2")).unwrap();
    std::fs::write(root.join("devices/system/node/node2/cpulist"), "8\n").unwrap();
    let d = root.join("class/net/ens2f0/device");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("numa_node"), "2\n").unwrap();
    for (upper, lower) in [
        ("bond0", "lower_ens1f0"),
        ("bond0.100", "lower_bond0"),
        ("br0", "brif/ens1f0"),
        ("bond1", "lower_ens1f0"),
        ("bond1", "lower_ens2f0"),
    ] {
        let d = root.join(format!("class/net/{upper}/{lower}"));
        std::fs::create_dir_all(&d).unwrap();
    }
    let t = Topology::from_sysfs(root).unwrap();
    assert_eq!(
        t.nic_node("bond0"),
        Some(1),
        "a bond sits on its port's node"
    );
    assert_eq!(t.nic_node("bond0.100"), Some(1), "a VLAN on the bond");
    assert_eq!(t.nic_node("br0"), Some(1), "a bridge on its port's node");
    assert_eq!(t.nic_node("bond1"), None, "ports on two nodes");
    assert_eq!(t.source, TopologySource::Sysfs);
    assert_eq!(
        t.nodes,
        vec![
            Node {
                id: 0,
                cpus: vec![0, 1, 2, 3]
            },
            Node {
                id: 1,
                cpus: vec![4, 5, 6, 7]
            },
            Node {
                id: 2,
                cpus: vec![8]
            }
        ]
    );
    assert_eq!(t.nic_node("ens1f0"), Some(1));
    assert_eq!(t.nic_node("eth0"), None, "-1 is no affinity");
    assert_eq!(t.nic_node("veth0"), None, "virtual: no device");
    assert!(t.nics.iter().all(|n| n.name != "lo"));
    assert_eq!(t.node_of_cpu(5), Some(1));
    assert_eq!(t.node_of_cpu(9), None);

    let empty = tempfile::tempdir().unwrap();
    assert!(
        Topology::from_sysfs(empty.path()).is_err(),
        "no node directory"
    );
}

#[test]
fn this_machine_has_a_topology_covering_the_allowed_cores() {
    let t = Topology::detect();
    assert!(!t.nodes.is_empty());
    for c in crate::shard::allowed_cores() {
        assert!(
            t.node_of_cpu(c.id).is_some(),
            "core {} in no node: {t:?}",
            c.id
        );
    }
}

#[test]
fn loopback_leaves_through_lo() {
    assert_eq!(
        interface_to("127.0.0.1:7878".parse().unwrap()).as_deref(),
        Some("lo")
    );
}

#[test]
fn core_lists_are_checked_against_the_allowed_cores() {
    use crate::Pinning;
    let allowed: Vec<usize> = crate::shard::allowed_cores().iter().map(|c| c.id).collect();
    assert_eq!(pin_order(None, Pinning::Cores).unwrap(), allowed);
    // Spread shards are planned on the same cores; only their affinity is wider.
    assert_eq!(pin_order(None, Pinning::Nodes).unwrap(), allowed);
    let mut reversed = allowed.clone();
    reversed.reverse();
    assert_eq!(pin_order(None, Pinning::CoresReversed).unwrap(), reversed);
    assert!(pin_order(None, Pinning::None).unwrap().is_empty());
    assert_eq!(
        pin_order(Some(&allowed[..1]), Pinning::Cores).unwrap(),
        &allowed[..1]
    );
    // A preference order with a core named twice: each core once, in first-mention order.
    if let [a, b, ..] = allowed[..] {
        assert_eq!(
            pin_order(Some(&[b, a, b, a]), Pinning::Cores).unwrap(),
            [b, a]
        );
    }
    let e = pin_order(Some(&[100_000]), Pinning::Cores).unwrap_err();
    assert!(e.to_string().contains("core 100000 is not one"), "{e}");
    assert!(pin_order(Some(&[]), Pinning::Cores).is_err());
    assert_eq!(cpu_list_text(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    assert_eq!(cpu_list_text(&[5]), "5");
}

#[test]
fn one_node_takes_cores_in_order() {
    let t = machine(1, 4, Some(0));
    let p = plan(&t, &input(2, 0..4, &[(0, 1000)]));
    assert_eq!(cores_of(&p), vec![Some(0), Some(1)]);
    assert_eq!(nodes_of(&p), vec![Some(0), Some(0)]);
    assert_eq!(p.nic_node, Some(0));
    assert!(p.notes.is_empty(), "{:?}", p.notes);
}

#[test]
fn shards_follow_memory_across_nodes() {
    let t = machine(2, 4, Some(1));
    // Even split: two shards per node, each on its node's cores.
    let p = plan(&t, &input(4, 0..8, &[(0, 500), (1, 500)]));
    assert_eq!(p.channels_on(0).len(), 2);
    assert_eq!(p.channels_on(1).len(), 2);
    for s in &p.shards {
        assert_eq!(t.node_of_cpu(s.core.unwrap()), s.node);
    }
    // All memory on node 0: both shards there, although the NIC is on node 1.
    let p = plan(&t, &input(2, 0..8, &[(0, 1000)]));
    assert_eq!(nodes_of(&p), vec![Some(0), Some(0)]);
    // 3:1 with 4 channels: three and one.
    let p = plan(&t, &input(4, 0..8, &[(0, 750), (1, 250)]));
    assert_eq!((p.channels_on(0).len(), p.channels_on(1).len()), (3, 1));
    assert_eq!(
        p.channels_by_node(),
        BTreeMap::from([(0, p.channels_on(0)), (1, p.channels_on(1))])
    );
}

#[test]
fn unknown_memory_starts_at_the_nic() {
    let t = machine(2, 4, Some(1));
    let p = plan(&t, &input(6, 0..8, &[]));
    // The NIC's node fills first (its four cores), then the other node.
    assert_eq!(
        nodes_of(&p),
        vec![Some(1), Some(1), Some(1), Some(1), Some(0), Some(0)]
    );
    assert_eq!(&cores_of(&p)[..4], &[Some(4), Some(5), Some(6), Some(7)]);
    assert!(p.notes.iter().any(|n| n.contains("NIC")), "{:?}", p.notes);
    // No NIC either: nodes weigh by their cores, so shards alternate.
    let mut i = input(4, 0..8, &[]);
    i.nic = None;
    let p = plan(&t, &i);
    assert_eq!((p.channels_on(0).len(), p.channels_on(1).len()), (2, 2));
}

#[test]
fn reserved_cores_are_never_used() {
    let t = machine(2, 4, Some(1));
    // A VMM keeps node 1's cores and core 0 for vCPUs; memory sits on node 1.
    let p = plan(&t, &input(4, [1, 2, 3], &[(1, 1000)]));
    assert!(p
        .shards
        .iter()
        .all(|s| [1, 2, 3].contains(&s.core.unwrap())));
    assert_eq!(cores_of(&p), vec![Some(1), Some(2), Some(3), Some(1)]);
    assert!(p
        .notes
        .iter()
        .any(|n| n.contains("node 1 holds guest memory")));
    assert!(p.notes.iter().any(|n| n.contains("two shards")));
}

#[test]
fn no_cores_means_no_pinning() {
    let t = machine(2, 4, Some(1));
    let p = plan(&t, &input(3, [], &[(0, 10)]));
    assert_eq!(cores_of(&p), vec![None, None, None]);
    assert!(p.channels_by_node().is_empty());
}

#[test]
fn plan_prints_and_serializes() {
    let t = machine(2, 4, Some(1));
    let p = plan(&t, &input(2, 0..8, &[(0, 256), (1, 256)]));
    let text = p.render();
    assert!(text.contains("ens1f0 on node 1"), "{text}");
    assert!(text.contains("node 0: 1 MiB"), "{text}");
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["shards"].as_array().unwrap().len(), 2);
    assert_eq!(json["nic_node"], 1);
    assert_eq!(json["topology"], "sysfs");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Any machine, core list, memory spread and channel count: one place per channel, only
    /// allowed cores, and no core gets a second shard while an allowed core has none.
    #[test]
    fn plans_use_allowed_cores_evenly(
        nodes in 1u32..5,
        cores_per_node in 1usize..6,
        channels in 1u16..40,
        mask in any::<u64>(),
        memory in proptest::collection::vec(0u64..1000, 5),
        nic_node in proptest::option::of(0u32..5),
    ) {
        let t = machine(nodes, cores_per_node, nic_node);
        let all = nodes as usize * cores_per_node;
        let allowed: Vec<usize> = (0..all).filter(|c| mask >> c & 1 == 1).collect();
        let memory: Vec<(u32, u64)> = (0..nodes).map(|n| (n, memory[n as usize])).collect();
        let p = plan(&t, &input(channels, allowed.clone(), &memory));
        prop_assert_eq!(p.shards.len(), usize::from(channels));
        let mut per_core: BTreeMap<usize, usize> = BTreeMap::new();
        for (i, s) in p.shards.iter().enumerate() {
            prop_assert_eq!(usize::from(s.channel), i);
            match s.core {
                Some(c) => {
                    prop_assert!(allowed.contains(&c));
                    prop_assert_eq!(s.node, t.node_of_cpu(c));
                    *per_core.entry(c).or_insert(0) += 1;
                }
                None => prop_assert!(allowed.is_empty()),
            }
        }
        if !allowed.is_empty() {
            let min = allowed.iter().map(|c| per_core.get(c).copied().unwrap_or(0)).min().unwrap();
            let max = per_core.values().copied().max().unwrap();
            prop_assert!(max <= min + 1, "uneven: {:?} over {:?}", per_core, allowed);
        }
    }
}

#[test]
fn memory_interleaved_page_by_page_shows_all_its_nodes() {
    // MPOL_INTERLEAVE without huge pages: page p on node p mod n. Samples at the strides'
    // first pages (multiples of 512) all fell on one node.
    let memory = crate::GuestMemory::anonymous(&[crate::RegionSpec {
        gpa: 0,
        len: 256 << 20,
    }])
    .unwrap();
    let base = memory.regions()[0].host_addr() as usize / PAGE_BYTES;
    for nodes in [2usize, 3, 4, 8] {
        let map = MemoryNodes::query_with(&memory, false, |addrs| {
            addrs
                .iter()
                .map(|&a| ((a as usize / PAGE_BYTES - base) % nodes) as i32)
                .collect()
        });
        let by_node = map.pages_by_node();
        let total: u64 = by_node.values().sum();
        assert_eq!(by_node.len(), nodes, "{nodes} nodes: {by_node:?}");
        for (&n, &pages) in &by_node {
            let share = pages as f64 / total as f64;
            assert!(
                (share - 1.0 / nodes as f64).abs() < 0.5 / nodes as f64,
                "{nodes} nodes: node {n} has {share:.2} of the pages"
            );
        }
    }
}

#[test]
fn memory_nodes_of_touched_and_untouched_memory() {
    let spec = [
        crate::RegionSpec {
            gpa: 0,
            len: 8 << 20,
        },
        crate::RegionSpec {
            gpa: 16 << 20,
            len: 4 << 20,
        },
    ];
    let memory = crate::GuestMemory::anonymous(&spec).unwrap();
    // Touch the first region only.
    memory.regions()[0].write(0, &vec![1u8; 8 << 20]);
    let map = MemoryNodes::query(&memory, false);
    let pages: u64 = map.spans.iter().map(|s| s.pages).sum();
    assert_eq!(pages, (12 << 20) / PAGE_BYTES as u64, "{map:?}");
    match crate::sys::page_nodes(&[memory.regions()[0].host_addr().cast_const()]) {
        Ok(_) => {
            let node = map.node_of(0, 0);
            assert!(node.is_some(), "touched memory has a node: {map:?}");
            assert_eq!(map.node_of(0, 2047), node);
            assert_eq!(map.node_of(1, 0), None, "never touched: {map:?}");
            assert_eq!(map.node_of(1, 1024), None, "past the region");
            assert_eq!(map.node_of(2, 0), None, "no such region");
            assert_eq!(map.pages_by_node().values().sum::<u64>(), 2048);
        }
        Err(e) => println!("skipped the node checks: move_pages fails here ({e})"),
    }
    // A RAM image file mapped but never read: its pages have no node until touched, and
    // touching maps the page-cache pages the file already has.
    if crate::sys::page_nodes(&[memory.regions()[0].host_addr().cast_const()]).is_ok() {
        let file = tempfile::NamedTempFile::new_in("/dev/shm")
            .or_else(|_| tempfile::NamedTempFile::new())
            .unwrap();
        std::fs::write(file.path(), vec![7u8; 4 << 20]).unwrap();
        let image = crate::GuestMemory::from_file(file.path(), false).unwrap();
        assert_eq!(MemoryNodes::query(&image, false).node_of(0, 0), None);
        let touched = MemoryNodes::query(&image, true);
        assert!(touched.node_of(0, 0).is_some(), "{touched:?}");
    }
    let uniform = MemoryNodes::uniform(&memory, Some(3));
    assert_eq!(uniform.node_of(1, 1023), Some(3));
    assert_eq!(uniform.pages_by_node()[&3], 3072);
}

/// Pages 0..1024 of region 0 on node 0, 1024..2048 on node 1.
fn two_node_memory() -> MemoryNodes {
    MemoryNodes {
        spans: vec![
            NodeSpan {
                region: 0,
                first_page: 0,
                pages: 1024,
                node: Some(0),
            },
            NodeSpan {
                region: 0,
                first_page: 1024,
                pages: 1024,
                node: Some(1),
            },
        ],
    }
}

#[test]
fn chunks_route_to_the_pool_of_their_nodes_shards() {
    let t = machine(2, 4, Some(1));
    let nodes = two_node_memory();
    assert_eq!(
        nodes.pages_by_node(),
        BTreeMap::from([(0, 1024), (1, 1024)])
    );
    let p = Placement::new(
        &t,
        nodes.clone(),
        4,
        (0..8).collect(),
        Some("ens1f0".into()),
    );
    let on0 = p.plan.channels_on(0);
    let on1 = p.plan.channels_on(1);
    assert_eq!((on0.len(), on1.len()), (2, 2));
    // One pool per node: a node's chunks go to its own shards, and only to them. Each pool's
    // shards are pinned to cores of its node (node 0: cores 0-3, node 1: 4-7), and the pools
    // hold every shard once.
    let pools = p.pools(4);
    assert_eq!(pools, [on0.clone(), on1.clone()]);
    for (node_cores, pool) in [(0..4, &pools[0]), (4..8, &pools[1])] {
        for &ch in pool {
            let core = p.plan.shards[ch].core.expect("pinned");
            assert!(node_cores.contains(&core), "{ch} on core {core}: {pools:?}");
        }
    }
    let mut all: Vec<usize> = pools.concat();
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3]);
    assert_eq!(p.pool_for(0, 10), Some(0));
    assert_eq!(p.pool_for(0, 1500), Some(1));
    assert_eq!(p.pool_for(0, 4096), None, "past the memory");
    // One node with shards: no routing, one pool of every shard.
    let one = Placement::new(&t, nodes, 2, vec![0, 1], None);
    assert_eq!(one.pool_for(0, 1500), None);
    assert_eq!(one.pools(2), [vec![0, 1]]);
}

#[test]
fn spread_shards_may_run_on_every_pin_core_of_their_node() {
    use crate::shard::Affinity;
    use crate::Pinning;
    let t = machine(2, 4, Some(1));
    let nodes = two_node_memory();
    // Core 2 reserved (a vCPU's): no shard may run there, spread or not.
    let cores = vec![0, 1, 3, 4, 5, 6, 7];
    let mut p = Placement::new(&t, nodes, 4, cores, None);
    for ch in 0..4 {
        let node = p.plan.shards[ch].node.expect("planned on a node");
        let core = p.plan.shards[ch].core.expect("pinned");
        let want: Vec<usize> = if node == 0 {
            vec![0, 1, 3]
        } else {
            vec![4, 5, 6, 7]
        };
        assert_eq!(p.node_cores(ch), want, "channel {ch}");
        assert_eq!(Affinity::of(&p, ch, Pinning::Nodes), Affinity::Cores(want));
        assert_eq!(Affinity::of(&p, ch, Pinning::Cores), Affinity::Core(core));
        assert_eq!(Affinity::of(&p, ch, Pinning::None), Affinity::Free);
    }
    assert!(p.node_cores(9).is_empty());
    p.note_pinning(Pinning::Nodes);
    assert!(
        p.plan.render().contains("Pinning::Nodes"),
        "{}",
        p.plan.render()
    );
    // Nothing to pin to: free, whatever the pinning says.
    let t1 = machine(1, 2, None);
    let free = Placement::new(&t1, MemoryNodes { spans: vec![] }, 2, vec![], None);
    assert_eq!(Affinity::of(&free, 0, Pinning::Nodes), Affinity::Free);
}

#[cfg(feature = "hwloc")]
mod hwloc_xml {
    use std::path::Path;

    use super::*;

    fn load(name: &str) -> Topology {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/placement/testdata")
            .join(name);
        Topology::from_hwloc_xml(&path).unwrap()
    }

    #[test]
    fn xml_topologies_read_nodes_cpus_and_the_nic() {
        for (file, nodes, nic_node) in [
            ("one-node.xml", 1, 0),
            ("two-nodes.xml", 2, 1),
            ("four-nodes.xml", 4, 1),
        ] {
            let t = load(file);
            assert_eq!(t.source, TopologySource::Hwloc);
            assert_eq!(t.nodes.len(), nodes, "{file}: {t:?}");
            for (k, n) in t.nodes.iter().enumerate() {
                assert_eq!(n.id, k as u32);
                assert_eq!(n.cpus, (k * 4..k * 4 + 4).collect::<Vec<_>>(), "{file}");
            }
            assert_eq!(t.nic_node("ens1f0"), Some(nic_node), "{file}: {t:?}");
        }
        let bad = Topology::from_hwloc_xml(Path::new("/nonexistent.xml"));
        assert!(matches!(bad, Err(crate::Error::Topology(_))), "{bad:?}");
    }

    #[test]
    fn xml_topologies_plan_near_memory_then_the_nic() {
        let one = load("one-node.xml");
        let p = plan(&one, &input(2, 0..4, &[]));
        assert_eq!(cores_of(&p), vec![Some(0), Some(1)]);

        let two = load("two-nodes.xml");
        // Memory unknown: the NIC's node 1 first.
        let p = plan(&two, &input(2, 0..8, &[]));
        assert_eq!(nodes_of(&p), vec![Some(1), Some(1)]);
        assert_eq!(cores_of(&p), vec![Some(4), Some(5)]);
        // Memory on node 0: there, whatever the NIC.
        let p = plan(&two, &input(2, 0..8, &[(0, 100)]));
        assert_eq!(nodes_of(&p), vec![Some(0), Some(0)]);

        let four = load("four-nodes.xml");
        // Memory on nodes 0 and 2 (3:1), 8 channels: node 0's four cores, node 2's share,
        // then the NIC's node for the rest before other nodes.
        let p = plan(&four, &input(8, 0..16, &[(0, 750), (2, 250)]));
        assert_eq!(p.channels_on(0).len(), 4, "{}", p.render());
        assert_eq!(p.channels_on(2).len(), 3, "{}", p.render());
        assert_eq!(p.channels_on(1).len(), 1, "{}", p.render());
        assert!(p.channels_on(3).is_empty());
    }
}
