//! Bench only, never loaded by the agent: `cargo xtask bench` (section 6) attaches this next to
//! the agent to measure what emitting one request record costs on its own, on the hook that ends
//! a request, under the same load: reserve a record of a request's size in a ring buffer, write
//! what the record of a /hello request holds (its header, its counters, the kept bytes of wrk's
//! request head and of gunicorn's response, copied a word at a time from per-CPU memory as the
//! agent's programs copy them from the connection's state), submit it without a wake-up, as the
//! agent's programs do. The bench drains the ring as the agent drains its own.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext,
};
use wsgiscope_common::{EventKind, RequestAgg, RequestEvent, SYSCALL_ARGS_OFFSET};

/// As large as the agent's ring.
#[map]
static RECORDS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Kept head bytes of a /hello request under the bench (strace): wrk's request head, and
/// gunicorn's response (head, chunk and terminator, in three writes).
const REQ_HEAD_BYTES: usize = 46;
const RESP_HEAD_BYTES: usize = 169;

/// Where the record's counters and heads are copied from (the agent's programs copy them from
/// the connection's state, which the request's end has just looked up: hot in the cache).
#[map]
static SOURCE: PerCpuArray<[u64; 64]> = PerCpuArray::with_max_entries(1, 0);

/// Copies `words` 8-byte words from `src` to `dst`, plain loads and stores as the agent's
/// programs copy a record's heads (volatile, so that LLVM emits no memcpy call).
#[inline(always)]
fn copy_words<const WORDS: usize>(dst: *mut u8, src: *const u64) {
    let d = dst.cast::<u64>();
    let mut i = 0;
    while i < WORDS {
        // SAFETY: the callers' ranges lie inside the reserved record and the 64-word source.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(src.add(i))) };
        i += 1;
    }
}

#[tracepoint]
pub fn sys_enter_shutdown(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the fd argument, an aligned u64 inside the syscall's tracepoint record.
    let fd = unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(SYSCALL_ARGS_OFFSET).cast::<u64>()) };
    let Some(src) = SOURCE.get_ptr(0) else { return 0 };
    let src = src.cast::<u64>();
    let Some(mut entry) = RECORDS.reserve::<RequestEvent>(0) else { return 0 };
    let e = entry.as_mut_ptr();
    const AGG_WORDS: usize = core::mem::size_of::<RequestAgg>() / 8;
    const { assert!(core::mem::size_of::<RequestAgg>() % 8 == 0 && AGG_WORDS <= 64) };
    // SAFETY: reserved ring-buffer memory of the record's size: its header, counters and the
    // kept bytes of both heads are written (whole words), inside their fields.
    unsafe {
        copy_words::<AGG_WORDS>(core::ptr::addr_of_mut!((*e).agg).cast(), src);
        copy_words::<{ REQ_HEAD_BYTES.div_ceil(8) }>(core::ptr::addr_of_mut!((*e).req_head).cast(), src);
        copy_words::<{ RESP_HEAD_BYTES.div_ceil(8) }>(core::ptr::addr_of_mut!((*e).resp_head).cast(), src);
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
