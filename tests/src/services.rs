//! Real downstream services for tests/apps/downstream.py: Debian's PostgreSQL 15, MariaDB and
//! Redis, each in a scratch directory, listening on a free loopback port and on a UNIX socket in
//! that directory; the HTTP backend (tests/apps/backend.py under gunicorn); and the app itself
//! under gunicorn, pointed at all of them. Every one is stopped, its directory removed, on drop.
use std::{
    fs::File,
    os::unix::{fs::chown, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use wsgiscope_devkit::{procfs, repo_root};

use crate::{free_port, signal, wait_for, DownstreamTruth, Server, TempDir, UwsgiMode};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// What a service may take to accept connections (initdb and mariadb-install-db come before).
const STARTUP: Duration = Duration::from_secs(30);
/// The table every SQL route reads: `items(id int primary key, name text)`, ids 1..=ITEMS.
pub const ITEMS: u32 = 100;

/// `CREATE TABLE items` and its rows named `item <id>`, in SQL both PostgreSQL and MariaDB take.
fn items_sql() -> String {
    let rows: Vec<String> = (1..=ITEMS).map(|i| format!("({i}, 'item {i}')")).collect();
    format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES {};",
        rows.join(", ")
    )
}

/// A service process with its output in `dir`/`name`.log: stopped with `stop` on drop (then
/// killed if it lingers), after which its directory goes.
struct Daemon {
    name: &'static str,
    child: Child,
    stop: i32,
    dir: TempDir,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, stop: i32, dir: TempDir) -> Result<Self> {
        let log = File::create(dir.0.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Daemon {
            name,
            child,
            stop,
            dir,
        })
    }

    fn log(&self) -> PathBuf {
        self.dir.0.join(format!("{}.log", self.name))
    }

    /// Waits until `ready` holds. The error says why not, with the end of the service's log
    /// (the directory holding it goes when the caller drops the daemon).
    fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) -> Result<()> {
        let (name, child) = (self.name, &mut self.child);
        let waited = wait_for(&format!("{name} to accept connections"), STARTUP, || {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited with {status} before accepting connections");
            }
            Ok(ready())
        });
        waited.with_context(|| {
            let text = std::fs::read_to_string(self.log()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("{} ends with:\n{}", self.log().display(), tail.join("\n"))
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        signal(self.child.id(), self.stop);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion; fails with its output unless it succeeds. Its stdout.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The uid and gid of a system user, from /etc/passwd.
fn system_user(name: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let fields = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .with_context(|| {
            format!("no user {name} in /etc/passwd: is its Debian package installed?")
        })?;
    Ok((fields[2].parse()?, fields[3].parse()?))
}

/// PostgreSQL 15 as the `postgres` system user (it refuses to run as root), trust
/// authentication, database `postgres` as user `postgres`, the `items` table created.
pub struct Postgres {
    daemon: Daemon,
    port: u16,
}

impl Postgres {
    pub const USER: &'static str = "postgres";
    pub const DATABASE: &'static str = "postgres";

    pub fn start() -> Result<Self> {
        let dir = TempDir::new("postgres");
        let (uid, gid) = system_user("postgres")?;
        // The server writes its data and socket there as that user.
        chown(&dir.0, Some(uid), Some(gid))?;
        let data = dir.0.join("data");
        output(
            Command::new(format!("{PG_BIN}/initdb"))
                .uid(uid)
                .gid(gid)
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    Self::USER,
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]),
        )
        .context("initdb (is postgresql-15 installed? `cargo xtask setup`)")?;
        let port = free_port();
        let mut cmd = Command::new(format!("{PG_BIN}/postgres"));
        cmd.uid(uid)
            .gid(gid)
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir.0);
        cmd.args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ]);
        // Every statement executed, in the log: what the server saw, for `statements()`.
        cmd.args(["-c", "log_statement=all"]);
        // SIGINT is the fast shutdown: it does not wait for clients to disconnect.
        let mut pg = Postgres {
            daemon: Daemon::spawn("postgres", cmd, libc::SIGINT, dir)?,
            port,
        };
        let isready = pg.client("pg_isready");
        pg.daemon.wait_ready(|| {
            Command::new(&isready[0])
                .args(&isready[1..])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;
        pg.query(&items_sql())?;
        Ok(pg)
    }

    /// A client command line (`psql`, `pg_isready`) reaching the server over its socket.
    fn client(&self, program: &str) -> Vec<String> {
        let dir = self.daemon.dir.0.display().to_string();
        [
            program,
            "-h",
            &dir,
            "-p",
            &self.port.to_string(),
            "-U",
            Self::USER,
            "-d",
            Self::DATABASE,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Runs SQL through psql (over the socket): the rows, fields separated by `|`.
    pub fn query(&self, sql: &str) -> Result<String> {
        let psql = self.client("psql");
        output(Command::new(&psql[0]).args(&psql[1..]).args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket's directory (libpq's `host` for a UNIX connection).
    pub fn socket_dir(&self) -> &Path {
        &self.daemon.dir.0
    }

    /// The socket file itself.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir().join(format!(".s.PGSQL.{}", self.port))
    }

    /// libpq conninfo over TCP. `gssencmode=disable`: libpq would otherwise look for Kerberos
    /// credentials (client work before the first byte, which the app cannot time apart).
    pub fn tcp_dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={} user={} gssencmode=disable",
            self.port,
            Self::DATABASE,
            Self::USER
        )
    }

    pub fn unix_dsn(&self) -> String {
        format!(
            "host={} port={} dbname={} user={} gssencmode=disable",
            self.socket_dir().display(),
            self.port,
            Self::DATABASE,
            Self::USER
        )
    }

    /// The SQL of every statement the server executed so far, in order (from its log: a simple
    /// query's text, an extended-protocol execution's statement, prepared or not).
    pub fn statements(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.daemon.log()).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once(" LOG:  ")?;
                match rest.strip_prefix("statement: ") {
                    Some(sql) => Some(sql.to_string()),
                    // `execute <unnamed>: SQL` or `execute _pg3_0: SQL`
                    None => Some(
                        rest.strip_prefix("execute ")?
                            .split_once(": ")?
                            .1
                            .to_string(),
                    ),
                }
            })
            .collect()
    }

    /// Client connections now open (psql's own aside), over TCP and over the socket.
    pub fn connections(&self) -> Result<(usize, usize)> {
        let rows = self.query(
            "SELECT count(*) FILTER (WHERE client_addr IS NOT NULL), count(*) FILTER (WHERE client_addr IS NULL) \
             FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )?;
        let (tcp, unix) = rows.trim().split_once('|').context("two counts")?;
        Ok((tcp.parse()?, unix.parse()?))
    }
}

/// Debian's MariaDB run as root (`--user=root`), user `root` without password over TCP and the
/// socket, database `wsgiscope` with the `items` table.
pub struct Mariadb {
    daemon: Daemon,
    port: u16,
}

impl Mariadb {
    pub const USER: &'static str = "root";
    pub const DATABASE: &'static str = "wsgiscope";

    pub fn start() -> Result<Self> {
        let dir = TempDir::new("mariadb");
        let data = dir.0.join("data");
        // `normal`: root@localhost and root@127.0.0.1 with an empty password, not unix_socket
        // authentication, so TCP clients get in too.
        output(
            Command::new("mariadb-install-db")
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .args([
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--user=root",
                ]),
        )
        .context("mariadb-install-db (is mariadb-server installed? `cargo xtask setup`)")?;
        let port = free_port();
        let mut cmd = Command::new("mariadbd");
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.0.join("mysqld.sock").display()))
            .arg(format!(
                "--pid-file={}",
                dir.0.join("mariadbd.pid").display()
            ))
            .arg(format!("--tmpdir={}", dir.0.display()))
            // Every query as received, for `queries()`.
            .arg(format!(
                "--general-log-file={}",
                dir.0.join("general.log").display()
            ))
            .arg("--general-log=1")
            .arg(format!("--port={port}"))
            // No DNS lookups of clients; no binary log; a small buffer pool.
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                "--skip-log-bin",
            ])
            .arg("--innodb-buffer-pool-size=16M");
        let mut db = Mariadb {
            daemon: Daemon::spawn("mariadb", cmd, libc::SIGTERM, dir)?,
            port,
        };
        let socket = db.socket_path();
        db.daemon.wait_ready(|| {
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", socket.display()))
                .args(["-u", Self::USER, "-e", "SELECT 1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;
        db.query_in("", &format!("CREATE DATABASE {}", Self::DATABASE))?;
        db.query(&items_sql())?;
        Ok(db)
    }

    /// Runs SQL in database `db` (none if empty) through the mariadb client over the socket.
    fn query_in(&self, db: &str, sql: &str) -> Result<String> {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket_path().display()))
            .args(["-u", Self::USER, "--batch", "--skip-column-names"]);
        if !db.is_empty() {
            cmd.args(["-D", db]);
        }
        output(cmd.args(["-e", sql]))
    }

    /// Runs SQL in `wsgiscope`: the rows, fields separated by tabs.
    pub fn query(&self, sql: &str) -> Result<String> {
        self.query_in(Self::DATABASE, sql)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn socket_path(&self) -> PathBuf {
        self.daemon.dir.0.join("mysqld.sock")
    }

    /// `mysql://root@127.0.0.1:PORT/wsgiscope`
    pub fn tcp_url(&self) -> String {
        format!(
            "mysql://{}@127.0.0.1:{}/{}",
            Self::USER,
            self.port,
            Self::DATABASE
        )
    }

    /// `mysql://root@localhost/wsgiscope?unix_socket=PATH` (SQLAlchemy's form)
    pub fn unix_url(&self) -> String {
        format!(
            "mysql://{}@localhost/{}?unix_socket={}",
            Self::USER,
            Self::DATABASE,
            self.socket_path().display()
        )
    }

    /// The text of every query the server received so far, in order (its general log).
    pub fn queries(&self) -> Vec<String> {
        // `<time>\t     <id> Query\t<text>`, the time only on the first line of its second.
        let log =
            std::fs::read_to_string(self.daemon.dir.0.join("general.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| Some(l.split_once(" Query\t")?.1.to_string()))
            .collect()
    }

    /// Client connections now open (the mariadb client's own aside), over TCP and the socket.
    pub fn connections(&self) -> Result<(usize, usize)> {
        // With --skip-name-resolve a TCP client's host is `127.0.0.1:port`; a socket's `localhost`.
        let rows = self.query(
            "SELECT IFNULL(SUM(HOST LIKE '127.0.0.1:%'), 0), IFNULL(SUM(HOST = 'localhost'), 0) \
             FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()",
        )?;
        let (tcp, unix) = rows.trim().split_once('\t').context("two counts")?;
        Ok((tcp.parse()?, unix.parse()?))
    }
}

/// Redis without persistence; keys `item:1`..`item:100` hold `item <id>`, `text` holds a
/// string that is not a number.
pub struct Redis {
    daemon: Daemon,
    port: u16,
}

impl Redis {
    pub fn start() -> Result<Self> {
        let dir = TempDir::new("redis");
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--unixsocket")
            .arg(dir.0.join("redis.sock"))
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(&dir.0);
        let mut redis = Redis {
            daemon: Daemon::spawn("redis", cmd, libc::SIGTERM, dir)?,
            port,
        };
        let port = redis.port;
        redis
            .daemon
            .wait_ready(|| cli(port, &["PING"]).is_ok_and(|r| r.trim() == "PONG"))?;
        let mut mset = vec!["MSET".to_string(), "text".into(), "not a number".into()];
        for i in 1..=ITEMS {
            mset.extend([format!("item:{i}"), format!("item {i}")]);
        }
        let reply = redis.command(&mset.iter().map(String::as_str).collect::<Vec<_>>())?;
        if reply.trim() != "OK" {
            bail!("seeding redis: MSET answered {reply:?}");
        }
        Ok(redis)
    }

    /// One command through redis-cli over TCP: its raw reply.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        cli(self.port, args)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn socket_path(&self) -> PathBuf {
        self.daemon.dir.0.join("redis.sock")
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn tcp_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `unix:///PATH` (redis-py's form)
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    /// How many times the server ran `command` (lower case, `get`), failures included
    /// (INFO commandstats).
    pub fn command_calls(&self, command: &str) -> Result<u64> {
        let stats = self.command(&["INFO", "commandstats"])?;
        // `cmdstat_get:calls=12,usec=...,rejected_calls=0,failed_calls=0`
        let Some(line) = stats
            .lines()
            .find(|l| l.starts_with(&format!("cmdstat_{command}:")))
        else {
            return Ok(0);
        };
        let calls = line
            .split([':', ','])
            .find_map(|f| f.strip_prefix("calls="))
            .context("calls=")?;
        Ok(calls.parse()?)
    }

    /// Client connections now open (redis-cli's own aside), over TCP and over the socket.
    pub fn connections(&self) -> Result<(usize, usize)> {
        let list = self.command(&["CLIENT", "LIST"])?;
        // A UNIX client's address is the socket path; the line with `cmd=client|list` is ours.
        let clients: Vec<&str> = list
            .lines()
            .filter(|l| !l.contains("cmd=client|list"))
            .collect();
        let unix = clients.iter().filter(|l| l.contains(" laddr=/")).count();
        Ok((clients.len() - unix, unix))
    }
}

fn cli(port: u16, args: &[&str]) -> Result<String> {
    output(
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
    )
}

/// The downstream app's ground-truth log in its server's directory.
const DOWNSTREAM_LOG: &str = "downstream.jsonl";

/// Everything tests/apps/downstream.py calls: the three services and the HTTP backend
/// (tests/apps/backend.py under gunicorn gthread, which keeps connections alive).
pub struct Downstream {
    pub postgres: Postgres,
    pub mariadb: Mariadb,
    pub redis: Redis,
    pub backend: Server,
}

impl Downstream {
    /// Starts all of them, the services side by side (initdb and mariadb-install-db take seconds).
    pub fn start() -> Result<Self> {
        thread::scope(|s| {
            let postgres = s.spawn(Postgres::start);
            let mariadb = s.spawn(Mariadb::start);
            let redis = Redis::start();
            let backend = Server::gunicorn_app(
                TempDir::new("backend"),
                ".venv",
                "backend",
                &[
                    "-w",
                    "2",
                    "-k",
                    "gthread",
                    "--threads",
                    "4",
                    "--keep-alive",
                    "3600",
                ],
                &[],
            );
            Ok(Downstream {
                postgres: postgres.join().expect("starting postgres panicked")?,
                mariadb: mariadb.join().expect("starting mariadb panicked")?,
                redis: redis?,
                backend: backend?,
            })
        })
    }

    /// The environment of tests/apps/downstream.py pointing at these services, `threads`
    /// connection sets per worker, its log at `log`.
    pub fn env(&self, threads: usize, log: &Path) -> Vec<(&'static str, String)> {
        vec![
            ("DOWNSTREAM_PG_TCP", self.postgres.tcp_dsn()),
            ("DOWNSTREAM_PG_UNIX", self.postgres.unix_dsn()),
            ("DOWNSTREAM_MYSQL_TCP", self.mariadb.tcp_url()),
            ("DOWNSTREAM_MYSQL_UNIX", self.mariadb.unix_url()),
            ("DOWNSTREAM_REDIS_TCP", self.redis.tcp_url()),
            ("DOWNSTREAM_REDIS_UNIX", self.redis.unix_url()),
            (
                "DOWNSTREAM_HTTP",
                format!("http://127.0.0.1:{}", self.backend.port),
            ),
            ("DOWNSTREAM_THREADS", threads.to_string()),
            ("DOWNSTREAM_LOG", log.display().to_string()),
        ]
    }

    /// tests/apps/downstream.py under gunicorn from `venv` with `args` (workers, worker class…)
    /// and `threads` connection sets per worker, once every worker has opened its connections.
    pub fn serve(&self, venv: &str, args: &[&str], threads: usize) -> Result<Server> {
        self.serve_with(venv, args, threads, &[])
    }

    /// [`Downstream::serve`] with `extra` environment (e.g. `DOWNSTREAM_HOSTILE`).
    pub fn serve_with(
        &self,
        venv: &str,
        args: &[&str],
        threads: usize,
        extra: &[(&'static str, String)],
    ) -> Result<Server> {
        let dir = TempDir::new("downstream");
        let mut env = self.env(threads, &dir.0.join(DOWNSTREAM_LOG));
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        let mut server = Server::gunicorn_app(dir, venv, "downstream", args, &env)?;
        let log = downstream_log(&server);
        let booted = wait_for("every worker to open its connections", STARTUP, || {
            if let Some(status) = server.try_wait()? {
                bail!("gunicorn exited with {status}");
            }
            let ready = DownstreamTruth::read(&log).ready;
            let workers = procfs::children(server.master());
            Ok(!workers.is_empty() && workers.iter().all(|w| ready.contains(w)))
        });
        booted.with_context(|| {
            format!(
                "serving downstream.py; gunicorn's log: {}",
                server.log_text()
            )
        })?;
        Ok(server)
    }
}

impl Downstream {
    /// tests/apps/downstream.py under Debian's uWSGI in `mode` (its Python: the packages are in
    /// `.venv-debian`), `processes` workers of `threads` threads, each importing the app itself
    /// (`--lazy-apps`: connections opened in the master would be shared by every worker).
    pub fn serve_uwsgi(&self, mode: UwsgiMode, processes: u32, threads: usize) -> Result<Server> {
        let dir = TempDir::new("downstream-uwsgi");
        let env = self.env(threads, &dir.0.join(DOWNSTREAM_LOG));
        let venv = repo_root().join(".venv-debian");
        let threads_arg = threads.to_string();
        let mut extra = vec!["--lazy-apps", "--virtualenv", venv.to_str().context("venv path")?];
        if threads > 1 {
            extra.extend(["--threads", &threads_arg]);
        }
        let mut server = Server::uwsgi_app(mode, processes, "downstream", dir, &extra, &env)?;
        let log = downstream_log(&server);
        let booted = wait_for("every worker to open its connections", STARTUP, || {
            if let Some(status) = server.try_wait()? {
                bail!("uwsgi exited with {status}");
            }
            let ready = DownstreamTruth::read(&log).ready;
            Ok(ready.len() >= processes as usize)
        });
        booted.with_context(|| format!("serving downstream.py under uWSGI; its log: {}", server.log_text()))?;
        Ok(server)
    }
}

/// Where the downstream app served by [`Downstream::serve`] logs its ground truth.
pub fn downstream_log(server: &Server) -> PathBuf {
    server.dir.0.join(DOWNSTREAM_LOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_that_dies_at_startup_is_named_with_its_log() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'FATAL: something is wrong' >&2; exit 3"]);
        let mut daemon =
            Daemon::spawn("broken", cmd, libc::SIGTERM, TempDir::new("broken")).unwrap();
        let err = format!("{:#}", daemon.wait_ready(|| false).unwrap_err());
        assert!(
            err.contains("broken exited with exit status: 3 before accepting connections"),
            "{err}"
        );
        assert!(
            err.contains("broken.log ends with:\nFATAL: something is wrong"),
            "{err}"
        );
    }
}
