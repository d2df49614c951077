//! Reading the traced process's memory: syscall buffers, iovecs, and the arguments saved at
//! syscall entry; and fields of the current task at offsets the agent found in the kernel's BTF.
use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs};
use wsgiscope_common::{reg, OP_READV, OP_RECVMSG, OP_SENDFILE, OP_SENDMSG, OP_WRITEV};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoVec {
    pub base: u64,
    pub len: u64,
}

#[inline(always)]
pub fn read_user<T: Copy>(addr: u64) -> Option<T> {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: faults are reported by the helper, never taken.
    let rc = unsafe {
        bpf_probe_read_user(v.as_mut_ptr().cast(), core::mem::size_of::<T>() as u32, addr as *const _)
    };
    // SAFETY: the helper filled `v` when it returned 0.
    (rc == 0).then(|| unsafe { v.assume_init() })
}

/// The current task, as a kernel-typed pointer: fields at offsets the agent found in the
/// kernel's BTF are loaded from it straight (the verifier checks them against that BTF; no
/// helper call to read them).
#[inline(always)]
pub fn current_task() -> *const u8 {
    // SAFETY: the helper takes no argument and returns the running task, never null.
    unsafe { bpf_get_current_task_btf() as *const u8 }
}

/// The u64 at byte `offset` of the kernel object `base` points to, where `base` is a
/// kernel-typed pointer and `offset` a constant to the verifier (a frozen global).
#[inline(always)]
pub fn load_u64(base: *const u8, offset: u32) -> u64 {
    // SAFETY: a BTF-typed load of an 8-byte field; a fault on such a load reads 0.
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<u64>()) }
}

/// The u64 at byte `offset` of the current task's `task_struct`.
#[inline(always)]
pub fn current_task_u64(offset: u32) -> u64 {
    load_u64(current_task(), offset)
}

/// The runqueue (`struct rq *`) of the CPU `task` runs on: `task_struct.se.cfs_rq` at
/// `cfs_rq_off`, then `cfs_rq.rq` at `rq_off` (BTF-typed loads).
#[inline(always)]
pub fn rq_of(task: *const u8, cfs_rq_off: u32, rq_off: u32) -> Option<*const u8> {
    let cfs_rq = load_u64(task, cfs_rq_off) as *const u8;
    if cfs_rq.is_null() {
        return None;
    }
    let rq = load_u64(cfs_rq, rq_off) as *const u8;
    (!rq.is_null()).then_some(rq)
}

/// This CPU's runqueue, through the current task, which runs on it.
#[inline(always)]
pub fn current_rq(cfs_rq_off: u32, rq_off: u32) -> Option<*const u8> {
    rq_of(current_task(), cfs_rq_off, rq_off)
}

/// On a syscall's exit: its first two arguments (fd or socket, buffer), from the user registers
/// the kernel saved at syscall entry (`di` and `si` of `struct pt_regs`). One helper call here
/// spares an enter program, and every process on the node its cost. The registers are loaded
/// straight from the kernel-typed pointer `bpf_task_pt_regs` returns: the verifier checks the
/// fields against the kernel's BTF and the JIT emits plain loads (a `bpf_probe_read_kernel`
/// call cost each traced read ~60 ns more here).
#[inline(always)]
pub fn entry_args() -> Option<(u64, u64)> {
    // SAFETY: the helpers return the current task's saved registers as a BTF-typed pointer,
    // never null for a task in a syscall; `si` and `di` are 8-byte fields of `struct pt_regs`
    // (a fault on a BTF pointer load reads 0, it is never taken).
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u64;
        if regs.is_null() {
            return None;
        }
        let di = core::ptr::read_volatile(regs.add(reg::RDI as usize));
        let si = core::ptr::read_volatile(regs.add(reg::RSI as usize));
        Some((di, si))
    }
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
        // SAFETY: n < 8 bytes into an 8-byte array; faults are reported, never taken.
        unsafe { bpf_probe_read_user(dst.as_mut_ptr().cast(), n, src as *const _) };
    }
}
