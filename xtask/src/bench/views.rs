//! The live views' cost: the agent's CPU while it serves the page's API under a fixed rate, and
//! its peak RSS once the ring holds 10,000 call-heavy requests, each against the agent with
//! `--ui off` on the same server.
use std::{
    fmt::Write,
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use wsgiscope_devkit::{free_addr, http};

use super::{
    capacity::wait_counted,
    load::{self, Run},
    procs::{self, Middleware},
    Plan,
};
use crate::group::{self, check_stop};

/// Requests per second of the fixed-rate run.
pub const RATE: f64 = 1000.0;
/// The route that fills the ring: 20 Redis calls per request, each listed in its record.
pub const FILL_ROUTE: &str = "/redis?n=20";

#[derive(Clone, Debug, Default)]
pub struct Config {
    pub ui: bool,
    pub run: Run,
    /// Wall time of the fixed-rate run.
    pub seconds: f64,
    /// Requests the agent counted during the fixed-rate run.
    pub counted: f64,
    pub agent_cpu_seconds: f64,
    /// Requests the page-like reader fetched from /api/requests, and its reads of all three.
    pub records_read: u64,
    pub reads: u64,
    /// /redis?n=20 requests sent to fill the ring, and the records the ring then held.
    pub fill_requests: u64,
    pub ring_records: u64,
    pub ring_calls: u64,
    pub peak_rss_kib: u64,
}

impl Config {
    /// Agent CPU as a percentage of one core, per 1,000 requests per second served.
    pub fn cpu_percent_per_1k(&self) -> f64 {
        let secs = self.seconds.max(1e-9);
        let rate = self.run.requests as f64 / secs;
        100.0 * self.agent_cpu_seconds / secs / (rate / 1000.0).max(1e-9)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Views {
    pub run_secs: u64,
    pub off: Config,
    pub on: Config,
    pub date: String,
    pub commit: String,
    /// Load averages before and after (the machine may be shared).
    pub load: (String, String),
}

/// Polls the API as the page does (every second: new records by cursor, the workers, the
/// routes) until `stop`; counts what it read.
fn reader(agent: SocketAddr, stop: &AtomicBool, records: &AtomicU64, reads: &AtomicU64) {
    let mut cursor = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // New records by cursor, page after page while the agent says there are more.
        while let Ok((200, body)) = http::get(agent, &format!("/api/requests?since={cursor}&limit=1000")) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else { break };
            cursor = v["cursor"].as_u64().unwrap_or(cursor);
            records.fetch_add(v["requests"].as_array().map_or(0, |a| a.len() as u64), Ordering::Relaxed);
            if v["more"] != true {
                break;
            }
        }
        let _ = http::get(agent, "/api/active");
        let _ = http::get(agent, "/api/routes");
        reads.fetch_add(1, Ordering::Relaxed);
        thread::sleep(Duration::from_secs(1));
    }
}

fn measure(root: &Path, work: &Path, plan: &Plan, redis: &str, ui: bool) -> Result<Config> {
    let server = procs::gunicorn(root, work, Middleware::None, redis)?;
    let metrics = free_addr()?;
    let extra: &[&str] = if ui { &[] } else { &["--ui", "off"] };
    let agent = group::attach_agent_with(root, server.group.pid(), metrics, Some(&work.join("agent.log")), extra)?;
    let pid = agent.pid();
    let (stop, records, reads) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    let mut out = Config { ui, ..Config::default() };
    thread::scope(|s| -> Result<()> {
        if ui {
            s.spawn(|| reader(metrics, &stop, &records, &reads));
        }
        let result = (|| -> Result<()> {
            let before = wait_counted(metrics, 0.0)?;
            let cpu0 = procs::cpu_seconds(pid)?;
            let t = Instant::now();
            let run = load::paced(server.addr, "/hello", RATE, Duration::from_secs(plan.views_secs), plan.paced_threads)?;
            out.seconds = t.elapsed().as_secs_f64();
            let after = wait_counted(metrics, before.requests + run.requests as f64)?;
            out.agent_cpu_seconds = procs::cpu_seconds(pid)? - cpu0;
            out.counted = after.requests - before.requests;
            out.run = run;
            // Fill the ring past 10,000 with requests of 20 calls each.
            let fill = plan.views_fill;
            let started = Instant::now();
            let n = AtomicU64::new(0);
            thread::scope(|f| {
                for _ in 0..4 {
                    f.spawn(|| {
                        while n.fetch_add(1, Ordering::Relaxed) < fill {
                            let _ = http::get_status(server.addr, FILL_ROUTE);
                        }
                    });
                }
            });
            check_stop()?;
            out.fill_requests = fill;
            let done = wait_counted(metrics, after.requests + fill as f64)?;
            println!("bench: views (ui {ui}): filled in {:.1} s, counted {}", started.elapsed().as_secs_f64(), done.requests);
            if ui {
                let mut since = 0;
                loop {
                    let (_, body) = http::get(metrics, &format!("/api/requests?since={since}&limit=1000"))?;
                    let v: serde_json::Value = serde_json::from_str(&body).context("/api/requests")?;
                    let rs = v["requests"].as_array().context("records")?;
                    out.ring_records += rs.len() as u64;
                    out.ring_calls += rs.iter().map(|r| r["calls"].as_array().map_or(0, |c| c.len() as u64)).sum::<u64>();
                    since = v["cursor"].as_u64().context("cursor")?;
                    if v["more"] != true {
                        break;
                    }
                }
            }
            out.peak_rss_kib = procs::peak_rss_kib(pid)?;
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    out.records_read = records.load(Ordering::Relaxed);
    out.reads = reads.load(Ordering::Relaxed);
    println!("bench: views (ui {ui}): {out:?}");
    drop(agent);
    drop(server);
    Ok(out)
}

pub fn run(root: &Path, work: &Path, plan: &Plan, redis: &str) -> Result<Views> {
    let before = procs::loadavg();
    let off = measure(root, work, plan, redis, false)?;
    let on = measure(root, work, plan, redis, true)?;
    Ok(Views { run_secs: plan.views_secs, off, on, load: (before, procs::loadavg()), ..Views::default() })
}

/// The report's section.
pub fn section(md: &mut String, v: &Views) {
    let _ = writeln!(md, "\n## 4. Live views (page and API)\n");
    let _ = writeln!(
        md,
        "The agent attached to gunicorn sync (2 workers, the bench app) twice: with `--ui off`, and with the \
         views on (the default) while a reader polls the API as the page does, every second: \
         `/api/requests?since=CURSOR`, `/api/active`, `/api/routes`. Each run: /hello at a fixed {RATE:.0} req/s \
         for {} s (the agent's CPU), then {} requests of `{FILL_ROUTE}` (20 Redis calls each, all listed in \
         their records) to fill the ring of 10,000 (the agent's peak RSS, VmHWM).{}\n",
        v.run_secs,
        v.on.fill_requests,
        if v.date.is_empty() { String::new() } else { format!(" Measured by `cargo xtask bench --only views` on {}, commit {}.", v.date, v.commit) }
    );
    let _ = writeln!(
        md,
        "Load average before / after: {} / {} (CPU times are the agent's own, so other load on the machine slows the runs but adds nothing to them).\n",
        v.load.0, v.load.1
    );
    let _ = writeln!(md, "| | `--ui off` | views on, read every second |");
    let _ = writeln!(md, "|---|---|---|");
    let row = |md: &mut String, name: &str, f: &dyn Fn(&Config) -> String| {
        let _ = writeln!(md, "| {name} | {} | {} |", f(&v.off), f(&v.on));
    };
    row(md, "requests sent / counted (fixed rate)", &|c| format!("{} / {:.0}", c.run.requests, c.counted));
    row(md, "rate achieved (req/s)", &|c| format!("{:.0}", c.run.requests as f64 / c.seconds.max(1e-9)));
    row(md, "agent CPU (s)", &|c| format!("{:.2}", c.agent_cpu_seconds));
    row(md, "agent CPU, % of a core per 1k req/s", &|c| format!("{:.2}", c.cpu_percent_per_1k()));
    row(md, "API reads / records read", &|c| if c.ui { format!("{} / {}", c.reads, c.records_read) } else { "-".into() });
    row(md, "ring after the fill: records / calls listed", &|c| if c.ui { format!("{} / {}", c.ring_records, c.ring_calls) } else { "-".into() });
    row(md, "agent peak RSS (MB)", &|c| format!("{:.1}", c.peak_rss_kib as f64 / 1024.0));
    let added = (v.on.peak_rss_kib as f64 - v.off.peak_rss_kib as f64) / 1024.0;
    let cpu = v.on.cpu_percent_per_1k();
    let _ = writeln!(
        md,
        "\nTargets (issue 15): the ring at 10,000 requests adds ≤ 20 MB to the peak RSS: **{added:+.1} MB, {}**; \
         serving the views under load keeps the agent ≤ 1 % of a core per 1k req/s: **{cpu:.2} %, {}**.",
        if added <= 20.0 { "met" } else { "missed" },
        if cpu <= 1.0 { "met" } else { "missed" },
    );
}

/// Replaces the live-views section of an existing report, or puts it before the exact
/// commands: `--only views`.
pub fn splice(report: &str, section_md: &str) -> String {
    super::report::splice(report, "\n## 4. Live views", section_md)
}

#[cfg(test)]
mod tests {
    use super::splice;

    #[test]
    fn splice_replaces_only_its_section() {
        let report = "# B\n\n## 3. C\nc\n\n## 4. Live views (x)\nold\n\n## Exact commands\ncmd\n";
        let out = splice(report, "\n## 4. Live views (page and API)\nnew\n");
        assert_eq!(out, "# B\n\n## 3. C\nc\n\n## 4. Live views (page and API)\nnew\n\n## Exact commands\ncmd\n");
        assert_eq!(splice("# B\n", "\n## 4. Live views\nx\n"), "# B\n\n## 4. Live views\nx\n");
        let before_commands = splice("# B\n\n## 5. M\nm\n\n## Exact commands\ncmd\n", "\n## 4. Live views\nx\n");
        assert_eq!(before_commands, "# B\n\n## 5. M\nm\n\n## 4. Live views\nx\n\n## Exact commands\ncmd\n");
    }
}
