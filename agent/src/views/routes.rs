//! Per-route figures over the last minute: every request that ended in it, kept compact, so
//! rates, exact quantiles and shares are computed when asked (`/api/routes`, once a second).
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use super::api::{RouteNow, Routes, API_VERSION};

/// The window.
pub const WINDOW_NS: u64 = 60_000_000_000;
/// Requests kept in the window per service; past it the oldest go first (and `window` says
/// how much time the rest cover).
pub const WINDOW_MAX: usize = 100_000;

/// One request, as the route table needs it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub route: Arc<str>,
    pub end_ns: u64,
    pub duration: f32,
    pub cpu: f32,
    pub downstream: f32,
    pub gc: f32,
    pub write: f32,
    pub blocks: u32,
    pub bytes: u32,
    /// A 5xx status or no response at all.
    pub error: bool,
}

pub struct Window {
    /// When the agent started counting (the window is shorter before a minute has passed).
    started_ns: u64,
    services: HashMap<Arc<str>, Service>,
}

/// One service's last minute, kept per route (so the table needs no grouping, and each
/// route's quantiles come from its own samples).
#[derive(Default)]
struct Service {
    routes: HashMap<Arc<str>, VecDeque<Sample>>,
    len: usize,
    /// End of the newest sample dropped for room, not age: the window covers only after it.
    dropped_until_ns: u64,
}

impl Service {
    fn expire(&mut self, now_ns: u64) {
        let from = now_ns.saturating_sub(WINDOW_NS);
        let mut dropped = 0;
        self.routes.retain(|_, q| {
            while q.front().is_some_and(|s| s.end_ns < from) {
                q.pop_front();
                dropped += 1;
            }
            !q.is_empty()
        });
        self.len -= dropped;
    }

    /// Drops the oldest sample of all routes (the window is full).
    fn drop_oldest(&mut self) {
        let oldest = self.routes.iter().filter_map(|(r, q)| Some((q.front()?.end_ns, r.clone()))).min_by_key(|(e, _)| *e);
        if let Some((end_ns, route)) = oldest {
            if let Some(q) = self.routes.get_mut(&route) {
                q.pop_front();
                if q.is_empty() {
                    self.routes.remove(&route);
                }
            }
            self.len -= 1;
            self.dropped_until_ns = self.dropped_until_ns.max(end_ns);
        }
    }
}

impl Window {
    pub fn new(started_ns: u64) -> Self {
        Window { started_ns, services: HashMap::new() }
    }

    pub fn push(&mut self, service: &Arc<str>, s: Sample) {
        let svc = self.services.entry(service.clone()).or_default();
        if svc.len >= WINDOW_MAX {
            svc.expire(s.end_ns);
            if svc.len >= WINDOW_MAX {
                svc.drop_oldest();
            }
        }
        svc.len += 1;
        let q = svc.routes.entry(s.route.clone()).or_default();
        // Expire this route's old samples as it goes (the others at the next table).
        let from = s.end_ns.saturating_sub(WINDOW_NS);
        while q.front().is_some_and(|o| o.end_ns < from) {
            q.pop_front();
            svc.len -= 1;
        }
        q.push_back(s);
    }

    /// Requests held in all.
    pub fn len(&self) -> usize {
        self.services.values().map(|s| s.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The route table at `now_ns`, by total time, longest first.
    pub fn routes(&mut self, now_ns: u64) -> Routes {
        let mut from = now_ns.saturating_sub(WINDOW_NS).max(self.started_ns);
        let mut out = Vec::new();
        let mut durations = Vec::new();
        for (service, svc) in &mut self.services {
            svc.expire(now_ns);
            from = from.max(svc.dropped_until_ns);
            for (route, samples) in &svc.routes {
                out.push((service.clone(), route.clone(), summarise(samples, &mut durations)));
            }
        }
        self.services.retain(|_, s| s.len > 0);
        // Over the span the samples cover (at least 1 s, so a first request is no spike).
        let window = (now_ns.saturating_sub(from) as f64 / 1e9).max(1.0);
        let mut routes: Vec<RouteNow> = out
            .into_iter()
            .map(|(service, route, f)| RouteNow {
                service: service.to_string(),
                route: route.to_string(),
                requests: f.requests,
                rate: f.requests as f64 / window,
                p50: f.p50,
                p99: f.p99,
                total_time: f.total,
                error_ratio: f.errors as f64 / f.requests as f64,
                mean_blocks: f.blocks / f.requests as f64,
                mean_bytes: f.bytes / f.requests as f64,
                cpu_share: share(f.cpu, f.total),
                downstream_share: share(f.downstream, f.total),
                gc_share: share(f.gc, f.total),
                write_share: share(f.write, f.total),
            })
            .collect();
        routes.sort_by(|a, b| b.total_time.total_cmp(&a.total_time).then_with(|| a.route.cmp(&b.route)));
        Routes { api_version: API_VERSION, window, routes }
    }
}

fn share(part: f64, total: f64) -> f64 {
    if total > 0.0 {
        part / total
    } else {
        0.0
    }
}

struct Figures {
    requests: u64,
    errors: u64,
    p50: f64,
    p99: f64,
    total: f64,
    cpu: f64,
    downstream: f64,
    gc: f64,
    write: f64,
    blocks: f64,
    bytes: f64,
}

fn summarise(samples: &VecDeque<Sample>, durations: &mut Vec<f32>) -> Figures {
    durations.clear();
    durations.extend(samples.iter().map(|s| s.duration));
    let sum = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>();
    Figures {
        requests: samples.len() as u64,
        errors: samples.iter().filter(|s| s.error).count() as u64,
        // p99 first: selecting it leaves the values below it unordered but in front, where p50 is.
        p99: quantile(durations, 0.99),
        p50: quantile(durations, 0.5),
        total: sum(|s| s.duration as f64),
        cpu: sum(|s| s.cpu as f64),
        downstream: sum(|s| s.downstream as f64),
        gc: sum(|s| s.gc as f64),
        write: sum(|s| s.write as f64),
        blocks: sum(|s| s.blocks as f64),
        bytes: sum(|s| s.bytes as f64),
    }
}

/// The nearest-rank quantile: the smallest value with at least `q` of them at or below it.
/// Selects in place (linear time, no sort); `values` is left reordered.
fn quantile(values: &mut [f32], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    *values.select_nth_unstable_by(rank - 1, f32::total_cmp).1 as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(route: &str, end_s: u64, duration: f32, error: bool) -> Sample {
        Sample {
            route: route.into(),
            end_ns: end_s * 1_000_000_000,
            duration,
            cpu: duration / 2.0,
            downstream: duration / 4.0,
            gc: 0.0,
            write: 0.0,
            blocks: 2,
            bytes: 100,
            error,
        }
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<f32> = (1..=100).rev().map(|i| i as f32).collect();
        assert_eq!((quantile(&mut v, 0.99), quantile(&mut v, 0.5), quantile(&mut v, 1.0)), (99.0, 50.0, 100.0));
        assert_eq!(quantile(&mut [7.0], 0.99), 7.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn routes_over_the_last_minute() {
        let svc: Arc<str> = "app".into();
        let mut w = Window::new(0);
        w.push(&svc, sample("/old", 10, 9.0, false)); // leaves the window
        for i in 0..10 {
            w.push(&svc, sample("/a", 100 + i, 0.1 * (i + 1) as f32, i == 9));
        }
        w.push(&svc, sample("/b", 110, 0.01, false));
        let r = w.routes(120_000_000_000);
        assert_eq!(r.window, 60.0);
        assert_eq!(r.routes.iter().map(|r| r.route.as_str()).collect::<Vec<_>>(), ["/a", "/b"]);
        let a = &r.routes[0];
        assert_eq!((a.requests, a.error_ratio, a.mean_blocks, a.mean_bytes), (10, 0.1, 2.0, 100.0));
        assert!((a.p50 - 0.5).abs() < 1e-6 && (a.p99 - 1.0).abs() < 1e-6, "{a:?}");
        assert!((a.total_time - 5.5).abs() < 1e-4 && (a.cpu_share - 0.5).abs() < 1e-6);
        assert!((a.rate - 10.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn a_young_or_capped_window_says_what_it_covers() {
        let svc: Arc<str> = "app".into();
        let mut w = Window::new(100_000_000_000);
        w.push(&svc, sample("/a", 110, 0.1, false));
        assert_eq!(w.routes(120_000_000_000).window, 20.0);
        for i in 0..WINDOW_MAX as u64 + 1 {
            w.push(&svc, sample("/a", 111 + i / 10_000, 0.1, false));
        }
        assert_eq!(w.len(), WINDOW_MAX);
        // The dropped samples ended at up to 111 s: the rest cover 121 - 111.
        let r = w.routes(121_000_000_000);
        assert_eq!(r.window, 10.0);
    }
}
