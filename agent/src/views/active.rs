//! Active Service: what each request in progress is doing now, read off the kernel's tables —
//! the connection's request state, the serving thread's syscall in flight, collection in
//! progress and CPU clock, and the downstream call attributed to the request. Pure: the
//! collector reads the tables, this decides.
use wsgiscope_common::{
    conn_key, ConnState, Downstream, AGG_CPU, CALL_WRITING, OP_POLL, OP_SENDFILE, OP_SENDMSG, OP_WRITE, OP_WRITEV,
    REQ_HEAD_LEN, RESP_HEAD_LEN,
};

use crate::{kernel::ThreadNow, reconstruct::uwsgi};

/// After its last write, a response whose end cannot be read off its head (no Content-Length,
/// not chunked) counts as done once its connection has been quiet this long (ns): a keep-alive
/// connection holds its request open in the kernel until the next one.
pub const QUIET_AFTER_WRITE_NS: u64 = 1_000_000_000;

/// What a request in progress is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doing {
    Reading,
    Application,
    /// Waiting on the downstream socket `fd` (a call sent, its answer not begun).
    Downstream { fd: u32 },
    Writing,
    Gc,
}

impl Doing {
    pub fn as_str(self) -> &'static str {
        match self {
            Doing::Reading => "reading",
            Doing::Application => "application",
            Doing::Downstream { .. } => "downstream",
            Doing::Writing => "writing",
            Doing::Gc => "gc",
        }
    }
}

/// A request's state now: what it does, since when (ns, where the kernel marks it), whether
/// its thread is on a CPU, and its CPU time so far.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Now {
    pub doing: Doing,
    pub since_ns: Option<u64>,
    pub on_cpu: Option<bool>,
    pub cpu_ns: Option<u64>,
}

/// The call a request waits on: its socket and the kernel's state of it.
pub type WaitingCall<'a> = (u32, &'a Downstream);

/// Is the request on connection `fd` of `tgid` still in progress at `now_ns`, and what is it
/// doing? `None` when it is over (its response written whole, or quiet since its last write).
/// `thread`: the kernel's state of the thread that read it; `call`: a downstream call
/// attributed to it whose request is written and whose answer has not begun.
pub fn classify(
    now_ns: u64,
    tgid: u32,
    fd: u32,
    c: &ConnState,
    thread: &ThreadNow,
    call: Option<WaitingCall<'_>>,
) -> Option<Now> {
    let a = &c.agg;
    let in_syscall = |key: u64, ops: &[u32]| thread.syscall.filter(|p| p.key == key && ops.contains(&p.kind()));
    let writing = in_syscall(conn_key(tgid, fd), &[OP_WRITE, OP_WRITEV, OP_SENDMSG, OP_SENDFILE, OP_POLL]);
    if a.write_calls > 0 && writing.is_none() {
        let resp = &c.resp_head[..(a.resp_head_len as usize).min(RESP_HEAD_LEN)];
        if response_complete(resp, a.write_bytes, &a.last_write_prefix[..(a.last_write_len as usize).min(8)])
            || now_ns.saturating_sub(a.last_write_ns) >= QUIET_AFTER_WRITE_NS
        {
            return None;
        }
    }
    let clock = thread.clock.filter(|_| a.flags & AGG_CPU != 0);
    let on_cpu = clock.map(|t| t.running);
    let cpu_ns = clock.map(|t| t.cpu_ns.saturating_sub(a.cpu_start_ns));
    let now = |doing, since_ns| Some(Now { doing, since_ns, on_cpu, cpu_ns });
    if let Some(gc) = thread.gc.filter(|g| g.start_ns >= a.start_ns) {
        return now(Doing::Gc, Some(gc.start_ns));
    }
    if let Some(p) = writing {
        return now(Doing::Writing, Some(p.enter_ns));
    }
    if let Some((call_fd, d)) = call {
        // Sending it, or off CPU with its answer not begun: waiting on the peer. A thread on a
        // CPU is not waiting (a datagram sent on a connected UDP socket gets no answer).
        let sending = in_syscall(conn_key(tgid, call_fd), &[OP_WRITE, OP_WRITEV, OP_SENDMSG]).is_some();
        if d.state == CALL_WRITING && (sending || on_cpu != Some(true)) {
            return now(Doing::Downstream { fd: call_fd }, Some(d.call.start_ns));
        }
    }
    let head = &c.req_head[..(a.req_head_len as usize).min(REQ_HEAD_LEN)];
    if a.write_calls == 0 && !request_read(head, a.read_bytes) {
        return now(Doing::Reading, None);
    }
    now(Doing::Application, None)
}

/// Has the whole request been read? HTTP: its head, and a body of its Content-Length; uwsgi:
/// the packet's vars. What the capture cannot tell (a head longer than it, a chunked body, a
/// mod_wsgi request) counts as read.
pub fn request_read(head: &[u8], read_bytes: u64) -> bool {
    if uwsgi::is_packet(head) {
        let vars = u16::from_le_bytes([head[1], head[2]]) as u64;
        return read_bytes >= 4 + vars;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(len)) => {
            read_bytes >= len as u64 + content_length(req.headers).unwrap_or(0)
        }
        // A head still coming in, unless the capture is what cut it.
        Ok(httparse::Status::Partial) => head.len() >= REQ_HEAD_LEN,
        Err(_) => true,
    }
}

/// Has the response been written whole? Known from its head: a Content-Length body written, or
/// a chunked body's terminator written last. `last_write`: the last write's bytes if it was
/// at most 8 long.
pub fn response_complete(head: &[u8], written: u64, last_write: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = resp.parse(head) else { return false };
    if resp.code.is_some_and(|c| c < 200) {
        return false; // an interim response: the real one follows
    }
    if let Some(n) = content_length(resp.headers) {
        return written >= len as u64 + n;
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding") && String::from_utf8_lossy(h.value).contains("chunked")
    });
    chunked && last_write.ends_with(b"0\r\n\r\n")
}

fn content_length(headers: &[httparse::Header<'_>]) -> Option<u64> {
    let h = headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"))?;
    std::str::from_utf8(h.value).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsgiscope_common::{GcStart, Pending, CALL_READING, CONN_IN_REQUEST, OP_SLEPT};

    use crate::kernel::ThreadClock;

    const TGID: u32 = 100;
    const FD: u32 = 7;
    const NOW: u64 = 10_000_000_000;

    fn conn(head: &[u8], read: u64) -> ConnState {
        // SAFETY: plain data; zeroes are an empty state to fill in.
        let mut c: ConnState = unsafe { std::mem::zeroed() };
        c.flags = CONN_IN_REQUEST;
        c.req_head[..head.len()].copy_from_slice(head);
        c.agg.req_head_len = head.len() as u32;
        c.agg.read_bytes = read;
        c.agg.start_ns = 1_000_000_000;
        c
    }

    fn responded(c: &mut ConnState, head: &[u8], written: u64, last_write_ns: u64) {
        c.resp_head[..head.len()].copy_from_slice(head);
        c.agg.resp_head_len = head.len() as u32;
        c.agg.write_calls = 1;
        c.agg.write_bytes = written;
        c.agg.last_write_ns = last_write_ns;
    }

    fn pending(fd: u32, op: u32, enter_ns: u64) -> Pending {
        Pending { key: conn_key(TGID, fd), buf: 0, len: 0, enter_ns, op, tid: 0 }
    }

    fn thread(running: bool) -> ThreadClock {
        ThreadClock { running, cpu_ns: 5_500 }
    }

    fn call(state: u32, start_ns: u64) -> Downstream {
        // SAFETY: as above.
        let mut d: Downstream = unsafe { std::mem::zeroed() };
        d.state = state;
        d.call.start_ns = start_ns;
        d
    }

    const GET: &[u8] = b"GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n";

    fn doing(c: &ConnState, t: &ThreadNow, w: Option<WaitingCall<'_>>) -> Option<(Doing, Option<u64>)> {
        classify(NOW, TGID, FD, c, t, w).map(|n| (n.doing, n.since_ns))
    }

    #[test]
    fn a_request_in_the_application() {
        let c = conn(GET, GET.len() as u64);
        let n = classify(NOW, TGID, FD, &c, &ThreadNow::default(), None).unwrap();
        assert_eq!((n.doing, n.since_ns, n.on_cpu, n.cpu_ns), (Doing::Application, None, None, None));
    }

    #[test]
    fn cpu_so_far_and_whether_it_runs() {
        let mut c = conn(GET, GET.len() as u64);
        c.agg.flags |= AGG_CPU;
        c.agg.cpu_start_ns = 1_000;
        let t = ThreadNow { clock: Some(thread(true)), ..Default::default() };
        let n = classify(NOW, TGID, FD, &c, &t, None).unwrap();
        assert_eq!((n.on_cpu, n.cpu_ns), (Some(true), Some(4_500)));
        let t = ThreadNow { clock: Some(thread(false)), ..Default::default() };
        assert_eq!(classify(NOW, TGID, FD, &c, &t, None).unwrap().on_cpu, Some(false));
        // Without the kernel side's clock at its start, no CPU time.
        c.agg.flags &= !AGG_CPU;
        let n = classify(NOW, TGID, FD, &c, &t, None).unwrap();
        assert_eq!((n.on_cpu, n.cpu_ns), (None, None));
    }

    #[test]
    fn reading_until_head_and_body_are_in() {
        let post = b"POST /up HTTP/1.1\r\nContent-Length: 100\r\n\r\n";
        let n = post.len() as u64;
        assert_eq!(doing(&conn(post, n + 50), &ThreadNow::default(), None).unwrap().0, Doing::Reading);
        assert_eq!(doing(&conn(post, n + 100), &ThreadNow::default(), None).unwrap().0, Doing::Application);
        assert_eq!(doing(&conn(b"GET /x HTTP/1.1\r\nHo", 20), &ThreadNow::default(), None).unwrap().0, Doing::Reading);
        // uwsgi: 4-byte header, then 0x20 bytes of vars.
        let pkt = [0u8, 0x20, 0, 0, 9, 0, b'R'];
        assert!(!request_read(&pkt, 10) && request_read(&pkt, 36));
    }

    #[test]
    fn writing_while_inside_a_write_to_the_client() {
        let mut c = conn(GET, GET.len() as u64);
        responded(&mut c, b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", 65_000, NOW - 5_000_000_000);
        let t = ThreadNow { syscall: Some(pending(FD, OP_WRITE, NOW - 4_000_000_000)), ..Default::default() };
        assert_eq!(doing(&c, &t, None), Some((Doing::Writing, Some(NOW - 4_000_000_000))));
        // Asleep in it (the client does not read): still writing.
        let t = ThreadNow { syscall: Some(pending(FD, OP_WRITE | OP_SLEPT, NOW - 4_000_000_000)), ..Default::default() };
        assert_eq!(doing(&c, &t, None), Some((Doing::Writing, Some(NOW - 4_000_000_000))));
        // Out of the write and quiet for more than a second: no longer counted.
        assert_eq!(doing(&c, &ThreadNow::default(), None), None);
    }

    #[test]
    fn a_response_written_whole_is_over() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        let mut c = conn(GET, GET.len() as u64);
        responded(&mut c, head, head.len() as u64 + 5, NOW - 1_000);
        assert_eq!(doing(&c, &ThreadNow::default(), None), None);
        // Headers written, body still to come (a streaming app between blocks).
        responded(&mut c, head, head.len() as u64, NOW - 1_000);
        assert_eq!(doing(&c, &ThreadNow::default(), None).unwrap().0, Doing::Application);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(response_complete(chunked, 500, b"0\r\n\r\n"));
        assert!(!response_complete(chunked, 500, b"5\r\nhello"));
        assert!(!response_complete(b"HTTP/1.1 100 Continue\r\n\r\n", 25, b""));
    }

    #[test]
    fn waiting_on_a_downstream_call() {
        let c = conn(GET, GET.len() as u64);
        let d = call(CALL_WRITING, 3_000_000_000);
        let off_cpu = ThreadNow { clock: Some(thread(false)), ..Default::default() };
        let mut cc = c;
        cc.agg.flags |= AGG_CPU;
        assert_eq!(doing(&cc, &off_cpu, Some((9, &d))), Some((Doing::Downstream { fd: 9 }, Some(3_000_000_000))));
        // On a CPU after sending (a datagram that gets no answer): the application runs.
        let on_cpu = ThreadNow { clock: Some(thread(true)), ..Default::default() };
        assert_eq!(doing(&cc, &on_cpu, Some((9, &d))).unwrap().0, Doing::Application);
        // Still sending it: downstream, on a CPU or not.
        let sending = ThreadNow { syscall: Some(pending(9, OP_WRITE, NOW - 10)), ..on_cpu };
        assert_eq!(doing(&cc, &sending, Some((9, &d))).unwrap().0, Doing::Downstream { fd: 9 });
        // Its answer has begun: back to the application's account.
        let answered = call(CALL_READING, 3_000_000_000);
        assert_eq!(doing(&cc, &off_cpu, Some((9, &answered))).unwrap().0, Doing::Application);
    }

    #[test]
    fn a_collection_on_its_thread() {
        let c = conn(GET, GET.len() as u64);
        let t = ThreadNow { gc: Some(GcStart { start_ns: 2_000_000_000, generation: 2, _pad: 0 }), ..Default::default() };
        assert_eq!(doing(&c, &t, None), Some((Doing::Gc, Some(2_000_000_000))));
        // One that began before the request is another request's (a stale entry).
        let t = ThreadNow { gc: Some(GcStart { start_ns: 10, generation: 2, _pad: 0 }), ..Default::default() };
        assert_eq!(doing(&c, &t, None).unwrap().0, Doing::Application);
    }
}
