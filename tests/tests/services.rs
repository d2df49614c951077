//! The downstream components on their own, without the agent: real PostgreSQL, MariaDB, Redis and
//! an HTTP backend, called by tests/apps/downstream.py under real gunicorn. The app's log of its
//! calls is checked exact per request: it is the ground truth the agent's downstream tests
//! compare against, so it must itself be right.
use std::{collections::BTreeMap, thread, time::Duration};

use wsgiscope_integration::{
    http_get, serial,
    services::{downstream_log, Downstream},
    DownstreamCall, DownstreamRequest, DownstreamTruth, Server,
};

/// What a call must log: protocol, transport, operation, outcome, commands, HTTP status.
type Expected = (String, String, String, String, u64, Option<u16>);

const PG_ONE: &str = "SELECT name FROM items WHERE id = $1";

fn call(
    protocol: &str,
    transport: &str,
    operation: &str,
    outcome: &str,
    commands: u64,
    status: Option<u16>,
) -> Expected {
    (
        protocol.into(),
        transport.into(),
        operation.into(),
        outcome.into(),
        commands,
        status,
    )
}

fn pg(transport: &str, sql: &str) -> Expected {
    call("postgresql", transport, sql, "ok", 1, None)
}

fn mysql(transport: &str, sql: &str) -> Expected {
    call("mysql", transport, sql, "ok", 1, None)
}

fn redis(transport: &str, command: &str, commands: u64) -> Expected {
    call("redis", transport, command, "ok", commands, None)
}

fn http(status: u16) -> Expected {
    call(
        "http",
        "tcp",
        "GET",
        if status < 400 { "ok" } else { "error" },
        1,
        Some(status),
    )
}

fn failed(mut e: Expected) -> Expected {
    e.3 = "error".into();
    e
}

fn logged(c: &DownstreamCall) -> Expected {
    call(
        &c.protocol,
        &c.transport,
        &c.operation,
        &c.outcome,
        c.commands,
        c.status,
    )
}

/// Every route of the app (both transports where it has them) with the calls it must log, in
/// order, and the body it answers.
fn cases() -> Vec<(String, Vec<Expected>, &'static str)> {
    let mut cases = Vec::new();
    for t in ["tcp", "unix"] {
        let mysql_one = |i: u32| mysql(t, &format!("SELECT name FROM items WHERE id = {i}"));
        let ids: Vec<String> = (1..=25).map(|i| i.to_string()).collect();
        cases.extend([
            (
                format!("/pg/one?id=7&via={t}"),
                vec![pg(t, PG_ONE)],
                "item 7",
            ),
            (
                format!("/pg/simple?via={t}"),
                vec![pg(t, "SELECT count(*) FROM items")],
                "100",
            ),
            (
                format!("/pg/nplus1?n=25&via={t}"),
                vec![pg(t, PG_ONE); 25],
                "25",
            ),
            (
                format!("/pg/batched?n=25&via={t}"),
                vec![pg(t, "SELECT name FROM items WHERE id = ANY($1)")],
                "25",
            ),
            (
                format!("/pg/error?via={t}"),
                vec![failed(pg(t, "SELECT name FROM no_such_table"))],
                "error",
            ),
            (
                format!("/mysql/one?id=7&via={t}"),
                vec![mysql_one(7)],
                "item 7",
            ),
            (
                format!("/mysql/nplus1?n=25&via={t}"),
                (1..=25).map(mysql_one).collect(),
                "25",
            ),
            (
                format!("/mysql/batched?n=25&via={t}"),
                vec![mysql(
                    t,
                    &format!("SELECT name FROM items WHERE id IN ({})", ids.join(",")),
                )],
                "25",
            ),
            (
                format!("/mysql/error?via={t}"),
                vec![failed(mysql(t, "SELECT name FROM no_such_table"))],
                "error",
            ),
            (
                format!("/redis/one?via={t}"),
                vec![redis(t, "GET", 1)],
                "item 1",
            ),
            (
                format!("/redis/many?n=20&via={t}"),
                vec![redis(t, "GET", 1); 20],
                "20",
            ),
            (
                format!("/redis/pipeline?n=10&via={t}"),
                vec![redis(t, "GET", 10)],
                "10",
            ),
            (
                format!("/redis/error?via={t}"),
                vec![failed(redis(t, "INCRBY", 1))],
                "error",
            ),
            (
                format!("/mixed?via={t}"),
                vec![
                    pg(t, PG_ONE),
                    redis(t, "GET", 1),
                    redis(t, "GET", 1),
                    http(200),
                ],
                "mixed",
            ),
        ]);
    }
    cases.extend([
        (
            "/pg/fresh".into(),
            vec![
                pg("tcp", "connect"),
                pg("tcp", PG_ONE),
                pg("tcp", "terminate"),
            ],
            "item 1",
        ),
        ("/http/one".into(), vec![http(200)], "ok"),
        ("/http/error".into(), vec![http(503)], "error"),
        ("/cpu?ms=20".into(), vec![], "burnt"),
    ]);
    cases
}

fn route(path: &str) -> &str {
    path.split('?').next().unwrap()
}

/// Waits until the app has logged `n` requests (it logs each after its response is written).
fn truth_of(server: &Server, n: usize) -> DownstreamTruth {
    for _ in 0..200 {
        let truth = DownstreamTruth::read(&downstream_log(server));
        if truth.requests.len() >= n {
            assert_eq!(truth.requests.len(), n, "requests logged");
            return truth;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "the app logged fewer than {n} requests: {:?}",
        DownstreamTruth::read(&downstream_log(server)).requests
    );
}

/// Checks one request's record against its calls and what it must have called; the calls, in order.
fn check_request(truth: &DownstreamTruth, r: &DownstreamRequest, expected: &[Expected]) {
    let calls = truth.calls_of(r);
    let got: Vec<Expected> = calls.iter().map(|c| logged(c)).collect();
    assert_eq!(got, expected, "{}: calls", r.route);
    assert_eq!(r.calls as usize, calls.len(), "{}: call count", r.route);
    assert!(calls
        .iter()
        .all(|c| c.route == r.route && c.end_ns >= c.start_ns));
    assert!(
        calls.windows(2).all(|w| w[0].end_ns <= w[1].start_ns),
        "{}: calls one after another",
        r.route
    );
    let sum: u64 = calls.iter().map(|c| c.end_ns - c.start_ns).sum();
    assert_eq!(r.downstream_ns, sum, "{}: downstream time", r.route);
    assert!(
        r.downstream_ns <= r.end_ns - r.start_ns,
        "{}: downstream time within the request",
        r.route
    );
}

/// Each of the three services has `n` connections over TCP and `n` over its socket.
fn assert_connections(d: &Downstream, n: usize, when: &str) {
    // A closed connection's server side goes a moment after the client's close.
    let counts = || {
        [
            ("postgres", d.postgres.connections().unwrap()),
            ("mariadb", d.mariadb.connections().unwrap()),
            ("redis", d.redis.connections().unwrap()),
        ]
    };
    for _ in 0..100 {
        if counts().iter().all(|(_, c)| *c == (n, n)) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{when}: connections (tcp, unix) per service {:?}, expected ({n}, {n})",
        counts()
    );
}

/// The services' own records agree with the app's: every SQL text it logged was executed as
/// such, as often (PostgreSQL's statement log, MariaDB's general log), and Redis ran as many
/// GET and INCRBY commands as the app logged.
fn assert_servers_saw(d: &Downstream, truth: &DownstreamTruth) {
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let app = |protocol: &str| {
        let ops = truth.calls.iter().filter(|c| c.protocol == protocol);
        sorted(
            ops.map(|c| c.operation.clone())
                .filter(|op| op != "connect" && op != "terminate")
                .collect(),
        )
    };
    // The harness's own queries (seeding, connection counts) are told apart by their text.
    let from_app =
        |sql: &String| sql.starts_with("SELECT name FROM") || sql == "SELECT count(*) FROM items";
    assert_eq!(
        sorted(
            d.postgres
                .statements()
                .into_iter()
                .filter(from_app)
                .collect()
        ),
        app("postgresql")
    );
    assert_eq!(
        sorted(d.mariadb.queries().into_iter().filter(from_app).collect()),
        app("mysql")
    );
    let redis = |op: &str| -> u64 {
        truth
            .calls
            .iter()
            .filter(|c| c.protocol == "redis" && c.operation == op)
            .map(|c| c.commands)
            .sum()
    };
    assert_eq!(
        d.redis.command_calls("get").unwrap(),
        redis("GET"),
        "GET commands"
    );
    assert_eq!(
        d.redis.command_calls("incrby").unwrap(),
        redis("INCRBY"),
        "INCRBY commands"
    );
}

/// gunicorn sync, 2 workers: every route once, sequentially; each request's calls exact.
fn sync_workers_log_exact_calls(venv: &str) {
    let _serial = serial();
    let d = Downstream::start().unwrap();
    let server = d.serve(venv, &["-w", "2", "-k", "sync"], 1).unwrap();
    let workers = server.workers();
    assert_eq!(workers.len(), 2);
    // Opened at import: there before the first request.
    assert_connections(&d, 2, "before the first request");

    let cases = cases();
    let addr = format!("127.0.0.1:{}", server.port);
    for (path, _, body) in &cases {
        let (status, got) = http_get(&addr, path).unwrap();
        assert_eq!((status, got.as_str()), (200, *body), "{path}");
    }
    let truth = truth_of(&server, cases.len());
    let mut requests = truth.requests.clone();
    requests.sort_by_key(|r| r.start_ns);
    for ((path, expected, _), r) in cases.iter().zip(&requests) {
        assert_eq!(r.route, route(path));
        check_request(&truth, r, expected);
        assert!(workers.contains(&r.pid), "{path}: served by a worker");
        assert_eq!(
            r.tid, r.pid,
            "{path}: sync workers serve on their main thread"
        );
    }
    let expected_calls: usize = cases.iter().map(|(_, e, _)| e.len()).sum();
    assert_eq!(
        truth.calls.len(),
        expected_calls,
        "no call outside a request"
    );

    // The CPU route burns its CPU in the request's thread; the others stay cheap next to it.
    let cpu = requests.iter().find(|r| r.route == "/cpu").unwrap();
    assert!(
        cpu.thread_cpu_ns >= 20_000_000,
        "/cpu?ms=20 burnt {} ns",
        cpu.thread_cpu_ns
    );
    // The CPU clock and the monotonic one may differ by a tick's rounding.
    assert!(
        cpu.thread_cpu_ns <= cpu.end_ns - cpu.start_ns + 100_000,
        "{cpu:?}"
    );
    let mixed = requests.iter().find(|r| r.route == "/mixed").unwrap();
    assert!(
        mixed.thread_cpu_ns >= 2_000_000,
        "/mixed burnt {} ns",
        mixed.thread_cpu_ns
    );

    assert_servers_saw(&d, &truth);
    // No connection was opened for good during the requests (/pg/fresh closed its own).
    assert_connections(&d, 2, "after the requests");
}

#[test]
fn sync_workers_log_exact_calls_pyenv() {
    sync_workers_log_exact_calls(".venv");
}

#[test]
fn sync_workers_log_exact_calls_debian_python() {
    sync_workers_log_exact_calls(".venv-debian");
}

/// gunicorn gthread, 2 workers of 4 threads, 4 connection sets each: 8 clients at once; every
/// request's calls are exact and on its own thread, and requests overlap within a worker.
#[test]
fn gthread_concurrent_requests_log_exact_calls() {
    let _serial = serial();
    let d = Downstream::start().unwrap();
    let server = d
        .serve(".venv", &["-w", "2", "-k", "gthread", "--threads", "4"], 4)
        .unwrap();
    assert_connections(&d, 8, "before the first request");

    let mysql_one = |i: u32| mysql("tcp", &format!("SELECT name FROM items WHERE id = {i}"));
    let cases: Vec<(&str, Vec<Expected>)> = vec![
        ("/http/slow?ms=50", vec![http(200)]),
        (
            "/mixed",
            vec![
                pg("tcp", PG_ONE),
                redis("tcp", "GET", 1),
                redis("tcp", "GET", 1),
                http(200),
            ],
        ),
        ("/pg/nplus1?n=5&via=unix", vec![pg("unix", PG_ONE); 5]),
        (
            "/redis/pipeline?n=10&via=unix",
            vec![redis("unix", "GET", 10)],
        ),
        ("/mysql/nplus1?n=5", (1..=5).map(mysql_one).collect()),
    ];
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 3;
    let addr = format!("127.0.0.1:{}", server.port);
    thread::scope(|s| {
        for _ in 0..CLIENTS {
            s.spawn(|| {
                for _ in 0..ROUNDS {
                    for (path, _) in &cases {
                        assert_eq!(http_get(&addr, path).unwrap().0, 200, "{path}");
                    }
                }
            });
        }
    });
    let n = CLIENTS * ROUNDS * cases.len();
    let truth = truth_of(&server, n);
    let expected: BTreeMap<&str, &Vec<Expected>> =
        cases.iter().map(|(p, e)| (route(p), e)).collect();
    for r in &truth.requests {
        check_request(&truth, r, expected[r.route.as_str()]);
    }
    let per_route: usize = cases.iter().map(|(_, e)| e.len()).sum();
    assert_eq!(
        truth.calls.len(),
        CLIENTS * ROUNDS * per_route,
        "every call in exactly one request"
    );

    // The threads did serve at once: two requests of one worker, on two threads, overlapping.
    let overlapping = truth.requests.iter().any(|a| {
        truth.requests.iter().any(|b| {
            a.pid == b.pid && a.tid != b.tid && a.start_ns < b.end_ns && b.start_ns < a.end_ns
        })
    });
    assert!(overlapping, "no two requests overlapped in a worker");
    let threads: std::collections::BTreeSet<(u32, u32)> =
        truth.requests.iter().map(|r| (r.pid, r.tid)).collect();
    assert!(
        threads.len() > 2,
        "requests were served by threads {threads:?}"
    );
    assert_servers_saw(&d, &truth);
    assert_connections(&d, 8, "after the requests");
}
