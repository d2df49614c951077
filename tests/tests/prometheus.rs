//! End to end with a real Prometheus server (Debian's `prometheus`): it scrapes the real agent
//! watching a real gunicorn every second, and its HTTP API must give back the traffic we sent —
//! exact totals, a plausible rate, and a p99 in the right latency bucket.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::Value;
use wsgiscope_integration::{get, serial, unix_now, Agent, Metrics, Prometheus, Server};

const JOB: &str = "wsgiscope";

/// (lower, upper] bounds of the single latency bucket holding every `route` request the agent
/// recorded, read from its exposition (the `le` labels), so the test follows the real buckets.
fn only_bucket(m: &Metrics, route: &str) -> (f64, f64) {
    let want = [("route", route)];
    let total = m.sum("wsgi_request_duration_seconds_count", &want);
    let mut bounds: Vec<(f64, f64)> = m
        .series("wsgi_request_duration_seconds_bucket", &want)
        .filter(|(l, _)| l["le"] != "+Inf")
        .map(|(l, count)| (l["le"].parse::<f64>().unwrap(), count))
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let lower = bounds.iter().filter(|(_, c)| *c == 0.0).map(|(le, _)| *le).next_back().unwrap_or(0.0);
    let upper = bounds.iter().find(|(_, c)| *c == total).map(|(le, _)| *le).expect("a finite bucket holds all");
    let next_after_lower = bounds.iter().map(|(le, _)| *le).find(|le| *le > lower);
    assert_eq!(next_after_lower, Some(upper), "{route} requests span several buckets: {bounds:?}");
    (lower, upper)
}

#[test]
fn prometheus_scrapes_the_agent_and_its_queries_match_the_traffic() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "2"]).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    let prom = Prometheus::start(JOB, &agent.metrics_url).unwrap();
    prom.wait_for_scrape_after(unix_now());

    // 7 s of paced traffic: every 250 ms one /sleep?ms=100 and one /hello, i.e. 8 requests/s.
    const PERIOD: Duration = Duration::from_millis(250);
    let t_start = unix_now();
    let start = Instant::now();
    let mut sent: BTreeMap<&str, u32> = BTreeMap::new();
    for k in 1..=28u32 {
        for (route, path) in [("/sleep", "/sleep?ms=100"), ("/hello", "/hello")] {
            assert_eq!(get(server.port, path).unwrap().status, 200);
            *sent.entry(route).or_default() += 1;
        }
        if let Some(wait) = (PERIOD * k).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let t_end = unix_now();
    let total: u32 = sent.values().sum();
    let m = agent.metrics_when("every request", |m| m.sum("wsgi_requests_total", &[]) >= total as f64);
    prom.wait_for_scrape_after(unix_now());

    // The exposition was accepted: target up, no scrape error, every sample ingested.
    assert_eq!(prom.one(&format!("up{{job=\"{JOB}\"}}"), None), 1.0);
    let targets = prom.api("/api/v1/targets?state=active").unwrap();
    let ours: Vec<&Value> =
        targets["activeTargets"].as_array().unwrap().iter().filter(|t| t["scrapePool"] == JOB).collect();
    assert_eq!(ours.len(), 1, "{targets}");
    assert_eq!(ours[0]["health"], "up", "{}", ours[0]);
    assert_eq!(ours[0]["lastError"], "", "{}", ours[0]);
    // The set of series is stable once the traffic is over: the last scrape saw them all.
    let exposed = agent.metrics().text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    let scraped = prom.one(&format!("scrape_samples_scraped{{job=\"{JOB}\"}}"), None);
    assert_eq!(scraped, exposed as f64, "samples Prometheus took from one scrape vs lines in the exposition");
    // Prometheus read each family's type from the `# TYPE` lines.
    let metadata = prom.api("/api/v1/metadata").unwrap();
    let families: Vec<(&str, &str)> =
        m.text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' ')).collect();
    assert!(families.len() >= 20, "{}", m.text);
    for (family, kind) in families {
        // The classic format names a counter by its sample (`x_total`); Prometheus scraped
        // OpenMetrics, which names the family `x`.
        let om_family = if kind == "counter" { family.strip_suffix("_total").unwrap_or(family) } else { family };
        let seen = metadata[om_family][0]["type"].as_str().unwrap_or("missing");
        assert_eq!(seen, kind, "Prometheus' type of {family}: {}", metadata[family]);
    }

    // Exact totals: the last value of the counters is what we sent, per route and in all.
    let by_route: BTreeMap<String, f64> = prom
        .query(&format!("sum by (route) (wsgi_requests_total{{job=\"{JOB}\"}})"), None)
        .unwrap()
        .into_iter()
        .map(|(l, v)| (l["route"].clone(), v))
        .collect();
    let want: BTreeMap<String, f64> = sent.iter().map(|(r, n)| (r.to_string(), *n as f64)).collect();
    assert_eq!(by_route, want);
    assert_eq!(prom.one(&format!("sum(wsgi_requests_total{{job=\"{JOB}\"}})"), None), total as f64);

    // The rate over the last 5 s of the traffic (a window inside it). Within ±20 %: requests end
    // in pairs every 250 ms, so 4 s of 1 s samples can miss or gain one pair (±6 %); the 1 s
    // scrape times jitter and Prometheus extrapolates the increase to the window's edges.
    let sent_rate = total as f64 / (t_end - t_start);
    let rate = prom.one(&format!("sum(rate(wsgi_requests_total{{job=\"{JOB}\"}}[5s]))"), Some(t_end));
    println!("rate: Prometheus {rate:.2}/s, sent {sent_rate:.2}/s");
    assert!((rate - sent_rate).abs() <= 0.2 * sent_rate, "rate {rate}/s vs {sent_rate}/s sent");

    // p99 of /sleep: every request lies in one bucket (lower, upper] — the middleware's own times
    // too — so Prometheus' linear interpolation puts the p99 at lower + 0.99·(upper − lower).
    let (lower, upper) = only_bucket(&m, "/sleep");
    for t in server.truth().iter().filter(|t| t.route == "/sleep") {
        assert!(t.elapsed > lower && t.elapsed <= upper, "app took {} s, outside ({lower}, {upper}]", t.elapsed);
    }
    let p99 = prom.one(
        &format!(
            "histogram_quantile(0.99, sum by (le) (rate(wsgi_request_duration_seconds_bucket{{job=\"{JOB}\",route=\"/sleep\"}}[5s])))"
        ),
        Some(t_end),
    );
    println!("p99 /sleep: {p99:.4} s in bucket ({lower}, {upper}]");
    assert!(p99 > lower && p99 <= upper, "p99 {p99} outside ({lower}, {upper}]");
    let interpolated = lower + 0.99 * (upper - lower);
    assert!((p99 - interpolated).abs() < 1e-9, "p99 {p99} vs {interpolated}");
}
