//! Steal time: on a virtual machine the hypervisor runs other guests on our vCPUs now and then,
//! and the kernel leaves that time out of a task's CPU clock (what `time.thread_time()` reads).
//! A running thread's clock is carried from its runqueue's clock by wall time (`cpu_clock`), so
//! time stolen in between would count as CPU: a request that started just after a few
//! milliseconds of steal read CPU time 0. The hypervisor publishes each vCPU's steal so
//! far in a per-CPU `kvm_steal_time` (updated as the vCPU resumes, before any of our programs
//! runs again); reading it where a clock is carried leaves steal out, as the kernel does.
//!
//! Its address: this CPU's runqueue (`current->se.cfs_rq->rq`, BTF-typed loads) plus the
//! distance between the two per-CPU variables, found by the agent in the kernel's BTF; kept per
//! CPU after the first read. Not a KVM guest, or a layout the agent did not find: steal reads 0.
use aya_ebpf::{helpers::generated::bpf_probe_read_kernel, macros::map, maps::PerCpuArray};

use crate::user::current_rq;

/// Set by the agent (`GLOBAL_STEAL_LAYOUT`): `task_struct.se.cfs_rq`, `cfs_rq.rq`, and the
/// per-CPU `steal_time` minus `runqueues` (wrapping; the first 0: no steal to read).
#[unsafe(no_mangle)]
static STEAL_LAYOUT: [u64; 3] = [0; 3];

/// This CPU's `steal_time.steal` address, once found (0: not yet).
#[map]
static STEAL_ADDR: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Nanoseconds the hypervisor has stolen from this CPU so far (0 where unknown).
#[inline(always)]
pub fn stolen_here() -> u64 {
    // SAFETY: volatile read of a global the loader may have rewritten.
    let [cfs_rq_off, rq_off, delta] = unsafe { core::ptr::read_volatile(&STEAL_LAYOUT) };
    if cfs_rq_off == 0 {
        return 0;
    }
    let Some(slot) = STEAL_ADDR.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU slot of this map, valid for the program run; no other writer on this CPU.
    let mut addr = unsafe { *slot };
    if addr == 0 {
        let Some(rq) = current_rq(cfs_rq_off as u32, rq_off as u32) else { return 0 };
        addr = (rq as u64).wrapping_add(delta);
        // SAFETY: as above.
        unsafe { *slot = addr };
    }
    let mut steal = 0u64;
    // SAFETY: reads 8 bytes of kernel memory into `steal`; on a fault it stays 0.
    unsafe { bpf_probe_read_kernel((&mut steal as *mut u64).cast(), 8, addr as *const _) };
    steal
}
