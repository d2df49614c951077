//! Harness for the integration tests: real gunicorn, the real agent, a real HTTP client over TCP,
//! and the metrics as Prometheus would read them.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

/// Tests share the CPU and the kernel: run them one at a time so latencies stay meaningful.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The agent binary: $WSGISCOPE_BIN, else target/debug/wsgiscope (built by `cargo xtask test`).
pub fn agent_bin() -> PathBuf {
    let bin = std::env::var_os("WSGISCOPE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/wsgiscope"));
    assert!(bin.exists(), "{} missing: run `cargo xtask test` (it builds the agent first)", bin.display());
    bin
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ready()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
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

/// A real WSGI server (gunicorn or uWSGI) serving tests/apps/testapp.py, with the counting
/// middleware logging the truth, optionally behind a real nginx.
pub struct Server {
    child: Child,
    /// Port the clients use (nginx's when there is one).
    pub port: u16,
    pub truth_log: PathBuf,
    nginx: Option<Child>,
    pub dir: TempDir,
}

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

impl Server {
    /// gunicorn from `.venv` (the pyenv Python on PATH).
    pub fn gunicorn(args: &[&str]) -> Result<Self> {
        Self::gunicorn_in(".venv", args)
    }

    /// gunicorn serving a copy of the test app as module `name` (so its service is `name`).
    pub fn gunicorn_named(name: &str, args: &[&str]) -> Result<Self> {
        let dir = TempDir::new("gunicorn");
        std::fs::copy(repo_root().join("tests/apps/testapp.py"), dir.0.join(format!("{name}.py")))?;
        let port = free_port();
        let mut cmd = Command::new(repo_root().join(".venv/bin/gunicorn"));
        cmd.args(["--no-control-socket", "-b", &format!("127.0.0.1:{port}")])
            .args(["--chdir", dir.0.to_str().unwrap()])
            .args(args)
            .arg(format!("{name}:app"));
        Self::spawn(cmd, port, port, Some(dir))
    }

    /// uWSGI built by pip in `.venv` (Python built in, linked to the pyenv libpython, which has
    /// no USDT notes), `--http-socket`.
    pub fn uwsgi_pip(processes: u32) -> Result<Self> {
        let uwsgi = repo_root().join(".venv/bin/uwsgi");
        if !uwsgi.exists() {
            bail!("{} missing: run `cargo xtask setup`", uwsgi.display());
        }
        let port = free_port();
        let mut cmd = Command::new(uwsgi);
        cmd.args(["--http-socket", &format!("127.0.0.1:{port}")])
            .args(["--master", "--die-on-term", "--disable-logging", "--need-app", "--module", "testapp:app"])
            .args(["--processes", &processes.to_string()])
            .args(["--chdir", repo_root().join("tests/apps").to_str().unwrap()]);
        Self::spawn(cmd, port, port, None)
    }

    /// uWSGI `--http-socket` serving a copy of the test app as module `name`.
    pub fn uwsgi_named(name: &str, processes: u32) -> Result<Self> {
        let dir = TempDir::new("uwsgi");
        std::fs::copy(repo_root().join("tests/apps/testapp.py"), dir.0.join(format!("{name}.py")))?;
        let port = free_port();
        let mut cmd = Command::new("uwsgi");
        cmd.args(["--plugin", "python3", "--http-socket", &format!("127.0.0.1:{port}")])
            .args(["--master", "--die-on-term", "--disable-logging", "--need-app", "--module", &format!("{name}:app")])
            .args(["--processes", &processes.to_string(), "--chdir", dir.0.to_str().unwrap()]);
        Self::spawn(cmd, port, port, Some(dir))
    }

    /// Debian's uWSGI `--http-socket` with `--master`, the test app and `extra` options.
    pub fn uwsgi_args(extra: &[&str]) -> Result<Self> {
        let port = free_port();
        let mut cmd = Command::new("uwsgi");
        cmd.args(["--plugin", "python3", "--http-socket", &format!("127.0.0.1:{port}")])
            .args(["--master", "--die-on-term", "--disable-logging", "--need-app", "--module", "testapp:app"])
            .args(["--chdir", repo_root().join("tests/apps").to_str().unwrap()])
            .args(extra);
        Self::spawn(cmd, port, port, None)
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: i32) {
        signal(self.master(), sig);
    }

    /// gunicorn from the venv `venv` under the repository (`.venv-debian`: Debian's python3.11).
    pub fn gunicorn_in(venv: &str, args: &[&str]) -> Result<Self> {
        let gunicorn = repo_root().join(venv).join("bin/gunicorn");
        if !gunicorn.exists() {
            bail!("{} missing: run `cargo xtask setup`", gunicorn.display());
        }
        let port = free_port();
        let mut cmd = Command::new(gunicorn);
        cmd.args(["--no-control-socket", "-b", &format!("127.0.0.1:{port}")])
            .args(["--chdir", repo_root().join("tests/apps").to_str().unwrap()])
            .args(args)
            .arg("testapp:app");
        Self::spawn(cmd, port, port, None)
    }

    pub fn uwsgi(mode: UwsgiMode, processes: u32) -> Result<Self> {
        let dir = TempDir::new("uwsgi");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let sock = dir.0.join("uwsgi.sock");
        // Plugin options must precede the options the plugins define.
        let (plugins, mode_args): (&str, Vec<&str>) = match mode {
            UwsgiMode::HttpSocket => ("python3", vec!["--http-socket", &addr]),
            UwsgiMode::Threads => ("python3", vec!["--http-socket", &addr, "--threads", "2"]),
            // A response without Content-Length can only end by close, after the socket timeout.
            UwsgiMode::Http11 => ("python3", vec!["--http11-socket", &addr, "--socket-timeout", "1"]),
            UwsgiMode::Router => ("python3,http", vec!["--http", &addr]),
            UwsgiMode::BehindNginx => ("python3", vec!["--socket", sock.to_str().unwrap(), "--chmod-socket=666"]),
        };
        let mut cmd = Command::new("uwsgi");
        cmd.args(["--plugin", plugins])
            .args(mode_args)
            .args(["--master", "--die-on-term", "--disable-logging", "--need-app", "--module", "testapp:app"])
            .args(["--processes", &processes.to_string()])
            .args(["--chdir", repo_root().join("tests/apps").to_str().unwrap()]);
        if let UwsgiMode::BehindNginx = mode {
            let s = Self::spawn(cmd, port, 0, Some(dir))?;
            return s.with_nginx(&sock);
        }
        Self::spawn(cmd, port, port, Some(dir))
    }

    /// Apache 2.4 (mpm_event, one child) with mod_wsgi in daemon mode: `processes` daemons of
    /// 4 threads in process group `testapp`, fed by Apache over UNIX sockets.
    pub fn apache_modwsgi(processes: u32) -> Result<Self> {
        Self::apache_modwsgi_named("testapp", processes)
    }

    /// Apache + mod_wsgi with daemon process group `group` (the service name).
    pub fn apache_modwsgi_named(group: &str, processes: u32) -> Result<Self> {
        let dir = TempDir::new("apache");
        let d = dir.0.display().to_string();
        // Daemons run as www-data: give them a copy of the app and a log they may write.
        std::fs::copy(repo_root().join("tests/apps/testapp.py"), dir.0.join("testapp.py"))?;
        let truth = dir.0.join("truth.jsonl");
        std::fs::write(&truth, "")?;
        std::fs::set_permissions(&truth, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        let port = free_port();
        let conf = format!(
            "ServerRoot /etc/apache2\nDefaultRuntimeDir {d}\nPidFile {d}/httpd.pid\nMutex file:{d} default\n\
             ErrorLog {d}/error.log\nLogLevel warn\nListen 127.0.0.1:{port}\nServerName localhost\n\
             User www-data\nGroup www-data\n\
             LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so\n\
             LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so\n\
             LoadModule wsgi_module /usr/lib/apache2/modules/mod_wsgi.so\n\
             StartServers 1\nServerLimit 1\nThreadsPerChild 4\nMaxRequestWorkers 4\n\
             WSGISocketPrefix {d}/wsgi\n\
             WSGIDaemonProcess {group} processes={processes} threads=4 display-name=%{{GROUP}} python-path={d}\n\
             WSGIScriptAlias / {d}/testapp.py process-group={group} application-group=%{{GLOBAL}}\n\
             WSGICallableObject app\n\
             <Directory {d}>\n  Require all granted\n</Directory>\n"
        );
        std::fs::write(dir.0.join("httpd.conf"), conf)?;
        if !Path::new("/usr/lib/apache2/modules/mod_wsgi.so").exists() {
            bail!("mod_wsgi missing: run `cargo xtask setup` (it installs apache2 and libapache2-mod-wsgi-py3)");
        }
        let mut cmd = Command::new("/usr/sbin/apache2");
        cmd.args(["-f", &format!("{d}/httpd.conf"), "-DFOREGROUND"]);
        Self::spawn(cmd, port, port, Some(dir))
    }

    fn spawn(mut cmd: Command, port: u16, wait_port: u16, dir: Option<TempDir>) -> Result<Self> {
        let dir = dir.unwrap_or_else(|| TempDir::new("server"));
        let truth_log = dir.0.join("truth.jsonl");
        let child = cmd
            .env("WSGISCOPE_TRUTH_LOG", &truth_log)
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

    /// Puts a real nginx in front (uwsgi_pass to a UNIX socket); its access log records the
    /// bytes each upstream response had (`$upstream_bytes_received`).
    fn with_nginx(mut self, sock: &Path) -> Result<Self> {
        wait_for("the uWSGI socket", Duration::from_secs(20), || Ok(sock.exists()))?;
        let port = free_port();
        let d = self.dir.0.clone();
        let conf = format!(
            "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log {d}/nginx-access.log upstream; log_format upstream '$uri $upstream_bytes_received';\n\
               client_max_body_size 16m; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{port}; location / {{ include /etc/nginx/uwsgi_params; uwsgi_pass unix:{sock}; }} }} }}\n",
            d = d.display(),
            sock = sock.display()
        );
        // log_format must precede its use.
        let conf = conf.replace(
            &format!("access_log {}/nginx-access.log upstream; log_format upstream '$uri $upstream_bytes_received';", d.display()),
            &format!(
                "log_format upstream '$uri $upstream_bytes_received'; access_log {0}/nginx-access.log upstream; \
                 log_format status '$status $upstream_status'; access_log {0}/nginx-status.log status;",
                d.display()
            ),
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

    pub fn master(&self) -> u32 {
        self.child.id()
    }

    /// Current worker processes (children of the master).
    pub fn workers(&self) -> Vec<u32> {
        let master = self.master();
        let mut out: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|s| {
                    let after = &s[s.rfind(')').unwrap_or(0) + 1..];
                    after.split_whitespace().nth(1) == Some(&master.to_string())
                })
            })
            .collect();
        out.sort_unstable();
        out
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

/// One line of the counting middleware's log.
#[derive(Debug, Clone)]
pub struct Truth {
    pub route: String,
    pub status: u16,
    pub blocks: u64,
    pub bytes: u64,
    pub elapsed: f64,
    pub pid: u32,
    /// Seconds the process spent in garbage collection during the request (gc.callbacks).
    pub gc: f64,
    /// Collections the process ran during the request.
    pub gc_count: u64,
    /// Status line and headers as the app passed them to start_response.
    pub status_line: String,
    pub headers: Vec<(String, String)>,
}

impl Truth {
    fn from_json(line: &str) -> Self {
        let v: serde_json::Value = serde_json::from_str(line).expect("truth line is JSON");
        let num = |k: &str| v[k].as_u64().unwrap_or(0);
        Truth {
            route: v["route"].as_str().unwrap_or_default().to_string(),
            status: num("status") as u16,
            blocks: num("blocks"),
            bytes: num("bytes"),
            elapsed: v["elapsed"].as_f64().unwrap_or(0.0),
            pid: num("pid") as u32,
            gc: v["gc"].as_f64().unwrap_or(0.0),
            gc_count: num("gc_count"),
            status_line: v["status_line"].as_str().unwrap_or_default().to_string(),
            headers: v["headers"]
                .as_array()
                .map(|hs| hs.iter().map(|h| (h[0].as_str().unwrap_or("").into(), h[1].as_str().unwrap_or("").into())).collect())
                .unwrap_or_default(),
        }
    }

    /// Length of the head in CGI form (`Status: 200 OK\r\nName: value\r\n…\r\n`), as mod_wsgi
    /// daemons send it to Apache.
    pub fn cgi_head_len(&self) -> u64 {
        let fields: usize = self.headers.iter().map(|(k, v)| k.len() + 2 + v.len() + 2).sum();
        ("Status: ".len() + self.status_line.len() + 2 + fields + 2) as u64
    }
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
        let dir = TempDir::new("agent");
        let log = dir.0.join("agent.log");
        let port = free_port();
        let child = Command::new(agent_bin())
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
        Metrics::parse(&scrape(&self.metrics_url).expect("scrape /metrics"))
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

/// A response as the client saw it on the wire.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Every byte received: status line, headers, framing, body.
    pub wire_bytes: u64,
    pub chunked: bool,
}

/// GET over a fresh TCP connection (HTTP/1.1, Connection: close), read to EOF.
pub fn get(port: u16, path: &str) -> Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: wsgiscope-tests\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no response head"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("bad status line"))?;
    Ok(Response { status, wire_bytes: raw.len() as u64, chunked: head.contains("transfer-encoding: chunked") })
}

/// GETs over one keep-alive connection (reconnecting when the server closes it), reading each
/// response by its Content-Length or chunked framing.
pub fn get_keepalive(port: u16, paths: &[&str]) -> Result<Vec<Response>> {
    let mut out = Vec::new();
    let mut conn: Option<std::io::BufReader<TcpStream>> = None;
    for path in paths {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                let s = TcpStream::connect(("127.0.0.1", port))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                conn.insert(std::io::BufReader::new(s))
            }
        };
        write!(c.get_mut(), "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: wsgiscope-tests\r\n\r\n")?;
        match read_response(c) {
            Ok((r, keep)) => {
                out.push(r);
                if !keep {
                    conn = None;
                }
            }
            Err(_) => {
                // The server closed without a response (e.g. uWSGI on an exception).
                out.push(Response { status: 0, wire_bytes: 0, chunked: false });
                conn = None;
            }
        }
    }
    Ok(out)
}

fn read_response(c: &mut std::io::BufReader<TcpStream>) -> Result<(Response, bool)> {
    use std::io::BufRead;
    let mut wire = 0u64;
    let mut line = String::new();
    let read_line = |c: &mut std::io::BufReader<TcpStream>, line: &mut String| -> Result<usize> {
        line.clear();
        let n = c.read_line(line)?;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(n)
    };
    wire += read_line(c, &mut line)? as u64;
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let (mut length, mut chunked, mut keep) = (None, false, true);
    loop {
        wire += read_line(c, &mut line)? as u64;
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse::<u64>().ok();
        }
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
        keep &= !(l.starts_with("connection:") && l.contains("close"));
    }
    if chunked {
        loop {
            wire += read_line(c, &mut line)? as u64;
            let size = u64::from_str_radix(line.trim(), 16)?;
            let mut body = vec![0u8; size as usize + 2];
            c.read_exact(&mut body)?;
            wire += body.len() as u64;
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        let mut body = vec![0u8; n as usize];
        c.read_exact(&mut body)?;
        wire += n;
    } else {
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)?;
        wire += rest.len() as u64;
        keep = false;
    }
    Ok((Response { status, wire_bytes: wire, chunked }, keep))
}

/// Body of GET /metrics.
pub fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no response head"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("scrape failed: {head}");
    }
    Ok(body.to_string())
}

/// A parsed exposition: samples by name with their labels.
pub struct Metrics {
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (name, labels, value) = parse_sample(line).unwrap_or_else(|| panic!("bad sample line {line:?}"));
            samples.push((name, labels, value));
        }
        Metrics { text: text.to_string(), samples }
    }

    /// Series of `name` whose labels include all of `want`.
    pub fn series<'a>(&'a self, name: &'a str, want: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| n == name && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, l, v)| (l, *v))
    }

    /// Sum of the matching series (0 when none).
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.series(name, want).map(|(_, v)| v).sum()
    }
}

/// One sample line: name, labels (unescaped), value. Label values are read per the text format
/// (`\\`, `\"` and `\n` escapes), so any text a client sent comes back as it was.
pub fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let name_end = line.find(['{', ' '])?;
    let mut labels = BTreeMap::new();
    let mut chars = line[name_end..].chars().peekable();
    if chars.peek() == Some(&'{') {
        chars.next();
        loop {
            let mut key = String::new();
            loop {
                match chars.next()? {
                    '}' if key.is_empty() => break,
                    '=' => break,
                    c => key.push(c),
                }
            }
            if key.is_empty() {
                break; // `}` (or `,}`)
            }
            if chars.next()? != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()? {
                    '\\' => match chars.next()? {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.next()? {
                ',' => continue,
                '}' => break,
                _ => return None,
            }
        }
    }
    let rest: String = chars.collect();
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((line[..name_end].to_string(), labels, value))
}

#[cfg(test)]
mod tests {
    #[test]
    fn escaped_label_values_are_read_back() {
        let (name, labels, value) =
            super::parse_sample(r#"wsgi_requests_total{route="/q\"x\\y\n",method="GET"} 3"#).unwrap();
        assert_eq!(name, "wsgi_requests_total");
        assert_eq!(labels["route"], "/q\"x\\y\n");
        assert_eq!(labels["method"], "GET");
        assert_eq!(value, 3.0);
        assert_eq!(super::parse_sample("up 1").unwrap().2, 1.0);
        assert_eq!(super::parse_sample(r#"x{le="+Inf"} 2"#).unwrap().1["le"], "+Inf");
    }
}

/// Tracepoint programs held open by any process (the agent's go when it exits: they are not pinned).
/// IDs of the tracepoint programs process `pid` holds open.
pub fn tracepoint_program_ids(pid: u32) -> Vec<u32> {
    const BPF_PROG_TYPE_TRACEPOINT: &str = "prog_type:\t5\n";
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let mut ids = Vec::new();
    for fd in fds.filter_map(|e| e.ok()) {
        let is_prog = std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-prog");
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))
            .unwrap_or_default();
        if is_prog && info.contains(BPF_PROG_TYPE_TRACEPOINT) {
            ids.extend(info.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse::<u32>().ok()));
        }
    }
    ids
}

/// Is a BPF program with this ID still loaded anywhere in the kernel (BPF_PROG_GET_FD_BY_ID)?
pub fn bpf_program_exists(id: u32) -> bool {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    let attr: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: bpf(2) reads `attr` (prog_id, next_id, open_flags) and returns an fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, attr.as_ptr(), size_of_val(&attr)) };
    if fd >= 0 {
        unsafe { libc::close(fd as i32) };
    }
    fd >= 0
}

/// The value of the `gc__start` USDT semaphore in process `pid` (0 when no tracer enables it).
pub fn gc_semaphore(pid: u32) -> u16 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // The interpreter: libpython if mapped, else the python executable.
    let line = maps
        .lines()
        .find(|l| l.contains("libpython3"))
        .or_else(|| maps.lines().find(|l| l.contains("/python3")))
        .expect("an interpreter mapping");
    let path = line.split_whitespace().nth(5).unwrap();
    let base = maps
        .lines()
        .filter(|l| l.ends_with(path))
        .find(|l| l.split_whitespace().nth(2) == Some("00000000"))
        .and_then(|l| u64::from_str_radix(l.split('-').next().unwrap(), 16).ok())
        .expect("the mapping at file offset 0");
    let notes = Command::new("readelf").args(["-n", path]).output().expect("readelf (binutils)");
    let text = String::from_utf8_lossy(&notes.stdout);
    let block = text.split("Name: gc__start").nth(1).expect("a gc__start note");
    let sem = block.split("Semaphore: 0x").nth(1).unwrap().split_whitespace().next().unwrap();
    let vaddr = u64::from_str_radix(sem, 16).unwrap();
    // A fixed-address executable (Debian's python3.11) uses its addresses as they are; PIE and
    // shared objects are loaded at `base`, their first segment being at virtual address 0.
    let header = Command::new("readelf").args(["-h", path]).output().unwrap();
    let fixed = String::from_utf8_lossy(&header.stdout).contains("EXEC (Executable file)");
    let addr = if fixed { vaddr } else { base + vaddr };
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = [0u8; 2];
    std::io::Seek::seek(&mut mem, std::io::SeekFrom::Start(addr)).unwrap();
    mem.read_exact(&mut buf).unwrap();
    u16::from_ne_bytes(buf)
}

/// GET `path` (with its query string) from `addr` as HTTP/1.0: the server answers without
/// chunked encoding and closes, so reading to EOF gives the whole body. (status, body).
/// For JSON APIs such as the real Prometheus server's.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no response head from {addr}{path}"))?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("bad status line {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query-string value: every byte but the RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

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
