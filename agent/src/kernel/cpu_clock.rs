//! Where the kernel keeps a task's own CPU clock, read from its BTF: `task_struct.se.
//! sum_exec_runtime`, the nanoseconds the scheduler has charged the task (what
//! `time.thread_time()` reads). The kernel side reads it at each scheduler charge of a thread
//! that serves requests, so a charge it misses (the kernel skips a tracing program that would
//! nest inside another on its CPU, ours included) costs nothing: the next one holds it.
use anyhow::{bail, Context, Result};
use btf_rs::{Btf, Type};

use super::rss::{member, structure};

/// The byte offset of `sum_exec_runtime` in `task_struct`.
pub fn sum_exec_offset(btf: &Btf) -> Result<u32> {
    let task = structure(btf, "task_struct")?;
    let (se, se_type) = member(btf, &task, "se").context("task_struct has no se")?;
    let Type::Struct(entity) = se_type else { bail!("task_struct.se is not a struct") };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_s_clock_is_found() {
        let off = sum_exec_offset(&super::super::rss::kernel_btf().unwrap()).unwrap();
        // Well inside task_struct, after its thread_info and state.
        assert!(off > 64 && off < 16 * 1024, "{off}");
    }
}
