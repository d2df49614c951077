//! What the aggregator gives the live views: each request as it is counted (with the labels
//! /metrics counts it under), and the worker slots and route names of requests in progress.
use super::{Aggregator, MAX_ROUTE_LEN, OTHER_ROUTE};
use crate::{
    downstream::{protocol::Outcome, RequestCalls},
    reconstruct::{Request, Status},
    route::normalise,
    views::{requests::{Kept, KeptCall}, Views},
};

impl<'m> Aggregator<'m> {
    /// Keeps every request for the live views too.
    pub fn set_views(&mut self, views: &'m Views) {
        self.views = Some(views);
    }

    pub fn views(&self) -> Option<&'m Views> {
        self.views
    }

    /// The label a downstream operation or peer has on /metrics (`call` placed it already).
    pub(super) fn label_of<'a>(&self, value: &'a str, peer: bool) -> &'a str {
        let set = if peer { &self.peers } else { &self.operations };
        if set.contains(value) {
            value
        } else {
            OTHER_ROUTE
        }
    }

    /// The label a downstream operation or peer of a call in progress would have: its own if
    /// it holds a place or one is free, else `other` (decides nothing).
    pub fn label_now(&self, value: &str, peer: bool) -> String {
        let set = if peer { &self.peers } else { &self.operations };
        if set.contains(value) || set.len() < self.options.max_operations {
            value.to_string()
        } else {
            OTHER_ROUTE.to_string()
        }
    }

    /// The request as the live views keep it.
    pub(super) fn keep(&self, r: &Request, slot: usize, route: &str, calls: &RequestCalls) {
        let Some(v) = self.views else { return };
        let listed = calls
            .list
            .iter()
            .map(|c| KeptCall {
                protocol: c.protocol,
                peer: v.intern_id(self.label_of(&c.peer, true)),
                operation: v.intern_id(self.label_of(&c.operation, false)),
                ok: c.outcome == Outcome::Ok,
                offset: (c.start_ns.saturating_sub(r.start_ns) as f64 / 1e9) as f32,
                duration: c.seconds as f32,
            })
            .collect();
        let (status, outcome) = match r.status {
            Status::Code(c) => (Some(c), if c >= 500 { "error" } else { "ok" }),
            Status::Aborted => (None, "aborted"),
            Status::None => (None, "no_response"),
            Status::Unknown => (None, "unknown"),
        };
        v.request(Kept {
            service: v.intern(self.service()),
            route: v.intern(route),
            method: v.intern(&r.method),
            status,
            outcome,
            worker: slot as u32,
            pid: r.tgid,
            start_ns: r.start_ns,
            duration: r.duration,
            accept_wait: r.accept_wait,
            blocks: r.blocks,
            write_calls: r.write_calls,
            bytes: r.bytes,
            write_time: r.write_seconds,
            gc_time: r.gc_seconds,
            cpu_time: r.cpu_seconds,
            memory_growth: r.memory_growth,
            downstream_time: calls.by_protocol.values().fold(0.0, |sum, (_, s)| sum + s),
            calls: listed,
            calls_not_listed: calls.not_listed,
        });
    }

    /// Worker slots and the process holding each, by slot.
    pub fn workers_now(&self) -> Vec<(usize, u32)> {
        let mut w: Vec<(usize, u32)> = self.info.iter().map(|(s, (pid, _))| (*s, *pid)).collect();
        w.sort_unstable();
        w
    }

    pub fn slot_of(&self, pid: u32) -> Option<usize> {
        self.slots.slot_of(pid)
    }

    /// The route a request in progress would be counted under (decides nothing): a template's,
    /// else the normalised path if it holds a place under the cap or one is free, else `other`.
    pub fn route_now(&self, path: Option<&str>) -> String {
        let Some(path) = path.filter(|p| p.len() <= MAX_ROUTE_LEN) else { return OTHER_ROUTE.to_string() };
        if let Some(t) = self.options.templates.matching(path) {
            return t;
        }
        let route = normalise(path);
        if self.routes.would_own(&route) {
            route
        } else {
            OTHER_ROUTE.to_string()
        }
    }
}
