//! close and shutdown end the request in progress on a connection.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use wsgiscope_common::{conn_key, CONN_CLOSED, CONN_KEEP_FDS, CONN_SHUT, END_CLOSE, END_SHUTDOWN};

use crate::{
    conn::{finish_request, now},
    downstream,
    maps::{conn, traced, CONNS},
    tp::{arg, pid_tgid},
};

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let (_, tgid) = pid_tgid();
    if !traced(tgid) {
        return 0;
    }
    let fd = arg(&ctx, 0) as u32;
    let key = conn_key(tgid, fd);
    if let Some(c) = conn(key) {
        finish_request(c, key, END_CLOSE, now());
        // Kept for the next accept on this fd number, which resets it in place.
        if fd < CONN_KEEP_FDS {
            c.flags = CONN_CLOSED;
        } else {
            let _ = CONNS.remove(&key);
        }
    } else {
        downstream::closed(key);
    }
    0
}

#[tracepoint]
pub fn sys_enter_shutdown(ctx: TracePointContext) -> u32 {
    const SHUT_WR: u64 = 1;
    const SHUT_RDWR: u64 = 2;
    let (_, tgid) = pid_tgid();
    if !traced(tgid) {
        return 0;
    }
    let how = arg(&ctx, 1);
    if how != SHUT_WR && how != SHUT_RDWR {
        return 0; // SHUT_RD does not end the response
    }
    let key = conn_key(tgid, arg(&ctx, 0) as u32);
    if let Some(c) = conn(key) {
        finish_request(c, key, END_SHUTDOWN, now());
        c.flags |= CONN_SHUT;
    }
    0
}
