//! The processes a benchmark starts (gunicorn, the agent, bpftrace; see `crate::group`, which also
//! starts the Redis the bench app's /redis route calls) and what
//! it reads about processes from /proc.
use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use wsgiscope_devkit::{self as devkit, apps_dir, free_addr, procfs};

use crate::group::{self, wait_until, Group};

/// What a gunicorn instance serves: the bench app alone, or also (`All`) wrapped in each
/// in-process instrumentation under a path prefix of its own (`/timing/`, `/prometheus/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Middleware {
    None,
    All,
}

impl Middleware {
    pub fn env_value(self) -> &'static str {
        match self {
            Middleware::None => "none",
            Middleware::All => "all",
        }
    }
}

pub struct Gunicorn {
    pub addr: SocketAddr,
    pub group: Group,
}

/// gunicorn's options for the bench (also printed in the report).
const GUNICORN_ARGS: [&str; 4] = ["--worker-class", "sync", "-w", "2"];

/// The bench app's gunicorn command line, bound to `bind`, its app directory `apps`.
pub fn gunicorn_spec(
    bind: impl std::fmt::Display,
    apps: impl Into<PathBuf>,
) -> devkit::gunicorn::Gunicorn {
    devkit::gunicorn::Gunicorn::new(bind, apps, "benchapp:app").args(&GUNICORN_ARGS)
}

/// gunicorn sync, 2 workers, serving tests/apps/benchapp.py on a free loopback port; its /redis
/// route calls the Redis at `redis` (a redis:// URL).
pub fn gunicorn(root: &Path, work: &Path, middleware: Middleware, redis: &str) -> Result<Gunicorn> {
    let addr = free_addr()?;
    let name = format!("gunicorn ({})", middleware.env_value());
    let log_path = work.join(format!("gunicorn-{}.log", middleware.env_value()));
    let mut cmd = gunicorn_spec(addr, apps_dir()).command(root)?;
    cmd.env("WSGISCOPE_BENCH_MIDDLEWARE", middleware.env_value())
        .env("WSGISCOPE_BENCH_LOOP", std::env::current_exe()?)
        .env("TESTAPP_REDIS", redis)
        .env_remove("PROMETHEUS_MULTIPROC_DIR");
    if middleware == Middleware::All {
        let dir = work.join("prometheus-multiproc");
        // Multiprocess mode must start from an empty directory.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        cmd.env("PROMETHEUS_MULTIPROC_DIR", dir);
    }
    Ok(Gunicorn {
        addr,
        group: group::gunicorn(&name, cmd, addr, &log_path)?,
    })
}

pub struct Agent {
    pub metrics: SocketAddr,
    pub group: Group,
}

/// `wsgiscope attach --pid <master>` on a free port, its output appended to work/agent.log.
pub fn agent(root: &Path, work: &Path, master: u32) -> Result<Agent> {
    agent_with(root, work, master, &[])
}

/// [`agent`] with `extra` options (e.g. `--no-cpu-time`).
pub fn agent_with(root: &Path, work: &Path, master: u32, extra: &[&str]) -> Result<Agent> {
    let metrics = free_addr()?;
    let group = group::attach_agent_with(root, master, metrics, Some(&work.join("agent.log")), extra)?;
    Ok(Agent { metrics, group })
}

/// bpftrace running `program`; ready once it has printed "Attaching N probes..." and a moment passed.
/// Whether bpftrace runs here (the do-nothing programs' floors need it).
pub fn bpftrace_available() -> bool {
    Command::new("bpftrace").arg("--version").output().is_ok_and(|o| o.status.success())
}

pub fn bpftrace(work: &Path, program: &str) -> Result<Group> {
    // A log of its own for each (two run at once in the kernel section).
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log_path = work.join(format!("bpftrace-{n}.log"));
    let log = File::create(&log_path)?;
    let mut group = Group::spawn(
        "bpftrace",
        Command::new("bpftrace")
            .args(["-e", program])
            .stdout(log.try_clone()?)
            .stderr(log),
        libc::SIGINT,
    )?;
    wait_until(
        "bpftrace to attach",
        Duration::from_secs(60),
        &mut [&mut group],
        || std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("Attaching")),
    )
    .with_context(|| format!("see {}", log_path.display()))?;
    // It prints before the attach calls return.
    thread::sleep(Duration::from_secs(1));
    Ok(group)
}

/// User + system CPU time a process has used so far, in seconds (fields 14 and 15 of /proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = procfs::stat(pid).with_context(|| format!("no /proc/{pid}/stat"))?;
    // The fields start at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 = stat
        .get(11..13)
        .context("short /proc stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / hz as f64)
}

/// CPU seconds used so far by the children of `parent` (gunicorn's workers). On a shared machine
/// this is steadier than throughput: other load slows the server, but does not add to its CPU time.
pub fn children_cpu_seconds(parent: u32) -> Result<f64> {
    // A worker that exited meanwhile counts nothing.
    Ok(procfs::children(parent)
        .into_iter()
        .map(|pid| cpu_seconds(pid).unwrap_or(0.0))
        .sum())
}

/// Nanoseconds the children of `parent` have run on a CPU so far (the first field of
/// /proc/PID/schedstat): `children_cpu_seconds` to the nanosecond, for differences of a few
/// hundred µs per request over short runs.
pub fn children_run_ns(parent: u32) -> u64 {
    procfs::children(parent)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmHWM")?
        .parse()?)
}

/// wsgiscope agents running on the machine that this benchmark did not start (another
/// engineer's tests, say): their probes fire for every process, ours included.
pub fn foreign_agents(ours: &[u32]) -> Vec<u32> {
    procfs::pids()
        .into_iter()
        .filter(|pid| !ours.contains(pid))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "wsgiscope")
        })
        .collect()
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
