//! The matrix's report: the Markdown tables printed and written to `report.md`, the SVG plots,
//! `results.json` and `results.csv`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::{Cell, OnOff, Results};
use crate::measure::ReceiverPlacement;

pub(super) fn markdown(r: &Results) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# pagewire matrix\n\nmachine: {}\n\n{} MiB per cell, {} interleaved repetitions; throughput is guest memory end to end, median [min..max].\n\n",
        r.machine,
        r.size_bytes >> 20,
        r.reps
    ));
    if r.cells.iter().any(|c| c.qemu.is_some()) {
        s.push_str(&format!(
            "Not alike between the engines: pagewire's shards (and raw TCP's threads) {}, while QEMU's threads are left to the scheduler (QEMU cannot pin its multifd threads); QEMU's time and CPU are its own `total-time` on the source and its processes until the destination has loaded, pagewire's run from connect until the receiver confirmed every page, verified.\n\n",
            match (r.pinned, r.receiver_placement) {
                (false, _) => "were not pinned (`--no-pin`)",
                (true, ReceiverPlacement::Free) => "were placed as pagewire places its shards by default: senders one core each, receivers by the scheduler within their node's cores (`--no-pin` leaves them all to the scheduler)",
                (true, ReceiverPlacement::WithSender) => "were pinned one core each, each stream's receiver on its sender's core (`--receiver-placement with-sender`)",
                (true, ReceiverPlacement::Crossed) => "were pinned one core each, each stream's receiver on another core than its sender's (`--receiver-placement crossed`)",
            }
        ));
    }
    let c = &r.ceilings;
    s.push_str("| ceiling (one core unless said) | GiB/s |\n|---|---|\n");
    for (k, v) in [
        ("DRAM read scan", c.dram_read_scan_gib_s),
        ("memcpy", c.memcpy_gib_s),
        ("AEAD seal, in cache", c.aead_seal_in_cache_gib_s),
        ("pagewire copy + seal", c.pagewire_seal_gib_s),
        (
            &format!("memcpy, all {} cores at once", c.memcpy_all_cores_gib_s.0),
            c.memcpy_all_cores_gib_s.1,
        ),
        ("rustls encrypt", c.rustls_encrypt_gib_s),
        ("zstd level 1, text", c.zstd1_text_gib_s),
        ("zstd level 1, text, decoding", c.zstd1_text_decode_gib_s),
    ] {
        s.push_str(&format!("| {k} | {v:.2} |\n"));
    }
    s.push_str("\n| content | channels | tls | compress | zero-copy | page checksums | pagewire GiB/s | raw TCP GiB/s | pagewire/raw | send/recv CPU-s per GiB | wire MiB | kernel copied ZC | QEMU GiB/s | QEMU src/dst CPU-s per GiB | pagewire/QEMU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for cell in &r.cells {
        s.push_str(&format!(
            "| {} | {} | {:?} | {} | {} | {} | {:.2} [{:.2}..{:.2}] | {:.2} | {:.2} | {:.3}/{:.3} | {:.1} | {} | {} | {} | {} |\n",
            cell.content,
            cell.channels,
            cell.tls,
            cell.compress,
            cell.zero_copy,
            checksums(cell),
            cell.pagewire.gib_per_s_median,
            cell.pagewire.gib_per_s_min,
            cell.pagewire.gib_per_s_max,
            cell.raw_tcp_gib_per_s,
            cell.pagewire_over_raw_tcp,
            cell.pagewire.sender_cpu_s_per_gib,
            cell.pagewire.receiver_cpu_s_per_gib,
            cell.wire_bytes as f64 / (1 << 20) as f64,
            match cell.zero_copy_copied_by_kernel {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            },
            cell.qemu.as_ref().map_or("-".into(), |q| format!(
                "{:.2} [{:.2}..{:.2}]",
                q.summary.gib_per_s_median, q.summary.gib_per_s_min, q.summary.gib_per_s_max
            )),
            cell.qemu.as_ref().map_or("-".into(), |q| format!(
                "{:.3}/{:.3}",
                q.summary.sender_cpu_s_per_gib, q.summary.receiver_cpu_s_per_gib
            )),
            cell.pagewire_over_qemu.map_or("-".into(), |r| format!("**{r:.2}**")),
        ));
    }
    if r.cells.iter().any(|c| c.pagewire_files.is_some()) {
        s.push_str("
RAM file to RAM file on the huge-page tmpfs QEMU's cells use (pagewire: QEMU's source file to a fresh destination file, end to end):

| content | channels | tls | compress | page checksums | pagewire files GiB/s | pagewire in memory GiB/s | files/in memory | QEMU GiB/s | files/QEMU |
|---|---|---|---|---|---|---|---|---|---|
");
        for cell in &r.cells {
            let (Some(f), Some(q)) = (&cell.pagewire_files, &cell.qemu) else {
                continue;
            };
            s.push_str(&format!(
                "| {} | {} | {:?} | {} | {} | {:.2} [{:.2}..{:.2}] | {:.2} | {:.2} | {:.2} | **{:.2}** |\n",
                cell.content,
                cell.channels,
                cell.tls,
                cell.compress,
                checksums(cell),
                f.gib_per_s_median,
                f.gib_per_s_min,
                f.gib_per_s_max,
                cell.pagewire.gib_per_s_median,
                cell.files_over_memory.unwrap_or(0.0),
                q.summary.gib_per_s_median,
                cell.files_over_qemu.unwrap_or(0.0),
            ));
        }
    }
    s
}

/// The three plots: throughput, CPU per GiB, and the ratio to raw TCP, by channel count, one
/// line per combination of the other axes.
fn plots(r: &Results) -> Vec<(&'static str, String)> {
    use crate::svg::{line_chart, Series};
    let mut keys: Vec<String> = Vec::new();
    for c in &r.cells {
        let k = key(c);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let series = |f: &dyn Fn(&Cell) -> f64| -> Vec<Series> {
        keys.iter()
            .map(|k| Series {
                label: k.clone(),
                points: r
                    .cells
                    .iter()
                    .filter(|c| &key(c) == k)
                    .map(|c| (f64::from(c.channels), f(c)))
                    .collect(),
                dashed: false,
            })
            .collect()
    };
    let mut throughput = series(&|c| c.pagewire.gib_per_s_median);
    throughput.push(Series {
        label: "raw TCP (ceiling)".into(),
        points: r
            .ceilings
            .raw_tcp_gib_s_by_channels
            .iter()
            .map(|&(ch, v)| (f64::from(ch), v))
            .collect(),
        dashed: true,
    });
    vec![
        (
            "throughput.svg",
            line_chart(
                "pagewire throughput (median)",
                "channels",
                "GiB/s of guest memory",
                &throughput,
            ),
        ),
        (
            "cpu.svg",
            line_chart(
                "CPU per GiB, sender + receiver",
                "channels",
                "CPU-s/GiB",
                &series(&|c| c.pagewire.sender_cpu_s_per_gib + c.pagewire.receiver_cpu_s_per_gib),
            ),
        ),
        (
            "ratio.svg",
            line_chart(
                "pagewire / raw TCP, same streams",
                "channels",
                "ratio",
                &series(&|c| c.pagewire_over_raw_tcp),
            ),
        ),
    ]
}

fn key(c: &Cell) -> String {
    format!(
        "{} tls={:?} {} zc={}{}",
        c.content,
        c.tls,
        c.compress,
        c.zero_copy,
        if c.page_checksums == OnOff::Off {
            " unchecked"
        } else {
            ""
        }
    )
}

/// A cell's page checksums as the table shows them: TLS cells are checked by their AEAD.
fn checksums(c: &Cell) -> &'static str {
    match (c.tls, c.page_checksums) {
        (OnOff::On, _) => "AEAD",
        (OnOff::Off, OnOff::On) => "on",
        (OnOff::Off, OnOff::Off) => "off",
    }
}

pub(super) fn write_results(dir: &Path, r: &Results) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, svg) in plots(r) {
        std::fs::write(dir.join(name), svg)?;
    }
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    let mut csv = std::fs::File::create(dir.join("results.csv"))?;
    writeln!(
        csv,
        "content,channels,tls,compress,zero_copy,page_checksums,gib_per_s_median,gib_per_s_min,gib_per_s_max,raw_tcp_gib_per_s,pagewire_over_raw_tcp,sender_cpu_s_per_gib,receiver_cpu_s_per_gib,wire_bytes"
    )?;
    for c in &r.cells {
        writeln!(
            csv,
            "{},{},{:?},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{}",
            c.content,
            c.channels,
            c.tls,
            c.compress,
            c.zero_copy,
            checksums(c),
            c.pagewire.gib_per_s_median,
            c.pagewire.gib_per_s_min,
            c.pagewire.gib_per_s_max,
            c.raw_tcp_gib_per_s,
            c.pagewire_over_raw_tcp,
            c.pagewire.sender_cpu_s_per_gib,
            c.pagewire.receiver_cpu_s_per_gib,
            c.wire_bytes
        )?;
    }
    Ok(())
}
