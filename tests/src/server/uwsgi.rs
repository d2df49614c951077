//! uWSGI: Debian's (the python3 plugin) in several socket modes, optionally behind a real nginx,
//! and the one pip built in `.venv`.
use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use wsgiscope_devkit::{apps_dir, repo_root};

use super::{app_copy, Server};
use crate::{free_port, wait_for, TempDir};

/// How to run uWSGI.
#[derive(Clone, Copy, Debug)]
pub enum UwsgiMode {
    /// `--http-socket`: workers speak HTTP.
    HttpSocket,
    /// `--http`: a router process relays to the workers.
    Router,
    /// `--socket` on a UNIX socket behind nginx `uwsgi_pass`.
    BehindNginx,
    /// `--http-socket` with `--threads 2`.
    Threads,
    /// `--http11-socket`: keep-alive.
    Http11,
}

/// `program` with `plugins` (they must precede the options they define) and `socket` options,
/// a master that dies on SIGTERM, serving `module:app` from `chdir`.
fn uwsgi_command(program: &Path, plugins: Option<&str>, socket: &[&str], module: &str, chdir: &Path) -> Command {
    let mut cmd = Command::new(program);
    if let Some(plugins) = plugins {
        cmd.args(["--plugin", plugins]);
    }
    cmd.args(socket)
        .args(["--master", "--die-on-term", "--disable-logging", "--need-app", "--module", &format!("{module}:app")])
        .arg("--chdir")
        .arg(chdir);
    cmd
}

/// Debian's uWSGI with its python3 plugin.
fn debian_uwsgi(socket: &[&str], module: &str, chdir: &Path) -> Command {
    uwsgi_command(Path::new("uwsgi"), Some("python3"), socket, module, chdir)
}

impl Server {
    /// uWSGI built by pip in `.venv` (Python built in, linked to the pyenv libpython, which has
    /// no USDT notes), `--http-socket`.
    pub fn uwsgi_pip(processes: u32) -> Result<Self> {
        let uwsgi = repo_root().join(".venv/bin/uwsgi");
        if !uwsgi.exists() {
            bail!("{} missing: run `cargo xtask setup`", uwsgi.display());
        }
        let port = free_port();
        let mut cmd = uwsgi_command(&uwsgi, None, &["--http-socket", &format!("127.0.0.1:{port}")], "testapp", &apps_dir());
        cmd.args(["--processes", &processes.to_string()]);
        Self::spawn(cmd, port, port, TempDir::new("server"))
    }

    /// uWSGI `--http-socket` serving a copy of the test app as module `name`.
    pub fn uwsgi_named(name: &str, processes: u32) -> Result<Self> {
        let dir = app_copy("uwsgi", name)?;
        let port = free_port();
        let mut cmd = debian_uwsgi(&["--http-socket", &format!("127.0.0.1:{port}")], name, &dir.0);
        cmd.args(["--processes", &processes.to_string()]);
        Self::spawn(cmd, port, port, dir)
    }

    /// Debian's uWSGI `--http-socket` with `--master`, the test app and `extra` options.
    pub fn uwsgi_args(extra: &[&str]) -> Result<Self> {
        let port = free_port();
        let mut cmd = debian_uwsgi(&["--http-socket", &format!("127.0.0.1:{port}")], "testapp", &apps_dir());
        cmd.args(extra);
        Self::spawn(cmd, port, port, TempDir::new("server"))
    }

    pub fn uwsgi(mode: UwsgiMode, processes: u32) -> Result<Self> {
        Self::uwsgi_app(mode, processes, "testapp", TempDir::new("uwsgi"), &[], &[])
    }

    /// Debian's uWSGI in `mode` serving tests/apps/`module`.py with `extra` options and `env`,
    /// its files in `dir`.
    pub fn uwsgi_app(
        mode: UwsgiMode,
        processes: u32,
        module: &str,
        dir: TempDir,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let sock = dir.0.join("uwsgi.sock");
        let (plugins, mode_args): (&str, Vec<&str>) = match mode {
            UwsgiMode::HttpSocket => ("python3", vec!["--http-socket", &addr]),
            UwsgiMode::Threads => ("python3", vec!["--http-socket", &addr, "--threads", "2"]),
            // A response without Content-Length can only end by close, after the socket timeout.
            UwsgiMode::Http11 => ("python3", vec!["--http11-socket", &addr, "--socket-timeout", "1"]),
            UwsgiMode::Router => ("python3,http", vec!["--http", &addr]),
            UwsgiMode::BehindNginx => ("python3", vec!["--socket", sock.to_str().unwrap(), "--chmod-socket=666"]),
        };
        let mut cmd = uwsgi_command(Path::new("uwsgi"), Some(plugins), &mode_args, module, &apps_dir());
        cmd.args(["--processes", &processes.to_string()]).args(extra);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        if let UwsgiMode::BehindNginx = mode {
            let s = Self::spawn(cmd, port, 0, dir)?;
            return s.with_nginx(&sock);
        }
        Self::spawn(cmd, port, port, dir)
    }

    /// Puts a real nginx in front (uwsgi_pass to a UNIX socket); its access logs record the
    /// bytes each upstream response had (`$upstream_bytes_received`) and the statuses.
    fn with_nginx(mut self, sock: &Path) -> Result<Self> {
        wait_for("the uWSGI socket", Duration::from_secs(20), || Ok(sock.exists()))?;
        let port = free_port();
        let d = self.dir.0.clone();
        // log_format must precede its use.
        let conf = format!(
            "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ log_format upstream '$uri $upstream_bytes_received'; access_log {d}/nginx-access.log upstream; \
             log_format status '$status $upstream_status'; access_log {d}/nginx-status.log status;\n\
               client_max_body_size 16m; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{port}; location / {{ include /etc/nginx/uwsgi_params; uwsgi_pass unix:{sock}; }} }} }}\n",
            d = d.display(),
            sock = sock.display()
        );
        std::fs::write(d.join("nginx.conf"), conf)?;
        let nginx = Command::new("nginx")
            .args(["-c", d.join("nginx.conf").to_str().unwrap(), "-e", d.join("nginx-error.log").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        self.nginx = Some(nginx);
        self.port = port;
        wait_for("nginx to listen", Duration::from_secs(20), || Ok(TcpStream::connect(("127.0.0.1", port)).is_ok()))?;
        Ok(self)
    }

    /// Bytes nginx received from upstream, per URI (only behind nginx).
    pub fn upstream_bytes(&self) -> BTreeMap<String, u64> {
        let text = std::fs::read_to_string(self.dir.0.join("nginx-access.log")).unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if let Some((uri, n)) = line.split_once(' ') {
                *out.entry(uri.to_string()).or_default() += n.parse::<u64>().unwrap_or(0);
            }
        }
        out
    }

    /// Behind nginx: the statuses of the requests nginx passed to the server, as it got them
    /// back (`$upstream_status`; the requests nginx answered itself are left out).
    pub fn upstream_statuses(&self) -> BTreeMap<String, u64> {
        let text = std::fs::read_to_string(self.dir.0.join("nginx-status.log")).unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if let Some((_, upstream)) = line.split_once(' ') {
                if upstream != "-" {
                    *out.entry(upstream.to_string()).or_default() += 1;
                }
            }
        }
        out
    }
}
