//! Ring-buffer records: one struct per kind, each beginning with its `kind` (an [`EventKind`]
//! as `u32`), so the agent tells them apart by their first four bytes.
use crate::state::{CallAgg, RequestAgg, CALL_REQ_LEN, CALL_RESP_LEN, REQ_HEAD_LEN, RESP_HEAD_LEN};

/// What a record is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A request ended: [`RequestEvent`].
    Request = 1,
    /// A traced process forked: [`ForkEvent`].
    Fork = 2,
    /// A traced process exited (its last thread): [`ExitEvent`].
    Exit = 3,
    /// SIGKILL or SIGABRT was generated for a traced process: [`SignalEvent`].
    Signal = 4,
    /// A traced process reaped a child: [`ReapEvent`].
    Reap = 5,
    /// A process exec'd a WSGI server name and is traced from now on (daemon): [`ExecEvent`].
    Exec = 6,
    /// A CPython garbage collection finished in a traced process: [`GcEvent`].
    Gc = 7,
    /// A downstream call ended: [`CallEvent`].
    Call = 8,
    /// A traced process connected a socket: [`ConnectEvent`].
    Connect = 9,
}

impl EventKind {
    pub const fn from_u32(kind: u32) -> Option<Self> {
        Some(match kind {
            1 => EventKind::Request,
            2 => EventKind::Fork,
            3 => EventKind::Exit,
            4 => EventKind::Signal,
            5 => EventKind::Reap,
            6 => EventKind::Exec,
            7 => EventKind::Gc,
            8 => EventKind::Call,
            9 => EventKind::Connect,
            _ => return None,
        })
    }
}

/// Why a request record was emitted (`RequestEvent::end_reason`).
pub const END_NEXT_REQUEST: u32 = 1;
pub const END_SHUTDOWN: u32 = 2;
pub const END_CLOSE: u32 = 3;
/// The process exited with the request open (the agent builds this record from the
/// connection table: the kernel closed the sockets without a close syscall).
pub const END_PROCESS_EXIT: u32 = 4;
/// The fd was accepted again without a close we saw (e.g. `close_range`, `dup2`).
pub const END_FD_REUSED: u32 = 5;
/// A new response head began: the next request had been read with this one (pipelining).
pub const END_PIPELINED: u32 = 6;

/// One record per request.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RequestEvent {
    pub kind: u32,
    pub end_reason: u32,
    pub tgid: u32,
    pub fd: u32,
    /// The traced master this process descends from (which server it belongs to).
    pub root: u32,
    pub _pad: u32,
    pub end_ns: u64,
    pub agg: RequestAgg,
    pub req_head: [u8; REQ_HEAD_LEN],
    pub resp_head: [u8; RESP_HEAD_LEN],
}

/// `parent` forked `child`: a new process, or a thread (the agent tells from /proc).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ForkEvent {
    pub kind: u32,
    pub parent: u32,
    pub child: u32,
    pub root: u32,
    pub ts_ns: u64,
}

/// The last thread of process `tgid` exited.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExitEvent {
    pub kind: u32,
    pub tgid: u32,
    pub root: u32,
    pub _pad: u32,
    pub ts_ns: u64,
}

/// `signal` (SIGKILL or SIGABRT) was generated for process `tgid`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SignalEvent {
    pub kind: u32,
    pub tgid: u32,
    pub signal: u32,
    pub root: u32,
    pub ts_ns: u64,
}

/// `parent` reaped `child` with wait status `status` (as wait4 gives it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ReapEvent {
    pub kind: u32,
    pub parent: u32,
    pub child: u32,
    pub root: u32,
    pub status: i32,
    pub _pad: u32,
    pub ts_ns: u64,
}

/// Process `tgid` exec'd a WSGI server name; it is its own root from now on.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub kind: u32,
    pub tgid: u32,
    pub ts_ns: u64,
}

/// One garbage collection of a traced process: generation and its start and end (ns).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GcEvent {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub root: u32,
    /// -1 when the probe could not read it.
    pub generation: i32,
    pub _pad: u32,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Why a call record was emitted (`CallEvent::end_reason`): the next call on its socket began…
pub const CALL_END_NEXT: u32 = 1;
/// …the request it belongs to wrote to its client or ended…
pub const CALL_END_REQUEST: u32 = 2;
/// …the thread began a call on another socket…
pub const CALL_END_OTHER_CALL: u32 = 3;
/// …its socket was closed…
pub const CALL_END_CLOSE: u32 = 4;
/// …or (the agent, from the downstream table) a call of no request had been quiet for a while.
pub const CALL_END_QUIET: u32 = 5;

/// One record per downstream call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CallEvent {
    pub kind: u32,
    pub end_reason: u32,
    pub tgid: u32,
    pub fd: u32,
    pub root: u32,
    pub _pad: u32,
    pub call: CallAgg,
    pub req_head: [u8; CALL_REQ_LEN],
    pub resp_head: [u8; CALL_RESP_LEN],
}

/// Bytes of a UNIX socket path in `sockaddr_un`.
pub const UNIX_PATH_LEN: usize = 108;

/// Process `tgid` connected socket `fd` to a peer: AF_INET/AF_INET6 `addr` (IPv4 in the first
/// 4 bytes) and `port`, or an AF_UNIX `path` (`path_len` bytes; abstract names begin with NUL).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectEvent {
    pub kind: u32,
    pub tgid: u32,
    pub fd: u32,
    pub root: u32,
    pub family: u16,
    pub port: u16,
    pub path_len: u32,
    pub addr: [u8; 16],
    pub path: [u8; UNIX_PATH_LEN],
}
