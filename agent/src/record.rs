//! Record: every shape the kernel side hands the agent, decoded in one place — the ring-buffer
//! records, the requests a dying process left open in the connection table, and the requests
//! in progress there. The first step of a request's way: record → reconstruct → session and
//! aggregate → metrics → export.
use wsgiscope_common::{
    ConnState, EventKind, ExecEvent, ExitEvent, ForkEvent, GcEvent, ReapEvent, RequestEvent, SignalEvent,
    CONN_IN_REQUEST, END_PROCESS_EXIT, REQ_HEAD_LEN, RESP_HEAD_LEN,
};

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
}

impl Event {
    /// The server (root master) the record belongs to.
    pub fn root(&self) -> u32 {
        match self {
            Event::Request(ev) => ev.root,
            Event::Fork { root, .. } | Event::Exit { root, .. } | Event::Signal { root, .. } | Event::Reap { root, .. } => *root,
            Event::Exec { pid } => *pid,
            Event::Gc { root, .. } => *root,
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
    })
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

/// A request in progress, as the kernel's connection table shows it.
#[derive(Clone, Copy, Debug)]
pub struct InProgress {
    /// The server (root master) it belongs to.
    pub root: u32,
    pub tgid: u32,
    pub fd: u32,
    pub start_ns: u64,
    pub write_calls: u32,
    pub last_write_ns: u64,
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
