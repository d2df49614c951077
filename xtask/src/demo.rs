//! `cargo xtask demo`: wsgiscope end to end. Starts a Redis and an HTTP backend, gunicorn with the
//! test app calling them, attaches the agent, sends some traffic, and prints what the agent
//! measured per route and where each route's time went; then keeps everything running so /metrics
//! can be looked at (or scraped) until Ctrl-C.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use wsgiscope_devkit::{apps_dir, gunicorn::Gunicorn, http, Metrics};

use crate::{
    cargo,
    group::{self, check_stop, Group},
    run_checked, setup,
};

#[derive(Args)]
pub struct DemoArgs {
    /// Seconds to keep running after the summary (default: until Ctrl-C; 0 exits right away).
    #[arg(long)]
    duration: Option<u64>,
    /// Port for gunicorn on 127.0.0.1.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Address of the agent's /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: SocketAddr,
}

/// Requests per route: every kind of response the test app has (one block, slow, many blocks,
/// one-byte blocks, one big block, an exception, sendfile), and downstream calls (20 Redis GETs
/// in a loop: an N+1; two GETs, an HTTP call and 2 ms of CPU).
const TRAFFIC: &[(&str, usize)] = &[
    ("/hello", 200),
    ("/redis", 30),
    ("/api", 50),
    ("/sleep", 20),
    ("/blocks", 50),
    ("/bytes1", 3),
    ("/big", 20),
    ("/error", 10),
    ("/file", 20),
];
const CLIENT_THREADS: usize = 4;

pub fn run(root: &Path, args: &DemoArgs) -> Result<()> {
    group::catch_stop();
    setup::run(root)?;
    run_checked(cargo(root).args(["build", "--release", "-p", "wsgiscope"]))?;
    check_stop()?;

    let app_addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    for addr in [app_addr, args.metrics] {
        // Fail early and clearly rather than through gunicorn's bind retries or the agent's error.
        TcpListener::bind(addr).with_context(|| format!("{addr} is not free (see `ss -ltn`)"))?;
    }
    let log_dir = root.join("target/xtask-demo");
    std::fs::create_dir_all(&log_dir)?;
    let gunicorn_log = log_dir.join("gunicorn.log");
    // Dropped in reverse order of declaration, on any error too: the agent first (SIGINT, so it
    // detaches cleanly), then gunicorn (SIGTERM, graceful shutdown), then what it calls.
    let (mut redis, redis_url) = group::redis(&log_dir)?;
    let (mut backend, backend_url) = start_backend(root, &log_dir)?;
    let spec = Gunicorn::new(app_addr, apps_dir(), "testapp:app").args(&["-w", "2"]);
    let mut cmd = spec.command(root)?;
    cmd.env("TESTAPP_REDIS", &redis_url).env("TESTAPP_BACKEND", &backend_url);
    let mut gunicorn = group::gunicorn("gunicorn", cmd, app_addr, &gunicorn_log)?;
    println!("demo: Redis at {redis_url}, HTTP backend at {backend_url} (the test app's /redis and /api call them)");
    // The venv script is executed directly, so the child is the gunicorn master.
    let master = gunicorn.pid();
    println!(
        "demo: gunicorn master {master} on http://{app_addr} (log: {})",
        gunicorn_log.display()
    );
    let mut agent = group::attach_agent(root, master, args.metrics, None, &mut [&mut gunicorn])?;

    let sent = drive_traffic(app_addr)?;
    let metrics = wait_for_counts(args.metrics, sent, &mut [&mut agent, &mut gunicorn])?;
    print_summary(&metrics);
    print_time_shares(&metrics);

    println!();
    println!(
        "demo: metrics at http://{}/metrics, app at http://{app_addr}",
        args.metrics
    );
    println!(
        "demo: live page (every request, every worker now, routes) at http://{}/ ; in a terminal: \
         target/release/wsgiscope top --url http://{}",
        args.metrics, args.metrics
    );
    let deadline = match args.duration {
        Some(0) => return Ok(()),
        Some(secs) => {
            println!("demo: running for {secs} s (Ctrl-C stops earlier)");
            Some(Instant::now() + Duration::from_secs(secs))
        }
        None => {
            println!("demo: running until Ctrl-C");
            None
        }
    };
    // A trickle of traffic keeps the live page moving: each route of the table in turn, and
    // now and then a slow one (a worker visibly busy in the page's Active Service panel).
    let trickle = std::sync::atomic::AtomicBool::new(true);
    let result = thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0usize;
            while trickle.load(Ordering::Relaxed) {
                let route = if i.is_multiple_of(40) { "/sleep?ms=3000" } else { TRAFFIC[i % TRAFFIC.len()].0 };
                let _ = http::get_status(app_addr, route);
                i += 1;
                thread::sleep(Duration::from_millis(100));
            }
        });
        let r = keep_running(deadline, &mut agent, &mut gunicorn, &mut redis, &mut backend);
        trickle.store(false, Ordering::Relaxed);
        r
    });
    result?;
    println!("demo: stopping");
    Ok(())
}

/// Until Ctrl-C or the deadline, as long as every process lives.
fn keep_running(deadline: Option<Instant>, agent: &mut Group, gunicorn: &mut Group, redis: &mut Group, backend: &mut Group) -> Result<()> {
    while !group::stopping() && deadline.is_none_or(|d| Instant::now() < d) {
        agent.check_alive()?;
        gunicorn.check_alive()?;
        redis.check_alive()?;
        backend.check_alive()?;
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Sends TRAFFIC from a few client threads at once (the server has two workers); returns the count.
fn drive_traffic(addr: SocketAddr) -> Result<usize> {
    // Interleaved so that slow and fast routes overlap, as on a real server.
    let mut queue: Vec<&str> = Vec::new();
    let longest = TRAFFIC.iter().map(|&(_, n)| n).max().unwrap_or(0);
    for i in 0..longest {
        queue.extend(
            TRAFFIC
                .iter()
                .filter(|&&(_, n)| i < n)
                .map(|&(route, _)| route),
        );
    }
    let next = AtomicUsize::new(0);
    let statuses: Mutex<BTreeMap<u16, usize>> = Mutex::default();
    let started = Instant::now();
    thread::scope(|s| {
        let workers: Vec<_> = (0..CLIENT_THREADS)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    while let Some(route) = queue.get(next.fetch_add(1, Ordering::Relaxed)) {
                        check_stop()?;
                        let status = http::get_status(addr, route)?;
                        *statuses.lock().unwrap().entry(status).or_default() += 1;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| anyhow!("client thread panicked"))?)
    })?;
    let statuses: Vec<String> = statuses
        .into_inner()
        .unwrap()
        .iter()
        .map(|(status, n)| format!("{n} × {status}"))
        .collect();
    println!(
        "demo: sent {} requests over {CLIENT_THREADS} connections at a time in {:.2} s: {} (/error answers 500)",
        queue.len(),
        started.elapsed().as_secs_f64(),
        statuses.join(", ")
    );
    Ok(queue.len())
}

/// The agent reports a request once its kernel events are read; give it a moment to count them all.
fn wait_for_counts(metrics: SocketAddr, sent: usize, alive: &mut [&mut Group]) -> Result<Metrics> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = Metrics::parse(&http::scrape(metrics)?)?;
        let counted = metrics.sum("wsgi_requests_total", &[]);
        if counted as usize >= sent {
            return Ok(metrics);
        }
        check_stop()?;
        for group in alive.iter_mut() {
            group.check_alive()?;
        }
        if Instant::now() > deadline {
            println!("demo: note: the agent counted {counted} of the {sent} requests sent");
            return Ok(metrics);
        }
        thread::sleep(Duration::from_millis(250));
    }
}

fn print_summary(m: &Metrics) {
    let requests = m.sum_by("wsgi_requests_total", "route");
    let duration = m.histograms_by("wsgi_request_duration_seconds", "route");
    let write_time = m.histograms_by("wsgi_response_write_seconds", "route");
    let blocks = m.histograms_by("wsgi_response_blocks", "route");
    let bytes = m.histograms_by("wsgi_response_bytes", "route");
    let write_calls = m.sum_by("wsgi_response_write_calls_total", "route");

    // Our routes in traffic order, then anything else the agent reported.
    let mut routes: Vec<&str> = TRAFFIC
        .iter()
        .map(|&(r, _)| r)
        .filter(|r| requests.contains_key(*r))
        .collect();
    routes.extend(
        requests
            .keys()
            .map(String::as_str)
            .filter(|r| !TRAFFIC.iter().any(|(t, _)| t == r)),
    );

    let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.2}", s * 1e3));
    let num =
        |v: Option<f64>, decimals: usize| v.map_or("-".to_string(), |x| format!("{x:.decimals$}"));
    println!();
    println!(
        "{:<8} {:>8} {:>8} {:>8} {:>8} {:>12} {:>12} {:>10} {:>11}",
        "route",
        "requests",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "blocks/resp",
        "bytes/resp",
        "write ms",
        "write calls"
    );
    for route in routes {
        let d = duration.get(route);
        let q = |q: f64| d.and_then(|h| h.quantile(q));
        println!(
            "{:<8} {:>8} {:>8} {:>8} {:>8} {:>12} {:>12} {:>10} {:>11}",
            route,
            requests.get(route).copied().unwrap_or(0.0),
            ms(q(0.5)),
            ms(q(0.95)),
            ms(q(0.99)),
            num(blocks.get(route).and_then(|h| h.mean()), 1),
            num(bytes.get(route).and_then(|h| h.mean()), 0),
            ms(write_time.get(route).and_then(|h| h.mean())),
            num(write_calls.get(route).copied(), 0),
        );
    }
    println!("(quantiles estimated from histogram buckets; blocks, bytes and write time are means per response)");
}

/// tests/apps/backend.py under gunicorn gthread (keep-alive): the HTTP service /api calls.
fn start_backend(root: &Path, log_dir: &Path) -> Result<(Group, String)> {
    let addr = wsgiscope_devkit::free_addr()?;
    let log_path = log_dir.join("backend.log");
    let log = std::fs::File::create(&log_path)?;
    let spec = Gunicorn::new(addr, apps_dir(), "backend:app").args(&["-w", "1", "-k", "gthread", "--threads", "4", "--keep-alive", "3600"]);
    let mut cmd = spec.command(root)?;
    cmd.stdout(log.try_clone()?).stderr(log);
    let mut backend = Group::spawn("backend", &mut cmd, libc::SIGTERM)?;
    group::wait_until("the HTTP backend", Duration::from_secs(30), &mut [&mut backend], || {
        http::get_status(addr, "/ok").is_ok_and(|s| s == 200)
    })
    .with_context(|| format!("see {}", log_path.display()))?;
    Ok((backend, format!("http://{addr}")))
}

/// One line per route: where its time went, as shares of its total duration (CPU, downstream
/// calls per protocol, GC, writing, the rest waiting). GC is part of CPU and writing includes
/// the kernel's CPU for the writes, so the shares overlap a little.
fn print_time_shares(m: &Metrics) {
    let requests = m.sum_by("wsgi_requests_total", "route");
    let protocols: Vec<String> = m.sum_by("wsgi_request_downstream_seconds_sum", "protocol").into_keys().collect();
    let mut routes: Vec<&str> = TRAFFIC.iter().map(|&(r, _)| r).filter(|r| requests.contains_key(*r)).collect();
    routes.extend(requests.keys().map(String::as_str).filter(|r| !TRAFFIC.iter().any(|(t, _)| t == r)));
    println!();
    println!("where the time goes (share of each route's total duration):");
    let mut header = format!("{:<8} {:>9} {:>6}", "route", "mean ms", "CPU");
    for p in &protocols {
        header.push_str(&format!(" {:>10}", p));
    }
    header.push_str(&format!(" {:>6} {:>6} {:>6} {:>10}", "GC", "write", "other", "calls/req"));
    println!("{header}");
    for route in routes {
        let r = [("route", route)];
        let n = requests.get(route).copied().unwrap_or(0.0);
        let total = m.sum("wsgi_request_duration_seconds_sum", &r);
        if n == 0.0 || total <= 0.0 {
            continue;
        }
        let share = |s: f64| format!("{:.0} %", 100.0 * s / total);
        let cpu = m.sum("wsgi_request_cpu_seconds_sum", &r);
        let write = m.sum("wsgi_response_write_seconds_sum", &r);
        let gc = m.sum("wsgi_request_gc_seconds_sum", &r);
        let mut line = format!("{:<8} {:>9.2} {:>6}", route, 1e3 * total / n, share(cpu));
        let mut downstream = 0.0;
        for p in &protocols {
            let s = m.sum("wsgi_request_downstream_seconds_sum", &[("route", route), ("protocol", p)]);
            downstream += s;
            line.push_str(&format!(" {:>10}", if s > 0.0 { share(s) } else { "-".to_string() }));
        }
        let other = (total - cpu - downstream - write).max(0.0);
        let calls = m.sum("wsgi_request_downstream_calls_sum", &r) / n;
        let calls = if calls > 0.0 { format!("{calls:.1}") } else { "-".to_string() };
        line.push_str(&format!(" {:>6} {:>6} {:>6} {:>10}", share(gc), share(write), share(other), calls));
        println!("{line}");
    }
    let repeated = m.sum_by("wsgi_repeated_call_requests_total", "route");
    for (route, n) in repeated.iter().filter(|(_, n)| **n > 0.0) {
        println!("N+1: {n} requests of {route} repeated one downstream call 20 times or more (see the agent's log for the query and the fix)");
    }
}
