//! The threads that serve requests (`THREADS`): which request each read last, how many it has
//! in progress (its downstream calls are attributed by these), and its CPU clock.
//!
//! CPU time to the nanosecond, as the scheduler charges it (what `time.thread_time()` reads):
//! a serving thread's clock adds up the runtime the scheduler charges it
//! (`sched:sched_stat_runtime`, at every tick, switch and wakeup check) and is read at a
//! request's start and end as that sum plus the time since the last charge, while it runs
//! (`sched:sched_switch` tells when it goes off and on CPU). The charges alone come at ticks:
//! too coarse for 1 ms requests. Kernels without that tracepoint: the time between its context
//! switches. A thread's entry is made when it reads its first request and dropped when it exits.
//!
//! A charge runs to the runqueue's clock, which can lie well before the tracepoint fires: a
//! running thread's clock is carried from there (`rq_clock`). On a VM the hypervisor's steal
//! is left out of the task's clock but not out of wall time: where a clock is carried from the
//! last charge (a request's start, its last write), the steal since is read and left out too
//! (`steal`).
//!
//! The kernel skips a tracing program that would nest inside another on its CPU (a tick's
//! charge landing while one of our syscall programs runs): a charge added up would be lost.
//! Where the agent found the task's own clock in the kernel's BTF, each charge reads it instead
//! (`se.sum_exec_runtime`), so the next one holds what a skipped one charged.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use wsgiscope_common::{
    conn_key,
    sched_stat_runtime::{PID, RUNTIME},
    sched_switch::{NEXT_PID, PREV_PID, PREV_STATE},
    ConnState, ThreadReq, AGG_CPU, AGG_CPU_AT_WRITE, AGG_CPU_EACH_WRITE, AGG_CPU_LATE, CONN_IN_REQUEST, STAT_THREAD_TABLE_FULL,
    THREAD_ABSOLUTE, THREAD_CALL_AWAY, THREAD_CONCURRENT, THREAD_FRESH,
};

use crate::{
    conn::{now, response_begun},
    downstream::end_open_call,
    maps::{bump, conn, serving, set_serving, THREADS},
    rq_clock::anchor,
    steal::stolen_here,
    tp::{field, pid_tgid},
    user::current_task_u64,
};

/// Set by the agent when `sched_stat_runtime` is attached.
#[unsafe(no_mangle)]
static KERNEL_RUNTIME: u32 = 0;

/// Set by the agent from the kernel's BTF: where `task_struct.se.sum_exec_runtime` is (0: unknown).
#[unsafe(no_mangle)]
static SUM_EXEC_OFFSET: u32 = 0;

/// The current task's CPU clock as the scheduler last charged it, where the agent found it.
#[inline(always)]
fn charged_clock() -> Option<u64> {
    // SAFETY: volatile read of a global the loader may have rewritten.
    let off = unsafe { core::ptr::read_volatile(&SUM_EXEC_OFFSET) };
    if off == 0 {
        return None;
    }
    Some(current_task_u64(off))
}

/// The scheduler charged thread `t` up to `ts`: its clock is the task's own (`clock`, read
/// when `t` is the current task) where known, else the charge `runtime` added. A fresh entry's
/// first charge can hold time from before it existed: capped at the time since.
#[inline(always)]
fn charged(t: &mut ThreadReq, clock: Option<u64>, runtime: u64, ts: u64) {
    let mut total = match clock {
        Some(c) if t.flags & THREAD_ABSOLUTE != 0 => c,
        _ => t.cpu_total_ns + runtime,
    };
    if t.flags & THREAD_FRESH != 0 {
        t.flags &= !THREAD_FRESH;
        if t.cpu_since_ns != 0 {
            total = total.min(t.cpu_total_ns + ts.saturating_sub(t.cpu_since_ns));
        }
    }
    t.cpu_total_ns = total;
}

/// Every context switch on the node: for threads that serve no requests, three array lookups
/// (inlined) are the whole cost.
#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let prev = field::<u32>(&ctx, PREV_PID as usize);
    let next = field::<u32>(&ctx, NEXT_PID as usize);
    // A write, poll or connect of `prev` still in flight leaves this CPU with it, asleep
    // (TASK_INTERRUPTIBLE or _UNINTERRUPTIBLE) or preempted.
    let sleeps = field::<u64>(&ctx, PREV_STATE as usize) & 3 != 0;
    let away = crate::pending::leaving_cpu(prev, sleeps);
    let (prev_serves, next_serves) = (serving(prev), serving(next));
    if !prev_serves && !next_serves {
        return 0; // no clock read either (~40 ns here)
    }
    let ts = now();
    if let Some(t) = prev_serves.then(|| THREADS.get_ptr_mut(&prev)).flatten() {
        // SAFETY: map value pointer valid for this program run.
        let t = unsafe { &mut *t };
        // A call preempted before (a write copying 64 MiB yields the CPU on a busy host) can
        // sleep now: looked up only then, not at every switch.
        if away {
            t.flags |= THREAD_CALL_AWAY;
        } else if sleeps && t.flags & THREAD_CALL_AWAY != 0 && !crate::pending::sleeping_away() {
            t.flags &= !THREAD_CALL_AWAY;
        }
        // Its latest request's last write was in the stretch ending now: its CPU end is known.
        settle_latest(t, prev);
        // SAFETY: volatile read of a global the loader may have rewritten.
        let kernel_runtime = unsafe { core::ptr::read_volatile(&KERNEL_RUNTIME) } != 0;
        // With sched_stat_runtime the scheduler charged its last stretch just before. That
        // charge comes from the scheduler, never from inside another BPF program, so it is
        // not skipped (ticks' charges can be: the next charge's own clock holds those).
        if !kernel_runtime && t.cpu_since_ns != 0 {
            t.cpu_total_ns += ts.saturating_sub(t.cpu_since_ns);
        }
        t.cpu_since_ns = 0;
        t.on_cpu_ns = 0;
    }
    if let Some(t) = next_serves.then(|| THREADS.get_ptr_mut(&next)).flatten() {
        // SAFETY: as above.
        let t = unsafe { &mut *t };
        // Its clock runs from the runqueue's clock as it was picked (the charged sum holds the
        // charge as it went off CPU last).
        match anchor(ts, false) {
            Some(a) => (t.cpu_since_ns, t.steal_ns) = (a.since, a.steal),
            None => (t.cpu_since_ns, t.steal_ns) = (ts, stolen_here()),
        }
        t.on_cpu_ns = ts;
    }
    0
}

/// The scheduler charged task `pid` `runtime` ns of CPU, up to now: every task on the node, one
/// array lookup unless it serves requests.
#[tracepoint]
pub fn sched_stat_runtime(ctx: TracePointContext) -> u32 {
    let pid = field::<u32>(&ctx, PID as usize);
    if let Some(t) = serving(pid).then(|| THREADS.get_ptr_mut(&pid)).flatten() {
        // SAFETY: map value pointer valid for this program run.
        let t = unsafe { &mut *t };
        let absolute = t.flags & THREAD_ABSOLUTE != 0;
        let here = pid_tgid().0 as u32 == pid;
        if absolute && !here {
            // A charge taken on another CPU (a wakeup check there): the task's own clock is not
            // readable from here, and the runtime charged runs from its last charge, which may
            // be one the kernel skipped (it nests in one of our programs): added up, it lost that
            // one's time until the next charge on its own CPU. Its clock runs on by wall time.
            return 0;
        }
        let ts = now();
        // A request it wrote to since its last charge ends at that write: settled from the
        // clock so far, carried forward (a charge's clock carried back to a write before it
        // would take any steal in between off the request's CPU time).
        if here {
            settle_latest(t, pid);
        }
        let runtime = field::<u64>(&ctx, RUNTIME as usize);
        charged(t, absolute.then(charged_clock).flatten(), runtime, ts);
        // Charged while it runs (a tick, a wakeup check): its clock runs on from here. The
        // steal is this CPU's: read for a charge of the task on it (one taken from another CPU
        // keeps the last, an earlier reading of its own CPU: the start below stays no later).
        if t.cpu_since_ns != 0 {
            if here {
                runs_from(t, ts, absolute);
            } else {
                t.cpu_since_ns = ts;
            }
        }
    }
    0
}

/// Running thread `t`, the current task, is charged up to now (`ts`): its clock runs from the
/// runqueue's clock where its own is read (`rq_clock`), else from `ts`.
#[inline(always)]
fn runs_from(t: &mut ThreadReq, ts: u64, absolute: bool) {
    match anchor(ts, true).filter(|_| absolute) {
        Some(a) => {
            t.cpu_total_ns += a.ran;
            (t.cpu_since_ns, t.steal_ns) = (a.since, a.steal);
        }
        None => (t.cpu_since_ns, t.steal_ns) = (ts, stolen_here()),
    }
}

/// The clock of running thread `t` at `at`, a moment of its current stretch on CPU when the
/// CPU's steal read `steal`: carried forward from its last charge by wall time, the steal
/// since left out (every charge settles the writes before it, so `at` is after that charge;
/// where a skipped scheduler event left it before, carried back by wall time).
#[inline(always)]
fn cpu_at(t: &ThreadReq, at: u64, steal: u64) -> u64 {
    if at < t.cpu_since_ns {
        return (t.cpu_total_ns + at).saturating_sub(t.cpu_since_ns);
    }
    let wall = at - t.cpu_since_ns;
    t.cpu_total_ns + wall - steal.saturating_sub(t.steal_ns).min(wall)
}

/// Thread `t` (`tid`), on CPU with requests in flight: its latest request's CPU end, if it
/// waits for the clock at a write of this stretch, is settled now.
#[inline(always)]
fn settle_latest(t: &ThreadReq, tid: u32) {
    if t.in_flight > 0 && t.on_cpu_ns != 0 {
        if let Some(c) = conn(conn_key(t.tgid, t.fd)) {
            settle_cpu_end(c, t, tid, false);
        }
    }
}

/// A request of thread `t` (`tid`) whose CPU end waits for the clock at its last write
/// (`AGG_CPU_AT_WRITE`) gets it, while `t` is still on the CPU it wrote on; if `t` has been
/// charged or off CPU since that write, it got it then.
#[inline(always)]
pub fn settle_cpu_end(c: &mut ConnState, t: &ThreadReq, tid: u32, at_end: bool) {
    if c.agg.flags & AGG_CPU_AT_WRITE == 0 || c.agg.tid != tid {
        return;
    }
    if t.cpu_since_ns != 0 && t.on_cpu_ns != 0 && t.on_cpu_ns <= c.agg.last_write_ns {
        c.agg.cpu_end_ns = cpu_at(t, c.agg.last_write_ns, c.agg.last_write_steal_ns);
        c.agg.flags &= !AGG_CPU_AT_WRITE;
    } else if at_end {
        // Not settled while it could be (a scheduler event the kernel skipped): the clock
        // now, or as the thread left the CPU; marked.
        c.agg.cpu_end_ns = cpu_now(t, now());
        c.agg.flags = (c.agg.flags & !AGG_CPU_AT_WRITE) | AGG_CPU_LATE;
    }
}

/// CPU time of a thread that is running now (at `ts`), maybe on another CPU: carried from its
/// last charge by wall time (on a VM the steal since is in it).
#[inline(always)]
fn cpu_now(t: &ThreadReq, ts: u64) -> u64 {
    t.cpu_total_ns + if t.cpu_since_ns != 0 { ts.saturating_sub(t.cpu_since_ns) } else { 0 }
}

/// CPU time of thread `t`, the current task, now (at `ts`), the hypervisor's steal on this CPU
/// since its last charge left out.
#[inline(always)]
fn cpu_now_here(t: &ThreadReq, ts: u64) -> u64 {
    if t.cpu_since_ns == 0 {
        return t.cpu_total_ns;
    }
    cpu_at(t, ts.max(t.cpu_since_ns), stolen_here())
}

/// The current thread `tid` read the first byte of the request on `c` (`key`) at
/// `c.agg.start_ns`: its downstream calls are that request's from now on, and its CPU time
/// counts from here. A thread that reads a request while another it read has not begun its
/// response serves requests concurrently (gevent, eventlet): it is marked so.
#[inline(always)]
pub fn request_started(c: &mut ConnState, key: u64, tid: u32) {
    c.agg.tid = tid;
    crate::memory::request_started(c);
    let fd = key as u32;
    let start_ns = c.agg.start_ns;
    if let Some(t) = THREADS.get_ptr_mut(&tid) {
        // SAFETY: map value pointer valid for this program run; only this thread writes it
        // (and sched_switch on this CPU, which cannot run while this program does).
        let t = unsafe { &mut *t };
        // The agent writes a task's mark whole when it traces it (root and serving, read a
        // moment before): a mark set in between is lost, and without it `sched_switch` would
        // no longer follow this thread. Set again here; it is running now, its clock from here.
        if !serving(tid) {
            set_serving(tid, true);
            let clock = charged_clock().filter(|_| t.flags & THREAD_ABSOLUTE != 0);
            if let Some(clock) = clock {
                t.cpu_total_ns = clock;
            }
            runs_from(t, start_ns, clock.is_some());
            t.on_cpu_ns = start_ns;
        }
        if t.in_flight > 0 && t.fd != fd {
            if let Some(o) = conn(conn_key((key >> 32) as u32, t.fd)) {
                if o.flags & CONN_IN_REQUEST != 0 && o.agg.start_ns == t.start_ns {
                    // The thread moves on from that request (running since its last write, or
                    // settled when it went off CPU): its CPU end is taken now.
                    settle_cpu_end(o, t, tid, false);
                    if !response_begun(o) {
                        t.flags |= THREAD_CONCURRENT;
                        o.agg.flags |= AGG_CPU_EACH_WRITE;
                    }
                }
            }
        }
        if t.flags & THREAD_CONCURRENT != 0 {
            c.agg.flags |= AGG_CPU_EACH_WRITE;
        }
        t.fd = fd;
        t.tgid = (key >> 32) as u32;
        t.start_ns = start_ns;
        t.in_flight = t.in_flight.saturating_add(1);
        // The request's start time stands for now (a clock read costs ~40 ns, more when cold).
        let cpu = cpu_now_here(t, start_ns);
        c.agg.cpu_start_ns = cpu;
        c.agg.cpu_end_ns = cpu;
        c.agg.flags |= AGG_CPU;
        return;
    }
    // Running now: its clock starts at the task's own where known, else at zero.
    let clock = charged_clock();
    let flags = THREAD_FRESH | if clock.is_some() { THREAD_ABSOLUTE } else { 0 };
    let tgid = (key >> 32) as u32;
    let mut t = ThreadReq {
        start_ns,
        fd,
        in_flight: 1,
        flags,
        tgid,
        cpu_total_ns: clock.unwrap_or(0),
        cpu_since_ns: start_ns,
        on_cpu_ns: start_ns,
        steal_ns: 0,
    };
    runs_from(&mut t, start_ns, clock.is_some());
    if THREADS.insert(&tid, &t, 0).is_ok() {
        set_serving(tid, true);
        let cpu = cpu_now_here(&t, start_ns);
        c.agg.cpu_start_ns = cpu;
        c.agg.cpu_end_ns = cpu;
        c.agg.flags |= AGG_CPU;
    } else {
        bump(STAT_THREAD_TABLE_FULL);
    }
}

/// A response write by thread `tid` at `ts` (`c.agg.last_write_ns`): a request's CPU time
/// ends at its last response write. The clock is read at once only on a thread serving
/// requests concurrently; otherwise later (`settle_cpu_end`), sparing each write a lookup.
#[inline(always)]
pub fn wrote(c: &mut ConnState, tid: u32, ts: u64) {
    if c.agg.flags & AGG_CPU_EACH_WRITE != 0 {
        mark_cpu_end(c, tid, ts);
    } else if c.agg.flags & AGG_CPU != 0 && c.agg.tid == tid {
        c.agg.flags |= AGG_CPU_AT_WRITE;
        c.agg.last_write_steal_ns = stolen_here();
    }
}

/// The serving thread's CPU time at `ts`, if the current thread (`tid`) is it.
#[inline(always)]
pub fn mark_cpu_end(c: &mut ConnState, tid: u32, ts: u64) {
    if c.agg.flags & AGG_CPU == 0 || c.agg.tid != tid {
        return;
    }
    // SAFETY: u64 fields copied out at once.
    if let Some(t) = unsafe { THREADS.get(&c.agg.tid) } {
        c.agg.cpu_end_ns = cpu_now_here(t, ts);
    }
}

/// The request on `c` (`key`) ends: a call still open for it ends first (its record must
/// precede the request's), and its thread has one request less in flight.
#[inline(always)]
pub fn request_ending(c: &mut ConnState, key: u64) {
    end_open_call(c, key);
    if c.agg.write_calls == 0 {
        mark_cpu_end(c, pid_tgid().0 as u32, now());
    }
    if let Some(t) = THREADS.get_ptr_mut(&c.agg.tid) {
        // SAFETY: map value pointer valid for this program run.
        let t = unsafe { &mut *t };
        settle_cpu_end(c, t, c.agg.tid, true);
        t.in_flight = t.in_flight.saturating_sub(1);
    }
}
