//! Just enough of the Prometheus/OpenMetrics text format to summarize the agent's /metrics:
//! samples with labels, histograms merged per label value, and quantiles estimated from buckets
//! the way Prometheus' `histogram_quantile` does.
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses every sample line; comments (`# HELP`, `# TYPE`, `# EOF`) and blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_line(line).with_context(|| format!("bad metrics line: {line}")))
        .collect()
}

fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).ok_or_else(|| anyhow!("no value"))?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // The value is the first field; a timestamp or an OpenMetrics exemplar (` # {...} v`) may follow.
    let value = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    // Rust's float parser accepts "+Inf", "-Inf" and "NaN" as Prometheus writes them.
    let value = value
        .parse::<f64>()
        .with_context(|| format!("bad value {value:?}"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (the opening brace already consumed); returns the labels and what follows `}`.
fn parse_labels(mut s: &str) -> Result<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or_else(|| anyhow!("label without '='"))?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| anyhow!("label value not quoted"))?;
        // Values escape only backslash, double quote and newline.
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

/// A cumulative histogram: `(le, count of observations <= le)` in ascending `le`, ending at +Inf.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// Mean observation, or None without observations.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// Estimates the q-quantile (0 <= q <= 1) like Prometheus' `histogram_quantile`: find the bucket
    /// holding the q·count-th observation and interpolate linearly inside it (the first bucket starts
    /// at 0). A rank that falls in the +Inf bucket gives the highest finite bound.
    /// None without observations or without a +Inf bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let &(last_le, total) = self.buckets.last()?;
        if !(0.0..=1.0).contains(&q)
            || last_le != f64::INFINITY
            || total <= 0.0
            || self.buckets.len() < 2
        {
            return None;
        }
        let rank = q * total;
        let b = self
            .buckets
            .iter()
            .position(|&(_, cumulative)| cumulative >= rank)
            .unwrap_or(self.buckets.len() - 1);
        if b == self.buckets.len() - 1 {
            return Some(self.buckets[b - 1].0);
        }
        let (end, cumulative) = self.buckets[b];
        if b == 0 && end <= 0.0 {
            return Some(end);
        }
        let (start, below) = if b == 0 {
            (0.0, 0.0)
        } else {
            self.buckets[b - 1]
        };
        let in_bucket = cumulative - below;
        if in_bucket <= 0.0 {
            return Some(start);
        }
        Some(start + (end - start) * (rank - below) / in_bucket)
    }

    /// Adds another series' observations; bucket bounds missing on one side are added.
    fn add_bucket(&mut self, le: f64, count: f64) {
        match self.buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += count,
            None => {
                self.buckets.push((le, count));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }
}

/// The histogram `name` (its `_bucket`, `_sum` and `_count` samples), with all series sharing a value
/// of label `by` merged: e.g. per route, over methods and statuses.
pub fn histograms_by(samples: &[Sample], name: &str, by: &str) -> BTreeMap<String, Histogram> {
    let (bucket, sum, count) = (
        format!("{name}_bucket"),
        format!("{name}_sum"),
        format!("{name}_count"),
    );
    let mut out: BTreeMap<String, Histogram> = BTreeMap::new();
    for s in samples {
        let Some(key) = s.label(by) else { continue };
        if s.name == bucket {
            let Some(le) = s.label("le").and_then(|le| le.parse::<f64>().ok()) else {
                continue;
            };
            out.entry(key.to_string())
                .or_default()
                .add_bucket(le, s.value);
        } else if s.name == sum {
            out.entry(key.to_string()).or_default().sum += s.value;
        } else if s.name == count {
            out.entry(key.to_string()).or_default().count += s.value;
        }
    }
    out
}

/// Sum of the samples named `name` per value of label `by`.
pub fn sum_by(samples: &[Sample], name: &str, by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        if let Some(key) = s.label(by) {
            *out.entry(key.to_string()).or_default() += s.value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn parses_samples_and_labels() {
        let samples = parse(EXPOSITION).unwrap();
        assert_eq!(samples.len(), 3 + 3 * 6);
        assert_eq!(samples[0].name, "wsgi_requests_total");
        assert_eq!(samples[0].label("route"), Some("/a"));
        assert_eq!(samples[0].label("status"), Some("200"));
        assert_eq!(samples[0].value, 8.0);
        let inf = samples
            .iter()
            .find(|s| s.label("le") == Some("+Inf"))
            .unwrap();
        assert_eq!(inf.value, 8.0);
    }

    #[test]
    fn parses_escapes_timestamps_and_plain_names() {
        let samples =
            parse("up 1 1700000000\nx{a=\"q\\\"u,o}te\\\\\",b=\"l\\n2\"} +Inf\n").unwrap();
        assert_eq!(
            samples[0],
            Sample {
                name: "up".into(),
                labels: vec![],
                value: 1.0
            }
        );
        assert_eq!(samples[1].label("a"), Some("q\"u,o}te\\"));
        assert_eq!(samples[1].label("b"), Some("l\n2"));
        assert_eq!(samples[1].value, f64::INFINITY);
        assert!(parse("x{a=\"unterminated} 1").is_err());
        assert!(parse("novalue").is_err());
    }

    #[test]
    fn sums_counters_per_route() {
        let samples = parse(EXPOSITION).unwrap();
        let requests = sum_by(&samples, "wsgi_requests_total", "route");
        assert_eq!(requests["/a"], 10.0);
        assert_eq!(requests["/b"], 4.0);
    }

    #[test]
    fn merges_histograms_per_route() {
        let samples = parse(EXPOSITION).unwrap();
        let h = histograms_by(&samples, "wsgi_request_duration_seconds", "route");
        let a = &h["/a"];
        assert_eq!(
            a.buckets,
            vec![(0.5, 2.0), (1.0, 6.0), (2.0, 10.0), (f64::INFINITY, 10.0)]
        );
        assert_eq!((a.sum, a.count), (8.0, 10.0));
        assert_eq!(a.mean(), Some(0.8));
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let samples = parse(EXPOSITION).unwrap();
        let h = histograms_by(&samples, "wsgi_request_duration_seconds", "route");
        let a = &h["/a"];
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
        let samples = parse(EXPOSITION).unwrap();
        let b = &histograms_by(&samples, "wsgi_request_duration_seconds", "route")["/b"];
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
}
