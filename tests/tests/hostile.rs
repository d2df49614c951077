//! Hostile traffic, as a scanner or an attacker sends it, against real servers: paths with
//! quotes, backslashes, newlines, control characters and invalid UTF-8; request lines of 500 B,
//! 4 KB and 8 KB; 100-continue uploads; pipelined requests; a 4,000-path scan. Every request is
//! counted exactly (against what the clients received and the servers' access logs), every
//! scrape passes `promtool check metrics`, and a real Prometheus keeps the target up.
use std::{
    collections::BTreeMap,
    io::Write,
    process::Command,
    time::{Duration, Instant},
};

use wsgiscope_integration::{scrape, serial, wire, Agent, Metrics, Prometheus, Server, TempDir, UwsgiMode};

/// Sends `bytes` on a new connection and returns the final statuses of the responses read back
/// (interim 1xx ones skipped) until the server closes or goes quiet (the test app's bodies hold
/// no `HTTP/1.` text).
fn send_raw(port: u16, bytes: &[u8]) -> Vec<u16> {
    wire::final_statuses(&wire::send_raw(port, bytes, Duration::from_millis(1500)).unwrap())
}

fn request(path: &[u8]) -> Vec<u8> {
    let mut r = b"GET ".to_vec();
    r.extend_from_slice(path);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: wsgiscope-test\r\nConnection: close\r\n\r\n");
    r
}

/// Requests a client can send one per connection: hostile paths and long request lines.
fn hostile_requests() -> Vec<Vec<u8>> {
    // Below /page/ the app answers 200, so these paths get routes of their own.
    let mut out: Vec<Vec<u8>> = [
        &b"/page/q\"x"[..],
        b"/page/a\\b",
        b"/page/nl%0Ainjected%22%7D%0Aevil_total%201",
        b"/page/raw\nline",
        b"/page/ctl\x01\x7f",
        b"/page/caf\xe9",
        b"/page/caf%E9%01",
        b"/page/sp ace",
    ]
    .iter()
    .map(|p| request(p))
    .collect();
    // 500 B (the kernel keeps 512 bytes of the head: the path is whole, the query cut), a 600 B
    // and a 4 KB path (cut: route "other"), and 8 KB (longer than the servers allow).
    out.push(request(format!("/upload?{}", "a".repeat(492)).as_bytes()));
    out.push(request(format!("/page/{}", "p".repeat(600)).as_bytes()));
    out.push(request(format!("/page/{}", "p".repeat(3900)).as_bytes()));
    out.push(request(format!("/hello?{}", "a".repeat(8000)).as_bytes()));
    out
}

/// Three requests in one write; the last asks the server to close.
const PIPELINED: &[u8] = b"GET /page/p1 HTTP/1.1\r\nHost: a\r\n\r\nGET /page/p2?x=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

/// A 100-continue upload (curl sends `Expect: 100-continue` for bodies over 1 MiB): the status.
fn upload(port: u16, path: &str, body: &std::path::Path) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect: 100-continue", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).parse().expect("curl printed a status")
}

/// `promtool check metrics` on a scrape as Prometheus' classic text parser reads it.
fn promtool_check(agent: &Agent) {
    let text = scrape(&agent.metrics_url).unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}): {}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requests per status in the agent's metrics.
fn by_status(m: &Metrics, service: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (labels, v) in m.series("wsgi_requests_total", &[("service", service)]) {
        *out.entry(labels["status"].clone()).or_default() += v as u64;
    }
    out
}

fn count(statuses: &[u16]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in statuses {
        *out.entry(s.to_string()).or_default() += 1;
    }
    out
}

/// A scanner: 2,000 unknown paths (404) and 2,000 distinct paths a catch-all answers with 200.
fn scan(port: u16) -> Vec<u16> {
    let mut got = Vec::new();
    for i in 0..2000u32 {
        got.extend(send_raw(port, &request(format!("/wp-admin/x{i:05}.php").as_bytes())));
        got.extend(send_raw(port, &request(format!("/page/scan-{i}-page").as_bytes())));
    }
    got
}

/// Everything a client receives: hostile requests, a scan, then normal traffic.
fn drive(port: u16, agent: &Agent, dir: &TempDir) -> Vec<u16> {
    let mut got = Vec::new();
    for r in hostile_requests() {
        got.extend(send_raw(port, &r));
        promtool_check(agent);
    }
    got.extend(send_raw(port, PIPELINED));
    let body = dir.0.join("upload.bin");
    std::fs::write(&body, vec![b'u'; 2 << 20]).unwrap();
    got.push(upload(port, "/upload", &body));
    got.push(upload(port, "/upload?fail=1", &body));
    promtool_check(agent);
    got.extend(scan(port));
    promtool_check(agent);
    // After the scan filled the cap, a new route: /hello gets a place at its second request.
    for _ in 0..20 {
        got.extend(send_raw(port, &request(b"/hello")));
    }
    promtool_check(agent);
    got
}

/// Waits until the agent has counted `n` requests of `service`.
fn settled(agent: &Agent, service: &str, n: u64) -> Metrics {
    agent.metrics_when(&format!("{n} requests"), |m| m.sum("wsgi_requests_total", &[("service", service)]) >= n as f64)
}

/// The agent's route counts (all statuses) and the checks every server shares.
fn check_common(m: &Metrics, service: &str, hello_sent: u64) {
    let route = |r: &str| m.sum("wsgi_requests_total", &[("service", service), ("route", r)]) as u64;
    assert_eq!(route("/hello"), hello_sent - 1, "the first /hello after the scan waits for a place\n{}", m.text);
    assert_eq!(m.sum("wsgiscope_route_evictions_total", &[]), 1.0, "/hello took the place of one scan path");
    assert_eq!(m.sum("wsgi_worker_requests_total", &[]), m.sum("wsgi_requests_total", &[]), "retired series stay");
    assert_eq!(m.sum("wsgiscope_unparsed_requests_total", &[]), 0.0);
    assert!(m.sum("wsgiscope_truncated_requests_total", &[]) >= 2.0, "the 600 B and 4 KB paths");
    let want = [("service", service)];
    let routes: std::collections::BTreeSet<&str> = m.series("wsgi_requests_total", &want).map(|(l, _)| l["route"].as_str()).collect();
    assert!(routes.len() <= 52, "50 routes, other and a template at most: {routes:?}");
    assert!(!routes.iter().any(|r| r.starts_with("/wp-admin")), "404s take no place: {routes:?}");
    assert!(!m.text.contains("aaaa"), "no query string exported");
}

/// A real Prometheus scraped the agent every second through all of it: never down.
fn check_prometheus(prom: &Prometheus, total: u64, service: &str, route: &str) {
    prom.wait_for_scrape_after(wsgiscope_integration::unix_now());
    let job = &prom.job;
    assert_eq!(prom.one(&format!("min_over_time(up{{job=\"{job}\"}}[10m])"), None), 1.0, "{}", prom.log());
    let scrapes = prom.one(&format!("count_over_time(up{{job=\"{job}\"}}[10m])"), None);
    assert!(scrapes >= 3.0, "scraped all along: {scrapes} scrapes");
    let quoted = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let sum = prom.one(&format!("sum(wsgi_requests_total{{job=\"{job}\",service=\"{}\"}})", quoted(service)), None);
    assert_eq!(sum as u64, total);
    // The hostile route came through as the client sent it.
    let q = format!("sum(wsgi_requests_total{{job=\"{job}\",route=\"{}\"}})", quoted(route));
    assert_eq!(prom.one(&q, None), 1.0, "{q}");
}

fn hostile_gunicorn(service: &str, worker_args: &[&str]) {
    let _serial = serial();
    let dir = TempDir::new("hostile");
    let log = dir.0.join("access.log");
    let mut args = worker_args.to_vec();
    args.extend(["--access-logfile", log.to_str().unwrap(), "--access-logformat", "%(s)s"]);
    let server = Server::gunicorn_named(service, &args).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(
        server.master(),
        &["--max-routes", "50", "--latency-buckets", "0.003,0.3,3", "--blocks-buckets", "2,2000", "--bytes-buckets", "150,1e6"],
    )
    .unwrap();
    let prom = Prometheus::start("hostile", &agent.metrics_url).unwrap();
    // Scraping before the traffic starts, so every phase of it is scraped.
    prom.wait_for_scrape_after(wsgiscope_integration::unix_now());
    let got = drive(server.port, &agent, &dir);
    let hello_sent = 20;

    let m = settled(&agent, service, got.len() as u64);
    let want = count(&got);
    assert_eq!(by_status(&m, service), want, "per status, as the clients received them\n{}", agent.log_text());
    // gunicorn logs what its workers served; what it refused itself (400, 414) it does not.
    let logged = count(&std::fs::read_to_string(&log).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect::<Vec<_>>());
    for (status, n) in &logged {
        assert_eq!(want.get(status), Some(n), "status {status}: access log {logged:?}, clients {want:?}");
    }
    for (status, n) in &want {
        if !logged.contains_key(status) {
            assert!(status == "400" || status == "414", "only gunicorn's own refusals are unlogged: {status} × {n}");
        }
    }
    check_common(&m, service, hello_sent);
    let route = |r: &str, s: &str| m.sum("wsgi_requests_total", &[("route", r), ("status", s)]) as u64;
    assert_eq!(route("/page/q\"x", "200"), 1);
    assert_eq!(route("/page/a\\b", "200"), 1);
    assert_eq!(route("/page/nl%0Ainjected%22%7D%0Aevil_total%201", "200"), 1);
    assert_eq!(route("/page/caf%E9%01", "200"), 1);
    assert_eq!(m.sum("evil_total", &[]), 0.0);
    // 100-continue: the interim response is neither the status nor a block.
    let upload = |s: &str| m.sum("wsgi_requests_total", &[("route", "/upload"), ("method", "POST"), ("status", s)]) as u64;
    assert_eq!((upload("200"), upload("500"), upload("100")), (1, 1, 0));
    let blocks = m.sum("wsgi_response_blocks_sum", &[("route", "/upload"), ("method", "POST")]);
    assert_eq!(blocks, 1.0, "one block for the 200; gunicorn's own error page is none");
    // The bucket flags, end to end.
    let les = |name: &str| -> Vec<f64> {
        let mut v: Vec<f64> = m.series(name, &[("route", "/hello")]).map(|(l, _)| l["le"].parse().unwrap()).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    };
    assert_eq!(les("wsgi_request_duration_seconds_bucket"), [0.003, 0.3, 3.0, f64::INFINITY]);
    assert_eq!(les("wsgi_response_blocks_bucket"), [2.0, 2000.0, f64::INFINITY]);
    assert_eq!(les("wsgi_response_bytes_bucket"), [150.0, 1e6, f64::INFINITY]);
    check_prometheus(&prom, got.len() as u64, service, "/page/q\"x");
    assert!(!agent.log_text().contains("ERROR"), "{}", agent.log_text());
}

#[test]
fn hostile_traffic_to_gunicorn_sync() {
    hostile_gunicorn("hostile_sync", &["-w", "2"]);
}

#[test]
fn hostile_traffic_to_gunicorn_gthread() {
    hostile_gunicorn("hostile_gthread", &["-w", "2", "-k", "gthread", "--threads", "2"]);
}

#[test]
fn hostile_traffic_to_uwsgi_behind_nginx() {
    let _serial = serial();
    let dir = TempDir::new("hostile");
    let server = Server::uwsgi(UwsgiMode::BehindNginx, 2).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &["--max-routes", "50", "--service", "hostile \"uwsgi\" \\ eu"]).unwrap();
    let service = "hostile \"uwsgi\" \\ eu";
    let prom = Prometheus::start("hostile", &agent.metrics_url).unwrap();
    prom.wait_for_scrape_after(wsgiscope_integration::unix_now());
    let got = drive(server.port, &agent, &dir);

    // What nginx passed to uWSGI (it answers some requests itself: 400, 414) and what uWSGI
    // said. uWSGI closes without a word on a request larger than its buffer or an application
    // exception: status "none" for wsgiscope, 502 from nginx.
    let mut upstream = server.upstream_statuses();
    if let Some(n) = upstream.remove("502") {
        upstream.insert("none".to_string(), n);
    }
    let passed: u64 = upstream.values().sum();
    let start = Instant::now();
    let mut m = settled(&agent, service, passed);
    while start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(200));
        m = agent.metrics();
    }
    assert_eq!(by_status(&m, service), upstream, "per status, as nginx got them from uWSGI\n{}", agent.log_text());
    assert!(got.len() as u64 >= passed);
    check_common(&m, service, 20);
    let route = |r: &str| m.sum("wsgi_requests_total", &[("route", r)]) as u64;
    // nginx decodes the path it passes as PATH_INFO: the newline and quote arrive raw.
    assert_eq!(route("/page/nl\ninjected\"}\nevil_total 1"), 1, "{}", m.text);
    assert_eq!(route("/page/q\"x"), 1);
    assert_eq!(m.sum("evil_total", &[]), 0.0);
    // The uploads reach uWSGI (nginx answers the 100-continue itself); the 500 B GET /upload's
    // query string came first and filled the capture: method unknown, route other.
    let upload = |s: &str| m.sum("wsgi_requests_total", &[("route", "/upload"), ("method", "POST"), ("status", s)]);
    assert_eq!((upload("200"), upload("none")), (1.0, 1.0), "{}", m.text);
    check_prometheus(&prom, passed, service, "/page/nl\ninjected\"}\nevil_total 1");
}
