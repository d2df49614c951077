//! Bench only, never loaded by the agent: `cargo xtask bench` (section 6) attaches this next to
//! the agent to measure what emitting one request record costs on its own, on the hook that ends
//! a request, under the same load: reserve a record of a request's size in a ring buffer, write
//! what the record of a /hello request holds (its header, its counters, the kept bytes of wrk's
//! request head and of gunicorn's response, copied from a connection state in per-CPU memory as
//! the agent's programs copy them), submit it without a wake-up, as the agent's programs do. The
//! bench drains the ring as the agent drains its own.
#![no_std]
#![no_main]

mod runtime;

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext,
};
use wsgiscope_common::{heads::copy_head, ConnState, EventKind, RequestEvent, SYSCALL_ARGS_OFFSET};

/// As large as the agent's ring.
#[map]
static RECORDS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Kept head bytes of a /hello request under the bench (strace): wrk's request head, and
/// gunicorn's response (head, chunk and terminator, in three writes).
const REQ_HEAD_BYTES: u32 = 46;
const RESP_HEAD_BYTES: u32 = 169;

/// The connection state the record is copied from (the agent's programs copy it from the
/// state the request's end has just looked up: hot in the cache).
#[map]
static SOURCE: PerCpuArray<ConnState> = PerCpuArray::with_max_entries(1, 0);

#[tracepoint]
pub fn sys_enter_shutdown(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the fd argument, an aligned u64 inside the syscall's tracepoint record.
    let fd = unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(SYSCALL_ARGS_OFFSET).cast::<u64>()) };
    let Some(c) = SOURCE.get_ptr(0) else { return 0 };
    let Some(mut entry) = RECORDS.reserve::<RequestEvent>(0) else { return 0 };
    let e = entry.as_mut_ptr();
    // SAFETY: reserved ring-buffer memory of the record's size, written as `finish_request`
    // writes it; `c` is this CPU's slot of `SOURCE`, valid for the program run.
    unsafe {
        (*e).agg = (*c).agg;
        copy_head(&mut (*e).req_head, &(*c).req_head, REQ_HEAD_BYTES);
        copy_head(&mut (*e).resp_head, &(*c).resp_head, RESP_HEAD_BYTES);
        (*e).kind = EventKind::Request as u32;
        (*e).end_reason = 0;
        (*e).tgid = (id >> 32) as u32;
        (*e).fd = fd as u32;
        (*e).root = 0;
        (*e)._pad = 0;
        (*e).end_ns = 0;
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    0
}
