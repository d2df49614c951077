//! Which processes are traced: the attached master and every descendant, followed on fork in
//! the kernel (a worker forked between two agent polls keeps its first request).
use aya_ebpf::{helpers::bpf_get_current_comm, macros::tracepoint, programs::TracePointContext};
use wsgiscope_common::{EventKind, ExecEvent, ExitEvent, ForkEvent, ReapEvent, SERVER_COMMS, TASK_CALL_AWAY, TASK_IN_REQUEST, TASK_SERVING};

use crate::{
    conn::now,
    events::emit,
    maps::{root_of, serving, set_mark, trace_task, untrace_task, PENDING, THREADS},
    tp::{pid_tgid, programs, ret},
    user::{entry_args, read_user},
};

/// Field offsets of sched tracepoints differ between kernels; the agent reads them from tracefs
/// and rewrites these globals (named in `wsgiscope_common::layout`: `GLOBAL_*`).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;
/// 0 when the kernel's sched_process_exit has no `group_dead` field.
#[unsafe(no_mangle)]
static EXIT_GROUP_DEAD_OFFSET: u32 = 32;

/// Set by `wsgiscope daemon`: trace every process that execs a WSGI server, from its exec on.
#[unsafe(no_mangle)]
static WATCH_EXECS: u32 = 0;

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let (_, parent) = pid_tgid();
    let Some(root) = root_of(parent) else { return 0 };
    // SAFETY: volatile read of a global the loader may have rewritten.
    let off = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    // SAFETY: the helper behind read_at reports a bad offset instead of faulting.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(off) }) else { return 0 };
    // The child may be a thread; its tid in TRACED is harmless and removed when it exits.
    trace_task(child, root);
    emit(&ForkEvent { kind: EventKind::Fork as u32, parent, child, root, ts_ns: now() });
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let (id, tgid) = pid_tgid();
    let tid = id as u32;
    let _ = PENDING.remove(&id);
    crate::pending::thread_exiting(tid);
    let Some(root) = root_of(tgid) else { return 0 };
    if serving(tid) {
        let _ = THREADS.remove(&tid);
    }
    set_mark(tid, TASK_SERVING | TASK_CALL_AWAY | TASK_IN_REQUEST, false);
    if tid != tgid {
        untrace_task(tid);
    }
    // SAFETY: volatile read of a global the loader may have rewritten.
    let off = unsafe { core::ptr::read_volatile(&EXIT_GROUP_DEAD_OFFSET) } as usize;
    let group_dead = if off == 0 {
        tid == tgid
    } else {
        // SAFETY: the helper behind read_at reports a bad offset instead of faulting.
        unsafe { ctx.read_at::<u8>(off) }.unwrap_or(0) != 0
    };
    if group_dead {
        // The agent ends requests still open on this process's sockets.
        untrace_task(tgid);
        emit(&ExitEvent { kind: EventKind::Exit as u32, tgid, root, _pad: 0, ts_ns: now() });
    }
    0
}

/// The master reaping a worker tells how it ended (exit code or signal): the status wait4 wrote
/// through its second argument.
#[inline(always)]
fn wait_done(ctx: &TracePointContext) {
    let reaped = ret(ctx);
    if reaped <= 0 {
        return;
    }
    let (_, tgid) = pid_tgid();
    let Some(root) = root_of(tgid) else { return };
    let Some((_, status_ptr)) = entry_args() else { return };
    if status_ptr == 0 {
        return;
    }
    if let Some(status) = read_user::<i32>(status_ptr) {
        let (kind, child) = (EventKind::Reap as u32, reaped as u32);
        emit(&ReapEvent { kind, parent: tgid, child, root, status, _pad: 0, ts_ns: now() });
    }
}

programs!(sys_exit_wait4 => |ctx| wait_done(&ctx));

/// `wsgiscope daemon`: a process that execs a WSGI server is traced from that moment, so not
/// one fork of its workers is missed; the agent checks it and gives it up if it is not one.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    // SAFETY: volatile read of a global the loader may have rewritten.
    if unsafe { core::ptr::read_volatile(&WATCH_EXECS) } == 0 {
        return 0;
    }
    let Ok(comm) = bpf_get_current_comm() else { return 0 };
    let name_is = |n: &str| comm.starts_with(n.as_bytes()) && comm.get(n.len()) == Some(&0);
    if !(name_is(SERVER_COMMS[0]) || name_is(SERVER_COMMS[1]) || name_is(SERVER_COMMS[2]) || name_is(SERVER_COMMS[3])) {
        return 0;
    }
    let (_, tgid) = pid_tgid();
    if root_of(tgid).is_some() {
        return 0; // already followed, as a descendant of a watched server
    }
    trace_task(tgid, tgid);
    emit(&ExecEvent { kind: EventKind::Exec as u32, tgid, ts_ns: now() });
    0
}
