//! Where the kernel keeps a task's own CPU clock, read from its BTF: `task_struct.se.
//! sum_exec_runtime`, the nanoseconds the scheduler has charged the task (what
//! `time.thread_time()` reads). The kernel side reads it where a request needs the serving
//! thread's clock (its start, each response write), and adds what the thread ran since its last
//! charge, from its runqueue's clock (`rq_clock_layout`): no program follows the scheduler.
//!
//! On a KVM guest, the time the hypervisor stole from a CPU is left out of that clock: the
//! kernel side reads the per-CPU `steal_time` too, found from this CPU's runqueue
//! (`steal_layout`), and leaves out what was stolen since the runqueue's clock.
use anyhow::{anyhow, bail, Context, Result};
use btf_rs::{Btf, BtfType, Struct, Type};

use super::rss::{member, structure};

/// The byte offset of `sum_exec_runtime` in `task_struct`.
pub fn sum_exec_offset(btf: &Btf) -> Result<u32> {
    let (se, entity) = task_se(btf)?;
    let (sum, sum_type) = member(btf, &entity, "sum_exec_runtime").context("sched_entity has no sum_exec_runtime")?;
    // u64 is a typedef of an integer.
    let mut t = sum_type;
    while let Type::Typedef(ref d) = t {
        t = btf.resolve_chained_type(d)?;
    }
    let Type::Int(int) = t else { bail!("sched_entity.sum_exec_runtime is not an integer") };
    if int.size() != 8 || !(se + sum).is_multiple_of(8) {
        bail!("sched_entity.sum_exec_runtime is not an aligned u64");
    }
    Ok(se + sum)
}

/// Where the kernel side finds this CPU's `steal_time.steal` (the hypervisor's steal so far):
/// `[task_struct.se.cfs_rq, cfs_rq.rq, &steal_time - &runqueues]` (the last wrapping), the
/// two per-CPU variables' places in the kernel's per-CPU section. Err on a kernel that is no
/// KVM guest (no `steal_time`) or without group scheduling (no `cfs_rq.rq`).
pub fn steal_layout(btf: &Btf) -> Result<[u64; 3]> {
    let (cfs_rq, rq) = task_rq(btf)?;
    let steal_time = structure(btf, "kvm_steal_time").context("not built as a KVM guest")?;
    let (steal, _) = member(btf, &steal_time, "steal").context("kvm_steal_time has no steal")?;
    let runqueues = percpu_offset(btf, "runqueues")?;
    let steal_var = percpu_offset(btf, "steal_time")?;
    Ok([u64::from(cfs_rq), u64::from(rq), (steal_var + u64::from(steal)).wrapping_sub(runqueues)])
}

/// Where the kernel side finds what a running task ran since its last charge (`ebpf` `cpu_clock`):
/// `[task_struct.se.cfs_rq, cfs_rq.rq, task_struct.se.exec_start, rq.clock, rq.clock_task,
/// rq.prev_steal_time_rq]`, the last 0 where the kernel leaves no steal out of task clocks
/// (`steal_left_out`). Err without group scheduling (no `cfs_rq.rq`).
pub fn rq_clock_layout(btf: &Btf, steal_left_out: bool) -> Result<[u32; 6]> {
    let (cfs_rq, rq) = task_rq(btf)?;
    let (se, entity) = task_se(btf)?;
    let (exec_start, _) = member(btf, &entity, "exec_start").context("sched_entity has no exec_start")?;
    let runqueue = structure(btf, "rq")?;
    let field = |name: &str| member(btf, &runqueue, name).map(|(off, _)| off).with_context(|| format!("rq has no {name}"));
    let (clock, clock_task) = (field("clock")?, field("clock_task")?);
    let steal = if steal_left_out { field("prev_steal_time_rq")? } else { 0 };
    Ok([cfs_rq, rq, se + exec_start, clock, clock_task, steal])
}

/// Whether the kernel leaves a hypervisor's steal out of task clocks: built to
/// (`rq.prev_steal_time_rq`) and not booted with `no-steal-acc`.
pub fn steal_left_out(btf: &Btf) -> bool {
    let built = structure(btf, "rq").is_ok_and(|rq| member(btf, &rq, "prev_steal_time_rq").is_some());
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    built && !cmdline.split_whitespace().any(|w| w == "no-steal-acc")
}

/// How the kernel side finds this CPU's runqueue from the current task:
/// `(task_struct.se.cfs_rq, cfs_rq.rq)`. Err without group scheduling (no `cfs_rq.rq`).
fn task_rq(btf: &Btf) -> Result<(u32, u32)> {
    let (se, entity) = task_se(btf)?;
    let (cfs_rq, _) = member(btf, &entity, "cfs_rq").context("sched_entity has no cfs_rq (no group scheduling)")?;
    let (rq, _) = member(btf, &structure(btf, "cfs_rq")?, "rq").context("cfs_rq has no rq (no group scheduling)")?;
    Ok((se + cfs_rq, rq))
}

/// `task_struct.se`: its offset and its type (`struct sched_entity`).
fn task_se(btf: &Btf) -> Result<(u32, Struct)> {
    let task = structure(btf, "task_struct")?;
    let (se, se_type) = member(btf, &task, "se").context("task_struct has no se")?;
    let Type::Struct(entity) = se_type else { bail!("task_struct.se is not a struct") };
    Ok((se, entity))
}

/// The place of per-CPU variable `name` in the kernel's per-CPU section.
fn percpu_offset(btf: &Btf, name: &str) -> Result<u64> {
    for t in btf.resolve_types_by_name(".data..percpu")? {
        let Type::Datasec(sec) = t else { continue };
        for v in &sec.variables {
            let Some(Ok(Type::Var(var))) = v.get_type_id().map(|id| btf.resolve_type_by_id(id)) else { continue };
            if btf.resolve_name(&var).is_ok_and(|n| n == name) {
                return Ok(u64::from(v.offset()));
            }
        }
    }
    Err(anyhow!("no per-CPU variable {name} in the kernel's BTF"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_s_clock_is_found() {
        let off = sum_exec_offset(&super::super::rss::kernel_btf().unwrap()).unwrap();
        // Well inside task_struct, after its thread_info and state.
        assert!(off > 64 && off < 16 * 1024, "{off}");
    }

    /// The test machines are KVM guests with group scheduling.
    #[test]
    fn this_kernel_s_steal_time_is_found() {
        let [cfs_rq, rq, delta] = steal_layout(&super::super::rss::kernel_btf().unwrap()).unwrap();
        assert!(cfs_rq > 64 && cfs_rq < 16 * 1024 && rq > 0 && rq < 16 * 1024, "{cfs_rq} {rq}");
        // Two variables of one section, less than a MiB apart either way.
        assert!(delta < 1 << 20 || delta.wrapping_neg() < 1 << 20, "{delta}");
    }

    /// The runqueue's clocks and the steal it left out, all found; steal not asked for, not read.
    #[test]
    fn this_kernel_s_runqueue_clock_is_found() {
        let btf = super::super::rss::kernel_btf().unwrap();
        assert!(steal_left_out(&btf));
        let [cfs_rq, rq, exec_start, clock, clock_task, steal] = rq_clock_layout(&btf, true).unwrap();
        assert!(cfs_rq > 64 && exec_start > 64 && cfs_rq < 16 * 1024 && exec_start < 16 * 1024, "{cfs_rq} {exec_start}");
        assert!(rq > 0 && clock > 0 && clock_task > clock && steal > clock_task, "{rq} {clock} {clock_task} {steal}");
        assert_eq!(rq_clock_layout(&btf, false).unwrap()[5], 0);
    }
}
