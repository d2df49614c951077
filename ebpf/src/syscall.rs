//! Reading syscall tracepoint records: `syscalls/sys_enter_*` carry six 8-byte arguments
//! from offset 16, `syscalls/sys_exit_*` the return value at offset 16.
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::TracePointContext, EbpfContext};

/// One tracepoint program per name (the name is the tracepoint's), each running `$body`.
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

#[inline(always)]
pub fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    field(ctx, 16 + 8 * n)
}

#[inline(always)]
pub fn ret(ctx: &TracePointContext) -> i64 {
    field::<i64>(ctx, 16)
}

/// A field of a tracepoint record, loaded directly: the verifier allows aligned reads of the
/// record, and `read_at` would cost a bpf_probe_read_kernel call (the priciest part of a probe
/// on kernels with return-thunk mitigations).
#[inline(always)]
pub fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: `offset` is a constant, aligned offset inside the tracepoint record.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

#[inline(always)]
pub fn pid_tgid() -> (u64, u32) {
    let id = bpf_get_current_pid_tgid();
    (id, (id >> 32) as u32)
}

use aya_ebpf::helpers::generated::{
    bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
};
use wsgiscope_common::{
    conn_key, Pending, OP_READV, OP_RECVMSG, OP_SENDFILE, OP_SENDMSG, OP_WRITE, OP_WRITEV,
    STAT_PENDING_TABLE_FULL,
};

use crate::{
    conn::now,
    maps::{bump, root_of, PENDING},
};

/// On a syscall's enter: if a traced process makes it, remember it for the exit tracepoint,
/// which checks whether the fd is a connection. This is the whole cost for untraced processes:
/// one hash lookup. (Looking the connection up here too would cost every write a second lookup.)
#[inline(always)]
pub fn stash(ctx: &TracePointContext, op: u32) {
    stash_fd(op, arg(ctx, 0), || (arg(ctx, 1), requested(ctx, op)));
}

/// `stash` for a known fd; `what` gives (buffer, requested length).
#[inline(always)]
pub fn stash_fd(op: u32, fd: u64, what: impl FnOnce() -> (u64, u64)) {
    let (id, tgid) = pid_tgid();
    if root_of(tgid).is_none() {
        return;
    }
    let (buf, len) = what();
    remember(id, Pending { key: conn_key(tgid, fd as u32), buf, len, enter_ns: now(), op, _pad: 0 });
}

/// Stores what the exit tracepoint needs in this thread's slot. The slot is written in place
/// once it exists (a hash insert and delete per syscall cost more than the rest of the
/// program); it is freed when the thread exits.
#[inline(always)]
pub fn remember(id: u64, p: Pending) {
    if let Some(slot) = PENDING.get_ptr_mut(&id) {
        // SAFETY: map value pointer valid for this program run; only this thread uses it.
        unsafe { *slot = p };
    } else if PENDING.insert(&id, &p, 0).is_err() {
        bump(STAT_PENDING_TABLE_FULL);
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

/// On a syscall's exit: its first two arguments (fd or socket, buffer), from the user registers
/// the kernel saved at syscall entry (x86-64 `struct pt_regs`: `si` at 104, `di` at 112). One
/// helper call here spares an enter program, and every process on the node its cost.
#[inline(always)]
pub fn entry_args() -> Option<(u64, u64)> {
    let mut si_di = [0u64; 2];
    // SAFETY: the helpers return the current task's saved registers; the read reports faults.
    let rc = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        bpf_probe_read_kernel(si_di.as_mut_ptr().cast(), 16, regs.wrapping_add(104).cast())
    };
    (rc == 0).then_some((si_di[1], si_di[0]))
}

/// On a syscall's exit: the stashed enter, if any (the slot is then marked empty, `op` 0).
#[inline(always)]
pub fn take() -> Option<Pending> {
    let (id, _) = pid_tgid();
    let slot = PENDING.get_ptr_mut(&id)?;
    // SAFETY: map value pointer valid for this program run; only this thread uses it.
    unsafe {
        if (*slot).op == 0 {
            return None;
        }
        let p = *slot;
        (*slot).op = 0;
        Some(p)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

#[inline(always)]
pub fn read_user<T: Copy>(addr: u64) -> Option<T> {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: faults are reported by the helper, never taken.
    let rc = unsafe {
        bpf_probe_read_user(v.as_mut_ptr().cast(), core::mem::size_of::<T>() as u32, addr as *const _)
    };
    (rc == 0).then(|| unsafe { v.assume_init() })
}

/// The first contiguous piece of the data a syscall transferred: (user address, length).
/// For vectored calls that is the first iovec (the head of a request or response).
#[inline(always)]
pub fn first_piece(op: u32, buf: u64, transferred: u64) -> (u64, u64) {
    let iov_addr = match op {
        OP_SENDFILE => return (0, 0),
        OP_READV | OP_WRITEV => buf,
        // struct msghdr: msg_name, msg_namelen (+pad), msg_iov at offset 16.
        OP_RECVMSG | OP_SENDMSG => match read_user::<u64>(buf + 16) {
            Some(a) => a,
            None => return (0, 0),
        },
        _ => return (buf, transferred),
    };
    match read_user::<IoVec>(iov_addr) {
        Some(iov) => (iov.base, if iov.len < transferred { iov.len } else { transferred }),
        None => (0, 0),
    }
}

/// Does this data begin like a new request? (HTTP/1.x: an upper-case method token and a space.)
#[inline(always)]
pub fn looks_like_request(src: u64, n: u64) -> bool {
    if n < 4 {
        return false;
    }
    let Some(b) = read_user::<[u8; 8]>(src) else { return false };
    let mut i = 0;
    while i < 8 {
        let ch = b[i];
        if ch == b' ' {
            return i >= 3 && (i as u64) < n;
        }
        if !ch.is_ascii_uppercase() {
            return false;
        }
        i += 1;
    }
    false
}

/// Copies the first (up to 8) bytes of a write into `dst`.
#[inline(always)]
pub fn prefix8(dst: &mut [u8; 8], src: u64, n: u64) {
    *dst = [0; 8];
    if n >= 8 {
        if let Some(b) = read_user::<[u8; 8]>(src) {
            *dst = b;
        }
    } else if n > 0 {
        let n = (n & 7) as u32;
        // SAFETY: n < 8 bytes into an 8-byte array.
        unsafe { bpf_probe_read_user(dst.as_mut_ptr().cast(), n, src as *const _) };
    }
}
