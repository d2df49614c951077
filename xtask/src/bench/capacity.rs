//! Capacity: can the agent keep up, exactly? The 102,400-one-byte-block response and a
//! closed-loop burst of one-block requests, each counted by the client and compared with the
//! agent's `wsgi_requests_total` and `wsgiscope_lost_events_total`; the agent's CPU time and
//! peak RSS from /proc.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use wsgiscope_devkit::{http, Metrics};

use super::{
    load::{self, Run},
    procs::{self, Middleware},
    Plan,
};
use crate::group::check_stop;

/// What the agent has counted so far.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub requests: f64,
    pub requests_by_route: BTreeMap<String, f64>,
    pub blocks_by_route: BTreeMap<String, f64>,
    /// Downstream calls of the requests counted, over all protocols.
    pub downstream_calls_by_route: BTreeMap<String, f64>,
    pub lost: f64,
}

impl Snapshot {
    pub fn read(metrics: SocketAddr) -> Result<Snapshot> {
        let m = Metrics::parse(&http::scrape(metrics)?)?;
        Ok(Snapshot {
            requests: m.sum("wsgi_requests_total", &[]),
            requests_by_route: m.sum_by("wsgi_requests_total", "route"),
            blocks_by_route: m.sum_by("wsgi_response_blocks_sum", "route"),
            downstream_calls_by_route: m.sum_by("wsgi_request_downstream_calls_sum", "route"),
            lost: m.sum("wsgiscope_lost_events_total", &[]),
        })
    }
}

#[derive(Clone, Debug, Default)]
pub struct Bytes1 {
    pub requests: u64,
    pub seconds_per_request: f64,
    /// The agent's count of /bytes1 requests and of their blocks (expected: 102,400 each).
    pub counted: f64,
    pub blocks_counted: f64,
    pub lost: f64,
    pub agent_cpu_seconds: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Burst {
    pub connections: usize,
    pub run: Run,
    pub counted: f64,
    pub lost: f64,
    /// Agent CPU time from the burst's start until it had counted every request, as a
    /// percentage of one core over the burst's duration.
    pub agent_cpu_percent: f64,
    pub foreign_agent: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Capacity {
    pub bytes1: Bytes1,
    pub burst: Burst,
    /// VmHWM of the agent at the end, KiB.
    pub agent_peak_rss_kib: u64,
}

pub const BYTES1_BLOCKS: f64 = 102_400.0;

pub fn run(root: &Path, work: &Path, plan: &Plan, redis: &str) -> Result<Capacity> {
    let server = procs::gunicorn(root, work, Middleware::None, redis)?;
    let agent = procs::agent(root, work, server.group.pid())?;
    let agent_pid = agent.group.pid();
    let mut out = Capacity::default();

    // /bytes1, one request at a time.
    let before = Snapshot::read(agent.metrics)?;
    let cpu0 = procs::cpu_seconds(agent_pid)?;
    let t = Instant::now();
    for _ in 0..plan.bytes1_requests {
        let status = http::get_status(server.addr, "/bytes1")?;
        ensure!(status == 200, "/bytes1 answered {status}");
    }
    let seconds = t.elapsed().as_secs_f64();
    let route = |s: &Snapshot, m: fn(&Snapshot) -> &BTreeMap<String, f64>| {
        m(s).get("/bytes1").copied().unwrap_or(0.0)
    };
    let after = wait_counted(agent.metrics, before.requests + plan.bytes1_requests as f64)?;
    out.bytes1 = Bytes1 {
        requests: plan.bytes1_requests,
        seconds_per_request: seconds / plan.bytes1_requests as f64,
        counted: route(&after, |s| &s.requests_by_route) - route(&before, |s| &s.requests_by_route),
        blocks_counted: route(&after, |s| &s.blocks_by_route)
            - route(&before, |s| &s.blocks_by_route),
        lost: after.lost - before.lost,
        agent_cpu_seconds: procs::cpu_seconds(agent_pid)? - cpu0,
    };
    println!("bench: /bytes1 {:?}", out.bytes1);

    // The burst: one-block requests as fast as the machine serves them.
    let before = Snapshot::read(agent.metrics)?;
    let cpu0 = procs::cpu_seconds(agent_pid)?;
    let duration = Duration::from_secs(plan.burst_secs);
    let run = load::burst(server.addr, "/hello", plan.burst_connections, duration)?;
    let foreign_agent = !procs::foreign_agents(&[agent_pid]).is_empty();
    let after = wait_counted(agent.metrics, before.requests + run.requests as f64)?;
    let cpu = procs::cpu_seconds(agent_pid)? - cpu0;
    out.burst = Burst {
        connections: plan.burst_connections,
        counted: after.requests - before.requests,
        lost: after.lost - before.lost,
        agent_cpu_percent: 100.0 * cpu / duration.as_secs_f64(),
        run,
        foreign_agent,
    };
    println!("bench: burst {:?}", out.burst);
    out.agent_peak_rss_kib = procs::peak_rss_kib(agent_pid)?;
    Ok(out)
}

/// The agent counts a request once it has read its record: polls until it has counted `target`
/// requests in all, or 10 s have passed (then returns what it has, and the report shows the gap).
pub fn wait_counted(metrics: SocketAddr, target: f64) -> Result<Snapshot> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = Snapshot::read(metrics)?;
        if snapshot.requests >= target || Instant::now() > deadline {
            return Ok(snapshot);
        }
        check_stop()?;
        thread::sleep(Duration::from_millis(100));
    }
}
