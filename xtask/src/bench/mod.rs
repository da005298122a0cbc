//! `cargo xtask bench <target>`: benchmarks that print figures, with a peer measured side by side
//! in the same run where there is one. Never timed assertions.
//!
//! Benchmarks run optimised: a debug build of xtask re-runs itself with
//! `cargo run --release --features bench`, which also brings in the peers (kept out of ordinary
//! builds and of `cargo test --workspace`).
//!
//! Every bench with a peer or a baseline runs through [`fair`]: alternating order, the median
//! and min–max of at least three rounds, the machine, settings and command printed.

#[cfg(feature = "bench")]
mod audit;
#[cfg(feature = "bench")]
mod console;
pub mod fair;
#[cfg(feature = "bench")]
mod orphan_sweep;
#[cfg(feature = "bench")]
mod propagation;
#[cfg(feature = "bench")]
mod provision;
#[cfg(feature = "bench")]
mod rater;

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask bench propagation [--rows N] [--pairs N] | rater [--events N] [--pairs N] | provision [--resources N] [--concurrent N] [--pairs N] | orphan-sweep [--items N] [--rows N] [--pairs N] [--shared-buffers SIZE] | console [--audit-rows N] [--dead-letters N] | audit [--rows N]";

/// Runs `cargo xtask bench …`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    if cfg!(debug_assertions) || !cfg!(feature = "bench") {
        return reexec_optimised(args);
    }
    dispatch(args)
}

fn reexec_optimised(args: &[String]) -> anyhow::Result<()> {
    eprintln!("building the benchmarks optimised (cargo run --release --features bench)…");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "xtask",
            "--features",
            "bench",
            "--",
            "bench",
        ])
        .args(args)
        .current_dir(crate::workspace_root())
        .status()
        .context("could not run cargo")?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

fn count_flag(args: &[String], flag: &str, default: u64) -> anyhow::Result<u64> {
    fair::flag(args, flag, default, USAGE)
}

#[cfg(feature = "bench")]
fn dispatch(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("propagation") => propagation::bench(
            count_flag(&args[1..], "--rows", 100_000)?,
            count_flag(&args[1..], "--pairs", fair::DEFAULT_PAIRS)?,
        ),
        Some("rater") => rater::bench(&args[1..]),
        Some("audit") => audit::bench(count_flag(&args[1..], "--rows", 10_000_000)?),
        Some("orphan-sweep") => orphan_sweep::bench(&args[1..]),
        Some(orphan_sweep::COLD_TICK) => orphan_sweep::cold_tick(&args[1..]),
        Some("provision") => provision::bench(
            count_flag(&args[1..], "--resources", 2_000)?,
            count_flag(&args[1..], "--concurrent", 200)?,
            count_flag(&args[1..], "--pairs", fair::DEFAULT_PAIRS)?,
        ),
        Some("console") => console::bench(
            count_flag(&args[1..], "--audit-rows", 1_000_000)?,
            count_flag(&args[1..], "--dead-letters", 100_000)?,
        ),
        Some(other) => bail!("unknown benchmark {other:?}\n{USAGE}"),
        None => bail!("{USAGE}"),
    }
}

#[cfg(not(feature = "bench"))]
fn dispatch(args: &[String]) -> anyhow::Result<()> {
    let _ = count_flag(args, "--rows", 0)?;
    bail!("benchmarks need the `bench` feature: {USAGE}")
}
