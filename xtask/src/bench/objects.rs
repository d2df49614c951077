//! The eBPF objects the agent's release build leaves in its build script's OUT_DIR: the agent's
//! own (`wsgiscope-ebpf`, read here for the tracepoints it attaches to) and the bench probe
//! (`wsgiscope-bench-emit` and `wsgiscope-bench-write`, section 6).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use aya::Ebpf;
use aya_obj::{Object, ProgramSection};
use wsgiscope_common::tracepoint_category;

use crate::{cargo, output_text};

/// The agent's programs.
const AGENT_OBJECT: &str = "wsgiscope-ebpf";

/// Where the release build of the agent put `object`: its build script's OUT_DIR, as cargo
/// reports it.
pub fn object_path(root: &Path, object: &str) -> Result<PathBuf> {
    let json = output_text(cargo(root).args(["build", "--release", "-p", "wsgiscope", "--message-format=json"]))
        .context("cargo build --release -p wsgiscope failed")?;
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "build-script-executed")
        .filter(|m| m["package_id"].as_str().is_some_and(|id| id.contains("/agent#wsgiscope@")))
        .find_map(|m| m["out_dir"].as_str().map(|d| Path::new(d).join(object)))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow!("the agent's build left no {object} (ebpf/Cargo.toml builds it)"))
}

/// A bench object (`object`) read and loaded, its programs not yet: each probe loads and attaches
/// its own.
pub fn load(root: &Path, object: &str) -> Result<Ebpf> {
    let path = object_path(root, object)?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ebpf::load(&bytes).with_context(|| format!("cannot load {}", path.display()))
}

/// Every tracepoint the agent attaches a program to, as `category:name`, sorted: its object's
/// tracepoint programs, each attached where its name says (as the agent's loader does).
pub fn agent_tracepoints(root: &Path) -> Result<Vec<String>> {
    let path = object_path(root, AGENT_OBJECT)?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let object = Object::parse(&bytes).with_context(|| format!("cannot parse {}", path.display()))?;
    tracepoints(&object)
}

fn tracepoints(object: &Object) -> Result<Vec<String>> {
    let mut hooks = object
        .programs
        .iter()
        .filter(|(_, p)| matches!(p.section, ProgramSection::TracePoint))
        .map(|(name, _)| {
            let category = tracepoint_category(name).ok_or_else(|| anyhow!("program {name}: no tracepoint of that name"))?;
            Ok(format!("{category}:{name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    hooks.sort();
    Ok(hooks)
}
