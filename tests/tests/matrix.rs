//! The server matrix: every way the test app is served, × its routes, against the app's own
//! counting middleware and what the clients (or nginx) received. Exact where the truth is exact.
use std::collections::BTreeMap;

use wsgiscope_integration::{get, get_keepalive, serial, Agent, Metrics, Response, Server, UwsgiMode};

const ROUTES: &[(&str, usize)] =
    &[("/hello", 5), ("/sleep", 5), ("/blocks", 3), ("/bytes1", 2), ("/big", 2), ("/error", 2), ("/file", 2)];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Gunicorn,
    Uwsgi,
    ModWsgi,
}

struct Case {
    name: &'static str,
    kind: Kind,
    keepalive: bool,
    /// Where the response bytes the worker wrote can be read exactly.
    bytes_truth: BytesTruth,
    /// A front end among the server's processes relays every request (uWSGI router, Apache).
    router: bool,
    /// `wsgi_worker_info`'s protocol and transport.
    wire: (&'static str, &'static str),
}

#[derive(Clone, Copy, PartialEq)]
enum BytesTruth {
    /// The client received exactly what the worker wrote.
    Client,
    /// nginx's $upstream_bytes_received.
    Nginx,
    /// A relay sits between: only a lower bound (the app's bytes).
    AtLeastApp,
    /// mod_wsgi: the app's head in CGI form plus its bytes (the handshake is not response).
    Cgi,
}

fn start(case: &Case) -> Server {
    let s = match case.name {
        "gunicorn-sync-debian-python" => Server::gunicorn_in(".venv-debian", &["-w", "2"]),
        "gunicorn-gthread" => Server::gunicorn(&["-w", "2", "-k", "gthread", "--threads", "4"]),
        "uwsgi-http-socket" => Server::uwsgi(UwsgiMode::HttpSocket, 2),
        "uwsgi-router" => Server::uwsgi(UwsgiMode::Router, 2),
        "uwsgi-nginx-unix" => Server::uwsgi(UwsgiMode::BehindNginx, 2),
        "uwsgi-threads" => Server::uwsgi(UwsgiMode::Threads, 2),
        "uwsgi-http11" => Server::uwsgi(UwsgiMode::Http11, 2),
        "apache-mod-wsgi-daemon" => Server::apache_modwsgi(2),
        other => panic!("unknown case {other}"),
    };
    s.unwrap_or_else(|e| panic!("{}: {e:#}", case.name))
}

fn run(case: Case) {
    let _serial = serial();
    let server = start(&case);
    // The uWSGI router and the Apache child are children of the master too.
    server.wait_workers(2 + usize::from(case.router)).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    let name = case.name;
    // Front ends (the uWSGI router, the Apache child) hold no worker slot, from the start.
    assert_eq!(agent.metrics().sum("wsgi_workers", &[]), 2.0, "{name}: workers at attach");

    let mut sent: BTreeMap<&str, Vec<Response>> = BTreeMap::new();
    for &(path, n) in ROUTES {
        // /sleep sleeps 200 ms: long enough that 2 % tolerates one scheduling hiccup.
        let url = if path == "/sleep" { "/sleep?ms=200" } else { path };
        let paths = vec![url; n];
        let responses = if case.keepalive {
            get_keepalive(server.port, &paths).unwrap()
        } else {
            paths.iter().map(|p| get(server.port, p).unwrap_or(Response { status: 0, wire_bytes: 0, chunked: false })).collect()
        };
        sent.insert(path, responses);
    }
    let total: usize = ROUTES.iter().map(|(_, n)| n).sum();
    // A front end's relay record ends with its own close, which can come after the worker's
    // record: wait for both.
    let relays = if case.router { total } else { 0 };
    let m = agent.metrics_when("every request and relay", |m| {
        m.sum("wsgi_requests_total", &[]) as usize >= total && m.sum("wsgiscope_relayed_requests_total", &[]) as usize >= relays
    });
    let truth = server.truth();
    let upstream = server.upstream_bytes();
    let r = |m: &Metrics, metric: &str, path: &str| m.sum(metric, &[("route", path)]) as u64;

    for &(path, n) in ROUTES {
        let n = n as u64;
        let t: Vec<_> = truth.iter().filter(|t| t.route == path).collect();
        assert_eq!(t.len() as u64, n, "{name} {path}: the middleware saw every request");
        let app_blocks: u64 = t.iter().map(|t| t.blocks).sum();
        let app_bytes: u64 = t.iter().map(|t| t.bytes).sum();
        assert_eq!(r(&m, "wsgi_requests_total", path), n, "{name} {path}: requests");
        let records = || agent.log_text().lines().filter(|l| l.contains(&format!(" {path}: "))).collect::<Vec<_>>().join("\n");
        assert_eq!(r(&m, "wsgi_response_blocks_sum", path), app_blocks, "{name} {path}: application blocks\n{}", records());

        // Status: what the worker answered (uWSGI closes silently on an exception).
        let status = match (case.kind, path) {
            (Kind::Uwsgi, "/error") => "none",
            (Kind::Gunicorn | Kind::ModWsgi, "/error") => "500",
            _ => "200",
        };
        assert_eq!(m.sum("wsgi_requests_total", &[("route", path), ("status", status)]) as u64, n, "{name} {path}: status {status}\n{}", m.text);

        // Write calls by each server's known framing.
        let calls = r(&m, "wsgi_response_write_calls_total", path);
        // Non-blocking servers finish a large block in several calls when the reader lags.
        let partial = r(&m, "wsgi_response_partial_writes_total", path);
        if case.kind == Kind::Gunicorn || matches!(path, "/hello" | "/sleep" | "/bytes1" | "/error") {
            assert_eq!(partial, 0, "{name} {path}: no partial writes (blocking sockets, or small blocks)");
        }
        let responses = &sent[path];
        match case.kind {
            Kind::Gunicorn => {
                let chunked = responses.iter().filter(|r| r.chunked).count() as u64;
                assert_eq!(calls, app_blocks + n + chunked + partial, "{name} {path}: header + blocks + terminator");
            }
            Kind::Uwsgi => {
                // Headers ride with the first block, except before sendfile.
                let headers_alone = if path == "/file" { n } else { 0 };
                assert_eq!(calls, app_blocks + headers_alone + partial, "{name} {path}: write calls");
            }
            Kind::ModWsgi => {
                // The handshake, then headers with the first block; the error marker alone.
                let marker = if path == "/error" { n } else { 0 };
                assert_eq!(calls, app_blocks + n + marker + partial, "{name} {path}: write calls");
            }
        }

        let bytes = r(&m, "wsgi_response_bytes_sum", path);
        match case.bytes_truth {
            BytesTruth::Client => {
                let wire: u64 = responses.iter().map(|r| r.wire_bytes).sum();
                assert_eq!(bytes, wire, "{name} {path}: bytes the client received");
            }
            BytesTruth::Nginx => assert_eq!(bytes, upstream.get(path).copied().unwrap_or(0), "{name} {path}: nginx upstream bytes"),
            BytesTruth::AtLeastApp => assert!(bytes >= app_bytes, "{name} {path}: bytes {bytes} < app bytes {app_bytes}"),
            BytesTruth::Cgi => {
                const ERROR_MARKER: u64 = "Status: 200 Error\r\n\r\n".len() as u64;
                let expected: u64 =
                    t.iter().map(|t| if t.status_line.is_empty() { ERROR_MARKER } else { t.cgi_head_len() + t.bytes }).sum();
                assert_eq!(bytes, expected, "{name} {path}: CGI head + app bytes");
            }
        }
        if case.bytes_truth != BytesTruth::AtLeastApp {
            assert!(bytes >= app_bytes, "{name} {path}: bytes include the app's");
        }
    }

    // Latency of the sleep route within max(100 µs, 2 %) of the middleware's own timing.
    let sleeps: Vec<f64> = truth.iter().filter(|t| t.route == "/sleep").map(|t| t.elapsed).collect();
    let truth_mean = sleeps.iter().sum::<f64>() / sleeps.len() as f64;
    let mean = m.sum("wsgi_request_duration_seconds_sum", &[("route", "/sleep")]) / sleeps.len() as f64;
    let tolerance = (truth_mean * 0.02).max(100e-6);
    assert!(mean >= 0.200 && (mean - truth_mean).abs() <= tolerance, "{name}: sleep latency {mean} vs middleware {truth_mean} (±{tolerance})");

    // Requests are counted once: relays by the router are recognised, never double counted.
    let relayed = m.sum("wsgiscope_relayed_requests_total", &[]) as usize;
    assert_eq!(relayed, if case.router { total } else { 0 }, "{name}: relayed");
    assert_eq!(m.sum("wsgi_requests_total", &[]) as usize, total, "{name}: total");
    assert_eq!(m.sum("wsgiscope_lost_events_total", &[]), 0.0);
    assert_eq!(m.sum("wsgiscope_unparsed_requests_total", &[]), 0.0);
    // Worker slots: the workers' pids (the router gave its slot up).
    let served: std::collections::BTreeSet<u32> = truth.iter().map(|t| t.pid).collect();
    let info: std::collections::BTreeSet<u32> = m.series("wsgi_worker_info", &[]).map(|(l, _)| l["pid"].parse().unwrap()).collect();
    assert!(served.is_subset(&info), "{name}: workers that served {served:?} hold slots {info:?}");
    assert_eq!(m.sum("wsgi_workers", &[]), 2.0, "{name}: two workers");
    let server_label = match case.kind {
        Kind::Gunicorn => "gunicorn",
        Kind::Uwsgi => "uwsgi",
        Kind::ModWsgi => "mod_wsgi",
    };
    for (labels, _) in m.series("wsgi_worker_info", &[]) {
        let got = (labels["server"].as_str(), labels["protocol"].as_str(), labels["transport"].as_str());
        assert_eq!(got, (server_label, case.wire.0, case.wire.1), "{name}: worker info {labels:?}");
    }
}

#[test]
fn gunicorn_sync_on_debian_python() {
    run(Case { name: "gunicorn-sync-debian-python", kind: Kind::Gunicorn, keepalive: false, bytes_truth: BytesTruth::Client, router: false, wire: ("http", "tcp") });
}

#[test]
fn gunicorn_gthread_keepalive() {
    run(Case { name: "gunicorn-gthread", kind: Kind::Gunicorn, keepalive: true, bytes_truth: BytesTruth::Client, router: false, wire: ("http", "tcp") });
}

#[test]
fn uwsgi_http_socket() {
    run(Case { name: "uwsgi-http-socket", kind: Kind::Uwsgi, keepalive: false, bytes_truth: BytesTruth::Client, router: false, wire: ("http", "tcp") });
}

#[test]
fn uwsgi_threads() {
    run(Case { name: "uwsgi-threads", kind: Kind::Uwsgi, keepalive: false, bytes_truth: BytesTruth::Client, router: false, wire: ("http", "tcp") });
}

#[test]
fn uwsgi_http11_keepalive() {
    run(Case { name: "uwsgi-http11", kind: Kind::Uwsgi, keepalive: true, bytes_truth: BytesTruth::Client, router: false, wire: ("http", "tcp") });
}

#[test]
fn uwsgi_behind_nginx_on_a_unix_socket() {
    run(Case { name: "uwsgi-nginx-unix", kind: Kind::Uwsgi, keepalive: false, bytes_truth: BytesTruth::Nginx, router: false, wire: ("uwsgi", "unix") });
}

#[test]
fn uwsgi_http_router() {
    run(Case { name: "uwsgi-router", kind: Kind::Uwsgi, keepalive: false, bytes_truth: BytesTruth::AtLeastApp, router: true, wire: ("uwsgi", "tcp") });
}

#[test]
fn apache_mod_wsgi_daemon_mode() {
    run(Case {
        name: "apache-mod-wsgi-daemon",
        kind: Kind::ModWsgi,
        keepalive: false,
        bytes_truth: BytesTruth::Cgi,
        router: true,
        wire: ("modwsgi", "unix"),
    });
}
