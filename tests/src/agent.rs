//! The agent under test: the debug binary, attached or run in any mode, serving /metrics on a
//! free loopback port.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use wsgiscope_devkit::{http::scrape, repo_root, Metrics};

use crate::{free_port, signal, wait_for, TempDir};

/// The agent binary: $WSGISCOPE_BIN, else target/debug/wsgiscope (built by `cargo xtask test`).
pub fn agent_bin() -> PathBuf {
    let bin = std::env::var_os("WSGISCOPE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/wsgiscope"));
    assert!(bin.exists(), "{} missing: run `cargo xtask test` (it builds the agent first)", bin.display());
    bin
}

/// The agent attached to a PID, serving /metrics.
pub struct Agent {
    child: Child,
    pub metrics_url: String,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Agent {
    pub fn attach(pid: u32, extra: &[&str]) -> Result<Self> {
        let mut args = vec!["attach", "--pid"];
        let pid = pid.to_string();
        args.push(&pid);
        args.extend(extra);
        Self::start(&args, &[], &[])
    }

    /// `wsgiscope <args> --listen 127.0.0.1:<free port> <trailing>` with extra environment
    /// (`run` passes it on to the server), once its /metrics answers.
    pub fn start(args: &[&str], trailing: &[&str], env: &[(&str, &Path)]) -> Result<Self> {
        Self::start_wrapped(&[], args, trailing, env)
    }

    /// As `start`, run by `wrapper` (a command that ends by exec'ing its arguments, so the PID
    /// stays the agent's), e.g. one that narrows the agent's privileges.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str], trailing: &[&str], env: &[(&str, &Path)]) -> Result<Self> {
        let dir = TempDir::new("agent");
        let log = dir.0.join("agent.log");
        let port = free_port();
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        let child = command
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(trailing)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            // One debug line per request: the kernel's aggregate, shown when an assertion fails.
            .env("RUST_LOG", "info,wsgiscope::session=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut agent = Agent { child, metrics_url: format!("127.0.0.1:{port}"), log, _dir: dir };
        let url = agent.metrics_url.clone();
        let ready = wait_for("the agent's /metrics", Duration::from_secs(30), || {
            if let Some(status) = agent.child.try_wait()? {
                bail!("agent exited with {status}: {}", agent.log_text());
            }
            Ok(scrape(&url).is_ok())
        });
        ready.map(|_| agent)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> Metrics {
        let text = scrape(&self.metrics_url).expect("scrape /metrics");
        Metrics::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"))
    }

    /// Polls /metrics until `done` holds (the agent reads the ring buffer asynchronously).
    pub fn metrics_when(&self, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
        let mut last = self.metrics();
        let start = Instant::now();
        while !done(&last) && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(100));
            last = self.metrics();
        }
        assert!(done(&last), "timed out waiting for {what}; metrics:\n{}\nagent log:\n{}", last.text, self.log_text());
        last
    }

    /// Every record the live API holds (/api/requests read page by page from cursor 0).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut since = 0;
        loop {
            let path = format!("/api/requests?since={since}&limit=1000");
            let (status, body) = crate::http_get(&self.metrics_url, &path).expect("GET /api/requests");
            assert_eq!(status, 200, "{path}: {body}");
            let page: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
            assert_eq!(page["missed"], 0, "no record dropped from the live ring");
            out.extend(page["requests"].as_array().unwrap().iter().cloned());
            since = page["cursor"].as_u64().unwrap();
            if !page["more"].as_bool().unwrap() {
                return out;
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the agent to exit by itself: its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM and wait: returns the exit code.
    pub fn stop(&mut self) -> i32 {
        signal(self.child.id(), libc::SIGTERM);
        self.child.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// Runs the agent to completion (for invocations expected to fail): (exit code, stderr).
pub fn run_agent(args: &[&str]) -> (i32, String) {
    let out = Command::new(agent_bin()).args(args).output().expect("run agent");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}
