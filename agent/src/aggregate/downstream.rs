//! Downstream calls into series: every call by protocol, peer, operation and outcome; per
//! request, the time and calls per protocol; requests that repeat one operation (N+1).
use log::warn;

use super::{Aggregator, OTHER_ROUTE};
use crate::{
    downstream::{Attribution, DownCall, RequestCalls},
    labels::{label, Labels},
};

/// `reason` values of `wsgiscope_unattributed_calls_total`.
const UNATTRIBUTED: [&str; 3] = ["outside_request", "ambiguous", "late"];

impl Aggregator<'_> {
    /// The series that exist from the start (counters a dashboard reads as 0).
    pub(super) fn downstream_series(&self) {
        for reason in UNATTRIBUTED {
            let _ = self.metrics.unattributed_calls.get_or_create(&self.unattributed_labels(reason));
        }
        let _ = self.metrics.operation_overflow.get_or_create(&self.service_labels());
    }

    fn unattributed_labels(&self, reason: &str) -> Labels {
        let mut l = self.service_labels();
        l.push(label("reason", reason.to_string()));
        l
    }

    /// `value` if it holds (or gets) one of the `max_operations` places of its kind, else
    /// `other` (counted).
    fn capped(&mut self, value: &str, peer: bool) -> String {
        let max = self.options.max_operations;
        let set = if peer { &mut self.peers } else { &mut self.operations };
        if set.contains(value) || (set.len() < max && set.insert(value.to_string())) {
            return value.to_string();
        }
        self.metrics.operation_overflow.get_or_create(&self.service_labels()).inc();
        OTHER_ROUTE.to_string()
    }

    /// One downstream call. Calls made outside any request (start-up, background threads) are
    /// only counted as such; those of an event loop's requests count though no request gets them.
    pub fn call(&mut self, c: &DownCall, attribution: Attribution) {
        match attribution {
            Attribution::Request(_) => {}
            Attribution::OutsideRequest => return self.unattributed("outside_request", 1),
            Attribution::Ambiguous => self.unattributed("ambiguous", 1),
        }
        let operation = self.capped(&c.operation, false);
        let peer = self.capped(&c.peer, true);
        let mut l = self.service_labels();
        l.extend([
            label("protocol", c.protocol.as_str().to_string()),
            label("peer", peer),
            label("operation", operation),
            label("outcome", c.outcome.as_str().to_string()),
        ]);
        self.metrics.downstream_duration.get_or_create(&l).observe(c.seconds);
    }

    /// Calls that could not be attributed to a request, by `reason`.
    pub fn unattributed(&mut self, reason: &str, calls: u64) {
        if calls > 0 {
            self.metrics.unattributed_calls.get_or_create(&self.unattributed_labels(reason)).inc_by(calls);
        }
    }

    /// The calls of one request (labelled like its other series: `by_route`, `route_only`).
    pub(super) fn request_calls(
        &mut self,
        route: &str,
        capped: bool,
        by_route: &Labels,
        route_only: &Labels,
        calls: &RequestCalls,
    ) {
        let m = self.metrics;
        for (protocol, (n, seconds)) in &calls.by_protocol {
            let mut l = by_route.clone();
            l.push(label("protocol", protocol.as_str().to_string()));
            m.request_downstream_seconds.get_or_create(&l).observe(*seconds);
            m.request_downstream_calls.get_or_create(&l).observe(*n as f64);
            if capped {
                self.route_series.entry(route.to_string()).or_default()[3].insert(l);
            }
        }
        let Some((protocol, operation, n)) = calls.most_repeated() else { return };
        if n < self.options.repeated_calls {
            return;
        }
        let mut l = route_only.clone();
        l.push(label("protocol", protocol.as_str().to_string()));
        m.repeated_calls.get_or_create(&l).inc();
        if capped {
            self.route_series.entry(route.to_string()).or_default()[3].insert(l);
        }
        if self.warned_repeats.insert(route.to_string()) {
            warn!(
                "route {route} made {n} {} calls of one operation in one request (N+1): {operation:?}. Fetch them \
                 in one call instead: a join or `IN (...)`/`= ANY(...)` query, a prefetch (select_related / \
                 prefetch_related, joinedload / selectinload), or MGET / a pipeline for Redis",
                protocol.as_str()
            );
        }
    }
}
