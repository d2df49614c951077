//! `cargo xtask bench`: what wsgiscope costs, measured on real gunicorn, and BENCHMARKS.md.
//!
//! 1. Overhead (`overhead.rs`): gunicorn alone, with do-nothing programs on the agent's
//!    tracepoints, with the agent attached, with an in-process timing middleware, and with
//!    prometheus_client, interleaved over rounds; on a one-block, a 1000-block and a DB-heavy
//!    route (20 Redis GETs per request, a Redis started for the bench).
//! 2. Probe cost per syscall (`micro.rs`): a write loop, traced and untraced, agent on and off;
//!    and a context-switch loop (the scheduler hooks fire for every process).
//! 3. Capacity (`capacity.rs`): the 102,400-block response and a closed-loop burst, counted exactly.
//! 4. Live views (`views.rs`): the agent's CPU serving the page's API under load, and its RSS
//!    with the ring full (`--only views` runs this part alone and updates its section).
//! 5. Worker memory (`memory.rs`): the agent's CPU for its smaps_rollup reads of 16 workers of
//!    500 MB, and one read of a 1 GB process (`--only memory`).
//! 6. Kernel programs (`kernel.rs`): each BPF program's run time from the kernel's counters, per
//!    request and per hook, next to do-nothing programs on the same hooks (`--only kernel`).
//!
//! `report.rs` writes the markdown; `procs.rs` starts and stops processes; `load.rs` makes traffic.
mod blocks_ab;
mod capacity;
mod emit;
pub mod hooks;
mod kernel;
mod load;
mod memory;
mod objects;
pub mod micro;
mod overhead;
mod procs;
mod report;
mod stats;
mod views;
mod write_probe;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Args;

use crate::{
    cargo,
    group::{self, check_stop},
    output_text, run_checked, setup,
};

#[derive(Args)]
pub struct BenchArgs {
    /// Short runs (about two minutes in all) to check the harness; the numbers are not meaningful.
    #[arg(long)]
    quick: bool,
    /// Where to write the report [default: BENCHMARKS.md; with --quick target/xtask-bench/BENCHMARKS.quick.md].
    #[arg(long)]
    output: Option<PathBuf>,
    /// Run one part only and replace its section in the report (`views`: the live views;
    /// `memory`: worker memory reads; `kernel`: the kernel programs' run time).
    #[arg(long, value_parser = ["views", "memory", "kernel"])]
    only: Option<String>,
}

#[derive(Args)]
pub struct PacedArgs {
    /// The server, e.g. 127.0.0.1:8000.
    #[arg(long)]
    addr: std::net::SocketAddr,
    #[arg(long, default_value = "/hello")]
    path: String,
    /// Requests per second.
    #[arg(long)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long, default_value_t = 32)]
    threads: usize,
}

/// `xtask bench-paced`: one fixed-rate run, printed.
pub fn paced_main(a: &PacedArgs) -> Result<()> {
    let run = load::paced(
        a.addr,
        &a.path,
        a.rate,
        Duration::from_secs(a.secs),
        a.threads,
    )?;
    println!("{run:?}");
    Ok(())
}

/// How long and how often each part runs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Overhead: rounds over the five configurations, seconds per load run.
    pub rounds: usize,
    pub run_secs: u64,
    /// Saturation calibration per route (sets the fixed rate), seconds.
    pub calibrate_secs: u64,
    /// wrk connections at saturation; open-loop client threads at the fixed rate.
    pub wrk_connections: usize,
    pub paced_threads: usize,
    /// Probe cost: rounds, loop processes per case and round, writes per loop.
    pub micro_rounds: usize,
    pub micro_reps: usize,
    pub micro_iters: u64,
    /// Capacity: /bytes1 requests, burst seconds and connections.
    pub bytes1_requests: u64,
    pub burst_secs: u64,
    pub burst_connections: usize,
    /// The live views' fixed-rate run (s), and the requests that fill the ring.
    pub views_secs: u64,
    pub views_fill: u64,
    /// Worker memory: seconds per agent run (reads on, reads off), reads of the 1 GB process.
    pub memory_secs: u64,
    pub memory_big_reads: usize,
    /// Kernel programs: rounds, and seconds per wrk run (the write loops take micro_iters).
    pub kernel_rounds: usize,
    pub kernel_secs: u64,
    /// Section 6's /blocks comparison with the timing middleware: paired cycles, seconds per run.
    pub blocks_cycles: usize,
    pub blocks_secs: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rounds: 1,
                run_secs: 2,
                calibrate_secs: 2,
                wrk_connections: 4,
                paced_threads: 32,
                micro_rounds: 1,
                micro_reps: 1,
                micro_iters: 100_000,
                bytes1_requests: 2,
                burst_secs: 3,
                burst_connections: 8,
                views_secs: 3,
                views_fill: 500,
                memory_secs: 3,
                memory_big_reads: 5,
                kernel_rounds: 1,
                kernel_secs: 2,
                blocks_cycles: 2,
                blocks_secs: 1,
            }
        } else {
            Plan {
                quick,
                rounds: 5,
                run_secs: 6,
                calibrate_secs: 5,
                wrk_connections: 4,
                paced_threads: 32,
                micro_rounds: 5,
                micro_reps: 5,
                micro_iters: 300_000,
                bytes1_requests: 10,
                burst_secs: 20,
                burst_connections: 8,
                views_secs: 20,
                views_fill: 12_000,
                memory_secs: 30,
                memory_big_reads: 50,
                kernel_rounds: 3,
                kernel_secs: 8,
                blocks_cycles: 25,
                blocks_secs: 2,
            }
        }
    }
}

/// The mitigations that make kernel calls and returns costly, from sysfs ("" when none).
fn mitigations() -> String {
    let dir = std::path::Path::new("/sys/devices/system/cpu/vulnerabilities");
    let mut found = Vec::new();
    for name in ["spectre_v2", "retbleed", "spec_rstack_overflow"] {
        let Ok(state) = std::fs::read_to_string(dir.join(name)) else {
            continue;
        };
        let state = state.trim();
        if state.starts_with("Mitigation") || state.contains("Safe RET") {
            found.push(format!("{name}: {state}"));
        }
    }
    found.join("; ")
}

/// Where the machine and the software stood when the numbers were taken.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub date: String,
    pub uname: String,
    pub cpu: String,
    pub memory: String,
    /// The CPU-vulnerability mitigations in force (they set the price of every call and return
    /// in the kernel, BPF programs included).
    pub mitigations: String,
    pub commit: String,
    pub versions: Vec<(String, String)>,
    pub load_before: String,
    pub load_after: String,
    pub elapsed: Duration,
    /// `kernel.bpf_stats_enabled` before the bench (which runs with it 0 but for section 6).
    pub bpf_stats_before: String,
}

pub struct Results {
    pub plan: Plan,
    pub env: Environment,
    pub overhead: overhead::Overhead,
    pub micro: Vec<micro::Sample>,
    pub capacity: capacity::Capacity,
    pub views: views::Views,
    pub memory: memory::Memory,
    pub kernel: kernel::Kernel,
}

pub const PROMETHEUS_CLIENT_VERSION: &str = "0.26.0";
/// prometheus_client has no `__version__`: ask the installed distribution.
const PROMETHEUS_CLIENT_VERSION_PY: &str =
    "import importlib.metadata as m; print(m.version('prometheus_client'))";

pub fn run(root: &Path, args: &BenchArgs) -> Result<()> {
    group::catch_stop();
    setup::run(root)?;
    // wrk loads the server to saturation; bpftrace measures the floor cost of any tracepoint
    // program; bpftool reads each program's run-time counters.
    setup::apt(&["wrk", "bpftrace", "bpftool"])?;
    prometheus_client(root)?;
    run_checked(cargo(root).args(["build", "--release", "-p", "wsgiscope"]))?;
    check_stop()?;

    let plan = Plan::new(args.quick);
    let work = root.join("target/xtask-bench");
    std::fs::create_dir_all(&work)?;
    // The agent appends to its log over the run's many attaches; start it afresh.
    let _ = std::fs::remove_file(work.join("agent.log"));
    let started = std::time::Instant::now();
    let mut env = environment(root);
    println!("bench: load average before: {}", env.load_before);
    // Run-time counting off for every run but section 6's (which turns it on for its own).
    let stats_off = kernel::BpfStats::disable()?;
    env.bpf_stats_before = stats_off.previous().to_string();

    // The Redis every bench gunicorn's /redis route calls; held until the end (dropped last).
    let (_redis, redis) = group::redis(&work)?;
    match args.only.as_deref() {
        Some("memory") => return only_memory(root, &work, &plan, &env, args),
        Some("kernel") => return only_kernel(root, &work, &plan, &redis, &env, args),
        Some(_) => return only_views(root, &work, &plan, &redis, &env, args),
        None => {}
    }
    let overhead = overhead::run(root, &work, &plan, &redis)?;
    let micro = micro::run(root, &work, &plan, &redis)?;
    let capacity = capacity::run(root, &work, &plan, &redis)?;
    let views = views::run(root, &work, &plan, &redis)?;
    let memory = memory::run(root, &work, &plan)?;
    let kernel = kernel::run(root, &work, &plan, &redis)?;

    env.load_after = procs::loadavg();
    env.elapsed = started.elapsed();
    println!("bench: load average after: {}", env.load_after);
    let results = Results {
        plan,
        env,
        overhead,
        micro,
        capacity,
        views,
        memory,
        kernel,
    };
    let output = report_path(root, &work, &results.plan, args);
    std::fs::write(&output, report::render(&results))
        .with_context(|| format!("cannot write {}", output.display()))?;
    println!("bench: wrote {}", output.display());
    Ok(())
}

/// Where the report goes (`--only PART`: the report it amends).
fn report_path(root: &Path, work: &Path, plan: &Plan, args: &BenchArgs) -> PathBuf {
    args.output.clone().unwrap_or_else(|| {
        if plan.quick {
            work.join("BENCHMARKS.quick.md")
        } else {
            root.join("BENCHMARKS.md")
        }
    })
}

/// Rewrites the report at `output` with `amend` (which replaces one part's section).
fn amend_report(output: &Path, what: &str, amend: impl FnOnce(&str) -> String) -> Result<()> {
    let report = std::fs::read_to_string(output).unwrap_or_default();
    std::fs::write(output, amend(&report)).with_context(|| format!("cannot write {}", output.display()))?;
    println!("bench: wrote the {what} section of {}", output.display());
    Ok(())
}

/// `--only views`: the live views' part alone, its section replaced in the existing report.
fn only_views(root: &Path, work: &Path, plan: &Plan, redis: &str, env: &Environment, args: &BenchArgs) -> Result<()> {
    let mut v = views::run(root, work, plan, redis)?;
    v.date = env.date.clone();
    v.commit = env.commit.clone();
    amend_report(&report_path(root, work, plan, args), "live views'", |report| {
        let mut section = String::new();
        views::section(&mut section, &v);
        views::splice(report, &section)
    })
}

/// `--only memory`: the worker-memory part alone, its section replaced in the existing report.
fn only_memory(root: &Path, work: &Path, plan: &Plan, env: &Environment, args: &BenchArgs) -> Result<()> {
    let mut m = memory::run(root, work, plan)?;
    m.date = env.date.clone();
    m.commit = env.commit.clone();
    amend_report(&report_path(root, work, plan, args), "worker-memory", |report| {
        let mut section = String::new();
        memory::section(&mut section, &m);
        memory::splice(report, &section)
    })
}

/// `--only kernel`: the kernel programs' part alone, its section replaced in (or added to) the
/// existing report, whose section 1 gives the middleware comparison.
fn only_kernel(root: &Path, work: &Path, plan: &Plan, redis: &str, env: &Environment, args: &BenchArgs) -> Result<()> {
    let mut k = kernel::run(root, work, plan, redis)?;
    k.date = env.date.clone();
    k.commit = env.commit.clone();
    amend_report(&report_path(root, work, plan, args), "kernel programs'", |report| {
        // A quick report may have no section 1: take it from BENCHMARKS.md then.
        let cpu = report::kernel::middleware_from_report(report).or_else(|| {
            let full = std::fs::read_to_string(root.join("BENCHMARKS.md")).ok()?;
            report::kernel::middleware_from_report(&full)
        });
        let mut section = String::new();
        report::kernel::section(&mut section, &k, cpu);
        report::kernel::splice(report, &section)
    })
}

/// prometheus_client in the gunicorn venv (the configuration wsgiscope is compared with).
fn prometheus_client(root: &Path) -> Result<()> {
    let python = root.join(".venv/bin/python");
    let installed = output_text(Command::new(&python).args(["-c", PROMETHEUS_CLIENT_VERSION_PY]));
    if installed.is_some_and(|v| v.trim() == PROMETHEUS_CLIENT_VERSION) {
        println!("bench: prometheus_client {PROMETHEUS_CLIENT_VERSION} already in .venv");
        return Ok(());
    }
    run_checked(
        Command::new(root.join(".venv/bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("prometheus_client=={PROMETHEUS_CLIENT_VERSION}")),
    )
}

fn environment(root: &Path) -> Environment {
    let text = |cmd: &mut Command| {
        output_text(cmd)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kib / (1024.0 * 1024.0)))
        })
        .unwrap_or_else(|| "?".into());
    let dirty = !text(Command::new("git").current_dir(root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_empty();
    let commit = text(
        Command::new("git")
            .current_dir(root)
            .args(["rev-parse", "--short", "HEAD"]),
    );
    let first_line = |s: String| s.lines().next().unwrap_or("?").to_string();
    let versions = vec![
        (
            "wsgiscope".to_string(),
            text(Command::new(group::agent_binary(root)).arg("--version")),
        ),
        (
            "gunicorn".to_string(),
            text(Command::new(root.join(".venv/bin/gunicorn")).arg("--version")),
        ),
        (
            "python".to_string(),
            text(Command::new(root.join(".venv/bin/python")).arg("--version")),
        ),
        (
            "prometheus_client".to_string(),
            text(
                Command::new(root.join(".venv/bin/python"))
                    .args(["-c", PROMETHEUS_CLIENT_VERSION_PY]),
            ),
        ),
        // wrk -v prints its version and exits non-zero; only the first line matters.
        (
            "wrk".to_string(),
            first_line(text(Command::new("wrk").arg("-v"))),
        ),
        (
            "rustc (xtask, agent userspace)".to_string(),
            text(Command::new("rustc").arg("--version")),
        ),
    ];
    Environment {
        date: text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        uname: text(Command::new("uname").arg("-srvmo")),
        cpu: format!("{cpus} × {model}"),
        memory,
        mitigations: mitigations(),
        commit: format!(
            "{commit}{}",
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        ),
        versions,
        load_before: procs::loadavg(),
        load_after: String::new(),
        elapsed: Duration::ZERO,
        bpf_stats_before: String::new(),
    }
}
