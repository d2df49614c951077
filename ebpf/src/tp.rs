//! Tracepoint access: the program macro, syscall arguments and return values, record fields.
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::TracePointContext, EbpfContext};
use wsgiscope_common::{SYSCALL_ARGS_OFFSET, SYSCALL_RET_OFFSET};

/// One tracepoint program per name (the name is the tracepoint's: the loader attaches it
/// there), each running `$body`.
macro_rules! programs {
    ($($name:ident),+ => |$ctx:ident| $body:expr) => {
        $(
            #[aya_ebpf::macros::tracepoint]
            pub fn $name($ctx: aya_ebpf::programs::TracePointContext) -> u32 {
                $body;
                0
            }
        )+
    };
}
pub(crate) use programs;

/// Argument `n` of a `sys_enter_*` record.
#[inline(always)]
pub fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    field(ctx, SYSCALL_ARGS_OFFSET + 8 * n)
}

/// The return value in a `sys_exit_*` record.
#[inline(always)]
pub fn ret(ctx: &TracePointContext) -> i64 {
    field::<i64>(ctx, SYSCALL_RET_OFFSET)
}

/// A field of a tracepoint record, loaded directly: the verifier allows aligned reads of the
/// record, and `read_at` would cost a bpf_probe_read_kernel call (the priciest part of a probe
/// on kernels with return-thunk mitigations).
#[inline(always)]
pub fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: `offset` is a constant, aligned offset inside the tracepoint record.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

/// (pid_tgid, tgid) of the current task.
#[inline(always)]
pub fn pid_tgid() -> (u64, u32) {
    let id = bpf_get_current_pid_tgid();
    (id, (id >> 32) as u32)
}
