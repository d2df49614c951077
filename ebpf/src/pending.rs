//! Syscalls in flight: what a write or poll's enter tracepoint remembers for its exit, in a
//! per-thread slot of `PENDING`.
use aya_ebpf::programs::TracePointContext;
use wsgiscope_common::{conn_key, Pending, OP_SENDFILE, OP_SENDMSG, OP_WRITE, OP_WRITEV, STAT_PENDING_TABLE_FULL};

use crate::{
    conn::now,
    maps::{bump, traced, PENDING},
    tp::{arg, pid_tgid},
    user::{read_user, IoVec},
};

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
    remember(id, Pending { key: conn_key(tgid, fd as u32), buf, len, enter_ns: now(), op, _pad: 0 });
}

/// Stores what the exit tracepoint needs in this thread's slot. The slot is written in place
/// once it exists (a hash insert and delete per syscall cost more than the rest of the
/// program); it is freed when the thread exits.
#[inline(always)]
fn remember(id: u64, p: Pending) {
    if let Some(slot) = PENDING.get_ptr_mut(&id) {
        // SAFETY: map value pointer valid for this program run; only this thread uses it.
        unsafe { *slot = p };
    } else if PENDING.insert(&id, &p, 0).is_err() {
        bump(STAT_PENDING_TABLE_FULL);
    }
}

/// On a syscall's exit: the stashed enter, if any (the slot is then marked empty, `op` 0).
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
