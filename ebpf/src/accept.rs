//! Accepted sockets of traced processes become connections, with their address family
//! (the transport: TCP or a UNIX socket).
use aya_ebpf::programs::TracePointContext;
use wsgiscope_common::{conn_key, Pending, END_FD_REUSED, OP_ACCEPT, STAT_CONN_TABLE_FULL, STAT_PENDING_TABLE_FULL};

use crate::{
    conn::{finish_request, now},
    maps::{bump, root_of, CONNS, PENDING, SCRATCH},
    syscall::{arg, pid_tgid, programs, read_user, ret, take},
};

/// Remembers where accept will write the peer address: its first field is the family.
#[inline(always)]
fn accept_enter(ctx: &TracePointContext) {
    let (id, tgid) = pid_tgid();
    if root_of(tgid).is_none() {
        return;
    }
    let p = Pending { key: 0, buf: arg(ctx, 1), len: 0, enter_ns: now(), op: OP_ACCEPT, _pad: 0 };
    if PENDING.insert(&id, &p, 0).is_err() {
        bump(STAT_PENDING_TABLE_FULL);
    }
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) {
    let family = match take() {
        Some(p) if p.op == OP_ACCEPT && p.buf != 0 => read_user::<u16>(p.buf).unwrap_or(0),
        _ => 0,
    };
    let (_, tgid) = pid_tgid();
    let Some(root) = root_of(tgid) else { return };
    let fd = ret(ctx);
    if fd < 0 {
        return;
    }
    let key = conn_key(tgid, fd as u32);
    if let Some(old) = CONNS.get_ptr_mut(&key) {
        // SAFETY: map value pointer valid for this program run.
        finish_request(unsafe { &mut *old }, key, END_FD_REUSED, now());
    }
    let Some(fresh) = SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch; only root, flags and family matter until a request starts.
    unsafe {
        (*fresh).root = root;
        (*fresh).flags = 0;
        (*fresh).partial_left = 0;
        (*fresh).agg.req_head_len = 0;
        (*fresh).agg.resp_head_len = 0;
        (*fresh).agg.family = family;
        if CONNS.insert(&key, &*fresh, 0).is_err() {
            bump(STAT_CONN_TABLE_FULL);
        }
    }
}

programs!(sys_enter_accept, sys_enter_accept4 => |ctx| accept_enter(&ctx));
programs!(sys_exit_accept, sys_exit_accept4 => |ctx| accepted(&ctx));
