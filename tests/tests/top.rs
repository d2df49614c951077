//! `wsgiscope top` in a real terminal (tmux), reading a real agent attached to a real gunicorn:
//! what the screen shows against the agent's own API and the server's worker pids, the keys,
//! and its exits (the user quits: 0; the agent goes away or was never there: 2).
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use wsgiscope_integration::{agent_bin, free_port, get, http_get, run_agent, serial, Agent, Server, TempDir};

/// A tmux server of its own (`-L`), so tests never meet another tmux, running one command in
/// a detached pane of a fixed size. The pane stays after the command exits, to read the screen
/// it left; the shell around the command writes its exit status to a file (tmux 3.3 sometimes
/// leaves an exited pane command unreaped, and so its `pane_dead_status` empty, for seconds).
struct Tmux {
    socket: String,
    status: PathBuf,
    _dir: TempDir,
}

impl Tmux {
    fn start(name: &str, width: u16, height: u16, command: &str) -> Tmux {
        let dir = TempDir::new("tmux");
        let config = dir.0.join("tmux.conf");
        std::fs::write(&config, "set -g remain-on-exit on\n").unwrap();
        let socket = format!("wsgiscope-{name}-{}", std::process::id());
        let status = dir.0.join("status");
        let command = format!("{command}; echo $? > {}", status.display());
        let tmux = Tmux { socket, status, _dir: dir };
        let (w, h) = (width.to_string(), height.to_string());
        let out = tmux.run(&["-f", path(&config), "new-session", "-d", "-s", "top", "-x", &w, "-y", &h, &command]);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        // A known terminal type whatever runs the tests (CI has no TERM).
        Command::new("tmux").env("TERM", "xterm-256color").arg("-L").arg(&self.socket).args(args).output().unwrap()
    }

    /// The pane's text, line by line, as a user sees it.
    fn capture(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// The same as one string, the lines the terminal wrapped joined again (plain printed text
    /// fills each line it wraps to the last column).
    fn capture_joined(&self) -> String {
        // From the start of the history: tmux scrolls a line off when the pane dies.
        let out = self.run(&["capture-pane", "-p", "-S", "-", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).replace('\n', "")
    }

    fn keys(&self, keys: &str) {
        assert!(self.run(&["send-keys", "-t", "top", keys]).status.success());
    }

    /// The exit status of the command, once it has exited.
    fn exit_status(&self) -> Option<i32> {
        std::fs::read_to_string(&self.status).ok().and_then(|s| s.trim().parse().ok())
    }

    /// Polls the screen until `done` holds: the screen it held for.
    fn wait_screen(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.capture();
            if done(&screen) {
                return screen;
            }
            assert!(start.elapsed() < timeout, "timed out waiting for {what}; screen:\n{screen}");
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&self, timeout: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            assert!(start.elapsed() < timeout, "top still running after {timeout:?}; screen:\n{}", self.capture());
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn top_command(agent: &str, extra: &str) -> String {
    let bin: PathBuf = agent_bin();
    format!("{} top --url http://{agent} {extra}", bin.display())
}

/// `/api/routes` per route: the agent's own figures.
fn api_routes(agent: &Agent) -> BTreeMap<String, Value> {
    let (status, body) = http_get(&agent.metrics_url, "/api/routes").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["routes"].as_array().unwrap().iter().map(|r| (r["route"].as_str().unwrap().to_string(), r.clone())).collect()
}

/// The routes table of a screen: per route, its cells by column title (the sort arrow dropped).
fn screen_routes(screen: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let lines: Vec<&str> = screen.lines().collect();
    let start = lines.iter().position(|l| l.contains("Routes, last")).expect("a routes table");
    let cells = |l: &str| -> Vec<String> {
        l.trim_matches(|c| c == '│' || c == ' ').split_whitespace().map(|c| c.trim_end_matches(['▼', '▲']).to_string()).collect()
    };
    let header = cells(lines[start + 1]);
    let mut rows = BTreeMap::new();
    for l in &lines[start + 2..] {
        let row = cells(l);
        if row.len() != header.len() {
            continue;
        }
        let row: BTreeMap<String, String> = header.iter().cloned().zip(row).collect();
        rows.insert(row["ROUTE"].clone(), row);
    }
    rows
}

/// The routes in the order the screen lists them.
fn screen_order(screen: &str, routes: &[&str]) -> Vec<String> {
    let start = screen.find("Routes, last").unwrap();
    let mut at: Vec<(usize, String)> =
        routes.iter().map(|r| (screen[start..].find(&format!(" {r} ")).unwrap(), r.to_string())).collect();
    at.sort();
    at.into_iter().map(|(_, r)| r).collect()
}

/// The routes ordered by an API field, largest first.
fn api_order(api: &BTreeMap<String, Value>, field: &str) -> Vec<String> {
    let mut routes: Vec<(&String, f64)> = api.iter().map(|(r, v)| (r, v[field].as_f64().unwrap())).collect();
    routes.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    routes.into_iter().map(|(r, _)| r.clone()).collect()
}

/// `850µs`, `12.3ms`, `1.25s` → seconds.
fn parse_secs(s: &str) -> f64 {
    let (n, scale) = if let Some(n) = s.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else {
        (s.strip_suffix('s').unwrap_or_else(|| panic!("not a duration: {s:?}")), 1.0)
    };
    n.parse::<f64>().unwrap() * scale
}

/// `shown` is `exact` to the digits shown (three significant ones).
fn close(shown: f64, exact: f64) -> bool {
    (shown - exact).abs() <= exact.abs() * 0.01 + 1e-6
}

#[test]
fn top_shows_workers_in_flight_requests_and_routes_and_sorts_them() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "2", "-k", "sync"]).unwrap();
    server.wait_workers(2).unwrap();
    let workers = server.workers();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    for (path, n) in [("/hello", 12), ("/error", 3), ("/sleep?ms=20", 4)] {
        for _ in 0..n {
            get(server.port, path).unwrap();
        }
    }
    let started = Instant::now();
    while api_routes(&agent).values().map(|r| r["requests"].as_u64().unwrap()).sum::<u64>() < 19 {
        assert!(started.elapsed() < Duration::from_secs(20), "the API never counted 19 requests: {:?}", api_routes(&agent));
        thread::sleep(Duration::from_millis(100));
    }

    let tmux = Tmux::start("live", 160, 48, &top_command(&agent.metrics_url, ""));
    let wait = Duration::from_secs(10);
    // Both workers, by the pids the server has; one request in flight shows its worker busy.
    let port = server.port;
    let slow = thread::spawn(move || get(port, "/sleep?ms=3000").unwrap());
    let screen = tmux.wait_screen("a busy worker", wait, |s| s.lines().any(|l| l.contains(" busy ") && l.contains("/sleep")));
    let busy = screen.lines().find(|l| l.starts_with('│') && l.contains(" busy ")).unwrap();
    let busy_pid = workers.iter().find(|p| busy.contains(&format!(" {p} "))).unwrap_or_else(|| panic!("{busy}: {workers:?}"));
    assert!(busy.contains("GET") && busy.contains("application"), "{busy}");
    let idle_pid = workers.iter().find(|p| *p != busy_pid).unwrap();
    let idle = screen.lines().find(|l| l.contains(&format!(" {idle_pid} "))).unwrap_or_else(|| panic!("{screen}"));
    assert!(idle.contains(" idle ") && idle.contains("testapp"), "{idle}");
    assert!(screen.contains("Workers: 2, 1 busy"), "{screen}");
    assert!(screen.lines().next().unwrap().contains(&format!("http://{}  services: testapp", agent.metrics_url)), "{screen}");
    assert!(screen.lines().nth(1).unwrap().starts_with("live · 2 workers, 1 busy"), "{screen}");

    // Once it ends: every route with the agent's counts and figures, sorted by total time.
    assert_eq!(slow.join().unwrap().status, 200);
    let screen = tmux.wait_screen("the slow request counted", wait, |s| {
        s.contains("Workers: 2, 0 busy") && screen_routes(s).get("/sleep").is_some_and(|r| r["REQS"] == "5")
    });
    let api = api_routes(&agent);
    let rows = screen_routes(&screen);
    assert_eq!(rows.keys().collect::<Vec<_>>(), api.keys().collect::<Vec<_>>(), "{screen}");
    let window: f64 = {
        let title = screen.lines().find(|l| l.contains("Routes, last")).unwrap();
        title.split("last ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap()
    };
    for (route, a) in &api {
        let row = &rows[route];
        assert_eq!(row["SERVICE"], "testapp");
        let requests = a["requests"].as_u64().unwrap();
        assert_eq!(row["REQS"].parse::<u64>().unwrap(), requests, "{route}: {screen}");
        // The rate is the requests over the window the title shows (rounded to a second).
        let rate: f64 = row["REQ/S"].parse().unwrap();
        let expected = requests as f64 / window;
        assert!((rate - expected).abs() <= expected * 0.5 / window + 0.01, "{route}: rate {rate} vs {requests} in {window} s");
        for (column, field) in [("P50", "p50"), ("P99", "p99"), ("TOTAL", "total_time")] {
            let shown = parse_secs(&row[column]);
            let exact = a[field].as_f64().unwrap();
            assert!(close(shown, exact), "{route} {column}: {shown} vs {exact}\n{screen}");
        }
        let errors = if route == "/error" { "100%" } else { "0.0%" };
        assert_eq!(row["ERR%"], errors, "{route}");
    }
    assert!(parse_secs(&rows["/sleep"]["P99"]) >= 3.0);
    let routes = ["/hello", "/error", "/sleep"];
    assert!(screen.contains("sort: total time ▼"), "{screen}");
    assert_eq!(screen_order(&screen, &routes), api_order(&api, "total_time"), "{screen}");

    // `s`: by rate, then by p99; the title names it and the rows follow.
    for (title, field) in [("rate", "rate"), ("p99", "p99")] {
        tmux.keys("s");
        let screen = tmux.wait_screen(title, wait, |s| s.contains(&format!("sort: {title} ▼")));
        assert_eq!(screen_order(&screen, &routes), api_order(&api, field), "sorted by {field}:\n{screen}");
    }

    // `q`: exit 0, the alternate screen left.
    tmux.keys("q");
    assert_eq!(tmux.wait_exit(Duration::from_secs(5)), 0);
    let after = tmux.capture();
    assert!(!after.contains("Routes, last"), "the screen is restored:\n{after}");
}

#[test]
fn top_in_a_narrow_pane_then_exits_when_the_agent_goes_away() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "2", "-k", "sync"]).unwrap();
    server.wait_workers(2).unwrap();
    let workers = server.workers();
    let mut agent = Agent::attach(server.master(), &[]).unwrap();
    for _ in 0..3 {
        get(server.port, "/hello").unwrap();
    }
    let tmux = Tmux::start("narrow", 60, 20, &top_command(&agent.metrics_url, "--exit-after 3"));
    let screen = tmux.wait_screen("the workers and /hello", Duration::from_secs(10), |s| {
        workers.iter().all(|p| s.contains(&format!(" {p} "))) && s.contains("│/hello ")
    });
    // Nothing wider than the pane, every table line between its borders, the least needed
    // columns gone.
    for line in screen.lines().skip(2).filter(|l| !l.is_empty()) {
        assert!(line.chars().count() <= 60, "{line:?}");
        assert!(line.starts_with(['│', '┌', '└']) && line.ends_with(['│', '┐', '┘']), "{line:?}\n{screen}");
    }
    assert!(!screen.contains("WAITING ON") && !screen.contains("WRITE%"), "{screen}");
    assert_eq!(tmux.exit_status(), None, "top still runs");

    // The agent goes: the old data stays, marked, with why; then top exits 2, about 3 s later.
    assert_eq!(agent.stop(), 0);
    let stopped = Instant::now();
    let url = format!("agent unreachable at http://{}", agent.metrics_url);
    let screen = tmux.wait_screen("the unreachable line", Duration::from_secs(3), |s| s.contains(&url));
    assert!(screen.contains("[stale]") && workers.iter().all(|p| screen.contains(&format!(" {p} "))), "{screen}");
    assert_eq!(tmux.wait_exit(Duration::from_secs(8)), 2);
    let took = stopped.elapsed();
    assert!(took >= Duration::from_secs(2) && took <= Duration::from_secs(6), "exited {took:?} after the agent stopped");
    let after = tmux.capture_joined();
    assert!(after.contains("stopped answering") && after.contains("--exit-after"), "{after}");
}

#[test]
fn top_without_an_agent_exits_at_once_naming_the_url() {
    let url = format!("127.0.0.1:{}", free_port());
    let start = Instant::now();
    let (code, stderr) = run_agent(&["top", "--url", &url]);
    assert_eq!(code, 2, "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(stderr.contains(&format!("no agent answers at http://{url}")), "{stderr}");
    assert!(stderr.contains("Is wsgiscope running?") && stderr.contains("--listen"), "{stderr}");
}
