//! Memory growth per route, from the kernel's per-mm resident-page counters read at each
//! request's start and end: a route that keeps 1 MiB per request grows its worker by ≈ 1 MiB
//! per request (mean over 20 within 10 %), one that allocates and frees by ≈ 0, under gunicorn
//! and uWSGI; workers recycled by `--max-requests` show the growth that led there.
use wsgiscope_integration::{get, serial, Agent, Metrics, Server, UwsgiMode};

const MIB: f64 = 1048576.0;

fn growth(m: &Metrics, route: &str) -> (f64, f64) {
    let l = [("route", route)];
    (m.sum("wsgi_request_memory_growth_bytes_sum", &l), m.sum("wsgi_request_memory_growth_bytes_count", &l))
}

/// `n` requests of `path`; the agent's mean growth over them (from the histogram's sum and
/// count before and after).
fn mean_growth(server: &Server, agent: &Agent, path: &str, n: usize) -> f64 {
    let before = agent.metrics();
    let counted = before.sum("wsgi_requests_total", &[]);
    for _ in 0..n {
        assert_eq!(get(server.port, path).unwrap().status, 200);
    }
    let after = agent.metrics_when("the requests", |m| m.sum("wsgi_requests_total", &[]) >= counted + n as f64);
    let ((s0, c0), (s1, c1)) = (growth(&before, path), growth(&after, path));
    assert_eq!(c1 - c0, n as f64, "{path}: every request has its growth measured");
    (s1 - s0) / n as f64
}

fn grow_and_churn(server: &Server, agent: &Agent) {
    // The allocator's first large blocks come from fresh mappings and the heap then grows to
    // hold them: real growth, but not what the churn route does per request once warm.
    for path in ["/churn", "/churn", "/churn", "/grow"] {
        get(server.port, path).unwrap();
    }
    agent.metrics_when("the warm-up", |m| m.sum("wsgi_requests_total", &[]) >= 4.0);
    let grow = mean_growth(server, agent, "/grow", 20);
    assert!((grow - MIB).abs() <= 0.1 * MIB, "/grow: {grow} bytes per request, not ≈ 1 MiB");
    let churn = mean_growth(server, agent, "/churn", 20);
    assert!(churn <= 0.05 * MIB, "/churn: {churn} bytes per request, not ≈ 0");
    // The same figure per request in the live API.
    let grown: Vec<i64> = agent
        .requests()
        .iter()
        .filter(|r| r["route"] == "/grow")
        .map(|r| r["memory_growth"].as_i64().expect("growth measured"))
        .collect();
    assert_eq!(grown.len(), 21);
    let mean = grown[1..].iter().sum::<i64>() as f64 / 20.0;
    assert!((mean - grow).abs() < 1.0, "API {mean} vs /metrics {grow}");
}

#[test]
fn gunicorn_growth_per_route() {
    let _serial = serial();
    let mut server = Server::gunicorn(&["-w", "1", "-k", "sync"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    grow_and_churn(&server, &agent);
    server.stop();
}

#[test]
fn uwsgi_growth_per_route() {
    let _serial = serial();
    let mut server = Server::uwsgi(UwsgiMode::HttpSocket, 1).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    grow_and_churn(&server, &agent);
    server.stop();
}

/// A worker recycled every 10 requests: each of its requests shows the 1 MiB it kept, so the
/// route that makes workers grow until they are recycled is one query away.
#[test]
fn workers_recycled_by_max_requests_show_the_growth_that_led_there() {
    let _serial = serial();
    let mut server = Server::gunicorn(&["-w", "1", "-k", "sync", "--max-requests", "10"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    let mean = mean_growth(&server, &agent, "/grow", 25);
    assert!((mean - MIB).abs() <= 0.1 * MIB, "/grow: {mean} bytes per request");
    let m = agent.metrics_when("two recycles", |m| m.sum("wsgi_worker_exits_total", &[("reason", "recycled")]) >= 2.0);
    assert_eq!(m.sum("wsgi_worker_exits_total", &[("reason", "crashed")]), 0.0);
    server.stop();
}
