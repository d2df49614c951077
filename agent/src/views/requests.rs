//! The most recent requests of each service, as the X-View shows them: a bounded ring per
//! service, read by cursor. Every request that ends gets the next sequence number (across all
//! services); a reader that falls behind the ring is told how many records it missed.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use serde::{ser::SerializeStruct, Serialize, Serializer};

use crate::downstream::protocol::Protocol;

use super::api::API_VERSION;

/// Requests kept per service by default (`--ui-requests`).
pub const DEFAULT_KEPT: usize = 10_000;
/// Calls listed per request; the rest are counted (`calls_not_listed`).
pub const CALLS_LISTED: usize = 100;
/// Records per answer by default, and at most (a reader behind by more pages through `more`:
/// an answer of 1,000 requests of 100 calls each is ~15 MB of JSON).
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 1000;

/// A downstream call as kept, in 20 bytes (a request can list 100): its peer and operation
/// (capped labels) as ids of the shared strings, its times as f32 seconds (µs precision for a
/// call up to minutes into its request).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeptCall {
    pub peer: StrId,
    pub operation: StrId,
    /// From the request's start to the call's first byte (s).
    pub offset: f32,
    pub duration: f32,
    pub protocol: Protocol,
    pub ok: bool,
}

/// A request as kept: compact, the strings shared with every other request of its route.
#[derive(Clone, Debug, PartialEq)]
pub struct Kept {
    pub service: Arc<str>,
    pub route: Arc<str>,
    pub method: Arc<str>,
    pub status: Option<u16>,
    pub outcome: &'static str,
    pub worker: u32,
    pub pid: u32,
    /// First request byte read (ns, CLOCK_MONOTONIC).
    pub start_ns: u64,
    pub duration: f64,
    pub accept_wait: Option<f64>,
    pub blocks: u64,
    pub write_calls: u64,
    pub bytes: u64,
    pub write_time: f64,
    pub gc_time: f64,
    pub cpu_time: Option<f64>,
    pub memory_growth: Option<i64>,
    pub downstream_time: f64,
    pub calls: Box<[KeptCall]>,
    pub calls_not_listed: u64,
}

/// The id of a shared string (`Interner::id`).
pub type StrId = u32;

/// Strings shared between kept records, by reference or by id. Bounded: the labels they come
/// from are capped per service; past `MAX_INTERNED` (a backstop) a string is kept as its own
/// copy, or gets the id of `OVERFLOW`.
pub struct Interner {
    shared: HashSet<Arc<str>>,
    ids: HashMap<Arc<str>, StrId>,
    names: Vec<Arc<str>>,
}

const MAX_INTERNED: usize = 100_000;
/// What an id stands for once there are too many.
const OVERFLOW: &str = "other";

impl Default for Interner {
    fn default() -> Self {
        Interner { shared: HashSet::new(), ids: HashMap::from([(Arc::from(OVERFLOW), 0)]), names: vec![Arc::from(OVERFLOW)] }
    }
}

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.shared.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        if self.shared.len() < MAX_INTERNED {
            self.shared.insert(a.clone());
        }
        a
    }

    pub fn id(&mut self, s: &str) -> StrId {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        if self.names.len() >= MAX_INTERNED {
            return 0;
        }
        let a = self.get(s);
        let id = self.names.len() as StrId;
        self.names.push(a.clone());
        self.ids.insert(a, id);
        id
    }

    pub fn name(&self, id: StrId) -> &str {
        self.names.get(id as usize).map_or(OVERFLOW, |a| a)
    }
}

/// The rings of every service.
pub struct RequestLog {
    kept: usize,
    /// The `seq` the last record got (0: none yet).
    last_seq: u64,
    rings: HashMap<Arc<str>, VecDeque<(u64, Kept)>>,
}

impl RequestLog {
    /// `kept`: records per service (at least 1).
    pub fn new(kept: usize) -> Self {
        RequestLog { kept: kept.max(1), last_seq: 0, rings: HashMap::new() }
    }

    pub fn push(&mut self, r: Kept) -> u64 {
        self.last_seq += 1;
        let ring = self.rings.entry(r.service.clone()).or_default();
        if ring.len() >= self.kept {
            ring.pop_front();
        }
        ring.push_back((self.last_seq, r));
        self.last_seq
    }

    /// Records held in all.
    pub fn len(&self) -> usize {
        self.rings.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records after `since`, oldest first, at most `limit`, and what the page says of
    /// the rest. A cursor from the future (an agent that restarted) reads from the start.
    fn select(&self, since: u64, limit: usize) -> Selected<'_> {
        let since = if since > self.last_seq { 0 } else { since };
        let limit = limit.clamp(1, MAX_LIMIT);
        // Each ring is in seq order: the records after `since` are a tail of it.
        let tails: Vec<_> = self
            .rings
            .values()
            .map(|r| {
                let from = r.partition_point(|(s, _)| *s <= since);
                r.range(from..)
            })
            .collect();
        let held_after: u64 = tails.iter().map(|t| t.len() as u64).sum();
        let mut records: Vec<&(u64, Kept)> = tails.into_iter().flatten().collect();
        records.sort_unstable_by_key(|(s, _)| *s);
        let more = records.len() > limit;
        records.truncate(limit);
        Selected {
            cursor: records.last().map_or(self.last_seq, |(s, _)| *s),
            oldest: self.rings.values().filter_map(|r| r.front().map(|(s, _)| *s)).min().unwrap_or(self.last_seq + 1),
            // Every seq after `since` went to one record: those not held were dropped.
            missed: (self.last_seq - since) - held_after,
            more,
            records,
        }
    }

    /// The page as JSON, written straight from the kept records (no copy of them in between:
    /// a page of call-heavy requests would otherwise cost the agent its size several times).
    pub fn page_json(&self, since: u64, limit: usize, unix_of: impl Fn(u64) -> f64, strings: &Interner) -> String {
        let s = self.select(since, limit);
        let page = PageJson { s: &s, unix_of: &unix_of, strings };
        serde_json::to_string(&page).expect("a page serialises")
    }
}

struct Selected<'a> {
    cursor: u64,
    oldest: u64,
    missed: u64,
    more: bool,
    records: Vec<&'a (u64, Kept)>,
}

/// `RequestsPage`'s fields, in its order, from the kept records.
struct PageJson<'a, F> {
    s: &'a Selected<'a>,
    unix_of: &'a F,
    strings: &'a Interner,
}

impl<F: Fn(u64) -> f64> Serialize for PageJson<'_, F> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        struct Records<'a, F>(&'a PageJson<'a, F>);
        impl<F: Fn(u64) -> f64> Serialize for Records<'_, F> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let p = self.0;
                ser.collect_seq(p.s.records.iter().map(|(seq, k)| RecordJson { seq: *seq, k, unix_of: p.unix_of, strings: p.strings }))
            }
        }
        let mut m = ser.serialize_struct("RequestsPage", 6)?;
        m.serialize_field("api_version", &API_VERSION)?;
        m.serialize_field("cursor", &self.s.cursor)?;
        m.serialize_field("oldest", &self.s.oldest)?;
        m.serialize_field("missed", &self.s.missed)?;
        m.serialize_field("more", &self.s.more)?;
        m.serialize_field("requests", &Records(self))?;
        m.end()
    }
}

/// `RequestRecord`'s fields, in its order, from one kept record.
struct RecordJson<'a, F> {
    seq: u64,
    k: &'a Kept,
    unix_of: &'a F,
    strings: &'a Interner,
}

impl<F: Fn(u64) -> f64> Serialize for RecordJson<'_, F> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        struct Calls<'a>(&'a [KeptCall], &'a Interner);
        impl Serialize for Calls<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                ser.collect_seq(self.0.iter().map(|c| CallJson(c, self.1)))
            }
        }
        struct CallJson<'a>(&'a KeptCall, &'a Interner);
        impl Serialize for CallJson<'_> {
            fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let (c, strings) = (self.0, self.1);
                let mut m = ser.serialize_struct("CallRecord", 6)?;
                m.serialize_field("protocol", c.protocol.as_str())?;
                m.serialize_field("peer", strings.name(c.peer))?;
                m.serialize_field("operation", strings.name(c.operation))?;
                m.serialize_field("outcome", if c.ok { "ok" } else { "error" })?;
                m.serialize_field("offset", &(c.offset as f64))?;
                m.serialize_field("duration", &(c.duration as f64))?;
                m.end()
            }
        }
        let k = self.k;
        let start = (self.unix_of)(k.start_ns);
        let mut m = ser.serialize_struct("RequestRecord", 23)?;
        m.serialize_field("seq", &self.seq)?;
        m.serialize_field("service", &*k.service)?;
        m.serialize_field("route", &*k.route)?;
        m.serialize_field("method", &*k.method)?;
        m.serialize_field("status", &k.status)?;
        m.serialize_field("outcome", k.outcome)?;
        m.serialize_field("worker", &k.worker)?;
        m.serialize_field("pid", &k.pid)?;
        m.serialize_field("start", &start)?;
        m.serialize_field("end", &(start + k.duration))?;
        m.serialize_field("duration", &k.duration)?;
        m.serialize_field("accept_wait", &k.accept_wait)?;
        m.serialize_field("blocks", &k.blocks)?;
        m.serialize_field("write_calls", &k.write_calls)?;
        m.serialize_field("bytes", &k.bytes)?;
        m.serialize_field("write_time", &k.write_time)?;
        m.serialize_field("gc_time", &k.gc_time)?;
        m.serialize_field("cpu_time", &k.cpu_time)?;
        m.serialize_field("memory_growth", &k.memory_growth)?;
        m.serialize_field("downstream_time", &k.downstream_time)?;
        m.serialize_field("calls", &Calls(&k.calls, self.strings))?;
        m.serialize_field("calls_not_listed", &k.calls_not_listed)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::api::{CallRecord, RequestRecord, RequestsPage};

    fn kept(service: &str, route: &str) -> Kept {
        Kept {
            service: service.into(),
            route: route.into(),
            method: "GET".into(),
            status: Some(200),
            outcome: "ok",
            worker: 0,
            pid: 1,
            start_ns: 1_000_000_000,
            duration: 0.5,
            accept_wait: None,
            blocks: 1,
            write_calls: 1,
            bytes: 10,
            write_time: 0.0,
            gc_time: 0.0,
            cpu_time: Some(0.1),
            memory_growth: None,
            downstream_time: 0.0,
            calls: Box::new([]),
            calls_not_listed: 0,
        }
    }

    fn unix(ns: u64) -> f64 {
        ns as f64 / 1e9 + 100.0
    }

    impl RequestLog {
        /// The page as a reader gets it: the JSON, read back as the API's types.
        fn page_of(&self, since: u64, limit: usize, unix_of: impl Fn(u64) -> f64) -> RequestsPage {
            serde_json::from_str(&self.page_json(since, limit, unix_of, &Interner::default())).unwrap()
        }
    }

    #[test]
    fn pages_follow_the_cursor_across_services() {
        let mut log = RequestLog::new(10);
        for i in 0..5 {
            log.push(kept(if i % 2 == 0 { "a" } else { "b" }, &format!("/r{i}")));
        }
        let p = log.page_of(0, 3, unix);
        assert_eq!(p.requests.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((p.cursor, p.more, p.missed, p.oldest), (3, true, 0, 1));
        assert_eq!(p.requests[1].service, "b");
        assert_eq!((p.requests[0].start, p.requests[0].end), (101.0, 101.5));
        let p = log.page_of(p.cursor, 3, unix);
        assert_eq!(p.requests.iter().map(|r| r.route.as_str()).collect::<Vec<_>>(), ["/r3", "/r4"]);
        assert_eq!((p.cursor, p.more), (5, false));
        let p = log.page_of(5, 3, unix);
        assert!(p.requests.is_empty());
        assert_eq!(p.cursor, 5);
    }

    #[test]
    fn a_reader_behind_the_ring_is_told_what_it_missed() {
        let mut log = RequestLog::new(3);
        for i in 0..8 {
            log.push(kept("a", &format!("/r{i}")));
        }
        log.push(kept("b", "/x"));
        // Ring a holds 6..=8, ring b holds 9; 1..=5 were dropped.
        let p = log.page_of(0, 100, unix);
        assert_eq!(p.requests.iter().map(|r| r.seq).collect::<Vec<_>>(), [6, 7, 8, 9]);
        assert_eq!((p.missed, p.oldest), (5, 6));
        assert_eq!(log.page_of(4, 100, unix).missed, 1);
        assert_eq!(log.page_of(7, 100, unix).missed, 0);
        assert_eq!(log.len(), 4);
        // A cursor from an earlier agent (beyond the last seq) starts over.
        assert_eq!(log.page_of(1000, 100, unix).requests.len(), 4);
    }

    #[test]
    fn interned_strings_are_shared() {
        let mut i = Interner::default();
        let a = i.get("/users/{id}");
        let b = i.get("/users/{id}");
        assert!(Arc::ptr_eq(&a, &b));
        let id = i.id("SELECT ?");
        assert_eq!((i.id("SELECT ?"), i.name(id), i.name(9999)), (id, "SELECT ?", "other"));
    }

    #[test]
    fn the_json_reads_back_as_the_api_s_page() {
        let mut log = RequestLog::new(10);
        let mut strings = Interner::default();
        let (peer, op) = (strings.id("127.0.0.1:6379"), strings.id("GET"));
        let mut k = kept("a", "/r\"q\n");
        k.calls = Box::new([KeptCall { peer, operation: op, offset: 0.25, duration: 0.125, protocol: Protocol::Redis, ok: false }]);
        k.status = None;
        k.accept_wait = Some(0.5);
        log.push(k);
        log.push(kept("b", "/x"));
        let json = log.page_json(0, 1, unix, &strings);
        let page: RequestsPage = serde_json::from_str(&json).unwrap();
        assert_eq!((page.api_version, page.cursor, page.oldest, page.missed, page.more), (API_VERSION, 1, 1, 0, true));
        let want = RequestRecord {
            seq: 1,
            service: "a".into(),
            route: "/r\"q\n".into(),
            method: "GET".into(),
            status: None,
            outcome: "ok".into(),
            worker: 0,
            pid: 1,
            start: 101.0,
            end: 101.5,
            duration: 0.5,
            accept_wait: Some(0.5),
            blocks: 1,
            write_calls: 1,
            bytes: 10,
            write_time: 0.0,
            gc_time: 0.0,
            cpu_time: Some(0.1),
            memory_growth: None,
            downstream_time: 0.0,
            calls: vec![CallRecord {
                protocol: "redis".into(),
                peer: "127.0.0.1:6379".into(),
                operation: "GET".into(),
                outcome: "error".into(),
                offset: 0.25,
                duration: 0.125,
            }],
            calls_not_listed: 0,
        };
        assert_eq!(page.requests, [want]);
    }

    #[test]
    fn a_kept_call_is_small() {
        assert!(size_of::<KeptCall>() <= 20, "{}", size_of::<KeptCall>());
    }
}
