//! Keel's automation, in Rust, behind `cargo xtask` (see `.cargo/config.toml`).
//!
//! - `cargo xtask ci`: formatting check, clippy with warnings denied on every target, then
//!   `cargo test --workspace` (which includes the tidy test in this crate).
//! - `cargo xtask demo`: starts a throwaway Postgres, applies the migrations and runs Keel's
//!   scenario end to end, printing what happened.
//! - `cargo xtask console`: the demo's scenario, then the operator console served on its data.
//! - `cargo xtask scrape`: every serving binary on a throwaway Postgres; `/readyz` must turn 200
//!   and `promtool check metrics` must pass on each `/metrics`.
//! - `cargo xtask bench <target>`: benchmarks that print figures, optimised, with peers.

/// The benches run with the allocator Keel's binaries ship with (every side of a bench shares it).
#[cfg(feature = "bench")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bench;
mod console;
mod demo;
#[cfg(test)]
mod monitoring;
#[cfg(test)]
mod rbac;
mod scrape;
#[cfg(test)]
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci      cargo fmt --check, cargo clippy -D warnings (all targets), cargo test --workspace
  demo    run Keel's scenario end to end on a throwaway local Postgres
  console the demo's scenario, then the operator console on its data (until Ctrl-C)
  scrape  start each serving binary on a throwaway Postgres; /readyz must turn 200 and
          `promtool check metrics` must pass on every /metrics
  bench   benchmarks, optimised, with peers side by side: `cargo xtask bench propagation|rater|provision|orphan-sweep|console`
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo::run(),
        Some("console") => demo::run_console(),
        Some("bench") => bench::run(&args[1..]),
        Some("scrape") => scrape::run(),
        Some("help" | "--help" | "-h") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprint!("unknown task {other:?}\n\n{USAGE}");
            return ExitCode::from(64);
        }
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("could not run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    Ok(())
}
