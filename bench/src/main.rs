//! hyperfarm-bench: every figure beside its baseline, measured in the same run on this machine.
//!
//! `scripts/bench` builds the release binaries and runs `hyperfarm-bench all`. Sections:
//! `export` (vs cp, cp + b3sum; sparse vs dense), `engines` (agent with qemu-img and with
//! hyper2kvm vs bare qemu-img convert and bare hyper2kvm), `latency` (submit→claim,
//! result→exporter over gRPC and by polling), `scale` (a 10,000-job queue).

#![allow(clippy::unwrap_used)]

mod engines;
mod export;
mod latency;
mod scale;
mod util;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "hyperfarm-bench", about = "hyperfarm benchmarks: figures beside baselines, as ratios")]
struct Cli {
    /// Working directory (its contents are removed)
    #[arg(long, default_value = "target/bench-work")]
    dir: PathBuf,
    /// Smaller inputs and fewer repetitions (CI)
    #[arg(long)]
    quick: bool,
    /// Repetitions of each timed run (median reported)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The hyper2kvm program for the engine comparison [default: target/hyper2kvm-venv/bin/hyper2kvm if present]
    #[arg(long)]
    hyper2kvm: Option<PathBuf>,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Clone, Copy, Subcommand, PartialEq, Eq)]
enum What {
    All,
    Export,
    Engines,
    Latency,
    Scale,
}

fn main() {
    let cli = Cli::parse();
    let ctx = util::Ctx::new(&cli.dir, cli.quick, cli.runs, cli.hyper2kvm.clone());
    util::header(&ctx);
    let mut report = util::Report::default();
    let all = cli.what == What::All;
    if all || cli.what == What::Export {
        export::run(&ctx, &mut report);
    }
    if all || cli.what == What::Engines {
        engines::run(&ctx, &mut report);
    }
    if all || cli.what == What::Latency {
        latency::run(&ctx, &mut report);
    }
    if all || cli.what == What::Scale {
        scale::run(&ctx, &mut report);
    }
    report.print();
    let _ = std::fs::remove_dir_all(&cli.dir);
}
