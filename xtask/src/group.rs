//! Processes that `demo` and `bench` start (gunicorn, Redis and the agent here, the same way for both),
//! and Ctrl-C. Every started process runs in its own process group and is stopped, with its
//! children, when its guard is dropped: on success, on error and on Ctrl-C alike (Ctrl-C only
//! sets a flag that long waits poll).
use std::{
    fs::File,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use wsgiscope_devkit::http;

/// Set by SIGINT/SIGTERM once `catch_stop` ran.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// From now on SIGINT/SIGTERM set the flag `check_stop` reads instead of killing xtask, so the
/// started processes are stopped in order.
pub fn catch_stop() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

pub fn check_stop() -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    Ok(())
}

/// A started process group; dropping it signals the group, waits, and SIGKILLs what is left.
pub struct Group {
    name: String,
    child: Child,
    stop_signal: libc::c_int,
}

impl Group {
    pub fn spawn(name: &str, cmd: &mut Command, stop_signal: libc::c_int) -> Result<Group> {
        let child = cmd
            .stdin(Stdio::null())
            // Own group: Ctrl-C reaches only xtask, which stops the group in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Group {
            name: name.to_string(),
            child,
            stop_signal,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited (it should run until we stop it).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited on its own ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: signals our own child's process group; the leader is not reaped yet, so the id
        // is not reused.
        unsafe { libc::kill(-pgid, self.stop_signal) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while let Ok(None) = self.child.try_wait() {
            if Instant::now() > deadline {
                eprintln!("xtask: {} did not stop within 15 s; killing it", self.name);
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (workers of a master that died first, say).
        // SAFETY: plain kill(2) on the process group this xtask started.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Polls `ready` until it holds; fails on timeout, on Ctrl-C, or if one of `alive` died.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    alive: &mut [&mut Group],
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    wsgiscope_devkit::wait_for(what, timeout, Duration::from_millis(100), || {
        if ready() {
            return Ok(true);
        }
        check_stop()?;
        for group in alive.iter_mut() {
            group.check_alive()?;
        }
        Ok(false)
    })
}

/// gunicorn (`cmd`, from `wsgiscope_devkit::gunicorn`, the launch the tests use too) on `addr`,
/// its output in `log_path`; ready once GET /hello answers 200, i.e. a worker is up (that
/// request happens before any agent attaches: it is never counted).
pub fn gunicorn(name: &str, mut cmd: Command, addr: SocketAddr, log_path: &Path) -> Result<Group> {
    let log = File::create(log_path)?;
    cmd.stdout(log.try_clone()?).stderr(log);
    // SIGTERM: gunicorn's graceful shutdown.
    let mut group = Group::spawn(name, &mut cmd, libc::SIGTERM)?;
    wait_until(name, Duration::from_secs(30), &mut [&mut group], || {
        http::get_status(addr, "/hello").is_ok_and(|status| status == 200)
    })
    .with_context(|| format!("see {}", log_path.display()))?;
    Ok(group)
}

/// The release agent that demo and bench run.
pub fn agent_binary(root: &Path) -> PathBuf {
    root.join("target/release/wsgiscope")
}

/// `wsgiscope attach --pid <master> --listen <metrics>`, its output appended to `log_path` (or
/// on the terminal); ready once it serves /metrics (it binds first, serves once attached).
/// Dropping it sends SIGINT, so it detaches cleanly.
pub fn attach_agent(
    root: &Path,
    master: u32,
    metrics: SocketAddr,
    log_path: Option<&Path>,
    alive: &mut [&mut Group],
) -> Result<Group> {
    attach_agent_args(root, master, metrics, log_path, alive, &[])
}

/// [`attach_agent`] with `extra` options (e.g. `--ui off`).
pub fn attach_agent_with(root: &Path, master: u32, metrics: SocketAddr, log_path: Option<&Path>, extra: &[&str]) -> Result<Group> {
    attach_agent_args(root, master, metrics, log_path, &mut [], extra)
}

fn attach_agent_args(
    root: &Path,
    master: u32,
    metrics: SocketAddr,
    log_path: Option<&Path>,
    alive: &mut [&mut Group],
    extra: &[&str],
) -> Result<Group> {
    let mut cmd = Command::new(agent_binary(root));
    cmd.args(["attach", "--pid", &master.to_string(), "--listen"])
        .arg(metrics.to_string())
        .args(extra);
    if let Some(path) = log_path {
        let log = File::options().create(true).append(true).open(path)?;
        cmd.stdout(log.try_clone()?).stderr(log);
    }
    let mut agent = Group::spawn("wsgiscope", &mut cmd, libc::SIGINT)?;
    let mut all: Vec<&mut Group> = vec![&mut agent];
    all.extend(alive.iter_mut().map(|g| &mut **g));
    wait_until(
        "the agent's /metrics",
        Duration::from_secs(60),
        &mut all,
        || http::get_status(metrics, "/metrics").is_ok_and(|status| status == 200),
    )
    .with_context(|| match log_path {
        Some(path) => format!("see {}", path.display()),
        None => "see the agent's output above".to_string(),
    })?;
    Ok(agent)
}

/// redis-server's options besides the port and the directory: loopback only, no persistence.
pub const REDIS_ARGS: [&str; 6] = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];

/// A redis-server on a free loopback port, its log and working directory in `dir`, ready once it
/// accepts connections; returns it and its URL (redis://127.0.0.1:PORT/0).
pub fn redis(dir: &Path) -> Result<(Group, String)> {
    let port = wsgiscope_devkit::free_addr()?.port();
    let log = File::create(dir.join("redis.log"))?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(REDIS_ARGS)
        .arg("--dir")
        .arg(dir)
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut redis = Group::spawn("redis-server", &mut cmd, libc::SIGTERM)?;
    wait_until(
        "redis-server",
        Duration::from_secs(20),
        &mut [&mut redis],
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    )?;
    Ok((redis, format!("redis://127.0.0.1:{port}/0")))
}
