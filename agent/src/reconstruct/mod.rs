//! Reconstruct: turn one kernel request record into a request — protocol, method, route,
//! status, latency, write time, write calls, application blocks, bytes.
pub mod framing;
pub mod http;
pub mod modwsgi;
pub mod uwsgi;

use wsgiscope_common::{
    GcEvent, ProcessEvent, RequestEvent, AGG_ACCEPT_WAIT, END_PROCESS_EXIT, EVENT_EXEC, EVENT_EXIT, EVENT_FORK, EVENT_GC, EVENT_REAP, EVENT_REQUEST,
    EVENT_SIGNAL, REQ_HEAD_LEN, RESP_HEAD_LEN,
};

use crate::discover::ServerKind;

/// A record read from the ring buffer.
pub enum Event {
    Request(Box<RequestEvent>),
    /// `root`: the master the processes descend from (which server they belong to).
    Fork { parent: u32, child: u32, root: u32 },
    Exit { tgid: u32, root: u32 },
    /// SIGKILL or SIGABRT generated for a traced process, at `ts_ns`.
    Signal { tgid: u32, sig: i32, ts_ns: u64, root: u32 },
    /// `parent` reaped `child`; `status` as wait4 gives it.
    Reap { parent: u32, child: u32, status: i32, root: u32 },
    /// `wsgiscope daemon`: a process exec'd a WSGI server name and is traced from now on.
    Exec { pid: u32 },
    /// A garbage collection of generation `generation` (-1: unknown) in `tgid`.
    Gc { tgid: u32, root: u32, generation: i32, start_ns: u64, end_ns: u64 },
}

/// Decodes one ring-buffer record; `None` for a record of unknown kind or size.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        EVENT_REQUEST if bytes.len() >= size_of::<RequestEvent>() => {
            // SAFETY: size checked; RequestEvent is plain data valid for any bytes.
            let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RequestEvent>()) };
            Some(Event::Request(Box::new(ev)))
        }
        EVENT_FORK | EVENT_EXIT | EVENT_SIGNAL | EVENT_REAP | EVENT_EXEC if bytes.len() >= size_of::<ProcessEvent>() => {
            // SAFETY: as above.
            let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProcessEvent>()) };
            let root = ev.root;
            Some(match kind {
                EVENT_FORK => Event::Fork { parent: ev.tgid, child: ev.child, root },
                EVENT_EXIT => Event::Exit { tgid: ev.tgid, root },
                EVENT_SIGNAL => Event::Signal { tgid: ev.tgid, sig: ev.child as i32, ts_ns: ev.ts_ns, root },
                EVENT_REAP => Event::Reap { parent: ev.tgid, child: ev.child, status: ev.status, root },
                _ => Event::Exec { pid: ev.tgid },
            })
        }
        EVENT_GC if bytes.len() >= size_of::<GcEvent>() => {
            // SAFETY: as above.
            let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<GcEvent>()) };
            Some(Event::Gc { tgid: ev.tgid, root: ev.root, generation: ev.generation, start_ns: ev.start_ns, end_ns: ev.end_ns })
        }
        _ => None,
    }
}

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
    /// Status code; `none` when nothing was written; `aborted` when the worker died during it.
    pub status: String,
    /// First request of a TCP connection: established → accepted (seconds).
    pub accept_wait: Option<f64>,
    /// First request byte read → last response byte written (seconds).
    pub duration: f64,
    /// Time inside write-family syscalls (seconds).
    pub write_seconds: f64,
    pub write_calls: u64,
    /// Of the write calls, continuations of a partial write (same block).
    pub partial_writes: u64,
    pub blocks: u64,
    pub bytes: u64,
    /// Garbage-collection time of its process that fell inside it (set by the session).
    pub gc_seconds: f64,
}

impl Request {
    /// Where it ended (ns): its last response write, or where the kernel ended it.
    pub fn end_ns(&self) -> u64 {
        self.start_ns + (self.duration * 1e9) as u64
    }
}

/// The request in a kernel record, or `None` when its bytes are not an HTTP request.
pub fn reconstruct(kind: ServerKind, ev: &RequestEvent) -> Option<Request> {
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
    let status = match code {
        // The worker died with the request open (killed, crashed): whatever it had written.
        _ if ev.end_reason == END_PROCESS_EXIT => "aborted".to_string(),
        Some(code) => code.to_string(),
        None if a.write_calls == 0 => "none".to_string(),
        None => "unknown".to_string(),
    };
    // Without a response the request ends where the kernel ended it (close, exit).
    let end = if a.write_calls > 0 { a.last_write_ns } else { ev.end_ns };
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
        write_calls: a.write_calls as u64,
        partial_writes: a.continuations as u64,
        blocks: framing::app_blocks(kind, a, resp_head, interim),
        bytes: a.write_bytes.saturating_sub(handshake as u64),
        gc_seconds: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsgiscope_common::END_CLOSE;

    fn event(req: &[u8], resp: &[u8], calls: u32, last: &[u8]) -> RequestEvent {
        let mut ev: RequestEvent = unsafe { std::mem::zeroed() };
        ev.kind = EVENT_REQUEST;
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
        let bytes = unsafe {
            std::slice::from_raw_parts((&ev as *const RequestEvent).cast::<u8>(), size_of::<RequestEvent>())
        };
        let Some(Event::Request(back)) = decode(bytes) else { panic!("not decoded") };
        let r = reconstruct(ServerKind::Gunicorn, &back).unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path.as_deref(), Some("/sleep"));
        assert_eq!(r.status, "200");
        assert_eq!(r.blocks, 1);
        assert_eq!(r.write_calls, 3);
        assert_eq!(r.bytes, 1234);
        assert!((r.duration - 0.05).abs() < 1e-9);
        assert!((r.write_seconds - 0.002).abs() < 1e-9);
    }

    #[test]
    fn no_response_is_status_none_and_ends_at_close() {
        let ev = event(b"GET /x HTTP/1.1\r\n\r\n", b"", 0, b"");
        let r = reconstruct(ServerKind::Gunicorn, &ev).unwrap();
        assert_eq!(r.status, "none");
        assert!((r.duration - 8.0).abs() < 1e-9);
    }

    #[test]
    fn binary_traffic_is_not_a_request() {
        let ev = event(b"\x00\x01\x02garbage", b"", 0, b"");
        assert_eq!(reconstruct(ServerKind::Gunicorn, &ev), None);
    }

    #[test]
    fn short_or_unknown_records_are_ignored() {
        assert!(decode(&[1, 0, 0]).is_none());
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(decode(&EVENT_REQUEST.to_ne_bytes()).is_none());
    }
}
