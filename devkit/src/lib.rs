//! The development harness that `tests/` (the integration tests) and `xtask/` (demo, bench)
//! share: one exposition parser, one HTTP client (ureq for plain requests, a raw-socket wire
//! client for what only the wire shows), one gunicorn launch, and small helpers for processes
//! and ports. Nothing here is part of the agent.
pub mod exposition;
pub mod gunicorn;
pub mod http;
pub mod procfs;
pub mod wire;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

pub use exposition::{Histogram, Metrics, Sample};

/// The workspace root: devkit/ lives directly under it.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("devkit has a parent directory")
        .to_path_buf()
}

/// The apps the servers serve: the test app (`testapp`) and the bench app (`benchapp`).
pub fn apps_dir() -> PathBuf {
    repo_root().join("tests/apps")
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Polls `ready` every `interval` until it holds; fails on timeout or when `ready` fails.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if ready()? {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(interval);
    }
}
