//! Worker memory's cost: the agent's CPU for its periodic /proc/PID/smaps_rollup reads of
//! gunicorn with 16 workers of 500 MB each (resident), against the same agent with the reads
//! off; and the time of one read of a 1 GB Python process (the kernel walks its page tables).
use std::{
    fmt::Write,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use wsgiscope_devkit::{apps_dir, exposition::Metrics, free_addr, gunicorn::Gunicorn, http, procfs};

use super::{procs, stats::median, Plan};
use crate::group::{self, check_stop, wait_until, Group};

pub const WORKERS: usize = 16;
/// MiB of small objects the master builds before forking (TESTAPP_PRELOAD_MB): each worker's RSS.
pub const WORKER_MB: u64 = 500;
/// Size of the process of the single-read measurement, MiB.
pub const BIG_MB: u64 = 1024;
/// The agent's period while measured (the default is 10 s: the cost scales down with it).
pub const PERIOD_SECS: f64 = 1.0;
pub const DEFAULT_PERIOD_SECS: f64 = 10.0;

#[derive(Clone, Debug, Default)]
pub struct Memory {
    pub run_secs: u64,
    /// The agent's CPU over the run: reads every second, and reads off.
    pub cpu_on: f64,
    pub cpu_off: f64,
    /// Reads the agent made, and the time it spent in them (its own counters).
    pub reads: f64,
    pub read_seconds: f64,
    /// A worker's RSS and PSS as the agent reported them (MB).
    pub worker_rss_mb: f64,
    pub worker_pss_mb: f64,
    /// One read of the 1 GB process: its RSS (MB), AnonHugePages (MB), each read's time (ms).
    pub big_rss_mb: f64,
    pub big_huge_mb: f64,
    pub big_reads_ms: Vec<f64>,
    pub load_before: String,
    pub load_after: String,
    pub date: String,
    pub commit: String,
}

impl Memory {
    /// Agent CPU per sweep of the 17 processes (s), from the difference with the reads off.
    pub fn cpu_per_sweep(&self) -> f64 {
        let sweeps = self.reads / (WORKERS + 1) as f64;
        (self.cpu_on - self.cpu_off).max(0.0) / sweeps.max(1.0)
    }

    /// Percent of a core at a period of `period` seconds.
    pub fn percent_at(&self, period: f64) -> f64 {
        100.0 * self.cpu_per_sweep() / period
    }
}

/// gunicorn sync with 16 workers forked from a master that preloaded 500 MiB of objects.
fn server(root: &Path, work: &Path) -> Result<(Group, u32)> {
    let addr = free_addr()?;
    let args = ["--worker-class", "sync", "-w", &WORKERS.to_string(), "--preload", "--timeout", "120"];
    let mut cmd = Gunicorn::new(addr, apps_dir(), "testapp:app").args(&args).command(root)?;
    cmd.env("TESTAPP_PRELOAD_MB", WORKER_MB.to_string());
    let mut g = group::gunicorn("gunicorn (16 × 500 MB)", cmd, addr, &work.join("gunicorn-memory.log"))?;
    let master = g.pid();
    wait_until("16 workers", Duration::from_secs(120), &mut [&mut g], || procfs::children(master).len() == WORKERS)?;
    Ok((g, master))
}

/// What the agent did over one idle run.
struct Run {
    cpu: f64,
    /// Its own counters' increase: reads, and seconds inside them.
    reads: f64,
    read_seconds: f64,
    last: Metrics,
}

/// The agent attached with `period`, idle for `secs`.
fn agent_run(root: &Path, work: &Path, master: u32, period: &str, secs: u64) -> Result<Run> {
    let metrics = free_addr()?;
    let agent = group::attach_agent_with(root, master, metrics, Some(&work.join("agent.log")), &["--memory-every", period, "--ui", "off"])?;
    // Settled: attach's own work (discovery, probes) is not counted.
    thread::sleep(Duration::from_secs(2));
    let cpu0 = procs::cpu_seconds(agent.pid())?;
    let m0 = Metrics::parse(&http::scrape(metrics)?)?;
    for _ in 0..secs {
        thread::sleep(Duration::from_secs(1));
        check_stop()?;
    }
    let cpu = procs::cpu_seconds(agent.pid())? - cpu0;
    let last = Metrics::parse(&http::scrape(metrics)?)?;
    let grew = |name: &str| last.sum(name, &[]) - m0.sum(name, &[]);
    let run = Run { cpu, reads: grew("wsgiscope_memory_reads_total"), read_seconds: grew("wsgiscope_memory_read_seconds_total"), last };
    println!("bench: memory (--memory-every {period}): agent CPU {cpu:.3} s over {secs} s, {} reads", run.reads);
    Ok(run)
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.trim().parse().ok()).unwrap_or(0)
}

/// A Python process holding `mb` MiB of small objects; waits until it has built them.
fn big_process(root: &Path, mb: u64) -> Result<Group> {
    let script = format!(
        "import time\nheld = [bytes(1000) for _ in range({mb} * 1048576 // 1000)]\nprint('ready', flush=True)\ntime.sleep(3600)\n"
    );
    let mut cmd = Command::new(root.join(".venv/bin/python"));
    cmd.args(["-c", &script]).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut g = Group::spawn("python (1 GB)", &mut cmd, libc::SIGTERM)?;
    let pid = g.pid();
    wait_until("the 1 GB process", Duration::from_secs(120), &mut [&mut g], || rss_kib(pid) >= mb * 1024 * 95 / 100)?;
    thread::sleep(Duration::from_millis(500));
    Ok(g)
}

/// `Key: N kB` of a smaps_rollup text, in MB.
fn field_mb(text: &str, key: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

pub fn run(root: &Path, work: &Path, plan: &Plan) -> Result<Memory> {
    let mut out = Memory { run_secs: plan.memory_secs, load_before: procs::loadavg(), ..Memory::default() };
    {
        let (_server, master) = server(root, work)?;
        let off = agent_run(root, work, master, "off", plan.memory_secs)?;
        let on = agent_run(root, work, master, &PERIOD_SECS.to_string(), plan.memory_secs)?;
        out.cpu_off = off.cpu;
        out.cpu_on = on.cpu;
        out.reads = on.reads;
        out.read_seconds = on.read_seconds;
        out.worker_rss_mb = on.last.sum("wsgi_worker_memory_bytes", &[("worker", "0"), ("kind", "rss")]) / 1e6;
        out.worker_pss_mb = on.last.sum("wsgi_worker_memory_bytes", &[("worker", "0"), ("kind", "pss")]) / 1e6;
        if out.reads == 0.0 {
            bail!("the agent made no memory reads; see {}", work.join("agent.log").display());
        }
    }
    check_stop()?;
    let big = big_process(root, BIG_MB)?;
    let path = format!("/proc/{}/smaps_rollup", big.pid());
    for _ in 0..plan.memory_big_reads {
        let t = Instant::now();
        let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
        out.big_reads_ms.push(t.elapsed().as_secs_f64() * 1e3);
        out.big_rss_mb = field_mb(&text, "Rss");
        out.big_huge_mb = field_mb(&text, "AnonHugePages");
    }
    drop(big);
    out.load_after = procs::loadavg();
    println!("bench: memory: {out:?}");
    Ok(out)
}

/// The report's section.
pub fn section(md: &mut String, m: &Memory) {
    let _ = writeln!(md, "\n## 5. Worker memory (smaps_rollup reads)\n");
    let _ = writeln!(
        md,
        "gunicorn sync with {WORKERS} workers forked from a master that preloaded {WORKER_MB} MiB of small Python objects \
         (`--preload`, tests/apps/testapp.py with `TESTAPP_PRELOAD_MB={WORKER_MB}`): each worker maps {:.0} MB resident \
         (PSS {:.0} MB: the pages are shared with the master and the 15 other workers). \
         The agent attached, idle server, {} s with `--memory-every {PERIOD_SECS}` and {} s with `--memory-every off`; \
         the difference of its CPU time is the reads' cost. Then one Python process holding {BIG_MB} MiB of 1,000-byte objects: \
         {} reads of its smaps_rollup, timed one by one.{}\n",
        m.worker_rss_mb,
        m.worker_pss_mb,
        m.run_secs,
        m.run_secs,
        m.big_reads_ms.len(),
        if m.date.is_empty() { String::new() } else { format!(" Measured by `cargo xtask bench --only memory` on {}, commit {}.", m.date, m.commit) }
    );
    let sweeps = m.reads / (WORKERS + 1) as f64;
    let _ = writeln!(md, "| | |");
    let _ = writeln!(md, "|---|---|");
    let _ = writeln!(md, "| agent CPU, reads every {PERIOD_SECS} s / off (s over {} s) | {:.3} / {:.3} |", m.run_secs, m.cpu_on, m.cpu_off);
    let _ = writeln!(md, "| sweeps of {} processes (reads) | {sweeps:.0} ({:.0}) |", WORKERS + 1, m.reads);
    let _ = writeln!(md, "| agent CPU per sweep (ms) | {:.1} |", m.cpu_per_sweep() * 1e3);
    let _ = writeln!(md, "| time in the reads per sweep, the agent's own count (ms) | {:.1} |", m.read_seconds / sweeps.max(1.0) * 1e3);
    let _ = writeln!(md, "| agent CPU at `--memory-every {DEFAULT_PERIOD_SECS}` (the default), % of a core | {:.3} |", m.percent_at(DEFAULT_PERIOD_SECS));
    let measured = 100.0 * (m.cpu_on - m.cpu_off).max(0.0) / (m.run_secs as f64).max(1.0);
    let _ = writeln!(md, "| agent CPU over the run with `--memory-every {PERIOD_SECS}` (a sweep starts on the loop's 500 ms tick once the last is back), % of a core | {measured:.1} |");
    let big = median(&m.big_reads_ms).unwrap_or(0.0);
    let max = m.big_reads_ms.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(
        md,
        "| one read of a {BIG_MB} MiB process (RSS {:.0} MB, {:.0} MB of it in transparent huge pages): median / max (ms) | {big:.2} / {max:.2} |",
        m.big_rss_mb, m.big_huge_mb
    );
    let per_worker = m.read_seconds / m.reads.max(1.0) * 1e3;
    let _ = writeln!(
        md,
        "\nOne read of a {:.0} MB worker whose pages are shared takes {per_worker:.1} ms ({:.1} ms per GB resident); of the \
         {BIG_MB} MiB process whose pages are private, {big:.1} ms ({:.1} ms per GB): the kernel visits every resident page, \
         and a shared one costs more (its map count is looked up for PSS). The cost grows with resident memory and the \
         number of workers, and falls in proportion to the period: `--memory-every 30` for many large workers.",
        m.worker_rss_mb,
        per_worker / (m.worker_rss_mb / 1000.0).max(1e-9),
        big / (m.big_rss_mb / 1000.0).max(1e-9),
    );
    let _ = writeln!(
        md,
        "\nThe machine's load average: {} before, {} after (2 cores, shared with other work: the CPU times are the \
         agent's own, other load does not add to them).",
        m.load_before, m.load_after
    );
}

/// Replaces the worker-memory section of an existing report, or puts it before the exact
/// commands: `--only memory`.
pub fn splice(report: &str, section_md: &str) -> String {
    super::report::splice(report, "\n## 5. Worker memory", section_md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_its_section_or_goes_before_the_commands() {
        let report = "# B\n\n## 3. C\nc\n\n## 5. Worker memory (x)\nold\n\n## Exact commands\ncmd\n";
        let out = splice(report, "\n## 5. Worker memory (y)\nnew\n");
        assert_eq!(out, "# B\n\n## 3. C\nc\n\n## 5. Worker memory (y)\nnew\n\n## Exact commands\ncmd\n");
        let out = splice("# B\n\n## 3. C\nc\n\n## Exact commands\ncmd\n", "\n## 5. Worker memory\nx\n");
        assert_eq!(out, "# B\n\n## 3. C\nc\n\n## 5. Worker memory\nx\n\n## Exact commands\ncmd\n");
        assert_eq!(splice("# B\n", "\n## 5. Worker memory\nx\n"), "# B\n\n## 5. Worker memory\nx\n");
    }

    #[test]
    fn cost_per_sweep_is_the_difference_over_the_sweeps() {
        let m = Memory { cpu_on: 1.7, cpu_off: 0.5, reads: 17.0 * 60.0, ..Memory::default() };
        assert!((m.cpu_per_sweep() - 0.02).abs() < 1e-9);
        assert!((m.percent_at(10.0) - 0.2).abs() < 1e-9);
        assert_eq!(field_mb("Rss: 2048 kB\nAnonHugePages:  1024 kB\n", "AnonHugePages"), 1.0);
    }
}
