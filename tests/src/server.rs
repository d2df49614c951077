//! A real WSGI server serving tests/apps/testapp.py, its counting middleware logging the truth:
//! gunicorn here (launched as xtask launches it, by `wsgiscope_devkit::gunicorn`), uWSGI and
//! nginx in `uwsgi.rs`, Apache with mod_wsgi in `apache.rs`.
mod apache;
mod uwsgi;

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use wsgiscope_devkit::{apps_dir, gunicorn::Gunicorn, gunicorn::TRUTH_LOG_ENV, procfs, repo_root};

pub use uwsgi::UwsgiMode;

use crate::{free_port, signal, wait_for, TempDir, Truth};

/// The truth log's name in the server's directory.
const TRUTH_FILE: &str = "truth.jsonl";

/// A real WSGI server (gunicorn, uWSGI or Apache + mod_wsgi) serving tests/apps/testapp.py, with
/// the counting middleware logging the truth, optionally behind a real nginx.
pub struct Server {
    child: Child,
    /// Port the clients use (nginx's when there is one).
    pub port: u16,
    pub truth_log: PathBuf,
    nginx: Option<Child>,
    pub dir: TempDir,
}

impl Server {
    /// gunicorn from `.venv` (the pyenv Python on PATH).
    pub fn gunicorn(args: &[&str]) -> Result<Self> {
        Self::gunicorn_in(".venv", args)
    }

    /// gunicorn serving a copy of the test app as module `name` (so its service is `name`).
    pub fn gunicorn_named(name: &str, args: &[&str]) -> Result<Self> {
        let dir = app_copy("gunicorn", name)?;
        let chdir = dir.0.clone();
        Self::start_gunicorn(".venv", &chdir, name, args, dir)
    }

    /// gunicorn from the venv `venv` under the repository (`.venv-debian`: Debian's python3.11).
    pub fn gunicorn_in(venv: &str, args: &[&str]) -> Result<Self> {
        Self::start_gunicorn(venv, &apps_dir(), "testapp", args, TempDir::new("server"))
    }

    /// gunicorn from `venv` serving another app of tests/apps (`module`.py, callable `app`) with
    /// extra environment, its log in `dir`.
    pub fn gunicorn_app(dir: TempDir, venv: &str, module: &str, args: &[&str], env: &[(&str, String)]) -> Result<Self> {
        let port = free_port();
        let mut cmd = Gunicorn::new(format!("127.0.0.1:{port}"), apps_dir(), &format!("{module}:app"))
            .venv(venv)
            .args(args)
            .command(&repo_root())?;
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        Self::spawn(cmd, port, port, dir)
    }

    fn start_gunicorn(venv: &str, chdir: &Path, module: &str, args: &[&str], dir: TempDir) -> Result<Self> {
        let port = free_port();
        let cmd = Gunicorn::new(format!("127.0.0.1:{port}"), chdir, &format!("{module}:app"))
            .venv(venv)
            .args(args)
            .truth_log(&dir.0.join(TRUTH_FILE))
            .command(&repo_root())?;
        Self::spawn(cmd, port, port, dir)
    }

    /// Starts `cmd` with its stderr in `dir`/server.log and the truth log in `dir`; waits until
    /// `wait_port` (unless 0) accepts connections.
    fn spawn(mut cmd: Command, port: u16, wait_port: u16, dir: TempDir) -> Result<Self> {
        let truth_log = dir.0.join(TRUTH_FILE);
        let child = cmd
            .env(TRUTH_LOG_ENV, &truth_log)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("server.log"))?)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let s = Server { child, port, truth_log, nginx: None, dir };
        if wait_port != 0 {
            wait_for("the server to listen", Duration::from_secs(20), || {
                Ok(TcpStream::connect(("127.0.0.1", wait_port)).is_ok())
            })?;
        }
        Ok(s)
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: i32) {
        signal(self.master(), sig);
    }

    /// The master's exit status if it has exited (gunicorn exits when a worker fails to boot).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// The server's own log (its stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("server.log")).unwrap_or_default()
    }

    pub fn master(&self) -> u32 {
        self.child.id()
    }

    /// Current worker processes (children of the master).
    pub fn workers(&self) -> Vec<u32> {
        procfs::children(self.master())
    }

    pub fn wait_workers(&self, n: usize) -> Result<()> {
        wait_for("the workers", Duration::from_secs(20), || Ok(self.workers().len() == n))
    }

    /// The middleware's records, one per request.
    pub fn truth(&self) -> Vec<Truth> {
        let text = std::fs::read_to_string(&self.truth_log).unwrap_or_default();
        text.lines().map(Truth::from_json).collect()
    }

    pub fn stop(&mut self) {
        if let Some(mut n) = self.nginx.take() {
            signal(n.id(), libc::SIGQUIT);
            let _ = n.wait();
        }
        signal(self.master(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// A scratch directory (`tag`) holding a copy of the test app as module `module`.
fn app_copy(tag: &str, module: &str) -> Result<TempDir> {
    let dir = TempDir::new(tag);
    std::fs::copy(apps_dir().join("testapp.py"), dir.0.join(format!("{module}.py")))?;
    Ok(dir)
}
