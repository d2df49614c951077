//! The floor of the other kind of hook a syscall passes: two do-nothing programs
//! (`ebpf/src/bench_hooks.rs`) on the BTF tracepoints `sys_enter` and `sys_exit`, which run for
//! every syscall, held by this process while section 2's untraced loops run under them.
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use aya::{programs::BtfTracePoint, Btf, Ebpf};

use super::objects;

const OBJECT: &str = "wsgiscope-bench-hooks";
/// Each program is named for the BTF tracepoint it is attached to.
const HOOKS: [&str; 2] = ["sys_enter", "sys_exit"];

/// Attaches the pair; detached when the returned object is dropped.
pub fn attach_btf_pair(root: &Path) -> Result<Ebpf> {
    let mut ebpf = objects::load(root, OBJECT)?;
    let btf = Btf::from_sys_fs().context("no kernel BTF (/sys/kernel/btf/vmlinux): BTF tracepoints need it")?;
    for name in HOOKS {
        let p: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name} in {OBJECT}"))?
            .try_into()?;
        p.load(name, &btf).with_context(|| format!("cannot load {name} from {OBJECT}"))?;
        p.attach().with_context(|| format!("cannot attach {name} (tp_btf)"))?;
    }
    Ok(ebpf)
}

#[derive(clap::Args)]
pub struct HooksArgs {
    /// How long to hold the pair attached.
    #[arg(long, default_value_t = 10)]
    secs: u64,
}

/// `xtask bench-hooks`: holds the pair attached for a while, to time syscalls under it by hand.
pub fn hooks_main(root: &Path, args: &HooksArgs) -> Result<()> {
    let _ebpf = attach_btf_pair(root)?;
    println!("bench-hooks: do-nothing programs attached to tp_btf/sys_enter and tp_btf/sys_exit for {} s", args.secs);
    std::thread::sleep(std::time::Duration::from_secs(args.secs));
    Ok(())
}
