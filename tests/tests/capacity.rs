//! Capacity of a pre-forked server, measured from outside: worker utilization, requests in
//! progress, accept-queue wait, workers killed by the server's timeout, block pathologies.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use wsgiscope_integration::{get, serial, Agent, Server, UwsgiMode};

fn busy(agent: &Agent) -> f64 {
    agent.metrics().sum("wsgi_worker_busy_seconds_total", &[])
}

#[test]
fn utilization_of_a_worker_follows_a_known_sleep_pattern() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();

    // Busy 100 ms, idle 100 ms, for 3 s: about 50 % utilization.
    let before = busy(&agent);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(3) {
        assert_eq!(get(server.port, "/sleep?ms=100").unwrap().status, 200);
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall = start.elapsed().as_secs_f64();
    agent.metrics_when("every request", |m| m.sum("wsgi_requests_total", &[]) >= n as f64);
    let measured = busy(&agent) - before;
    let truth: f64 = server.truth().iter().map(|t| t.elapsed).sum();
    println!("utilization: wsgiscope {:.3}, middleware {:.3} over {wall:.2} s", measured / wall, truth / wall);
    assert!((measured - truth).abs() <= 0.05 * truth, "busy {measured} s vs the app's own {truth} s");
}

#[test]
fn a_request_in_progress_is_active_and_busy_before_it_ends() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    let port = server.port;
    let client = std::thread::spawn(move || get(port, "/sleep?ms=2500"));
    std::thread::sleep(Duration::from_millis(1500));
    let m = agent.metrics();
    assert_eq!(m.sum("wsgi_worker_active_requests", &[("worker", "0")]), 1.0, "{}", m.text);
    let oldest = m.sum("wsgi_worker_oldest_request_seconds", &[("worker", "0")]);
    assert!((0.9..=1.6).contains(&oldest), "oldest request {oldest} s, 1.5 s into it");
    let busy_mid = m.sum("wsgi_worker_busy_seconds_total", &[]);
    assert!((0.9..=1.6).contains(&busy_mid), "busy {busy_mid} s, credited before the request ends");
    assert_eq!(m.sum("wsgi_requests_total", &[]), 0.0, "not recorded before it ends");

    assert_eq!(client.join().unwrap().unwrap().status, 200);
    let m = agent.metrics_when("the request", |m| m.sum("wsgi_requests_total", &[]) >= 1.0);
    let elapsed = server.truth()[0].elapsed;
    let busy_end = m.sum("wsgi_worker_busy_seconds_total", &[]);
    assert!((busy_end - elapsed).abs() <= 0.05 * elapsed, "busy {busy_end} s vs the app's {elapsed} s");
    let m = agent.metrics_when("an idle worker", |m| m.sum("wsgi_worker_active_requests", &[]) == 0.0);
    assert_eq!(m.sum("wsgi_worker_oldest_request_seconds", &[]), 0.0);
}

/// GET over a fresh connection: (time from connect to the end of the response, status line).
fn timed_get(port: u16, path: &str) -> (f64, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let connected = Instant::now();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let status = String::from_utf8_lossy(&raw).lines().next().unwrap_or_default().to_string();
    (connected.elapsed().as_secs_f64(), status)
}

#[test]
fn a_burst_larger_than_the_workers_waits_in_the_accept_queue() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "2"]).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    // 8 connections at once on 2 workers of 100 ms requests: 6 of them queue.
    let port = server.port;
    let clients: Vec<_> = (0..8).map(|_| std::thread::spawn(move || timed_get(port, "/sleep?ms=100"))).collect();
    let seen: Vec<(f64, String)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(seen.iter().all(|(_, s)| s.contains(" 200 ")), "{seen:?}");
    let m = agent.metrics_when("8 requests", |m| m.sum("wsgi_requests_total", &[]) >= 8.0);

    assert_eq!(m.sum("wsgi_accept_wait_seconds_count", &[]), 8.0, "one accept wait per connection");
    let waited = m.sum("wsgi_accept_wait_seconds_sum", &[]);
    // What the clients saw beyond the time the workers spent on their requests.
    let client_total: f64 = seen.iter().map(|(t, _)| t).sum();
    let served = m.sum("wsgi_request_duration_seconds_sum", &[]);
    let queued = client_total - served;
    println!("accept wait: wsgiscope {waited:.4} s, clients queued {queued:.4} s");
    assert!(waited > 0.5, "6 of 8 requests waited 100–300 ms each: {waited}");
    // Client threads are scheduled too: on a loaded 2-core machine they add a little noise.
    assert!((waited - queued).abs() <= 0.10 * queued + 0.010, "accept wait {waited} s vs client-side queueing {queued} s");
}

#[test]
fn a_request_past_the_gunicorn_timeout_is_aborted_and_its_worker_killed() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "1", "--timeout", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    let victim = server.workers()[0];
    // gunicorn sends the worker SIGABRT; the dying worker still writes its error page.
    assert_eq!(get(server.port, "/sleep?ms=3000").unwrap().status, 500, "gunicorn cut the request off");
    let m = agent.metrics_when("the aborted request and the killed worker", |m| {
        m.sum("wsgi_requests_total", &[]) >= 1.0 && m.sum("wsgi_worker_exits_total", &[]) >= 1.0
    });
    assert_eq!(m.sum("wsgi_requests_total", &[("route", "/sleep"), ("status", "aborted")]), 1.0, "{}", m.text);
    assert_eq!(m.sum("wsgi_requests_total", &[]), 1.0);
    assert_eq!(m.sum("wsgi_worker_exits_total", &[("reason", "killed")]), 1.0, "{}", m.text);
    assert_eq!(m.sum("wsgi_worker_exits_total", &[]), 1.0);
    server.wait_workers(1).unwrap();
    assert_ne!(server.workers()[0], victim, "gunicorn replaced the worker");
}

#[test]
fn one_byte_blocks_trip_the_small_block_pathology_and_128_byte_blocks_do_not() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    for path in ["/bytes1", "/bytes1", "/blocks", "/blocks", "/hello"] {
        assert_eq!(get(server.port, path).unwrap().status, 200);
    }
    let m = agent.metrics_when("5 requests", |m| m.sum("wsgi_requests_total", &[]) >= 5.0);
    assert_eq!(m.sum("wsgi_small_block_responses_total", &[("route", "/bytes1")]), 2.0, "{}", m.text);
    assert_eq!(m.sum("wsgi_small_block_responses_total", &[("route", "/blocks")]), 0.0);
    assert_eq!(m.sum("wsgi_small_block_responses_total", &[]), 2.0);
    // One warning per route, naming the likely cause.
    let log = agent.log_text();
    assert_eq!(log.matches("route /bytes1 answered in 102400 blocks").count(), 1, "{log}");
    assert!(log.contains("str/bytes object as the response iterable"), "{log}");
}

#[test]
fn a_client_that_reads_late_is_a_slow_client() {
    let _serial = serial();
    // gunicorn blocks in sendto; uWSGI's non-blocking socket waits in poll for room to write.
    slow_client(Server::gunicorn(&["-w", "1"]).unwrap());
    slow_client(Server::uwsgi(UwsgiMode::HttpSocket, 1).unwrap());
}

fn slow_client(server: Server) {
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();
    // 64 MiB do not fit the socket buffers of a reader that waits 500 ms before reading: the
    // worker sleeps in its writes (or waits for room) for most of the request.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(s, "GET /big?mb=64 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    assert!(raw.len() > 64 << 20);
    // A prompt reader is not slow.
    assert_eq!(get(server.port, "/hello").unwrap().status, 200);
    let m = agent.metrics_when("2 requests", |m| m.sum("wsgi_requests_total", &[]) >= 2.0);
    assert_eq!(m.sum("wsgi_slow_client_responses_total", &[("route", "/big")]), 1.0, "{}", m.text);
    assert_eq!(m.sum("wsgi_slow_client_responses_total", &[]), 1.0);
    let write = m.sum("wsgi_response_write_seconds_sum", &[("route", "/big")]);
    assert!(write >= 0.3, "the worker waited on the reader: {write} s");
    // Every byte counted, though the worker left the CPU inside its write: the write's enter,
    // handed over in the CPU's slot, moved with the thread to its exit.
    assert_eq!(m.sum("wsgi_response_bytes_sum", &[("route", "/big")]), raw.len() as f64, "{}", m.text);
}

/// uWSGI's own exit codes: a reload (SIGHUP: workers exit 17), a stop (SIGINT: 30) and a
/// `--cheaper` scale-down (30) are recycles; a segfault (uWSGI's handler exits 1) and
/// `os._exit(3)` are crashes.
#[test]
fn uwsgi_reload_stop_and_scale_down_are_recycles_and_crashes_are_crashes() {
    let _serial = serial();
    // The daemon outlives the servers, so the exits of their stop are still exported.
    let daemon = Agent::start(&["daemon"], &[], &[]).unwrap();
    let exits = |m: &wsgiscope_integration::Metrics, reason: &str| m.sum("wsgi_worker_exits_total", &[("reason", reason)]);

    // A burst: uWSGI's cheaper mode spawns workers, and retires them (exit 30) once it is over.
    let cheaper = ["--processes", "3", "--cheaper", "1", "--cheaper-initial", "1", "--cheaper-algo", "spare"];
    let mut a = Server::uwsgi_args(&[&cheaper[..], &["--cheaper-overload", "1", "--cheaper-step", "1"]].concat()).unwrap();
    a.wait_workers(1).unwrap();
    daemon.metrics_when("the first server", |m| m.sum("wsgi_workers", &[]) == 1.0);
    let port = a.port;
    let until = Instant::now() + Duration::from_secs(6);
    let clients: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                while Instant::now() < until {
                    let _ = get(port, "/sleep?ms=200");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let m = daemon.metrics_when("the scale-down", |m| exits(m, "recycled") >= 1.0);
    assert_eq!((exits(&m, "crashed"), exits(&m, "killed")), (0.0, 0.0), "{}", m.text);
    a.stop();

    // Crashes, a graceful reload and a stop, on two plain workers.
    let b = Server::uwsgi_args(&["--processes", "2"]).unwrap();
    b.wait_workers(2).unwrap();
    let m = daemon.metrics_when("the second server", |m| m.sum("wsgi_workers", &[]) == 2.0);
    let (recycled, crashed) = (exits(&m, "recycled"), exits(&m, "crashed"));
    assert_eq!(crashed, 0.0);
    assert_eq!(get(b.port, "/segv").map(|r| r.status).unwrap_or(0), 0, "no response from a segfault");
    let m = daemon.metrics_when("a crash", |m| exits(m, "crashed") >= 1.0);
    assert_eq!(exits(&m, "crashed"), 1.0);
    b.wait_workers(2).unwrap();
    let _ = get(b.port, "/exit3");
    let m = daemon.metrics_when("two crashes", |m| exits(m, "crashed") >= 2.0);
    assert_eq!((exits(&m, "crashed"), exits(&m, "recycled"), exits(&m, "killed")), (2.0, recycled, 0.0));

    // The reload: both workers exit 17; the master re-execs itself and forks new ones.
    daemon.metrics_when("two workers", |m| m.sum("wsgi_workers", &[]) == 2.0);
    b.signal(libc::SIGHUP);
    let m = daemon.metrics_when("the reload", |m| exits(m, "recycled") >= recycled + 2.0 && m.sum("wsgi_workers", &[]) == 2.0);
    assert_eq!(exits(&m, "recycled"), recycled + 2.0);
    // A signal during the master's exec would kill it: let it settle and serve.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(get(b.port, "/hello").unwrap().status, 200);

    // The stop: both workers exit 30.
    b.signal(libc::SIGINT);
    daemon.metrics_when("the stop", |m| exits(m, "recycled") >= recycled + 4.0);
    std::thread::sleep(Duration::from_millis(500));
    let m = daemon.metrics();
    let got = (exits(&m, "recycled") - recycled, exits(&m, "crashed"), exits(&m, "killed"));
    assert_eq!(got, (4.0, 2.0, 0.0), "{}\n{}", m.text, daemon.log_text());
}
