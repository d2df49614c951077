//! Where the kernel keeps a process's resident-page counters, read from its BTF: the offsets
//! the kernel side needs to read `current->mm->rss_stat[]` at a request's start and end
//! (per-request memory growth). A kernel whose layout differs from what this expects runs
//! without the measure (one warning), everything else unchanged.
use anyhow::{anyhow, bail, Context, Result};
use btf_rs::{Backend, Btf, Struct, Type};
use wsgiscope_common::RSS_READ;

/// The counters of `enum mm_counter_type` wsgiscope adds up (VmRSS): MM_FILEPAGES,
/// MM_ANONPAGES, MM_SHMEMPAGES (MM_SWAPENTS, 2, is not resident).
const RESIDENT: [(&str, u32); 3] = [("MM_FILEPAGES", 0), ("MM_ANONPAGES", 1), ("MM_SHMEMPAGES", 3)];

/// The offsets, as the kernel side's globals take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssLayout {
    /// `task_struct.mm`.
    pub mm: u32,
    /// `mm_struct.rss_stat`.
    pub rss_stat: u32,
    /// The u64 words (in the `RSS_READ` bytes read at `rss_stat`) that hold the file, anon and
    /// shmem counts.
    pub words: [u32; 3],
}

/// A member of `s` by name, looking into anonymous structs and unions; (byte offset, type).
pub(super) fn member(btf: &Btf, s: &Struct, name: &str) -> Option<(u32, Type)> {
    for m in &s.members {
        let t = btf.resolve_chained_type(m).ok()?;
        let n = btf.resolve_name(m).unwrap_or_default();
        if n == name {
            return Some((m.bit_offset() / 8, t));
        }
        if n.is_empty() {
            if let Type::Struct(inner) | Type::Union(inner) = &t {
                if let Some((off, t)) = member(btf, inner, name) {
                    return Some((m.bit_offset() / 8 + off, t));
                }
            }
        }
    }
    None
}

pub(super) fn structure(btf: &Btf, name: &str) -> Result<Struct> {
    btf.resolve_types_by_name(name)?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| anyhow!("no struct {name} in the kernel's BTF"))
}

/// The value of enumerator `name`, if the BTF has it.
fn enumerator(btf: &Btf, name: &str) -> Option<u32> {
    let types = btf.resolve_types_by_name("mm_counter_type").ok()?;
    types.into_iter().find_map(|t| match t {
        Type::Enum(e) => e
            .members
            .iter()
            .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == name))
            .map(|m| m.val()),
        _ => None,
    })
}

/// Reads the layout from `btf` (the kernel's: /sys/kernel/btf/vmlinux).
pub fn layout(btf: &Btf) -> Result<RssLayout> {
    let task = structure(btf, "task_struct")?;
    let (mm, mm_type) = member(btf, &task, "mm").context("task_struct has no mm")?;
    if !matches!(mm_type, Type::Ptr(_)) {
        bail!("task_struct.mm is not a pointer");
    }
    let mm_struct = structure(btf, "mm_struct")?;
    let (rss_stat, stat_type) = member(btf, &mm_struct, "rss_stat").context("mm_struct has no rss_stat")?;
    let Type::Array(array) = stat_type else { bail!("mm_struct.rss_stat is not an array") };
    // Kernels ≥ 6.2: an array of percpu_counter, whose `count` is the shared (batched) count.
    let Type::Struct(counter) = btf.resolve_chained_type(&array)? else {
        bail!("mm_struct.rss_stat is not an array of percpu_counter (a kernel before 6.2?)")
    };
    if btf.resolve_name(&counter).ok().as_deref() != Some("percpu_counter") {
        bail!("mm_struct.rss_stat is not an array of percpu_counter");
    }
    let (count, _) = member(btf, &counter, "count").context("percpu_counter has no count")?;
    let size = counter.size() as u32;
    let mut words = [0; 3];
    for (w, (name, default)) in words.iter_mut().zip(RESIDENT) {
        let index = enumerator(btf, name).unwrap_or(default);
        let at = index * size + count;
        if index as usize >= array.len() || !at.is_multiple_of(8) || at as usize + 8 > RSS_READ {
            bail!("{name} is not where wsgiscope reads (word at byte {at})");
        }
        *w = at / 8;
    }
    if rss_stat as usize + RSS_READ > mm_struct.size() {
        bail!("mm_struct ends before rss_stat + {RSS_READ} bytes");
    }
    Ok(RssLayout { mm, rss_stat, words })
}

/// The running kernel's BTF, mapped where the kernel allows it (6.16 on): the few lookups
/// the agent makes then parse only what they reach, where reading the file parses all of it
/// (~35 MB of heap for a 5 MB BTF, the agent's peak memory). Older kernels: read and parsed.
pub fn kernel_btf() -> Result<Btf> {
    const PATH: &str = "/sys/kernel/btf/vmlinux";
    Btf::from_file_with_backend(PATH, Backend::Mmap)
        .or_else(|_| Btf::from_file(PATH))
        .with_context(|| format!("cannot read {PATH}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_s_counters_are_found() {
        // The test machines run a kernel with BTF (the agent needs it anyway).
        let l = layout(&kernel_btf().unwrap()).unwrap();
        assert!(l.mm > 0 && l.rss_stat > 0, "{l:?}");
        // Three distinct words, file before anon before shmem.
        assert!(l.words[0] < l.words[1] && l.words[1] < l.words[2], "{l:?}");
    }
}
