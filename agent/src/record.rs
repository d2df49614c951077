//! Record: every shape the kernel side hands the agent, decoded in one place — the ring-buffer
//! records, the requests a dying process left open in the connection table, and the requests
//! in progress there. The first step of a request's way: record → reconstruct → session and
//! aggregate → metrics → export.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use wsgiscope_common::{
    CallEvent, ConnState, ConnectEvent, Downstream, EventKind, ExecEvent, ExitEvent, ForkEvent, GcEvent,
    ReapEvent, RequestEvent, SignalEvent, CALL_END_QUIET, CALL_IDLE, CALL_REQ_LEN, CALL_RESP_LEN, CONN_IN_REQUEST,
    END_PROCESS_EXIT, REQ_HEAD_LEN, RESP_HEAD_LEN, UNIX_PATH_LEN,
};

use crate::sockets::Peer;

/// A record read from the ring buffer.
pub enum Event {
    Request(Box<RequestEvent>),
    /// `root`: the master the processes descend from (which server they belong to).
    Fork { parent: u32, child: u32, root: u32 },
    Exit { tgid: u32, root: u32 },
    /// SIGKILL or SIGABRT generated for a traced process, at `ts_ns`.
    Signal { tgid: u32, signal: i32, ts_ns: u64, root: u32 },
    /// `parent` reaped `child`; `status` as wait4 gives it.
    Reap { parent: u32, child: u32, status: i32, root: u32 },
    /// `wsgiscope daemon`: a process exec'd a WSGI server name and is traced from now on.
    Exec { pid: u32 },
    /// A garbage collection of generation `generation` (-1: unknown) in `tgid`.
    Gc { tgid: u32, root: u32, generation: i32, start_ns: u64, end_ns: u64 },
    /// A downstream call ended.
    Call(Box<CallEvent>),
    /// `tgid` connected socket `fd` to `peer` (`None`: an address wsgiscope cannot name).
    Connect { tgid: u32, fd: u32, root: u32, peer: Option<Peer> },
}

impl Event {
    /// The server (root master) the record belongs to.
    pub fn root(&self) -> u32 {
        match self {
            Event::Request(ev) => ev.root,
            Event::Fork { root, .. } | Event::Exit { root, .. } | Event::Signal { root, .. } | Event::Reap { root, .. } => *root,
            Event::Exec { pid } => *pid,
            Event::Gc { root, .. } | Event::Connect { root, .. } => *root,
            Event::Call(ev) => ev.root,
        }
    }
}

/// The record of type `T` in `bytes`, if they are long enough.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>())
        // SAFETY: length checked; the record types are plain data valid for any bytes.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record; `None` for a record of unknown kind or size.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let kind = EventKind::from_u32(u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?))?;
    Some(match kind {
        EventKind::Request => Event::Request(Box::new(read::<RequestEvent>(bytes)?)),
        EventKind::Fork => {
            let e = read::<ForkEvent>(bytes)?;
            Event::Fork { parent: e.parent, child: e.child, root: e.root }
        }
        EventKind::Exit => {
            let e = read::<ExitEvent>(bytes)?;
            Event::Exit { tgid: e.tgid, root: e.root }
        }
        EventKind::Signal => {
            let e = read::<SignalEvent>(bytes)?;
            Event::Signal { tgid: e.tgid, signal: e.signal as i32, ts_ns: e.ts_ns, root: e.root }
        }
        EventKind::Reap => {
            let e = read::<ReapEvent>(bytes)?;
            Event::Reap { parent: e.parent, child: e.child, status: e.status, root: e.root }
        }
        EventKind::Exec => Event::Exec { pid: read::<ExecEvent>(bytes)?.tgid },
        EventKind::Gc => {
            let e = read::<GcEvent>(bytes)?;
            Event::Gc { tgid: e.tgid, root: e.root, generation: e.generation, start_ns: e.start_ns, end_ns: e.end_ns }
        }
        EventKind::Call => Event::Call(Box::new(read::<CallEvent>(bytes)?)),
        EventKind::Connect => {
            let e = read::<ConnectEvent>(bytes)?;
            Event::Connect { tgid: e.tgid, fd: e.fd, root: e.root, peer: peer(&e) }
        }
    })
}

/// The peer a connect record names: an IP address and port, or a UNIX path (abstract names,
/// which begin with a NUL byte, as `@name`).
fn peer(e: &ConnectEvent) -> Option<Peer> {
    const AF_UNIX: u16 = 1;
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    let ip = match e.family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3])),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(e.addr)),
        AF_UNIX => {
            let path = &e.path[..(e.path_len as usize).min(UNIX_PATH_LEN)];
            let (abstract_name, path) = match path.split_first() {
                Some((0, rest)) => (true, rest),
                _ => (false, path.split(|&b| b == 0).next().unwrap_or_default()),
            };
            if path.is_empty() {
                return None; // an unnamed (autobind) address
            }
            let name = String::from_utf8_lossy(path);
            return Some(Peer::Unix(if abstract_name { format!("@{name}") } else { name.into_owned() }));
        }
        _ => return None,
    };
    Some(Peer::Tcp(SocketAddr::new(ip, e.port)))
}

/// A request still open on a socket of a process that exited (the kernel closed the socket
/// without a close syscall), as the kernel's own record would carry it.
pub fn orphan(tgid: u32, fd: u32, c: &ConnState, now_ns: u64) -> Option<RequestEvent> {
    (c.flags & CONN_IN_REQUEST != 0).then(|| RequestEvent {
        kind: EventKind::Request as u32,
        end_reason: END_PROCESS_EXIT,
        tgid,
        fd,
        root: c.root,
        _pad: 0,
        end_ns: now_ns,
        agg: c.agg,
        // The kept part of the (twice as large) connection-state buffers.
        req_head: c.req_head[..REQ_HEAD_LEN].try_into().expect("buffer holds the kept head"),
        resp_head: c.resp_head[..RESP_HEAD_LEN].try_into().expect("buffer holds the kept head"),
    })
}

/// A call that belongs to no request (ambiguous, or outside requests) and has been quiet since
/// `quiet_since_ns` on downstream socket `key`, as the kernel's own record would carry it: the
/// kernel ends such a call only at the next call on its socket or its close.
pub fn quiet_call(key: u64, d: &Downstream, quiet_since_ns: u64) -> Option<CallEvent> {
    let open = d.state != CALL_IDLE;
    (open && d.call.req_start_ns == 0 && d.call.end_ns < quiet_since_ns).then(|| CallEvent {
        kind: EventKind::Call as u32,
        end_reason: CALL_END_QUIET,
        tgid: (key >> 32) as u32,
        fd: key as u32,
        root: d.root,
        _pad: 0,
        call: d.call,
        req_head: d.req_head[..CALL_REQ_LEN].try_into().expect("buffer holds the kept head"),
        resp_head: d.resp_head[..CALL_RESP_LEN].try_into().expect("buffer holds the kept head"),
    })
}

/// A request in progress, as the kernel's connection table shows it.
#[derive(Clone, Copy)]
pub struct InProgress {
    /// The server (root master) it belongs to.
    pub root: u32,
    pub tgid: u32,
    pub fd: u32,
    pub start_ns: u64,
    pub write_calls: u32,
    pub last_write_ns: u64,
    /// The whole state (the live views read its heads and thread).
    pub conn: ConnState,
}

/// The request in progress on connection `key` (`conn_key(tgid, fd)`), if one is.
pub fn in_progress(key: u64, c: &ConnState) -> Option<InProgress> {
    (c.flags & CONN_IN_REQUEST != 0).then_some(InProgress {
        root: c.root,
        tgid: (key >> 32) as u32,
        fd: key as u32,
        start_ns: c.agg.start_ns,
        write_calls: c.agg.write_calls,
        last_write_ns: c.agg.last_write_ns,
        conn: *c,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(v: &T) -> &[u8] {
        // SAFETY: viewing a plain-data value as its bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    #[test]
    fn each_kind_decodes_into_its_own_fields() {
        let fork = ForkEvent { kind: EventKind::Fork as u32, parent: 10, child: 11, root: 10, ts_ns: 5 };
        assert!(matches!(decode(bytes(&fork)), Some(Event::Fork { parent: 10, child: 11, root: 10 })));
        let sig = SignalEvent { kind: EventKind::Signal as u32, tgid: 11, signal: 9, root: 10, ts_ns: 7 };
        assert!(matches!(decode(bytes(&sig)), Some(Event::Signal { tgid: 11, signal: 9, ts_ns: 7, root: 10 })));
        let reap = ReapEvent { kind: EventKind::Reap as u32, parent: 10, child: 11, root: 10, status: 256, _pad: 0, ts_ns: 0 };
        assert!(matches!(decode(bytes(&reap)), Some(Event::Reap { parent: 10, child: 11, status: 256, root: 10 })));
        let exec = ExecEvent { kind: EventKind::Exec as u32, tgid: 42, ts_ns: 0 };
        assert!(matches!(decode(bytes(&exec)), Some(Event::Exec { pid: 42 })));
    }

    fn connect(family: u16, addr: [u8; 16], port: u16, path: &[u8]) -> Option<Peer> {
        let mut e = ConnectEvent {
            kind: EventKind::Connect as u32,
            tgid: 7,
            fd: 9,
            root: 1,
            family,
            port,
            path_len: path.len() as u32,
            addr,
            path: [0; UNIX_PATH_LEN],
        };
        e.path[..path.len()].copy_from_slice(path);
        match decode(bytes(&e)) {
            Some(Event::Connect { tgid: 7, fd: 9, root: 1, peer }) => peer,
            _ => panic!("a connect record decodes as one"),
        }
    }

    #[test]
    fn connect_records_name_their_peer() {
        let mut v4 = [0; 16];
        v4[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(connect(2, v4, 5432, b"").unwrap().to_string(), "127.0.0.1:5432");
        assert_eq!(connect(10, Ipv6Addr::LOCALHOST.octets(), 6379, b"").unwrap().to_string(), "[::1]:6379");
        // A path as Python passes it (NUL-terminated within the address length) or not.
        assert_eq!(connect(1, [0; 16], 0, b"/tmp/x/.s.PGSQL.5432\0").unwrap().to_string(), "/tmp/x/.s.PGSQL.5432");
        assert_eq!(connect(1, [0; 16], 0, b"/run/redis.sock").unwrap().to_string(), "/run/redis.sock");
        assert_eq!(connect(1, [0; 16], 0, b"\0hidden").unwrap().to_string(), "@hidden");
        assert_eq!(connect(1, [0; 16], 0, b""), None);
        assert_eq!(connect(16, [0; 16], 0, b""), None);
    }

    #[test]
    fn short_or_unknown_records_are_ignored() {
        assert!(decode(&[1, 0, 0]).is_none());
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(decode(&(EventKind::Request as u32).to_ne_bytes()).is_none());
        assert!(decode(&bytes(&ExecEvent { kind: EventKind::Exec as u32, tgid: 1, ts_ns: 0 })[..8]).is_none());
    }

    #[test]
    fn only_open_requests_are_orphans_or_in_progress() {
        // SAFETY: ConnState is plain data; all zeroes is an idle connection.
        let mut c: ConnState = unsafe { std::mem::zeroed() };
        c.root = 10;
        assert!(orphan(11, 7, &c, 9).is_none());
        assert!(in_progress(wsgiscope_common::conn_key(11, 7), &c).is_none());
        c.flags = CONN_IN_REQUEST;
        c.agg.start_ns = 3;
        let o = orphan(11, 7, &c, 9).unwrap();
        assert_eq!((o.end_reason, o.tgid, o.fd, o.root, o.end_ns), (END_PROCESS_EXIT, 11, 7, 10, 9));
        let r = in_progress(wsgiscope_common::conn_key(11, 7), &c).unwrap();
        assert_eq!((r.root, r.tgid, r.fd, r.start_ns), (10, 11, 7, 3));
    }
}
