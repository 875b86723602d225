//! The topology from hwloc (`hwloc` feature): this machine's, or one described by an XML file.
//!
//! hwloc knows more than sysfs (NUMA nodes inside a package, PCI locality of NICs through
//! bridges); pagewire takes from it exactly what [`Topology`] holds, so plans do not depend on
//! where the topology came from.

use std::path::Path;

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::topology::builder::{TopologyBuilder, TypeFilter};

use super::{Nic, Node, Topology, TopologySource};
use crate::{Error, Result};

fn err(what: impl std::fmt::Display) -> Error {
    Error::Topology(format!("hwloc: {what}"))
}

/// This machine, as hwloc sees it (link speeds from its sysfs, which hwloc does not read).
pub(super) fn this_machine() -> Result<Topology> {
    let mut t = build(hwlocality::Topology::builder())?;
    for nic in &mut t.nics {
        nic.speed_mbit = super::nic_speed_mbit(Path::new("/sys"), &nic.name);
    }
    Ok(t)
}

/// The machine an XML file describes.
pub(super) fn from_xml_file(path: &Path) -> Result<Topology> {
    // Read the file here: hwlocality treats any failure but EINVAL from hwloc's own file
    // reading as unreachable (a missing file would panic), while a string can only be invalid.
    let xml = std::fs::read_to_string(path)
        .map_err(|e| Error::Topology(format!("{}: {e}", path.display())))?;
    let builder = hwlocality::Topology::builder()
        .from_xml(&xml)
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    build(builder)
}

fn build(builder: TopologyBuilder) -> Result<Topology> {
    let topology = builder
        .with_type_filter(ObjectType::OSDevice, TypeFilter::KeepImportant)
        .map_err(err)?
        .with_type_filter(ObjectType::PCIDevice, TypeFilter::KeepImportant)
        .map_err(err)?
        .build()
        .map_err(err)?;
    let mut nodes: Vec<Node> = topology
        .objects_with_type(ObjectType::NUMANode)
        .filter_map(|o| {
            let id = u32::try_from(o.os_index()?).ok()?;
            let cpus = o
                .cpuset()
                .map(|set| set.iter_set().map(usize::from).collect())
                .unwrap_or_default();
            Some(Node { id, cpus })
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    if nodes.is_empty() {
        return Err(err("no NUMA node in the topology"));
    }
    let mut nics: Vec<Nic> = topology
        .objects_with_type(ObjectType::OSDevice)
        .filter(|o| {
            matches!(o.attributes(), Some(ObjectAttributes::OSDevice(a))
                if a.device_type() == OSDeviceType::Network)
        })
        .filter_map(|o| {
            let name = o.name()?.to_string_lossy().into_owned();
            // The device's locality is its first non-I/O ancestor; a NIC is "on" a node only
            // when that ancestor spans exactly one.
            let nodeset = o.first_non_io_ancestor()?.nodeset()?;
            let node = match nodeset.weight() {
                Some(1) => nodeset
                    .first_set()
                    .and_then(|n| u32::try_from(usize::from(n)).ok()),
                _ => None,
            };
            Some(Nic {
                name,
                node,
                speed_mbit: None,
            })
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Topology {
        nodes,
        nics,
        source: TopologySource::Hwloc,
    })
}
