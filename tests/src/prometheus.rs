//! A real Prometheus server (Debian's) scraping the agent, queried through its HTTP API.
use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use wsgiscope_devkit::http::{get as http_get, url_encode};

use crate::{free_port, wait_for, TempDir};

/// A real Prometheus server (Debian's `prometheus`) on loopback, scraping one target every
/// second as job `job`, its TSDB in a temporary directory. Killed on drop.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    pub job: String,
    dir: TempDir,
}

impl Prometheus {
    const BIN: &'static str = "/usr/bin/prometheus";

    /// Starts it and waits until /-/ready answers.
    pub fn start(job: &str, target: &str) -> Result<Self> {
        if !Path::new(Self::BIN).exists() {
            bail!("{} missing: run `cargo xtask setup` (it installs Debian's prometheus)", Self::BIN);
        }
        let dir = TempDir::new("prometheus");
        // scrape_timeout may not exceed the interval: its 10 s default would be refused.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.0.join("prometheus.yml"), config)?;
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(Self::BIN)
            .arg(format!("--config.file={}", dir.0.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log"))?)
            .spawn()
            .context("starting prometheus")?;
        let mut p = Prometheus { child, addr, job: job.to_string(), dir };
        let addr = p.addr.clone();
        let ready = wait_for("prometheus /-/ready", Duration::from_secs(30), || {
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited with {status}");
            }
            Ok(http_get(&addr, "/-/ready").is_ok_and(|(s, _)| s == 200))
        });
        ready.map_err(|e| anyhow!("{e}: {}", p.log())).map(|_| p)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// `data` of a successful HTTP API answer.
    pub fn api(&self, path: &str) -> Result<serde_json::Value> {
        let (status, body) = http_get(&self.addr, path)?;
        let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            bail!("{path}: HTTP {status}: {body}");
        }
        Ok(v["data"].clone())
    }

    /// An instant-vector query at `at` (Unix seconds) or now: (labels, value) per series.
    pub fn query(&self, promql: &str, at: Option<f64>) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let time = at.map(|t| format!("&time={t:.3}")).unwrap_or_default();
        let data = self.api(&format!("/api/v1/query?query={}{time}", url_encode(promql)))?;
        let series = data["result"].as_array().ok_or_else(|| anyhow!("{promql}: not a vector: {data}"))?;
        series
            .iter()
            .map(|s| {
                let labels = serde_json::from_value(s["metric"].clone())?;
                // Prometheus writes values as strings ("NaN" and "+Inf" included).
                let value = s["value"][1].as_str().ok_or_else(|| anyhow!("no value in {s}"))?.parse()?;
                Ok((labels, value))
            })
            .collect()
    }

    /// The value of a query that must yield exactly one series.
    pub fn one(&self, promql: &str, at: Option<f64>) -> f64 {
        let r = self.query(promql, at).unwrap();
        assert_eq!(r.len(), 1, "{promql} gave {r:?}\nprometheus log:\n{}", self.log());
        r[0].1
    }

    /// Waits until the target has been scraped at or after `t` (Unix seconds).
    pub fn wait_for_scrape_after(&self, t: f64) {
        let q = format!("timestamp(up{{job=\"{}\"}})", self.job);
        let start = Instant::now();
        while self.query(&q, None).unwrap().first().is_none_or(|(_, ts)| *ts < t) {
            assert!(start.elapsed() < Duration::from_secs(15), "no scrape after {t}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
