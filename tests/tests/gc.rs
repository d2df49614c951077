//! CPython garbage collections seen from outside: through USDT probes (Debian's python3.11 and
//! libpython3.11, which carry the notes) or the `gc_collect_main` symbol (pyenv's libpython,
//! which does not), under gunicorn and uWSGI, attributed to the requests they stalled, against
//! the app's own gc.callbacks.
use wsgiscope_integration::{get, gc_semaphore as semaphore, serial, Agent, Server, UwsgiMode};

fn run(name: &str, server: Server, usdt: bool) {
    server.wait_workers(1).unwrap();
    let worker = server.workers()[0];
    // Warm-up, before attaching: the route's live heap is built once (hundreds of small
    // collections); the measured requests each make a few small ones and a full one.
    assert_eq!(get(server.port, "/gc").unwrap().status, 200);
    // Other tracers of the same binary (another agent on the node) count in the semaphore too.
    let before = if usdt { semaphore(worker) } else { 0 };
    let mut agent = Agent::attach(server.master(), &[]).unwrap();
    let log = agent.log_text();
    let how = if usdt { "GC probed at USDT gc__start/gc__done" } else { "GC probed at gc_collect_main" };
    assert!(log.contains(how), "{name}: {log}");
    let m = agent.metrics();
    for (labels, _) in m.series("wsgi_worker_info", &[]) {
        assert_eq!(labels["python_version"], "3.11", "{name}");
        assert_eq!(labels["usdt"], usdt.to_string(), "{name}");
    }
    if usdt {
        assert!(semaphore(worker) > before, "{name}: the USDT semaphore is on while attached");
    }

    for _ in 0..4 {
        assert_eq!(get(server.port, "/gc").unwrap().status, 200);
        assert_eq!(get(server.port, "/hello").unwrap().status, 200);
    }
    let m = agent.metrics_when("8 requests", |m| m.sum("wsgi_requests_total", &[]) >= 8.0);
    let truth: Vec<_> = server.truth().into_iter().skip(1).collect();
    let truth_gc = |route: &str| truth.iter().filter(|t| t.route == route).map(|t| t.gc).sum::<f64>();
    let seen = m.sum("wsgi_request_gc_seconds_sum", &[("route", "/gc")]);
    let app = truth_gc("/gc");
    println!("{name}: GC inside /gc requests: wsgiscope {seen:.4} s, gc.callbacks {app:.4} s");
    assert!(app > 0.01, "{name}: the route collected garbage ({app} s)");
    assert!((seen - app).abs() <= 0.10 * app, "{name}: GC in /gc {seen} s vs the app's {app} s");
    assert_eq!(m.sum("wsgi_request_gc_seconds_count", &[("route", "/gc")]), 4.0);
    // The plain route: no collection ran in it.
    assert_eq!(truth_gc("/hello"), 0.0, "{name}: the app saw no GC in /hello");
    assert_eq!(m.sum("wsgi_request_gc_seconds_sum", &[("route", "/hello")]), 0.0, "{name}");
    // Every pause, by generation: gc.collect() is a generation-2 collection.
    let full = m.sum("wsgi_gc_pause_seconds_count", &[("generation", "2")]);
    assert!(full >= 4.0, "{name}: {full} generation-2 pauses\n{}", m.text);
    assert!(m.sum("wsgi_gc_pause_seconds_count", &[("generation", "0")]) > 0.0, "{name}: automatic gen-0 pauses");

    assert_eq!(agent.stop(), 0);
    if usdt {
        let start = std::time::Instant::now();
        while semaphore(worker) != before {
            assert!(start.elapsed().as_secs() < 10, "{name}: detaching did not release the USDT semaphore");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[test]
fn gc_through_usdt_on_debian_python_under_gunicorn() {
    let _serial = serial();
    run("gunicorn-debian", Server::gunicorn_in(".venv-debian", &["-w", "1"]).unwrap(), true);
}

#[test]
fn gc_through_symbols_on_pyenv_python_under_gunicorn() {
    let _serial = serial();
    run("gunicorn-pyenv", Server::gunicorn(&["-w", "1"]).unwrap(), false);
}

#[test]
fn gc_through_usdt_in_libpython_under_uwsgi() {
    let _serial = serial();
    run("uwsgi-debian", Server::uwsgi(UwsgiMode::HttpSocket, 1).unwrap(), true);
}

#[test]
fn gc_through_symbols_on_pyenv_python_under_pip_built_uwsgi() {
    let _serial = serial();
    run("uwsgi-pip-pyenv", Server::uwsgi_pip(1).unwrap(), false);
}
