//! The downstream calls of one server's workers, from kernel record to counted call: which
//! peer each downstream socket talks to, each socket's protocol state (prepared statements),
//! and the calls of each request until its own record arrives (the kernel emits a request's
//! calls before the request).
use std::collections::HashMap;

use wsgiscope_common::{CallEvent, CALL_AMBIGUOUS, CALL_REQ_LEN, CALL_RESP_LEN};

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

/// What one request's calls add up to.
#[derive(Debug, Default, PartialEq)]
pub struct RequestCalls {
    /// Per protocol: calls and seconds.
    pub by_protocol: HashMap<Protocol, (u64, f64)>,
    /// Per protocol and operation: calls (at most `MAX_OPERATIONS_PER_REQUEST` operations;
    /// the N+1 check looks for one that repeats).
    pub by_operation: HashMap<(Protocol, String), u64>,
}

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
    /// Calls of requests whose record has not arrived yet, and when the request started.
    waiting: HashMap<RequestKey, RequestCalls>,
}

impl Calls {
    /// Socket `fd` of `tgid` is connected to `peer` (from a connect record, or found at attach).
    pub fn connected(&mut self, tgid: u32, fd: u32, peer: Option<&Peer>) {
        let name = peer.map_or_else(|| "unknown".to_string(), Peer::to_string);
        self.peers.insert((tgid, fd), name);
        // A new connection on a reused fd starts with no protocol state.
        self.connections.remove(&(tgid, fd));
    }

    /// Reads a call record: the call, and the request it is attributed to (whose calls it
    /// joins until `take`).
    pub fn call(&mut self, ev: &CallEvent) -> (DownCall, Attribution) {
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
        };
        let attribution = if a.flags & CALL_AMBIGUOUS != 0 {
            Attribution::Ambiguous
        } else if a.req_start_ns == 0 {
            Attribution::OutsideRequest
        } else {
            let key = (ev.tgid, a.req_fd, a.req_start_ns);
            self.waiting.entry(key).or_default().add(&call);
            Attribution::Request(key)
        };
        (call, attribution)
    }

    /// The calls of request `key`, now that its record arrived.
    pub fn take(&mut self, key: RequestKey) -> RequestCalls {
        self.waiting.remove(&key).unwrap_or_default()
    }

    /// Forgets an exited process; returns how many calls were waiting for requests that will
    /// never be recorded.
    pub fn exited(&mut self, tgid: u32) -> u64 {
        self.peers.retain(|k, _| k.0 != tgid);
        self.connections.retain(|k, _| k.0 != tgid);
        let mut lost = 0;
        self.waiting.retain(|k, v| {
            let keep = k.0 != tgid;
            if !keep {
                lost += v.by_protocol.values().map(|(n, _)| n).sum::<u64>();
            }
            keep
        });
        lost
    }

    /// Drops calls waiting for requests that started before `before_ns` (their record was lost
    /// or was not a request); returns how many calls that was.
    pub fn expire(&mut self, before_ns: u64) -> u64 {
        let mut lost = 0;
        self.waiting.retain(|k, v| {
            let keep = k.2 >= before_ns;
            if !keep {
                lost += v.by_protocol.values().map(|(n, _)| n).sum::<u64>();
            }
            keep
        });
        lost
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

    const GET: &[u8] = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";

    #[test]
    fn calls_join_their_request_with_peer_and_time() {
        let mut calls = Calls::default();
        calls.connected(7, 12, Some(&Peer::Unix("/tmp/redis.sock".into())));
        for _ in 0..3 {
            let (c, a) = calls.call(&event(12, GET, b"$1\r\nv\r\n", 5, 900, 0));
            assert_eq!(a, Attribution::Request((7, 5, 900)));
            assert_eq!((c.protocol, c.operation.as_str(), c.peer.as_str()), (Protocol::Redis, "GET", "/tmp/redis.sock"));
            assert!((c.seconds - 0.0005).abs() < 1e-12);
        }
        let r = calls.take((7, 5, 900));
        assert_eq!(r.by_protocol[&Protocol::Redis].0, 3);
        assert_eq!(r.most_repeated(), Some((Protocol::Redis, "GET", 3)));
        assert_eq!(calls.take((7, 5, 900)), RequestCalls::default(), "taken once");
    }

    #[test]
    fn calls_outside_requests_or_ambiguous_are_not_attributed() {
        let mut calls = Calls::default();
        let (c, a) = calls.call(&event(12, GET, b"-ERR wrong\r\n", 0, 0, 0));
        assert_eq!((a, c.outcome, c.peer.as_str()), (Attribution::OutsideRequest, Outcome::Error, "unknown"));
        let (_, a) = calls.call(&event(12, GET, b"", 5, 900, CALL_AMBIGUOUS));
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
}
