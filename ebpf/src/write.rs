//! Writes on a connection while a request is in progress: the response, aggregated per request.
use aya_ebpf::programs::TracePointContext;
use wsgiscope_common::{RESP_HEAD_LEN, CONN_IN_REQUEST, OP_POLL, OP_SENDFILE, OP_SENDMSG, OP_WRITE, OP_WRITEV};

use crate::{
    conn::{append_head, now},
    maps::CONNS,
    syscall::{arg, first_piece, prefix8, programs, read_user, ret, stash, stash_fd, take},
};

#[inline(always)]
fn write_done(ctx: &TracePointContext) {
    let Some(p) = take() else { return };
    let Some(c) = CONNS.get_ptr_mut(&p.key) else { return };
    // SAFETY: map value pointer valid for this program run.
    let c = unsafe { &mut *c };
    if c.flags & CONN_IN_REQUEST == 0 {
        return;
    }
    let ts = now();
    // Time blocked in a failed write (e.g. EAGAIN) is still time spent writing.
    c.agg.write_ns += ts.saturating_sub(p.enter_ns);
    let n = ret(ctx);
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
    // User memory is read only where it matters: the response head (first 256 bytes) and
    // short writes (framing such as a chunk terminator); the blocks in between cost nothing.
    let short = n <= 8;
    if !short {
        c.agg.last_write_prefix = [0; 8];
    }
    if short || (c.agg.resp_head_len as usize) < RESP_HEAD_LEN {
        let (src, avail) = first_piece(p.op, p.buf, n);
        if short {
            prefix8(&mut c.agg.last_write_prefix, src, avail);
        }
        append_head::<RESP_HEAD_LEN, { 2 * RESP_HEAD_LEN }>(&mut c.resp_head, &mut c.agg.resp_head_len, src, avail);
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
    if arg(ctx, 1) != 1 {
        return; // only single-fd polls: the pattern of uWSGI and mod_wsgi write waits
    }
    let Some(pfd) = read_user::<PollFd>(arg(ctx, 0)) else { return };
    if pfd.events & POLLOUT != 0 && pfd.fd >= 0 {
        stash_fd(OP_POLL, pfd.fd as u64, || (0, 0));
    }
}

#[inline(always)]
fn poll_done() {
    let Some(p) = take() else { return };
    let Some(c) = CONNS.get_ptr_mut(&p.key) else { return };
    // SAFETY: map value pointer valid for this program run.
    let c = unsafe { &mut *c };
    if c.flags & CONN_IN_REQUEST != 0 {
        c.agg.write_ns += now().saturating_sub(p.enter_ns);
    }
}

programs!(sys_enter_poll, sys_enter_ppoll => |ctx| poll_enter(&ctx));
programs!(sys_exit_poll, sys_exit_ppoll => |_ctx| poll_done());
programs!(sys_enter_write, sys_enter_sendto => |ctx| stash(&ctx, OP_WRITE));
programs!(sys_enter_writev => |ctx| stash(&ctx, OP_WRITEV));
programs!(sys_enter_sendmsg => |ctx| stash(&ctx, OP_SENDMSG));
programs!(sys_enter_sendfile64 => |ctx| stash(&ctx, OP_SENDFILE));
programs!(sys_exit_write, sys_exit_sendto, sys_exit_writev, sys_exit_sendmsg, sys_exit_sendfile64 => |ctx| write_done(&ctx));
