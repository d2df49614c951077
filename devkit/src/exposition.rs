//! The Prometheus text format and OpenMetrics, as far as the tests, the demo and the bench read
//! them: samples with their labels (values unescaped, so any text a client sent comes back as
//! it was), series filtered by labels, sums per label value, and histograms merged per label
//! value with quantiles estimated the way Prometheus' `histogram_quantile` does.
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, ensure, Context, Result};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// Every sample line of an exposition; comments (`# HELP`, `# TYPE`, `# EOF`) and blank lines
/// are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_sample(line).with_context(|| format!("bad sample line {line:?}")))
        .collect()
}

/// One sample line: name, labels, value. Label values are read per the text format (`\\`, `\"`
/// and `\n` escapes). A timestamp or an OpenMetrics exemplar (` # {...} v`) may follow the value.
pub fn parse_sample(line: &str) -> Result<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' ']).ok_or_else(|| anyhow!("no value"))?;
    ensure!(name_end > 0, "no metric name");
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    // Rust's float parser takes "+Inf", "-Inf" and "NaN" as Prometheus writes them.
    let value = value
        .parse::<f64>()
        .with_context(|| format!("bad value {value:?}"))?;
    Ok(Sample {
        name: line[..name_end].to_string(),
        labels,
        value,
    })
}

/// Reads `k="v",k2="v2"}` (the opening brace already consumed) into `labels`; returns what
/// follows the closing brace.
fn parse_labels<'a>(mut s: &'a str, labels: &mut BTreeMap<String, String>) -> Result<&'a str> {
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
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
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

/// A parsed exposition: its text and its samples.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Self> {
        Ok(Metrics {
            text: text.to_string(),
            samples: parse(text)?,
        })
    }

    /// Series of `name` whose labels include all of `want`.
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && want.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| (&s.labels, s.value))
    }

    /// Sum of the matching series (0 when none).
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.series(name, want).map(|(_, v)| v).sum()
    }

    /// Sum of the samples named `name` per value of label `by` (samples without it are left out).
    pub fn sum_by(&self, name: &str, by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (labels, value) in self.series(name, &[]) {
            if let Some(key) = labels.get(by) {
                *out.entry(key.clone()).or_default() += value;
            }
        }
        out
    }

    /// The histogram `name` (its `_bucket`, `_sum` and `_count` samples), with all series sharing
    /// a value of label `by` merged: e.g. per route, over methods and statuses.
    pub fn histograms_by(&self, name: &str, by: &str) -> BTreeMap<String, Histogram> {
        let (bucket, sum, count) = (
            format!("{name}_bucket"),
            format!("{name}_sum"),
            format!("{name}_count"),
        );
        let mut out: BTreeMap<String, Histogram> = BTreeMap::new();
        for s in &self.samples {
            let Some(key) = s.label(by) else { continue };
            let le = s.label("le").and_then(|le| le.parse::<f64>().ok());
            match (&s.name, le) {
                (n, Some(le)) if *n == bucket => {
                    out.entry(key.into()).or_default().add_bucket(le, s.value)
                }
                (n, _) if *n == sum => out.entry(key.into()).or_default().sum += s.value,
                (n, _) if *n == count => out.entry(key.into()).or_default().count += s.value,
                _ => {}
            }
        }
        out
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

    /// Estimates the q-quantile (0 <= q <= 1) like Prometheus' `histogram_quantile`: find the
    /// bucket holding the q·count-th observation and interpolate linearly inside it (the first
    /// bucket starts at 0). A rank that falls in the +Inf bucket gives the highest finite bound.
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

    /// Adds another series' count at bound `le`; a bound missing so far is added in order.
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

#[cfg(test)]
mod tests;
