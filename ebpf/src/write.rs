//! Writes on a connection while a request is in progress: the response, aggregated per request.
use aya_ebpf::programs::TracePointContext;
use wsgiscope_common::{
    heads::is_head_alone,
    ConnState, Pending, AGG_HEAD_ALONE, AGG_INTERIM, AGG_WRITE_SLEPT, CONN_IN_REQUEST, CONN_MORE_AFTER_HEAD, END_PIPELINED, OP_POLL, OP_SENDFILE,
    OP_SENDMSG, OP_WRITE, OP_WRITEV, RESP_HEAD_LEN, TASK_IN_REQUEST,
};

use crate::{
    conn::{append_head, finish_request, now, response_begun, start_pipelined},
    downstream, threads,
    maps::{conn, has_mark, traced},
    pending::{on_cpu_enabled, stash, stash_fd, take, take_for},
    sniff::{is_interim, is_response_head},
    tp::{arg, pid_tgid, programs, ret},
    user::{first_piece, prefix8, read_user},
};

#[inline(always)]
fn write_done(ctx: &TracePointContext) {
    let (id, tgid) = pid_tgid();
    let Some(p) = take_for(id, tgid) else { return };
    let Some(c) = conn(p.key) else {
        // Not a connection: perhaps a downstream call's request.
        downstream::wrote(&p, ret(ctx), now(), id as u32);
        return;
    };
    if c.flags & CONN_IN_REQUEST == 0 {
        return;
    }
    let ts = now();
    let n = ret(ctx);
    // The request writes to its client: the downstream call it made last is over.
    downstream::end_open_call(c, p.key);
    if n > 0 && c.flags & CONN_MORE_AFTER_HEAD != 0 {
        next_pipelined(c, &p, n as u64);
    }
    // Time blocked in a failed write (e.g. EAGAIN) is still time spent writing.
    c.agg.write_ns += ts.saturating_sub(p.enter_ns);
    waited(c, &p);
    if n <= 0 {
        return;
    }
    let n = n as u64;
    // A non-blocking server retries the rest of a partial write: same block, one more call.
    if c.partial_left > 0 {
        c.agg.continuations += 1;
    }
    c.partial_left = p.len.saturating_sub(n);
    if c.agg.write_calls == 0 {
        c.agg.first_write_ns = p.enter_ns;
        c.agg.first_write_len = n as u32;
    }
    c.agg.write_calls += 1;
    c.agg.write_bytes += n;
    c.agg.last_write_ns = ts;
    c.agg.last_write_len = n as u32;
    threads::wrote(c, id as u32, ts);
    // User memory is read only where it matters: the response head (first 256 bytes) and
    // short writes (framing such as a chunk terminator); the blocks in between cost nothing.
    let short = n <= 8;
    if !short {
        c.agg.last_write_prefix = [0; 8];
    }
    // After a head written alone, the body is not captured.
    let head = (c.agg.resp_head_len as usize) < RESP_HEAD_LEN && c.agg.flags & AGG_HEAD_ALONE == 0;
    if short || head {
        let (src, avail) = first_piece(p.kind(), p.buf, n);
        if short {
            prefix8(&mut c.agg.last_write_prefix, src, avail);
        }
        if head {
            append_head::<RESP_HEAD_LEN, { 2 * RESP_HEAD_LEN }>(&mut c.resp_head, &mut c.agg.resp_head_len, src, avail);
        }
        if c.agg.write_calls == 1 {
            if is_interim(&c.resp_head, c.agg.resp_head_len) {
                c.agg.flags |= AGG_INTERIM;
            } else if c.agg.resp_head_len as u64 == n
                && is_head_alone::<RESP_HEAD_LEN, { 2 * RESP_HEAD_LEN }>(&c.resp_head, c.agg.resp_head_len as usize)
            {
                c.agg.flags |= AGG_HEAD_ALONE;
            }
        }
    }
}

/// Pipelining: the request's read held more than its head, so the server may be answering
/// the next request read with it. A write that begins a new response head (not continuing a
/// partial write, not the final head after an interim one) ends this request and starts that
/// one. Costs one 13-byte user read per write, on such connections only.
#[inline(always)]
fn next_pipelined(c: &mut ConnState, p: &Pending, n: u64) {
    if !response_begun(c) || c.partial_left > 0 || n < 13 {
        return;
    }
    let (src, avail) = first_piece(p.kind(), p.buf, n);
    if is_response_head(src, avail) {
        let previous_end = c.agg.last_write_ns;
        finish_request(c, p.key, END_PIPELINED, p.enter_ns);
        // Its CPU end, read at its last write.
        let previous_cpu_end = c.agg.cpu_end_ns;
        start_pipelined(c, previous_end);
        let (id, _) = pid_tgid();
        threads::request_started(c, p.key, id as u32);
        // Same thread: its CPU time from the previous response's end, like the request's.
        c.agg.cpu_start_ns = previous_cpu_end;
    }
}

/// Waiting in poll(POLLOUT) on the connection (non-blocking servers) is time spent writing.
#[inline(always)]
fn poll_enter(ctx: &TracePointContext) {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct PollFd {
        fd: i32,
        events: i16,
        revents: i16,
    }
    const POLLOUT: i16 = 4;
    let (id, tgid) = pid_tgid();
    // Only single-fd polls of traced threads with a request in progress: uWSGI and mod_wsgi
    // write waits (gunicorn's wait for its client's FIN, after the request, is passed over
    // without reading its pollfd).
    if arg(ctx, 1) != 1 || !traced(tgid) || !has_mark(id as u32, TASK_IN_REQUEST) {
        return;
    }
    let Some(pfd) = read_user::<PollFd>(arg(ctx, 0)) else { return };
    if pfd.events & POLLOUT != 0 && pfd.fd >= 0 {
        // The buffer is the pollfd (unused; two zeros here became a memset call).
        stash_fd(OP_POLL, pfd.fd as u64, || (arg(ctx, 0), 0));
    }
}

#[inline(always)]
fn poll_done() {
    let Some(p) = take() else { return };
    let Some(c) = conn(p.key) else { return };
    if c.flags & CONN_IN_REQUEST != 0 {
        c.agg.write_ns += now().saturating_sub(p.enter_ns);
        waited(c, &p);
    }
}

/// A write or a wait for room to write that slept waited on the client (a preempted one, or
/// one the hypervisor stole time from, did not). Without `sched_switch` no call tells.
#[inline(always)]
fn waited(c: &mut ConnState, p: &Pending) {
    if p.slept() || !on_cpu_enabled() {
        c.agg.flags |= AGG_WRITE_SLEPT;
    }
}

programs!(sys_enter_poll, sys_enter_ppoll => |ctx| poll_enter(&ctx));
programs!(sys_exit_poll, sys_exit_ppoll => |_ctx| poll_done());
programs!(sys_enter_write, sys_enter_sendto => |ctx| stash(&ctx, OP_WRITE));
programs!(sys_enter_writev => |ctx| stash(&ctx, OP_WRITEV));
programs!(sys_enter_sendmsg => |ctx| stash(&ctx, OP_SENDMSG));
programs!(sys_enter_sendfile64 => |ctx| stash(&ctx, OP_SENDFILE));
programs!(sys_exit_write, sys_exit_sendto, sys_exit_writev, sys_exit_sendmsg, sys_exit_sendfile64 => |ctx| write_done(&ctx));
