//! Section 6's measure of the least a timed write on a traced connection costs, as the agent's
//! design does it: the eBPF crate's bench probe `ebpf/src/bench_write.rs` on the write(2) and
//! sendto hooks, reading the running agent's own `TRACED_TASKS` and `CONNS`, so it does its work
//! on exactly the writes the agent aggregates (and ends early on the others, as the agent does).
//!
//! The maps are handed over by pinning: a bpffs of the bench's own is mounted in the work
//! directory, the agent's two maps (found by the map ids its /proc/PID/fdinfo lists) are pinned
//! there, the probe's loader reuses them by name, and the pins and the mount go once it is
//! loaded (the loaded programs hold the maps). A restarted agent has new maps: the bench
//! attaches a new probe for it.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::{
    maps::{MapData, MapInfo},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use wsgiscope_common::{MAP_CONNS, MAP_TRACED_TASKS};

use super::{kernel::map_ids_of, objects::object_path};

/// The probe's object, as the agent's build script leaves it (`objects.rs`).
const OBJECT: &str = "wsgiscope-bench-write";
/// Its programs, each attached to the syscall tracepoint of its name.
pub const HOOKS: [&str; 4] = ["sys_enter_write", "sys_exit_write", "sys_enter_sendto", "sys_exit_sendto"];

pub struct WriteProbe {
    _ebpf: Ebpf,
}

impl WriteProbe {
    /// Loads the probe on the maps of the agent running as `agent` and attaches it.
    pub fn attach(root: &Path, work: &Path, agent: u32) -> Result<WriteProbe> {
        let path = object_path(root, OBJECT)?;
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let pins = Bpffs::mount(&work.join("bench-bpffs"))?;
        let mut loader = EbpfLoader::new();
        let mut pinned = Vec::new();
        for name in [MAP_TRACED_TASKS, MAP_CONNS] {
            let id = agent_map(agent, name)?;
            let pin = pins.dir.join(name);
            let map = MapData::from_id(id).with_context(|| format!("cannot open the agent's map {name} (id {id})"))?;
            map.pin(&pin).with_context(|| format!("cannot pin the agent's map {name} at {}", pin.display()))?;
            ensure!(pin.exists(), "pinned {name} at {}, but nothing is there", pin.display());
            pinned.push((name, pin));
        }
        for (name, pin) in &pinned {
            loader.map_pin_path(name, pin.as_path());
        }
        let mut ebpf = loader.load(&bytes).with_context(|| format!("cannot load {}", path.display()))?;
        drop(pins);
        for hook in HOOKS {
            let prog: &mut TracePoint =
                ebpf.program_mut(hook).ok_or_else(|| anyhow!("no program {hook} in {OBJECT}"))?.try_into()?;
            prog.load()?;
            prog.attach("syscalls", hook)?;
        }
        println!("bench: write probe attached on the agent's maps (pid {agent}; {})", path.display());
        Ok(WriteProbe { _ebpf: ebpf })
    }
}

/// The id of the agent's map `name` (the kernel keeps the first 15 characters of a map's name).
fn agent_map(agent: u32, name: &str) -> Result<u32> {
    let short = &name[..name.len().min(15)];
    let found: Vec<u32> = map_ids_of(agent)
        .into_iter()
        .filter(|&id| MapInfo::from_id(id).ok().is_some_and(|i| i.name_as_str() == Some(short)))
        .collect();
    match found[..] {
        [id] => Ok(id),
        [] => bail!("the agent (pid {agent}) holds no map named {name}"),
        _ => bail!("the agent (pid {agent}) holds {} maps named {name}", found.len()),
    }
}

/// A bpffs mounted for the hand-over, unmounted (its pins with it) when dropped.
struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    fn mount(dir: &Path) -> Result<Bpffs> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let status = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir).status().context("cannot run mount")?;
        ensure!(status.success(), "mount -t bpf bpf {} failed ({status})", dir.display());
        Ok(Bpffs { dir: dir.to_path_buf() })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        for name in [MAP_TRACED_TASKS, MAP_CONNS] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        match Command::new("umount").arg(&self.dir).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("bench: cannot unmount {}: {other:?}", self.dir.display()),
        }
    }
}
