//! Connection state helpers: start a request, append head bytes, emit the finished request.
use aya_ebpf::helpers::{
    bpf_ktime_get_ns,
    generated::{bpf_probe_read_kernel, bpf_probe_read_user},
};
use wsgiscope_common::{
    ConnState, RequestEvent, AGG_ACCEPT_WAIT, CONN_IN_REQUEST, CONN_SERVED, EVENT_REQUEST, REQ_HEAD_LEN,
    RESP_HEAD_LEN, STAT_RINGBUF_FULL,
};

use crate::maps::{bump, quiet_submit, EVENTS};

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Appends up to `n` bytes of user memory at `src` to a head buffer of `BUF` = 2 × `KEEP` bytes,
/// keeping at most `KEEP` (a power of two).
#[inline(always)]
pub fn append_head<const KEEP: usize, const BUF: usize>(buf: &mut [u8; BUF], len: &mut u32, src: u64, n: u64) {
    let off = *len as usize;
    if off >= KEEP || n == 0 {
        return;
    }
    let room = (KEEP - off) as u64;
    let n = if n < room { n } else { room };
    // off < KEEP and n <= KEEP, so the copy stays inside the 2 × KEEP buffer.
    let dst = buf.as_mut_ptr().wrapping_add(off & (KEEP - 1));
    // SAFETY: bounds as above; a fault in user memory returns an error and copies nothing.
    if unsafe { bpf_probe_read_user(dst.cast(), n as u32, src as *const _) } == 0 {
        *len = (off as u64 + n) as u32;
    }
}

/// Resets `c` to a new request that began with a read of `n` bytes at `src`.
#[inline(always)]
pub fn start_request(c: &mut ConnState, ts: u64, src: u64, n: u64) {
    let a = &mut c.agg;
    a.start_ns = ts;
    a.first_write_ns = 0;
    a.last_write_ns = 0;
    a.write_ns = 0;
    a.write_bytes = 0;
    a.read_bytes = n;
    a.write_calls = 0;
    a.continuations = 0;
    a.read_calls = 1;
    a.first_write_len = 0;
    a.last_write_len = 0;
    a.last_write_prefix = [0; 8];
    a.req_head_len = 0;
    a.resp_head_len = 0;
    c.partial_left = 0;
    // Only a connection's first request waited for accept.
    if c.flags & CONN_SERVED != 0 {
        a.flags &= !AGG_ACCEPT_WAIT;
        a.accept_wait_ns = 0;
    }
    c.flags |= CONN_SERVED;
    append_head::<REQ_HEAD_LEN, { 2 * REQ_HEAD_LEN }>(&mut c.req_head, &mut c.agg.req_head_len, src, n);
    c.flags |= CONN_IN_REQUEST;
}

/// Emits the request in progress on `c` (if any) as one ring-buffer record and clears it.
#[inline(always)]
pub fn finish_request(c: &mut ConnState, key: u64, reason: u32, ts: u64) {
    if c.flags & CONN_IN_REQUEST == 0 {
        return;
    }
    c.flags &= !CONN_IN_REQUEST;
    let Some(mut entry) = EVENTS.reserve::<RequestEvent>(0) else {
        bump(STAT_RINGBUF_FULL);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to reserved ring-buffer memory of the right size; written field by
    // field because the record is larger than the BPF stack.
    unsafe {
        (*e).kind = EVENT_REQUEST;
        (*e).end_reason = reason;
        (*e).tgid = (key >> 32) as u32;
        (*e).fd = key as u32;
        (*e).root = c.root;
        (*e)._pad = 0;
        (*e).end_ns = ts;
        (*e).agg = c.agg;
        bpf_probe_read_kernel(
            (*e).req_head.as_mut_ptr().cast(),
            REQ_HEAD_LEN as u32,
            c.req_head.as_ptr().cast(),
        );
        bpf_probe_read_kernel(
            (*e).resp_head.as_mut_ptr().cast(),
            RESP_HEAD_LEN as u32,
            c.resp_head.as_ptr().cast(),
        );
    }
    entry.submit(quiet_submit());
}
