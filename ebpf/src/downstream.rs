//! Downstream calls: what a worker writes to a socket it connected (PostgreSQL, MySQL, Redis,
//! an HTTP service) and reads back, aggregated per call, one record per call, attributed to
//! the request its thread is serving.
//!
//! A call starts with a write on an idle socket (or a read, when the peer speaks first), grows
//! while the worker writes, turns to its response with the first read, and ends at the next
//! write on the socket (the next call), when the thread starts a call on another socket, when
//! the request it belongs to writes to its client or ends, or when the socket is closed.
//! Which sockets are downstream: those connected after attach (here, on connect) and those
//! the agent found connected when it attached (it seeds `DOWNSTREAM`).
use aya_ebpf::{
    helpers::generated::bpf_probe_read_user,
    programs::TracePointContext,
};
use wsgiscope_common::{
    conn_key,
    heads::copy_head,
    words::{self, set},
    CallEvent, ConnState, ConnectEvent, Downstream, EventKind, Pending, CALL_AMBIGUOUS, CALL_END_CLOSE,
    CALL_END_NEXT, CALL_END_OTHER_CALL, CALL_END_REQUEST, CALL_IDLE, CALL_READING, CALL_REQ_LEN, CALL_RESP_LEN,
    CALL_WRITING, CONN_IN_REQUEST, CONN_OPEN_CALL, OP_CONNECT, STAT_DOWNSTREAM_TABLE_FULL, THREAD_CONCURRENT,
    UNIX_PATH_LEN,
};

use crate::{
    conn::append_head,
    events,
    maps::{bump, conn, root_of, CALL_SCRATCH, DOWNSTREAM, THREADS},
    pending::{stash_fd, take},
    tp::{arg, programs, ret},
    user::{first_piece, read_user},
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;

// ---- Which sockets are downstream ------------------------------------------------------------

#[inline(always)]
fn connect_enter(ctx: &TracePointContext) {
    stash_fd(OP_CONNECT, arg(ctx, 0), || (arg(ctx, 1), arg(ctx, 2)));
}

/// A successful (or non-blocking, in progress) connect of an IP or UNIX socket makes it a
/// downstream socket; the agent learns its peer from the record.
#[inline(always)]
fn connect_done(ctx: &TracePointContext) {
    let Some(p) = take() else { return };
    let rc = ret(ctx);
    if p.kind() != OP_CONNECT || (rc != 0 && rc != -EINPROGRESS) {
        return;
    }
    let Some(family) = read_user::<u16>(p.buf) else { return };
    if family != AF_INET && family != AF_INET6 && family != AF_UNIX {
        return;
    }
    let tgid = (p.key >> 32) as u32;
    let Some(root) = root_of(tgid) else { return };
    let Some(fresh) = CALL_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch; a new socket is idle, its call fields are set when one starts.
    unsafe {
        (*fresh).root = root;
        (*fresh).state = CALL_IDLE;
        if DOWNSTREAM.insert(&p.key, &*fresh, 0).is_err() {
            bump(STAT_DOWNSTREAM_TABLE_FULL);
            return;
        }
    }
    let Some(mut entry) = events::reserve::<ConnectEvent>() else { return };
    let e = entry.as_mut_ptr();
    // SAFETY: reserved ring-buffer memory of the right size, written field by field.
    unsafe {
        (*e).kind = EventKind::Connect as u32;
        (*e).tgid = tgid;
        (*e).fd = p.key as u32;
        (*e).root = root;
        set(&mut (*e).family, family);
        set(&mut (*e).port, 0);
        set(&mut (*e).path_len, 0);
        // Two words (a store of the 16-byte array would be a memset call).
        let addr = (*e).addr.as_mut_ptr().cast::<u64>();
        set(&mut *addr, 0);
        set(&mut *addr.add(1), 0);
        if family == AF_UNIX {
            // sockaddr_un: family, then the path (its length is the address length's rest).
            let len = p.len.saturating_sub(2);
            let len = if len > UNIX_PATH_LEN as u64 { UNIX_PATH_LEN as u64 } else { len };
            if len > 0 && bpf_probe_read_user((*e).path.as_mut_ptr().cast(), len as u32, (p.buf + 2) as *const _) == 0 {
                (*e).path_len = len as u32;
            }
        } else {
            (*e).port = u16::from_be(read_user::<u16>(p.buf + 2).unwrap_or(0));
            if family == AF_INET {
                let a = read_user::<[u8; 4]>(p.buf + 4).unwrap_or([0; 4]);
                (*e).addr[0] = a[0];
                (*e).addr[1] = a[1];
                (*e).addr[2] = a[2];
                (*e).addr[3] = a[3];
            } else {
                // Into the record (zeroed on a fault).
                bpf_probe_read_user((*e).addr.as_mut_ptr().cast(), 16, (p.buf + 8) as *const _);
            }
        }
    }
    events::submit(entry);
}

programs!(sys_enter_connect => |ctx| connect_enter(&ctx));
programs!(sys_exit_connect => |ctx| connect_done(&ctx));

// ---- Which request a call belongs to ---------------------------------------------------------

/// The request on `c` is about to write to its client: the call it made last is over.
#[inline(always)]
pub fn end_open_call(c: &mut ConnState, key: u64) {
    if c.flags & CONN_OPEN_CALL == 0 {
        return;
    }
    c.flags &= !CONN_OPEN_CALL;
    let dkey = conn_key((key >> 32) as u32, c.call_fd);
    if let Some(d) = DOWNSTREAM.get_ptr_mut(&dkey) {
        // SAFETY: map value pointer valid for this program run.
        let d = unsafe { &mut *d };
        if d.call.req_fd == key as u32 && d.call.req_start_ns == c.agg.start_ns {
            finish_call(d, dkey, CALL_END_REQUEST);
        }
    }
}

/// Attributes the call starting on `d` (`key`, by thread `tid`) to the request its thread is
/// serving, if there is exactly one it can be.
#[inline(always)]
fn attribute(d: &mut Downstream, key: u64, tid: u32) {
    let tgid = (key >> 32) as u32;
    // SAFETY: u32/u64 fields copied out at once.
    let Some(t) = (unsafe { THREADS.get(&tid) }).copied() else { return };
    if t.in_flight == 0 {
        return; // between requests
    }
    // A thread serving requests concurrently: only while it has one in progress, and that one
    // is the last it read, is the call surely that request's.
    let concurrent = t.flags & THREAD_CONCURRENT != 0;
    if concurrent && t.in_flight > 1 {
        d.call.flags |= CALL_AMBIGUOUS;
        return;
    }
    let rkey = conn_key(tgid, t.fd);
    let Some(c) = conn(rkey).filter(|c| c.flags & CONN_IN_REQUEST != 0 && c.agg.start_ns == t.start_ns) else {
        if concurrent {
            d.call.flags |= CALL_AMBIGUOUS; // one is in progress, not the last it read
        }
        return;
    };
    d.call.req_fd = t.fd;
    d.call.req_start_ns = t.start_ns;
    let fd = key as u32;
    if c.flags & CONN_OPEN_CALL != 0 && c.call_fd != fd {
        // The thread moved on to another socket: its call there is over.
        let other = conn_key(tgid, c.call_fd);
        if let Some(o) = DOWNSTREAM.get_ptr_mut(&other) {
            // SAFETY: as above.
            let o = unsafe { &mut *o };
            if o.call.req_fd == t.fd && o.call.req_start_ns == t.start_ns {
                finish_call(o, other, CALL_END_OTHER_CALL);
            }
        }
    }
    c.flags |= CONN_OPEN_CALL;
    c.call_fd = fd;
}

// ---- Calls ----------------------------------------------------------------------------------

#[inline(always)]
fn start_call(d: &mut Downstream, key: u64, ts: u64, tid: u32, state: u32) {
    // `set`: stores kept as written, not merged into a memset call.
    let a = &mut d.call;
    set(&mut a.start_ns, ts);
    set(&mut a.end_ns, ts);
    set(&mut a.req_start_ns, 0);
    set(&mut a.req_fd, 0);
    set(&mut a.tid, tid);
    set(&mut a.write_bytes, 0);
    set(&mut a.read_bytes, 0);
    set(&mut a.write_calls, 0);
    set(&mut a.read_calls, 0);
    set(&mut a.req_len, 0);
    set(&mut a.resp_len, 0);
    set(&mut a.flags, 0);
    d.state = state;
    attribute(d, key, tid);
}

// `copy_head` moves whole words: the heads start 8-byte aligned in the record and the state
// (and a connect record's address is cleared as two words).
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(ConnectEvent, addr) % 8 == 0);
    assert!(offset_of!(CallEvent, req_head) % 8 == 0 && offset_of!(CallEvent, resp_head) % 8 == 0);
    assert!(offset_of!(Downstream, req_head) % 8 == 0 && offset_of!(Downstream, resp_head) % 8 == 0);
};

/// Emits the call in progress on `d` (if any) as one ring-buffer record: the kept bytes of its
/// heads only.
#[inline(always)]
fn finish_call(d: &mut Downstream, key: u64, reason: u32) {
    if d.state == CALL_IDLE {
        return;
    }
    d.state = CALL_IDLE;
    let Some(mut entry) = events::reserve::<CallEvent>() else { return };
    let e = entry.as_mut_ptr();
    // SAFETY: reserved ring-buffer memory of the right size, written field by field.
    unsafe {
        (*e).kind = EventKind::Call as u32;
        (*e).end_reason = reason;
        (*e).tgid = (key >> 32) as u32;
        (*e).fd = key as u32;
        (*e).root = d.root;
        (*e)._pad = 0;
        words::copy(&mut (*e).call, &d.call);
        copy_head(&mut (*e).req_head, &d.req_head, d.call.req_len);
        copy_head(&mut (*e).resp_head, &d.resp_head, d.call.resp_len);
    }
    events::submit(entry);
}

/// A write-family call on a socket that is not a connection: if it is downstream, it is (part
/// of) a call's request.
#[inline(always)]
pub fn wrote(p: &Pending, n: i64, ts: u64, tid: u32) {
    if n <= 0 {
        return;
    }
    let Some(d) = DOWNSTREAM.get_ptr_mut(&p.key) else { return };
    // SAFETY: map value pointer valid for this program run.
    let d = unsafe { &mut *d };
    if d.state == CALL_READING {
        finish_call(d, p.key, CALL_END_NEXT);
    }
    if d.state == CALL_IDLE {
        start_call(d, p.key, p.enter_ns, tid, CALL_WRITING);
    }
    let n = n as u64;
    d.call.write_calls += 1;
    d.call.write_bytes += n;
    d.call.end_ns = ts;
    if (d.call.req_len as usize) < CALL_REQ_LEN {
        let (src, avail) = first_piece(p.kind(), p.buf, n);
        append_head::<CALL_REQ_LEN, { 2 * CALL_REQ_LEN }>(&mut d.req_head, &mut d.call.req_len, src, avail);
    }
}

/// A read-family call (`op`, buffer `buf`, `n` bytes read) on a socket that is not a
/// connection: if it is downstream, it is (part of) a call's response.
#[inline(always)]
pub fn read(key: u64, op: u32, buf: u64, n: u64, ts: u64, tid: u32) {
    let Some(d) = DOWNSTREAM.get_ptr_mut(&key) else { return };
    // SAFETY: map value pointer valid for this program run.
    let d = unsafe { &mut *d };
    if d.state == CALL_IDLE {
        start_call(d, key, ts, tid, CALL_READING); // the peer spoke first
    }
    d.state = CALL_READING;
    d.call.read_calls += 1;
    d.call.read_bytes += n;
    d.call.end_ns = ts;
    if (d.call.resp_len as usize) < CALL_RESP_LEN {
        // User memory is read only for a downstream socket, and only for its first bytes.
        let (src, avail) = first_piece(op, buf, n);
        append_head::<CALL_RESP_LEN, { 2 * CALL_RESP_LEN }>(&mut d.resp_head, &mut d.call.resp_len, src, avail);
    }
}

/// close() of a socket that is not a connection: a downstream socket's call ends, and the fd
/// is no longer downstream.
#[inline(always)]
pub fn closed(key: u64) {
    let Some(d) = DOWNSTREAM.get_ptr_mut(&key) else { return };
    // SAFETY: map value pointer valid for this program run.
    finish_call(unsafe { &mut *d }, key, CALL_END_CLOSE);
    let _ = DOWNSTREAM.remove(&key);
}
