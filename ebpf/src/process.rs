//! Which processes are traced: the attached master and every descendant, followed on fork in
//! the kernel (a worker forked between two agent polls keeps its first request).
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use aya_ebpf::helpers::bpf_get_current_comm;
use wsgiscope_common::{ProcessEvent, EVENT_EXEC, EVENT_EXIT, EVENT_FORK, EVENT_REAP, STAT_RINGBUF_FULL};

use crate::{
    conn::now,
    maps::{bump, root_of, EVENTS, PENDING, TRACED},
    syscall::{entry_args, pid_tgid, programs, read_user, ret},
};

/// Field offsets of sched tracepoints differ between kernels; the agent reads them from tracefs.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;
/// 0 when the kernel's sched_process_exit has no `group_dead` field.
#[unsafe(no_mangle)]
static EXIT_GROUP_DEAD_OFFSET: u32 = 32;

/// Set by `wsgiscope daemon`: trace every process that execs a WSGI server, from its exec on.
#[unsafe(no_mangle)]
static WATCH_EXECS: u32 = 0;

pub fn emit(kind: u32, tgid: u32, child: u32, root: u32, status: i32) {
    let ev = ProcessEvent { kind, tgid, child, root, status, _pad: 0, ts_ns: now() };
    if EVENTS.output::<ProcessEvent>(&ev, 0).is_err() {
        bump(STAT_RINGBUF_FULL);
    }
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let (_, parent) = pid_tgid();
    let Some(root) = root_of(parent) else { return 0 };
    // SAFETY: volatile read of a global the loader may have rewritten.
    let off = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    let Ok(child) = (unsafe { ctx.read_at::<u32>(off) }) else { return 0 };
    // The child may be a thread; its tid in TRACED is harmless and removed when it exits.
    let _ = TRACED.insert(&child, &root, 0);
    emit(EVENT_FORK, parent, child, root, 0);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let (id, tgid) = pid_tgid();
    let tid = id as u32;
    let _ = PENDING.remove(&id);
    let Some(root) = root_of(tgid) else { return 0 };
    if tid != tgid {
        let _ = TRACED.remove(&tid);
    }
    let off = unsafe { core::ptr::read_volatile(&EXIT_GROUP_DEAD_OFFSET) } as usize;
    let group_dead = if off == 0 {
        tid == tgid
    } else {
        unsafe { ctx.read_at::<u8>(off) }.unwrap_or(0) != 0
    };
    if group_dead {
        // The agent ends requests still open on this process's sockets.
        let _ = TRACED.remove(&tgid);
        emit(EVENT_EXIT, tgid, 0, root, 0);
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
        emit(EVENT_REAP, tgid, reaped as u32, root, status);
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
    let name_is = |n: &[u8]| comm.starts_with(n) && comm.get(n.len()) == Some(&0);
    if !(name_is(b"gunicorn") || name_is(b"uwsgi") || name_is(b"apache2") || name_is(b"httpd")) {
        return 0;
    }
    let (_, tgid) = pid_tgid();
    if root_of(tgid).is_some() {
        return 0; // already followed, as a descendant of a watched server
    }
    let _ = TRACED.insert(&tgid, &tgid, 0);
    emit(EVENT_EXEC, tgid, 0, tgid, 0);
    0
}
