//! The current task's CPU clock, read where a request needs it (its start, each response write,
//! its end): what `time.thread_time()` would read at that moment, to the nanosecond, with no
//! program following the scheduler in between.
//!
//! The scheduler charges a running task up to its runqueue's clock (`rq.clock`, updated at
//! scheduler entry points: ticks, switches, wakeups): the task's charged sum
//! (`se.sum_exec_runtime`) plus what the runqueue's task clock ran since its last charge
//! (`rq.clock_task - se.exec_start`) is its clock as of `rq.clock`. That update can lie tens of
//! microseconds before our program runs (measured here up to 130 µs on a busy KVM guest), so
//! the clock is carried from there to now by wall time, less the hypervisor's steal since: the
//! runqueue had left out the steal up to `rq.prev_steal_time_rq`, the CPU's counter (`steal`)
//! holds it up to now.
//!
//! `rq.clock` is the scheduler's clock, ours `bpf_ktime_get_ns`: both run from the TSC, a
//! near-constant distance apart. That distance is taken as the least gap seen (`CLOCK_GAP`):
//! any constant does, as a request's CPU time is the difference of two readings of one clock.
use aya_ebpf::{macros::map, maps::Array};

use crate::{
    steal::stolen_here,
    user::{current_task, load_u64, rq_of},
};

/// Set by the agent from the kernel's BTF: where `task_struct.se.sum_exec_runtime` is (0:
/// unknown, no CPU clock).
#[unsafe(no_mangle)]
static SUM_EXEC_OFFSET: u32 = 0;

/// Set by the agent from the kernel's BTF (all 0: no CPU clock): `task_struct.se.cfs_rq`,
/// `cfs_rq.rq`, `task_struct.se.exec_start`, `rq.clock`, `rq.clock_task`,
/// `rq.prev_steal_time_rq` (0: the kernel leaves no steal out).
#[unsafe(no_mangle)]
static RQ_CLOCK_LAYOUT: [u32; 6] = [0; 6];

/// The least `bpf_ktime_get_ns() - rq.clock` seen on any CPU (`[1]`, once `[0]` is 1).
#[map]
static CLOCK_GAP: Array<u64> = Array::with_max_entries(2, 0);

/// The current task's CPU clock at `ts`, a moment of this program run (our clock); `None` where
/// the agent did not find the kernel's layout.
#[inline(always)]
pub fn task_clock(ts: u64) -> Option<u64> {
    // SAFETY: volatile reads of globals the loader may have rewritten.
    let sum_off = unsafe { core::ptr::read_volatile(&SUM_EXEC_OFFSET) };
    let [cfs_rq_off, rq_off, exec_start_off, clock_off, clock_task_off, steal_off] =
        unsafe { core::ptr::read_volatile(&RQ_CLOCK_LAYOUT) };
    if sum_off == 0 || cfs_rq_off == 0 {
        return None;
    }
    let task = current_task();
    let rq = rq_of(task, cfs_rq_off, rq_off)?;
    let clock = load_u64(rq, clock_off);
    if clock == 0 {
        return None;
    }
    let charged = load_u64(task, sum_off);
    let ran = load_u64(rq, clock_task_off).saturating_sub(load_u64(task, exec_start_off));
    // `since` is never after `ts`: the least gap counts this one.
    let since = clock.wrapping_add(least_gap(ts.wrapping_sub(clock)));
    let wall = ts.saturating_sub(since);
    let stolen = if steal_off != 0 { stolen_here().saturating_sub(load_u64(rq, steal_off)).min(wall) } else { 0 };
    Some(charged + ran + wall - stolen)
}

/// The least gap between the two clocks so far, `gap` (seen now) included.
#[inline(always)]
fn least_gap(gap: u64) -> u64 {
    let (Some(set), Some(least)) = (CLOCK_GAP.get_ptr_mut(0), CLOCK_GAP.get_ptr_mut(1)) else { return gap };
    // SAFETY: array slots valid for the program run; CPUs racing here can only leave a gap
    // someone saw, and the next smaller one wins again.
    unsafe {
        if *set == 0 || (gap as i64) < (*least as i64) {
            *least = gap;
            *set = 1;
        }
        *least
    }
}
