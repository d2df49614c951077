//! One line of the counting middleware's log (tests/apps/testapp.py), as the app saw its request.

/// One line of the counting middleware's log.
#[derive(Debug, Clone)]
pub struct Truth {
    pub route: String,
    pub status: u16,
    pub blocks: u64,
    pub bytes: u64,
    pub elapsed: f64,
    /// Seconds from the WSGI call to the hand-over of the last block (0 when the app raised
    /// before yielding one): a lower bound on the request's span on the wire.
    pub handed: f64,
    pub pid: u32,
    /// Seconds the process spent in garbage collection during the request (gc.callbacks).
    pub gc: f64,
    /// Collections the process ran during the request.
    pub gc_count: u64,
    /// Status line and headers as the app passed them to start_response.
    pub status_line: String,
    pub headers: Vec<(String, String)>,
}

impl Truth {
    pub(crate) fn from_json(line: &str) -> Self {
        let v: serde_json::Value = serde_json::from_str(line).expect("truth line is JSON");
        let num = |k: &str| v[k].as_u64().unwrap_or(0);
        Truth {
            route: v["route"].as_str().unwrap_or_default().to_string(),
            status: num("status") as u16,
            blocks: num("blocks"),
            bytes: num("bytes"),
            elapsed: v["elapsed"].as_f64().unwrap_or(0.0),
            handed: v["handed"].as_f64().unwrap_or(0.0),
            pid: num("pid") as u32,
            gc: v["gc"].as_f64().unwrap_or(0.0),
            gc_count: num("gc_count"),
            status_line: v["status_line"].as_str().unwrap_or_default().to_string(),
            headers: v["headers"]
                .as_array()
                .map(|hs| hs.iter().map(|h| (h[0].as_str().unwrap_or("").into(), h[1].as_str().unwrap_or("").into())).collect())
                .unwrap_or_default(),
        }
    }

    /// Length of the head in CGI form (`Status: 200 OK\r\nName: value\r\n…\r\n`), as mod_wsgi
    /// daemons send it to Apache.
    pub fn cgi_head_len(&self) -> u64 {
        let fields: usize = self.headers.iter().map(|(k, v)| k.len() + 2 + v.len() + 2).sum();
        ("Status: ".len() + self.status_line.len() + 2 + fields + 2) as u64
    }
}

/// One downstream call as tests/apps/downstream.py made it (a `"kind": "call"` line).
#[derive(Debug, Clone)]
pub struct DownstreamCall {
    pub pid: u32,
    pub tid: u32,
    pub route: String,
    /// `postgresql`, `mysql`, `redis` or `http`.
    pub protocol: String,
    /// `tcp` or `unix`.
    pub transport: String,
    /// The SQL as sent, the Redis command name, the HTTP method, or `connect`/`terminate`.
    pub operation: String,
    /// `ok` or `error`.
    pub outcome: String,
    /// Commands sent in the call: a Redis pipeline's length, else 1.
    pub commands: u64,
    /// CLOCK_MONOTONIC around the library call.
    pub start_ns: u64,
    pub end_ns: u64,
    /// CLOCK_MONOTONIC before its first byte was written and after its response's last byte
    /// was read, taken at the socket (or libpq) call: the span the agent measures.
    pub wire_start_ns: u64,
    pub wire_end_ns: u64,
    /// The HTTP status of an HTTP call.
    pub status: Option<u16>,
}

/// One request of tests/apps/downstream.py (a `"kind": "request"` line).
#[derive(Debug, Clone)]
pub struct DownstreamRequest {
    pub pid: u32,
    pub tid: u32,
    pub route: String,
    /// CLOCK_MONOTONIC from the WSGI call to the end of the body's iteration.
    pub start_ns: u64,
    pub end_ns: u64,
    /// CPU time of the serving thread over the same span.
    pub thread_cpu_ns: u64,
    /// The sum of its calls' durations.
    pub downstream_ns: u64,
    /// How many calls it made.
    pub calls: u64,
}

/// The downstream app's log: every call, every request, and the workers that opened their
/// connections.
#[derive(Debug, Default)]
pub struct DownstreamTruth {
    pub calls: Vec<DownstreamCall>,
    pub requests: Vec<DownstreamRequest>,
    /// PIDs of workers that opened their connections (one `"kind": "ready"` line each).
    pub ready: Vec<u32>,
}

impl DownstreamTruth {
    /// Reads the log at `path` (empty if it does not exist yet).
    pub fn read(path: &std::path::Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut truth = DownstreamTruth::default();
        // A line being appended right now has no newline yet: left for the next read.
        for line in text.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n')) {
            let v: serde_json::Value = serde_json::from_str(line).expect("downstream log line is JSON");
            let num = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {line}"));
            let text = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} missing in {line}")).to_string();
            match v["kind"].as_str() {
                Some("call") => truth.calls.push(DownstreamCall {
                    pid: num("pid") as u32,
                    tid: num("tid") as u32,
                    route: text("route"),
                    protocol: text("protocol"),
                    transport: text("transport"),
                    operation: text("operation"),
                    outcome: text("outcome"),
                    commands: num("commands"),
                    start_ns: num("start_ns"),
                    end_ns: num("end_ns"),
                    wire_start_ns: num("wire_start_ns"),
                    wire_end_ns: num("wire_end_ns"),
                    status: v["status"].as_u64().map(|s| s as u16),
                }),
                Some("request") => truth.requests.push(DownstreamRequest {
                    pid: num("pid") as u32,
                    tid: num("tid") as u32,
                    route: text("route"),
                    start_ns: num("start_ns"),
                    end_ns: num("end_ns"),
                    thread_cpu_ns: num("thread_cpu_ns"),
                    downstream_ns: num("downstream_ns"),
                    calls: num("calls"),
                }),
                Some("ready") => truth.ready.push(num("pid") as u32),
                _ => panic!("unknown line in the downstream log: {line}"),
            }
        }
        truth
    }

    /// The calls `request` made: its thread's calls within its time.
    pub fn calls_of(&self, request: &DownstreamRequest) -> Vec<&DownstreamCall> {
        self.calls
            .iter()
            .filter(|c| c.tid == request.tid && c.pid == request.pid)
            .filter(|c| c.start_ns >= request.start_ns && c.end_ns <= request.end_ns)
            .collect()
    }
}
