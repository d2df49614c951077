//! The live views' JSON API, version 1: the shapes `/api/requests`, `/api/active` and
//! `/api/routes` answer with. Field names are stable within a version; a field may be added,
//! never renamed or removed. `wsgiscope top` and the page at `/` read these same types.
//!
//! Units: times are seconds (floats), wall-clock instants are Unix time in seconds. Privacy:
//! a request is named by its route template and method only, never its query string, headers
//! or body; a downstream call by its operation template (SQL with literals as `?`, a Redis
//! command, an HTTP method), as on /metrics.
use serde::{Deserialize, Serialize};

/// `api_version` of every answer.
pub const API_VERSION: u32 = 1;

/// `GET /api/requests?since=CURSOR&limit=N`: the requests that ended after `since`, oldest
/// first, at most `limit` (default and most 1000; `more` says whether to read on).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RequestsPage {
    pub api_version: u32,
    /// Pass as `since` to get the records after these.
    pub cursor: u64,
    /// `seq` of the oldest record still held (all services).
    pub oldest: u64,
    /// Records after `since` that the ring dropped (it holds the latest `--ui-requests` per
    /// service) before this read: never silent.
    pub missed: u64,
    /// More records after `cursor` are waiting (the page was cut at `limit`).
    pub more: bool,
    pub requests: Vec<RequestRecord>,
}

/// One request, as it ended.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Increasing across all services; the cursor.
    pub seq: u64,
    pub service: String,
    /// The route label /metrics counts it under (`other` past the route cap).
    pub route: String,
    pub method: String,
    /// The HTTP status; `null` when the response had none (the client or the worker went
    /// away first); then `outcome` says why.
    pub status: Option<u16>,
    /// `ok` (a status below 500), `error` (5xx), `aborted` (the worker died or was killed
    /// mid-request), `no_response`, `unknown` (a response whose status line was not seen).
    pub outcome: String,
    /// Stable worker slot (as the `worker` label), and the process that served it.
    pub worker: u32,
    pub pid: u32,
    /// When the first request byte was read, and when the request ended (Unix seconds).
    pub start: f64,
    pub end: f64,
    /// First request byte read → last response byte written.
    pub duration: f64,
    /// TCP connection established → accepted by the worker (first request of a connection).
    pub accept_wait: Option<f64>,
    /// Application blocks (WSGI iterable items written), write syscalls, response bytes.
    pub blocks: u64,
    pub write_calls: u64,
    pub bytes: u64,
    /// Time inside write syscalls to the client.
    pub write_time: f64,
    /// Garbage collections on the serving thread during the request.
    pub gc_time: f64,
    /// The serving thread's CPU time; `null` where it is not measured.
    pub cpu_time: Option<f64>,
    /// Change of its process's resident memory (RSS, bytes) from its start to its end, as the
    /// kernel's batched counters give it (negative: it shrank); `null` where not measured.
    pub memory_growth: Option<i64>,
    /// Sum of `calls[].duration` over all its calls (those beyond the list's cap included).
    pub downstream_time: f64,
    pub calls: Vec<CallRecord>,
    /// Calls made but not listed in `calls` (more than the per-request cap of 100).
    pub calls_not_listed: u64,
}

/// One downstream call of a request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CallRecord {
    /// `postgresql`, `mysql`, `redis`, `http`, `tls`, `other`.
    pub protocol: String,
    /// `ip:port` or a UNIX path (`other` past the peer cap).
    pub peer: String,
    /// SQL template, Redis command, HTTP method… (`other` past the operations cap).
    pub operation: String,
    /// `ok` or `error`.
    pub outcome: String,
    /// Seconds from the request's start to the call's first byte.
    pub offset: f64,
    /// First byte written → last byte of the answer read.
    pub duration: f64,
}

/// `GET /api/active`: every worker of every watched server, now.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Active {
    pub api_version: u32,
    /// When the kernel's tables were read (Unix seconds); refreshed every 500 ms.
    pub at: f64,
    pub workers: Vec<WorkerNow>,
}

/// One worker slot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkerNow {
    pub service: String,
    pub worker: u32,
    pub pid: u32,
    /// `idle` or `busy`.
    pub state: String,
    /// Requests in progress, oldest first (more than one with threads or an event loop).
    pub requests: Vec<InFlight>,
}

/// A request in progress.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct InFlight {
    /// The route and method of the request head the kernel captured (`other` when it is not
    /// whole yet or the route has no place under the cap).
    pub route: String,
    pub method: String,
    pub start: f64,
    /// Since the first request byte was read.
    pub elapsed: f64,
    /// What it is doing now, from the kernel's state:
    /// `reading` (its head or body is not all read yet), `application` (the app runs),
    /// `downstream` (a call's request was sent and its answer has not begun: see `wait`),
    /// `writing` (inside a write to the client, or a poll for room to write: a slow client),
    /// `gc` (a garbage collection on its thread).
    pub doing: String,
    /// How long it has been doing that (`null` for `application` and `reading`, which have
    /// no start the kernel marks).
    pub doing_for: Option<f64>,
    /// For `downstream`: whom it waits for.
    pub wait: Option<Wait>,
    /// Is its thread on a CPU, or ready to run, at the scan (`false`: blocked or sleeping)?
    /// `null` where CPU time is not measured.
    pub on_cpu: Option<bool>,
    /// Its thread's CPU time since the request began, as of the scheduler's last charge (at
    /// most a tick behind while it runs).
    pub cpu_time: Option<f64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Wait {
    pub protocol: String,
    pub peer: String,
    pub operation: String,
}

/// `GET /api/routes`: per-route figures over the last minute.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Routes {
    pub api_version: u32,
    /// The span the figures cover: 60 s, or less when the agent started later or the window
    /// hit its cap (100,000 requests per service, the oldest dropped first).
    pub window: f64,
    pub routes: Vec<RouteNow>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RouteNow {
    pub service: String,
    pub route: String,
    pub requests: u64,
    /// Requests per second over `window`.
    pub rate: f64,
    /// Latency quantiles (exact, over the window's requests).
    pub p50: f64,
    pub p99: f64,
    /// Sum of durations: where the server's time went.
    pub total_time: f64,
    /// Share of requests with a 5xx status or no response at all (outcomes `error`,
    /// `aborted`, `no_response`).
    pub error_ratio: f64,
    pub mean_blocks: f64,
    pub mean_bytes: f64,
    /// Shares of `total_time`: the serving thread's CPU, downstream calls, GC, writing.
    /// They can overlap (GC is CPU time; a write can wait while on CPU) and need not sum to 1.
    pub cpu_share: f64,
    pub downstream_share: f64,
    pub gc_share: f64,
    pub write_share: f64,
}
