//! State the kernel keeps in maps: per connection (the request in progress), per syscall in
//! flight, per collection in progress. The agent reads the connection table too (requests in
//! progress, and those a dying worker left open).
/// Bytes of the request head kept per request (for parsing in userspace). 512 so that a uwsgi
/// packet from nginx still holds REMOTE_ADDR.
pub const REQ_HEAD_LEN: usize = 512;
/// Bytes of the response head kept per request: status line and headers.
pub const RESP_HEAD_LEN: usize = 256;
// Head buffers in the connection state are twice their kept length so that an append at any
// offset below the length, of at most the length, provably stays inside the buffer (the
// verifier cannot relate the offset and the size).

/// `ConnState::flags`
pub const CONN_IN_REQUEST: u32 = 1;
/// The server shut its side down: later reads are drains, not requests.
pub const CONN_SHUT: u32 = 2;
/// A request already started on this connection (a keep-alive request has no accept wait).
pub const CONN_SERVED: u32 = 4;
/// The read that started the request held bytes after its head (a body, or pipelined
/// requests): a later write that begins a response head starts the next request.
pub const CONN_MORE_AFTER_HEAD: u32 = 8;
/// A downstream call attributed to the request may still be open (on `ConnState::call_fd`):
/// it ends before the request's next response write, or with the request.
pub const CONN_OPEN_CALL: u32 = 16;
/// The fd was closed: the entry is kept for the next accept on the same fd number (reset in
/// place there, not inserted: a 1.7 KB insert cost the accept ~400 ns) and is no connection
/// until then. Only fds below `CONN_KEEP_FDS` are kept so; the process's exit removes them.
pub const CONN_CLOSED: u32 = 32;
/// Closed connections on fds below this are kept as `CONN_CLOSED` entries; others are removed.
/// A worker accepts on its lowest free fd, so a sync worker reuses one or two; at most 16 per
/// process keeps the closed entries of 256 traced processes within half the 8,192-entry table.
pub const CONN_KEEP_FDS: u32 = 16;

/// `RequestAgg::flags`: `accept_wait_ns` was measured (TCP, connection seen established).
pub const AGG_ACCEPT_WAIT: u16 = 1;
/// `RequestAgg::flags`: the first write was an interim `HTTP/1.x 1xx` response (e.g.
/// `100 Continue`): reads after it are still this request's body.
pub const AGG_INTERIM: u16 = 2;
/// `RequestAgg::flags`: `cpu_start_ns`/`cpu_end_ns` were measured.
pub const AGG_CPU: u16 = 4;
/// `RequestAgg::flags`: `rss_start_pages`/`rss_end_pages` were read.
pub const AGG_RSS: u16 = 8;
/// `RequestAgg::flags`: the first response write was the whole response head, alone: later
/// writes are body, not captured (kernel side only).
pub const AGG_HEAD_ALONE: u16 = 16;
/// `RequestAgg::flags`: a response write (or a wait for room to write) slept off CPU: it
/// waited on the client to read. Without `sched_switch` attached, set by every such call (the
/// kernel side cannot tell a sleep from a preemption or the hypervisor's steal).
pub const AGG_WRITE_SLEPT: u16 = 128;

/// Syscall families: where a call's data is (`first_piece`), and for writes and polls what a
/// syscall's enter remembers for its exit (reads and accepts are hooked on exit only).
pub const OP_READ: u32 = 1; // read, recvfrom: buf is the data pointer
pub const OP_READV: u32 = 2; // readv: buf points to an iovec array
pub const OP_RECVMSG: u32 = 3; // recvmsg: buf points to a msghdr
pub const OP_WRITE: u32 = 4; // write, sendto
pub const OP_WRITEV: u32 = 5; // writev
pub const OP_SENDMSG: u32 = 6; // sendmsg
pub const OP_SENDFILE: u32 = 7; // sendfile64: no user buffer
pub const OP_POLL: u32 = 8; // poll/ppoll waiting for POLLOUT on a connection: counts as write time
pub const OP_CONNECT: u32 = 9; // connect: buf is the sockaddr, len its length

/// Key of the connection table: one entry per accepted socket of a traced process.
#[inline(always)]
pub const fn conn_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// Per-request aggregate, built in the kernel while the request runs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RequestAgg {
    /// Exit of the read that returned the first request byte (ns, CLOCK_MONOTONIC).
    pub start_ns: u64,
    /// Enter of the first response write.
    pub first_write_ns: u64,
    /// Exit of the last response write.
    pub last_write_ns: u64,
    /// Time spent inside write-family syscalls on this socket.
    pub write_ns: u64,
    /// Bytes written to the client socket (headers and framing included).
    pub write_bytes: u64,
    /// Bytes read from the client socket.
    pub read_bytes: u64,
    /// Successful write-family syscalls.
    pub write_calls: u32,
    /// Of those, writes that continued a partial write (the rest of the same block).
    pub continuations: u32,
    pub read_calls: u32,
    pub first_write_len: u32,
    pub last_write_len: u32,
    /// The last write's bytes when it was at most 8 long (recognises framing such as a chunk
    /// terminator); zero otherwise.
    pub last_write_prefix: [u8; 8],
    pub req_head_len: u32,
    pub resp_head_len: u32,
    /// Address family of the accepted socket (AF_UNIX 1, AF_INET 2, AF_INET6 10; 0 unknown):
    /// set at accept, kept across the requests of the connection.
    pub family: u16,
    /// `AGG_*` bits.
    pub flags: u16,
    /// First request of a connection: TCP connection established → accepted by the worker.
    pub accept_wait_ns: u64,
    /// 0 for a request that began with a read; n for the n-th request after it that came in
    /// the same read (pipelining). Its head is in the same captured bytes, after the others'.
    pub pipeline_index: u16,
    pub _pad16: u16,
    /// The thread that read the request's first byte (its downstream calls are the request's).
    pub tid: u32,
    /// That thread's CPU clock (its CPU time since it began, as the scheduler charges it: what
    /// `/proc/<pid>/task/<tid>/schedstat` shows as of the last charge) at the request's start,
    /// and at its last response write (or its end, without one): valid with `AGG_CPU`.
    pub cpu_start_ns: u64,
    pub cpu_end_ns: u64,
    /// The process's resident pages (file + anon + shmem, the kernel's per-mm counters) at the
    /// request's start and at its end: valid with `AGG_RSS`.
    pub rss_start_pages: u64,
    pub rss_end_pages: u64,
}

/// What the kernel programs know of one task id, in an array slot (`TRACED_TASKS`): the array's
/// slots are 8 bytes whatever the value, so both marks share one.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct TaskMark {
    /// tgid of the attached master the task is traced on behalf of; 0: not traced.
    pub root: u32,
    /// `TASK_*` bits, the kernel's to set.
    pub marks: u32,
}

/// `TaskMark::marks`: the thread has a `THREADS` entry (it read a request).
pub const TASK_SERVING: u32 = 1;
/// `TaskMark::marks`: a call of the thread left the CPU unfinished (preempted) and waits in
/// `PENDING`: if the thread sleeps later, that call may be what it sleeps in.
pub const TASK_CALL_AWAY: u32 = 2;
/// `TaskMark::marks`: the thread read a request it has not seen end (set at the start, cleared
/// by the thread itself at an end that leaves it none in progress; an end on another thread
/// leaves it set): a wait for room to write outside requests is not looked at.
pub const TASK_IN_REQUEST: u32 = 4;

/// State of one accepted socket, keyed by `conn_key(tgid, fd)`: shared by all threads of a process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnState {
    /// tgid of the attached master this process descends from.
    pub root: u32,
    pub flags: u32,
    /// Bytes of the last write the kernel did not take (non-blocking partial write): the next
    /// write continues that block.
    pub partial_left: u64,
    /// Downstream socket of the call `CONN_OPEN_CALL` refers to.
    pub call_fd: u32,
    pub _pad: u32,
    pub agg: RequestAgg,
    pub req_head: [u8; 2 * REQ_HEAD_LEN],
    pub resp_head: [u8; 2 * RESP_HEAD_LEN],
}

/// A syscall in flight on one thread, between its enter and exit tracepoints.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    pub key: u64,
    pub buf: u64,
    /// Bytes the write asked to transfer (writes only).
    pub len: u64,
    pub enter_ns: u64,
    /// What is in flight (`OP_*`; 0: nothing).
    pub op: u32,
    /// The thread that made the call (a CPU's slot of `PENDING_ON_CPU` names its owner).
    pub tid: u32,
}

/// `Pending::op` bit: the call slept off CPU (it waited on its peer), as opposed to being
/// preempted.
pub const OP_SLEPT: u32 = 1 << 31;

impl Pending {
    /// The call's `OP_*` family.
    pub fn kind(&self) -> u32 {
        self.op & !OP_SLEPT
    }

    pub fn slept(&self) -> bool {
        self.op & OP_SLEPT != 0
    }
}

/// A collection in progress on one thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GcStart {
    pub start_ns: u64,
    pub generation: i32,
    pub _pad: u32,
}


/// Bytes of a downstream call's request kept (SQL text, Redis command, HTTP request line)…
pub const CALL_REQ_LEN: usize = 256;
/// …and of its response (status, error markers).
pub const CALL_RESP_LEN: usize = 128;

/// `Downstream::state`: between calls…
pub const CALL_IDLE: u32 = 0;
/// …writing a call's request…
pub const CALL_WRITING: u32 = 1;
/// …reading its response (the next write starts the next call).
pub const CALL_READING: u32 = 2;

/// `CallAgg::flags`: the thread serves several requests at once (gevent, eventlet) and more
/// than one was in progress: the call is not attributed to any.
pub const CALL_AMBIGUOUS: u32 = 1;

/// One downstream call: a request written to a socket the worker connected (not accepted) and
/// the response read from it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CallAgg {
    /// Enter of the call's first write (or exit of its first read, if the peer spoke first).
    pub start_ns: u64,
    /// Exit of the last read of its response (of its last write if no response came).
    pub end_ns: u64,
    /// The request it belongs to: the client connection and the request's `start_ns`
    /// (0: no request was in progress on the thread).
    pub req_start_ns: u64,
    pub req_fd: u32,
    pub tid: u32,
    pub write_bytes: u64,
    pub read_bytes: u64,
    pub write_calls: u32,
    pub read_calls: u32,
    pub req_len: u32,
    pub resp_len: u32,
    /// `CALL_*` flag bits.
    pub flags: u32,
    pub _pad: u32,
}

/// A downstream socket of a traced process, keyed by `conn_key(tgid, fd)`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Downstream {
    pub root: u32,
    /// `CALL_IDLE`, `CALL_WRITING` or `CALL_READING`.
    pub state: u32,
    pub call: CallAgg,
    pub req_head: [u8; 2 * CALL_REQ_LEN],
    pub resp_head: [u8; 2 * CALL_RESP_LEN],
}

/// A thread that serves requests, keyed by tid: the request it read last (on `fd`, started
/// at `start_ns`) and how many requests it has in progress.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ThreadReq {
    pub start_ns: u64,
    pub fd: u32,
    /// Requests this thread read and the kernel has not ended yet.
    pub in_flight: u32,
    /// `THREAD_*` bits.
    pub flags: u32,
    /// Its process (with `fd`, the key of its latest request's connection).
    pub tgid: u32,
}

/// `ThreadReq::flags`: the thread read a request while another it read was still before its
/// response: it serves requests concurrently (an event loop), so attribution needs care.
pub const THREAD_CONCURRENT: u32 = 1;
