//! Reconstruct: turn one kernel request record (decoded by `record`) and what the session knows
//! of its process into a request — protocol, method, path, status, latency, write time, write
//! calls, application blocks, bytes, GC time. Pure parsing: nothing is patched afterwards.
pub mod framing;
pub mod http;
pub mod modwsgi;
pub mod uwsgi;

use std::fmt;

use wsgiscope_common::{RequestEvent, AGG_ACCEPT_WAIT, AGG_CPU, AGG_RSS, AGG_WRITE_SLEPT, END_PROCESS_EXIT, REQ_HEAD_LEN, RESP_HEAD_LEN};

use crate::server::ServerKind;

/// The protocol a request arrived in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Uwsgi,
    ModWsgi,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Uwsgi => "uwsgi",
            Protocol::ModWsgi => "modwsgi",
        }
    }
}

/// The socket a request arrived on, from its address family at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
    Unknown,
}

impl Transport {
    pub fn from_family(family: u16) -> Self {
        match family as i32 {
            libc::AF_INET | libc::AF_INET6 => Transport::Tcp,
            libc::AF_UNIX => Transport::Unix,
            _ => Transport::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
            Transport::Unknown => "unknown",
        }
    }
}

/// CGI request vars a front end passes (uwsgi packets, mod_wsgi requests): those wsgiscope uses.
#[derive(Debug, Default, PartialEq)]
pub struct Vars {
    pub method: Option<String>,
    pub script_name: Option<String>,
    pub path_info: Option<String>,
    pub request_uri: Option<String>,
    pub remote_addr: Option<String>,
    /// The var the kernel's capture cut off, and the part of its value it kept.
    pub cut: Option<(String, String)>,
}

impl Vars {
    pub fn set(&mut self, key: &str, val: String) {
        let slot = match key {
            "REQUEST_METHOD" => &mut self.method,
            "SCRIPT_NAME" => &mut self.script_name,
            "PATH_INFO" => &mut self.path_info,
            "REQUEST_URI" => &mut self.request_uri,
            "REMOTE_ADDR" => &mut self.remote_addr,
            _ => return,
        };
        *slot = Some(val);
    }

    /// The path the application sees (SCRIPT_NAME + PATH_INFO), else REQUEST_URI without query
    /// (also when the capture cut it inside its query string). `None` when neither was captured
    /// whole (e.g. a long QUERY_STRING came first, as nginx's `uwsgi_params` sends it).
    fn path(&self) -> Option<String> {
        if let Some(p) = &self.path_info {
            return Some(format!("{}{p}", self.script_name.as_deref().unwrap_or("")));
        }
        let before_query = |u: &str| u.split(['?', '#']).next().unwrap_or("").to_string();
        if let Some(u) = &self.request_uri {
            return Some(before_query(u));
        }
        match &self.cut {
            Some((k, u)) if k == "REQUEST_URI" && u.contains(['?', '#']) => Some(before_query(u)),
            _ => None,
        }
    }
}

/// A request head as far as it was captured.
#[derive(Debug, PartialEq)]
pub struct Head {
    pub protocol: Protocol,
    /// `GET`…, `OTHER` for a method outside the standard ones, `unknown` when not captured.
    pub method: String,
    /// Path without query; `None` when not captured whole (counted as `route="other"`).
    pub path: Option<String>,
    /// REMOTE_ADDR passed by a front end.
    pub client: Option<String>,
}

/// The method label when the capture did not reach it.
pub const UNKNOWN_METHOD: &str = "unknown";

/// The head of the `index`-th request of a record (pipelined requests share the first one's
/// captured bytes). `None`: not a request at all (binary traffic, another protocol).
pub fn parse_request_head(head: &[u8], index: u16) -> Option<Head> {
    let (protocol, vars) = if modwsgi::is_request(head) {
        (Protocol::ModWsgi, modwsgi::parse(head)?)
    } else if uwsgi::is_packet(head) {
        (Protocol::Uwsgi, uwsgi::parse(head)?)
    } else {
        let line = http::parse_pipelined(head, index)?;
        let (method, path) = line.map_or((UNKNOWN_METHOD.to_string(), None), |l| (l.method, l.path));
        return Some(Head { protocol: Protocol::Http, method, path, client: None });
    };
    let method = vars.method.as_deref().map_or(UNKNOWN_METHOD.to_string(), http::normalise_method);
    Some(Head { protocol, method, path: vars.path(), client: vars.remote_addr.clone() })
}

/// How a request ended, as far as its response shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The final status code of the response.
    Code(u16),
    /// Nothing was written (uWSGI closes silently when the application raises).
    None,
    /// Written, but no status line was recognised.
    Unknown,
    /// The worker died, or was sent SIGKILL/SIGABRT, while the request was in progress.
    Aborted,
}

impl Status {
    /// A client error (4xx): the path or request was bad (see `route_cap`).
    pub fn is_client_error(self) -> bool {
        matches!(self, Status::Code(400..=499))
    }
}

/// The `status` label value.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Code(c) => write!(f, "{c}"),
            Status::None => f.write_str("none"),
            Status::Unknown => f.write_str("unknown"),
            Status::Aborted => f.write_str("aborted"),
        }
    }
}

/// What the session knows about the request's process beyond its record.
#[derive(Clone, Copy, Default)]
pub struct Facts<'a> {
    /// When SIGKILL or SIGABRT was sent to the process, if it was.
    pub killed_at: Option<u64>,
    /// The process's recent garbage collections: (start, end) in ns.
    pub gcs: &'a [(u64, u64)],
}

/// One reconstructed request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub tgid: u32,
    /// The connection and start time: identify the request while it is in progress.
    pub fd: u32,
    pub start_ns: u64,
    pub protocol: Protocol,
    pub transport: Transport,
    /// REMOTE_ADDR passed by a front end (never exported as a label).
    pub client: Option<String>,
    pub method: String,
    /// Path without query string; `None` when the kernel's capture cut it off.
    pub path: Option<String>,
    pub status: Status,
    /// First request of a TCP connection: established → accepted (seconds).
    pub accept_wait: Option<f64>,
    /// First request byte read → last response byte written (seconds).
    pub duration: f64,
    /// Time inside write-family syscalls (seconds).
    pub write_seconds: f64,
    /// One of those calls slept: it waited on the client to read (not merely preempted).
    pub write_slept: bool,
    pub write_calls: u64,
    /// Of the write calls, continuations of a partial write (same block).
    pub partial_writes: u64,
    pub blocks: u64,
    pub bytes: u64,
    /// Garbage-collection time of its process that fell inside it (a collection stops every
    /// thread of the process).
    pub gc_seconds: f64,
    /// CPU time (user + system) of the serving thread from the first request byte read to the
    /// last response byte written; `None` when not measured.
    pub cpu_seconds: Option<f64>,
    /// The change of its process's resident memory from its start to its end (bytes; the
    /// kernel's batched per-mm counters), where measured.
    pub memory_growth: Option<i64>,
}

/// Bytes per page (the kernel counts resident memory in pages).
fn page_size() -> i64 {
    static SIZE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *SIZE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as i64)
}

/// The request in a kernel record, or `None` when its bytes are not a request.
pub fn reconstruct(kind: ServerKind, ev: &RequestEvent, facts: Facts<'_>) -> Option<Request> {
    let a = &ev.agg;
    let req_head = &ev.req_head[..(a.req_head_len as usize).min(REQ_HEAD_LEN)];
    let resp_head = &ev.resp_head[..(a.resp_head_len as usize).min(RESP_HEAD_LEN)];
    let Head { protocol, method, path, client } = parse_request_head(req_head, a.pipeline_index)?;
    // mod_wsgi's handshake precedes the response and is not part of it.
    let handshake = if protocol == Protocol::ModWsgi && resp_head.starts_with(modwsgi::HANDSHAKE) {
        modwsgi::HANDSHAKE.len()
    } else {
        0
    };
    // Interim responses (`100 Continue`) are not the response: skipped for status and blocks.
    let (code, interim) = match protocol {
        Protocol::ModWsgi => (modwsgi::parse_status(&resp_head[handshake..]), 0),
        _ => http::parse_status(resp_head),
    };
    // Without a response the request ends where the kernel ended it (close, exit).
    let end = if a.write_calls > 0 { a.last_write_ns } else { ev.end_ns };
    // In progress when its worker died, or was sent SIGKILL/SIGABRT: whatever the dying worker
    // wrote after (gunicorn's error page on its --timeout), the request was aborted.
    let killed = facts.killed_at.is_some_and(|k| a.start_ns <= k && k <= end);
    let status = match code {
        _ if ev.end_reason == END_PROCESS_EXIT || killed => Status::Aborted,
        Some(code) => Status::Code(code),
        None if a.write_calls == 0 => Status::None,
        None => Status::Unknown,
    };
    let gc_ns: u64 = facts.gcs.iter().map(|&(s, e)| e.min(end).saturating_sub(s.max(a.start_ns))).sum();
    Some(Request {
        tgid: ev.tgid,
        fd: ev.fd,
        start_ns: a.start_ns,
        protocol,
        transport: Transport::from_family(a.family),
        client,
        method,
        path,
        status,
        accept_wait: (a.flags & AGG_ACCEPT_WAIT != 0).then(|| a.accept_wait_ns as f64 / 1e9),
        duration: end.saturating_sub(a.start_ns) as f64 / 1e9,
        write_seconds: a.write_ns as f64 / 1e9,
        write_slept: a.flags & AGG_WRITE_SLEPT != 0,
        write_calls: a.write_calls as u64,
        partial_writes: a.continuations as u64,
        blocks: framing::app_blocks(kind, a, resp_head, interim),
        bytes: a.write_bytes.saturating_sub(handshake as u64),
        gc_seconds: gc_ns as f64 / 1e9,
        cpu_seconds: (a.flags & AGG_CPU != 0).then(|| a.cpu_end_ns.saturating_sub(a.cpu_start_ns) as f64 / 1e9),
        memory_growth: (a.flags & AGG_RSS != 0)
            .then(|| (a.rss_end_pages as i64 - a.rss_start_pages as i64) * page_size()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsgiscope_common::{EventKind, END_CLOSE};

    fn event(req: &[u8], resp: &[u8], calls: u32, last: &[u8]) -> RequestEvent {
        // SAFETY: RequestEvent is plain data; all zeroes is a valid value to fill in.
        let mut ev: RequestEvent = unsafe { std::mem::zeroed() };
        ev.kind = EventKind::Request as u32;
        ev.end_reason = END_CLOSE;
        ev.tgid = 42;
        ev.end_ns = 9_000_000_000;
        ev.agg.start_ns = 1_000_000_000;
        ev.agg.last_write_ns = 1_050_000_000;
        ev.agg.write_ns = 2_000_000;
        ev.agg.write_calls = calls;
        ev.agg.write_bytes = 1234;
        ev.agg.last_write_len = last.len() as u32;
        ev.agg.last_write_prefix[..last.len()].copy_from_slice(last);
        ev.agg.req_head_len = req.len() as u32;
        ev.req_head[..req.len()].copy_from_slice(req);
        ev.agg.resp_head_len = resp.len() as u32;
        ev.resp_head[..resp.len()].copy_from_slice(resp);
        ev
    }

    #[test]
    fn a_gunicorn_request_round_trips_through_the_ring_buffer_bytes() {
        let ev = event(b"GET /sleep?x=1 HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n", 3, b"0\r\n\r\n");
        // SAFETY: viewing a plain-data value as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&ev as *const RequestEvent).cast::<u8>(), size_of::<RequestEvent>())
        };
        let Some(crate::record::Event::Request(back)) = crate::record::decode(bytes) else { panic!("not decoded") };
        let r = reconstruct(ServerKind::Gunicorn, &back, Facts::default()).unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path.as_deref(), Some("/sleep"));
        assert_eq!(r.status, Status::Code(200));
        assert_eq!(r.blocks, 1);
        assert_eq!(r.write_calls, 3);
        assert_eq!(r.bytes, 1234);
        assert!((r.duration - 0.05).abs() < 1e-9);
        assert!((r.write_seconds - 0.002).abs() < 1e-9);
    }

    #[test]
    fn no_response_is_status_none_and_ends_at_close() {
        let ev = event(b"GET /x HTTP/1.1\r\n\r\n", b"", 0, b"");
        let r = reconstruct(ServerKind::Gunicorn, &ev, Facts::default()).unwrap();
        assert_eq!(r.status, Status::None);
        assert_eq!(r.status.to_string(), "none");
        assert!((r.duration - 8.0).abs() < 1e-9);
    }

    #[test]
    fn a_kill_inside_the_request_aborts_it_and_gc_inside_it_counts() {
        let ev = event(b"GET /x HTTP/1.1\r\n\r\n", b"HTTP/1.1 500 Internal\r\n", 1, b"");
        let gcs = [(900_000_000, 1_010_000_000), (1_020_000_000, 1_030_000_000), (2_000_000_000, 2_100_000_000)];
        let facts = Facts { killed_at: Some(1_040_000_000), gcs: &gcs };
        let r = reconstruct(ServerKind::Gunicorn, &ev, facts).unwrap();
        assert_eq!(r.status, Status::Aborted);
        assert!((r.gc_seconds - 0.02).abs() < 1e-9, "{}", r.gc_seconds);
        let later = Facts { killed_at: Some(1_060_000_000), gcs: &[] };
        assert_eq!(reconstruct(ServerKind::Gunicorn, &ev, later).unwrap().status, Status::Code(500));
    }

    #[test]
    fn binary_traffic_is_not_a_request() {
        let ev = event(b"\x00\x01\x02garbage", b"", 0, b"");
        assert_eq!(reconstruct(ServerKind::Gunicorn, &ev, Facts::default()), None);
    }
}
