//! Reads on a connection: the first byte of a request starts it; later reads are its body
//! (or, after the response began, either the next keep-alive request or a drain).
use aya_ebpf::programs::TracePointContext;
use wsgiscope_common::{REQ_HEAD_LEN, CONN_IN_REQUEST, CONN_SHUT, END_NEXT_REQUEST, OP_READ, OP_READV, OP_RECVMSG};

use crate::{
    conn::{append_head, finish_request, now, start_request},
    maps::CONNS,
    syscall::{first_piece, looks_like_request, programs, ret, stash, take},
};

#[inline(always)]
fn read_done(ctx: &TracePointContext) {
    let Some(p) = take() else { return };
    let n = ret(ctx);
    if n <= 0 {
        return; // EOF, EAGAIN, errors: no data, no request
    }
    let n = n as u64;
    let Some(c) = CONNS.get_ptr_mut(&p.key) else { return };
    // SAFETY: map value pointer valid for this program run.
    let c = unsafe { &mut *c };
    let (src, avail) = first_piece(p.op, p.buf, n);
    let ts = now();
    if c.flags & CONN_IN_REQUEST == 0 {
        if c.flags & CONN_SHUT != 0 {
            return; // draining after our shutdown
        }
        start_request(c, ts, src, avail);
    } else if c.agg.write_calls > 0 && looks_like_request(src, avail) {
        finish_request(c, p.key, END_NEXT_REQUEST, ts);
        start_request(c, ts, src, avail);
    } else {
        c.agg.read_calls += 1;
        c.agg.read_bytes += n;
        if c.agg.write_calls == 0 {
            append_head::<REQ_HEAD_LEN, { 2 * REQ_HEAD_LEN }>(&mut c.req_head, &mut c.agg.req_head_len, src, avail);
        }
        return;
    }
    c.agg.read_bytes = n;
}

programs!(sys_enter_read, sys_enter_recvfrom => |ctx| stash(&ctx, OP_READ));
programs!(sys_enter_readv => |ctx| stash(&ctx, OP_READV));
programs!(sys_enter_recvmsg => |ctx| stash(&ctx, OP_RECVMSG));
programs!(sys_exit_read, sys_exit_recvfrom, sys_exit_readv, sys_exit_recvmsg => |ctx| read_done(&ctx));
