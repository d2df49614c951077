//! Accepted sockets of traced processes become connections.
use aya_ebpf::programs::TracePointContext;
use wsgiscope_common::{conn_key, END_FD_REUSED, STAT_CONN_TABLE_FULL};

use crate::{
    conn::{finish_request, now},
    maps::{bump, root_of, CONNS, SCRATCH},
    syscall::{pid_tgid, programs, ret},
};

#[inline(always)]
fn accepted(ctx: &TracePointContext) {
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
    // SAFETY: per-CPU scratch; only root and flags matter until a request starts.
    unsafe {
        (*fresh).root = root;
        (*fresh).flags = 0;
        (*fresh).partial_left = 0;
        (*fresh).agg.req_head_len = 0;
        (*fresh).agg.resp_head_len = 0;
        if CONNS.insert(&key, &*fresh, 0).is_err() {
            bump(STAT_CONN_TABLE_FULL);
        }
    }
}

programs!(sys_exit_accept, sys_exit_accept4 => |ctx| accepted(&ctx));
