//! Bad invocations: one clear error naming the cause and the fix, non-zero exit.
use std::process::Command;

use wsgiscope_integration::{run_agent, serial};

#[test]
fn pid_that_does_not_exist() {
    let _serial = serial();
    // PIDs above pid_max cannot exist.
    let (code, err) = run_agent(&["attach", "--pid", "4194305"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no process with PID 4194305"), "{err}");
    assert!(err.contains("pgrep"), "the message says how to find the PID: {err}");
}

#[test]
fn process_that_is_not_python() {
    let _serial = serial();
    let mut sleep = Command::new("sleep").arg("30").spawn().unwrap();
    let (code, err) = run_agent(&["attach", "--pid", &sleep.id().to_string()]);
    sleep.kill().unwrap();
    sleep.wait().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("process {} (sleep) is not a Python process", sleep.id())), "{err}");
}

#[test]
fn python_process_that_is_not_a_wsgi_server() {
    let _serial = serial();
    let mut py = Command::new("python3").args(["-c", "import time; time.sleep(30)"]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (code, err) = run_agent(&["attach", "--pid", &py.id().to_string()]);
    py.kill().unwrap();
    py.wait().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not a WSGI server wsgiscope knows"), "{err}");
}

#[test]
fn missing_pid_argument_is_a_usage_error() {
    let (code, err) = run_agent(&["attach"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--pid"), "{err}");
}

#[test]
fn bad_bucket_lists_service_names_and_route_templates_are_clear_errors() {
    let _serial = serial();
    let (code, err) = run_agent(&["attach", "--pid", "1", "--latency-buckets", "0.5,0.1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--latency-buckets") && err.contains("must increase"), "{err}");
    let (code, err) = run_agent(&["attach", "--pid", "1", "--bytes-buckets", "100,lots"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"lots\" is not a number"), "{err}");
    let (code, err) = run_agent(&["attach", "--pid", "1", "--service", "shop\nevil_total 1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("control characters"), "{err}");

    let dir = wsgiscope_integration::TempDir::new("templates");
    let file = dir.0.join("routes.txt");
    std::fs::write(&file, "/users/{id}/posts\n/orders/{id\n").unwrap();
    let (code, err) = run_agent(&["attach", "--pid", "1", "--routes", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("line 2") && err.contains("unbalanced"), "{err}");
}
