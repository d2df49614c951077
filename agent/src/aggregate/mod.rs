//! Aggregate: reconstructed requests into per-route and per-worker series. Workers hold stable
//! slots (lowest free number, freed on exit) so series survive worker recycling.
mod downstream;
mod handles;
mod live;
mod memory;

use std::collections::{HashMap, HashSet, VecDeque};

use log::warn;
use prometheus_client::metrics::histogram::Histogram;

use handles::{Handles, RequestSeries, RouteHandles, RouteSeries, WorkerSeries};

use crate::{
    downstream::RequestCalls,
    exits::ExitReason,
    labels::{label, Labels},
    metrics::Metrics,
    reconstruct::{Request, Status},
    record::InProgress,
    slots::Slots,
    views::Views,
    route::{normalise, Templates},
    route_cap::{Decision, RouteCap},
};

/// Block pathology: at least this many blocks in one response…
pub const SMALL_BLOCK_MIN_BLOCKS: u64 = 64;
/// …of fewer bytes than this on average.
pub const SMALL_BLOCK_MAX_MEAN: f64 = 16.0;
/// Slow client: write time above half the duration, and at least this much (a 1 MiB response
/// over loopback is all writing, but nobody waited).
const SLOW_CLIENT_MIN_WRITE: f64 = 0.001;
/// A keep-alive connection holds its request open until the next one: after this long without
/// a write, a request that has written is no longer counted as active.
const ACTIVE_AFTER_LAST_WRITE_NS: u64 = 1_000_000_000;

/// Identifies a request while it runs and when its record arrives: (tgid, fd, start).
type RequestKey = (u32, u32, u64);

/// Routes beyond this many distinct values per service are reported as `other`.
pub const DEFAULT_MAX_ROUTES: usize = 500;
/// Downstream operations (and peers) beyond this many per service are reported as `other`.
pub const DEFAULT_MAX_OPERATIONS: usize = 200;
/// Calls of one operation in one request that make it an N+1 request.
pub const DEFAULT_REPEATED_CALLS: u64 = 20;
/// The route of requests without a route of their own.
pub const OTHER_ROUTE: &str = "other";
/// Longest path given a route of its own (longer ones are `other`).
pub const MAX_ROUTE_LEN: usize = 256;

/// What `wsgi_worker_info` says of a worker: how requests reach it.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Wire {
    protocol: &'static str,
    transport: &'static str,
}

const UNKNOWN_WIRE: Wire = Wire { protocol: "unknown", transport: "unknown" };

/// How requests are counted: the same for every server the agent watches.
#[derive(Debug, Clone)]
pub struct Options {
    /// Add the worker slot to the per-request series.
    pub per_worker: bool,
    /// Distinct routes per service; the rest are `route="other"`.
    pub max_routes: usize,
    /// Distinct downstream operations, and peers, per service; the rest are `other`.
    pub max_operations: usize,
    /// Calls of one operation in one request that make it an N+1 request.
    pub repeated_calls: u64,
    pub templates: Templates,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            per_worker: false,
            max_routes: DEFAULT_MAX_ROUTES,
            max_operations: DEFAULT_MAX_OPERATIONS,
            repeated_calls: DEFAULT_REPEATED_CALLS,
            templates: Templates::default(),
        }
    }
}

pub struct Aggregator<'m> {
    metrics: &'m Metrics,
    /// `service` and, for a server in a Kubernetes pod, `namespace`, `pod`, `container`: the
    /// labels every series of this server starts with.
    base: Labels,
    server: String,
    /// `python_version` and `usdt` of `wsgi_worker_info`.
    python: (String, bool),
    options: Options,
    routes: RouteCap,
    /// The label sets created per automatic route: those with status, those by route, those
    /// with the route only, those with a downstream protocol (to remove its series).
    route_series: HashMap<String, [HashSet<Labels>; 4]>,
    /// Routes the cap evicted, oldest first: their series stay, frozen, until `max_routes` more
    /// have been evicted after them (so totals stay exact while memory stays bounded).
    retired: VecDeque<String>,
    slots: Slots,
    /// The info series exported per slot: (pid, wire).
    info: HashMap<usize, (u32, Wire)>,
    /// How the last request reached a worker: what a worker that has not served yet is assumed
    /// to speak (all workers of a server share its sockets).
    wire: Wire,
    frontends: HashSet<u32>,
    /// Busy seconds already credited to requests still in progress.
    busy_credited: HashMap<RequestKey, f64>,
    /// Requests in progress at the last scan.
    busy_seen: HashSet<RequestKey>,
    /// Routes whose small-block pathology was already logged.
    warned_routes: HashSet<String>,
    /// Downstream operations and peers holding a label of their own (first come).
    operations: HashSet<String>,
    peers: HashSet<String>,
    /// Routes whose N+1 calls were already logged.
    warned_repeats: HashSet<String>,
    /// The live views each request is also kept for (`--ui on`).
    views: Option<&'m Views>,
    /// Handles on the series records update (see `handles`).
    handles: Handles,
    /// `wsgi_accept_wait_seconds` of this server, once a request had one.
    accept_wait: Option<Histogram>,
}

impl<'m> Aggregator<'m> {
    /// `base`: the labels that identify the server (`service` first).
    pub fn new(metrics: &'m Metrics, base: Labels, server: &str, options: Options) -> Self {
        let a = Aggregator {
            metrics,
            base,
            server: server.to_string(),
            python: ("unknown".to_string(), false),
            routes: RouteCap::new(options.max_routes),
            route_series: HashMap::new(),
            retired: VecDeque::new(),
            options,
            slots: Slots::default(),
            info: HashMap::new(),
            wire: UNKNOWN_WIRE,
            frontends: HashSet::new(),
            busy_credited: HashMap::new(),
            busy_seen: HashSet::new(),
            warned_routes: HashSet::new(),
            operations: HashSet::new(),
            peers: HashSet::new(),
            warned_repeats: HashSet::new(),
            views: None,
            handles: Handles::default(),
            accept_wait: None,
        };
        for reason in ExitReason::ALL {
            let mut l = a.service_labels();
            l.push(label("reason", reason.as_str().to_string()));
            let _ = a.metrics.worker_exits.get_or_create(&l);
        }
        a.metrics.workers.get_or_create(&a.service_labels()).set(0);
        let _ = a.metrics.route_overflow.get_or_create(&a.service_labels());
        let _ = a.metrics.truncated.get_or_create(&a.service_labels());
        let _ = a.metrics.route_evictions.get_or_create(&a.service_labels());
        let _ = a.metrics.unparsed.get_or_create(&a.service_labels());
        let _ = a.metrics.relayed.get_or_create(&a.service_labels());
        a.downstream_series();
        a
    }

    pub fn service(&self) -> &str {
        self.base[0].1.as_str()
    }

    fn service_labels(&self) -> Labels {
        self.base.clone()
    }

    fn worker_labels(&self, slot: usize) -> Labels {
        let mut l = self.base.clone();
        l.push(label("worker", slot.to_string()));
        l
    }

    fn info_labels(&self, slot: usize, pid: u32, wire: Wire) -> Labels {
        let mut l = self.worker_labels(slot);
        l.extend([
            label("pid", pid.to_string()),
            label("server", self.server.clone()),
            label("protocol", wire.protocol.to_string()),
            label("transport", wire.transport.to_string()),
            label("python_version", self.python.0.clone()),
            label("usdt", self.python.1.to_string()),
        ]);
        l
    }

    /// The server's CPython version and whether its binary has USDT notes (before its workers
    /// are known: the info series carry it).
    pub fn set_python(&mut self, version: &str, usdt: bool) {
        self.python = (version.to_string(), usdt);
    }

    /// A garbage collection in a worker.
    pub fn gc_pause(&mut self, tgid: u32, generation: i32, seconds: f64) {
        let Some(slot) = self.slots.slot_of(tgid) else { return };
        let mut l = self.worker_labels(slot);
        let generation = if generation >= 0 { generation.to_string() } else { "unknown".to_string() };
        l.push(label("generation", generation));
        self.metrics.gc_pause.get_or_create(&l).observe(seconds);
    }

    /// Exports `wsgi_worker_info` for `slot` (replacing what it said before).
    fn set_info(&mut self, slot: usize, pid: u32, wire: Wire) {
        if let Some((old_pid, old)) = self.info.insert(slot, (pid, wire)) {
            if (old_pid, old) == (pid, wire) {
                return;
            }
            self.metrics.worker_info.remove(&self.info_labels(slot, old_pid, old));
        }
        self.metrics.worker_info.get_or_create(&self.info_labels(slot, pid, wire)).set(1);
    }

    /// A worker process appeared (found at attach, or forked).
    pub fn worker_started(&mut self, pid: u32) -> Option<usize> {
        if self.frontends.contains(&pid) {
            return None;
        }
        let (slot, new) = self.slots.assign(pid);
        if new {
            self.set_info(slot, pid, self.wire);
            // Per-worker counters exist from the start, at zero.
            let _ = self.worker_series(slot);
            let w = self.worker_labels(slot);
            self.metrics.worker_active.get_or_create(&w).set(0);
            self.metrics.worker_oldest.get_or_create(&w).set(0.0);
            self.metrics.workers.get_or_create(&self.service_labels()).set(self.slots.in_use() as i64);
        }
        Some(slot)
    }

    /// A worker process exited: its slot is free for the next worker. `true` if it held one.
    pub fn worker_exited(&mut self, pid: u32) -> bool {
        self.frontends.remove(&pid);
        let Some(slot) = self.slots.release(pid) else { return false };
        self.forget_memory(Some(slot));
        if let Some((pid, wire)) = self.info.remove(&slot) {
            self.metrics.worker_info.remove(&self.info_labels(slot, pid, wire));
        }
        let w = self.worker_labels(slot);
        self.metrics.worker_active.get_or_create(&w).set(0);
        self.metrics.worker_oldest.get_or_create(&w).set(0.0);
        self.metrics.workers.get_or_create(&self.service_labels()).set(self.slots.in_use() as i64);
        true
    }

    /// The route label: a template's, else the normalised path if the cap gives it a place
    /// (see `route_cap`), else `other`. A path the kernel did not capture whole, or longer than
    /// `MAX_ROUTE_LEN`, is `other` too, counted in `wsgiscope_truncated_requests_total`.
    /// Also whether the route holds a place under the cap (its series may be evicted).
    fn route(&mut self, r: &Request) -> (String, bool) {
        let Some(path) = r.path.as_deref().filter(|p| p.len() <= MAX_ROUTE_LEN) else {
            self.metrics.truncated.get_or_create(&self.service_labels()).inc();
            return (OTHER_ROUTE.to_string(), false);
        };
        if let Some(t) = self.options.templates.matching(path) {
            return (t, false);
        }
        let route = normalise(path);
        // Client errors (404 for a path that does not exist, 400, 405…) earn no place; a
        // success, a server error or an aborted request does: those are routes to name.
        let earns = !r.status.is_client_error();
        match self.routes.admit(&route, earns) {
            Decision::Own => (route, true),
            Decision::Replaced { evicted } => {
                self.retire(evicted, &route);
                (route, true)
            }
            Decision::Other => {
                self.metrics.route_overflow.get_or_create(&self.service_labels()).inc();
                (OTHER_ROUTE.to_string(), false)
            }
        }
    }

    /// `evicted` lost its place to `placed`: its series are kept, frozen, until `max_routes`
    /// more routes have been retired after it (then removed, bounding memory under a flood).
    fn retire(&mut self, evicted: String, placed: &str) {
        self.metrics.route_evictions.get_or_create(&self.service_labels()).inc();
        // A retired route that comes back continues its own series.
        self.retired.retain(|r| r != placed);
        self.retired.push_back(evicted);
        while self.retired.len() > self.options.max_routes {
            if let Some(oldest) = self.retired.pop_front() {
                self.remove_route(&oldest);
            }
        }
    }

    /// Removes every series of a route.
    fn remove_route(&mut self, route: &str) {
        let Some([by_status, by_route, route_only, with_protocol]) = self.route_series.remove(route) else { return };
        let m = self.metrics;
        for l in &by_status {
            m.requests.remove(l);
            m.duration.remove(l);
        }
        for l in &by_route {
            m.write_seconds.remove(l);
            m.blocks.remove(l);
            m.write_calls.remove(l);
            m.partial_writes.remove(l);
            m.bytes.remove(l);
            m.request_gc.remove(l);
            m.cpu.remove(l);
        }
        for l in &route_only {
            m.small_blocks.remove(l);
            m.slow_clients.remove(l);
            m.memory_growth.remove(l);
        }
        for l in &with_protocol {
            m.request_downstream_seconds.remove(l);
            m.request_downstream_calls.remove(l);
            m.repeated_calls.remove(l);
        }
        self.warned_repeats.remove(route);
        self.warned_routes.remove(route);
        self.handles.forget_route(route);
    }

    pub fn record(&mut self, r: &Request, calls: &RequestCalls) {
        // A request is served by a worker: a process not seen fork takes a slot now.
        let slot = self.worker_started(r.tgid).unwrap_or_default();
        self.learn_wire(slot, r);
        let (route, capped) = self.route(r);
        let m = self.metrics;
        let per_worker = self.options.per_worker.then_some(slot);
        let (route_series, s) = self.series(&route, capped, &r.method, per_worker, r.status);
        s.requests.inc();
        s.duration.observe(r.duration);
        s.write_seconds.observe(r.write_seconds);
        s.blocks.observe(r.blocks as f64);
        s.write_calls.inc_by(r.write_calls);
        s.partial_writes.inc_by(r.partial_writes);
        s.bytes.observe(r.bytes as f64);
        s.request_gc.observe(r.gc_seconds);
        if let Some(cpu) = r.cpu_seconds {
            s.cpu.get_or_insert_with(|| m.cpu.get_or_create(&s.by_route).clone()).observe(cpu);
        }
        let only = &route_series.labels;
        let small_blocks = r.blocks >= SMALL_BLOCK_MIN_BLOCKS && (r.bytes as f64 / r.blocks as f64) < SMALL_BLOCK_MAX_MEAN;
        if small_blocks {
            route_series.small_blocks.get_or_insert_with(|| m.small_blocks.get_or_create(only).clone()).inc();
        }
        if let Some(growth) = r.memory_growth {
            route_series.memory_growth.get_or_insert_with(|| m.memory_growth.get_or_create(only).clone()).observe(growth.max(0) as f64);
        }
        // Time in writes is wall time: a write preempted, or robbed by the hypervisor, on a
        // busy host is long too. Only one that slept waited on the client.
        if r.write_slept && r.write_seconds > r.duration / 2.0 && r.write_seconds >= SLOW_CLIENT_MIN_WRITE {
            route_series.slow_clients.get_or_insert_with(|| m.slow_clients.get_or_create(only).clone()).inc();
        }
        // The request's calls, if it made any (their series carry its labels).
        let labels = (!calls.by_operation.is_empty() || !calls.by_protocol.is_empty())
            .then(|| (s.by_route.clone(), route_series.labels.clone()));
        // Busy time: what the scans of requests in progress did not credit yet.
        let credited = self.busy_credited.remove(&(r.tgid, r.fd, r.start_ns)).unwrap_or(0.0);
        let w = self.worker_series(slot);
        w.requests.inc();
        w.blocks.inc_by(r.blocks);
        w.bytes.inc_by(r.bytes);
        w.write_seconds.inc_by(r.write_seconds);
        if let Some(cpu) = r.cpu_seconds {
            w.cpu.inc_by(cpu);
        }
        if r.duration > credited {
            w.busy.inc_by(r.duration - credited);
        }
        if let Some(wait) = r.accept_wait {
            let base = &self.base;
            self.accept_wait.get_or_insert_with(|| m.accept_wait.get_or_create(base).clone()).observe(wait);
        }
        if small_blocks && self.warned_routes.insert(route.clone()) {
            warn!(
                "route {} answered in {} blocks of {:.1} bytes on average: the application likely returns a \
                 str/bytes object as the response iterable (iterated one byte at a time) or a generator \
                 yielding tiny pieces; each block costs a write syscall. Return a list holding one bytes \
                 object (`return [body]`) or join the pieces before yielding",
                route,
                r.blocks,
                r.bytes as f64 / r.blocks as f64
            );
        }
        if let Some((by_route, route_only)) = labels {
            self.request_calls(&route, capped, &by_route, &route_only, calls);
        }
        self.keep(r, slot, &route, calls);
    }

    /// The series of a request on `route` (by `method`, worker `slot` if per-worker, `status`)
    /// and those of its route alone: handles made at the label set's first request, and for a
    /// capped route the label sets noted to remove them with it.
    fn series(
        &mut self,
        route: &str,
        capped: bool,
        method: &str,
        slot: Option<usize>,
        status: Status,
    ) -> (&mut RouteSeries, &mut RequestSeries) {
        let m = self.metrics;
        if !self.handles.routes.contains_key(route) {
            let mut labels = self.service_labels();
            labels.push(label("route", route.to_string()));
            if capped {
                self.route_series.entry(route.to_string()).or_default()[2].insert(labels.clone());
            }
            let route_series = RouteSeries { labels, small_blocks: None, slow_clients: None, memory_growth: None };
            self.handles.routes.insert(route.to_string(), RouteHandles { route: route_series, requests: HashMap::new() });
        }
        let key = (slot, status);
        let made = self.handles.routes[route].requests.get(method).is_some_and(|by| by.contains_key(&key));
        if !made {
            let mut by_route = self.service_labels();
            by_route.extend([label("method", method), label("route", route)]);
            if let Some(slot) = slot {
                by_route.push(label("worker", slot.to_string()));
            }
            let mut by_status = by_route.clone();
            by_status.push(label("status", status.to_string()));
            if capped {
                let sets = self.route_series.entry(route.to_string()).or_default();
                sets[0].insert(by_status.clone());
                sets[1].insert(by_route.clone());
            }
            let series = RequestSeries::new(m, &by_status, by_route);
            let handles = self.handles.routes.get_mut(route).expect("made above");
            handles.requests.entry(method.to_string()).or_default().insert(key, series);
        }
        let RouteHandles { route: route_series, requests } = self.handles.routes.get_mut(route).expect("made above");
        let series = requests.get_mut(method).and_then(|by| by.get_mut(&key)).expect("made above");
        (route_series, series)
    }

    /// Slot `slot`'s series.
    fn worker_series(&mut self, slot: usize) -> &mut WorkerSeries {
        if !self.handles.workers.contains_key(&slot) {
            let series = WorkerSeries::new(self.metrics, &self.worker_labels(slot));
            self.handles.workers.insert(slot, series);
        }
        self.handles.workers.get_mut(&slot).expect("made above")
    }

    /// The requests in progress now (a scan of the kernel's connection table): credits their
    /// busy time so far and sets the active-request and oldest-request gauges per worker.
    pub fn in_progress(&mut self, now_ns: u64, requests: &[InProgress]) {
        let mut active: HashMap<usize, (i64, f64)> = HashMap::new();
        let mut seen = HashSet::new();
        for r in requests {
            let Some(slot) = self.slots.slot_of(r.tgid) else { continue };
            let key = (r.tgid, r.fd, r.start_ns);
            seen.insert(key);
            // Busy until now while the app computes; until the last write once it has written
            // (a keep-alive request looks open until the next one).
            let end = if r.write_calls == 0 { now_ns } else { r.last_write_ns };
            let so_far = end.saturating_sub(r.start_ns) as f64 / 1e9;
            let credited = self.busy_credited.entry(key).or_insert(0.0);
            if so_far > *credited {
                let more = so_far - *credited;
                *credited = so_far;
                self.worker_series(slot).busy.inc_by(more);
            }
            if r.write_calls == 0 || now_ns.saturating_sub(r.last_write_ns) < ACTIVE_AFTER_LAST_WRITE_NS {
                let (n, oldest) = active.entry(slot).or_default();
                *n += 1;
                *oldest = oldest.max(now_ns.saturating_sub(r.start_ns) as f64 / 1e9);
            }
        }
        // A request gone from two scans in a row without its record (lost) is forgotten.
        let previous = std::mem::replace(&mut self.busy_seen, seen);
        let current = &self.busy_seen;
        self.busy_credited.retain(|k, _| current.contains(k) || previous.contains(k));
        let slots: Vec<usize> = self.info.keys().copied().collect();
        for slot in slots {
            let (n, oldest) = active.get(&slot).copied().unwrap_or_default();
            let w = self.worker_labels(slot);
            self.metrics.worker_active.get_or_create(&w).set(n);
            self.metrics.worker_oldest.get_or_create(&w).set(oldest);
        }
    }

    /// A worker exited and its master reaped it.
    pub fn worker_exit(&mut self, reason: ExitReason) {
        let mut l = self.service_labels();
        l.push(label("reason", reason.as_str().to_string()));
        self.metrics.worker_exits.get_or_create(&l).inc();
    }

    /// The request shows how requests reach its worker: correct that worker's info, and the
    /// others' while they still say `unknown`.
    fn learn_wire(&mut self, slot: usize, r: &Request) {
        let wire = Wire { protocol: r.protocol.as_str(), transport: r.transport.as_str() };
        if self.wire == UNKNOWN_WIRE {
            let unknown: Vec<(usize, u32)> =
                self.info.iter().filter(|(_, (_, w))| *w == UNKNOWN_WIRE).map(|(s, (p, _))| (*s, *p)).collect();
            for (s, pid) in unknown {
                self.set_info(s, pid, wire);
            }
        }
        self.wire = wire;
        if let Some(&(pid, old)) = self.info.get(&slot) {
            if old != wire {
                self.set_info(slot, pid, wire);
            }
        }
    }

    /// `pid` is a front end, not a worker: it holds no slot.
    pub fn front_end(&mut self, pid: u32) {
        let _ = self.worker_exited(pid);
        self.frontends.insert(pid);
    }

    /// A request relayed by a front-end process (counted where a worker serves it).
    pub fn relayed(&mut self, tgid: u32) {
        self.front_end(tgid);
        self.metrics.relayed.get_or_create(&self.service_labels()).inc();
    }

    /// Traffic that was not an HTTP request (binary, truncated, another protocol).
    pub fn unparsed(&mut self) {
        self.metrics.unparsed.get_or_create(&self.service_labels()).inc();
    }
}

#[cfg(test)]
mod tests;
