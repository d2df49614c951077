//! Every record the kernel side writes to the ring buffer goes through here, with one wake-up
//! policy: the agent drains the ring every 50 ms by itself, so a record does not wake it
//! (that would cost every request a cross-CPU wakeup and the agent an epoll round trip); only a
//! ring a quarter full does (looked at on every 64th record of a CPU). A record that does not
//! fit is counted, never silently dropped.
use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::{
    macros::map,
    maps::{ring_buf::RingBufEntry, PerCpuArray},
};
use wsgiscope_common::STAT_RINGBUF_FULL;

use crate::maps::{bump, EVENTS, EVENTS_BYTES};

/// How many records a CPU writes between two looks at the ring's fill (a helper call).
const QUERY_EVERY: u32 = 64;

/// Records written on this CPU (an array lookup, inlined: no helper call).
#[map]
static WRITTEN: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Flags for submitting a record to `EVENTS`. Filling a quarter of the ring takes thousands of
/// records, so looking at its fill on every 64th record of each CPU catches it in time.
#[inline(always)]
fn wake_flags() -> u64 {
    let due = match WRITTEN.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        Some(n) => unsafe {
            *n = (*n).wrapping_add(1);
            *n % QUERY_EVERY == 0
        },
        None => true,
    };
    if due && EVENTS.query(BPF_RB_AVAIL_DATA as u64) > (EVENTS_BYTES / 4) as u64 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Writes a small record (it fits the BPF stack).
#[inline(always)]
pub fn emit<T>(record: &T) {
    if EVENTS.output::<T>(record, wake_flags()).is_err() {
        bump(STAT_RINGBUF_FULL);
    }
}

/// Room for a record too large for the BPF stack, to be filled in place and `submit`ted.
#[inline(always)]
pub fn reserve<T: 'static>() -> Option<RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        bump(STAT_RINGBUF_FULL);
    }
    entry
}

#[inline(always)]
pub fn submit<T>(entry: RingBufEntry<T>) {
    entry.submit(wake_flags());
}
