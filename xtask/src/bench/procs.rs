//! The processes a benchmark starts (gunicorn, the agent, bpftrace; see `crate::group`) and what
//! it reads about processes from /proc.
use std::{
    fs::File,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    demo::http_get,
    group::{wait_until, Group},
};

/// What a gunicorn instance serves: the bench app alone or wrapped in in-process instrumentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Middleware {
    None,
    Timing,
    Prometheus,
}

impl Middleware {
    pub fn env_value(self) -> &'static str {
        match self {
            Middleware::None => "none",
            Middleware::Timing => "timing",
            Middleware::Prometheus => "prometheus",
        }
    }
}

pub struct Gunicorn {
    pub addr: SocketAddr,
    pub middleware: Middleware,
    pub group: Group,
}

/// gunicorn sync, 2 workers, serving tests/apps/benchapp.py on a free loopback port.
pub fn gunicorn(root: &Path, work: &Path, middleware: Middleware) -> Result<Gunicorn> {
    let addr = free_addr()?;
    let name = format!("gunicorn ({})", middleware.env_value());
    let log_path = work.join(format!("gunicorn-{}.log", middleware.env_value()));
    let log = File::create(&log_path)?;
    let mut cmd = Command::new(root.join(".venv/bin/gunicorn"));
    cmd.args(gunicorn_args(&addr.to_string()))
        .arg(root.join("tests/apps"))
        .arg("benchapp:app")
        .env("WSGISCOPE_BENCH_MIDDLEWARE", middleware.env_value())
        .env("WSGISCOPE_BENCH_LOOP", std::env::current_exe()?)
        .env_remove("WSGISCOPE_TRUTH_LOG")
        .env_remove("PROMETHEUS_MULTIPROC_DIR")
        .stdout(log.try_clone()?)
        .stderr(log);
    if middleware == Middleware::Prometheus {
        let dir = work.join("prometheus-multiproc");
        // Multiprocess mode must start from an empty directory.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        cmd.env("PROMETHEUS_MULTIPROC_DIR", dir);
    }
    let mut group = Group::spawn(&name, &mut cmd, libc::SIGTERM)?;
    wait_until(&name, Duration::from_secs(30), &mut [&mut group], || {
        http_get(addr, "/hello").is_ok_and(|(status, _)| status == 200)
    })
    .with_context(|| format!("see {}", log_path.display()))?;
    Ok(Gunicorn {
        addr,
        middleware,
        group,
    })
}

/// gunicorn's arguments before the app directory and module (also printed in the report).
pub fn gunicorn_args(bind: &str) -> Vec<String> {
    [
        "--no-control-socket",
        "--worker-class",
        "sync",
        "-w",
        "2",
        "-b",
        bind,
        "--chdir",
    ]
    .map(String::from)
    .to_vec()
}

pub struct Agent {
    pub metrics: SocketAddr,
    pub group: Group,
}

/// `wsgiscope attach --pid <master>`, ready once it serves /metrics (it binds first, serves once attached).
pub fn agent(root: &Path, work: &Path, master: u32) -> Result<Agent> {
    let metrics = free_addr()?;
    let log_path = work.join("agent.log");
    let log = File::options().create(true).append(true).open(&log_path)?;
    let mut group = Group::spawn(
        "wsgiscope",
        Command::new(agent_binary(root))
            .args(["attach", "--pid", &master.to_string(), "--listen"])
            .arg(metrics.to_string())
            .stdout(log.try_clone()?)
            .stderr(log),
        libc::SIGINT,
    )?;
    wait_until(
        "the agent's /metrics",
        Duration::from_secs(60),
        &mut [&mut group],
        || http_get(metrics, "/metrics").is_ok_and(|(status, _)| status == 200),
    )
    .with_context(|| format!("see {}", log_path.display()))?;
    Ok(Agent { metrics, group })
}

/// bpftrace running `program`; ready once it has printed "Attaching N probes..." and a moment passed.
pub fn bpftrace(work: &Path, program: &str) -> Result<Group> {
    let log_path = work.join("bpftrace.log");
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

pub fn agent_binary(root: &Path) -> PathBuf {
    root.join("target/release/wsgiscope")
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// User + system CPU time a process has used so far, in seconds (fields 14 and 15 of /proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields are counted after the last ')'.
    let after = &stat[stat.rfind(')').context("bad /proc stat")? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 = fields
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
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue; // exited meanwhile
        };
        // Field 4 (ppid) is the second after the command name.
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            total += cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    Ok(total)
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
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
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
