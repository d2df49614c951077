//! Overhead on gunicorn: five configurations side by side in one run, interleaved over rounds
//! (the order rotates each round, so drift on a shared machine spreads over all of them).
//!
//! Every configuration runs on the same server, the same worker processes: the middlewares wrap
//! the app for requests under their path prefixes (`benchapp.py`), and the agent is started for
//! the wsgiscope block of a round and stopped after it. The fifth is the floor of any design on
//! the agent's hooks: bpftrace with programs that do nothing on every tracepoint the agent
//! attaches to, for its block of the round. (On this shared host a process can run
//! its whole life faster or slower than another: with a server per middleware, the
//! prometheus_client one once measured less worker CPU per request than the app alone.) While
//! the agent is attached its probes fire for every process on the machine, so nothing else is
//! measured meanwhile.
use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Result;

use super::{
    capacity::{wait_counted, Snapshot},
    load::{self, Run},
    objects,
    procs::{self, Gunicorn, Middleware},
    Plan,
};

/// Redis GETs per request of the DB-heavy route, the route as requested, and the route label the
/// agent reports it under (the path without the query).
pub const REDIS_CALLS: u32 = 20;
pub const REDIS_ROUTE: &str = "/redis?n=20";
pub const REDIS_LABEL: &str = "/redis";

/// The one-block route, the 1000-block route and the DB-heavy route of the test app.
pub const ROUTES: [&str; 3] = ["/hello", "/blocks", REDIS_ROUTE];

/// What a route of ROUTES does, for the report.
pub fn route_description(route: &str) -> String {
    match route {
        "/hello" => "one block".into(),
        "/blocks" => "1000 blocks of 128 bytes".into(),
        REDIS_ROUTE => format!("{REDIS_CALLS} Redis GETs in a loop, then one block"),
        _ => String::new(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    Alone,
    Hooks,
    Wsgiscope,
    Timing,
    Prometheus,
}

pub const CONFIGS: [Config; 5] = [
    Config::Alone,
    Config::Hooks,
    Config::Wsgiscope,
    Config::Timing,
    Config::Prometheus,
];

impl Config {
    pub fn label(self) -> &'static str {
        match self {
            Config::Alone => "app alone",
            Config::Hooks => "app + do-nothing programs on the agent's tracepoints",
            Config::Wsgiscope => "app + wsgiscope attached",
            Config::Timing => "app + timing middleware (in-process)",
            Config::Prometheus => "app + prometheus_client (multiprocess)",
        }
    }

    /// The path prefix under which the server wraps the app in this configuration's middleware.
    pub fn prefix(self) -> &'static str {
        match self {
            Config::Alone | Config::Hooks | Config::Wsgiscope => "",
            Config::Timing => "/timing",
            Config::Prometheus => "/prometheus",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Load {
    /// wrk, as fast as the server answers.
    Saturation,
    /// Our open-loop client at half the app-alone saturation throughput.
    Fixed,
}

#[derive(Clone, Debug)]
pub struct Measurement {
    pub route: &'static str,
    pub load: Load,
    pub config: Config,
    pub run: Run,
    /// CPU time of gunicorn's workers per request answered (the BPF programs run in their syscalls).
    pub worker_cpu_us: f64,
    /// The agent's CPU time per request (wsgiscope configuration only).
    pub agent_cpu_us: Option<f64>,
    /// Another wsgiscope agent (not ours) was running on the machine.
    pub foreign_agent: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Overhead {
    /// The tracepoints the agent attaches to (`category:name`), where `Config::Hooks` runs
    /// programs that do nothing.
    pub hooks: Vec<String>,
    /// Saturation throughput of the app alone per route (calibration), and the fixed rate used.
    pub calibration: BTreeMap<&'static str, f64>,
    pub fixed_rate: BTreeMap<&'static str, f64>,
    pub measurements: Vec<Measurement>,
    /// Over all wsgiscope blocks: lost events the agent reported, requests it counted, and
    /// requests the clients saw answered (wrk leaves up to one in flight per connection at its end).
    pub agent_lost_events: f64,
    pub agent_counted: f64,
    pub client_completed: u64,
    /// Over all wsgiscope blocks: the agent's count of REDIS_LABEL requests and of their
    /// downstream calls (expected: REDIS_CALLS per request).
    pub redis_counted: f64,
    pub redis_calls_counted: f64,
}

pub fn run(root: &Path, work: &Path, plan: &Plan, redis: &str) -> Result<Overhead> {
    let s: Gunicorn = procs::gunicorn(root, work, Middleware::All, redis)?;
    // The path a configuration requests `route` at.
    let path = |config: Config, route: &str| format!("{}{route}", config.prefix());

    let mut out = Overhead { hooks: objects::agent_tracepoints(root)?, ..Overhead::default() };
    let floor_program = do_nothing_program(&out.hooks);
    // Calibration doubles as warm-up for the app alone; the middlewares get a short warm-up.
    for route in ROUTES {
        let run = load::wrk(s.addr, route, plan.wrk_connections, plan.calibrate_secs)?;
        println!(
            "bench: calibration {route}: {:.0} req/s at saturation",
            run.req_per_s
        );
        out.calibration.insert(route, run.req_per_s);
        out.fixed_rate
            .insert(route, (run.req_per_s * 0.5).round().max(1.0));
        for config in [Config::Timing, Config::Prometheus] {
            load::wrk(s.addr, &path(config, route), plan.wrk_connections, 1)?;
        }
    }

    for round in 0..plan.rounds {
        let mut order = CONFIGS;
        order.rotate_left(round % CONFIGS.len());
        for config in order {
            let agent = match config {
                Config::Wsgiscope => Some(procs::agent(root, work, s.group.pid())?),
                _ => None,
            };
            // Held for the block: stopped when it ends.
            let _floor = match config {
                Config::Hooks => Some(procs::bpftrace(work, &floor_program)?),
                _ => None,
            };
            let ours: Vec<u32> = agent.iter().map(|a| a.group.pid()).collect();
            let counted_before = agent
                .as_ref()
                .map(|a| Snapshot::read(a.metrics))
                .transpose()?;
            let mut completed = 0;
            let cpu = |pid: Option<u32>| pid.map(procs::cpu_seconds).transpose();
            for route in ROUTES {
                for load in [Load::Saturation, Load::Fixed] {
                    let workers0 = procs::children_cpu_seconds(s.group.pid())?;
                    let agent0 = cpu(ours.first().copied())?;
                    let at = path(config, route);
                    let run = match load {
                        Load::Saturation => load::wrk(s.addr, &at, plan.wrk_connections, plan.run_secs)?,
                        Load::Fixed => load::paced(
                            s.addr,
                            &at,
                            out.fixed_rate[route],
                            Duration::from_secs(plan.run_secs),
                            plan.paced_threads,
                        )?,
                    };
                    completed += run.requests;
                    let per_request = |seconds: f64| 1e6 * seconds / run.requests.max(1) as f64;
                    let worker_cpu_us =
                        per_request(procs::children_cpu_seconds(s.group.pid())? - workers0);
                    let agent_cpu_us = cpu(ours.first().copied())?
                        .zip(agent0)
                        .map(|(a1, a0)| per_request(a1 - a0));
                    let foreign_agent = !procs::foreign_agents(&ours).is_empty();
                    println!(
                        "bench: round {} {:<40} {route:<11} {:<10} {:>7.0} req/s p50 {:>7.2} ms p99 {:>7.2} ms, workers {:>6.0} µs CPU/req{}{}",
                        round + 1,
                        config.label(),
                        format!("{load:?}"),
                        run.req_per_s,
                        run.p50_ms,
                        run.p99_ms,
                        worker_cpu_us,
                        if run.errors > 0 { format!(" ({} errors)", run.errors) } else { String::new() },
                        if foreign_agent { " [another wsgiscope agent was running]" } else { "" },
                    );
                    out.measurements.push(Measurement {
                        route,
                        load,
                        config,
                        run,
                        worker_cpu_us,
                        agent_cpu_us,
                        foreign_agent,
                    });
                }
            }
            if let (Some(agent), Some(before)) = (agent, counted_before) {
                let after = wait_counted(agent.metrics, before.requests + completed as f64)?;
                out.agent_lost_events += after.lost - before.lost;
                out.agent_counted += after.requests - before.requests;
                out.client_completed += completed;
                let on_redis =
                    |m: &BTreeMap<String, f64>| m.get(REDIS_LABEL).copied().unwrap_or(0.0);
                out.redis_counted +=
                    on_redis(&after.requests_by_route) - on_redis(&before.requests_by_route);
                out.redis_calls_counted += on_redis(&after.downstream_calls_by_route)
                    - on_redis(&before.downstream_calls_by_route);
            }
        }
    }
    Ok(out)
}

/// bpftrace's program for `Config::Hooks`: an empty action on each of `hooks`.
pub fn do_nothing_program(hooks: &[String]) -> String {
    hooks.iter().map(|h| format!("tracepoint:{h} {{}}")).collect::<Vec<_>>().join(" ")
}
