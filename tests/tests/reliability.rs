//! Reliability: a paced soak against the server's own access log, reloads, an agent killed
//! outright, two agents at once, hostile traffic, and bad invocations — no crash, nothing lost,
//! nothing left behind.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use wsgiscope_integration::{
    agent_bin, bpf_program_exists, free_port, gc_semaphore, get, scrape, serial, tracepoint_program_ids, wire, Agent,
    Metrics, Server, TempDir, UwsgiMode,
};

#[test]
fn a_paced_soak_counts_exactly_what_the_access_log_shows() {
    let _serial = serial();
    let dir = TempDir::new("soak");
    let access = dir.0.join("access.log");
    let server =
        Server::gunicorn(&["-w", "2", "--access-logfile", access.to_str().unwrap(), "--access-logformat", "%(U)s"]).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    // 4 clients at 25 requests/s each for 8 s, over three routes.
    let port = server.port;
    let clients: Vec<_> = (0..4)
        .map(|c| {
            std::thread::spawn(move || {
                let routes = ["/hello", "/sleep?ms=5", "/blocks"];
                let start = Instant::now();
                let mut n = 0u32;
                while start.elapsed() < Duration::from_secs(8) {
                    let due = Duration::from_millis(40) * n;
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    assert_eq!(get(port, routes[(n as usize + c) % 3]).unwrap().status, 200);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let sent: u32 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let m = agent.metrics_when("every request", |m| m.sum("wsgi_requests_total", &[]) >= sent as f64);
    let mut logged: BTreeMap<String, f64> = BTreeMap::new();
    for line in std::fs::read_to_string(&access).unwrap().lines() {
        *logged.entry(line.trim().to_string()).or_default() += 1.0;
    }
    assert_eq!(logged.values().sum::<f64>(), sent as f64, "gunicorn logged every request");
    for (route, n) in &logged {
        assert_eq!(m.sum("wsgi_requests_total", &[("route", route)]), *n, "{route}");
    }
    assert_eq!(m.sum("wsgi_requests_total", &[]), sent as f64);
    assert_eq!(m.sum("wsgiscope_lost_events_total", &[]), 0.0);
}

fn counted(agent: &Agent) -> f64 {
    agent.metrics().sum("wsgi_requests_total", &[])
}

#[test]
fn reloads_keep_counters_monotonic_and_follow_the_new_workers() {
    let _serial = serial();
    for (name, server, reload) in [
        ("gunicorn HUP", Server::gunicorn(&["-w", "2"]).unwrap(), libc::SIGHUP),
        ("uWSGI HUP", Server::uwsgi(UwsgiMode::HttpSocket, 2).unwrap(), libc::SIGHUP),
    ] {
        server.wait_workers(2).unwrap();
        let agent = Agent::attach(server.master(), &[]).unwrap();
        let old = server.workers();
        for _ in 0..10 {
            assert_eq!(get(server.port, "/hello").unwrap().status, 200);
        }
        agent.metrics_when("10 requests", |m| m.sum("wsgi_requests_total", &[]) >= 10.0);
        // SAFETY: plain kill(2) on a process this test started.
        unsafe { libc::kill(server.master() as i32, reload) };
        let start = Instant::now();
        while server.workers().len() != 2 || server.workers().iter().any(|w| old.contains(w)) {
            assert!(start.elapsed() < Duration::from_secs(20), "{name}: new workers");
            assert!(counted(&agent) >= 10.0, "{name}: counters never go back");
            std::thread::sleep(Duration::from_millis(50));
        }
        // uWSGI re-execs its master: wait until it listens again.
        let mut ok = 0;
        while ok < 10 {
            if get(server.port, "/hello").is_ok_and(|r| r.status == 200) {
                ok += 1;
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let m = agent.metrics_when("20 requests", |m| m.sum("wsgi_requests_total", &[]) >= 20.0);
        assert_eq!(m.sum("wsgi_requests_total", &[]), 20.0, "{name}");
        let new = server.workers();
        let served: Vec<u32> = m
            .series("wsgi_worker_info", &[])
            .map(|(l, _)| l["pid"].parse().unwrap())
            .filter(|p| new.contains(p))
            .collect();
        assert!(!served.is_empty(), "{name}: the new workers hold slots: {}", m.text);
        assert!(m.sum("wsgi_worker_exits_total", &[]) >= 2.0, "{name}: the old workers' exits");
    }
}

#[test]
fn an_agent_killed_outright_leaves_nothing_behind() {
    let _serial = serial();
    let server = Server::gunicorn_in(".venv-debian", &["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let worker = server.workers()[0];
    // Other tracers of this python3.11 (another agent on the node) count in the semaphore too.
    let before = gc_semaphore(worker);
    let agent = Agent::attach(server.master(), &[]).unwrap();
    let programs = tracepoint_program_ids(agent.pid());
    assert!(!programs.is_empty());
    assert!(gc_semaphore(worker) > before, "USDT semaphore on while attached");
    // SAFETY: plain kill(2) on a process this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    let start = Instant::now();
    while programs.iter().any(|&id| bpf_program_exists(id)) {
        assert!(start.elapsed() < Duration::from_secs(10), "programs still loaded after SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    while gc_semaphore(worker) != before {
        assert!(start.elapsed() < Duration::from_secs(10), "the kernel did not release the USDT semaphore");
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    assert!(!events.contains("wsgiscope"), "no uprobe left in tracefs: {events}");
    drop(agent);

    // A new agent attaches cleanly and counts.
    let again = Agent::attach(server.master(), &[]).unwrap();
    assert_eq!(get(server.port, "/hello").unwrap().status, 200);
    let m = again.metrics_when("the request", |m| m.sum("wsgi_requests_total", &[]) >= 1.0);
    assert_eq!(m.sum("wsgi_requests_total", &[]), 1.0);
}

#[test]
fn two_agents_on_one_master_both_count_everything() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "2"]).unwrap();
    server.wait_workers(2).unwrap();
    let a = Agent::attach(server.master(), &[]).unwrap();
    let b = Agent::attach(server.master(), &[]).unwrap();
    for p in ["/hello", "/blocks", "/sleep", "/hello"] {
        assert_eq!(get(server.port, p).unwrap().status, 200);
    }
    for agent in [&a, &b] {
        let m = agent.metrics_when("4 requests", |m| m.sum("wsgi_requests_total", &[]) >= 4.0);
        assert_eq!(m.sum("wsgi_requests_total", &[]), 4.0);
        assert_eq!(m.sum("wsgi_response_blocks_sum", &[("route", "/blocks")]), 1000.0);
    }
}

fn map_entries(m: &Metrics, map: &str) -> f64 {
    m.sum("wsgiscope_kernel_map_entries", &[("map", map)])
}

#[test]
fn hostile_traffic_is_survived_counted_and_leaves_no_kernel_state() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    let port = server.port;
    let send = |bytes: &[u8]| wire::send_raw(port, bytes, Duration::from_secs(10)).unwrap();
    // Random binary bytes (not a request), then a 64 KiB request line: gunicorn answers 414, a
    // request counted with route "other" (its path was cut by the kernel's capture).
    let noise: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let _ = send(&noise);
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(64 * 1024));
    let _ = send(long.as_bytes());
    // A request sent one byte at a time (slowloris).
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for b in b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" {
        s.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"));
    // A client that goes away mid-response.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /big?mb=64 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut some = [0u8; 4096];
    s.read_exact(&mut some).unwrap();
    drop(s);

    let m = agent.metrics_when("4 records", |m| {
        m.sum("wsgi_requests_total", &[]) + m.sum("wsgiscope_unparsed_requests_total", &[]) >= 4.0
    });
    assert_eq!(m.sum("wsgiscope_unparsed_requests_total", &[]), 1.0, "the noise: {}", m.text);
    assert_eq!(m.sum("wsgi_requests_total", &[("route", "other"), ("status", "414")]), 1.0, "the cut request line");
    assert_eq!(m.sum("wsgiscope_truncated_requests_total", &[]), 1.0);
    assert_eq!(m.sum("wsgi_requests_total", &[("route", "/hello"), ("status", "200")]), 1.0, "slowloris request");
    assert_eq!(m.sum("wsgi_requests_total", &[("route", "/big")]), 1.0, "the abandoned response");
    let m = agent.metrics_when("kernel state back to baseline", |m| {
        map_entries(m, "connections") == 0.0 && map_entries(m, "pending") == 0.0
    });
    assert!(map_entries(&m, "traced") >= 2.0, "master and worker still traced");
    // Still serving and counting.
    assert_eq!(get(port, "/hello").unwrap().status, 200);
    agent.metrics_when("one more", |m| m.sum("wsgi_requests_total", &[("route", "/hello")]) >= 2.0);
}

#[test]
fn a_server_exiting_during_attach_ends_cleanly() {
    let _serial = serial();
    let mut server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let master = server.master();
    let listen = format!("127.0.0.1:{}", free_port());
    let agent = Command::new(agent_bin())
        .args(["attach", "--pid", &master.to_string(), "--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    server.stop();
    // Bounded: an agent that missed the exit would hang here.
    let pid = agent.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        // SAFETY: plain kill(2) on a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = agent.wait_with_output().unwrap();
    assert!(!watchdog.is_finished(), "the agent did not notice the master exit within 20 s");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    match out.status.code() {
        Some(0) => assert!(err.contains("exited"), "it saw the master go: {err}"),
        Some(1) => assert!(err.contains("no process with PID") || err.contains("exited"), "{err}"),
        other => panic!("unexpected exit {other:?}: {err}"),
    }
}

#[test]
fn without_tracefs_the_agent_mounts_it_and_without_capabilities_or_btf_it_says_what_is_needed() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let pid = server.master().to_string();
    let bin = agent_bin().display().to_string();

    // In a mount namespace of its own with tracefs unmounted.
    let listen = format!("127.0.0.1:{}", free_port());
    let script = format!("umount /sys/kernel/tracing && exec {bin} attach --pid {pid} --listen {listen}");
    let mut agent = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while scrape(&listen).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "the agent did not come up without tracefs");
        assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(server.port, "/hello").unwrap().status, 200);
    let start = Instant::now();
    while Metrics::parse(&scrape(&listen).unwrap()).unwrap().sum("wsgi_requests_total", &[]) < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "not counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.kill().unwrap();
    agent.wait().unwrap();

    // Without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN.
    let out = Command::new("capsh")
        .args(["--drop=cap_bpf,cap_perfmon,cap_sys_admin", "--", "-c", &format!("{bin} attach --pid {pid} --listen 127.0.0.1:0")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("missing capability CAP_BPF and CAP_PERFMON") && err.contains("setcap"), "{err}");

    // On a kernel that publishes no BTF: hidden here under an empty tmpfs in a mount namespace.
    let script = format!("mount -t tmpfs none /sys/kernel/btf && exec {bin} attach --pid {pid} --listen 127.0.0.1:0");
    let out = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("publishes no BTF") && err.contains("CONFIG_DEBUG_INFO_BTF=y"), "{err}");
}
