//! The route cap: at most `--max-routes` automatic routes per service get a label of their own,
//! chosen so that noise cannot take the places of the routes that matter.
//!
//! - `--routes` templates always get their label and never count against the cap.
//! - A path gets a place only with a response that is not a client error (4xx): unknown paths
//!   that only ever answered 404 (a scanner), 400 or 405 share `route="other"`. A success, a
//!   server error or an aborted request earns one: a route that fails is one to name.
//! - When the cap is full, a new route waits as a candidate, counted. Once it has been
//!   requested more often than the least used route holding a place, it takes that place and
//!   the evicted route's series are removed (they reappear, from zero, if it comes back).
//!   Counts halve every [`DECAY_EVERY`], so routes used long ago give way to current ones.
//!
//! Requests not given a route of their own are counted as `route="other"`.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// How often every count is halved.
pub const DECAY_EVERY: Duration = Duration::from_secs(60);

/// What the cap decided for one request.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Counted under its own route.
    Own,
    /// Counted as `other`, because the route has no place (yet).
    Other,
    /// Counted under its own route, which took the place of `evicted`.
    Replaced { evicted: String },
}

#[derive(Debug)]
pub struct RouteCap {
    max: usize,
    /// Routes holding a place → requests (decayed).
    placed: HashMap<String, u64>,
    /// Routes waiting for a place → requests (decayed); at most `max` of them.
    candidates: HashMap<String, u64>,
    last_decay: Instant,
}

impl RouteCap {
    pub fn new(max: usize) -> Self {
        RouteCap { max, placed: HashMap::new(), candidates: HashMap::new(), last_decay: Instant::now() }
    }

    /// Would a request of `route` be counted under its own name now (it holds a place, or one
    /// is free)? Decides nothing.
    pub fn would_own(&self, route: &str) -> bool {
        self.placed.contains_key(route) || self.placed.len() < self.max
    }

    /// Decides for a request of `route`; `earns` a place (its response was no client error).
    pub fn admit(&mut self, route: &str, earns: bool) -> Decision {
        if self.last_decay.elapsed() >= DECAY_EVERY {
            self.decay();
        }
        if let Some(n) = self.placed.get_mut(route) {
            *n += 1;
            return Decision::Own;
        }
        if !earns || self.max == 0 {
            return Decision::Other;
        }
        if self.placed.len() < self.max {
            self.placed.insert(route.to_string(), 1);
            return Decision::Own;
        }
        let hits = self.count_candidate(route);
        let (least, least_hits) = self
            .placed
            .iter()
            .min_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.cmp(b.0)))
            .map(|(r, n)| (r.clone(), *n))
            .expect("the cap is full, so not empty");
        if hits <= least_hits {
            return Decision::Other;
        }
        self.placed.remove(&least);
        self.candidates.remove(route);
        self.placed.insert(route.to_string(), hits);
        Decision::Replaced { evicted: least }
    }

    /// One more request of a waiting route: its count.
    fn count_candidate(&mut self, route: &str) -> u64 {
        if !self.candidates.contains_key(route) && self.candidates.len() >= self.max {
            // Full of one-off paths (a scanner): forget those seen once, or else all.
            self.candidates.retain(|_, n| *n > 1);
            if self.candidates.len() >= self.max {
                self.candidates.clear();
            }
        }
        let n = self.candidates.entry(route.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    /// Halves every count (routes used long ago give way to current ones).
    pub fn decay(&mut self) {
        self.last_decay = Instant::now();
        for n in self.placed.values_mut() {
            *n /= 2;
        }
        self.candidates.retain(|_, n| {
            *n /= 2;
            *n > 0
        });
    }

    pub fn placed(&self) -> usize {
        self.placed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_never_take_a_place() {
        let mut cap = RouteCap::new(2);
        for i in 0..2000 {
            assert_eq!(cap.admit(&format!("/scan/{i}.php"), false), Decision::Other);
        }
        assert_eq!(cap.admit("/hello", true), Decision::Own);
        assert_eq!(cap.admit("/hello", false), Decision::Own, "a placed route keeps its errors");
        assert_eq!(cap.placed(), 1);
    }

    #[test]
    fn a_busy_route_displaces_one_off_noise() {
        let mut cap = RouteCap::new(3);
        // A scanner hits a catch-all route that answers 200: it fills the cap.
        for i in 0..2000 {
            let d = cap.admit(&format!("/page/{i}"), true);
            assert!(d == Decision::Own || d == Decision::Other, "{d:?}");
        }
        assert_eq!(cap.placed(), 3);
        // The first /hello waits; the second has been asked for more than any noise path.
        assert_eq!(cap.admit("/hello", true), Decision::Other);
        assert!(matches!(cap.admit("/hello", true), Decision::Replaced { .. }));
        for _ in 0..100 {
            assert_eq!(cap.admit("/hello", true), Decision::Own);
        }
        // More noise does not displace it.
        for i in 2000..4000 {
            assert_ne!(cap.admit(&format!("/page/{i}"), true), Decision::Own);
        }
        assert_eq!(cap.admit("/hello", true), Decision::Own);
    }

    #[test]
    fn old_routes_give_way_after_decay() {
        let mut cap = RouteCap::new(1);
        for _ in 0..8 {
            cap.admit("/old", true);
        }
        for _ in 0..4 {
            assert_eq!(cap.admit("/new", true), Decision::Other);
        }
        cap.decay(); // /old 4, /new 2
        cap.decay(); // /old 2, /new 1
        cap.decay(); // /old 1, /new 0 (forgotten)
        assert_eq!(cap.admit("/new", true), Decision::Other);
        assert_eq!(cap.admit("/new", true), Decision::Replaced { evicted: "/old".to_string() });
    }

    #[test]
    fn no_cap_means_everything_is_other() {
        let mut cap = RouteCap::new(0);
        assert_eq!(cap.admit("/a", true), Decision::Other);
    }
}
