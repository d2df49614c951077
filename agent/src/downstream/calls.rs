//! The downstream calls of one server's workers, from kernel record to counted call: which
//! peer each downstream socket talks to, each socket's protocol state (prepared statements),
//! and the calls of each request until its own record arrives (the kernel emits a request's
//! calls before the request).
use std::collections::HashMap;

use wsgiscope_common::{CallEvent, Downstream, CALL_AMBIGUOUS, CALL_END_QUIET, CALL_REQ_LEN, CALL_RESP_LEN};

use super::protocol::{Connection, Outcome, Protocol};
use crate::sockets::Peer;

/// A call as the aggregator counts it.
#[derive(Clone, Debug, PartialEq)]
pub struct DownCall {
    pub protocol: Protocol,
    /// SQL template, Redis command, HTTP method… (not yet under the operations cap).
    pub operation: String,
    pub outcome: Outcome,
    /// `ip:port` or a UNIX path; `unknown` for a socket whose peer could not be read.
    pub peer: String,
    /// First byte written to last byte of the response read.
    pub seconds: f64,
    /// When it started (ns, CLOCK_MONOTONIC).
    pub start_ns: u64,
}

/// Which request a call belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribution {
    /// The request its thread was serving: `(tgid, client fd, request start)`.
    Request(RequestKey),
    /// Its thread was serving no request (start-up, a background thread, between requests).
    OutsideRequest,
    /// Its thread serves several requests at once (gevent, eventlet) and more than one was in
    /// progress: wsgiscope cannot tell which made the call.
    Ambiguous,
}

pub type RequestKey = (u32, u32, u64);

/// A round trip held for the next: the call, its attribution, whether it only prepared.
type Held = (DownCall, Attribution, bool);

/// The operation of handshake round trips.
const CONNECT: &str = "connect";

/// What one request's calls add up to.
#[derive(Debug, Default, PartialEq)]
pub struct RequestCalls {
    /// Per protocol: calls and seconds.
    pub by_protocol: HashMap<Protocol, (u64, f64)>,
    /// Per protocol and operation: calls (at most `MAX_OPERATIONS_PER_REQUEST` operations;
    /// the N+1 check looks for one that repeats).
    pub by_operation: HashMap<(Protocol, String), u64>,
    /// The calls themselves, in order, the first `CALLS_LISTED` (the live views list them)…
    pub list: Vec<DownCall>,
    /// …and how many more there were.
    pub not_listed: u64,
}

/// Calls listed per request (`RequestCalls::list`).
pub const CALLS_LISTED: usize = 100;

/// Distinct operations remembered per request for the N+1 check.
const MAX_OPERATIONS_PER_REQUEST: usize = 256;

impl RequestCalls {
    fn add(&mut self, c: &DownCall) {
        let e = self.by_protocol.entry(c.protocol).or_default();
        e.0 += 1;
        e.1 += c.seconds;
        let key = (c.protocol, c.operation.clone());
        let n = self.by_operation.len();
        match self.by_operation.get_mut(&key) {
            Some(v) => *v += 1,
            None if n < MAX_OPERATIONS_PER_REQUEST => {
                self.by_operation.insert(key, 1);
            }
            None => {}
        }
        if self.list.len() < CALLS_LISTED {
            self.list.push(c.clone());
        } else {
            self.not_listed += 1;
        }
    }

    /// Calls in all.
    pub fn calls(&self) -> u64 {
        self.by_protocol.values().map(|(n, _)| n).sum()
    }

    /// The operation made most often, with its protocol and count.
    pub fn most_repeated(&self) -> Option<(Protocol, &str, u64)> {
        self.by_operation.iter().max_by_key(|(_, n)| **n).map(|((p, op), n)| (*p, op.as_str(), *n))
    }
}

#[derive(Default)]
pub struct Calls {
    peers: HashMap<(u32, u32), String>,
    connections: HashMap<(u32, u32), Connection>,
    /// Round trips held per socket to be counted with the next (one call, as the application
    /// sees it): a PostgreSQL prepare with the execute that follows it, and the round trips of a
    /// connection handshake (SSL request, startup, authentication) with each other.
    held: HashMap<(u32, u32), Held>,
    /// Calls of requests whose record has not arrived yet, and when the request started.
    waiting: HashMap<RequestKey, RequestCalls>,
    /// Calls of no request read from the kernel's table while quiet, by socket: their start.
    /// Counted then, so the kernel's own record of the same call (when the socket is used
    /// again) is not counted twice.
    quiet: HashMap<(u32, u32), u64>,
}

impl Calls {
    /// Socket `fd` of `tgid` is connected to `peer` (from a connect record, or found at attach).
    pub fn connected(&mut self, tgid: u32, fd: u32, peer: Option<&Peer>) {
        let name = peer.map_or_else(|| "unknown".to_string(), Peer::to_string);
        self.peers.insert((tgid, fd), name);
        // A new connection on a reused fd starts with no protocol state.
        self.connections.remove(&(tgid, fd));
        self.held.remove(&(tgid, fd));
    }

    /// Reads a call record: the calls it completes (none while a prepare waits for its
    /// execute; two when a held prepare turns out to have none), each with the request it is
    /// attributed to (whose calls it joins until `take`).
    pub fn call(&mut self, ev: &CallEvent) -> Vec<(DownCall, Attribution)> {
        let sock = (ev.tgid, ev.fd);
        let from_table = ev.end_reason == CALL_END_QUIET;
        match self.quiet.get(&sock) {
            Some(&start) if start == ev.call.start_ns => {
                if !from_table {
                    self.quiet.remove(&sock); // the kernel's record of a call counted already
                }
                return Vec::new();
            }
            Some(_) => {
                self.quiet.remove(&sock);
            }
            None => {}
        }
        if from_table {
            self.quiet.insert(sock, ev.call.start_ns);
        }
        let (mut call, attribution, prepare_only) = self.read(ev);
        let mut done = Vec::new();
        if let Some((held, held_attribution, held_prepare)) = self.held.remove(&sock) {
            let folds = held_attribution == attribution
                && held.operation == call.operation
                && (held_prepare || call.operation == CONNECT);
            if folds {
                // One call from the first round trip's first byte to the last one's last byte.
                let end_ns = call.start_ns + (call.seconds * 1e9).round() as u64;
                call.seconds = end_ns.saturating_sub(held.start_ns) as f64 / 1e9;
                call.start_ns = held.start_ns;
                if held.outcome == Outcome::Error {
                    call.outcome = Outcome::Error;
                }
            } else {
                done.push(self.attribute(held, held_attribution));
            }
        }
        if !from_table && (prepare_only || call.operation == CONNECT) {
            self.held.insert(sock, (call, attribution, prepare_only));
        } else {
            done.push(self.attribute(call, attribution));
        }
        done
    }

    /// Round trips still held for request `key` (its record arrived: nothing follows them).
    fn release(&mut self, key: RequestKey) -> Vec<(DownCall, Attribution)> {
        let socks: Vec<(u32, u32)> = self
            .held
            .iter()
            .filter(|(_, (_, a, _))| *a == Attribution::Request(key))
            .map(|(s, _)| *s)
            .collect();
        let mut out = Vec::new();
        for s in socks {
            if let Some((call, attribution, _)) = self.held.remove(&s) {
                out.push(self.attribute(call, attribution));
            }
        }
        out
    }

    /// A call joins the calls waiting for its request.
    fn attribute(&mut self, call: DownCall, attribution: Attribution) -> (DownCall, Attribution) {
        if let Attribution::Request(key) = attribution {
            self.waiting.entry(key).or_default().add(&call);
        }
        (call, attribution)
    }

    /// The call in a record, its attribution, and whether it only prepared a statement.
    fn read(&mut self, ev: &CallEvent) -> (DownCall, Attribution, bool) {
        let a = &ev.call;
        let request = &ev.req_head[..(a.req_len as usize).min(CALL_REQ_LEN)];
        let response = &ev.resp_head[..(a.resp_len as usize).min(CALL_RESP_LEN)];
        let cut = a.write_bytes > a.req_len as u64;
        let sock = (ev.tgid, ev.fd);
        let classified = self.connections.entry(sock).or_default().classify(request, cut, response);
        let call = DownCall {
            protocol: classified.protocol,
            operation: classified.operation,
            outcome: classified.outcome,
            peer: self.peers.get(&sock).cloned().unwrap_or_else(|| "unknown".to_string()),
            seconds: a.end_ns.saturating_sub(a.start_ns) as f64 / 1e9,
            start_ns: a.start_ns,
        };
        let attribution = if a.flags & CALL_AMBIGUOUS != 0 {
            Attribution::Ambiguous
        } else if a.req_start_ns == 0 {
            Attribution::OutsideRequest
        } else {
            Attribution::Request((ev.tgid, a.req_fd, a.req_start_ns))
        };
        (call, attribution, classified.commands == 0)
    }

    /// The calls of request `key`, now that its record arrived, and the round trips held for
    /// it until now (counted as calls from here).
    pub fn take(&mut self, key: RequestKey) -> (RequestCalls, Vec<(DownCall, Attribution)>) {
        let released = self.release(key);
        (self.waiting.remove(&key).unwrap_or_default(), released)
    }

    /// Forgets an exited process; returns how many calls were waiting for requests that will
    /// never be recorded.
    pub fn exited(&mut self, tgid: u32) -> u64 {
        self.peers.retain(|k, _| k.0 != tgid);
        self.connections.retain(|k, _| k.0 != tgid);
        self.held.retain(|k, _| k.0 != tgid);
        self.quiet.retain(|k, _| k.0 != tgid);
        self.drop_waiting(|k| k.0 == tgid)
    }

    /// Drops calls waiting for requests that started before `before_ns` (their record was lost
    /// or was not a request); returns how many calls that was.
    pub fn expire(&mut self, before_ns: u64) -> u64 {
        self.drop_waiting(|k| k.2 < before_ns)
    }

    /// Drops the calls waiting for the requests `gone` picks; returns how many calls that was.
    fn drop_waiting(&mut self, gone: impl Fn(&RequestKey) -> bool) -> u64 {
        let mut lost = 0;
        self.waiting.retain(|k, v| {
            if gone(k) {
                lost += v.calls();
                return false;
            }
            true
        });
        lost
    }

    /// What a call still in progress on socket `fd` of `tgid` is (its protocol, operation and
    /// peer), from the request bytes the kernel captured so far. The socket's protocol state
    /// is not changed: the call is read again when it ends.
    pub fn in_progress(&self, tgid: u32, fd: u32, d: &Downstream) -> DownCall {
        let a = &d.call;
        let request = &d.req_head[..(a.req_len as usize).min(CALL_REQ_LEN)];
        let sock = (tgid, fd);
        let mut conn = self.connections.get(&sock).cloned().unwrap_or_default();
        let c = conn.classify(request, a.write_bytes > a.req_len as u64, &[]);
        DownCall {
            protocol: c.protocol,
            operation: c.operation,
            outcome: c.outcome,
            peer: self.peers.get(&sock).cloned().unwrap_or_else(|| "unknown".to_string()),
            seconds: 0.0,
            start_ns: a.start_ns,
        }
    }

    /// Sockets whose peer is known, and requests with calls waiting.
    pub fn sizes(&self) -> (usize, usize) {
        (self.peers.len(), self.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsgiscope_common::{CallAgg, EventKind};

    fn event(fd: u32, req: &[u8], resp: &[u8], req_fd: u32, req_start_ns: u64, flags: u32) -> CallEvent {
        let mut e = CallEvent {
            kind: EventKind::Call as u32,
            end_reason: 1,
            tgid: 7,
            fd,
            root: 1,
            _pad: 0,
            call: CallAgg {
                start_ns: 1_000_000,
                end_ns: 1_500_000,
                req_start_ns,
                req_fd,
                tid: 7,
                write_bytes: req.len() as u64,
                read_bytes: resp.len() as u64,
                write_calls: 1,
                read_calls: 1,
                req_len: req.len() as u32,
                resp_len: resp.len() as u32,
                flags,
                _pad: 0,
            },
            req_head: [0; CALL_REQ_LEN],
            resp_head: [0; CALL_RESP_LEN],
        };
        e.req_head[..req.len()].copy_from_slice(req);
        e.resp_head[..resp.len()].copy_from_slice(resp);
        e
    }

    /// The same call 1 ms later.
    fn later(mut e: CallEvent) -> CallEvent {
        e.call.start_ns += 1_000_000;
        e.call.end_ns += 1_000_000;
        e
    }

    const GET: &[u8] = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";

    #[test]
    fn calls_join_their_request_with_peer_and_time() {
        let mut calls = Calls::default();
        calls.connected(7, 12, Some(&Peer::Unix("/tmp/redis.sock".into())));
        for _ in 0..3 {
            let [(c, a)] = calls.call(&event(12, GET, b"$1\r\nv\r\n", 5, 900, 0)).try_into().unwrap();
            assert_eq!(a, Attribution::Request((7, 5, 900)));
            assert_eq!((c.protocol, c.operation.as_str(), c.peer.as_str()), (Protocol::Redis, "GET", "/tmp/redis.sock"));
            assert!((c.seconds - 0.0005).abs() < 1e-12);
        }
        let (r, released) = calls.take((7, 5, 900));
        assert!(released.is_empty());
        assert_eq!(r.by_protocol[&Protocol::Redis].0, 3);
        assert_eq!(r.most_repeated(), Some((Protocol::Redis, "GET", 3)));
        assert_eq!(calls.take((7, 5, 900)).0, RequestCalls::default(), "taken once");
    }

    #[test]
    fn calls_outside_requests_or_ambiguous_are_not_attributed() {
        let mut calls = Calls::default();
        let [(c, a)] = calls.call(&event(12, GET, b"-ERR wrong\r\n", 0, 0, 0)).try_into().unwrap();
        assert_eq!((a, c.outcome, c.peer.as_str()), (Attribution::OutsideRequest, Outcome::Error, "unknown"));
        let [(_, a)] = calls.call(&event(12, GET, b"", 5, 900, CALL_AMBIGUOUS)).try_into().unwrap();
        assert_eq!(a, Attribution::Ambiguous);
        assert_eq!(calls.sizes().1, 0);
    }

    #[test]
    fn waiting_calls_are_bounded_by_exit_and_age() {
        let mut calls = Calls::default();
        calls.call(&event(12, GET, b"", 5, 900, 0));
        calls.call(&event(12, GET, b"", 6, 2_000, 0));
        assert_eq!(calls.expire(1_000), 1);
        assert_eq!(calls.exited(7), 1);
        assert_eq!(calls.sizes(), (0, 0));
    }

    fn pg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_prepare_round_trip_counts_with_its_execute() {
        let mut calls = Calls::default();
        let sql = b"SELECT name FROM items WHERE id = $1\0";
        // psycopg's automatic prepare: Parse "_pg3_0" + Sync, answered ParseComplete, ReadyForQuery.
        let prepare = [pg(b'P', &[b"_pg3_0\0".as_slice(), sql, &[0, 0]].concat()), pg(b'S', b"")].concat();
        assert!(calls.call(&event(12, &prepare, b"1\0\0\0\x04Z\0\0\0\x05I", 5, 900, 0)).is_empty());
        // Then Bind/Execute/Sync of the named statement.
        let bind = [pg(b'B', b"\0_pg3_0\0\0\0\0\0\0\0"), pg(b'E', b"\0\0\0\0\0"), pg(b'S', b"")].concat();
        let done = calls.call(&later(event(12, &bind, b"2\0\0\0\x04", 5, 900, 0)));
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].0.operation, "SELECT name FROM items WHERE id = ?");
        assert!((done[0].0.seconds - 0.0015).abs() < 1e-12, "first byte to last byte");
        assert_eq!(calls.take((7, 5, 900)).0.by_protocol[&Protocol::Postgres].0, 1);
    }

    #[test]
    fn a_handshake_is_one_call_counted_when_the_request_ends() {
        let mut calls = Calls::default();
        // psycopg: SSLRequest answered 'N', then the startup message answered AuthenticationOk…
        let ssl = [0, 0, 0, 8, 4, 210, 22, 47];
        let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0postgres\0\0");
        let len = startup.len() as u32;
        startup[..4].copy_from_slice(&len.to_be_bytes());
        assert!(calls.call(&event(12, &ssl, b"N", 5, 900, 0)).is_empty());
        assert!(calls.call(&later(event(12, &startup, b"R\0\0\0\x08\0\0\0\0", 5, 900, 0))).is_empty());
        let (r, released) = calls.take((7, 5, 900));
        assert_eq!(released.len(), 1, "{released:?}");
        assert_eq!((released[0].0.operation.as_str(), released[0].0.protocol), ("connect", Protocol::Postgres));
        assert!((released[0].0.seconds - 0.0015).abs() < 1e-12, "first byte to last byte");
        assert_eq!(r.by_protocol[&Protocol::Postgres].0, 1);
    }

    #[test]
    fn a_quiet_call_read_from_the_table_is_counted_once() {
        let mut calls = Calls::default();
        let mut quiet = event(12, GET, b"$1\r\nv\r\n", 0, 0, CALL_AMBIGUOUS);
        quiet.end_reason = CALL_END_QUIET;
        assert_eq!(calls.call(&quiet).len(), 1, "counted when found quiet");
        assert!(calls.call(&quiet).is_empty(), "found again at the next scan: not again");
        let mut kernel = quiet;
        kernel.end_reason = 1;
        assert!(calls.call(&kernel).is_empty(), "the kernel's record of it: not again");
        assert_eq!(calls.call(&later(kernel)).len(), 1, "the next call on the socket counts");
    }
}
