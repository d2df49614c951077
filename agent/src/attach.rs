//! Attach: make sure tracefs is there, load the kernel programs, attach them to their
//! tracepoints, and seed the set of traced processes. Dropping `Probes` detaches everything.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use std::{
    collections::HashSet,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use wsgiscope_common::{conn_key, ConnState, Pending, CONN_IN_REQUEST, STAT_COUNT};

use crate::{
    aggregate::InProgress,
    python::{self, GcProbes, Runtime},
};

const TRACEFS: &str = "/sys/kernel/tracing";

/// Every program in ebpf/ and the tracepoint it hooks (program name = tracepoint name).
const SYSCALL_PROGRAMS: &[&str] = &[
    "sys_exit_accept",
    "sys_exit_accept4",
    "sys_exit_read",
    "sys_exit_readv",
    "sys_exit_recvfrom",
    "sys_exit_recvmsg",
    "sys_enter_write",
    "sys_exit_write",
    "sys_enter_writev",
    "sys_exit_writev",
    "sys_enter_sendto",
    "sys_exit_sendto",
    "sys_enter_sendmsg",
    "sys_exit_sendmsg",
    "sys_enter_sendfile64",
    "sys_exit_sendfile64",
    "sys_enter_poll",
    "sys_exit_poll",
    "sys_enter_ppoll",
    "sys_exit_ppoll",
    "sys_enter_close",
    "sys_enter_shutdown",
    "sys_exit_wait4",
];
const SCHED_PROGRAMS: &[&str] = &["sched_process_fork", "sched_process_exit", "sched_process_exec"];

/// Tracepoints whose record layout the kernel programs read at fixed offsets: (category, name,
/// [(field, offset)]). Checked against tracefs; a mismatch leaves that feature off, with a warning.
const FIXED_LAYOUT_PROGRAMS: &[(&str, &str, &[(&str, u32)], &str)] = &[
    (
        "sock",
        "inet_sock_set_state",
        &[
            ("oldstate", 16),
            ("newstate", 20),
            ("dport", 26),
            ("family", 28),
            ("protocol", 30),
            ("daddr", 36),
            ("daddr_v6", 56),
        ],
        "the accept-queue wait (wsgi_accept_wait_seconds)",
    ),
    (
        "signal",
        "signal_generate",
        &[("sig", 8), ("pid", 36)],
        "telling killed workers from crashed ones (wsgi_worker_exits_total)",
    ),
];

/// The loaded and attached kernel side, with the maps the agent reads.
pub struct Probes {
    // Owns the programs: dropping it unloads them.
    ebpf: Ebpf,
    /// The tracepoint and uprobe links, taken out of their programs so `detach` can close
    /// them all at once (each close waits for an RCU grace period: ~80 ms here, one by one
    /// 2 s for the whole set).
    links: Vec<Box<dyn Send>>,
    /// USDT probes attached by hand (perf event + BPF link): closing them detaches and
    /// releases the semaphores.
    usdt_links: Vec<(OwnedFd, OwnedFd)>,
    /// Interpreter binaries whose GC probes are attached, by (device, inode).
    gc_binaries: HashSet<(u64, u64)>,
    traced: HashMap<MapData, u32, u32>,
    conns: HashMap<MapData, u64, ConnState>,
    pending: HashMap<MapData, u64, Pending>,
    stats: PerCpuArray<MapData, u64>,
}

/// The uprobe programs of ebpf/src/python.rs.
const GC_PROGRAMS: &[&str] = &["gc_start", "gc_done", "gc_return"];

/// perf_event_attr, as much of it as a uprobe needs (the kernel takes the size we give).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    rest: [u64; 7],
}

/// A uprobe on `path` at file `offset`, with the kernel counting the USDT semaphore at file
/// offset `semaphore` up while attached (aya 0.14 cannot set `ref_ctr_offset`).
fn usdt_perf_event(path: &std::path::Path, offset: u64, semaphore: u64) -> Result<OwnedFd> {
    let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .context("this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe/type)")?
        .trim()
        .parse()?;
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let attr = PerfEventAttr {
        kind: pmu,
        size: size_of::<PerfEventAttr>() as u32,
        // ref_ctr_offset lives in config bits 32–63 of the uprobe PMU.
        config: semaphore << 32,
        config1: cpath.as_ptr() as u64,
        config2: offset,
        ..Default::default()
    };
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    // SAFETY: attr and the path outlive the call; pid -1 / cpu 0 is "any process" for uprobes.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        bail!("perf_event_open(uprobe {}:{offset:#x}): {}", path.display(), std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a loaded program to a perf event through a BPF link carrying `cookie`.
fn link_with_cookie(prog_fd: i32, perf_fd: &OwnedFd, cookie: u64) -> Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PERF_EVENT: u32 = 41;
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(perf_fd.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_PERF_EVENT.to_ne_bytes());
    attr[16..24].copy_from_slice(&cookie.to_ne_bytes());
    // SAFETY: bpf(2) reads the attr buffer we pass with its size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        bail!("BPF_LINK_CREATE for a USDT probe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Mounts tracefs if it is not mounted (a fresh host often has it unmounted).
pub fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
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

fn sched_format(event: &str) -> Result<String> {
    let path = format!("{TRACEFS}/events/sched/{event}/format");
    std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read {path}: this kernel lacks the sched tracepoints wsgiscope needs")
    })
}

/// Attaches a program that reads its tracepoint at fixed offsets, after checking them.
fn attach_fixed_layout(ebpf: &mut Ebpf, category: &str, name: &str, fields: &[(&str, u32)]) -> Result<Box<dyn Send>> {
    let path = format!("{TRACEFS}/events/{category}/{name}/format");
    let format = std::fs::read_to_string(&path).with_context(|| format!("this kernel has no {path}"))?;
    for (field, want) in fields {
        let got = field_offset(&format, field);
        if got != Some(*want) {
            bail!("field {field} is at {got:?} in {path}, the kernel program expects {want}");
        }
    }
    attach_tracepoint(ebpf, category, name)
}

/// Loads the program named after a tracepoint and attaches it there: its link.
fn attach_tracepoint(ebpf: &mut Ebpf, category: &str, name: &str) -> Result<Box<dyn Send>> {
    let prog: &mut TracePoint =
        ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?.try_into()?;
    prog.load().with_context(|| format!("the kernel refused program {name}"))?;
    let id = prog.attach(category, name).with_context(|| {
        format!("attaching tracepoint {category}/{name} failed: this kernel lacks it or tracefs is unusable")
    })?;
    Ok(Box::new(prog.take_link(id)?))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup):
/// raise it where allowed (CAP_SYS_RESOURCE); elsewhere it is not needed, so never fail on it.
fn raise_memlock() {
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
fn check_kernel_btf() -> Result<()> {
    if Path::new(KERNEL_BTF).exists() {
        return Ok(());
    }
    bail!(
        "this kernel publishes no BTF ({KERNEL_BTF} is missing): wsgiscope's programs need it to read \
         syscall arguments. Run a kernel built with CONFIG_DEBUG_INFO_BTF=y (the default of current \
         distributions' kernels), 5.15 or newer"
    )
}

impl Probes {
    /// Loads the kernel programs and attaches every tracepoint.
    /// Returns the probes and, apart, the ring buffer their records arrive on.
    /// `watch_execs` (daemon): the kernel traces every process that execs a WSGI server name.
    pub fn load(watch_execs: bool) -> Result<(Self, RingBuf<MapData>)> {
        check_capabilities()?;
        check_kernel_btf()?;
        ensure_tracefs()?;
        raise_memlock();
        let fork = sched_format("sched_process_fork")?;
        let child_off = field_offset(&fork, "child_pid")
            .ok_or_else(|| anyhow!("sched_process_fork has no child_pid field on this kernel"))?;
        // Kernels before 6.x lack group_dead: 0 tells the kernel side to use tid == tgid.
        let group_dead_off = field_offset(&sched_format("sched_process_exit")?, "group_dead").unwrap_or(0);

        let mut ebpf = EbpfLoader::new()
            .override_global("FORK_CHILD_PID_OFFSET", &child_off, true)
            .override_global("EXIT_GROUP_DEAD_OFFSET", &group_dead_off, true)
            .override_global("WATCH_EXECS", &u32::from(watch_execs), true)
            .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsgiscope-ebpf")))
            .context("loading the eBPF programs failed (kernel without BPF or BTF support, or a verifier rejection)")?;

        let mut links = Vec::new();
        for (category, names) in [("syscalls", SYSCALL_PROGRAMS), ("sched", SCHED_PROGRAMS)] {
            for name in names {
                links.push(attach_tracepoint(&mut ebpf, category, name)?);
            }
        }
        for (category, name, fields, feature) in FIXED_LAYOUT_PROGRAMS {
            match attach_fixed_layout(&mut ebpf, category, name, fields) {
                Ok(link) => links.push(link),
                Err(e) => log::warn!("{category}/{name} unavailable, so {feature} is not measured: {e:#}"),
            }
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)?;
        let traced = HashMap::try_from(take(&mut ebpf, "TRACED")?)?;
        let conns = HashMap::try_from(take(&mut ebpf, "CONNS")?)?;
        let pending = HashMap::try_from(take(&mut ebpf, "PENDING")?)?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, "STATS")?)?;
        // GC probes are attached per interpreter binary, as servers are found.
        for name in GC_PROGRAMS {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load().with_context(|| format!("the kernel refused program {name}"))?;
        }
        let probes =
            Self { ebpf, links, usdt_links: Vec::new(), gc_binaries: HashSet::new(), traced, conns, pending, stats };
        Ok((probes, events))
    }

    /// Attaches the GC probes to a server's interpreter binary (once per binary). `Ok(false)`
    /// when the binary has neither USDT notes nor the collector symbol.
    pub fn attach_gc(&mut self, rt: &Runtime) -> Result<bool> {
        let meta = std::fs::metadata(&rt.host_path).with_context(|| format!("cannot stat {}", rt.host_path.display()))?;
        if !self.gc_binaries.insert((meta.dev(), meta.ino())) {
            return Ok(!matches!(rt.gc, GcProbes::None));
        }
        match &rt.gc {
            GcProbes::Usdt { start, done } => {
                for (probes, prog_name) in [(start, "gc_start"), (done, "gc_done")] {
                    let prog: &mut UProbe = self.ebpf.program_mut(prog_name).expect("loaded").try_into()?;
                    let prog_fd = prog.fd()?.as_fd().as_raw_fd();
                    for p in probes {
                        // Where gc__start passes the generation; gc__done's argument is unused.
                        let cookie = if prog_name == "gc_start" {
                            python::arg_cookie(p.args.split_whitespace().next().unwrap_or(""))?
                        } else {
                            0
                        };
                        let perf = usdt_perf_event(&rt.host_path, p.offset, p.semaphore)?;
                        let link = link_with_cookie(prog_fd, &perf, cookie)?;
                        self.usdt_links.push((link, perf));
                    }
                }
                Ok(true)
            }
            GcProbes::Symbol(symbol) => {
                for (prog_name, cookie) in [("gc_start", Some(python::symbol_generation_cookie())), ("gc_return", None)] {
                    let prog: &mut UProbe = self.ebpf.program_mut(prog_name).expect("loaded").try_into()?;
                    let point = UProbeAttachPoint { location: UProbeAttachLocation::Symbol(symbol), cookie };
                    let id = prog
                        .attach(point, &rt.host_path, UProbeScope::AllProcesses)
                        .with_context(|| format!("uprobe on {symbol} in {}", rt.path.display()))?;
                    self.links.push(Box::new(prog.take_link(id)?));
                }
                Ok(true)
            }
            GcProbes::None => Ok(false),
        }
    }

    /// Detaches every probe, closing the links in parallel: their RCU grace periods overlap,
    /// so the agent stops in a fraction of a second instead of two.
    pub fn detach(&mut self) {
        let mut links = std::mem::take(&mut self.links);
        links.extend(std::mem::take(&mut self.usdt_links).into_iter().map(|l| Box::new(l) as Box<dyn Send>));
        std::thread::scope(|s| {
            for link in links {
                s.spawn(move || drop(link));
            }
        });
    }

    /// Adds a process to the traced set; its future forks are followed in the kernel.
    pub fn trace(&mut self, pid: u32, root: u32) -> Result<()> {
        self.traced
            .insert(pid, root, 0)
            .with_context(|| format!("cannot add process {pid} to the traced set"))
    }

    /// Removes and returns the connection states still held for an exited process: the
    /// kernel closed its sockets without a close syscall.
    pub fn take_connections(&mut self, tgid: u32) -> Vec<(u32, ConnState)> {
        let lo = conn_key(tgid, 0);
        let hi = conn_key(tgid, u32::MAX);
        let keys: Vec<u64> = self.conns.keys().filter_map(Result::ok).filter(|k| (lo..=hi).contains(k)).collect();
        let mut out = Vec::new();
        for k in keys {
            if let Ok(state) = self.conns.get(&k, 0) {
                out.push((k as u32, state));
            }
            let _ = self.conns.remove(&k);
        }
        out
    }

    /// The requests in progress, each with the root (master) of its process: connections of
    /// traced processes with a request started and not yet ended. Also how many connections
    /// the table holds (one pass over it).
    pub fn in_progress(&self) -> (Vec<(u32, InProgress)>, usize) {
        let mut connections = 0;
        let mut running = Vec::new();
        for (k, c) in self.conns.iter().filter_map(Result::ok) {
            connections += 1;
            if c.flags & CONN_IN_REQUEST == 0 {
                continue;
            }
            let r = InProgress {
                tgid: (k >> 32) as u32,
                fd: k as u32,
                start_ns: c.agg.start_ns,
                write_calls: c.agg.write_calls,
                last_write_ns: c.agg.last_write_ns,
            };
            running.push((c.root, r));
        }
        (running, connections)
    }

    /// Stops tracing every process traced on behalf of `root` (a process that turned out not
    /// to be a WSGI server).
    pub fn untrace_root(&mut self, root: u32) {
        let tasks: Vec<u32> =
            self.traced.iter().filter_map(Result::ok).filter(|(_, r)| *r == root).map(|(t, _)| t).collect();
        for t in tasks {
            let _ = self.traced.remove(&t);
        }
    }

    /// Entries in the maps that hold per-connection, per-syscall and per-process state
    /// (`connections` as `in_progress` counted them).
    pub fn map_sizes(&self, connections: usize) -> [(&'static str, usize); 3] {
        [
            ("connections", connections),
            // Slots stay per thread; those holding a syscall in flight count.
            ("pending", self.pending.iter().filter_map(Result::ok).filter(|(_, p)| p.op != 0).count()),
            ("traced", self.traced.keys().count()),
        ]
    }

    /// Kernel-side counters (`STAT_*`), summed over CPUs.
    pub fn stats(&self) -> [u64; STAT_COUNT as usize] {
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(per_cpu) = self.stats.get(&(i as u32), 0) {
                *slot = per_cpu.iter().sum();
            }
        }
        out
    }
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
