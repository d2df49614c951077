//! Project tasks, run as `cargo xtask <command>` (alias in .cargo/config.toml).
mod bench;
mod demo;
mod group;
mod setup;
mod test;

use std::{ffi::OsString, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "wsgiscope development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and runs wsgiscope (eBPF toolchain, bpf-linker, gunicorn venv); fast when done.
    Setup,
    /// Run setup, build the agent (debug) and run every workspace test; args after `--` go to `cargo test`.
    Test {
        /// Passed to `cargo test` as given, e.g. a test-name filter or `-- --nocapture`.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Build the agent (release), profile a gunicorn demo app under traffic and print a per-route summary.
    Demo(demo::DemoArgs),
    /// Measure wsgiscope's overhead, probe cost and capacity on gunicorn; writes BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// The write loop of `bench` (run by the bench app's /loop route and by `bench` itself).
    #[command(hide = true)]
    BenchLoop(bench::micro::LoopArgs),
    /// Do-nothing programs on the BTF tracepoints sys_enter and sys_exit, held a while (section 2 by hand).
    #[command(hide = true)]
    BenchHooks(bench::hooks::HooksArgs),
    /// The fixed-rate client of `bench` on its own, to reproduce one run by hand.
    #[command(hide = true)]
    BenchPaced(bench::PacedArgs),
}

fn main() {
    let cli = Cli::parse();
    let root = wsgiscope_devkit::repo_root();
    let result = match cli.command {
        Cmd::Setup => setup::run(&root),
        Cmd::Test { cargo_test_args } => test::run(&root, &cargo_test_args),
        Cmd::Demo(args) => demo::run(&root, &args),
        Cmd::Bench(args) => bench::run(&root, &args),
        Cmd::BenchLoop(args) => bench::micro::loop_main(&args),
        Cmd::BenchHooks(args) => bench::hooks::hooks_main(&root, &args),
        Cmd::BenchPaced(args) => bench::paced_main(&args),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

/// The cargo that runs us (set by `cargo run`), so nested builds use the same toolchain.
fn cargo(root: &Path) -> Command {
    let mut cmd =
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(root);
    cmd
}

/// Runs a command to completion with inherited stdio; fails unless it exits with status 0.
fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Stdout and stderr of a command, or None if it could not be started.
fn output_text(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
