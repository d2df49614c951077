//! Syscalls in flight: what a write, poll or connect's enter tracepoint remembers for its exit.
//!
//! The hand-over is the CPU's slot (`PENDING_ON_CPU`, an array lookup the JIT inlines) rather
//! than a per-thread hash entry (a lookup on each side, helper calls that pay this VM's
//! retpoline/return-thunk tax). A thread runs its syscall's enter and exit on one CPU unless it
//! leaves the CPU in between (it blocks, or is preempted): `sched_switch` then moves its slot to
//! `PENDING`, keyed by the thread, where the exit finds it on whatever CPU it wakes on. Without
//! `sched_switch` attached (`PENDING_ON_CPU_ENABLED` 0), `PENDING` is the only hand-over.
//!
//! The switch also tells whether a call slept (a write waiting on its client) or was only
//! preempted.
use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use wsgiscope_common::{
    conn_key,
    sched_switch::{PREV_PID, PREV_STATE},
    Pending, OP_SENDFILE, OP_SENDMSG, OP_SLEPT, OP_WRITE, OP_WRITEV, STAT_PENDING_TABLE_FULL, TASK_CALL_AWAY,
};

use crate::{
    conn::now,
    maps::{bump, has_mark, set_mark, traced, PENDING},
    tp::{arg, field, pid_tgid},
    user::{read_user, IoVec},
};

/// Every context switch on the node: for tasks wsgiscope does not trace, two array lookups
/// (inlined) are the whole cost.
#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let prev = field::<u32>(&ctx, PREV_PID as usize);
    // A write, poll or connect of `prev` still in flight leaves this CPU with it, asleep
    // (TASK_INTERRUPTIBLE or _UNINTERRUPTIBLE) or preempted.
    let sleeps = field::<u64>(&ctx, PREV_STATE as usize) & 3 != 0;
    if leaving_cpu(prev, sleeps) {
        set_mark(prev, TASK_CALL_AWAY, true);
    } else if sleeps && has_mark(prev, TASK_CALL_AWAY) && !sleeping_away() {
        // A call preempted before (a write copying 64 MiB yields the CPU on a busy host) can
        // sleep now: looked up only then, not at every switch. None in flight any more.
        set_mark(prev, TASK_CALL_AWAY, false);
    }
    0
}

/// Set by the agent when `sched_switch` is attached (it moves a slot off its CPU).
#[unsafe(no_mangle)]
static PENDING_ON_CPU_ENABLED: u32 = 0;

/// The syscall in flight of the thread running on this CPU (`op` 0: none).
#[map]
static PENDING_ON_CPU: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn on_cpu_enabled() -> bool {
    // SAFETY: volatile read of a global the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&PENDING_ON_CPU_ENABLED) != 0 }
}

/// This CPU's slot, when the hand-over goes through it.
#[inline(always)]
fn cpu_slot() -> Option<&'static mut Pending> {
    if !on_cpu_enabled() {
        return None;
    }
    // SAFETY: per-CPU slot, valid for the program run; programs on one CPU do not overlap.
    PENDING_ON_CPU.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// On a syscall's enter: if a traced process makes it, remember it for the exit tracepoint,
/// which checks whether the fd is a connection. This is the whole cost for untraced processes:
/// one array lookup, inlined. (Looking the connection up here too would cost every write a second lookup.)
#[inline(always)]
pub fn stash(ctx: &TracePointContext, op: u32) {
    stash_fd(op, arg(ctx, 0), || (arg(ctx, 1), requested(ctx, op)));
}

/// `stash` for a known fd; `what` gives (buffer, requested length).
#[inline(always)]
pub fn stash_fd(op: u32, fd: u64, what: impl FnOnce() -> (u64, u64)) {
    let (id, tgid) = pid_tgid();
    if !traced(tgid) {
        return;
    }
    let (buf, len) = what();
    let p = Pending { key: conn_key(tgid, fd as u32), buf, len, enter_ns: now(), op, tid: id as u32 };
    match cpu_slot() {
        Some(slot) => {
            // A slot still holding another thread's call lost its move off the CPU: moved now.
            if slot.op != 0 && slot.tid != p.tid {
                keep(slot.tid as u64 | ((slot.key >> 32) << 32), slot);
                set_mark(slot.tid, TASK_CALL_AWAY, true);
            }
            *slot = p;
        }
        None => keep(id, &p),
    }
}

/// Stores a call in flight in thread `id`'s entry of `PENDING`. The entry is written in place
/// once it exists (a hash insert and delete per syscall cost more than the rest of the
/// program); it is freed when the thread exits.
#[inline(always)]
fn keep(id: u64, p: &Pending) {
    if let Some(entry) = PENDING.get_ptr_mut(&id) {
        // SAFETY: map value pointer valid for this program run; only this thread's calls use it.
        unsafe { *entry = *p };
    } else if PENDING.insert(&id, p, 0).is_err() {
        bump(STAT_PENDING_TABLE_FULL);
    }
}

/// `sched_switch`: thread `tid` leaves this CPU, to sleep if `sleeps` (else preempted); a call
/// it has in flight moves to `PENDING`, for its exit on whatever CPU the thread runs next, and
/// says whether it slept (a write waiting on its client). True if a call moved.
#[inline(always)]
pub fn leaving_cpu(tid: u32, sleeps: bool) -> bool {
    let Some(slot) = cpu_slot() else { return false };
    if slot.op != 0 && slot.tid == tid {
        if sleeps {
            slot.op |= OP_SLEPT;
        }
        // The key holds the process (tgid) in its high half: with the tid, the thread's id.
        keep(tid as u64 | ((slot.key >> 32) << 32), slot);
        slot.op = 0;
        return true;
    }
    false
}

/// `sched_switch`: the current thread, whose call already waits in `PENDING` (it left the CPU
/// in it before, preempted), goes to sleep: the call slept. False if it has no call in flight
/// any more.
#[inline(always)]
pub fn sleeping_away() -> bool {
    let Some(entry) = PENDING.get_ptr_mut(&pid_tgid().0) else { return false };
    // SAFETY: map value pointer valid for this program run; its thread is the current task.
    unsafe {
        if (*entry).op == 0 {
            return false;
        }
        (*entry).op |= OP_SLEPT;
    }
    true
}

/// The thread `tid` is gone: a call it left in this CPU's slot is no one's.
#[inline(always)]
pub fn thread_exiting(tid: u32) {
    if let Some(slot) = cpu_slot() {
        if slot.tid == tid {
            slot.op = 0;
        }
    }
}

/// On a syscall's exit: the stashed enter, if any (its slot is then marked empty, `op` 0).
#[inline(always)]
pub fn take() -> Option<Pending> {
    let (id, tgid) = pid_tgid();
    take_for(id, tgid)
}

/// `take` for the current task's known `pid_tgid` (one helper call less for a caller that
/// needs it anyway).
#[inline(always)]
pub fn take_for(id: u64, tgid: u32) -> Option<Pending> {
    // Only traced processes stash: the others' exits end here, without a hash lookup.
    if !traced(tgid) {
        return None;
    }
    if let Some(slot) = cpu_slot() {
        if slot.op != 0 && slot.tid == id as u32 {
            let p = *slot;
            slot.op = 0;
            return Some(p);
        }
    }
    // The thread left the CPU during the call (it is marked so), or the hand-over is
    // `PENDING` only. Exits with nothing stashed (a poll for reading) end here, without a
    // hash lookup.
    let tid = id as u32;
    if on_cpu_enabled() {
        if !has_mark(tid, TASK_CALL_AWAY) {
            return None;
        }
        set_mark(tid, TASK_CALL_AWAY, false);
    }
    let entry = PENDING.get_ptr_mut(&id)?;
    // SAFETY: map value pointer valid for this program run; only this thread's calls use it.
    unsafe {
        if (*entry).op == 0 {
            return None;
        }
        let p = *entry;
        (*entry).op = 0;
        Some(p)
    }
}

/// Bytes a write-family call asks to transfer (first 8 iovecs of a vectored write).
#[inline(always)]
fn requested(ctx: &TracePointContext, op: u32) -> u64 {
    let (iov, cnt) = match op {
        OP_WRITE => return arg(ctx, 2),
        OP_SENDFILE => return arg(ctx, 3),
        OP_WRITEV => (arg(ctx, 1), arg(ctx, 2)),
        // struct msghdr: msg_iov at 16, msg_iovlen at 24.
        OP_SENDMSG => {
            let m = arg(ctx, 1);
            (read_user::<u64>(m + 16).unwrap_or(0), read_user::<u64>(m + 24).unwrap_or(0))
        }
        _ => return 0,
    };
    let mut total = 0u64;
    let mut i = 0u64;
    while i < 8 && i < cnt {
        if let Some(v) = read_user::<IoVec>(iov + i * 16) {
            total += v.len;
        }
        i += 1;
    }
    total
}
