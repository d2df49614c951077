//! Unit tests of the aggregator: series, slots, the route cap, busy time, hostile labels.
use super::*;

/// `wsgi_worker_busy_seconds_total` of slot 0, read by the development harness's parser.
fn busy_seconds(text: &str) -> f64 {
    let m = wsgiscope_devkit::Metrics::parse(text).unwrap();
    m.sum("wsgi_worker_busy_seconds_total", &[("service", "app"), ("worker", "0")])
}

fn base(service: &str) -> Labels {
    vec![label("service", service.to_string())]
}

fn opts(per_worker: bool, max_routes: usize) -> Options {
    Options { per_worker, max_routes, ..Options::default() }
}

fn request(path: &str, tgid: u32) -> Request {
    Request {
        tgid,
        fd: 9,
        start_ns: 1_000_000_000,
        protocol: crate::reconstruct::Protocol::Http,
        transport: crate::reconstruct::Transport::Tcp,
        client: None,
        method: "GET".into(),
        path: Some(path.into()),
        status: crate::reconstruct::Status::Code(200),
        accept_wait: None,
        duration: 0.05,
        write_seconds: 0.001,
        write_slept: false,
        write_calls: 3,
        partial_writes: 0,
        blocks: 1,
        bytes: 100,
        gc_seconds: 0.0,
        cpu_seconds: Some(0.002),
        memory_growth: None,
    }
}

#[test]
fn requests_feed_route_and_worker_series() {
    let m = Metrics::new();
    let mut a = Aggregator::new(&m, base("app"), "gunicorn", opts(false, 10));
    a.set_python("3.11", true);
    a.worker_started(7);
    a.record(&request("/a", 7), &Default::default());
    a.record(&request("/a", 7), &Default::default());
    a.record(&request("/b", 8), &Default::default());
    let text = m.encode();
    assert!(text.contains(r#"wsgi_requests_total{service="app",method="GET",route="/a",status="200"} 2"#), "{text}");
    assert!(text.contains(r#"wsgi_response_write_calls_total{service="app",method="GET",route="/b"} 3"#));
    assert!(text.contains(r#"wsgi_worker_requests_total{service="app",worker="0"} 2"#));
    assert!(text.contains(r#"wsgi_worker_requests_total{service="app",worker="1"} 1"#));
    let info = r#"wsgi_worker_info{service="app",worker="1",pid="8",server="gunicorn",protocol="http",transport="tcp",python_version="3.11",usdt="true"} 1"#;
    assert!(text.contains(info), "{text}");
    // Worker 0 was known before any request; the first request told how workers are reached.
    assert!(text.contains(r#"worker="0",pid="7",server="gunicorn",protocol="http",transport="tcp",python_version="3.11",usdt="true"} 1"#));
    assert!(!text.contains("unknown"));
    assert!(text.contains(r#"wsgi_workers{service="app"} 2"#));
    a.worker_exited(8);
    let text = m.encode();
    assert!(!text.contains(r#"pid="8""#));
    assert!(text.contains(r#"wsgi_workers{service="app"} 1"#));
    // The slot's counters survive the worker.
    assert!(text.contains(r#"wsgi_worker_requests_total{service="app",worker="1"} 1"#));
}

#[test]
fn routes_beyond_the_cap_are_other() {
    let m = Metrics::new();
    let mut a = Aggregator::new(&m, base("app"), "gunicorn", opts(false, 2));
    for p in ["/a", "/users/1", "/c", "/d", "/a", "/users/2"] {
        a.record(&request(p, 1), &Default::default());
    }
    let text = m.encode();
    assert!(text.contains(r#"route="/a",status="200"} 2"#), "{text}");
    assert!(text.contains(r#"route="/users/{id}",status="200"} 2"#), "ids are one route");
    assert!(text.contains(r#"route="other",status="200"} 2"#));
    assert!(!text.contains(r#"route="/c""#));
    assert!(text.contains(r#"wsgiscope_route_overflow_total{service="app"} 2"#));
}

#[test]
fn a_route_displaced_under_the_cap_keeps_its_series_until_more_are_displaced() {
    let m = Metrics::new();
    let mut a = Aggregator::new(&m, base("app"), "gunicorn", opts(false, 1));
    a.record(&request("/old", 1), &Default::default());
    for _ in 0..2 {
        a.record(&request("/new", 1), &Default::default()); // waits, then takes /old's place
    }
    let text = m.encode();
    assert!(text.contains(r#"route="/old",status="200"} 1"#), "frozen, still exported: {text}");
    assert!(text.contains(r#"route="/new",status="200"} 1"#));
    assert!(text.contains(r#"route="other",status="200"} 1"#));
    assert!(text.contains(r#"wsgiscope_route_evictions_total{service="app"} 1"#));
    // A second displacement retires /new; /old, retired before it, is now removed.
    for _ in 0..3 {
        a.record(&request("/newer", 1), &Default::default());
    }
    let text = m.encode();
    assert!(!text.contains(r#"route="/old""#), "{text}");
    assert!(text.contains(r#"route="/new",status="200"} 1"#));
    assert!(text.contains(r#"route="/newer",status="200"} 1"#));
}

#[test]
fn a_removed_route_that_comes_back_is_counted_in_new_series() {
    // The aggregator keeps handles on a route's series: once its series are removed, a handle
    // kept would count into a series no longer exported.
    let m = Metrics::new();
    let mut a = Aggregator::new(&m, base("app"), "gunicorn", opts(false, 1));
    let mut slow = request("/old", 1);
    slow.write_seconds = 0.04;
    slow.write_slept = true;
    a.record(&slow, &Default::default());
    for p in ["/new", "/new", "/newer", "/newer", "/newer"] {
        a.record(&request(p, 1), &Default::default());
    }
    assert!(!m.encode().contains(r#"route="/old""#), "removed");
    // /old comes back: it waits as other until requested more often than /newer (3), then
    // takes its place.
    for _ in 0..5 {
        a.record(&slow, &Default::default());
    }
    let text = m.encode();
    assert!(text.contains(r#"wsgi_requests_total{service="app",method="GET",route="/old",status="200"} 2"#), "{text}");
    assert!(text.contains(r#"wsgi_response_write_calls_total{service="app",method="GET",route="/old"} 6"#), "{text}");
    assert!(text.contains(r#"wsgi_slow_client_responses_total{service="app",route="/old"} 2"#), "{text}");
    assert!(text.contains(r#"wsgi_worker_requests_total{service="app",worker="0"} 11"#), "{text}");
}

#[test]
fn methods_statuses_and_workers_each_have_their_series() {
    let m = Metrics::new();
    let mut a = Aggregator::new(&m, base("app"), "gunicorn", opts(true, 10));
    for (method, status, tgid) in [("GET", 200, 5), ("GET", 200, 5), ("POST", 200, 5), ("GET", 404, 5), ("GET", 200, 6)] {
        let mut r = request("/a", tgid);
        r.method = method.into();
        r.status = crate::reconstruct::Status::Code(status);
        a.record(&r, &Default::default());
    }
    let text = m.encode();
    let requests = |labels: &str| format!("wsgi_requests_total{{service=\"app\",{labels}}}");
    assert!(text.contains(&format!("{} 2", requests(r#"method="GET",route="/a",worker="0",status="200""#))), "{text}");
    assert!(text.contains(&format!("{} 1", requests(r#"method="POST",route="/a",worker="0",status="200""#))));
    assert!(text.contains(&format!("{} 1", requests(r#"method="GET",route="/a",worker="0",status="404""#))));
    assert!(text.contains(&format!("{} 1", requests(r#"method="GET",route="/a",worker="1",status="200""#))));
    // By route without the status: GET's two statuses share one series.
    assert!(text.contains(r#"wsgi_response_write_calls_total{service="app",method="GET",route="/a",worker="0"} 9"#), "{text}");
    assert!(text.contains(r#"wsgi_request_cpu_seconds_count{service="app",method="GET",route="/a",worker="0"} 3"#), "{text}");
}

#[test]
fn hostile_label_values_cannot_break_the_exposition() {
    let m = Metrics::new();
    let mut base = base("shop \"eu\"");
    base.push(label("pod", "web\"}\nevil_total 1\n"));
    let mut a = Aggregator::new(&m, base, "gunicorn", opts(false, 10));
    a.record(&request("/q\"x\\y", 1), &Default::default());
    let text = m.encode();
    assert!(text.contains(r#"service="shop \"eu\"",pod="web\"}\nevil_total 1\n",method="GET",route="/q\"x\\y""#), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("evil_total")));
}

#[test]
fn per_worker_option_adds_the_worker_label() {
    let m = Metrics::new();
    let mut a = Aggregator::new(&m, base("app"), "gunicorn", opts(true, 10));
    a.record(&request("/a", 5), &Default::default());
    assert!(m.encode().contains(r#"wsgi_requests_total{service="app",method="GET",route="/a",worker="0",status="200"} 1"#));
}

#[test]
fn busy_time_is_credited_while_in_progress_and_completed_at_the_record() {
    let m = Metrics::new();
    let mut a = Aggregator::new(&m, base("app"), "gunicorn", opts(false, 10));
    a.worker_started(7);
    // SAFETY (conn): plain data; the gauges read only the fields given here.
    let ip = |start_ns, write_calls, last_write_ns| InProgress { root: 1, tgid: 7, fd: 9, start_ns, write_calls, last_write_ns, conn: unsafe { std::mem::zeroed() } };
    // Computing for 20 ms, then 30 ms: credited as it goes, the gauges show it.
    a.in_progress(1_020_000_000, &[ip(1_000_000_000, 0, 0)]);
    a.in_progress(1_030_000_000, &[ip(1_000_000_000, 0, 0)]);
    let text = m.encode();
    assert!(text.contains(r#"wsgi_worker_busy_seconds_total{service="app",worker="0"} 0.03"#), "{text}");
    assert!(text.contains(r#"wsgi_worker_active_requests{service="app",worker="0"} 1"#));
    assert!(text.contains(r#"wsgi_worker_oldest_request_seconds{service="app",worker="0"} 0.03"#));
    // The record completes it to its duration (50 ms), never counting twice.
    a.record(&request("/a", 7), &Default::default());
    a.in_progress(1_100_000_000, &[]);
    let text = m.encode();
    let busy = busy_seconds(&text);
    assert!((busy - 0.05).abs() < 1e-9, "{busy}");
    assert!(text.contains(r#"wsgi_worker_active_requests{service="app",worker="0"} 0"#));
    // The next keep-alive request wrote its response in 10 ms and the connection went idle:
    // busy only until its last write.
    a.in_progress(3_500_000_000, &[ip(2_000_000_000, 3, 2_010_000_000)]);
    let text = m.encode();
    let busy = busy_seconds(&text);
    assert!((busy - 0.06).abs() < 1e-9, "busy {busy}: 10 ms more, not the idle second");
    assert!(text.contains(r#"wsgi_worker_active_requests{service="app",worker="0"} 0"#), "idle after its last write");
}

#[test]
fn tiny_blocks_and_slow_writes_are_flagged() {
    let m = Metrics::new();
    let mut a = Aggregator::new(&m, base("app"), "gunicorn", opts(false, 10));
    let mut r = request("/bytes1", 7);
    r.blocks = 102_400;
    r.bytes = 6 * 102_400 + 100; // chunk framing around one-byte blocks
    a.record(&r, &Default::default());
    let mut r = request("/blocks", 7);
    r.blocks = 1000;
    r.bytes = 135_000;
    a.record(&r, &Default::default());
    let mut r = request("/slow", 7);
    r.write_seconds = 0.04; // of 0.05
    r.write_slept = true;
    a.record(&r, &Default::default());
    // As long in writes, but none slept: preempted, or the hypervisor's steal; the client read.
    let mut r = request("/busy", 7);
    r.write_seconds = 0.04;
    a.record(&r, &Default::default());
    let text = m.encode();
    assert!(text.contains(r#"wsgi_small_block_responses_total{service="app",route="/bytes1"} 1"#), "{text}");
    assert!(!text.contains(r#"wsgi_small_block_responses_total{service="app",route="/blocks"}"#));
    assert!(text.contains(r#"wsgi_slow_client_responses_total{service="app",route="/slow"} 1"#));
    assert!(!text.contains(r#"wsgi_slow_client_responses_total{service="app",route="/bytes1"}"#));
    assert!(!text.contains(r#"wsgi_slow_client_responses_total{service="app",route="/busy"}"#), "{text}");
}
