//! The CPython runtime of a server's processes: which binary holds the interpreter (the
//! executable for a static build such as Debian's /usr/bin/python3.11, `libpython3.X.so` for
//! uWSGI, mod_wsgi and shared builds such as pyenv's), its version, and where its garbage
//! collections can be probed: USDT notes (`python:gc__start`/`gc__done`, with semaphores) or,
//! without notes, the `gc_collect_main` symbol.
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};
use wsgiscope_common::{reg, GC_FUNCTION_GENERATION_REG, GEN_IN_MEM, GEN_IN_REG};

/// A USDT probe of the interpreter binary, as the uprobe PMU wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsdtProbe {
    pub name: String,
    /// File offset of the probe instruction.
    pub offset: u64,
    /// File offset of its semaphore (0: none).
    pub semaphore: u64,
    /// The argument specs, e.g. `-4@112(%rsp)`.
    pub args: String,
}

/// How garbage collections are probed in one binary.
#[derive(Debug, Clone, PartialEq)]
pub enum GcProbes {
    /// `gc__start` and `gc__done` notes (there may be several copies of each).
    Usdt { start: Vec<UsdtProbe>, done: Vec<UsdtProbe> },
    /// Entry and return of this function (symbol table).
    Symbol(&'static str),
    /// Neither: no GC data for this runtime.
    None,
}

#[derive(Debug, Clone)]
pub struct Runtime {
    /// The binary as the process maps it.
    pub path: PathBuf,
    /// The same file reachable from the agent's mount namespace (`/proc/PID/root/…`).
    pub host_path: PathBuf,
    /// `3.11`.
    pub version: String,
    pub gc: GcProbes,
}

impl Runtime {
    pub fn has_usdt(&self) -> bool {
        matches!(self.gc, GcProbes::Usdt { .. })
    }
}

/// The collector entry point of CPython 3.8–3.12 builds (static, so only in .symtab).
pub const GC_FUNCTION: &str = "gc_collect_main";

/// `3.11` from `libpython3.11.so.1.0`, `python3.11`, `python3.11d`.
fn version_of(file_name: &str) -> Option<String> {
    let rest = file_name.strip_prefix("libpython").or_else(|| file_name.strip_prefix("python"))?;
    let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let v = v.trim_end_matches('.');
    (v.contains('.') && v.starts_with('3')).then(|| v.to_string())
}

/// The interpreter binary among a process's mappings (`/proc/PID/maps` text): libpython if
/// mapped, else an executable named python3.X.
pub fn interpreter_in_maps(maps: &str) -> Option<(PathBuf, String)> {
    let paths = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).filter(|p| p.starts_with('/'));
    let mut exe = None;
    for p in paths {
        let name = p.rsplit('/').next().unwrap_or(p);
        if name.starts_with("libpython") {
            if let Some(v) = version_of(name) {
                return Some((PathBuf::from(p), v));
            }
        } else if exe.is_none() && name.starts_with("python") {
            exe = version_of(name).map(|v| (PathBuf::from(p), v));
        }
    }
    exe
}

/// The runtime of process `pid`, or `None` when it maps no CPython.
pub fn runtime_of(pid: u32) -> Option<Runtime> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let (path, version) = interpreter_in_maps(&maps)?;
    let host_path = PathBuf::from(format!("/proc/{pid}/root{}", path.display()));
    // Read through a cache: only the notes and the symbol table, not the whole (up to tens of
    // MB) interpreter binary.
    let gc = match std::fs::File::open(&host_path) {
        Ok(file) => gc_probes(&object::read::ReadCache::new(file)).unwrap_or_else(|e| {
            log::warn!("cannot read the ELF notes of {}: {e:#}", path.display());
            GcProbes::None
        }),
        Err(e) => {
            log::warn!("cannot read {}: {e}", host_path.display());
            GcProbes::None
        }
    };
    Some(Runtime { path, host_path, version, gc })
}

/// File offset of a virtual address, through the loadable segments.
fn file_offset<'d, R: object::ReadRef<'d>>(obj: &object::File<'d, R>, vaddr: u64) -> Option<u64> {
    obj.segments().find_map(|s| {
        let (off, size) = s.file_range();
        (vaddr >= s.address() && vaddr < s.address() + size.max(s.size())).then(|| vaddr - s.address() + off)
    })
}

/// The GC probe points of an ELF binary (a byte slice, or a read cache over the file).
pub fn gc_probes<'d, R: object::ReadRef<'d>>(data: R) -> Result<GcProbes> {
    let obj = object::File::parse(data).context("not an ELF file")?;
    let notes = usdt_notes(&obj)?;
    let pick = |n: &str| notes.iter().filter(|p| p.name == n).cloned().collect::<Vec<_>>();
    let (start, done) = (pick("gc__start"), pick("gc__done"));
    if !start.is_empty() && !done.is_empty() {
        return Ok(GcProbes::Usdt { start, done });
    }
    if obj.symbols().any(|s| s.name() == Ok(GC_FUNCTION)) {
        return Ok(GcProbes::Symbol(GC_FUNCTION));
    }
    Ok(GcProbes::None)
}

/// The `python` provider's probes in `.note.stapsdt`: per note `u64 pc, u64 base, u64
/// semaphore`, then `provider\0name\0args\0`; `pc` shifts by where `.stapsdt.base` really is.
fn usdt_notes<'d, R: object::ReadRef<'d>>(obj: &object::File<'d, R>) -> Result<Vec<UsdtProbe>> {
    let Some(section) = obj.section_by_name(".note.stapsdt") else { return Ok(Vec::new()) };
    let base_addr = obj.section_by_name(".stapsdt.base").map(|s| s.address());
    let data = section.data()?;
    let mut out = Vec::new();
    let mut rest = data;
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map(|x| u32::from_le_bytes(x.try_into().unwrap()));
    let u64_at = |b: &[u8], i: usize| b.get(i..i + 8).map(|x| u64::from_le_bytes(x.try_into().unwrap()));
    let align4 = |n: usize| (n + 3) & !3;
    while rest.len() >= 12 {
        let (namesz, descsz, kind) = (u32_at(rest, 0).unwrap() as usize, u32_at(rest, 4).unwrap() as usize, u32_at(rest, 8).unwrap());
        let desc_at = 12 + align4(namesz);
        let desc = rest.get(desc_at..desc_at + descsz).ok_or_else(|| anyhow!("truncated note"))?;
        rest = rest.get(desc_at + align4(descsz)..).unwrap_or(&[]);
        if kind != 3 || descsz < 24 {
            continue;
        }
        let (mut pc, base, sem) = (u64_at(desc, 0).unwrap(), u64_at(desc, 8).unwrap(), u64_at(desc, 16).unwrap());
        let mut strings = desc[24..].split(|&c| c == 0).map(|s| String::from_utf8_lossy(s).into_owned());
        let (provider, name, args) = (strings.next().unwrap_or_default(), strings.next().unwrap_or_default(), strings.next().unwrap_or_default());
        if provider != "python" {
            continue;
        }
        if let Some(actual) = base_addr {
            pc = pc.wrapping_add(actual).wrapping_sub(base);
        }
        let offset = file_offset(obj, pc).ok_or_else(|| anyhow!("probe {name} at {pc:#x} is in no segment"))?;
        let semaphore = if sem == 0 { 0 } else { file_offset(obj, sem).unwrap_or(0) };
        out.push(UsdtProbe { name, offset, semaphore, args });
    }
    Ok(out)
}

/// Index of an x86_64 register in `pt_regs` (any width: `%esi`, `%rsi`, `%r12d`).
fn reg_index(name: &str) -> Option<u64> {
    let n = name.trim_start_matches('%');
    reg::NAMES.iter().find(|(wide, narrow, _)| *wide == n || *narrow == n).map(|r| r.2)
}

/// The attach cookie telling the kernel program where an int argument is, from a USDT
/// argument spec (`-4@%esi`, `-4@112(%rsp)`, `-4@-20(%rbp)`).
pub fn arg_cookie(spec: &str) -> Result<u64> {
    let (_size, loc) = spec.split_once('@').ok_or_else(|| anyhow!("argument spec {spec:?} has no '@'"))?;
    if let Some(r) = loc.strip_prefix('%') {
        return Ok(GEN_IN_REG | reg_index(r).ok_or_else(|| anyhow!("register {r} not supported"))?);
    }
    if let Some((off, base)) = loc.strip_suffix(')').and_then(|l| l.split_once('(')) {
        let off: i16 = if off.is_empty() { 0 } else { off.parse().with_context(|| format!("offset in {spec:?}"))? };
        let reg = reg_index(base).ok_or_else(|| anyhow!("register {base} not supported"))?;
        return Ok(GEN_IN_MEM | reg << 16 | off as u16 as u64);
    }
    bail!("argument spec {spec:?} not supported")
}

/// Where `gc_collect_main` has the generation: a register.
pub fn symbol_generation_cookie() -> u64 {
    GEN_IN_REG | GC_FUNCTION_GENERATION_REG
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_from_maps() {
        let maps = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 08:01 123 /usr/bin/uwsgi-core
7f00a0000000-7f00a0100000 r-xp 00000000 08:01 456 /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0
";
        assert_eq!(
            interpreter_in_maps(maps),
            Some((PathBuf::from("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"), "3.11".to_string()))
        );
        let static_build = "5600-5700 r-xp 00000000 08:01 1 /usr/bin/python3.11\n7f00-7f01 r-xp 0 08:01 2 /usr/lib/libc.so.6\n";
        assert_eq!(interpreter_in_maps(static_build), Some((PathBuf::from("/usr/bin/python3.11"), "3.11".to_string())));
        assert_eq!(interpreter_in_maps("5600-5700 r-xp 0 08:01 1 /usr/sbin/nginx\n"), None);
    }

    #[test]
    fn argument_specs_become_cookies() {
        assert_eq!(arg_cookie("-4@112(%rsp)").unwrap(), GEN_IN_MEM | 19 << 16 | 112);
        assert_eq!(arg_cookie("-4@-20(%rbp)").unwrap(), GEN_IN_MEM | 4 << 16 | (-20i16 as u16 as u64));
        assert_eq!(arg_cookie("-4@%esi").unwrap(), GEN_IN_REG | reg::RSI);
        assert_eq!(arg_cookie("8@%r12").unwrap(), GEN_IN_REG | reg::R12);
        assert!(arg_cookie("-4@$5").is_err());
        assert!(arg_cookie("-4@%xmm0").is_err());
    }

    #[test]
    fn a_stripped_binary_offers_no_gc_probe() {
        // coreutils ship stripped: neither USDT notes nor a symbol table.
        let data = std::fs::read("/usr/bin/true").unwrap();
        assert_eq!(gc_probes(data.as_slice()).unwrap(), GcProbes::None);
        assert!(gc_probes(b"not an ELF file".as_slice()).is_err());
    }

    #[test]
    fn debian_python_has_gc_usdt_notes() {
        // Debian's static python3.11 carries the notes (installed with python3-venv).
        let Ok(file) = std::fs::File::open("/usr/bin/python3.11") else { return };
        let GcProbes::Usdt { start, done } = gc_probes(&object::read::ReadCache::new(file)).unwrap() else {
            panic!("no USDT notes")
        };
        assert!(start.iter().all(|p| p.semaphore != 0 && p.offset != 0));
        assert_eq!(start[0].args, "-4@112(%rsp)");
        assert!(!done.is_empty());
    }
}
