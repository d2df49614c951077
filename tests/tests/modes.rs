//! The ways users run wsgiscope: `run` (start the server attached), `daemon` (every server on
//! the node, now and later), and the route options every mode shares.
use std::{net::TcpStream, process::Command, time::Duration};

use wsgiscope_integration::{agent_bin, apps_dir, free_port, get, repo_root, serial, Agent, Gunicorn, Server, TempDir};

/// `-- gunicorn <arguments>`, gunicorn as the harness launches it, for `wsgiscope run`.
fn run_line(gunicorn: &Gunicorn) -> Vec<String> {
    let mut line = vec!["--".to_string(), gunicorn.program(&repo_root()).display().to_string()];
    line.extend(gunicorn.argv());
    line
}

#[test]
fn run_starts_the_server_attached_and_counts_its_first_request() {
    let _serial = serial();
    let dir = TempDir::new("run");
    let truth = dir.0.join("truth.jsonl");
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let server = run_line(&Gunicorn::new(&bind, apps_dir(), "testapp:app").args(&["-w", "2"]));
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&["run"], &server, &[("WSGISCOPE_TRUTH_LOG", truth.as_path())]).unwrap();

    // The first request goes out the moment the server accepts: it must be counted.
    let mut waited = 0;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(waited < 2000, "gunicorn did not start: {}", agent.log_text());
        std::thread::sleep(Duration::from_millis(5));
        waited += 1;
    }
    for _ in 0..10 {
        assert_eq!(get(port, "/hello").unwrap().status, 200);
    }
    let m = agent.metrics_when("10 requests", |m| m.sum("wsgi_requests_total", &[]) >= 10.0);
    assert_eq!(m.sum("wsgi_requests_total", &[("service", "testapp"), ("route", "/hello"), ("status", "200")]), 10.0);
    assert_eq!(std::fs::read_to_string(&truth).unwrap().lines().count(), 10, "the app served 10");
    let m = agent.metrics_when("both workers", |m| m.sum("wsgi_workers", &[]) == 2.0);
    assert_eq!(m.sum("wsgi_worker_requests_total", &[]), 10.0);

    // SIGTERM goes on to gunicorn, which stops cleanly; wsgiscope exits with its code.
    // SAFETY: plain kill(2) on a process this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    assert_eq!(agent.wait(Duration::from_secs(30)), Some(0), "{}", agent.log_text());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "gunicorn stopped");
}

#[test]
fn run_exits_with_the_servers_exit_code_and_refuses_other_programs() {
    let _serial = serial();
    let port = free_port();
    let listen = format!("127.0.0.1:{}", free_port());
    let out = Command::new(agent_bin())
        .args(["run", "--listen", &listen])
        .args(run_line(&Gunicorn::new(format!("127.0.0.1:{port}"), apps_dir(), "no_such_module:app")))
        .output()
        .unwrap();
    // gunicorn exits 3 when its app cannot be loaded.
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));

    let out = Command::new(agent_bin()).args(["run", "--listen", &listen, "--", "sleep", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("`sleep 1` is not a server wsgiscope knows") && err.contains("wsgiscope attach --pid"), "{err}");
}

#[test]
fn daemon_finds_running_and_new_servers_and_outlives_them() {
    let _serial = serial();
    let a = Server::gunicorn_named("daemon_a", &["-w", "2"]).unwrap();
    let mut b = Server::uwsgi_named("daemon_b", 2).unwrap();
    a.wait_workers(2).unwrap();
    b.wait_workers(2).unwrap();
    let mut daemon = Agent::start(&["daemon"], &[], &[]).unwrap();
    let service = |s: &'static str| [("service", s)];
    daemon.metrics_when("the two running servers", |m| {
        m.sum("wsgi_workers", &service("daemon_a")) == 2.0 && m.sum("wsgi_workers", &service("daemon_b")) == 2.0
    });
    for _ in 0..5 {
        assert_eq!(get(a.port, "/hello").unwrap().status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(b.port, "/blocks").unwrap().status, 200);
    }

    // A server started after the daemon: traced from its exec, its first requests count.
    let c = Server::apache_modwsgi_named("daemon_c", 2).unwrap();
    for _ in 0..4 {
        assert_eq!(get(c.port, "/hello").unwrap().status, 200);
    }
    // Apache's relay records end with its own close, which can come after the daemon's.
    let m = daemon.metrics_when("the new server's requests and relays", |m| {
        m.sum("wsgi_requests_total", &service("daemon_c")) >= 4.0
            && m.sum("wsgiscope_relayed_requests_total", &service("daemon_c")) >= 4.0
    });
    assert_eq!(m.sum("wsgi_requests_total", &service("daemon_c")), 4.0, "{}", m.text);
    assert_eq!(m.sum("wsgi_workers", &service("daemon_c")), 2.0);
    assert_eq!(m.sum("wsgiscope_relayed_requests_total", &service("daemon_c")), 4.0, "Apache's child is a front end");

    // One server stops: its series stay, the others go on.
    b.stop();
    for _ in 0..2 {
        assert_eq!(get(a.port, "/hello").unwrap().status, 200);
    }
    let m = daemon.metrics_when("all requests", |m| m.sum("wsgi_requests_total", &service("daemon_a")) >= 7.0);
    assert_eq!(m.sum("wsgi_requests_total", &service("daemon_a")), 7.0);
    assert_eq!(m.sum("wsgi_requests_total", &service("daemon_b")), 3.0, "a stopped server's series stay");
    assert_eq!(m.sum("wsgi_response_blocks_sum", &service("daemon_b")), 3000.0);
    assert_eq!(m.sum("wsgi_requests_total", &service("daemon_c")), 4.0);
    let log = daemon.log_text();
    assert!(log.contains("master") && log.contains("exited"), "the daemon saw uWSGI go: {log}");
    assert!(!log.contains("ERROR") && !log.contains("cannot watch"), "{log}");
    // SAFETY: plain kill(2) on a process this test started.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) };
    assert_eq!(daemon.wait(Duration::from_secs(10)), Some(0));
}

#[test]
fn routes_are_normalised_templated_capped_and_never_carry_queries() {
    let _serial = serial();
    let dir = TempDir::new("routes");
    let templates = dir.0.join("routes.txt");
    std::fs::write(&templates, "# the app's routes\n/files/{name}\n").unwrap();
    let server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &["--routes", templates.to_str().unwrap(), "--max-routes", "4"]).unwrap();
    let paths = [
        "/hello?user=alice&token=s3cr3t",
        "/page/users/42/posts",
        "/page/users/7/posts",
        "/page/orders/123e4567-e89b-12d3-a456-426614174000",
        // A template always has its route (these answer 404) and takes no place under the cap.
        "/files/report.pdf",
        "/files/a.txt",
        "/sleep?ms=1",
        // The cap (4) is full: a new route waits for a place.
        "/page/one-too-many",
        // An unknown path that answered 404 never takes a place.
        "/nope",
    ];
    for p in paths {
        get(server.port, p).unwrap();
    }
    let m = agent.metrics_when("every request", |m| m.sum("wsgi_requests_total", &[]) >= paths.len() as f64);
    let routes: std::collections::BTreeMap<String, f64> = m
        .series("wsgi_requests_total", &[])
        .map(|(l, v)| (l["route"].clone(), v))
        .fold(Default::default(), |mut acc, (r, v)| {
            *acc.entry(r).or_default() += v;
            acc
        });
    let want: std::collections::BTreeMap<String, f64> = [
        ("/hello", 1.0),
        ("/page/users/{id}/posts", 2.0),
        ("/page/orders/{id}", 1.0),
        ("/files/{name}", 2.0),
        ("/sleep", 1.0),
        ("other", 2.0),
    ]
    .into_iter()
    .map(|(r, n)| (r.to_string(), n))
    .collect();
    assert_eq!(routes, want);
    assert_eq!(m.sum("wsgiscope_route_overflow_total", &[]), 2.0);
    assert!(!m.text.contains("alice") && !m.text.contains("s3cr3t") && !m.text.contains('?'), "no query string exported");
}

/// `python -m gunicorn …`: the interpreter's command line names the server only as a module.
#[test]
fn python_dash_m_gunicorn_is_found_by_attach_and_by_daemon() {
    let _serial = serial();
    let dir = TempDir::new("pym");
    std::fs::copy(repo_root().join("tests/apps/testapp.py"), dir.0.join("pym_app.py")).unwrap();
    let port = free_port();
    let mut server = Command::new(repo_root().join(".venv/bin/python"))
        .args(["-u", "-m", "gunicorn"])
        .args(Gunicorn::new(format!("127.0.0.1:{port}"), &dir.0, "pym_app:app").args(&["-w", "2"]).argv())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut waited = 0;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(waited < 400, "python -m gunicorn did not start");
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
    }
    let daemon = Agent::start(&["daemon"], &[], &[]).unwrap();
    daemon.metrics_when("the server, found by the daemon", |m| m.sum("wsgi_workers", &[("service", "pym_app")]) == 2.0);
    let attached = Agent::attach(server.id(), &[]).unwrap();
    attached.metrics_when("its workers, found by attach", |m| m.sum("wsgi_workers", &[("service", "pym_app")]) == 2.0);
    for _ in 0..3 {
        assert_eq!(get(port, "/hello").unwrap().status, 200);
    }
    for agent in [&daemon, &attached] {
        let m = agent.metrics_when("3 requests", |m| m.sum("wsgi_requests_total", &[("service", "pym_app")]) >= 3.0);
        assert_eq!(m.sum("wsgi_requests_total", &[("service", "pym_app"), ("route", "/hello")]), 3.0);
    }
    // SAFETY: plain kill(2) on a process this test started.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    server.wait().unwrap();
}
