//! deploy/ checked without a cluster: the manifests against the Kubernetes schemas (offline,
//! kubernetes-validate's bundled copies), the security properties the DaemonSet promises, the
//! Dockerfile against the DaemonSet, and the Grafana dashboard against the real agent's metrics
//! as a real Prometheus serves them.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use serde_json::Value;
use wsgiscope_integration::{
    agent_bin, get, repo_root, serial, services::Redis, unix_now, Agent, Metrics, Prometheus, Server, TempDir,
};

fn deploy(file: &str) -> PathBuf {
    repo_root().join("deploy").join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// The venv where `cargo xtask setup` installs kubernetes-validate (and with it PyYAML).
fn venv_bin(name: &str) -> PathBuf {
    let bin = repo_root().join(".venv/bin").join(name);
    assert!(bin.exists(), "{} missing: run `cargo xtask setup`", bin.display());
    bin
}

/// Every YAML document of deploy/`file`, as JSON, read by PyYAML (serde_yaml is no dependency).
fn yaml_docs(file: &str) -> Vec<Value> {
    const TO_JSON: &str =
        "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))";
    let out = Command::new(venv_bin("python")).args(["-c", TO_JSON]).arg(deploy(file)).output().unwrap();
    assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn yaml_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo_root().join("deploy"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    files
}

fn the<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

fn daemonset() -> (Vec<Value>, Value) {
    let docs = yaml_docs("daemonset.yaml");
    let ds = the(&docs, "DaemonSet").clone();
    (docs, ds)
}

/// Kubernetes versions checked: 1.30 is the first whose schema has `appArmorProfile`.
const KUBERNETES_VERSIONS: &[&str] = &["1.30", "1.37"];

#[test]
fn manifests_validate_against_the_kubernetes_schemas_offline() {
    let files = yaml_files();
    assert!(files.contains(&"daemonset.yaml".to_string()) && files.contains(&"podmonitor.yaml".to_string()), "{files:?}");
    for file in &files {
        for version in KUBERNETES_VERSIONS {
            // In a network namespace of its own: no network, so only the bundled schemas count.
            let out = Command::new("unshare")
                .arg("--net")
                .arg(venv_bin("kubernetes-validate"))
                .args(["--strict", "-k", version])
                .arg(deploy(file))
                .output()
                .unwrap();
            let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "deploy/{file} against {version}:\n{report}");
            for doc in yaml_docs(file) {
                let (kind, name) = (doc["kind"].as_str().unwrap(), doc["metadata"]["name"].as_str().unwrap());
                let group = doc["apiVersion"].as_str().unwrap().rsplit_once('/').map_or("", |(g, _)| g);
                if group.contains('.') && !group.ends_with(".k8s.io") {
                    // A custom resource (PodMonitor): no schema bundled; checked below instead.
                    assert!(report.contains(&format!("Couldn't find schema for kind {kind}")), "{report}");
                } else {
                    let passed = format!("passed for resource {}/{name} against version {version}", kind.to_lowercase());
                    assert!(report.contains(&passed), "deploy/{file}: no `{passed}` in\n{report}");
                }
            }
        }
    }
}

/// CPU cores or memory bytes of a Kubernetes quantity (the suffixes these manifests use).
fn quantity(q: &Value) -> f64 {
    let s = q.as_str().map(str::to_string).unwrap_or_else(|| q.to_string());
    let suffixes = [("m", 1e-3), ("Ki", 1024.0), ("Mi", 1024.0 * 1024.0), ("Gi", 1024.0 * 1024.0 * 1024.0), ("", 1.0)];
    let (num, scale) = suffixes.iter().find_map(|(suf, scale)| Some((s.strip_suffix(suf)?, *scale))).unwrap();
    num.parse::<f64>().unwrap_or_else(|_| panic!("{s:?} is not a quantity")) * scale
}

#[test]
fn the_daemonset_keeps_the_promised_security_properties() {
    let (docs, ds) = daemonset();
    let text = read("daemonset.yaml");
    assert_eq!(the(&docs, "Namespace")["metadata"]["name"], "wsgiscope");
    let sa = the(&docs, "ServiceAccount");
    assert_eq!(sa["metadata"]["namespace"], "wsgiscope");
    assert_eq!(sa["automountServiceAccountToken"], false, "the agent needs no API token");
    assert_eq!(ds["metadata"]["namespace"], "wsgiscope");

    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_ne!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let tolerates_all = pod["tolerations"].as_array().unwrap().iter().any(|t| t["operator"] == "Exists" && t["key"].is_null());
    assert!(tolerates_all, "runs on every node: {}", pod["tolerations"]);
    assert_eq!(ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], pod_labels(&ds)["app.kubernetes.io/name"]);

    let containers: Vec<&Value> =
        ["initContainers", "containers"].iter().flat_map(|k| pod[k].as_array().into_iter().flatten()).collect();
    assert_eq!(containers.len(), 1);
    for c in containers {
        let sc = &c["securityContext"];
        assert_ne!(sc["privileged"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["runAsUser"], 0);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        let mut added: Vec<&str> = sc["capabilities"]["add"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        added.sort_unstable();
        assert_eq!(added, ["BPF", "DAC_READ_SEARCH", "PERFMON", "SYS_PTRACE"], "exactly the documented capabilities");
        for cap in added {
            // Each one justified where it is granted.
            assert!(text.lines().any(|l| l.trim_start().starts_with(&format!("# {cap}:"))), "no `# {cap}:` comment");
        }
        assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");

        // Requests and limits set, requests within limits.
        let res = &c["resources"];
        for what in ["cpu", "memory"] {
            let (req, lim) = (quantity(&res["requests"][what]), quantity(&res["limits"][what]));
            assert!(req > 0.0 && req <= lim, "{what}: request {req} vs limit {lim}");
        }

        // The daemon listens where the port, probes and scrape annotations point.
        assert_eq!(c["args"], serde_json::json!(["daemon", "--listen", "0.0.0.0:9464"]));
        let ports = c["ports"].as_array().unwrap();
        assert!(ports.iter().any(|p| p["name"] == "metrics" && p["containerPort"] == 9464), "{ports:?}");
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["path"], "/metrics", "{probe}");
            assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
        }

        // Host paths: only tracefs, read-only, where the agent looks for it.
        let host_paths: BTreeMap<&str, &str> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
            .collect();
        assert_eq!(host_paths.values().copied().collect::<Vec<_>>(), ["/sys/kernel/tracing"]);
        for m in c["volumeMounts"].as_array().unwrap() {
            if host_paths.contains_key(m["name"].as_str().unwrap()) {
                assert_eq!(m["readOnly"], true, "{m}");
                assert_eq!(m["mountPath"], "/sys/kernel/tracing", "{m}");
            }
        }
    }
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
}

fn pod_labels(ds: &Value) -> &Value {
    &ds["spec"]["template"]["metadata"]["labels"]
}

#[test]
fn the_podmonitor_selects_the_daemonset_pods_on_their_metrics_port() {
    let (_, ds) = daemonset();
    let pm = yaml_docs("podmonitor.yaml");
    let pm = the(&pm, "PodMonitor");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod_labels(&ds)[k], v, "selector label {k}");
    }
    let namespaces = pm["spec"]["namespaceSelector"]["matchNames"].as_array().unwrap();
    assert!(namespaces.contains(&ds["metadata"]["namespace"]), "{namespaces:?}");
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    let port_names: Vec<&Value> =
        ds["spec"]["template"]["spec"]["containers"][0]["ports"].as_array().unwrap().iter().map(|p| &p["name"]).collect();
    assert!(port_names.contains(&&endpoint["port"]), "{} not among {port_names:?}", endpoint["port"]);
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["honorLabels"], true, "the servers' own namespace/pod labels must win");
}

#[test]
fn the_dockerfile_runs_the_daemon_the_daemonset_expects() {
    let (_, ds) = daemonset();
    let dockerfile = read("Dockerfile");
    let instr = |name: &str| -> Vec<String> {
        dockerfile.lines().filter_map(|l| l.strip_prefix(&format!("{name} "))).map(str::to_string).collect()
    };
    // The binary links against the build host's glibc: the base must be the same Debian release.
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let codename = os_release.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=")).unwrap();
    assert_eq!(instr("FROM"), [format!("debian:{codename}-slim")]);
    assert_eq!(instr("COPY"), ["target/release/wsgiscope /usr/local/bin/wsgiscope"]);
    assert!(instr("RUN").is_empty(), "nothing built or installed in the image");
    let entrypoint: Value = serde_json::from_str(&instr("ENTRYPOINT")[0]).unwrap();
    assert_eq!(entrypoint, serde_json::json!(["/usr/local/bin/wsgiscope"]));
    let cmd: Value = serde_json::from_str(&instr("CMD")[0]).unwrap();
    assert_eq!(cmd, ds["spec"]["template"]["spec"]["containers"][0]["args"], "image default = DaemonSet args");
    // The context is the repository root: only the binary is sent.
    let ignore = read("Dockerfile.dockerignore");
    let ignore: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(ignore, ["*", "!target/release/wsgiscope"]);
}

#[test]
fn the_agent_accepts_the_daemonset_command_line() {
    let (_, ds) = daemonset();
    let args: Vec<String> = serde_json::from_value(ds["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
    let out = Command::new(agent_bin()).args(&args).arg("--help").output().unwrap();
    assert!(out.status.success(), "wsgiscope {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

// ---- The Grafana dashboard ----

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana-dashboard.json")).expect("the dashboard is JSON")
}

/// Every PromQL expression of the dashboard: panel targets and template-variable queries.
fn exprs(d: &Value) -> Vec<String> {
    let targets = d["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array().unwrap());
    let mut out: Vec<String> = targets.map(|t| t["expr"].as_str().unwrap().to_string()).collect();
    out.extend(d["templating"]["list"].as_array().unwrap().iter().filter_map(|v| Some(v["definition"].as_str()?.to_string())));
    out
}

/// Metric names in an expression: identifiers starting with the project's prefixes.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("wsgi_") || t.starts_with("wsgiscope_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_dashboard_is_well_formed() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: BTreeMap<&str, &Value> =
        d["templating"]["list"].as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    for name in ["service", "route"] {
        assert_eq!(vars[name]["type"], "query");
        assert!(vars[name]["definition"].as_str().unwrap().starts_with("label_values(wsgi_requests_total"));
        assert!(vars[name]["definition"].as_str().unwrap().ends_with(&format!(", {name})")));
        assert_eq!(vars[name]["datasource"]["uid"], "${datasource}");
    }
    let panels = d["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        let g = &p["gridPos"];
        assert!(g["w"].as_u64().unwrap() > 0 && g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24, "{title}: {g}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no target");
        let refs: BTreeSet<&str> = targets.iter().map(|t| t["refId"].as_str().unwrap()).collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds are unique");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            assert!(!metric_names(t["expr"].as_str().unwrap()).is_empty(), "{title}: {}", t["expr"]);
        }
    }
    // The panels the issue asks for, by the metrics they need.
    let used: BTreeSet<String> = exprs(&d).iter().flat_map(|e| metric_names(e)).collect();
    for name in [
        "wsgi_requests_total",
        "wsgi_request_duration_seconds_bucket",
        "wsgi_response_blocks_bucket",
        "wsgi_response_write_seconds_bucket",
        "wsgi_worker_busy_seconds_total",
        "wsgi_workers",
        "wsgi_worker_active_requests",
        "wsgi_worker_oldest_request_seconds",
        "wsgi_accept_wait_seconds_bucket",
        "wsgi_worker_exits_total",
        "wsgi_small_block_responses_total",
        "wsgi_slow_client_responses_total",
        "wsgiscope_lost_events_total",
        "wsgiscope_unparsed_requests_total",
        "wsgi_request_cpu_seconds_sum",
        "wsgi_request_downstream_seconds_sum",
        "wsgi_downstream_duration_seconds_count",
        "wsgi_downstream_duration_seconds_bucket",
        "wsgi_repeated_call_requests_total",
        "wsgi_worker_memory_bytes",
        "wsgi_worker_memory_shared_ratio",
        "wsgi_request_memory_growth_bytes_sum",
    ] {
        assert!(used.contains(name), "no panel uses {name}");
    }
    assert!(exprs(&d).iter().any(|e| e.contains("status=\"aborted\"")), "no aborted-requests panel");
}

/// The family a sample name belongs to and the type its suffix implies, as the exposition
/// writes them (`# TYPE wsgi_requests counter` → `wsgi_requests_total`).
fn family_of(sample: &str, types: &BTreeMap<&str, &str>) -> Option<(String, &'static str)> {
    // The classic text format names a counter by its sample (`# TYPE x_total counter`).
    if sample.ends_with("_total") && types.get(sample) == Some(&"counter") {
        return Some((sample.to_string(), "counter"));
    }
    let candidates = [("_bucket", "histogram"), ("_sum", "histogram"), ("_count", "histogram"), ("_total", "counter"), ("", "gauge")];
    candidates.iter().find_map(|(suffix, kind)| {
        let family = sample.strip_suffix(suffix)?;
        (types.get(family) == Some(kind)).then(|| (family.to_string(), *kind))
    })
}

/// Drives traffic that gives every family the dashboard uses a sample: a worker killed in the
/// middle of a request, plain and slow routes, a response of one-byte blocks, a slow reader.
fn drive_every_family(server: &Server, agent: &Agent) {
    // First, while no other request can linger as active: SIGKILL the worker in the middle of
    // /hang, for an aborted request and a killed worker.
    let worker = server.workers()[0];
    let port = server.port;
    let client = std::thread::spawn(move || get(port, "/hang"));
    agent.metrics_when("/hang in progress", |m| m.sum("wsgi_worker_active_requests", &[]) == 1.0);
    // SAFETY: plain kill(2) of the test's own gunicorn worker.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let _ = client.join().unwrap();
    server.wait_workers(1).unwrap();

    // /gc: garbage collections (pauses, and GC time inside requests).
    // /redis?n=25 repeats one Redis command 25 times (N+1); /api calls Redis and the backend.
    // /grow keeps 1 MiB per request (memory growth by route).
    for path in ["/hello", "/hello", "/sleep?ms=50", "/blocks", "/bytes1", "/gc", "/redis?n=25", "/api", "/grow"] {
        assert_eq!(get(server.port, path).unwrap().status, 200);
    }
    // A reader that waits 2 s before reading 32 MiB, more than the socket buffers hold: the
    // worker spends most of the request blocked in writes, even on a loaded CPU.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        write!(s, "GET /big?mb=32 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let mut sink = Vec::new();
        s.read_to_end(&mut sink).unwrap();
        assert!(sink.len() > 32 << 20);
    }
    // One wait per family, so that a failure names the one that did not appear.
    type Wanted<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);
    let families: [Wanted; 6] = [
        ("wsgi_requests_total", &[], 9.0),
        ("wsgi_repeated_call_requests_total", &[], 1.0),
        ("wsgi_requests_total", &[("status", "aborted")], 1.0),
        ("wsgi_worker_exits_total", &[("reason", "killed")], 1.0),
        ("wsgi_small_block_responses_total", &[], 1.0),
        ("wsgi_slow_client_responses_total", &[], 1.0),
    ];
    for (name, labels, at_least) in families {
        agent.metrics_when(&format!("{name}{labels:?} >= {at_least}"), |m| m.sum(name, labels) >= at_least);
    }
    // The worker that replaced the killed one has its memory read (every second here).
    agent.metrics_when("the memory of the new worker", |m| m.series("wsgi_worker_memory_shared_ratio", &[]).next().is_some());
}

#[test]
fn every_dashboard_query_finds_series_of_the_real_agent() {
    let _serial = serial();
    // The test app with a Redis and an HTTP backend to call (downstream panels).
    let redis = Redis::start().unwrap();
    let backend = Server::gunicorn_app(TempDir::new("backend"), ".venv", "backend", &["-w", "1"], &[]).unwrap();
    let env = [("TESTAPP_REDIS", redis.tcp_url()), ("TESTAPP_BACKEND", format!("http://127.0.0.1:{}", backend.port))];
    let server = Server::gunicorn_app(TempDir::new("server"), ".venv", "testapp", &["-w", "1"], &env).unwrap();
    server.wait_workers(1).unwrap();
    let agent = Agent::attach(server.master(), &["--memory-every", "1"]).unwrap();
    let prom = Prometheus::start("wsgiscope", &agent.metrics_url).unwrap();
    // Ready is not scraping: Prometheus applies its targets on a 5 s tick.
    prom.wait_for_scrape_after(unix_now());
    drive_every_family(&server, &agent);
    let scrape: Metrics = agent.metrics();
    // Two scrapes after the last new series: rate() and increase() need two samples.
    prom.wait_for_scrape_after(unix_now() + 1.0);

    // (1) Every metric name the dashboard queries is a sample name of the exposition, of the
    // family and type its suffix says.
    let types: BTreeMap<&str, &str> =
        scrape.text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' ')).collect();
    let d = dashboard();
    let names: BTreeSet<String> = exprs(&d).iter().flat_map(|e| metric_names(e)).collect();
    for name in &names {
        assert!(scrape.series(name, &[]).next().is_some(), "the dashboard queries {name}; the agent exports no such sample:\n{}", scrape.text);
        assert!(family_of(name, &types).is_some(), "{name}: suffix does not fit its family's # TYPE");
    }

    // (2) Every panel query, with the variables as "All" gives them, returns series from the real
    // Prometheus: names, label matchers and syntax all hold.
    let promql = |e: &str| e.replace("$__rate_interval", "1m").replace("$service", ".*").replace("$route", ".*");
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let q = promql(t["expr"].as_str().unwrap());
            let result = prom.query(&q, None).unwrap_or_else(|e| panic!("{}: {e}", p["title"]));
            assert!(!result.is_empty(), "{}: `{q}` returns nothing", p["title"]);
        }
    }

    // (3) The template variables' label_values() through Prometheus' label API.
    for (label, want) in [("service", "testapp"), ("route", "/hello")] {
        let def = d["templating"]["list"].as_array().unwrap().iter().find(|v| v["name"] == label).unwrap()["definition"]
            .as_str()
            .unwrap();
        let selector = promql(def.strip_prefix("label_values(").unwrap().rsplit_once(", ").unwrap().0);
        let values = prom
            .api(&format!("/api/v1/label/{label}/values?match[]={}", wsgiscope_integration::url_encode(&selector)))
            .unwrap();
        assert!(values.as_array().unwrap().iter().any(|v| v == want), "{label}: {values}");
    }
}
