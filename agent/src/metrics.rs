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
const DOWNSTREAM_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const CALLS_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0];
const CPU_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// 0 first: requests that did not grow their worker are the `le="0"` bucket.
const GROWTH_BUCKETS: &[f64] = &[0.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0, 268435456.0, 1073741824.0];
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

/// Declares every metric once: its field, type, constructor, name and help text.
macro_rules! metrics {
    ($buckets:ident => $($field:ident: $ty:ty = $ctor:expr, $name:literal, $help:literal;)*) => {
        pub struct Metrics {
            pub registry: Registry,
            $(pub $field: $ty,)*
        }

        impl Metrics {
            pub fn with_buckets($buckets: &BucketConfig) -> Self {
                let mut registry = Registry::default();
                $(
                    let $field: $ty = $ctor;
                    // Counters get their `_total` suffix from the client library.
                    registry.register($name, $help, $field.clone());
                )*
                Metrics { registry, $($field),* }
            }
        }
    };
}

metrics! { buckets =>
    requests: Family<Labels, Counter> = Family::default(),
        "wsgi_requests", "Requests served, by route and status";
    duration: Histograms = Family::new_with_constructor(Buckets::new(&buckets.latency)),
        "wsgi_request_duration_seconds", "First request byte read to last response byte written";
    write_seconds: Histograms = Family::new_with_constructor(Buckets::new(WRITE_BUCKETS)),
        "wsgi_response_write_seconds", "Time inside write-family syscalls of the response";
    blocks: Histograms = Family::new_with_constructor(Buckets::new(&buckets.blocks)),
        "wsgi_response_blocks", "Application blocks per response (server framing writes excluded)";
    write_calls: Family<Labels, Counter> = Family::default(),
        "wsgi_response_write_calls", "Write-family syscalls on the client socket, headers and framing included";
    partial_writes: Family<Labels, Counter> = Family::default(),
        "wsgi_response_partial_writes", "Of the write calls, those that continued a partial write (the reader did not keep up)";
    bytes: Histograms = Family::new_with_constructor(Buckets::new(&buckets.bytes)),
        "wsgi_response_bytes", "Bytes written to the client socket per response";
    cpu: Histograms = Family::new_with_constructor(Buckets::new(CPU_BUCKETS)),
        "wsgi_request_cpu_seconds", "CPU time (user + system) of the serving thread from the first request byte read to the last response byte written";
    worker_requests: Family<Labels, Counter> = Family::default(),
        "wsgi_worker_requests", "Requests served by a worker slot";
    worker_blocks: Family<Labels, Counter> = Family::default(),
        "wsgi_worker_response_blocks", "Application blocks written by a worker slot";
    worker_bytes: Family<Labels, Counter> = Family::default(),
        "wsgi_worker_response_bytes", "Bytes written to client sockets by a worker slot";
    worker_write_seconds: Family<Labels, Counter<f64, AtomicU64>> = Family::default(),
        "wsgi_worker_response_write_seconds", "Time a worker slot spent inside write-family syscalls";
    worker_cpu: Family<Labels, Counter<f64, AtomicU64>> = Family::default(),
        "wsgi_worker_cpu_seconds", "CPU time a worker slot's serving threads spent on requests";
    worker_info: Family<Labels, Gauge> = Family::default(),
        "wsgi_worker_info", "Process currently holding a worker slot (value 1)";
    workers: Family<Labels, Gauge> = Family::default(),
        "wsgi_workers", "Worker processes alive";
    worker_busy: Family<Labels, Counter<f64, AtomicU64>> = Family::default(),
        "wsgi_worker_busy_seconds", "Time a worker slot had a request in progress (summed over threads); rate() is utilization";
    worker_active: Family<Labels, Gauge> = Family::default(),
        "wsgi_worker_active_requests", "Requests in progress on a worker slot";
    worker_oldest: Family<Labels, Gauge<f64, AtomicU64>> = Family::default(),
        "wsgi_worker_oldest_request_seconds", "Age of the oldest request in progress on a worker slot (0 when idle)";
    worker_exits: Family<Labels, Counter> = Family::default(),
        "wsgi_worker_exits", "Worker exits by cause: recycled (clean exit), killed (SIGKILL/SIGABRT, e.g. a timeout), crashed";
    accept_wait: Histograms = Family::new_with_constructor(Buckets::new(ACCEPT_WAIT_BUCKETS)),
        "wsgi_accept_wait_seconds", "TCP connection established to accepted by a worker: time queued waiting for a free worker";
    small_blocks: Family<Labels, Counter> = Family::default(),
        "wsgi_small_block_responses", "Responses of many tiny blocks (a str/bytes returned as the iterable, or tiny yields)";
    slow_clients: Family<Labels, Counter> = Family::default(),
        "wsgi_slow_client_responses", "Responses whose write time was more than half their duration and whose writes slept waiting for room (the reader was slow)";
    lost_events: Family<Labels, Counter> = Family::default(),
        "wsgiscope_lost_events", "Requests the kernel side could not record (ring buffer or connection table full)";
    map_entries: Family<Labels, Gauge> = Family::default(),
        "wsgiscope_kernel_map_entries", "Entries in the kernel maps: connections tracked, syscalls in flight, processes traced";
    unparsed: Family<Labels, Counter> = Family::default(),
        "wsgiscope_unparsed_requests", "Traffic on a server socket that was not an HTTP request";
    gc_pause: Histograms = Family::new_with_constructor(Buckets::new(GC_BUCKETS)),
        "wsgi_gc_pause_seconds", "CPython garbage-collection pauses of a worker slot, by generation";
    request_gc: Histograms = Family::new_with_constructor(Buckets::new(GC_BUCKETS)),
        "wsgi_request_gc_seconds", "Garbage-collection time of the worker that fell inside each request";
    memory_growth: Histograms = Family::new_with_constructor(Buckets::new(GROWTH_BUCKETS)),
        "wsgi_request_memory_growth_bytes", "Growth of the worker's resident memory (RSS) across each request; a shrink counts as 0, so _sum / _count is the mean growth per request";
    route_overflow: Family<Labels, Counter> = Family::default(),
        "wsgiscope_route_overflow", "Requests counted as route=\"other\" because their route has no place under the cap (--max-routes; client errors earn no place)";
    route_evictions: Family<Labels, Counter> = Family::default(),
        "wsgiscope_route_evictions", "Routes that lost their place under the cap to a route requested more often (their series stay, frozen, until --max-routes more are evicted)";
    truncated: Family<Labels, Counter> = Family::default(),
        "wsgiscope_truncated_requests", "Requests counted as route=\"other\" because their path was not captured whole (a request head longer than the kernel keeps) or is longer than 256 bytes";
    downstream_duration: Histograms = Family::new_with_constructor(Buckets::new(DOWNSTREAM_BUCKETS)),
        "wsgi_downstream_duration_seconds", "Downstream calls made by workers during requests (PostgreSQL, MySQL, Redis, HTTP, tls, other): first byte written to last response byte read";
    request_downstream_seconds: Histograms = Family::new_with_constructor(Buckets::new(DOWNSTREAM_BUCKETS)),
        "wsgi_request_downstream_seconds", "Per request, time in downstream calls of one protocol (requests that made such calls)";
    request_downstream_calls: Histograms = Family::new_with_constructor(Buckets::new(CALLS_BUCKETS)),
        "wsgi_request_downstream_calls", "Per request, downstream calls of one protocol (requests that made such calls)";
    repeated_calls: Family<Labels, Counter> = Family::default(),
        "wsgi_repeated_call_requests", "Requests that made --repeated-calls or more calls of one downstream operation (N+1 queries)";
    unattributed_calls: Family<Labels, Counter> = Family::default(),
        "wsgiscope_unattributed_calls", "Downstream calls not attributed to a request: outside_request (start-up, background threads), ambiguous (an event-loop worker with several requests in progress), late (the request's record was lost or never came)";
    operation_overflow: Family<Labels, Counter> = Family::default(),
        "wsgiscope_operation_overflow", "Downstream calls counted as operation=\"other\" or peer=\"other\" because the cap (--max-operations) was full";
    worker_memory: Family<Labels, Gauge> = Family::default(),
        "wsgi_worker_memory_bytes", "Memory of a worker slot's process (worker=\"master\": the master's) from /proc/PID/smaps_rollup, by kind: rss, pss, uss (private), shared, swap; read every --memory-every";
    worker_memory_shared: Family<Labels, Gauge<f64, AtomicU64>> = Family::default(),
        "wsgi_worker_memory_shared_ratio", "Share of a worker's resident memory that another process maps too (shared / rss): what copy-on-write still shares with the master and the other workers";
    memory_read_seconds: Counter<f64, AtomicU64> = Counter::default(),
        "wsgiscope_memory_read_seconds", "Time the agent spent reading /proc/PID/smaps_rollup (the kernel walks the page tables)";
    memory_reads: Counter = Counter::default(),
        "wsgiscope_memory_reads", "Reads of /proc/PID/smaps_rollup, of workers and masters";
    memory_read_failures: Counter = Counter::default(),
        "wsgiscope_memory_read_failures", "Reads of /proc/PID/smaps_rollup refused or failed for a process still alive (permissions: the process has no memory series)";
    relayed: Family<Labels, Counter> = Family::default(),
        "wsgiscope_relayed_requests", "Requests seen on a front-end process (e.g. the uWSGI HTTP router); its workers count them";
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

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
