//! Harness for the integration tests: real servers (`server`), the real agent (`agent`), a real
//! HTTP client over TCP and the metrics as Prometheus would read them (both from
//! `wsgiscope-devkit`, which xtask shares), a real Prometheus server (`prometheus`), and what
//! the kernel holds (`kernel`); real downstream services and the app that calls them
//! (`services`).
mod agent;
mod kernel;
mod prometheus;
mod server;
pub mod services;
mod truth;

use std::{
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use anyhow::Result;

pub use agent::{agent_bin, run_agent, Agent};
pub use kernel::{bpf_program_exists, gc_semaphore, tracepoint_program_ids};
pub use prometheus::Prometheus;
pub use server::{Server, UwsgiMode};
pub use truth::{DownstreamCall, DownstreamRequest, DownstreamTruth, Truth};
pub use wsgiscope_devkit::{
    apps_dir,
    exposition::Metrics,
    gunicorn::Gunicorn,
    http::{get as http_get, scrape, url_encode},
    repo_root,
    wire::{self, get, get_keepalive, Response},
};

/// Tests share the CPU and the kernel: run them one at a time so latencies stay meaningful.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn free_port() -> u16 {
    wsgiscope_devkit::free_addr().unwrap().port()
}

fn wait_for(what: &str, timeout: Duration, ready: impl FnMut() -> Result<bool>) -> Result<()> {
    wsgiscope_devkit::wait_for(what, timeout, Duration::from_millis(50), ready)
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wsgiscope-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}
