//! `pagewire-tune plan`: the shard placement pagewire would use, printed before a migration
//! (or for another machine, from its hwloc XML file or a copy of its sysfs).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use pagewire::placement::{self, MemoryNodes, PlanInput, Topology};

/// What to plan.
#[derive(Args)]
pub struct PlanArgs {
    /// Channels (shards) to place.
    #[arg(long, default_value_t = 2)]
    channels: u16,
    /// Cores shards may use, e.g. 0-3,8 (default: every core this process may run on, or
    /// every CPU of a --topology / --sysfs machine).
    #[arg(long)]
    cores: Option<String>,
    /// A RAM image (or any file) whose pages' NUMA nodes weigh the plan, as `send --from` does.
    #[arg(long, conflicts_with = "memory")]
    from: Option<PathBuf>,
    /// Guest memory per node, for a what-if plan: NODE:SIZE,... e.g. 0:48GiB,1:16GiB.
    #[arg(long)]
    memory: Option<String>,
    /// The receiver (HOST:PORT): the NIC on the route to it weighs the plan.
    #[arg(long)]
    peer: Option<String>,
    /// The NIC by name (instead of the route to --peer), e.g. for another machine's topology.
    #[arg(long, conflicts_with = "peer")]
    nic: Option<String>,
    /// Plan for the machine in this hwloc XML file (`lstopo --of xml`; needs the hwloc
    /// feature).
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Plan for the machine whose sysfs is copied under this directory (its
    /// devices/system/node and class/net).
    #[arg(long, conflicts_with = "topology")]
    sysfs: Option<PathBuf>,
}

/// Prints the plan (text, or JSON with the topology).
pub fn run(a: PlanArgs, json: bool) -> Result<()> {
    if a.channels == 0 || usize::from(a.channels) > pagewire::limits::CHANNELS_MAX {
        bail!(
            "--channels must be between 1 and {}",
            pagewire::limits::CHANNELS_MAX
        );
    }
    let here = a.topology.is_none() && a.sysfs.is_none();
    let topology = match (&a.topology, &a.sysfs) {
        (Some(xml), _) => from_xml(xml)?,
        (None, Some(dir)) => Topology::from_sysfs(dir)
            .with_context(|| format!("reading a sysfs copy under {}", dir.display()))?,
        (None, None) => Topology::detect(),
    };
    let wanted = match &a.cores {
        Some(list) => Some(
            placement::parse_cpu_list(list)
                .filter(|l| !l.is_empty())
                .with_context(|| format!("--cores {list:?} is not a core list like 0-3,8"))?,
        ),
        None => None,
    };
    let cores = if here {
        placement::pin_order(wanted.as_deref(), pagewire::Pinning::Cores)?
    } else {
        wanted.unwrap_or_else(|| topology.nodes.iter().flat_map(|n| n.cpus.clone()).collect())
    };
    let memory_pages_by_node = match (&a.from, &a.memory) {
        (Some(path), _) => {
            if !here {
                bail!("--from reads this machine's memory: give --memory for another machine");
            }
            let image = pagewire::GuestMemory::from_file(path, false)
                .with_context(|| format!("mapping {}", path.display()))?;
            MemoryNodes::query(&image, true).pages_by_node()
        }
        (None, Some(text)) => memory_by_node(text)?,
        (None, None) => BTreeMap::new(),
    };
    let nic = match (&a.nic, &a.peer) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(peer)) => {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(peer.as_str())
                .with_context(|| format!("resolving --peer {peer}"))?
                .next()
                .with_context(|| format!("--peer {peer} resolves to no address"))?;
            placement::interface_to(addr)
        }
        (None, None) => None,
    };
    let plan = placement::plan(
        &topology,
        &PlanInput {
            channels: a.channels,
            cores,
            memory_pages_by_node,
            nic,
        },
    );
    if json {
        println!(
            "{}",
            serde_json::json!({ "topology": topology, "plan": plan })
        );
    } else {
        for n in &topology.nodes {
            println!(
                "node {:>2}  cpus {}",
                n.id,
                placement::cpu_list_text(&n.cpus)
            );
        }
        print!("{}", plan.render());
    }
    Ok(())
}

#[cfg(feature = "hwloc")]
fn from_xml(path: &std::path::Path) -> Result<Topology> {
    Ok(Topology::from_hwloc_xml(path)?)
}

#[cfg(not(feature = "hwloc"))]
fn from_xml(_: &std::path::Path) -> Result<Topology> {
    bail!(
        "this pagewire-tune was built without hwloc: rebuild with `--features hwloc` \
         (needs libhwloc-dev), or give a copy of the machine's sysfs with --sysfs"
    )
}

/// `0:48GiB,1:16GiB` as pages per node.
fn memory_by_node(text: &str) -> Result<BTreeMap<u32, u64>> {
    let mut out = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (node, size) = part
            .split_once(':')
            .with_context(|| format!("--memory {part:?}: expected NODE:SIZE"))?;
        let node: u32 = node
            .trim()
            .parse()
            .with_context(|| format!("--memory {part:?}: {node:?} is not a node number"))?;
        let bytes = pagewire::units::parse_size(size.trim())
            .map_err(|e| anyhow::anyhow!("--memory {part:?}: {e}"))?;
        *out.entry(node).or_insert(0) += bytes / pagewire::limits::PAGE_BYTES as u64;
    }
    Ok(out)
}
