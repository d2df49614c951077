//! Reads on a connection: the first byte of a request starts it; later reads are its body
//! (or, after the response began, either the next keep-alive request or a drain).
//! Only the syscall exits are hooked: the fd and buffer come from the saved registers.
use aya_ebpf::programs::TracePointContext;
use wsgiscope_common::{
    conn_key, CONN_IN_REQUEST, CONN_SHUT, END_NEXT_REQUEST, OP_READ, OP_READV, OP_RECVMSG, REQ_HEAD_LEN,
};

use crate::{
    conn::{append_head, finish_request, now, response_begun, start_request},
    downstream, threads,
    maps::{conn, traced},
    sniff::looks_like_request,
    tp::{pid_tgid, programs, ret},
    user::{entry_args, first_piece},
};

#[inline(always)]
fn read_done(ctx: &TracePointContext, op: u32) {
    let n = ret(ctx);
    if n <= 0 {
        return; // EOF, EAGAIN, errors: no data, no request
    }
    let (id, tgid) = pid_tgid();
    if !traced(tgid) {
        return;
    }
    let Some((fd, buf)) = entry_args() else { return };
    let key = conn_key(tgid, fd as u32);
    let n = n as u64;
    let Some(c) = conn(key) else {
        // Not a connection: perhaps a downstream call's response.
        downstream::read(key, op, buf, n, now(), id as u32);
        return;
    };
    let (src, avail) = first_piece(op, buf, n);
    let ts = now();
    if c.flags & CONN_IN_REQUEST == 0 {
        if c.flags & CONN_SHUT != 0 {
            return; // draining after our shutdown
        }
        start_request(c, ts, src, avail, n);
        threads::request_started(c, key, id as u32);
    } else if response_begun(c) && looks_like_request(src, avail) {
        finish_request(c, key, END_NEXT_REQUEST, ts);
        start_request(c, ts, src, avail, n);
        threads::request_started(c, key, id as u32);
    } else {
        c.agg.read_calls += 1;
        c.agg.read_bytes += n;
        if c.agg.write_calls == 0 {
            append_head::<REQ_HEAD_LEN, { 2 * REQ_HEAD_LEN }>(&mut c.req_head, &mut c.agg.req_head_len, src, avail);
        }
    }
}

programs!(sys_exit_read, sys_exit_recvfrom => |ctx| read_done(&ctx, OP_READ));
programs!(sys_exit_readv => |ctx| read_done(&ctx, OP_READV));
programs!(sys_exit_recvmsg => |ctx| read_done(&ctx, OP_RECVMSG));
