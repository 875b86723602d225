//! The matrix's cells: their keys (the order every repetition walks), what their repetitions
//! measured, and the row each becomes, with its ratios to raw TCP, QEMU and RAM files.

use pagewire::pipeline::compress::Compression;
use pagewire::ZeroCopy;
use serde::Serialize;

use super::{MatrixArgs, OnOff};
use crate::measure::{summarize, Run, Summary};

/// One cell of the matrix, with its repetitions summarized.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Cell {
    pub(super) content: String,
    pub(super) channels: u16,
    pub(super) tls: OnOff,
    pub(super) compress: Compression,
    pub(super) zero_copy: ZeroCopy,
    /// Page checksums on plaintext channels (TLS cells: on, their AEAD checks every page).
    pub(super) page_checksums: OnOff,
    pub(super) pagewire: Summary,
    pub(super) raw_tcp_gib_per_s: f64,
    pub(super) pagewire_over_raw_tcp: f64,
    pub(super) wire_bytes: u64,
    /// Every zero-copy send was copied by the kernel (loopback, veth: every shard fell back to
    /// plain sends); `None` where no zero-copy send was made (`--zero-copy off`).
    pub(super) zero_copy_copied_by_kernel: Option<bool>,
    /// QEMU multifd on the same memory and settings (`--with-qemu`), its own counters.
    pub(super) qemu: Option<QemuCell>,
    /// pagewire's median throughput over QEMU's.
    pub(super) pagewire_over_qemu: Option<f64>,
    /// pagewire between the RAM files QEMU used (`--with-qemu`): its source file to a fresh
    /// destination file on the same huge-page tmpfs.
    pub(super) pagewire_files: Option<Summary>,
    /// RAM files over QEMU's median throughput.
    pub(super) files_over_qemu: Option<f64>,
    /// RAM files over pagewire's in-memory median throughput on the same content.
    pub(super) files_over_memory: Option<f64>,
}

/// QEMU's side of a cell.
#[derive(Debug, Clone, Serialize)]
pub(super) struct QemuCell {
    pub(super) summary: Summary,
    pub(super) transferred: u64,
    pub(super) duplicate: u64,
    pub(super) normal: u64,
}

/// One cell's axes: content (index into the memories), channels, TLS, compression, zero-copy,
/// page checksums.
pub(super) type CellKey = (usize, u16, OnOff, Compression, ZeroCopy, OnOff);

/// Every cell, in the fixed order each repetition walks through (interleaving): content ×
/// channels × TLS × compression × zero-copy × page checksums, where a TLS cell is one cell
/// whatever the checksum axis says (its AEAD checks every page).
pub(super) fn cell_keys(contents: usize, a: &MatrixArgs) -> Vec<CellKey> {
    let mut cells: Vec<CellKey> = Vec::new();
    for ci in 0..contents {
        for &ch in &a.channels {
            for &t in &a.tls {
                for &comp in &a.compress {
                    for &zc in &a.zero_copy {
                        for &pc in &a.page_checksums {
                            let pc = if t == OnOff::On { OnOff::On } else { pc };
                            if !cells.contains(&(ci, ch, t, comp, zc, pc)) {
                                cells.push((ci, ch, t, comp, zc, pc));
                            }
                        }
                    }
                }
            }
        }
    }
    cells
}

/// For each cell, the cell whose QEMU runs it shows: QEMU (and pagewire between its RAM files)
/// runs once per cell apart from the checksum axis, in the first cell of each such group.
pub(super) fn qemu_owners(cells: &[CellKey]) -> Vec<usize> {
    cells
        .iter()
        .map(|c| {
            cells
                .iter()
                .position(|o| (o.0, o.1, o.2, o.3, o.4) == (c.0, c.1, c.2, c.3, c.4))
                .unwrap_or(0)
        })
        .collect()
}

/// What the repetitions of one cell measured.
#[derive(Default)]
pub(super) struct CellRuns {
    /// pagewire, memory to memory.
    pub(super) pagewire: Vec<Run>,
    /// QEMU multifd on the same memory (with `--with-qemu`).
    pub(super) qemu: Vec<crate::qemu::QemuRun>,
    /// pagewire between the same RAM files as QEMU (with `--with-qemu`).
    pub(super) files: Vec<Run>,
    /// Bytes on the wire in the last pagewire run.
    pub(super) wire_bytes: u64,
    /// Some zero-copy send went out from our pages instead of being copied by the kernel.
    pub(super) sent_zero_copy: bool,
    /// Some zero-copy send was made at all.
    pub(super) tried_zero_copy: bool,
}

impl CellRuns {
    pub(super) fn note(&mut self, run: Run, stats: &pagewire::TransferStats) {
        self.pagewire.push(run);
        self.wire_bytes = stats.transferred_bytes;
        self.sent_zero_copy |= stats.zero_copy.completed != stats.zero_copy.copied;
        self.tried_zero_copy |= stats.zero_copy.completed > 0;
    }
}

/// One cell's row: its medians, and its ratios to raw TCP (`raw_med` GiB/s with the same
/// streams), to QEMU and between RAM files and memory where those ran.
/// `qemu`: QEMU's runs for the cell's settings (measured once per cell apart from the checksum
/// axis).
pub(super) fn cell(
    size: u64,
    content: String,
    key: CellKey,
    m: &CellRuns,
    qemu: &[crate::qemu::QemuRun],
    raw_med: f64,
) -> Cell {
    let (_, ch, t, comp, zc, pc) = key;
    let s = summarize("pagewire", size, &m.pagewire);
    let qemu = qemu.last().map(|last| {
        let as_runs: Vec<Run> = qemu
            .iter()
            .map(|q| Run {
                seconds: q.seconds,
                sender_cpu_s: q.source_cpu_s,
                receiver_cpu_s: q.destination_cpu_s,
            })
            .collect();
        QemuCell {
            summary: summarize("qemu-multifd", size, &as_runs),
            transferred: last.transferred,
            duplicate: last.duplicate,
            normal: last.normal,
        }
    });
    let pagewire_over_qemu = qemu
        .as_ref()
        .map(|q| s.gib_per_s_median / q.summary.gib_per_s_median);
    let files = (!m.files.is_empty()).then(|| summarize("pagewire-ram-files", size, &m.files));
    let files_over_qemu = files
        .as_ref()
        .zip(qemu.as_ref())
        .map(|(f, q)| f.gib_per_s_median / q.summary.gib_per_s_median);
    let files_over_memory = files
        .as_ref()
        .map(|f| f.gib_per_s_median / s.gib_per_s_median);
    Cell {
        qemu,
        pagewire_over_qemu,
        pagewire_files: files,
        files_over_qemu,
        files_over_memory,
        content,
        channels: ch,
        tls: t,
        compress: comp,
        zero_copy: zc,
        page_checksums: pc,
        pagewire_over_raw_tcp: s.gib_per_s_median / raw_med,
        raw_tcp_gib_per_s: raw_med,
        pagewire: s,
        wire_bytes: m.wire_bytes,
        zero_copy_copied_by_kernel: m.tried_zero_copy.then_some(!m.sent_zero_copy),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        matrix: MatrixArgs,
    }

    #[test]
    fn a_tls_cell_is_one_cell_and_shares_its_qemu_runs_across_the_checksum_axis() {
        let cli = Cli::try_parse_from([
            "matrix",
            "--channels",
            "1,2",
            "--tls",
            "off,on",
            "--page-checksums",
            "on,off",
        ])
        .unwrap();
        let cells = cell_keys(2, &cli.matrix);
        // 2 contents × 2 channel counts × (plain checked, plain unchecked, TLS).
        assert_eq!(cells.len(), 2 * 2 * 3);
        assert!(cells.iter().all(|c| c.2 == OnOff::Off || c.5 == OnOff::On));
        let owners = qemu_owners(&cells);
        for (i, c) in cells.iter().enumerate() {
            let o = cells[owners[i]];
            assert!(owners[i] <= i);
            assert_eq!((o.0, o.1, o.2), (c.0, c.1, c.2));
            // An unchecked plaintext cell shows its checked twin's QEMU runs.
            assert_eq!(owners[i] == i, c.5 == OnOff::On, "{i}");
        }
    }
}
