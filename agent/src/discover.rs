//! Discover: from a PID to the server to attach to — its master, its workers, its kind, and a
//! service name. Everything comes from /proc.
use anyhow::{bail, Context, Result};
use procfs::process::Process;

pub use crate::server::ServerKind;

/// A server to attach to.
#[derive(Debug)]
pub struct Target {
    pub master: u32,
    pub kind: ServerKind,
    pub service: String,
    /// Front ends among the server's own processes relay HTTP to the workers (the uWSGI `--http`
    /// router, Apache children in front of mod_wsgi daemons): HTTP requests seen there are
    /// relays, counted by the workers.
    pub http_relayed: bool,
    /// Children known at attach to be front ends, not workers (the uWSGI router).
    pub front_ends: Vec<u32>,
}

/// Does a uWSGI command line start the HTTP router (`--http`, `--https`, not `--http-socket`)?
pub fn has_http_router(cmdline: &[String]) -> bool {
    cmdline.iter().any(|a| {
        let opt = a.split('=').next().unwrap_or("");
        opt == "--http" || opt == "--https" || opt == "--http2"
    })
}

/// What /proc says about one process.
struct ProcInfo {
    comm: String,
    cmdline: Vec<String>,
    ppid: u32,
    python: bool,
}

fn proc_info(pid: u32) -> Result<ProcInfo> {
    let p = Process::new(pid as i32).with_context(|| {
        format!("no process with PID {pid}: check the PID (for example `pgrep -o gunicorn` gives the master)")
    })?;
    let stat = p.stat().with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let cmdline = p.cmdline().unwrap_or_default();
    let exe = p.exe().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
    let exe_is_python = exe.rsplit('/').next().is_some_and(|b| b.starts_with("python"));
    let python = exe_is_python
        || std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map(|m| m.contains("libpython"))
            .unwrap_or(false);
    Ok(ProcInfo { comm: stat.comm, cmdline, ppid: stat.ppid as u32, python })
}

/// Which server a Python process belongs to, from its comm and command line.
pub fn server_kind(comm: &str, cmdline: &[String]) -> Option<ServerKind> {
    let first = cmdline.first().map(String::as_str).unwrap_or("");
    let script = cmdline.iter().take(2).any(|a| a.rsplit('/').next() == Some("gunicorn"));
    let module = python_module(cmdline);
    let gunicorn_module = module.is_some_and(|m| m == "gunicorn" || m.starts_with("gunicorn."));
    if let Some(kind) = ServerKind::from_comm(comm) {
        Some(kind)
    } else if first.starts_with("gunicorn:") || script || gunicorn_module {
        Some(ServerKind::Gunicorn)
    } else if first.rsplit('/').next().is_some_and(|b| b.starts_with("uwsgi")) {
        Some(ServerKind::Uwsgi)
    } else if first.starts_with("(wsgi:") {
        Some(ServerKind::ModWsgi)
    } else {
        None
    }
}

/// The module a Python command line runs (`python3 -X dev -m gunicorn …` → `gunicorn`): the
/// argument of `-m` among the interpreter's own options, which come before it.
pub fn python_module(cmdline: &[String]) -> Option<&str> {
    let interpreter = cmdline.first()?.rsplit('/').next()?;
    if !interpreter.starts_with("python") {
        return None;
    }
    let mut args = cmdline[1..].iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-m" => return args.next().map(String::as_str),
            // Glued form: `-mgunicorn`.
            m if m.starts_with("-m") => return Some(&m[2..]),
            // Options that take a value (`-X dev`, `-W error`); `-c` runs code, not a module.
            "-X" | "-W" | "--check-hash-based-pycs" => {
                args.next();
            }
            o if o.starts_with('-') && o != "-c" && o != "-" => {}
            _ => return None, // a script, `-c` or `-`: no module
        }
    }
    None
}

/// A recognisable service name from the master's command line: the gunicorn app module
/// (`myapp.wsgi:application` → `myapp.wsgi`).
pub fn service_name(kind: ServerKind, cmdline: &[String], master: u32) -> String {
    // uWSGI: --wsgi-file path/app.py → app
    if let Some(i) = cmdline.iter().position(|a| a == "--wsgi-file" || a == "--file") {
        if let Some(stem) = cmdline.get(i + 1).and_then(|f| std::path::Path::new(f).file_stem()) {
            return stem.to_string_lossy().into_owned();
        }
    }
    let app = cmdline.iter().rev().find(|a| {
        let mut parts = a.splitn(2, ':');
        let module = parts.next().unwrap_or("");
        let attr = parts.next();
        attr.and_then(|t| t.chars().next()).is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && !module.is_empty()
            && module.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && module.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    });
    match app {
        Some(a) => a.split(':').next().unwrap_or(a).to_string(),
        None => format!("{kind}-{master}"),
    }
}

/// Every WSGI master running on the node (`wsgiscope daemon`), found from /proc.
pub fn find_masters() -> Vec<Target> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    let mut masters: Vec<Target> = Vec::new();
    for p in all.filter_map(Result::ok) {
        let (Ok(stat), Ok(cmdline)) = (p.stat(), p.cmdline()) else { continue };
        // Cheap filter before find_target reads more of /proc.
        if server_kind(&stat.comm, &cmdline).is_none() {
            continue;
        }
        if let Ok(t) = find_target(stat.pid as u32, None) {
            if !masters.iter().any(|m| m.master == t.master) {
                masters.push(t);
            }
        }
    }
    masters
}

/// All processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.filter_map(Result::ok)
        .filter_map(|p| p.stat().ok())
        .filter(|s| s.ppid as u32 == pid)
        .map(|s| s.pid as u32)
        .collect()
}

/// Every process below `pid`, breadth first.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        for c in children_of(p) {
            out.push(c);
            queue.push(c);
        }
    }
    out
}

/// Is the process running (not gone, not a zombie waiting to be reaped)?
pub fn is_alive(pid: u32) -> bool {
    Process::new(pid as i32).and_then(|p| p.stat()).is_ok_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Is `task` a process (thread-group leader) rather than a thread?
pub fn is_process(task: u32) -> bool {
    Process::new(task as i32)
        .and_then(|p| p.status())
        .map(|s| s.tgid as u32 == task)
        .unwrap_or(false)
}

/// Validates `pid` and finds the server it belongs to.
pub fn find_target(pid: u32, service: Option<&str>) -> Result<Target> {
    let info = proc_info(pid)?;
    if !info.python {
        bail!(
            "process {pid} ({}) is not a Python process: neither its executable nor /proc/{pid}/maps \
             holds a Python interpreter. Pass the PID of a gunicorn, uWSGI or Apache (mod_wsgi) master or worker",
            info.comm
        );
    }
    let Some(kind) = server_kind(&info.comm, &info.cmdline) else {
        bail!(
            "process {pid} ({}) runs Python but is not a WSGI server wsgiscope knows \
             (command line: {:?}). Pass the PID of a gunicorn, uWSGI or Apache (mod_wsgi) master or worker",
            info.comm,
            info.cmdline.join(" ")
        );
    };
    // A worker's parent is the master: climb while the parent is the same server.
    let mut master = pid;
    let mut cmdline = info.cmdline;
    let mut ppid = info.ppid;
    while ppid > 1 {
        match proc_info(ppid) {
            Ok(p) if p.python && server_kind(&p.comm, &p.cmdline) == Some(kind) => {
                master = ppid;
                cmdline = p.cmdline;
                ppid = p.ppid;
            }
            _ => break,
        }
    }
    Ok(Target::new(master, kind, &cmdline, service))
}

impl Target {
    /// The server whose master is `master`, from its command line (`service` overrides the
    /// name found there). Used for a running master and for one `wsgiscope run` starts.
    pub fn new(master: u32, kind: ServerKind, cmdline: &[String], service: Option<&str>) -> Self {
        let service = service.map(str::to_string).unwrap_or_else(|| match kind {
            ServerKind::ModWsgi => daemon_group(master).unwrap_or_else(|| format!("{kind}-{master}")),
            _ => service_name(kind, cmdline, master),
        });
        let router = kind == ServerKind::Uwsgi && has_http_router(cmdline);
        let http_relayed = kind == ServerKind::ModWsgi || router;
        let front_ends = if router { uwsgi_router(master, cmdline).into_iter().collect() } else { Vec::new() };
        Target { master, kind, service, http_relayed, front_ends }
    }
}

/// The port of uWSGI's `--http` address (`--http :8000`, `--http=127.0.0.1:8000`).
pub fn http_router_port(cmdline: &[String]) -> Option<u16> {
    let addr = cmdline.iter().enumerate().find_map(|(i, a)| match a.split_once('=') {
        Some(("--http", v)) => Some(v.to_string()),
        None if a == "--http" => cmdline.get(i + 1).cloned(),
        _ => None,
    })?;
    addr.rsplit(':').next()?.split(',').next()?.parse().ok()
}

/// uWSGI's HTTP router: the master's child that holds the socket listening on the `--http`
/// port (the workers listen on an internal socket instead).
fn uwsgi_router(master: u32, cmdline: &[String]) -> Option<u32> {
    let port = http_router_port(cmdline)?;
    let m = Process::new(master as i32).ok()?;
    // The master's network namespace: the server may run in a container.
    let listening: Vec<u64> = [m.tcp(), m.tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.state == procfs::net::TcpState::Listen && e.local_address.port() == port)
        .map(|e| e.inode)
        .collect();
    children_of(master).into_iter().find(|&c| {
        Process::new(c as i32).and_then(|p| p.fd()).is_ok_and(|fds| {
            fds.flatten().any(|fd| matches!(fd.target, procfs::process::FDTarget::Socket(i) if listening.contains(&i)))
        })
    })
}

/// The mod_wsgi process group of a daemon's title `(wsgi:<group>)`; `None` when the title was
/// cut to the length of Apache's argv[0] (no closing parenthesis).
pub fn daemon_title_group(first_arg: &str) -> Option<&str> {
    // mod_wsgi pads the title with spaces to the length of the argv it overwrites.
    first_arg.trim_end().strip_prefix("(wsgi:")?.strip_suffix(')').filter(|g| !g.is_empty())
}

/// The process group of the first mod_wsgi daemon below the Apache parent.
fn daemon_group(master: u32) -> Option<String> {
    children_of(master).into_iter().find_map(|c| {
        let cmdline = Process::new(c as i32).and_then(|p| p.cmdline()).ok()?;
        daemon_title_group(cmdline.first()?).map(str::to_string)
    })
}

/// Is this child of the master a worker (it runs the application), as far as /proc tells now?
/// mod_wsgi daemons retitle themselves `(wsgi:<group>` just after fork; Apache's other children
/// are front ends. gunicorn and uWSGI children are workers (the uWSGI router gives its slot up
/// at its first relayed request).
pub fn is_worker(kind: ServerKind, pid: u32) -> bool {
    match kind {
        ServerKind::ModWsgi => Process::new(pid as i32)
            .and_then(|p| p.cmdline())
            .is_ok_and(|c| c.first().is_some_and(|a| a.starts_with("(wsgi:"))),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn gunicorn_is_recognised_by_comm_script_or_title() {
        let cl = args("/venv/bin/python3 /venv/bin/gunicorn -w 2 app:app");
        assert_eq!(server_kind("gunicorn", &cl), Some(ServerKind::Gunicorn));
        assert_eq!(server_kind("python3", &cl), Some(ServerKind::Gunicorn));
        assert_eq!(server_kind("x", &args("gunicorn: master [app:app]")), Some(ServerKind::Gunicorn));
        assert_eq!(server_kind("uwsgi", &args("uwsgi --http-socket :8000")), Some(ServerKind::Uwsgi));
        assert_eq!(server_kind("python3", &args("python3 -m http.server")), None);
        assert_eq!(server_kind("python3", &args("/v/bin/python3 -m gunicorn -w 2 app:app")), Some(ServerKind::Gunicorn));
        assert_eq!(server_kind("python", &args("python -u -X dev -m gunicorn app:app")), Some(ServerKind::Gunicorn));
        assert_eq!(server_kind("python3", &args("python3 -mgunicorn.app.wsgiapp app:app")), Some(ServerKind::Gunicorn));
        assert_eq!(server_kind("python3", &args("python3 -c import gunicorn -m gunicorn")), None);
        assert_eq!(server_kind("python3", &args("python3 serve.py -m gunicorn")), None);
        let cl = args("/v/bin/python3 -m gunicorn -w 2 shop.wsgi:application");
        assert_eq!(service_name(ServerKind::Gunicorn, &cl, 7), "shop.wsgi");
    }

    #[test]
    fn service_is_the_app_module() {
        let cl = args("/v/bin/python /v/bin/gunicorn -w 2 -b 127.0.0.1:8000 -k sync shop.wsgi:application");
        assert_eq!(service_name(ServerKind::Gunicorn, &cl, 7), "shop.wsgi");
        let cl = args("/v/bin/gunicorn --bind unix:/tmp/s.sock app:create_app()");
        assert_eq!(service_name(ServerKind::Gunicorn, &cl, 7), "app");
        let cl = args("/v/bin/gunicorn app:app -b localhost:8000 --bind unix:/tmp/s.sock");
        assert_eq!(service_name(ServerKind::Gunicorn, &cl, 7), "app");
        let cl = args("uwsgi --http-socket :8000 --wsgi-file /srv/shop/wsgi_main.py");
        assert_eq!(service_name(ServerKind::Uwsgi, &cl, 7), "wsgi_main");
        let cl = args("uwsgi --plugin python3 --socket /tmp/s.sock --module testapp:app");
        assert_eq!(service_name(ServerKind::Uwsgi, &cl, 7), "testapp");
        let cl = args("/v/bin/gunicorn -c conf.py");
        assert_eq!(service_name(ServerKind::Gunicorn, &cl, 7), "gunicorn-7");
    }

    #[test]
    fn mod_wsgi_daemon_titles_name_the_process_group() {
        assert_eq!(daemon_title_group("(wsgi:shop)"), Some("shop"));
        assert_eq!(daemon_title_group("(wsgi:shop)    "), Some("shop"));
        assert_eq!(daemon_title_group("(wsgi:sh"), None);
        assert_eq!(daemon_title_group("apache2"), None);
        assert_eq!(server_kind("apache2", &args("(wsgi:shop) -k start")), Some(ServerKind::ModWsgi));
    }

    #[test]
    fn uwsgi_http_router_is_recognised() {
        assert!(has_http_router(&args("uwsgi --plugin python3,http --http 127.0.0.1:80 --module a:b")));
        assert!(has_http_router(&args("uwsgi --http=:80 --module a:b")));
        assert!(!has_http_router(&args("uwsgi --http-socket :80 --module a:b")));
        assert!(!has_http_router(&args("uwsgi --http11-socket :80 --module a:b")));
        assert_eq!(http_router_port(&args("uwsgi --http 127.0.0.1:8080 --module a:b")), Some(8080));
        assert_eq!(http_router_port(&args("uwsgi --http=:80 --module a:b")), Some(80));
        assert_eq!(http_router_port(&args("uwsgi --http-socket :80")), None);
    }

    #[test]
    fn missing_pid_is_a_clear_error() {
        let err = find_target(u32::MAX - 1, None).unwrap_err().to_string();
        assert!(err.contains("no process with PID"), "{err}");
    }

    #[test]
    fn non_python_process_is_refused() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let err = find_target(child.id(), None).unwrap_err().to_string();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(err.contains("is not a Python process"), "{err}");
    }
}
