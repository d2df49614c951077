//! Bench only, never loaded by the agent: `cargo xtask bench` (section 6) attaches this next to
//! the agent to measure the least a timed write on a traced connection can cost here, as the
//! agent's design does it, on the same hooks and in the same runs: on enter, the task id, the
//! traced check (an array the JIT inlines), a clock read and the call kept in this CPU's slot;
//! on exit, the task id, the traced check, the slot taken, the connection looked up by
//! (process, fd) in a hash map, a clock read, and the write's time, count and bytes added up.
//! It reads the agent's own `TRACED_TASKS` and `CONNS` (the bench hands them over by pinning),
//! so it finds the connections and the traced processes the agent does, and writes none of the
//! agent's state: its sums go to a map of its own. What the agent does beyond this (the serving
//! thread's CPU clock, the response head, pipelining, partial writes, sleeps, downstream calls)
//! is the rest of its programs' run time.
#![no_std]
#![no_main]

mod runtime;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::TracePointContext,
    EbpfContext,
};
use wsgiscope_common::{
    conn_key, ConnState, Pending, TaskMark, CONN_IN_REQUEST, OP_WRITE, SYSCALL_ARGS_OFFSET, SYSCALL_RET_OFFSET,
};

/// The agent's maps (same names and definitions as in `maps.rs`; the bench pins them for this
/// object's loader to reuse).
#[map]
static TRACED_TASKS: Array<TaskMark> = Array::with_max_entries(4 << 20, 0);
#[map]
static CONNS: HashMap<u64, ConnState> = HashMap::with_max_entries(8192, 0);

/// The write in flight of the thread on this CPU (`op` 0: none).
#[map]
static SLOT: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: time in writes, writes, bytes.
#[map]
static SUMS: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn field(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: an aligned u64 inside the syscall's tracepoint record.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<u64>()) }
}

#[inline(always)]
fn traced(tgid: u32) -> bool {
    TRACED_TASKS.get(tgid).is_some_and(|m| m.root != 0)
}

#[inline(always)]
fn enter(ctx: &TracePointContext) {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !traced(tgid) {
        return;
    }
    let Some(slot) = SLOT.get_ptr_mut(0) else { return };
    let fd = field(ctx, SYSCALL_ARGS_OFFSET) as u32;
    // SAFETY: helper without arguments.
    let enter_ns = unsafe { bpf_ktime_get_ns() };
    let p = Pending {
        key: conn_key(tgid, fd),
        buf: field(ctx, SYSCALL_ARGS_OFFSET + 8),
        len: field(ctx, SYSCALL_ARGS_OFFSET + 16),
        enter_ns,
        op: OP_WRITE,
        tid: id as u32,
    };
    // SAFETY: this CPU's slot, valid for the program run.
    unsafe { *slot = p };
}

#[inline(always)]
fn exit(ctx: &TracePointContext) {
    let id = bpf_get_current_pid_tgid();
    if !traced((id >> 32) as u32) {
        return;
    }
    let Some(slot) = SLOT.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot, valid for the program run.
    let p = unsafe {
        if (*slot).op == 0 || (*slot).tid != id as u32 {
            return;
        }
        (*slot).op = 0;
        *slot
    };
    let Some(c) = CONNS.get_ptr(&p.key) else { return };
    // SAFETY: map value pointer valid for the program run; read only.
    if unsafe { (*c).flags } & CONN_IN_REQUEST == 0 {
        return;
    }
    // SAFETY: helper without arguments.
    let ts = unsafe { bpf_ktime_get_ns() };
    let n = field(ctx, SYSCALL_RET_OFFSET) as i64;
    let Some(sums) = SUMS.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot, valid for the program run.
    unsafe {
        (*sums)[0] += ts.saturating_sub(p.enter_ns);
        if n > 0 {
            (*sums)[1] += 1;
            (*sums)[2] += n as u64;
        }
    }
}

#[tracepoint]
pub fn sys_enter_write(ctx: TracePointContext) -> u32 {
    enter(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_write(ctx: TracePointContext) -> u32 {
    exit(&ctx);
    0
}

#[tracepoint]
pub fn sys_enter_sendto(ctx: TracePointContext) -> u32 {
    enter(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_sendto(ctx: TracePointContext) -> u32 {
    exit(&ctx);
    0
}
