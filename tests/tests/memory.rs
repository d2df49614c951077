//! Worker memory from /proc/PID/smaps_rollup, against real gunicorn (with and without
//! `--preload`) and uWSGI: the agent's PSS and USS of every worker and the master against what
//! the test reads from the same file, copy-on-write sharing falling in the one worker that
//! touches a preloaded structure, workers that exit between reads, a worker whose memory is
//! refused, reads turned off.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use wsgiscope_integration::{http_get, serial, Agent, Metrics, Server, TempDir, UwsgiMode};

/// MiB of small objects the test app builds at import (TESTAPP_PRELOAD_MB).
const PRELOAD_MB: u64 = 64;
const MB: f64 = 1024.0 * 1024.0;

/// The test's own reading of smaps_rollup: every `Key: N kB` line, in bytes.
fn rollup(pid: u32) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let kb: u64 = rest.trim().strip_suffix(" kB")?.trim().parse().ok()?;
            Some((k.to_string(), kb * 1024))
        })
        .collect()
}

/// pss and uss as the issue defines them, from the test's reading.
fn pss_uss(pid: u32) -> (f64, f64) {
    let r = rollup(pid);
    (r["Pss"] as f64, (r["Private_Clean"] + r["Private_Dirty"]) as f64)
}

fn memory(m: &Metrics, worker: &str, kind: &str) -> Option<f64> {
    m.series("wsgi_worker_memory_bytes", &[("worker", worker), ("kind", kind)]).next().map(|(_, v)| v)
}

fn ratio(m: &Metrics, worker: &str) -> f64 {
    m.series("wsgi_worker_memory_shared_ratio", &[("worker", worker)]).next().map_or(f64::NAN, |(_, v)| v)
}

/// Worker slot → PID, from `wsgi_worker_info`.
fn slots(m: &Metrics) -> BTreeMap<String, u32> {
    m.series("wsgi_worker_info", &[]).map(|(l, _)| (l["worker"].clone(), l["pid"].parse().unwrap())).collect()
}

/// Waits until every worker slot and the master have all five kinds.
fn wait_series(agent: &Agent, workers: usize) -> Metrics {
    agent.metrics_when("memory series of every worker and the master", |m| {
        let s = slots(m);
        s.len() == workers
            && s.keys().map(String::as_str).chain(["master"]).all(|w| {
                ["rss", "pss", "uss", "shared", "swap"].iter().all(|k| memory(m, w, k).is_some())
            })
    })
}

/// Compares the agent's PSS and USS of every worker and the master with the file, at the same
/// moment as honestly as it can be had: the test reads the file (A), waits longer than a
/// period of the agent's reads plus the loop's apply delay (so the value scraped was read
/// after A), scrapes, reads again (B). Only when A and B agree within 0.5 % (the process's
/// memory did not move meanwhile: idle workers) is the agent's value held to 2 % of A.
fn compare_with_the_file(name: &str, agent: &Agent, master: u32) {
    let mut last = String::new();
    for _ in 0..10 {
        let m = agent.metrics();
        let mut pids: Vec<(String, u32)> = slots(&m).into_iter().collect();
        pids.push(("master".into(), master));
        let before: Vec<(f64, f64)> = pids.iter().map(|(_, p)| pss_uss(*p)).collect();
        std::thread::sleep(Duration::from_millis(2600));
        let m = agent.metrics();
        let after: Vec<(f64, f64)> = pids.iter().map(|(_, p)| pss_uss(*p)).collect();
        let still = |a: f64, b: f64| (a - b).abs() <= 0.005 * a.max(1.0);
        if !before.iter().zip(&after).all(|(a, b)| still(a.0, b.0) && still(a.1, b.1)) || slots(&m).len() + 1 != pids.len() {
            last = format!("memory moved: {before:?} → {after:?}");
            continue;
        }
        for ((worker, pid), (pss, uss)) in pids.iter().zip(&before) {
            let (got_pss, got_uss) = (memory(&m, worker, "pss").unwrap(), memory(&m, worker, "uss").unwrap());
            println!(
                "{name}: worker {worker} (pid {pid}): pss {:.1} MB (file {:.1}), uss {:.1} MB (file {:.1}), shared ratio {:.3}",
                got_pss / MB,
                pss / MB,
                got_uss / MB,
                uss / MB,
                ratio(&m, worker)
            );
            assert!((got_pss - pss).abs() <= 0.02 * pss, "{name}: worker {worker}: pss {got_pss} vs the file's {pss}");
            assert!((got_uss - uss).abs() <= 0.02 * uss, "{name}: worker {worker}: uss {got_uss} vs the file's {uss}");
            let rss = memory(&m, worker, "rss").unwrap();
            let shared = memory(&m, worker, "shared").unwrap();
            assert!((rss - got_uss - shared).abs() <= 0.02 * rss, "{name}: worker {worker}: rss = uss + shared");
        }
        return;
    }
    panic!("{name}: the processes' memory never held still for 2.6 s: {last}");
}

fn preload_env() -> Vec<(&'static str, String)> {
    vec![("TESTAPP_PRELOAD_MB", PRELOAD_MB.to_string())]
}

/// `/touch` served by one worker: it walks the preloaded objects, so its shared ratio falls
/// and its private memory grows by about their size; the other worker's sharing stays.
fn touch_unshares_one_worker(name: &str, server: &Server, agent: &Agent) {
    let m = agent.metrics();
    let before: BTreeMap<String, f64> = slots(&m).keys().map(|w| (w.clone(), ratio(&m, w))).collect();
    let uss_before: BTreeMap<String, f64> = slots(&m).keys().map(|w| (w.clone(), memory(&m, w, "uss").unwrap())).collect();
    for (w, r) in &before {
        assert!(*r > 0.6, "{name}: worker {w} shares most of its memory with the master before /touch ({r:.3})");
    }
    let addr: SocketAddr = ([127, 0, 0, 1], server.port).into();
    let (status, body) = http_get(addr, "/touch").unwrap();
    assert_eq!(status, 200, "{body}");
    let pid: u32 = body.split_whitespace().next().unwrap().parse().unwrap();
    let touched = slots(&m).into_iter().find(|(_, p)| *p == pid).map(|(w, _)| w).expect("the worker that served /touch holds a slot");
    let drop_to = before[&touched] - 0.4;
    let m = agent.metrics_when(&format!("worker {touched}'s shared ratio below {drop_to:.2}"), |m| ratio(m, &touched) < drop_to);
    let grew = (memory(&m, &touched, "uss").unwrap() - uss_before[&touched]) / MB;
    println!("{name}: /touch in worker {touched}: shared ratio {:.3} → {:.3}, private memory +{grew:.1} MB", before[&touched], ratio(&m, &touched));
    assert!(grew >= 0.8 * PRELOAD_MB as f64, "{name}: the touched worker's private memory grew by {grew:.1} MB");
    for (w, r) in &before {
        if *w != touched {
            assert!((ratio(&m, w) - r).abs() < 0.05, "{name}: untouched worker {w}: {r:.3} → {:.3}", ratio(&m, w));
        }
    }
}

#[test]
fn gunicorn_preload_workers_share_until_touched() {
    let _serial = serial();
    let server = Server::gunicorn_app(TempDir::new("server"), ".venv", "testapp", &["-w", "2", "--preload"], &preload_env()).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &["--memory-every", "1"]).unwrap();
    wait_series(&agent, 2);
    compare_with_the_file("gunicorn --preload", &agent, server.master());
    touch_unshares_one_worker("gunicorn --preload", &server, &agent);
    compare_with_the_file("gunicorn --preload, after /touch", &agent, server.master());
}

#[test]
fn gunicorn_without_preload_each_worker_holds_its_own_copy() {
    let _serial = serial();
    let server = Server::gunicorn_app(TempDir::new("server"), ".venv", "testapp", &["-w", "2"], &preload_env()).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &["--memory-every", "1"]).unwrap();
    // Each worker imports the app itself: wait until both have built the structure.
    let m = agent.metrics_when("both workers' own copies", |m| {
        slots(m).len() == 2 && slots(m).keys().all(|w| memory(m, w, "uss").is_some_and(|u| u >= PRELOAD_MB as f64 * MB))
    });
    for w in slots(&m).keys() {
        assert!(ratio(&m, w) < 0.5, "worker {w} built its own copy: shared ratio {:.3}", ratio(&m, w));
    }
    compare_with_the_file("gunicorn", &agent, server.master());
}

#[test]
fn uwsgi_workers_share_until_touched() {
    let _serial = serial();
    // uWSGI loads the app in the master before forking (no --lazy-apps).
    let server = Server::uwsgi_app(UwsgiMode::HttpSocket, 2, "testapp", TempDir::new("uwsgi"), &[], &preload_env()).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &["--memory-every", "1"]).unwrap();
    wait_series(&agent, 2);
    compare_with_the_file("uWSGI", &agent, server.master());
    touch_unshares_one_worker("uWSGI", &server, &agent);
}

/// Lines of the agent's log at warn level or above that speak of memory.
fn memory_warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && (l.contains("memory") || l.contains("smaps")))
        .collect()
}

#[test]
fn workers_that_exit_between_reads_leave_no_errors_and_their_slot_to_the_next() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "2"]).unwrap();
    server.wait_workers(2).unwrap();
    // Read often, so that exits fall between the listing of the workers and their reads.
    let agent = Agent::attach(server.master(), &["--memory-every", "0.1"]).unwrap();
    wait_series(&agent, 2);
    for round in 0..8 {
        let m = agent.metrics();
        let (worker, pid) = slots(&m).into_iter().nth(round % 2).unwrap();
        // SAFETY: plain kill(2) of the test's own gunicorn worker.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        // The slot's series come back, read from the worker that took the slot.
        agent.metrics_when(&format!("slot {worker} taken by a new worker with its memory"), |m| {
            let Some(&new) = slots(m).get(&worker) else { return false };
            new != pid && memory(m, &worker, "rss").is_some() && std::fs::metadata(format!("/proc/{new}")).is_ok()
        });
    }
    let m = wait_series(&agent, 2);
    assert!(m.sum("wsgiscope_memory_reads_total", &[]) > 20.0, "{}", m.text);
    let log = agent.log_text();
    assert!(memory_warnings(&log).is_empty(), "no memory errors for workers that exited:\n{log}");
    // The series describe live processes only: one set per slot and the master.
    assert_eq!(m.series("wsgi_worker_memory_bytes", &[]).count(), 3 * 5, "{}", m.text);
}

#[test]
fn memory_reads_turn_off() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "1"]).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &["--memory-every", "off"]).unwrap();
    agent.metrics_when("the worker's slot", |m| slots(m).len() == 1);
    std::thread::sleep(Duration::from_secs(1));
    let m = agent.metrics();
    assert_eq!(m.series("wsgi_worker_memory_bytes", &[]).count(), 0, "{}", m.text);
    assert_eq!(m.sum("wsgiscope_memory_reads_total", &[]), 0.0);
}

/// A worker whose smaps_rollup the kernel refuses to the agent. With the capabilities the agent
/// needs (CAP_PERFMON) nothing in the kernel's own checks refuses it, so the refusal is made
/// real another way: the agent runs in a mount namespace of its own where an unreadable file
/// (mode 000) is bound over that one worker's smaps_rollup, without CAP_DAC_OVERRIDE and
/// CAP_DAC_READ_SEARCH (which would let root read it). Its open(2) gets EACCES, as under a
/// security module's denial. Expected: one warning, that worker's series absent, every other
/// process's present, each refused read counted, requests counted as ever.
#[test]
fn a_worker_whose_memory_is_refused_has_no_series_and_one_warning() {
    let _serial = serial();
    let server = Server::gunicorn(&["-w", "2"]).unwrap();
    server.wait_workers(2).unwrap();
    let refused = server.workers()[0];
    let dir = TempDir::new("refused");
    let denied = dir.0.join("denied");
    std::fs::write(&denied, "").unwrap();
    std::fs::set_permissions(&denied, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let script = format!(
        "mount --bind {} /proc/{refused}/smaps_rollup && exec capsh --drop=cap_dac_override,cap_dac_read_search -- -c 'exec \"$@\"' agent \"$@\"",
        denied.display()
    );
    let wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", &script, "sh"];
    let pid = server.master().to_string();
    let agent =
        Agent::start_wrapped(&wrapper, &["attach", "--pid", &pid, "--memory-every", "0.5"], &[], &[]).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], server.port).into();
    for _ in 0..10 {
        assert_eq!(http_get(addr, "/hello").unwrap().0, 200);
    }
    let m = agent.metrics_when("four sweeps and the requests", |m| {
        m.sum("wsgiscope_memory_reads_total", &[]) >= 12.0 && m.sum("wsgi_requests_total", &[]) == 10.0
    });
    let slot = slots(&m).into_iter().find(|(_, p)| *p == refused).map(|(w, _)| w).expect("the refused worker's slot");
    let other = slots(&m).into_keys().find(|w| *w != slot).unwrap();
    for kind in ["rss", "pss", "uss", "shared", "swap"] {
        assert_eq!(memory(&m, &slot, kind), None, "refused worker {refused} (slot {slot}) has no {kind}:\n{}", m.text);
        assert!(memory(&m, &other, kind).is_some(), "the other worker's {kind}:\n{}", m.text);
        assert!(memory(&m, "master", kind).is_some(), "the master's {kind}:\n{}", m.text);
    }
    let reads = m.sum("wsgiscope_memory_reads_total", &[]);
    let failures = m.sum("wsgiscope_memory_read_failures_total", &[]);
    // One of the three processes per sweep is refused; the scrape may fall inside a sweep.
    assert!(failures >= (reads / 3.0).floor() - 1.0 && failures <= (reads / 3.0).ceil() + 1.0, "{failures} of {reads}");
    let log = agent.log_text();
    let warnings = memory_warnings(&log);
    assert_eq!(warnings.len(), 1, "one warning for every refused read:\n{log}");
    assert!(
        warnings[0].contains(&format!("/proc/{refused}/smaps_rollup")) && warnings[0].contains("ermission"),
        "the warning names the file and the cause: {}",
        warnings[0]
    );
}
