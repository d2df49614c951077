//! The live page at `/`, in a real browser: Debian's chromium, driven by tests/browser/page.mjs
//! (playwright-core), against the real agent attached to real gunicorn. What the page shows —
//! dots, worker bars, route rows, a box selection and a request's profile — must match what
//! the agent's JSON API answers, with no console error and no client string run as markup.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use wsgiscope_integration::{get, http_get, repo_root, serial, services::Redis, unix_now, Agent, Server, TempDir};

/// Paths a client chose: markup in a route must show as text and never run.
const HOSTILE: &[&str] = &["/page/\"><svg/onload=window.__xss=1>", "/page/<script>window.__xss=2</script>"];

/// The agent's answer to `path`, as JSON.
fn api(agent: &Agent, path: &str) -> Value {
    let (status, body) = http_get(&agent.metrics_url, path).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn wait_until(what: &str, agent: &Agent, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}\nagent log:\n{}", agent.log_text());
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the browser driver on the agent's page: what it read, as JSON. With `stop`, the
/// driver then stops the agent and reads the page again.
fn drive(agent: &Agent, dir: &Path, stop: bool) -> Value {
    let browser = repo_root().join("tests/browser");
    assert!(
        browser.join("node_modules/playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "playwright-core or chromium missing: run `cargo xtask setup`"
    );
    let url = format!("http://{}/", agent.metrics_url);
    let mut cmd = Command::new("node");
    cmd.arg(browser.join("page.mjs")).arg(&url).arg(dir);
    if stop {
        cmd.arg(agent.pid().to_string());
    }
    let out = cmd.output().expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "driver failed: {}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("driver output: {e}: {stdout}"));
    assert!(v.get("driverError").is_none(), "driver: {}", v["driverError"]);
    assert_eq!(v["consoleErrors"], serde_json::json!([]), "console errors");
    assert_eq!(v["pageErrors"], serde_json::json!([]), "page errors");
    assert_eq!(v["ready"], "1");
    assert_eq!(v["unreachableShown"], false);
    assert_eq!(v["xss"], Value::Null, "a client's route ran as script");
    v
}

/// Keeps the screenshot as a test artefact: target/test-artefacts/`name`.
fn keep_screenshot(dir: &Path, name: &str) -> PathBuf {
    let shot = dir.join("page.png");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 0, "no screenshot at {}", shot.display());
    let artefacts = repo_root().join("target/test-artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let kept = artefacts.join(name);
    std::fs::copy(&shot, &kept).unwrap();
    kept
}

/// (service, worker, pid) of each worker in an /api/active answer or of each bar on the page.
fn workers(list: &Value) -> BTreeSet<(String, u64, u64)> {
    let num = |v: &Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|w| (w["service"].as_str().unwrap().to_string(), num(&w["worker"]), num(&w["pid"])))
        .collect()
}

#[test]
fn page_shows_every_request_worker_and_route() {
    let _serial = serial();
    // A real Redis for the app's /redis route: requests with downstream calls to profile.
    let redis = Redis::start().unwrap();
    let env = [("TESTAPP_REDIS", redis.tcp_url())];
    let server = Server::gunicorn_app(TempDir::new("server"), ".venv", "testapp", &["-w", "2", "-k", "sync"], &env).unwrap();
    server.wait_workers(2).unwrap();
    let agent = Agent::attach(server.master(), &[]).unwrap();

    let mut sent = 0;
    let paths =
        [("/hello", 12), ("/sleep?ms=30", 5), ("/error", 3), ("/blocks", 2), ("/redis?n=3", 2), (HOSTILE[0], 1), (HOSTILE[1], 1)];
    for (path, n) in paths {
        for _ in 0..n {
            get(server.port, path).unwrap();
            sent += 1;
        }
    }
    wait_until("every request in /api/requests", &agent, || agent.requests().len() >= sent);
    let dir = TempDir::new("page");
    let page = drive(&agent, &dir.0, false);

    // Dots: one per record the agent holds from the last 5 minutes (all of them here).
    let records = agent.requests();
    assert_eq!(records.len(), sent, "records: {records:?}");
    let in_window = records.iter().filter(|r| r["end"].as_f64().unwrap() >= unix_now() - 300.0).count();
    assert_eq!(page["dots"], in_window, "dots drawn");
    assert_eq!(page["cursor"], records.last().unwrap()["seq"], "the page read up to the last record");

    // Worker bars: the workers the agent reports, with the server's real pids, all idle now.
    let active = api(&agent, "/api/active");
    assert_eq!(workers(&page["workers"]), workers(&active["workers"]));
    let pids: BTreeSet<u64> = page["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids, server.workers().into_iter().map(u64::from).collect());
    for w in page["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "idle", "{w}");
        assert_eq!(w["route"], "", "{w}");
    }

    // Route rows: the routes /api/routes names, with its counts; hostile names shown as text.
    let routes = api(&agent, "/api/routes");
    let rows = |list: &Value, requests: &str| -> BTreeSet<(String, String, u64)> {
        let list = list.as_array().unwrap().iter();
        list.map(|r| (r["service"].as_str().unwrap().into(), r["route"].as_str().unwrap().into(), r[requests].as_u64().unwrap())).collect()
    };
    let shown = rows(&page["routes"], "requests");
    assert_eq!(shown, rows(&routes["routes"], "requests"));
    assert!(shown.contains(&("testapp".into(), "/hello".into(), 12)), "{shown:?}");
    assert!(shown.contains(&("testapp".into(), "/sleep".into(), 5)), "{shown:?}");
    // Rows by total time, largest first (the default), then by requests after a click.
    let total_time = |route: &Value| {
        let r = routes["routes"].as_array().unwrap().iter().find(|r| r["route"] == route["route"]).unwrap();
        r["total_time"].as_f64().unwrap()
    };
    let times: Vec<f64> = page["routes"].as_array().unwrap().iter().map(total_time).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "rows by total time: {times:?}");
    let mut counts: Vec<u64> = shown.iter().map(|r| r.2).collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(page["routesByRequests"], serde_json::json!(counts));
    for hostile in HOSTILE {
        let row = page["routes"].as_array().unwrap().iter().find(|r| r["route"] == *hostile);
        let row = row.unwrap_or_else(|| panic!("no row for {hostile}: {shown:?}"));
        assert_eq!(row["routeText"], *hostile, "the route cell shows the name as text");
    }

    // Box-select over the whole plot: every dot; the first row's profile opens.
    assert_eq!(page["selected"], page["dotsAtSelection"]);
    assert_eq!(page["selected"], sent);
    assert_eq!(page["selectionRows"], sent);
    let profile = &page["profile"];
    assert_eq!(profile["seq"], page["firstRowSeq"], "{profile}");
    assert_eq!(profile["breakdownBars"], 4, "{profile}");
    // The slowest first: the record of the longest duration heads the selection.
    let slowest = records.iter().max_by(|a, b| a["duration"].as_f64().unwrap().total_cmp(&b["duration"].as_f64().unwrap()));
    let slowest = slowest.unwrap();
    assert_eq!(page["firstRowSeq"], slowest["seq"]);
    let title = format!("GET {} → {}", slowest["route"].as_str().unwrap(), slowest["status"]);
    assert!(profile["title"].as_str().unwrap().starts_with(&title), "{title}: {profile}");

    // A request with downstream calls: its profile lists them as the agent recorded them.
    let shown = &page["callsProfile"];
    let record = records.iter().find(|r| r["seq"] == shown["seq"]).unwrap_or_else(|| panic!("no record {shown}"));
    assert_eq!(record["route"], "/redis", "{record}");
    let calls: Vec<[String; 4]> = record["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ["protocol", "peer", "operation", "outcome"].map(|k| c[k].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(calls.len(), 3, "{record}");
    assert!(calls.iter().all(|c| c[0] == "redis" && c[2] == "GET"), "{calls:?}");
    let listed: Vec<[String; 4]> = shown["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| [0, 1, 2, 3].map(|i| row[i].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(listed, calls, "the profile's call list");
    assert_eq!(shown["timelineCalls"], 3);

    let kept = keep_screenshot(&dir.0, "page.png");
    eprintln!("screenshot: {}", kept.display());
}

#[test]
fn page_shows_a_request_in_flight() {
    let _serial = serial();
    let mut server = Server::gunicorn(&["-w", "2", "-k", "sync"]).unwrap();
    server.wait_workers(2).unwrap();
    let mut agent = Agent::attach(server.master(), &[]).unwrap();
    for _ in 0..3 {
        get(server.port, "/hello").unwrap();
    }
    // A request that outlasts the browser's visit.
    let port = server.port;
    let slow = thread::spawn(move || get(port, "/sleep?ms=30000"));
    // The worker serving it, once /api/active (refreshed every 500 ms) shows it.
    let sleeping = || {
        let active = api(&agent, "/api/active");
        let list = active["workers"].as_array().unwrap().iter();
        let mut busy = list.filter(|w| w["state"] == "busy" && w["requests"][0]["route"] == "/sleep");
        busy.next().map(|w| w["pid"].as_u64().unwrap())
    };
    wait_until("the /sleep request in /api/active", &agent, || sleeping().is_some());
    let pid = sleeping().unwrap();

    let dir = TempDir::new("page-in-flight");
    let page = drive(&agent, &dir.0, true);
    let bars = page["workers"].as_array().unwrap();
    assert_eq!(bars.len(), 2, "{bars:?}");
    let busy: Vec<_> = bars.iter().filter(|w| w["state"] == "busy").collect();
    assert_eq!(busy.len(), 1, "one busy bar: {bars:?}");
    assert_eq!(busy[0]["pid"], pid);
    assert_eq!(busy[0]["route"], "/sleep");
    assert_eq!(busy[0]["doing"], "application", "a sleeping handler");
    assert!(busy[0]["text"].as_str().unwrap().contains("GET /sleep"), "{}", busy[0]);
    let idle: Vec<_> = bars.iter().filter(|w| w["state"] == "idle").collect();
    assert_eq!(idle.len(), 1, "{bars:?}");
    assert_eq!(page["dots"], 3, "the finished requests only");
    keep_screenshot(&dir.0, "page-in-flight.png");

    // Then the agent stopped: a banner, and no error but the browser's refused connections.
    assert_eq!(agent.wait(Duration::from_secs(10)), Some(0), "the agent exited on the driver's SIGTERM");
    assert_eq!(page["unreachableAfterStop"], true);
    for e in page["consoleErrorsAfterStop"].as_array().unwrap() {
        assert!(e.as_str().unwrap().contains("ERR_CONNECTION_REFUSED"), "console error after the stop: {e}");
    }

    // Quick shutdown (SIGINT): the sleeping request is cut, not waited for.
    server.signal(libc::SIGINT);
    let _ = slow.join();
    server.stop();
}
