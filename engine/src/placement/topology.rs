//! The machine's NUMA topology, as pagewire uses it: nodes with their CPUs and NICs with their
//! nodes, from hwloc (`hwloc` feature), from sysfs, or assumed (one node); the kernel's CPU list
//! syntax; and the interface that leads to a peer.

use std::path::Path;

use serde::Serialize;

#[cfg(feature = "hwloc")]
use super::hwloc;

/// One NUMA node: its number and the CPUs (logical cores) it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The operating system's node number.
    pub id: u32,
    /// The node's CPUs, ascending.
    pub cpus: Vec<usize>,
}

/// A network interface and the NUMA node its device sits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    /// Interface name (`eth0`), as routes and `ip link` name it.
    pub name: String,
    /// The node of its PCI device; `None` for virtual interfaces or when the firmware does not say.
    pub node: Option<u32>,
    /// Link speed in Mbit/s (`class/net/IF/speed`); `None` when the driver reports none
    /// (virtual NICs) or the topology describes another machine.
    pub speed_mbit: Option<u64>,
}

/// Where the topology was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologySource {
    /// hwloc (the `hwloc` feature), from this machine or an XML file.
    Hwloc,
    /// `/sys/devices/system/node` and `/sys/class/net` (or a copy of them).
    Sysfs,
    /// Nothing could be read: one node holding every allowed core.
    Assumed,
}

/// The machine's NUMA nodes and NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Nodes by ascending number; at least one.
    pub nodes: Vec<Node>,
    /// Network interfaces (loopback excluded), by name.
    pub nics: Vec<Nic>,
    /// Where this was read from.
    pub source: TopologySource,
}

impl Topology {
    /// This machine's topology: hwloc's where the `hwloc` feature is on and hwloc loads, else
    /// sysfs, else one assumed node holding every allowed core.
    pub fn detect() -> Topology {
        #[cfg(feature = "hwloc")]
        match hwloc::this_machine() {
            Ok(t) => return t,
            Err(e) => tracing::debug!("hwloc topology unavailable ({e}); reading sysfs"),
        }
        Self::from_sysfs(Path::new("/sys")).unwrap_or_else(|_| Self::assumed())
    }

    /// The topology described by a hwloc XML file (`lstopo --of xml`, `hwloc-gather-topology`):
    /// plans for another machine, and tests on synthetic ones.
    #[cfg(feature = "hwloc")]
    pub fn from_hwloc_xml(path: &Path) -> crate::Result<Topology> {
        hwloc::from_xml_file(path)
    }

    /// Reads a sysfs tree rooted at `root` (`/sys`, or a copy made for a test): nodes from
    /// `devices/system/node/node*/cpulist`, NICs from `class/net/*/device/numa_node`. An error
    /// when there is no node directory (a kernel without NUMA support).
    pub fn from_sysfs(root: &Path) -> std::io::Result<Topology> {
        let mut nodes = Vec::new();
        for entry in std::fs::read_dir(root.join("devices/system/node"))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_prefix("node").and_then(|n| n.parse().ok()) else {
                continue;
            };
            let list = std::fs::read_to_string(entry.path().join("cpulist")).unwrap_or_default();
            let cpus = parse_cpu_list(list.trim()).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: bad cpulist {list:?}", entry.path().display()),
                )
            })?;
            nodes.push(Node { id, cpus });
        }
        if nodes.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no NUMA node in sysfs",
            ));
        }
        nodes.sort_by_key(|n| n.id);
        let mut nics = Vec::new();
        for entry in std::fs::read_dir(root.join("class/net"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                continue;
            }
            // -1 (no affinity) and unreadable files both mean "unknown".
            let node = std::fs::read_to_string(entry.path().join("device/numa_node"))
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .and_then(|n| u32::try_from(n).ok());
            let speed_mbit = nic_speed_mbit(root, &name);
            nics.push(Nic {
                name,
                node,
                speed_mbit,
            });
        }
        nics.sort_by(|a, b| a.name.cmp(&b.name));
        // A bond, VLAN or bridge has no device of its own: it sits where its lower devices do
        // (when they agree). Migration traffic usually leaves through one of these.
        let own: Vec<Option<u32>> = nics.iter().map(|n| n.node).collect();
        for i in 0..nics.len() {
            if own[i].is_none() {
                nics[i].node = stacked_node(root, &nics, &own, &nics[i].name, 0);
            }
        }
        Ok(Topology {
            nodes,
            nics,
            source: TopologySource::Sysfs,
        })
    }

    /// One node holding every core this process may run on.
    pub fn assumed() -> Topology {
        Topology {
            nodes: vec![Node {
                id: 0,
                cpus: crate::shard::allowed_cores().iter().map(|c| c.id).collect(),
            }],
            nics: Vec::new(),
            source: TopologySource::Assumed,
        }
    }

    /// The node that holds `cpu`.
    pub fn node_of_cpu(&self, cpu: usize) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(&cpu))
            .map(|n| n.id)
    }

    /// The node of the NIC named `name`, when known.
    pub fn nic_node(&self, name: &str) -> Option<u32> {
        self.nics.iter().find(|n| n.name == name)?.node
    }
}

/// Levels of stacked interfaces (a VLAN on a bond on ports) followed to a device.
const NIC_STACK_DEPTH_MAX: u32 = 4;

/// The node of a stacked interface `name` (bond, VLAN, macvlan: `lower_*` links; bridge:
/// `brif/*` ports): its lower devices' node when those that have one agree, else `None`.
/// `own` holds each of `nics`' own device node.
fn stacked_node(
    root: &std::path::Path,
    nics: &[Nic],
    own: &[Option<u32>],
    name: &str,
    depth: u32,
) -> Option<u32> {
    if depth > NIC_STACK_DEPTH_MAX {
        return None;
    }
    let dir = root.join("class/net").join(name);
    let mut lowers: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("lower_").map(str::to_string)
        })
        .collect();
    lowers.extend(
        std::fs::read_dir(dir.join("brif"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned()),
    );
    let mut node = None;
    for lower in lowers {
        let n = match nics.iter().position(|n| n.name == lower) {
            Some(i) if own[i].is_some() => own[i],
            _ => stacked_node(root, nics, own, &lower, depth + 1),
        };
        match (node, n) {
            (_, None) => {}
            (None, Some(n)) => node = Some(n),
            (Some(a), Some(b)) if a != b => return None,
            _ => {}
        }
    }
    node
}

/// The link speed of interface `name` in the sysfs tree at `root`, in Mbit/s (`None` when the
/// driver reports none: `-1`, or no file).
pub(crate) fn nic_speed_mbit(root: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(root.join("class/net").join(name).join("speed"))
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()
        .and_then(|s| u64::try_from(s).ok())
        .filter(|&s| s > 0)
}

/// Parses a kernel CPU list (`0-3,8,10-11`; empty is no CPU). `None` when malformed.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b - a >= crate::limits::CPUS_MAX {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// The interface traffic to `peer` leaves through, by the routing table: a UDP socket is
/// connected to it (which sends nothing) and its local address looked up.
pub fn interface_to(peer: std::net::SocketAddr) -> Option<String> {
    let any: std::net::SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    crate::sys::interface_with_address(socket.local_addr().ok()?.ip())
}

/// Writes CPUs as the kernel does (`0-3,8`).
pub fn cpu_list_text(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            sorted[i].to_string()
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    parts.join(",")
}
