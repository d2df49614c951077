//! The threads that serve requests (`THREADS`): which request each read last and how many it
//! has in progress (its downstream calls are attributed by these); and a request's CPU time:
//! the serving thread's own clock (`cpu_clock`) read at the request's start and at each of its
//! response writes (the last one ends the request's CPU time), or at its end if it wrote none.
//! A thread's entry is made when it reads its first request and dropped when it exits.
use wsgiscope_common::{
    conn_key, ConnState, ThreadReq, AGG_CPU, CONN_IN_REQUEST, STAT_THREAD_TABLE_FULL, TASK_IN_REQUEST, TASK_SERVING,
    THREAD_CONCURRENT,
};

use crate::{
    cpu_clock::task_clock,
    downstream::end_open_call,
    conn::response_begun,
    maps::{bump, conn, set_mark, THREADS},
    tp::pid_tgid,
};

/// The current thread `tid` read the first byte of the request on `c` (`key`) at
/// `c.agg.start_ns`: its downstream calls are that request's from now on, and its CPU time
/// counts from here. A thread that reads a request while another it read has not begun its
/// response serves requests concurrently (gevent, eventlet): it is marked so.
#[inline(always)]
pub fn request_started(c: &mut ConnState, key: u64, tid: u32) {
    c.agg.tid = tid;
    crate::memory::request_started(c);
    let fd = key as u32;
    let tgid = (key >> 32) as u32;
    let start_ns = c.agg.start_ns;
    // The request's start time stands for now (a clock read costs ~40 ns, more when cold).
    if let Some(cpu) = task_clock(start_ns) {
        c.agg.cpu_start_ns = cpu;
        c.agg.cpu_end_ns = cpu;
        c.agg.flags |= AGG_CPU;
    }
    if let Some(t) = THREADS.get_ptr_mut(&tid) {
        // SAFETY: map value pointer valid for this program run; only this thread writes it.
        let t = unsafe { &mut *t };
        // The agent writes a task's marks whole when it traces it (read a moment before): a
        // mark set in between is lost. Set again here.
        set_mark(tid, TASK_SERVING | TASK_IN_REQUEST, true);
        if t.in_flight > 0 && t.fd != fd {
            if let Some(o) = conn(conn_key(tgid, t.fd)) {
                if o.flags & CONN_IN_REQUEST != 0 && o.agg.start_ns == t.start_ns && !response_begun(o) {
                    t.flags |= THREAD_CONCURRENT;
                }
            }
        }
        t.fd = fd;
        t.tgid = tgid;
        t.start_ns = start_ns;
        t.in_flight = t.in_flight.saturating_add(1);
        return;
    }
    let t = ThreadReq { start_ns, fd, in_flight: 1, flags: 0, tgid };
    if THREADS.insert(&tid, &t, 0).is_ok() {
        set_mark(tid, TASK_SERVING | TASK_IN_REQUEST, true);
    } else {
        bump(STAT_THREAD_TABLE_FULL);
    }
}

/// A response write by thread `tid` at `ts`: if it is the request's serving thread, the
/// request's CPU time runs to here (until a later write).
#[inline(always)]
pub fn wrote(c: &mut ConnState, tid: u32, ts: u64) {
    if c.agg.flags & AGG_CPU != 0 && c.agg.tid == tid {
        match task_clock(ts) {
            Some(cpu) => c.agg.cpu_end_ns = cpu,
            None => c.agg.flags &= !AGG_CPU,
        }
    }
}

/// The request on `c` (`key`) ends at `ts`: a call still open for it ends first (its record
/// must precede the request's), and its thread has one request less in flight. Without a
/// response write its CPU time runs to here, read if the serving thread ends it (another
/// thread's clock is not readable: then it has none).
#[inline(always)]
pub fn request_ending(c: &mut ConnState, key: u64, ts: u64) {
    end_open_call(c, key);
    let here = c.agg.tid == pid_tgid().0 as u32;
    if c.agg.write_calls == 0 && c.agg.flags & AGG_CPU != 0 {
        let cpu = here.then(|| task_clock(ts)).flatten();
        match cpu {
            Some(cpu) => c.agg.cpu_end_ns = cpu,
            None => c.agg.flags &= !AGG_CPU,
        }
    }
    if let Some(t) = THREADS.get_ptr_mut(&c.agg.tid) {
        // SAFETY: map value pointer valid for this program run.
        let t = unsafe { &mut *t };
        t.in_flight = t.in_flight.saturating_sub(1);
        if t.in_flight == 0 && here {
            set_mark(c.agg.tid, TASK_IN_REQUEST, false);
        }
    }
}
