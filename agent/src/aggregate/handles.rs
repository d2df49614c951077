//! Handles on the series a request's record updates, kept per label set. Looking a series up in
//! its family builds the label set (an allocation per label) and hashes all of it (SipHash over
//! every label): ~16 such lookups per record were ~40 % of the agent's CPU under load. A handle
//! is a clone of the family's metric, sharing its value, looked up once per label set; a record
//! then costs a lookup of its route, method and (worker, status). The families still own the
//! series: a route's handles are dropped when its series are removed (`forget_route`).
use std::{collections::HashMap, sync::atomic::AtomicU64};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use crate::{labels::Labels, metrics::Metrics, reconstruct::Status};

type SecondsCounter = Counter<f64, AtomicU64>;

/// The series of one (route, method, worker if per-worker, status).
pub(super) struct RequestSeries {
    /// Labelled by route, method (worker) and status.
    pub requests: Counter,
    pub duration: Histogram,
    /// The label set without the status, which the series below and the per-request downstream
    /// series carry.
    pub by_route: Labels,
    pub write_seconds: Histogram,
    pub blocks: Histogram,
    pub write_calls: Counter,
    pub partial_writes: Counter,
    pub bytes: Histogram,
    pub request_gc: Histogram,
    /// Made at the first request with a CPU time (a kernel without the CPU clock has none).
    pub cpu: Option<Histogram>,
}

/// The series labelled by the route alone (and the service), made when first needed: a route
/// that never shows the pathology they count has none.
pub(super) struct RouteSeries {
    pub labels: Labels,
    pub small_blocks: Option<Counter>,
    pub slow_clients: Option<Counter>,
    pub memory_growth: Option<Histogram>,
}

/// The per-slot series a record updates.
pub(super) struct WorkerSeries {
    pub requests: Counter,
    pub blocks: Counter,
    pub bytes: Counter,
    pub write_seconds: SecondsCounter,
    pub cpu: SecondsCounter,
    pub busy: SecondsCounter,
}

impl WorkerSeries {
    /// The slot's series (`labels`), made now if they are not yet.
    pub fn new(m: &Metrics, labels: &Labels) -> Self {
        WorkerSeries {
            requests: m.worker_requests.get_or_create(labels).clone(),
            blocks: m.worker_blocks.get_or_create(labels).clone(),
            bytes: m.worker_bytes.get_or_create(labels).clone(),
            write_seconds: m.worker_write_seconds.get_or_create(labels).clone(),
            cpu: m.worker_cpu.get_or_create(labels).clone(),
            busy: m.worker_busy.get_or_create(labels).clone(),
        }
    }
}

impl RequestSeries {
    /// The series of `by_status` (whose labels without the last, the status, are `by_route`).
    pub fn new(m: &Metrics, by_status: &Labels, by_route: Labels) -> Self {
        RequestSeries {
            requests: m.requests.get_or_create(by_status).clone(),
            duration: m.duration.get_or_create(by_status).clone(),
            write_seconds: m.write_seconds.get_or_create(&by_route).clone(),
            blocks: m.blocks.get_or_create(&by_route).clone(),
            write_calls: m.write_calls.get_or_create(&by_route).clone(),
            partial_writes: m.partial_writes.get_or_create(&by_route).clone(),
            bytes: m.bytes.get_or_create(&by_route).clone(),
            request_gc: m.request_gc.get_or_create(&by_route).clone(),
            cpu: None,
            by_route,
        }
    }
}

/// A route's handles.
pub(super) struct RouteHandles {
    pub route: RouteSeries,
    /// By method, then by (worker slot if per-worker series, status).
    pub requests: HashMap<String, HashMap<(Option<usize>, Status), RequestSeries>>,
}

/// Every route's handles, and every slot's.
#[derive(Default)]
pub(super) struct Handles {
    pub routes: HashMap<String, RouteHandles>,
    pub workers: HashMap<usize, WorkerSeries>,
}

impl Handles {
    /// The series of `route` are gone from their families: its handles go too (a later request
    /// makes new series).
    pub fn forget_route(&mut self, route: &str) {
        self.routes.remove(route);
    }
}
