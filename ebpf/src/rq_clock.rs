//! Where a running thread's CPU clock is carried from: the runqueue's clock, not the moment our
//! program runs. The scheduler charges a task up to its runqueue's clock (`rq.clock`, updated
//! at scheduler entry points), and that update can lie tens of microseconds before the charge's
//! tracepoint or the switch's (measured here up to 130 µs on a busy KVM guest). A clock carried
//! from the tracepoint's moment read that much short, by a different amount at a request's
//! start and at its end: requests read up to 50 µs under the app's `thread_time`, or 0.
//!
//! So a running thread's clock is anchored where the kernel's is: its charged sum plus what the
//! runqueue's task clock ran since (`rq.clock_task - se.exec_start`), as of `rq.clock`, and
//! the steal the kernel had left out by then (`rq.prev_steal_time_rq`). `rq.clock` is the
//! scheduler's clock, ours `bpf_ktime_get_ns`: both run from the TSC, a near-constant distance
//! apart. That distance is taken as the least gap seen (`CLOCK_GAP`): any constant does, as a
//! request's CPU time is the difference of two readings of one clock.
use aya_ebpf::{macros::map, maps::Array};

use crate::user::{current_rq, current_task_u64};

/// Set by the agent from the kernel's BTF (all 0: not anchored, carried from the tracepoint's
/// moment): `task_struct.se.cfs_rq`, `cfs_rq.rq`, `task_struct.se.exec_start`, `rq.clock`,
/// `rq.clock_task`, `rq.prev_steal_time_rq` (0: the kernel leaves no steal out).
#[unsafe(no_mangle)]
static RQ_CLOCK_LAYOUT: [u32; 6] = [0; 6];

/// The least `bpf_ktime_get_ns() - rq.clock` seen on any CPU (`[1]`, once `[0]` is 1).
#[map]
static CLOCK_GAP: Array<u64> = Array::with_max_entries(2, 0);

/// A running thread's clock as of a moment of the runqueue's clock: `ran` ns on CPU after its
/// charged sum, at `since` (our clock), with `steal` ns left out by then.
pub struct Anchor {
    pub ran: u64,
    pub since: u64,
    pub steal: u64,
}

/// Anchor of a task running on this CPU at `ts`: the current task (`current`), or the one
/// switched to in `sched_switch` (its clock starts at `rq.clock`, as it was picked then).
#[inline(always)]
pub fn anchor(ts: u64, current: bool) -> Option<Anchor> {
    // SAFETY: volatile read of a global the loader may have rewritten.
    let [cfs_rq_off, rq_off, exec_start_off, clock_off, clock_task_off, steal_off] = unsafe { core::ptr::read_volatile(&RQ_CLOCK_LAYOUT) };
    if cfs_rq_off == 0 {
        return None;
    }
    let rq = current_rq(cfs_rq_off, rq_off)?;
    // SAFETY: BTF-typed loads (a fault on such a load reads 0).
    let field = |off: u32| unsafe { core::ptr::read_volatile(rq.add(off as usize).cast::<u64>()) };
    let clock = field(clock_off);
    if clock == 0 {
        return None;
    }
    let ran = if current { field(clock_task_off).saturating_sub(current_task_u64(exec_start_off)) } else { 0 };
    let steal = if steal_off != 0 { field(steal_off) } else { 0 };
    Some(Anchor { ran, since: clock.wrapping_add(least_gap(ts.wrapping_sub(clock))), steal })
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
