//! The traced process's resident memory at a request's start and end, from the kernel's own
//! per-mm counters (`mm->rss_stat[]`, what /proc/PID/status adds up as VmRSS): no /proc read
//! per request. The counters are per-CPU batched; their shared `count`, read here, lags the
//! exact sum by less than the batch (at least 32 pages) per CPU.
use aya_ebpf::helpers::generated::bpf_probe_read_kernel;
use wsgiscope_common::{ConnState, AGG_RSS, RSS_READ};

use crate::user::current_task_u64;

// Set by the agent from the kernel's BTF (0: not measured); see `GLOBAL_RSS_*`.
#[unsafe(no_mangle)]
static RSS_MM_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static RSS_STAT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static RSS_WORDS: [u32; 3] = [0; 3];

const WORDS: usize = RSS_READ / 8;

/// Resident pages of the process whose `mm_struct` is at `mm`, now.
#[inline(always)]
fn rss_pages(mm: u64, stat_off: u32, words: [u32; 3]) -> Option<u64> {
    let mut counters = [0i64; WORDS];
    // SAFETY: a read of kernel memory through the helper, which reports faults.
    let rc = unsafe { bpf_probe_read_kernel(counters.as_mut_ptr().cast(), RSS_READ as u32, (mm + stat_off as u64) as *const _) };
    if rc != 0 {
        return None;
    }
    let mut pages = 0i64;
    for w in words {
        pages += counters[w as usize % WORDS];
    }
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

/// At a request's start (on a thread of its process). The process's `mm_struct` is read once
/// per connection: the connection belongs to the process, whose mm lives as long as it does.
#[inline(always)]
pub fn request_started(c: &mut ConnState) {
    let (mm_off, stat_off, words) = layout();
    if mm_off == 0 {
        return;
    }
    // 0 for a kernel thread.
    if c.mm == 0 {
        c.mm = current_task_u64(mm_off).unwrap_or(0);
    }
    match (c.mm != 0).then(|| rss_pages(c.mm, stat_off, words)).flatten() {
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
    let (_, stat_off, words) = layout();
    match rss_pages(c.mm, stat_off, words) {
        Some(p) => c.agg.rss_end_pages = p,
        None => c.agg.flags &= !AGG_RSS,
    }
}
