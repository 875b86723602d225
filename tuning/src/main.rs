//! `pagewire-tune`: what pagewire will find on this host. `probe` (the default) reports each
//! fact (kernel, cores, NUMA nodes, io_uring, memlock, huge pages, `MADV_POPULATE_WRITE`, CPU
//! features, kernel TLS, network interfaces, `/dev/kvm`) with what pagewire does about it.
//! `plan` prints the NUMA-aware shard placement pagewire would use (for this machine, or for
//! another from its hwloc XML or sysfs copy). `serve` (destination; or `pagewire-bench serve`)
//! and `sweep` (source) measure channels, zero-copy and compression between two hosts and write the best as a
//! profile for `pagewire send --profile` and the library ([`pagewire::profile`]).

mod plan;
mod probe;
mod sweep;

use clap::{Parser, Subcommand};

/// What pagewire will find on this host.
#[derive(Parser)]
#[command(name = "pagewire-tune", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Print one JSON object: probe `{"findings": [{"name", "value", "pagewire"}]}`, plan
    /// `{"topology", "plan"}`, sweep `{"profile", "best", "cells"}`.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Each fact about this host and what pagewire does about it (the default).
    Probe,
    /// The shard placement pagewire would use: NUMA nodes, guest memory's nodes, the NIC.
    Plan(plan::PlanArgs),
    /// On the destination: receive one sweep transfer after another (for `sweep`).
    Serve(sweep::ServeArgs),
    /// On the source: measure channels, zero-copy and compression against `serve` (or
    /// `pagewire-bench serve`), with interleaved repetitions, and write the best as a profile
    /// (`pagewire send --profile`).
    Sweep(sweep::SweepArgs),
}

fn main() {
    // A closed standard output (`pagewire-tune | head -3`) ends the program quietly.
    // SAFETY: setting a signal disposition has no memory-safety preconditions; no other thread
    // exists yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Probe) {
        Command::Plan(a) => exit_on_error(plan::run(a, cli.json), cli.json),
        Command::Serve(a) => exit_on_error(sweep::serve(a), cli.json),
        Command::Sweep(a) => exit_on_error(sweep::sweep(a, cli.json), cli.json),
        Command::Probe => {
            let findings = probe::probe();
            if cli.json {
                println!("{}", serde_json::json!({ "findings": findings }));
            } else {
                for f in &findings {
                    println!("{:<24} {}", f.name, f.value);
                    println!("{:<24} -> {}", "", f.pagewire);
                }
            }
            if findings.iter().any(|f| f.name == "io_uring") {
                // io_uring is not usable: pagewire cannot run here.
                std::process::exit(1);
            }
        }
    }
}

/// Prints an error as one line (with `json`, also as one JSON object on standard output, as
/// `pagewire` does: `{"error": ..., "cause": ...}`) and exits with status 2.
fn exit_on_error(result: anyhow::Result<()>, json: bool) {
    if let Err(e) = result {
        eprintln!("pagewire-tune: {e:#}");
        if json {
            println!(
                "{}",
                serde_json::json!({ "error": e.to_string(), "cause": format!("{e:#}") })
            );
        }
        std::process::exit(2);
    }
}
