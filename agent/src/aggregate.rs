//! Aggregate: reconstructed requests into per-route and per-worker series. Workers hold stable
//! slots (lowest free number, freed on exit) so series survive worker recycling.
use std::collections::{HashMap, HashSet};

use wsgiscope_common::{STAT_CONN_TABLE_FULL, STAT_COUNT, STAT_PENDING_TABLE_FULL, STAT_RINGBUF_FULL};

use crate::{
    metrics::{Labels, Metrics},
    reconstruct::Request,
};

/// Stable worker slots: a new worker takes the lowest free slot; an exiting one frees it.
#[derive(Default, Debug)]
pub struct Slots {
    holders: Vec<Option<u32>>,
    by_pid: HashMap<u32, usize>,
}

impl Slots {
    /// The slot of `pid`, assigning the lowest free one if it has none. `true` if newly assigned.
    pub fn assign(&mut self, pid: u32) -> (usize, bool) {
        if let Some(&s) = self.by_pid.get(&pid) {
            return (s, false);
        }
        let s = match self.holders.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.holders.push(None);
                self.holders.len() - 1
            }
        };
        self.holders[s] = Some(pid);
        self.by_pid.insert(pid, s);
        (s, true)
    }

    pub fn release(&mut self, pid: u32) -> Option<usize> {
        let s = self.by_pid.remove(&pid)?;
        self.holders[s] = None;
        Some(s)
    }

    pub fn in_use(&self) -> usize {
        self.by_pid.len()
    }
}

/// Routes beyond this many distinct values per service are reported as `other`.
pub const DEFAULT_MAX_ROUTES: usize = 500;

/// What `wsgi_worker_info` says of a worker: how requests reach it.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Wire {
    protocol: &'static str,
    transport: &'static str,
}

const UNKNOWN_WIRE: Wire = Wire { protocol: "unknown", transport: "unknown" };

pub struct Aggregator<'m> {
    metrics: &'m Metrics,
    service: String,
    server: String,
    per_worker: bool,
    max_routes: usize,
    routes: HashSet<String>,
    slots: Slots,
    /// The info series exported per slot: (pid, wire).
    info: HashMap<usize, (u32, Wire)>,
    /// How the last request reached a worker: what a worker that has not served yet is assumed
    /// to speak (all workers of a server share its sockets).
    wire: Wire,
    frontends: HashSet<u32>,
    kernel_seen: [u64; STAT_COUNT as usize],
}

impl<'m> Aggregator<'m> {
    pub fn new(metrics: &'m Metrics, service: &str, server: &str, per_worker: bool, max_routes: usize) -> Self {
        let a = Aggregator {
            metrics,
            service: service.to_string(),
            server: server.to_string(),
            per_worker,
            max_routes,
            routes: HashSet::new(),
            slots: Slots::default(),
            info: HashMap::new(),
            wire: UNKNOWN_WIRE,
            frontends: HashSet::new(),
            kernel_seen: [0; STAT_COUNT as usize],
        };
        a.metrics.workers.get_or_create(&a.service_labels()).set(0);
        for reason in ["ringbuf_full", "conn_table_full", "pending_table_full"] {
            let _ = a.metrics.lost_events.get_or_create(&vec![("reason", reason.to_string())]);
        }
        let _ = a.metrics.unparsed.get_or_create(&a.service_labels());
        let _ = a.metrics.relayed.get_or_create(&a.service_labels());
        a
    }

    fn service_labels(&self) -> Labels {
        vec![("service", self.service.clone())]
    }

    fn worker_labels(&self, slot: usize) -> Labels {
        vec![("service", self.service.clone()), ("worker", slot.to_string())]
    }

    fn info_labels(&self, slot: usize, pid: u32, wire: Wire) -> Labels {
        let mut l = self.worker_labels(slot);
        l.extend([
            ("pid", pid.to_string()),
            ("server", self.server.clone()),
            ("protocol", wire.protocol.to_string()),
            ("transport", wire.transport.to_string()),
        ]);
        l
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
            let w = self.worker_labels(slot);
            let _ = self.metrics.worker_requests.get_or_create(&w);
            let _ = self.metrics.worker_blocks.get_or_create(&w);
            let _ = self.metrics.worker_bytes.get_or_create(&w);
            let _ = self.metrics.worker_write_seconds.get_or_create(&w);
            self.metrics.workers.get_or_create(&self.service_labels()).set(self.slots.in_use() as i64);
        }
        Some(slot)
    }

    /// A worker process exited: its slot is free for the next worker.
    pub fn worker_exited(&mut self, pid: u32) {
        self.frontends.remove(&pid);
        if let Some(slot) = self.slots.release(pid) {
            if let Some((pid, wire)) = self.info.remove(&slot) {
                self.metrics.worker_info.remove(&self.info_labels(slot, pid, wire));
            }
            self.metrics.workers.get_or_create(&self.service_labels()).set(self.slots.in_use() as i64);
        }
    }

    fn route(&mut self, path: &str) -> String {
        if self.routes.contains(path) {
            return path.to_string();
        }
        if self.routes.len() >= self.max_routes {
            return "other".to_string();
        }
        self.routes.insert(path.to_string());
        path.to_string()
    }

    pub fn record(&mut self, r: &Request) {
        // A request is served by a worker: a process not seen fork takes a slot now.
        let slot = self.worker_started(r.tgid).unwrap_or_default();
        self.learn_wire(slot, r);
        let route = self.route(&r.path);
        let mut by_route: Labels =
            vec![("service", self.service.clone()), ("method", r.method.clone()), ("route", route)];
        if self.per_worker {
            by_route.push(("worker", slot.to_string()));
        }
        let mut by_status = by_route.clone();
        by_status.push(("status", r.status.clone()));
        let m = self.metrics;
        m.requests.get_or_create(&by_status).inc();
        m.duration.get_or_create(&by_status).observe(r.duration);
        m.write_seconds.get_or_create(&by_route).observe(r.write_seconds);
        m.blocks.get_or_create(&by_route).observe(r.blocks as f64);
        m.write_calls.get_or_create(&by_route).inc_by(r.write_calls);
        m.partial_writes.get_or_create(&by_route).inc_by(r.partial_writes);
        m.bytes.get_or_create(&by_route).observe(r.bytes as f64);
        let w = self.worker_labels(slot);
        m.worker_requests.get_or_create(&w).inc();
        m.worker_blocks.get_or_create(&w).inc_by(r.blocks);
        m.worker_bytes.get_or_create(&w).inc_by(r.bytes);
        m.worker_write_seconds.get_or_create(&w).inc_by(r.write_seconds);
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
        self.worker_exited(pid);
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

    /// Folds the kernel's loss counters (monotonic totals) into `wsgiscope_lost_events_total`.
    pub fn kernel_stats(&mut self, totals: [u64; STAT_COUNT as usize]) {
        for (stat, reason) in [
            (STAT_RINGBUF_FULL, "ringbuf_full"),
            (STAT_CONN_TABLE_FULL, "conn_table_full"),
            (STAT_PENDING_TABLE_FULL, "pending_table_full"),
        ] {
            let i = stat as usize;
            let delta = totals[i].saturating_sub(self.kernel_seen[i]);
            self.kernel_seen[i] = totals[i].max(self.kernel_seen[i]);
            if delta > 0 {
                self.metrics.lost_events.get_or_create(&vec![("reason", reason.to_string())]).inc_by(delta);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_reuse_the_lowest_free_number() {
        let mut s = Slots::default();
        assert_eq!(s.assign(100), (0, true));
        assert_eq!(s.assign(101), (1, true));
        assert_eq!(s.assign(102), (2, true));
        assert_eq!(s.assign(101), (1, false));
        assert_eq!(s.release(101), Some(1));
        assert_eq!(s.release(100), Some(0));
        assert_eq!(s.release(100), None);
        assert_eq!(s.assign(103), (0, true));
        assert_eq!(s.assign(104), (1, true));
        assert_eq!(s.assign(105), (3, true));
        assert_eq!(s.in_use(), 4);
    }

    fn request(path: &str, tgid: u32) -> Request {
        Request {
            tgid,
            protocol: crate::reconstruct::Protocol::Http,
            transport: crate::reconstruct::Transport::Tcp,
            client: None,
            method: "GET".into(),
            path: path.into(),
            status: "200".into(),
            duration: 0.05,
            write_seconds: 0.001,
            write_calls: 3,
            partial_writes: 0,
            blocks: 1,
            bytes: 100,
        }
    }

    #[test]
    fn requests_feed_route_and_worker_series() {
        let m = Metrics::new();
        let mut a = Aggregator::new(&m, "app", "gunicorn", false, 10);
        a.worker_started(7);
        a.record(&request("/a", 7));
        a.record(&request("/a", 7));
        a.record(&request("/b", 8));
        let text = m.encode();
        assert!(text.contains(r#"wsgi_requests_total{service="app",method="GET",route="/a",status="200"} 2"#), "{text}");
        assert!(text.contains(r#"wsgi_response_write_calls_total{service="app",method="GET",route="/b"} 3"#));
        assert!(text.contains(r#"wsgi_worker_requests_total{service="app",worker="0"} 2"#));
        assert!(text.contains(r#"wsgi_worker_requests_total{service="app",worker="1"} 1"#));
        let info = r#"wsgi_worker_info{service="app",worker="1",pid="8",server="gunicorn",protocol="http",transport="tcp"} 1"#;
        assert!(text.contains(info), "{text}");
        // Worker 0 was known before any request; the first request told how workers are reached.
        assert!(text.contains(r#"worker="0",pid="7",server="gunicorn",protocol="http",transport="tcp"} 1"#));
        assert!(!text.contains("unknown"));
        assert!(text.contains(r#"wsgi_workers{service="app"} 2"#));
        a.worker_exited(8);
        let text = m.encode();
        assert!(!text.contains(r#"pid="8""#));
        assert!(text.contains(r#"wsgi_workers{service="app"} 1"#));
        // The slot's counters survive the worker.
        assert!(text.contains(r#"wsgi_worker_requests_total{service="app",worker="1"} 1"#));
    }

    #[test]
    fn routes_beyond_the_cap_are_other() {
        let m = Metrics::new();
        let mut a = Aggregator::new(&m, "app", "gunicorn", false, 2);
        for p in ["/1", "/2", "/3", "/4", "/1"] {
            a.record(&request(p, 1));
        }
        let text = m.encode();
        assert!(text.contains(r#"route="/1",status="200"} 2"#), "{text}");
        assert!(text.contains(r#"route="other",status="200"} 2"#));
        assert!(!text.contains(r#"route="/3""#));
    }

    #[test]
    fn per_worker_option_adds_the_worker_label() {
        let m = Metrics::new();
        let mut a = Aggregator::new(&m, "app", "gunicorn", true, 10);
        a.record(&request("/a", 5));
        assert!(m.encode().contains(r#"wsgi_requests_total{service="app",method="GET",route="/a",worker="0",status="200"} 1"#));
    }

    #[test]
    fn kernel_losses_are_counted_once() {
        let m = Metrics::new();
        let mut a = Aggregator::new(&m, "app", "gunicorn", false, 10);
        a.kernel_stats([3, 0, 1]);
        a.kernel_stats([5, 0, 1]);
        let text = m.encode();
        assert!(text.contains(r#"wsgiscope_lost_events_total{reason="ringbuf_full"} 5"#), "{text}");
        assert!(text.contains(r#"wsgiscope_lost_events_total{reason="pending_table_full"} 1"#));
        assert!(text.contains(r#"wsgiscope_lost_events_total{reason="conn_table_full"} 0"#));
    }
}
