//! Before loading: the capabilities, the kernel's BTF and tracefs wsgiscope needs, each
//! missing one a clear error with its fix; and the tracefs record layouts the loader reads.
use std::path::Path;

use anyhow::{bail, Context, Result};

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs if it is not mounted (a fresh host often has it unmounted).
pub fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    // SAFETY: mount(2) with NUL-terminated literals and no data.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({err}). Run \
             `mount -t tracefs nodev {TRACEFS}` as root, or in a container mount the host's {TRACEFS}"
        );
    }
    Ok(())
}

/// Offset of `field` in a tracepoint's record, from its tracefs format file.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        // `__u8 daddr[4]` declares `daddr`.
        let name = decl.split_whitespace().last()?.trim_start_matches('*').split('[').next()?;
        if name != field {
            return None;
        }
        rest.trim().strip_prefix("offset:")?.split(';').next()?.trim().parse().ok()
    })
}

/// The tracefs format file of a tracepoint (its record layout).
pub fn tracepoint_format(category: &str, event: &str) -> Result<String> {
    let path = format!("{TRACEFS}/events/{category}/{event}/format");
    std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}: this kernel lacks the {category}/{event} tracepoint wsgiscope needs"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup):
/// raise it where allowed (CAP_SYS_RESOURCE); elsewhere it is not needed, so never fail on it.
pub fn raise_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("RLIMIT_MEMLOCK not raised ({}): fine on kernels ≥ 5.11", std::io::Error::last_os_error());
    }
}

/// Effective capabilities of this process (bit n = capability n).
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Fails early, with the fix, when the capabilities to load and attach are missing.
pub fn check_capabilities() -> Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let caps = effective_caps();
    let has = |c: u32| caps & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, n)| n)
        .collect();
    bail!(
        "missing capability {}: loading eBPF programs and attaching tracepoints needs CAP_BPF and \
         CAP_PERFMON (or root). Run wsgiscope with sudo, or grant them, e.g. \
         `setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search+ep $(which wsgiscope)`",
        missing.join(" and ")
    )
}

/// Where the kernel publishes its own BTF.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The exit programs read syscall arguments from the task's saved registers
/// (`bpf_get_current_task_btf`), which the verifier allows only when the kernel has BTF.
pub fn check_kernel_btf() -> Result<()> {
    if Path::new(KERNEL_BTF).exists() {
        return Ok(());
    }
    bail!(
        "this kernel publishes no BTF ({KERNEL_BTF} is missing): wsgiscope's programs need it to read \
         syscall arguments. Run a kernel built with CONFIG_DEBUG_INFO_BTF=y (the default of current \
         distributions' kernels), 5.15 or newer"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORK: &str = "name: sched_process_fork
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    #[test]
    fn finds_field_offsets_in_tracefs_formats() {
        assert_eq!(field_offset(FORK, "child_pid"), Some(20));
        assert_eq!(field_offset(FORK, "parent_pid"), Some(12));
        assert_eq!(field_offset(FORK, "child_comm"), Some(16));
        assert_eq!(field_offset(FORK, "group_dead"), None);
        let sock = "\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;\n";
        assert_eq!(field_offset(sock, "daddr"), Some(36));
        assert_eq!(field_offset(sock, "protocol"), Some(30));
    }
}
