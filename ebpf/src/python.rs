//! CPython garbage collections: uprobes where a collection starts (USDT `python:gc__start`, or
//! the entry of `gc_collect_main` where the build has no USDT notes) and where it ends
//! (`python:gc__done`, or the return of `gc_collect_main`). Collections are rare next to
//! syscalls; each is one record. Never probe per-call paths (function__entry costs ~1.5 µs a call).
use aya_ebpf::{
    bindings::pt_regs,
    helpers::generated::{bpf_get_attach_cookie, bpf_probe_read_kernel},
    macros::{map, uprobe, uretprobe},
    maps::HashMap,
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use wsgiscope_common::{reg as r, EventKind, GcEvent, GcStart, GEN_IN_MEM, GEN_IN_REG};

use crate::{conn::now, events::emit, maps::root_of, tp::pid_tgid, user::read_user};

/// Collections in progress: pid_tgid → start.
#[map]
static GC_STARTED: HashMap<u64, GcStart> = HashMap::with_max_entries(8192, 0);

/// One register of the probed thread (copied off the context first: the verifier refuses
/// context loads at offsets the compiler computes).
#[inline(always)]
fn reg(ctx: &ProbeContext, idx: u64) -> Option<u64> {
    let mut regs = core::mem::MaybeUninit::<pt_regs>::uninit();
    // SAFETY: copies the kernel's pt_regs of this probe hit; on failure we read nothing.
    let rc = unsafe {
        bpf_probe_read_kernel(regs.as_mut_ptr().cast(), core::mem::size_of::<pt_regs>() as u32, ctx.regs as *const _)
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: initialised by the successful read.
    let regs = unsafe { regs.assume_init() };
    Some(match idx {
        r::RBP => regs.rbp,
        r::RBX => regs.rbx,
        r::RDX => regs.rdx,
        r::RSI => regs.rsi,
        r::RDI => regs.rdi,
        r::RSP => regs.rsp,
        r::R12 => regs.r12,
        r::R13 => regs.r13,
        r::R14 => regs.r14,
        r::R15 => regs.r15,
        r::RAX => regs.rax,
        r::RCX => regs.rcx,
        _ => return None,
    })
}

/// The generation, where the attach cookie says it is.
#[inline(always)]
fn generation(ctx: &ProbeContext, cookie: u64) -> i32 {
    let idx = (cookie >> 16) & 0xffff;
    if cookie & GEN_IN_REG != 0 {
        return reg(ctx, cookie & 0xffff).map_or(-1, |v| v as i32);
    }
    if cookie & GEN_IN_MEM != 0 {
        let off = (cookie & 0xffff) as u16 as i16 as i64;
        if let Some(base) = reg(ctx, idx) {
            return read_user::<i32>((base as i64 + off) as u64).unwrap_or(-1);
        }
    }
    -1
}

#[uprobe]
pub fn gc_start(ctx: ProbeContext) -> u32 {
    let (id, tgid) = pid_tgid();
    if root_of(tgid).is_none() {
        return 0;
    }
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let start = GcStart { start_ns: now(), generation: generation(&ctx, cookie), _pad: 0 };
    let _ = GC_STARTED.insert(&id, &start, 0);
    0
}

#[inline(always)]
fn gc_end() {
    let (id, tgid) = pid_tgid();
    // SAFETY: copied out before removal.
    let Some(start) = (unsafe { GC_STARTED.get(&id) }).copied() else { return };
    let _ = GC_STARTED.remove(&id);
    let Some(root) = root_of(tgid) else { return };
    let ev = GcEvent {
        kind: EventKind::Gc as u32,
        tgid,
        tid: id as u32,
        root,
        generation: start.generation,
        _pad: 0,
        start_ns: start.start_ns,
        end_ns: now(),
    };
    emit(&ev);
}

#[uprobe]
pub fn gc_done(_ctx: ProbeContext) -> u32 {
    gc_end();
    0
}

#[uretprobe]
pub fn gc_return(_ctx: RetProbeContext) -> u32 {
    gc_end();
    0
}
