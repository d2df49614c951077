use super::*;

// Two statuses of /a (merged per route) and one series of /b whose tail lands in +Inf.
const EXPOSITION: &str = r#"# HELP wsgi_requests Requests served, by route and status.
# TYPE wsgi_requests counter
wsgi_requests_total{service="demo",method="GET",route="/a",status="200"} 8
wsgi_requests_total{service="demo",method="GET",route="/a",status="500"} 2
wsgi_requests_total{service="demo",method="GET",route="/b",status="200"} 4
# TYPE wsgi_request_duration_seconds histogram
wsgi_request_duration_seconds_sum{service="demo",method="GET",route="/a",status="200"} 6.5
wsgi_request_duration_seconds_count{service="demo",method="GET",route="/a",status="200"} 8
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/a",status="200",le="0.5"} 2
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/a",status="200",le="1.0"} 4
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/a",status="200",le="2.0"} 8
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/a",status="200",le="+Inf"} 8
wsgi_request_duration_seconds_sum{service="demo",method="GET",route="/a",status="500"} 1.5
wsgi_request_duration_seconds_count{service="demo",method="GET",route="/a",status="500"} 2
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/a",status="500",le="0.5"} 0
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/a",status="500",le="1.0"} 2
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/a",status="500",le="2.0"} 2
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/a",status="500",le="+Inf"} 2
wsgi_request_duration_seconds_sum{service="demo",method="GET",route="/b",status="200"} 40.0
wsgi_request_duration_seconds_count{service="demo",method="GET",route="/b",status="200"} 4
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/b",status="200",le="0.5"} 0
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/b",status="200",le="1.0"} 1
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/b",status="200",le="2.0"} 2
wsgi_request_duration_seconds_bucket{service="demo",method="GET",route="/b",status="200",le="+Inf"} 4
# EOF
"#;

fn metrics() -> Metrics {
    Metrics::parse(EXPOSITION).unwrap()
}

#[test]
fn parses_samples_and_labels() {
    let m = metrics();
    assert_eq!(m.samples.len(), 3 + 3 * 6);
    assert_eq!(m.samples[0].name, "wsgi_requests_total");
    assert_eq!(m.samples[0].label("route"), Some("/a"));
    assert_eq!(m.samples[0].label("status"), Some("200"));
    assert_eq!(m.samples[0].value, 8.0);
    let inf = m
        .samples
        .iter()
        .find(|s| s.label("le") == Some("+Inf"))
        .unwrap();
    assert_eq!(inf.value, 8.0);
    assert_eq!(m.text, EXPOSITION);
}

#[test]
fn escaped_label_values_are_read_back() {
    let s = parse_sample(r#"wsgi_requests_total{route="/q\"x\\y\n",method="GET"} 3"#).unwrap();
    assert_eq!(s.name, "wsgi_requests_total");
    assert_eq!(s.labels["route"], "/q\"x\\y\n");
    assert_eq!(s.labels["method"], "GET");
    assert_eq!(s.value, 3.0);
    // A quote, a comma and a brace inside a value end neither the value nor the label set.
    let s = parse_sample("x{a=\"q\\\"u,o}te\\\\\",b=\"l\\n2\"} +Inf").unwrap();
    assert_eq!(s.label("a"), Some("q\"u,o}te\\"));
    assert_eq!(s.label("b"), Some("l\n2"));
    assert_eq!(s.value, f64::INFINITY);
    assert_eq!(
        parse_sample(r#"x{le="+Inf"} 2"#).unwrap().labels["le"],
        "+Inf"
    );
}

#[test]
fn timestamps_exemplars_trailing_commas_and_plain_names() {
    let up = parse_sample("up 1 1700000000").unwrap();
    assert_eq!(
        (up.name.as_str(), up.labels.len(), up.value),
        ("up", 0, 1.0)
    );
    let s = parse_sample(r#"x_bucket{le="0.5",} 3 # {trace_id="abc"} 0.4 1700000000.5"#).unwrap();
    assert_eq!((s.label("le"), s.value), (Some("0.5"), 3.0));
    assert!(parse_sample("nan_total NaN").unwrap().value.is_nan());
}

#[test]
fn bad_lines_are_errors() {
    assert!(parse("x{a=\"unterminated} 1").is_err());
    assert!(parse("novalue").is_err());
    assert!(parse("x{a=unquoted} 1").is_err());
    assert!(parse("x 1.2.3").is_err());
    assert!(parse("{a=\"b\"} 1").is_err());
    let err = Metrics::parse("ok 1\nbroken{\n").unwrap_err();
    assert!(format!("{err:#}").contains("broken{"), "{err:#}");
}

#[test]
fn series_and_sums_filter_by_labels() {
    let m = metrics();
    assert_eq!(m.sum("wsgi_requests_total", &[]), 14.0);
    assert_eq!(m.sum("wsgi_requests_total", &[("route", "/a")]), 10.0);
    assert_eq!(
        m.sum("wsgi_requests_total", &[("route", "/a"), ("status", "500")]),
        2.0
    );
    assert_eq!(m.sum("wsgi_requests_total", &[("route", "/nope")]), 0.0);
    let statuses: Vec<&str> = m
        .series("wsgi_requests_total", &[("route", "/a")])
        .map(|(l, _)| l["status"].as_str())
        .collect();
    assert_eq!(statuses, ["200", "500"]);
}

#[test]
fn sums_counters_per_route() {
    let requests = metrics().sum_by("wsgi_requests_total", "route");
    assert_eq!(requests.len(), 2);
    assert_eq!(requests["/a"], 10.0);
    assert_eq!(requests["/b"], 4.0);
}

#[test]
fn merges_histograms_per_route() {
    let h = metrics().histograms_by("wsgi_request_duration_seconds", "route");
    assert_eq!(h.len(), 2);
    let a = &h["/a"];
    assert_eq!(
        a.buckets,
        vec![(0.5, 2.0), (1.0, 6.0), (2.0, 10.0), (f64::INFINITY, 10.0)]
    );
    assert_eq!((a.sum, a.count), (8.0, 10.0));
    assert_eq!(a.mean(), Some(0.8));
    // Only the histogram's own samples make a key.
    assert!(metrics().histograms_by("wsgi_requests", "route").is_empty());
}

#[test]
fn quantiles_interpolate_inside_the_bucket() {
    let a = &metrics().histograms_by("wsgi_request_duration_seconds", "route")["/a"];
    // Cumulative counts 2, 6, 10 at le 0.5, 1, 2.
    // p50: rank 5 is the 3rd of 4 observations in (0.5, 1] -> 0.5 + 0.5 * 3/4.
    assert_eq!(a.quantile(0.5), Some(0.875));
    // p10: rank 1 is the 1st of 2 observations in [0, 0.5] -> 0.25.
    assert_eq!(a.quantile(0.1), Some(0.25));
    // p95: rank 9.5 is the 3.5th of 4 in (1, 2] -> 1.875; p99: rank 9.9 -> 1.975.
    assert_eq!(a.quantile(0.95), Some(1.875));
    assert!((a.quantile(0.99).unwrap() - 1.975).abs() < 1e-12);
    assert_eq!(a.quantile(1.0), Some(2.0));
}

#[test]
fn quantile_in_the_inf_bucket_is_the_highest_finite_bound() {
    let b = &metrics().histograms_by("wsgi_request_duration_seconds", "route")["/b"];
    // Cumulative 0, 1, 2, 4: p50 (rank 2) is the last in (1, 2]; p75 (rank 3) lies beyond 2.
    assert_eq!(b.quantile(0.5), Some(2.0));
    assert_eq!(b.quantile(0.75), Some(2.0));
    // p40: rank 1.6 is 0.6 of the way through the single observation in (1, 2].
    assert!((b.quantile(0.4).unwrap() - 1.6).abs() < 1e-12);
}

#[test]
fn no_quantile_without_observations_or_inf_bucket() {
    let empty = Histogram {
        buckets: vec![(1.0, 0.0), (f64::INFINITY, 0.0)],
        sum: 0.0,
        count: 0.0,
    };
    assert_eq!(empty.quantile(0.5), None);
    assert_eq!(empty.mean(), None);
    let no_inf = Histogram {
        buckets: vec![(1.0, 3.0), (2.0, 4.0)],
        sum: 4.0,
        count: 4.0,
    };
    assert_eq!(no_inf.quantile(0.5), None);
}
