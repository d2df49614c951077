//! `cargo xtask demo`: wsgiscope end to end. Starts gunicorn with the test app, attaches the agent,
//! sends some traffic, and prints what the agent measured per route; then keeps both running so
//! /metrics can be looked at (or scraped) until Ctrl-C.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use clap::Args;

use crate::{
    cargo,
    group::{self, check_stop, wait_until, Group},
    metrics_text, run_checked, setup,
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
/// one-byte blocks, one big block, an exception, sendfile).
const TRAFFIC: &[(&str, usize)] = &[
    ("/hello", 200),
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
    let log = File::create(&gunicorn_log)?;
    // Dropped in reverse order of declaration, on any error too: the agent first (SIGINT, so it
    // detaches cleanly), then gunicorn (SIGTERM, graceful shutdown).
    let mut gunicorn = Group::spawn(
        "gunicorn",
        Command::new(root.join(".venv/bin/gunicorn"))
            .args(["--no-control-socket", "-w", "2", "-b", &app_addr.to_string(), "--chdir"])
            .arg(root.join("tests/apps"))
            .arg("testapp:app")
            .env_remove("WSGISCOPE_TRUTH_LOG")
            .stdout(log.try_clone()?)
            .stderr(log),
        libc::SIGTERM,
    )?;
    // The venv script is executed directly, so the child is the gunicorn master.
    let master = gunicorn.pid();
    println!(
        "demo: gunicorn master {master} on http://{app_addr} (log: {})",
        gunicorn_log.display()
    );
    // A first answered request shows a worker is up (it happens before attaching: not counted).
    wait_until(
        "gunicorn to answer",
        Duration::from_secs(20),
        &mut [&mut gunicorn],
        || http_get(app_addr, "/hello").is_ok_and(|(status, _)| status == 200),
    )
    .with_context(|| format!("see {}", gunicorn_log.display()))?;

    let mut agent = Group::spawn(
        "target/release/wsgiscope",
        Command::new(root.join("target/release/wsgiscope")).args([
            "attach",
            "--pid",
            &master.to_string(),
            "--listen",
            &args.metrics.to_string(),
        ]),
        libc::SIGINT,
    )?;
    // The agent binds /metrics first but serves it only once attached.
    wait_until(
        "the agent's /metrics",
        Duration::from_secs(60),
        &mut [&mut agent, &mut gunicorn],
        || http_get(args.metrics, "/metrics").is_ok_and(|(status, _)| status == 200),
    )?;

    let sent = drive_traffic(app_addr)?;
    let text = wait_for_counts(args.metrics, sent, &mut [&mut agent, &mut gunicorn])?;
    print_summary(&text)?;

    println!();
    println!(
        "demo: metrics at http://{}/metrics, app at http://{app_addr}",
        args.metrics
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
    while !group::stopping() && deadline.is_none_or(|d| Instant::now() < d) {
        agent.check_alive()?;
        gunicorn.check_alive()?;
        thread::sleep(Duration::from_millis(100));
    }
    println!("demo: stopping");
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
                        let (status, _) =
                            http_get(addr, route).with_context(|| format!("GET {route}"))?;
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
fn wait_for_counts(metrics: SocketAddr, sent: usize, alive: &mut [&mut Group]) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get(metrics, "/metrics").context("GET /metrics")?;
        let text = String::from_utf8(body).context("/metrics is not UTF-8")?;
        let samples = metrics_text::parse(&text)?;
        let counted: f64 = samples
            .iter()
            .filter(|s| s.name == "wsgi_requests_total")
            .map(|s| s.value)
            .sum();
        if counted as usize >= sent {
            return Ok(text);
        }
        check_stop()?;
        for group in alive.iter_mut() {
            group.check_alive()?;
        }
        if Instant::now() > deadline {
            println!("demo: note: the agent counted {counted} of the {sent} requests sent");
            return Ok(text);
        }
        thread::sleep(Duration::from_millis(250));
    }
}

fn print_summary(text: &str) -> Result<()> {
    use metrics_text::{histograms_by, sum_by};
    let samples = metrics_text::parse(text)?;
    let requests = sum_by(&samples, "wsgi_requests_total", "route");
    let duration = histograms_by(&samples, "wsgi_request_duration_seconds", "route");
    let write_time = histograms_by(&samples, "wsgi_response_write_seconds", "route");
    let blocks = histograms_by(&samples, "wsgi_response_blocks", "route");
    let bytes = histograms_by(&samples, "wsgi_response_bytes", "route");
    let write_calls = sum_by(&samples, "wsgi_response_write_calls_total", "route");

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
    Ok(())
}

/// A minimal HTTP/1.1 GET: one request per connection, read to EOF. Returns status and body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let header_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete response from {addr}{path}"))?;
    let head = String::from_utf8_lossy(&response[..header_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line from {addr}{path}"))?;
    let body = response.split_off(header_end + 4);
    if head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        return Ok((status, dechunk(&body)?));
    }
    Ok((status, body))
}

/// Decodes a chunked body (`<hex size>\r\n<data>\r\n` ... `0\r\n\r\n`).
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size_field = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_field.split(';').next().unwrap_or("").trim(), 16)?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

