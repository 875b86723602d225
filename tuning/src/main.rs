//! `pagewire-tune`: host probing for pagewire. Today it reports what the engine will find on this
//! host (cores, NUMA nodes, io_uring features, zero-scan unit); sweeps and written tuning
//! profiles come with the NUMA placement and tuning issue.

use clap::Parser;
use pagewire::pipeline::zero::ZeroScanner;

/// What pagewire will find on this host.
#[derive(Parser)]
#[command(name = "pagewire-tune", version, about)]
struct Cli {}

fn numa_nodes() -> usize {
    std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("node") && name[4..].chars().all(|c| c.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0)
        .max(1)
}

fn main() {
    // A closed standard output (`pagewire-tune | head -3`) ends the program quietly.
    // SAFETY: setting a signal disposition has no memory-safety preconditions; no other thread
    // exists yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    Cli::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cores available:   {cores}");
    println!("numa nodes:        {}", numa_nodes());
    println!("zero scan:         {}", ZeroScanner::detect().kind().name());
    match pagewire::probe_uring() {
        Ok(caps) => {
            println!("io_uring:          available");
            println!(
                "  SEND_ZC:         {}",
                if caps.send_zc {
                    "yes"
                } else {
                    "no (plain sends)"
                }
            );
            println!(
                "  DEFER_TASKRUN:   {}",
                if caps.defer_taskrun {
                    "yes"
                } else {
                    "no (older kernel)"
                }
            );
            println!(
                "suggested:         --channels {}",
                cores.min(pagewire::limits::CHANNELS_MAX)
            );
        }
        Err(e) => {
            println!("io_uring:          NOT usable: {e}");
            std::process::exit(1);
        }
    }
}
