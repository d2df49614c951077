//! Connection state helpers: start a request, append head bytes, emit the finished request.
use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_user};
use wsgiscope_common::{
    heads::copy_head,
    words::{self, set},
    ConnState, EventKind, RequestEvent, AGG_ACCEPT_WAIT, AGG_INTERIM, CONN_IN_REQUEST, CONN_MORE_AFTER_HEAD,
    CONN_SERVED, REQ_HEAD_LEN,
};

use crate::{events, sniff::bytes_after_head, threads};

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

/// Clears the per-request counters of `c` for a request that starts at `ts` (`set`: stores
/// kept as written, not merged into a memset call).
#[inline(always)]
fn reset(c: &mut ConnState, ts: u64) {
    let a = &mut c.agg;
    set(&mut a.start_ns, ts);
    set(&mut a.first_write_ns, 0);
    set(&mut a.last_write_ns, 0);
    set(&mut a.write_ns, 0);
    set(&mut a.write_bytes, 0);
    set(&mut a.read_bytes, 0);
    set(&mut a.write_calls, 0);
    set(&mut a.continuations, 0);
    set(&mut a.read_calls, 0);
    set(&mut a.first_write_len, 0);
    set(&mut a.last_write_len, 0);
    set(&mut a.last_write_prefix, [0; 8]);
    set(&mut a.resp_head_len, 0);
    set(&mut a.pipeline_index, 0);
    set(&mut c.partial_left, 0);
    // Only a connection's first request waited for accept.
    if c.flags & CONN_SERVED != 0 {
        set(&mut a.flags, 0);
        set(&mut a.accept_wait_ns, 0);
    } else {
        a.flags &= AGG_ACCEPT_WAIT;
    }
    c.flags |= CONN_SERVED | CONN_IN_REQUEST;
}

/// Resets `c` to a new request that began with a read of `n` bytes at `src` (`avail` of them
/// in its first contiguous piece).
#[inline(always)]
pub fn start_request(c: &mut ConnState, ts: u64, src: u64, avail: u64, n: u64) {
    reset(c, ts);
    c.agg.read_bytes = n;
    c.agg.read_calls = 1;
    c.agg.req_head_len = 0;
    append_head::<REQ_HEAD_LEN, { 2 * REQ_HEAD_LEN }>(&mut c.req_head, &mut c.agg.req_head_len, src, avail);
    if bytes_after_head(c, n) {
        c.flags |= CONN_MORE_AFTER_HEAD;
    } else {
        c.flags &= !CONN_MORE_AFTER_HEAD;
    }
}

/// The next request of the same read (pipelining), which the server began once it had
/// answered the previous one (at `ts`, that response's last write). Its head is in the bytes
/// already captured, so they are kept.
#[inline(always)]
pub fn start_pipelined(c: &mut ConnState, ts: u64) {
    let index = c.agg.pipeline_index;
    reset(c, ts);
    c.agg.pipeline_index = index.saturating_add(1);
}

/// Has the request's response begun? An interim `100 Continue` written first does not count:
/// the client answers it with the body, not with a new request.
#[inline(always)]
pub fn response_begun(c: &ConnState) -> bool {
    c.agg.write_calls > u32::from(c.agg.flags & AGG_INTERIM != 0)
}

// `copy_head` moves whole words: the heads start 8-byte aligned in the record and the state.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(RequestEvent, req_head) % 8 == 0 && offset_of!(RequestEvent, resp_head) % 8 == 0);
    assert!(offset_of!(ConnState, req_head) % 8 == 0 && offset_of!(ConnState, resp_head) % 8 == 0);
};

/// Emits the request in progress on `c` (if any) as one ring-buffer record and clears it.
#[inline(always)]
pub fn finish_request(c: &mut ConnState, key: u64, reason: u32, ts: u64) {
    if c.flags & CONN_IN_REQUEST == 0 {
        return;
    }
    threads::request_ending(c, key, ts);
    crate::memory::request_ending(c);
    c.flags &= !CONN_IN_REQUEST;
    let Some(mut entry) = events::reserve::<RequestEvent>() else { return };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to reserved ring-buffer memory of the right size; written field by
    // field because the record is larger than the BPF stack.
    unsafe {
        (*e).kind = EventKind::Request as u32;
        (*e).end_reason = reason;
        (*e).tgid = (key >> 32) as u32;
        (*e).fd = key as u32;
        (*e).root = c.root;
        (*e)._pad = 0;
        (*e).end_ns = ts;
        words::copy(&mut (*e).agg, &c.agg);
        // The kept bytes only (the agent reads no further): a short head is a cache line or
        // two, not the 768 bytes of the buffers.
        copy_head(&mut (*e).req_head, &c.req_head, c.agg.req_head_len);
        copy_head(&mut (*e).resp_head, &c.resp_head, c.agg.resp_head_len);
    }
    events::submit(entry);
}
