//! The live views' JSON API against real servers: every request of a known workload appears in
//! /api/requests exactly once, with the route, status, worker, blocks and duration /metrics and
//! the app's own middleware give it; requests in progress show in /api/active with what they
//! are doing (sleeping in the app, waiting on a downstream peer) while they run; /api/routes
//! counts the last minute.
use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use wsgiscope_integration::{
    get, http_get, serial,
    services::Downstream,
    unix_now, Agent, Server, UwsgiMode,
};

/// GET a JSON document from the agent.
fn api(agent: &Agent, path: &str) -> Value {
    let (status, body) = http_get(&agent.metrics_url, path).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Every record after cursor 0, read in pages of `limit`.
fn all_requests(agent: &Agent, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = api(agent, &format!("/api/requests?since={since}&limit={limit}"));
        assert_eq!(page["api_version"], 1);
        assert_eq!(page["missed"], 0, "nothing dropped from a ring of 10,000");
        let records = page["requests"].as_array().unwrap();
        assert!(records.len() <= limit);
        for r in records {
            let seq = r["seq"].as_u64().unwrap();
            assert!(seq > since, "records come after the cursor, in order");
            since = seq;
            out.push(r.clone());
        }
        assert_eq!(page["cursor"].as_u64().unwrap(), since);
        if !page["more"].as_bool().unwrap() {
            return out;
        }
    }
}

/// A known workload, the app's log of it, the API's records and /metrics must agree.
/// `error_status`: what the server answers when the app raises (uWSGI closes without a
/// response: `None`).
fn every_request_once(server: &Server, agent: &Agent, error_status: Option<u16>) {
    let routes: &[(&str, usize)] = &[("/hello", 12), ("/sleep", 4), ("/blocks", 3), ("/error", 3), ("/page/x", 2)];
    let mut sent = 0;
    for &(path, n) in routes {
        for _ in 0..n {
            let r = get(server.port, path);
            if path == "/error" {
                assert_eq!(r.ok().map(|r| r.status), error_status, "{path}");
            } else {
                r.unwrap();
            }
            sent += 1;
        }
    }
    let m = agent.metrics_when("every request", |m| m.sum("wsgi_requests_total", &[]) as usize >= sent);
    let truth = server.truth();
    assert_eq!(truth.len(), sent, "the middleware logged every request");
    let records = all_requests(agent, 7);
    assert_eq!(records.len(), sent, "each request once in /api/requests");

    // Worker slots as /metrics gives them.
    let slots: BTreeMap<u32, u64> = m
        .series("wsgi_worker_info", &[])
        .map(|(l, _)| (l["pid"].parse().unwrap(), l["worker"].parse().unwrap()))
        .collect();
    // Per process, in the order it served them, the records match the app's own log.
    let mut by_pid: BTreeMap<u32, Vec<&Value>> = BTreeMap::new();
    // Per /sleep request: the agent's duration less the app's, and the app's.
    let mut sleep_gaps: Vec<(f64, f64)> = Vec::new();
    for r in &records {
        by_pid.entry(r["pid"].as_u64().unwrap() as u32).or_default().push(r);
    }
    for (pid, rs) in &mut by_pid {
        rs.sort_by(|a, b| a["start"].as_f64().unwrap().total_cmp(&b["start"].as_f64().unwrap()));
        let app: Vec<_> = truth.iter().filter(|t| t.pid == *pid).collect();
        assert_eq!(rs.len(), app.len(), "process {pid}: requests");
        for (r, t) in rs.iter().zip(&app) {
            let route = if t.route.starts_with("/page/") { "/page/x" } else { t.route.as_str() };
            assert_eq!(r["route"], route, "process {pid}: {r}");
            assert_eq!(r["method"], "GET");
            if t.route == "/error" {
                assert_eq!(r["status"].as_u64(), error_status.map(u64::from), "{r}");
                assert_eq!(r["outcome"], if error_status.is_some() { "error" } else { "no_response" }, "{r}");
            } else {
                assert_eq!(r["status"].as_u64(), Some(t.status as u64), "{r}");
                assert_eq!(r["outcome"], "ok", "{r}");
            }
            assert_eq!(r["blocks"].as_u64(), Some(t.blocks), "{r}");
            assert_eq!(r["worker"].as_u64(), Some(slots[pid]), "{r}: the slot /metrics gives process {pid}");
            let (d, e) = (r["duration"].as_f64().unwrap(), t.elapsed);
            // The agent's span runs from the first byte read to the last written: the server
            // read the request before it called the app and writes the last block after the app
            // handed it over, so no span is shorter than the app's time to that hand-over.
            assert!(d >= t.handed - 5e-6, "{r}: duration {d} vs the app's {} to its last block", t.handed);
            if t.route == "/sleep" {
                sleep_gaps.push((d - e, e));
            }
            assert!(r["end"].as_f64().unwrap() - r["start"].as_f64().unwrap() - d < 1e-6);
            assert!(r["cpu_time"].as_f64().is_some_and(|c| c > 0.0), "{r}: CPU time");
            assert!(r["calls"].as_array().unwrap().is_empty());
            for private in ["query", "headers", "body"] {
                assert!(r.get(private).is_none());
            }
        }
    }
    // Durations are the ones /metrics counts (the same values, summed per route), and the sleep
    // route's mean is within the middleware's timing as the metrics tests bound it.
    for &(path, n) in routes {
        let rs: Vec<&Value> = records.iter().filter(|r| r["route"] == path).collect();
        assert_eq!(rs.len(), n, "{path}");
        let sum: f64 = rs.iter().map(|r| r["duration"].as_f64().unwrap()).sum();
        let metric = m.sum("wsgi_request_duration_seconds_sum", &[("route", path)]);
        assert!((sum - metric).abs() <= 1e-6 * n as f64, "{path}: API durations {sum} vs /metrics {metric}");
        let blocks: u64 = rs.iter().map(|r| r["blocks"].as_u64().unwrap()).sum();
        assert_eq!(blocks as f64, m.sum("wsgi_response_blocks_sum", &[("route", path)]), "{path}: blocks");
    }
    // The sleep route's median gap to the middleware is within the metrics tests' bound. The
    // gap is real server time: gunicorn parses before the call, and sends its chunked body's
    // terminator after close(), after the middleware has logged (strace: 0.3–0.5 ms here). The
    // median, not the mean: on a busy host one request whose worker waited for a CPU in those
    // moments is really slower, and would move a mean of four.
    assert_eq!(sleep_gaps.len(), 4);
    sleep_gaps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (gap, e) = sleep_gaps[sleep_gaps.len() / 2];
    let tolerance = (e * 0.02).max(100e-6);
    assert!(gap.abs() <= tolerance, "sleep: median gap {gap} s to the middleware's {e} s (±{tolerance}); all: {sleep_gaps:?}");

    // The minute's route table counts the same requests.
    let table = api(agent, "/api/routes");
    let by_route: BTreeMap<String, &Value> =
        table["routes"].as_array().unwrap().iter().map(|r| (r["route"].as_str().unwrap().to_string(), r)).collect();
    for &(path, n) in routes {
        let r = by_route.get(path).unwrap_or_else(|| panic!("{path} in /api/routes: {table}"));
        assert_eq!(r["requests"].as_u64(), Some(n as u64), "{path}");
        let errors = if path == "/error" { 1.0 } else { 0.0 };
        assert_eq!(r["error_ratio"].as_f64(), Some(errors), "{path}");
        assert!(r["p50"].as_f64().unwrap() <= r["p99"].as_f64().unwrap());
    }
    let sleep = by_route["/sleep"];
    assert!(sleep["p50"].as_f64().unwrap() >= 0.05 && sleep["p99"].as_f64().unwrap() >= 0.05);
    // Sorted by total time: the sleep route (4 × 50 ms) leads.
    assert_eq!(table["routes"][0]["route"], "/sleep", "{table}");
}

/// The in-flight request of `route` once /api/active shows it, with its worker.
fn wait_active(agent: &Agent, route: &str, doing: &str) -> (Value, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active = api(agent, "/api/active");
        for w in active["workers"].as_array().unwrap() {
            for r in w["requests"].as_array().unwrap() {
                if r["route"] == route && r["doing"] == doing {
                    return (w.clone(), r.clone());
                }
            }
        }
        assert!(Instant::now() < deadline, "no {route} request doing {doing} in /api/active: {active}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Every worker idle (the request ended), within a few scans.
fn wait_idle(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let active = api(agent, "/api/active");
        let workers = active["workers"].as_array().unwrap();
        if !workers.is_empty() && workers.iter().all(|w| w["state"] == "idle" && w["requests"] == Value::Array(vec![])) {
            return;
        }
        assert!(Instant::now() < deadline, "workers still busy: {active}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A request sleeping in the app shows as busy in the application, off CPU, for as long as it
/// has run; the other workers idle.
fn a_sleeping_request_is_active(server: &Server, agent: &Agent) {
    let port = server.port;
    let sent_at = unix_now();
    let client = thread::spawn(move || get(port, "/sleep?ms=3000").unwrap());
    thread::sleep(Duration::from_millis(1200));
    let (worker, r) = wait_active(agent, "/sleep", "application");
    let seen_at = unix_now();
    assert_eq!(worker["state"], "busy");
    assert!(server.workers().contains(&(worker["pid"].as_u64().unwrap() as u32)), "{worker}");
    assert_eq!(r["method"], "GET");
    assert_eq!(r["on_cpu"], false, "sleeping: off CPU ({r})");
    assert!(r["cpu_time"].as_f64().unwrap() < 0.2, "{r}");
    let elapsed = r["elapsed"].as_f64().unwrap();
    // Scans are 500 ms apart: the elapsed time is that of the last scan.
    assert!(elapsed > seen_at - sent_at - 0.7 && elapsed <= seen_at - sent_at + 0.05, "elapsed {elapsed}");
    assert!((r["start"].as_f64().unwrap() - sent_at).abs() < 0.2, "{r}");
    let idle = api(agent, "/api/active")["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "idle")
        .count();
    assert_eq!(idle, server.workers().len() - 1, "the other workers are idle");
    client.join().unwrap();
    wait_idle(agent);
}

#[test]
fn gunicorn_every_request_once_and_what_runs_now() {
    let _serial = serial();
    let mut server = Server::gunicorn(&["-w", "2", "-k", "sync"]).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    // Both workers listed, idle, before any request (from the first scan on).
    wait_idle(&agent);
    let active = api(&agent, "/api/active");
    let mut pids: Vec<u32> = active["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap() as u32).collect();
    pids.sort_unstable();
    assert_eq!(pids, server.workers(), "{active}");
    every_request_once(&server, &agent, Some(500));
    a_sleeping_request_is_active(&server, &agent);
    server.stop();
}

#[test]
fn uwsgi_every_request_once_and_what_runs_now() {
    let _serial = serial();
    let mut server = Server::uwsgi(UwsgiMode::HttpSocket, 2).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    every_request_once(&server, &agent, None);
    a_sleeping_request_is_active(&server, &agent);
    server.stop();
}

/// A request blocked on a downstream peer shows what it waits for and since when.
fn blocked_on_downstream(server: &Server, d: &Downstream, agent: &Agent) {
    let port = server.port;
    let sent_at = unix_now();
    let client = thread::spawn(move || get(port, "/http/slow?ms=3000").unwrap());
    thread::sleep(Duration::from_millis(1200));
    let (worker, r) = wait_active(agent, "/http/slow", "downstream");
    let seen_at = unix_now();
    assert_eq!(worker["state"], "busy");
    let wait = &r["wait"];
    assert_eq!(wait["protocol"], "http", "{r}");
    assert_eq!(wait["operation"], "GET", "{r}");
    assert_eq!(wait["peer"], format!("127.0.0.1:{}", d.backend.port), "{r}");
    let (elapsed, waiting) = (r["elapsed"].as_f64().unwrap(), r["doing_for"].as_f64().unwrap());
    assert!(waiting <= elapsed && waiting > elapsed - 0.1, "waiting {waiting} of {elapsed} s: the call began at once");
    assert!(elapsed > seen_at - sent_at - 0.7 && elapsed <= seen_at - sent_at + 0.05, "elapsed {elapsed}");
    assert_eq!(r["on_cpu"], false);
    assert_eq!(client.join().unwrap().status, 200);
    // Its record lists the call, with the same peer and operation.
    wait_idle(agent);
    let records = all_requests(agent, 1000);
    let slow = records.iter().find(|r| r["route"] == "/http/slow").expect("the slow request's record");
    let calls = slow["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{slow}");
    assert_eq!((&calls[0]["protocol"], &calls[0]["operation"], &calls[0]["outcome"]), (&wait["protocol"], &wait["operation"], &"ok".into()));
    assert_eq!(calls[0]["peer"], wait["peer"]);
    let call_time = calls[0]["duration"].as_f64().unwrap();
    assert!(call_time >= 3.0 && call_time < slow["duration"].as_f64().unwrap(), "{slow}");
    // The record keeps a call's time in f32 (its list is compact), the sum in f64.
    assert!((slow["downstream_time"].as_f64().unwrap() - call_time).abs() < 1e-5);
}

#[test]
fn a_request_blocked_on_a_downstream_socket_is_active() {
    let _serial = serial();
    let d = Downstream::start().unwrap();
    let server = d.serve(".venv", &["-w", "2", "-k", "sync"], 1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    blocked_on_downstream(&server, &d, &agent);
    drop(agent);
    drop(server);
    let server = d.serve_uwsgi(UwsgiMode::HttpSocket, 2, 1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    blocked_on_downstream(&server, &d, &agent);
}

#[test]
fn ui_off_serves_metrics_only() {
    let _serial = serial();
    let mut server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &["--ui", "off"]).unwrap();
    for path in ["/api/requests", "/api/active", "/api/routes", "/app.js"] {
        assert_eq!(http_get(&agent.metrics_url, path).unwrap().0, 404, "{path}");
    }
    let (status, body) = http_get(&agent.metrics_url, "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("--ui off"), "{body}");
    assert!(agent.metrics().sum("wsgi_workers", &[]) >= 1.0);
    server.stop();
}

/// `--no-cpu-time`: requests are counted and measured as ever (blocks exact), with no CPU time
/// anywhere (the kernel programs read no thread's clock), and the agent says so at start.
#[test]
fn no_cpu_time_leaves_only_cpu_time_out() {
    let _serial = serial();
    let mut server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &["--no-cpu-time"]).unwrap();
    let routes = [("/hello", 3u64, 1u64), ("/blocks", 2, 1000)];
    for (path, n, _) in routes {
        for _ in 0..n {
            get(server.port, path).unwrap();
        }
    }
    let m = agent.metrics_when("5 requests", |m| m.sum("wsgi_requests_total", &[]) >= 5.0);
    assert_eq!(m.sum("wsgi_requests_total", &[]), 5.0, "{}", m.text);
    assert_eq!(m.sum("wsgi_request_cpu_seconds_count", &[]), 0.0, "{}", m.text);
    assert_eq!(m.sum("wsgi_worker_cpu_seconds_total", &[]), 0.0, "{}", m.text);
    let records = all_requests(&agent, 10);
    assert_eq!(records.len(), 5);
    for (path, n, blocks) in routes {
        let rs: Vec<&Value> = records.iter().filter(|r| r["route"] == path).collect();
        assert_eq!(rs.len() as u64, n, "{path}");
        for r in rs {
            assert_eq!(r["blocks"].as_u64(), Some(blocks), "{r}");
            assert!(r["duration"].as_f64().is_some_and(|d| d > 0.0), "{r}");
            assert!(r["cpu_time"].is_null(), "{r}: no CPU time");
        }
    }
    let log = agent.log_text();
    assert!(log.contains("CPU time per request is not measured (--no-cpu-time)"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
    server.stop();
}

/// A client that does not read its response: the worker shows `writing` (inside its write to
/// the client) for as long as it has been blocked there.
#[test]
fn a_worker_blocked_writing_to_a_slow_client_is_active() {
    use std::{io::{Read, Write}, net::TcpStream};
    let _serial = serial();
    let mut server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    wait_idle(&agent);
    // 64 MiB do not fit the socket buffers: the worker blocks in sendto until the client reads.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let sent_at = unix_now();
    write!(s, "GET /big?mb=64 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    thread::sleep(Duration::from_millis(1500));
    let (worker, r) = wait_active(&agent, "/big", "writing");
    assert_eq!(worker["pid"].as_u64(), Some(server.workers()[0] as u64));
    let (elapsed, writing) = (r["elapsed"].as_f64().unwrap(), r["doing_for"].as_f64().unwrap());
    assert!(writing > 0.5 && writing <= elapsed, "blocked writing for {writing} of {elapsed} s");
    assert!(elapsed <= unix_now() - sent_at + 0.05);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    assert!(raw.len() > 64 << 20);
    wait_idle(&agent);
    server.stop();
}
