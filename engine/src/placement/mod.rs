//! Where shards run: the machine's NUMA topology, the node that holds each part of guest memory,
//! the node of the NIC that leads to the peer, and the plan that puts them together.
//!
//! A page crossing the interconnect between NUMA nodes costs a remote read (sender) or a remote
//! write (receiver) on top of the kernel's copies, and a NIC's DMA to or from another node's memory
//! crosses it again. So the sender plans its shards the way a NUMA-aware VMM places vCPUs:
//! - each node that holds guest memory gets shards in proportion to the memory it holds, on its
//!   own cores, so a shard reads local memory;
//! - chunks are routed to a shard of the node that holds them (any shard with room takes a chunk
//!   when those are full, so one slow node never stalls the transfer);
//! - where memory's node is unknown (not faulted in, or one node only), shards go to the NIC's
//!   node first, then to the others;
//! - no shard is pinned outside the allowed cores (`SenderConfig::cores`): a VMM keeps its vCPU
//!   cores out of the list.
//!
//! The receiver plans the same way with the destination memory's nodes.
//!
//! [`plan`] is a pure function of a [`Topology`] and a [`PlanInput`], so it is tested on
//! synthetic topologies (sysfs trees, and hwloc XML files with the `hwloc` feature). The topology
//! comes from hwloc (`hwloc` feature, which needs `libhwloc`) or from sysfs, which every Linux
//! has; both give the same [`Topology`].

#[cfg(feature = "hwloc")]
mod hwloc;
mod topology;

pub(crate) use topology::nic_speed_mbit;
pub use topology::{
    cpu_list_text, interface_to, parse_cpu_list, Nic, Node, Topology, TopologySource,
};

use std::collections::BTreeMap;

use serde::Serialize;

use crate::limits::{NODE_QUERY_SAMPLES_MAX, PAGE_BYTES};
use crate::memory::GuestMemory;

/// A stretch of guest memory and the node that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NodeSpan {
    /// Region index.
    pub region: u32,
    /// First page (in the region).
    pub first_page: u64,
    /// Pages.
    pub pages: u64,
    /// Node of its sampled pages; `None` where they are not faulted in yet and no memory
    /// policy binds them to one node.
    pub node: Option<u32>,
}

/// How far into its stride a node sample may be, in pages (see [`MemoryNodes::query`]).
const NODE_QUERY_SKEW_PAGES: u64 = 64;

/// Which node holds which part of guest memory, sampled (one page per stride) with
/// `move_pages(2)`, so a terabyte costs one system call of at most
/// [`NODE_QUERY_SAMPLES_MAX`] entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MemoryNodes {
    /// Spans in region and page order, covering every page once.
    pub spans: Vec<NodeSpan>,
}

impl MemoryNodes {
    /// Samples `memory`; with `touch`, reads one byte of each sampled page that is in memory
    /// (`mincore`) first, so a mapped file's page-cache pages are mapped (nothing is allocated
    /// or read from disk). A page not faulted in yet takes the node its mapping's memory
    /// policy binds it to, where that names one node. Where the query fails (a kernel without
    /// NUMA), every span's node is `None`.
    pub fn query(memory: &GuestMemory, touch: bool) -> MemoryNodes {
        Self::query_with(memory, touch, |addrs| {
            let Ok(status) = crate::sys::page_nodes(addrs) else {
                return vec![-1; addrs.len()];
            };
            // A page not in memory yet goes where its mapping's policy says, when it names
            // one node (a VMM binds guest RAM to a node before any page is touched). Only
            // there: a page already in the page cache, not mapped here, sits where it sits.
            // (Anonymous, shmem and hugetlbfs memory follows the mapping's policy; a regular
            // file's page cache follows the faulting thread's, which a binding of such a
            // mapping would misname.)
            status
                .iter()
                .zip(addrs)
                .map(|(&s, &a)| match s {
                    s if s >= 0 => s,
                    s if crate::sys::page_resident(a) => s,
                    s => crate::sys::policy_node(a).map_or(s, |n| n as i32),
                })
                .collect()
        })
    }

    /// [`query`](Self::query) with `nodes` telling the node of each address (`move_pages`'
    /// status: a node, or negative where unknown).
    fn query_with(
        memory: &GuestMemory,
        touch: bool,
        nodes: impl FnOnce(&[*const u8]) -> Vec<i32>,
    ) -> MemoryNodes {
        let total_pages: u64 = memory.regions().iter().map(|r| r.pages()).sum();
        let huge_pages = (2 << 20) / PAGE_BYTES as u64;
        let stride = total_pages
            .div_ceil(NODE_QUERY_SAMPLES_MAX as u64)
            .max(huge_pages);
        let mut samples = Vec::new();
        let mut addrs = Vec::new();
        for (i, region) in memory.regions().iter().enumerate() {
            let mut base = 0;
            while base < region.pages() {
                // Each sample a few pages further into its stride (7k mod 64): memory
                // interleaved page by page over n nodes (`MPOL_INTERLEAVE`, no huge pages)
                // shows all of its nodes, where the strides' first pages (multiples of 512)
                // would all sit on one.
                let page = (base + (7 * samples.len() as u64) % NODE_QUERY_SKEW_PAGES)
                    .min(region.pages() - 1);
                // Only pages already in memory are touched: a RAM image on disk is not read
                // (its pages' node is decided when the transfer reads them anyway).
                if touch && crate::sys::page_resident(region.pages_ptr(page, 1)) {
                    let mut byte = [0u8];
                    region.read(page * PAGE_BYTES as u64, &mut byte);
                    // The byte is unused: keep the read (the fault is the point).
                    std::hint::black_box(byte);
                }
                samples.push((i as u32, base));
                addrs.push(region.pages_ptr(page, 1).cast_const());
                base += stride;
            }
        }
        let status = nodes(&addrs);
        let mut spans: Vec<NodeSpan> = Vec::new();
        for (k, &(region, page)) in samples.iter().enumerate() {
            let region_pages = memory.regions()[region as usize].pages();
            let pages = stride.min(region_pages - page);
            let node = u32::try_from(status[k]).ok();
            match spans.last_mut() {
                Some(s) if s.region == region && s.node == node => s.pages += pages,
                _ => spans.push(NodeSpan {
                    region,
                    first_page: page,
                    pages,
                    node,
                }),
            }
        }
        MemoryNodes { spans }
    }

    /// All of `memory` on one node (or unknown): what a one-node machine needs no query for.
    pub fn uniform(memory: &GuestMemory, node: Option<u32>) -> MemoryNodes {
        let spans = memory
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| NodeSpan {
                region: i as u32,
                first_page: 0,
                pages: r.pages(),
                node,
            })
            .collect();
        MemoryNodes { spans }
    }

    /// The node that holds page `page` of region `region`, as sampled.
    pub fn node_of(&self, region: u32, page: u64) -> Option<u32> {
        let i = self
            .spans
            .partition_point(|s| (s.region, s.first_page) <= (region, page));
        let s = self.spans.get(i.checked_sub(1)?)?;
        (s.region == region && page < s.first_page + s.pages)
            .then_some(s.node)
            .flatten()
    }

    /// Pages per node (nodes with a known location only).
    pub fn pages_by_node(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for s in &self.spans {
            if let Some(n) = s.node {
                *out.entry(n).or_insert(0) += s.pages;
            }
        }
        out
    }
}

/// What a plan is made from, besides the topology.
#[derive(Debug, Clone, Default)]
pub struct PlanInput {
    /// Shards to place.
    pub channels: u16,
    /// Cores shards may run on, in order of preference (the allowed cores, minus any a VMM
    /// keeps for vCPUs). Empty: no pinning (every shard's core is `None`).
    pub cores: Vec<usize>,
    /// Guest pages per node (known locations only).
    pub memory_pages_by_node: BTreeMap<u32, u64>,
    /// The interface traffic to the peer leaves through, when known.
    pub nic: Option<String>,
}

/// Where one shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShardPlace {
    /// Channel (shard) index.
    pub channel: u16,
    /// The core it is pinned to (`None`: not pinned).
    pub core: Option<usize>,
    /// That core's node (`None` when not pinned or the core is in no known node).
    pub node: Option<u32>,
}

/// Shard placement: a value that can be printed, compared in tests, and followed by the shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// One entry per channel, in channel order.
    pub shards: Vec<ShardPlace>,
    /// The interface to the peer and its node, when known.
    pub nic: Option<String>,
    /// The NIC's node, when known.
    pub nic_node: Option<u32>,
    /// Guest pages per node that the plan weighed.
    pub memory_pages_by_node: BTreeMap<u32, u64>,
    /// Where the topology came from.
    pub topology: TopologySource,
    /// Why the plan looks the way it does, one line each.
    pub notes: Vec<String>,
}

impl Plan {
    /// The channels whose shards run on `node`, in channel order.
    pub fn channels_on(&self, node: u32) -> Vec<usize> {
        self.shards
            .iter()
            .filter(|s| s.node == Some(node))
            .map(|s| usize::from(s.channel))
            .collect()
    }

    /// For each node with shards, its channels: how the sender routes chunks by node.
    pub fn channels_by_node(&self) -> BTreeMap<u32, Vec<usize>> {
        let mut out: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for s in &self.shards {
            if let Some(n) = s.node {
                out.entry(n).or_default().push(usize::from(s.channel));
            }
        }
        out
    }

    /// A human-readable table of the plan.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "topology from {}",
            match self.topology {
                TopologySource::Hwloc => "hwloc",
                TopologySource::Sysfs => "sysfs",
                TopologySource::Assumed => "nowhere (one node assumed)",
            }
        );
        let memory: Vec<String> = self
            .memory_pages_by_node
            .iter()
            .map(|(n, p)| format!("node {n}: {} MiB", (p * PAGE_BYTES as u64) >> 20))
            .collect();
        let _ = writeln!(
            out,
            "guest memory   {}",
            if memory.is_empty() {
                "node unknown".to_string()
            } else {
                memory.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "NIC            {}",
            match (&self.nic, self.nic_node) {
                (Some(n), Some(node)) => format!("{n} on node {node}"),
                (Some(n), None) => format!("{n} (node unknown)"),
                _ => "unknown".into(),
            }
        );
        for s in &self.shards {
            let core = s.core.map_or("-".into(), |c| c.to_string());
            let node = s.node.map_or("-".into(), |n| n.to_string());
            let _ = writeln!(
                out,
                "channel {:>3}  core {core:>4}  node {node:>3}",
                s.channel
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

/// Plans `input.channels` shards on `topology`.
///
/// Each node with usable cores (allowed cores in it) gets a target share of the channels in
/// proportion to the guest memory it holds; memory on nodes without usable cores counts for the
/// NIC's node (else the node with the most usable cores). With no known memory location the
/// NIC's node is the target; with no NIC either, nodes weigh by their usable cores. Shards are
/// then dealt one at a time to the node furthest below its target that still has a free core
/// (ties: the NIC's node, then the lowest number); once every usable core has a shard, cores are
/// shared in the same order. Within a node, cores are taken in `input.cores` order.
pub fn plan(topology: &Topology, input: &PlanInput) -> Plan {
    let nic_node = input.nic.as_deref().and_then(|n| topology.nic_node(n));
    let mut notes = Vec::new();
    let done = |shards, notes| Plan {
        shards,
        nic: input.nic.clone(),
        nic_node,
        memory_pages_by_node: input.memory_pages_by_node.clone(),
        topology: topology.source,
        notes,
    };
    let n = usize::from(input.channels);
    if input.cores.is_empty() {
        notes.push("no cores to pin to: the scheduler places shards".into());
        let shards = (0..n)
            .map(|i| ShardPlace {
                channel: i as u16,
                core: None,
                node: None,
            })
            .collect();
        return done(shards, notes);
    }
    let usable = node_groups(topology, &input.cores);
    let groups: Vec<Option<u32>> = usable.keys().copied().collect();
    let mut weight: BTreeMap<Option<u32>, f64> = groups.iter().map(|&g| (g, 0.0)).collect();
    let fallback = nic_node
        .filter(|n| usable.contains_key(&Some(*n)))
        .map(Some)
        .unwrap_or_else(|| {
            *groups
                .iter()
                .max_by_key(|g| (usable[g].len(), std::cmp::Reverse(**g)))
                .expect("at least one core")
        });
    for (&node, &pages) in &input.memory_pages_by_node {
        match weight.get_mut(&Some(node)) {
            Some(w) => *w += pages as f64,
            None => {
                *weight.get_mut(&fallback).expect("fallback is a group") += pages as f64;
                notes.push(format!(
                    "node {node} holds guest memory but no allowed core: its pages go to shards elsewhere"
                ));
            }
        }
    }
    if weight.values().all(|&w| w == 0.0) {
        match nic_node.filter(|n| usable.contains_key(&Some(*n))) {
            Some(nn) => {
                *weight.get_mut(&Some(nn)).expect("usable") = 1.0;
                notes.push(format!(
                    "guest memory's node unknown: shards start on the NIC's node {nn}"
                ));
            }
            None => {
                for (g, w) in weight.iter_mut() {
                    *w = usable[g].len() as f64;
                }
            }
        }
    }
    let total: f64 = weight.values().sum();
    let target: BTreeMap<Option<u32>, f64> = weight
        .iter()
        .map(|(&g, &w)| (g, n as f64 * w / total))
        .collect();
    let free_cores: usize = usable.values().map(Vec::len).sum();
    if n > free_cores {
        notes.push(format!(
            "{n} channels on {free_cores} allowed core(s): some cores run two shards"
        ));
    }
    let mut assigned: BTreeMap<Option<u32>, usize> = groups.iter().map(|&g| (g, 0)).collect();
    let mut shards = Vec::with_capacity(n);
    for i in 0..n {
        let all_full = groups.iter().all(|g| assigned[g] >= usable[g].len());
        let pick = *groups
            .iter()
            .filter(|g| all_full || assigned[g] < usable[g].len())
            .max_by(|a, b| {
                let deficit = |g: &Option<u32>| {
                    // Once every core has a shard, share cores evenly: fewest shards per
                    // core first.
                    if all_full {
                        -(assigned[g] as f64 / usable[g].len() as f64)
                    } else {
                        target[g] - assigned[g] as f64
                    }
                };
                deficit(a)
                    .total_cmp(&deficit(b))
                    .then_with(|| {
                        (**a == nic_node && nic_node.is_some())
                            .cmp(&(**b == nic_node && nic_node.is_some()))
                    })
                    .then_with(|| b.cmp(a))
            })
            .expect("at least one group");
        let cores = &usable[&pick];
        let core = cores[assigned[&pick] % cores.len()];
        *assigned.get_mut(&pick).expect("group") += 1;
        shards.push(ShardPlace {
            channel: i as u16,
            core: Some(core),
            node: pick,
        });
    }
    done(shards, notes)
}

/// `cores` by node, in the caller's order; cores in no known node form their own group. The
/// groups [`plan`] places shards in, and a spread shard's cores ([`Pinning::Nodes`](crate::Pinning::Nodes)).
fn node_groups(topology: &Topology, cores: &[usize]) -> BTreeMap<Option<u32>, Vec<usize>> {
    let mut groups: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
    for &c in cores {
        groups.entry(topology.node_of_cpu(c)).or_default().push(c);
    }
    groups
}

/// The cores shards may be pinned to, in the order [`plan`] takes them: `wanted` (each must be
/// a core this process may run on) or every allowed core, reversed for
/// [`Pinning::CoresReversed`](crate::Pinning::CoresReversed), none for
/// [`Pinning::None`](crate::Pinning::None).
pub fn pin_order(wanted: Option<&[usize]>, pinning: crate::Pinning) -> crate::Result<Vec<usize>> {
    let allowed: Vec<usize> = crate::shard::allowed_cores().iter().map(|c| c.id).collect();
    let mut cores = match wanted {
        Some([]) => return Err(crate::Error::Config("the core list is empty".into())),
        Some(list) => {
            if let Some(c) = list
                .iter()
                .find(|c| !allowed.is_empty() && !allowed.contains(c))
            {
                return Err(crate::Error::Config(format!(
                    "core {c} is not one this process may run on (allowed: {})",
                    cpu_list_text(&allowed)
                )));
            }
            // A preference order, not sorted: the first mention of a core counts.
            let mut seen = std::collections::HashSet::new();
            list.iter().copied().filter(|c| seen.insert(*c)).collect()
        }
        None => allowed,
    };
    match pinning {
        crate::Pinning::Cores | crate::Pinning::Nodes => {}
        crate::Pinning::CoresReversed => cores.reverse(),
        crate::Pinning::None => cores.clear(),
    }
    Ok(cores)
}

/// A plan for this machine, and the routing of chunks by node that a sender follows.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// The plan the shards are pinned by.
    pub(crate) plan: Plan,
    nodes: MemoryNodes,
    /// Channels per node, when more than one node has shards (else chunks are not routed).
    by_node: BTreeMap<u32, Vec<usize>>,
    /// Per channel, the cores of the pin set in the node group of its planned core (for
    /// [`Pinning::Nodes`](crate::Pinning::Nodes)); empty for an unpinned shard.
    node_cores: Vec<Vec<usize>>,
}

impl Placement {
    /// Reads this machine's topology, asks which node holds `memory` (only where there is more
    /// than one node), and plans `channels` shards on `cores` (see [`pin_order`]).
    /// `touch`: map one page per sample first where it is in memory (a source mapped but not
    /// read yet, such as a RAM image file); never for a destination, whose untouched pages have
    /// no node yet (unless a memory policy binds them to one).
    pub(crate) fn here(
        channels: u16,
        cores: Vec<usize>,
        memory: &GuestMemory,
        nic: Option<String>,
        touch: bool,
    ) -> Placement {
        let topology = Topology::detect();
        let nodes = match topology.nodes.as_slice() {
            [one] => MemoryNodes::uniform(memory, Some(one.id)),
            _ => MemoryNodes::query(memory, touch),
        };
        Self::new(&topology, nodes, channels, cores, nic)
    }

    /// Plans on `topology` for memory laid out as `nodes`.
    pub(crate) fn new(
        topology: &Topology,
        nodes: MemoryNodes,
        channels: u16,
        cores: Vec<usize>,
        nic: Option<String>,
    ) -> Placement {
        let groups = node_groups(topology, &cores);
        let plan = plan(
            topology,
            &PlanInput {
                channels,
                cores,
                memory_pages_by_node: nodes.pages_by_node(),
                nic,
            },
        );
        let node_cores = plan
            .shards
            .iter()
            .map(|s| match s.core {
                Some(c) => groups
                    .get(&topology.node_of_cpu(c))
                    .cloned()
                    .unwrap_or_else(|| vec![c]),
                None => Vec::new(),
            })
            .collect();
        let mut placement = Self::following(plan, nodes);
        placement.node_cores = node_cores;
        placement
    }

    /// Says in the plan's notes how `pinning` follows it, where the cores it lists are not
    /// simply where shards run.
    pub(crate) fn note_pinning(&mut self, pinning: crate::Pinning) {
        if pinning == crate::Pinning::Nodes && self.plan.shards.iter().any(|s| s.core.is_some()) {
            self.plan.notes.push(
                "each shard may run on every core of its node's group above (Pinning::Nodes): the core it lists is the one the plan counted"
                    .into(),
            );
        }
    }

    /// The cores shard `channel` may run on under [`Pinning::Nodes`](crate::Pinning::Nodes):
    /// every core of the pin set in its planned core's node (empty: unpinned).
    pub(crate) fn node_cores(&self, channel: usize) -> &[usize] {
        self.node_cores.get(channel).map_or(&[], Vec::as_slice)
    }

    /// A placement on `nodes` synthetic NUMA nodes (see `SenderConfig::fault_nodes`):
    /// channel `i` of `channels` on node `i * nodes / channels`, unpinned; region `r` on node
    /// `r % nodes` (a VMM's guest RAM in one region per node, as QEMU's NUMA memory backends
    /// lay it out).
    #[cfg(feature = "faults")]
    pub(crate) fn synthetic(channels: u16, memory: &GuestMemory, nodes: u32) -> Placement {
        let nodes = nodes.clamp(1, u32::from(channels.max(1)));
        let shards = (0..channels)
            .map(|channel| ShardPlace {
                channel,
                core: None,
                node: Some(u32::from(channel) * nodes / u32::from(channels)),
            })
            .collect();
        let spans = memory
            .regions()
            .iter()
            .enumerate()
            .map(|(region, r)| NodeSpan {
                region: region as u32,
                first_page: 0,
                pages: r.pages(),
                node: Some(region as u32 % nodes),
            })
            .collect();
        let memory_nodes = MemoryNodes { spans };
        let plan = Plan {
            shards,
            nic: None,
            nic_node: None,
            memory_pages_by_node: memory_nodes.pages_by_node(),
            topology: TopologySource::Assumed,
            notes: vec![format!(
                "{nodes} synthetic nodes, shards unpinned (SenderConfig::fault_nodes, a test)"
            )],
        };
        Self::following(plan, memory_nodes)
    }

    /// The routing that follows `plan` for memory laid out as `nodes`.
    fn following(plan: Plan, nodes: MemoryNodes) -> Placement {
        let by_node = plan.channels_by_node();
        let by_node = if by_node.len() > 1 {
            by_node
        } else {
            BTreeMap::new()
        };
        Placement {
            plan,
            nodes,
            by_node,
            node_cores: Vec::new(),
        }
    }

    /// The sender's work pools: each shard pulls the chunks of its pool from one queue, so the
    /// shard that moves fastest takes the most. One pool per node with shards when chunks are
    /// routed by node (in node order, then one for the shards of no known node, if any); else
    /// one pool of all `channels` shards.
    pub(crate) fn pools(&self, channels: usize) -> Vec<Vec<usize>> {
        if self.by_node.is_empty() {
            return vec![(0..channels).collect()];
        }
        let mut pools: Vec<Vec<usize>> = self.by_node.values().cloned().collect();
        let placed: Vec<usize> = pools.iter().flatten().copied().collect();
        let rest: Vec<usize> = (0..channels).filter(|c| !placed.contains(c)).collect();
        if !rest.is_empty() {
            pools.push(rest);
        }
        pools
    }

    /// The pool (an index into [`pools`](Self::pools)) whose shards should send the chunk
    /// whose first page is `page` of `region`: the pool of the node that holds it. `None` when
    /// chunks are not routed (one node with shards) or the page's node has no shards: any pool
    /// will do.
    pub(crate) fn pool_for(&self, region: u32, page: u64) -> Option<usize> {
        if self.by_node.is_empty() {
            return None;
        }
        let node = self.nodes.node_of(region, page)?;
        self.by_node.keys().position(|&n| n == node)
    }
}

#[cfg(test)]
mod tests;
