//! The traced process's resident memory at a request's start and end, from the kernel's own
//! per-mm counters (`mm->rss_stat[]`, what /proc/PID/status adds up as VmRSS): no /proc read
//! per request. The counters are per-CPU batched; their shared `count`, read here, lags the
//! exact sum by less than the batch (at least 32 pages) per CPU.
use wsgiscope_common::{ConnState, AGG_RSS};

use crate::user::current_task_u64;

// Set by the agent from the kernel's BTF (0: not measured); see `GLOBAL_RSS_*`.
#[unsafe(no_mangle)]
static RSS_MM_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static RSS_STAT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static RSS_WORDS: [u32; 3] = [0; 3];

/// Resident pages of the current task's process, now (None for a task without memory).
/// Loaded straight from the kernel-typed task pointer (`current->mm->rss_stat[]`): the verifier
/// checks each field against the kernel's BTF at the offsets the agent set (constants to it:
/// the globals are frozen), and the JIT emits plain loads. A `bpf_probe_read_kernel` call cost
/// each read ~60 ns more here.
#[inline(always)]
fn rss_pages() -> Option<u64> {
    let (mm_off, stat_off, words) = layout();
    if mm_off == 0 {
        return None;
    }
    // `task_struct.mm`, null for a kernel thread: a kernel-typed pointer to the verifier.
    let mm = current_task_u64(mm_off) as *const u8;
    if mm.is_null() {
        return None;
    }
    // SAFETY: BTF-typed loads of the `count` of three `percpu_counter`s; a fault on such a
    // load reads 0, it is never taken.
    let pages = unsafe {
        let stat = mm.add(stat_off as usize).cast::<i64>();
        let mut pages = 0i64;
        for w in words {
            pages += core::ptr::read_volatile(stat.add(w as usize));
        }
        pages
    };
    // A batched count can dip below zero for a moment.
    Some(if pages > 0 { pages as u64 } else { 0 })
}

/// The globals the agent set: (task_struct.mm, mm_struct.rss_stat, the counters' words).
#[inline(always)]
fn layout() -> (u32, u32, [u32; 3]) {
    // SAFETY: volatile reads of globals the loader may have rewritten.
    unsafe {
        (
            core::ptr::read_volatile(&RSS_MM_OFFSET),
            core::ptr::read_volatile(&RSS_STAT_OFFSET),
            core::ptr::read_volatile(&RSS_WORDS),
        )
    }
}

/// At a request's start (on a thread of its process).
#[inline(always)]
pub fn request_started(c: &mut ConnState) {
    match rss_pages() {
        Some(p) => {
            c.agg.rss_start_pages = p;
            c.agg.flags |= AGG_RSS;
        }
        None => c.agg.flags &= !AGG_RSS,
    }
}

/// At its end (the syscall that ends it is its process's).
#[inline(always)]
pub fn request_ending(c: &mut ConnState) {
    if c.agg.flags & AGG_RSS == 0 {
        return;
    }
    match rss_pages() {
        Some(p) => c.agg.rss_end_pages = p,
        None => c.agg.flags &= !AGG_RSS,
    }
}
