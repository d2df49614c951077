//! The metric contract: names, help texts, label sets and buckets of everything wsgiscope exports.
use std::sync::atomic::AtomicU64;

use std::sync::Arc;

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

pub use crate::labels::Labels;
type Histograms = Family<Labels, Histogram, Buckets>;

pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const WRITE_BUCKETS: &[f64] =
    &[0.00001, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];
pub const BLOCK_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0, 10_000.0, 100_000.0, 1_000_000.0];
pub const BYTE_BUCKETS: &[f64] = &[100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];
const GC_BUCKETS: &[f64] =
    &[0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
const ACCEPT_WAIT_BUCKETS: &[f64] =
    &[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Upper bounds of a histogram family's buckets.
#[derive(Clone, Debug)]
pub struct Buckets(Arc<[f64]>);

impl Buckets {
    pub fn new(bounds: &[f64]) -> Self {
        Buckets(bounds.into())
    }
}

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// The configurable bucket sets (`--latency-buckets`, `--blocks-buckets`, `--bytes-buckets`).
#[derive(Clone, Debug)]
pub struct BucketConfig {
    pub latency: Vec<f64>,
    pub blocks: Vec<f64>,
    pub bytes: Vec<f64>,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig { latency: LATENCY_BUCKETS.to_vec(), blocks: BLOCK_BUCKETS.to_vec(), bytes: BYTE_BUCKETS.to_vec() }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub duration: Histograms,
    pub write_seconds: Histograms,
    pub blocks: Histograms,
    pub write_calls: Family<Labels, Counter>,
    pub partial_writes: Family<Labels, Counter>,
    pub bytes: Histograms,
    pub worker_requests: Family<Labels, Counter>,
    pub worker_blocks: Family<Labels, Counter>,
    pub worker_bytes: Family<Labels, Counter>,
    pub worker_write_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    pub worker_info: Family<Labels, Gauge>,
    pub workers: Family<Labels, Gauge>,
    pub worker_busy: Family<Labels, Counter<f64, AtomicU64>>,
    pub worker_active: Family<Labels, Gauge>,
    pub worker_oldest: Family<Labels, Gauge<f64, AtomicU64>>,
    pub worker_exits: Family<Labels, Counter>,
    pub accept_wait: Histograms,
    pub small_blocks: Family<Labels, Counter>,
    pub route_overflow: Family<Labels, Counter>,
    pub truncated: Family<Labels, Counter>,
    pub route_evictions: Family<Labels, Counter>,
    pub gc_pause: Histograms,
    pub request_gc: Histograms,
    pub slow_clients: Family<Labels, Counter>,
    pub lost_events: Family<Labels, Counter>,
    pub map_entries: Family<Labels, Gauge>,
    pub unparsed: Family<Labels, Counter>,
    pub relayed: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_buckets(&BucketConfig::default())
    }

    pub fn with_buckets(b: &BucketConfig) -> Self {
        let latency = Buckets::new(&b.latency);
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            write_seconds: Family::new_with_constructor(Buckets::new(WRITE_BUCKETS)),
            blocks: Family::new_with_constructor(Buckets::new(&b.blocks)),
            write_calls: Family::default(),
            partial_writes: Family::default(),
            bytes: Family::new_with_constructor(Buckets::new(&b.bytes)),
            worker_requests: Family::default(),
            worker_blocks: Family::default(),
            worker_bytes: Family::default(),
            worker_write_seconds: Family::default(),
            worker_info: Family::default(),
            workers: Family::default(),
            worker_busy: Family::default(),
            worker_active: Family::default(),
            worker_oldest: Family::default(),
            worker_exits: Family::default(),
            accept_wait: Family::new_with_constructor(Buckets::new(ACCEPT_WAIT_BUCKETS)),
            small_blocks: Family::default(),
            route_overflow: Family::default(),
            truncated: Family::default(),
            route_evictions: Family::default(),
            gc_pause: Family::new_with_constructor(Buckets::new(GC_BUCKETS)),
            request_gc: Family::new_with_constructor(Buckets::new(GC_BUCKETS)),
            slow_clients: Family::default(),
            lost_events: Family::default(),
            map_entries: Family::default(),
            unparsed: Family::default(),
            relayed: Family::default(),
        };
        let mut r = Registry::default();
        // Counters get their `_total` suffix from the client library.
        r.register("wsgi_requests", "Requests served, by route and status", m.requests.clone());
        r.register(
            "wsgi_request_duration_seconds",
            "First request byte read to last response byte written",
            m.duration.clone(),
        );
        r.register(
            "wsgi_response_write_seconds",
            "Time inside write-family syscalls of the response",
            m.write_seconds.clone(),
        );
        r.register(
            "wsgi_response_blocks",
            "Application blocks per response (server framing writes excluded)",
            m.blocks.clone(),
        );
        r.register(
            "wsgi_response_write_calls",
            "Write-family syscalls on the client socket, headers and framing included",
            m.write_calls.clone(),
        );
        r.register(
            "wsgi_response_partial_writes",
            "Of the write calls, those that continued a partial write (the reader did not keep up)",
            m.partial_writes.clone(),
        );
        r.register("wsgi_response_bytes", "Bytes written to the client socket per response", m.bytes.clone());
        r.register("wsgi_worker_requests", "Requests served by a worker slot", m.worker_requests.clone());
        r.register(
            "wsgi_worker_response_blocks",
            "Application blocks written by a worker slot",
            m.worker_blocks.clone(),
        );
        r.register(
            "wsgi_worker_response_bytes",
            "Bytes written to client sockets by a worker slot",
            m.worker_bytes.clone(),
        );
        r.register(
            "wsgi_worker_response_write_seconds",
            "Time a worker slot spent inside write-family syscalls",
            m.worker_write_seconds.clone(),
        );
        r.register("wsgi_worker_info", "Process currently holding a worker slot (value 1)", m.worker_info.clone());
        r.register("wsgi_workers", "Worker processes alive", m.workers.clone());
        r.register(
            "wsgi_worker_busy_seconds",
            "Time a worker slot had a request in progress (summed over threads); rate() is utilization",
            m.worker_busy.clone(),
        );
        r.register("wsgi_worker_active_requests", "Requests in progress on a worker slot", m.worker_active.clone());
        r.register(
            "wsgi_worker_oldest_request_seconds",
            "Age of the oldest request in progress on a worker slot (0 when idle)",
            m.worker_oldest.clone(),
        );
        r.register(
            "wsgi_worker_exits",
            "Worker exits by cause: recycled (clean exit), killed (SIGKILL/SIGABRT, e.g. a timeout), crashed",
            m.worker_exits.clone(),
        );
        r.register(
            "wsgi_accept_wait_seconds",
            "TCP connection established to accepted by a worker: time queued waiting for a free worker",
            m.accept_wait.clone(),
        );
        r.register(
            "wsgi_small_block_responses",
            "Responses of many tiny blocks (a str/bytes returned as the iterable, or tiny yields)",
            m.small_blocks.clone(),
        );
        r.register(
            "wsgi_slow_client_responses",
            "Responses whose write time was more than half their duration (the reader was slow)",
            m.slow_clients.clone(),
        );
        r.register(
            "wsgiscope_lost_events",
            "Requests the kernel side could not record (ring buffer or connection table full)",
            m.lost_events.clone(),
        );
        r.register(
            "wsgiscope_kernel_map_entries",
            "Entries in the kernel maps: connections tracked, syscalls in flight, processes traced",
            m.map_entries.clone(),
        );
        r.register(
            "wsgiscope_unparsed_requests",
            "Traffic on a server socket that was not an HTTP request",
            m.unparsed.clone(),
        );
        r.register(
            "wsgi_gc_pause_seconds",
            "CPython garbage-collection pauses of a worker slot, by generation",
            m.gc_pause.clone(),
        );
        r.register(
            "wsgi_request_gc_seconds",
            "Garbage-collection time of the worker that fell inside each request",
            m.request_gc.clone(),
        );
        r.register(
            "wsgiscope_route_overflow",
            "Requests counted as route=\"other\" because their route has no place under the cap (--max-routes; client errors earn no place)",
            m.route_overflow.clone(),
        );
        r.register(
            "wsgiscope_route_evictions",
            "Routes that lost their place under the cap to a route requested more often (their series stay, frozen, until --max-routes more are evicted)",
            m.route_evictions.clone(),
        );
        r.register(
            "wsgiscope_truncated_requests",
            "Requests counted as route=\"other\" because their path was not captured whole (a request head longer than the kernel keeps) or is longer than 256 bytes",
            m.truncated.clone(),
        );
        r.register(
            "wsgiscope_relayed_requests",
            "Requests seen on a front-end process (e.g. the uWSGI HTTP router); its workers count them",
            m.relayed.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The value of one series in exposition `text` (0 when absent): for tests and logs.
    pub fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
