//! The kernel side, loaded and attached: checks first (`preflight`), then the programs of the
//! eBPF object, each tracepoint program attached to the tracepoint it is named after (the
//! category from `wsgiscope_common::tracepoint_category`), the GC uprobes per interpreter
//! (`gc`, `usdt`). `Kernel` also reads and seeds the maps the agent shares with the programs.
//! Dropping it unloads everything; `detach` first closes the links, in parallel.
mod cpu_clock;
mod gc;
mod preflight;
pub mod rss;
mod usdt;

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, UProbe},
    Ebpf, EbpfLoader,
};
use wsgiscope_common::{
    conn_key, tracepoint_category, ConnState, Downstream, GcStart, Pending, TaskMark, CALL_IDLE, FIXED_LAYOUTS, GC_PROGRAMS,
    GLOBAL_EXIT_GROUP_DEAD_OFFSET, GLOBAL_FORK_CHILD_PID_OFFSET, GLOBAL_PENDING_ON_CPU, GLOBAL_RSS_MM_OFFSET, GLOBAL_RSS_STAT_OFFSET, GLOBAL_RQ_CLOCK_LAYOUT, GLOBAL_RSS_WORDS, GLOBAL_STEAL_LAYOUT, GLOBAL_SUM_EXEC_OFFSET, GLOBAL_WATCH_EXECS, MAP_CONNS,
    MAP_DOWNSTREAM, MAP_EVENTS, MAP_GC_STARTED, MAP_PENDING, MAP_PENDING_ON_CPU, MAP_STATS, MAP_TRACED, MAP_TRACED_TASKS, STAT_COUNT,
};

pub use preflight::{check_capabilities, ensure_tracefs, field_offset};
use preflight::{check_kernel_btf, raise_memlock, tracepoint_format};

/// The loaded and attached kernel side, with the maps the agent reads.
pub struct Kernel {
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
    /// Each task id's mark (its root, 0: not traced; and the kernel's marks), the root
    /// kept with `traced`: what the kernel programs read.
    traced_tasks: Array<MapData, TaskMark>,
    conns: HashMap<MapData, u64, ConnState>,
    /// Syscalls in flight of threads that left their CPU during the call…
    pending: HashMap<MapData, u64, Pending>,
    /// …and of the thread running on each CPU (`Pending::tid`), when the hand-over is per CPU.
    pending_on_cpu: Option<PerCpuArray<MapData, Pending>>,
    downstream: HashMap<MapData, u64, Downstream>,
    gc_started: HashMap<MapData, u64, GcStart>,
    stats: PerCpuArray<MapData, u64>,
}

/// Thread `tid` of `tgid`'s CPU clock from /proc (`None`: it is gone).
fn thread_clock(tgid: u32, tid: u32) -> Option<ThreadClock> {
    let task = procfs::process::Process::new(tgid as i32).ok()?.task_from_tid(tid as i32).ok()?;
    let running = task.stat().ok()?.state == 'R';
    Some(ThreadClock { running, cpu_ns: task.schedstat().ok()?.sum_exec_runtime })
}

/// Checks that a tracepoint's fields are where a kernel program reads them.
fn fixed_layout_matches(category: &str, name: &str, fields: &[(&str, u32)]) -> Result<()> {
    let format = tracepoint_format(category, name)?;
    for (field, want) in fields {
        let got = field_offset(&format, field);
        if got != Some(*want) {
            bail!("field {field} of {category}/{name} is at {got:?}, the kernel program expects {want}");
        }
    }
    Ok(())
}

/// Attaches a program that reads its tracepoint at fixed offsets, after checking them.
fn attach_fixed_layout(prog: &mut TracePoint, category: &str, name: &str, fields: &[(&str, u32)]) -> Result<Box<dyn Send>> {
    fixed_layout_matches(category, name, fields)?;
    attach_tracepoint(prog, category, name)
}

/// Loads a tracepoint program and attaches it to the tracepoint it is named after: its link.
fn attach_tracepoint(prog: &mut TracePoint, category: &str, name: &str) -> Result<Box<dyn Send>> {
    prog.load().with_context(|| format!("the kernel refused program {name}"))?;
    let id = prog.attach(category, name).with_context(|| {
        format!("attaching tracepoint {category}/{name} failed: this kernel lacks it or tracefs is unusable")
    })?;
    Ok(Box::new(prog.take_link(id)?))
}

/// One thread's kernel state at a moment (`Kernel::thread_now`).
#[derive(Clone, Copy, Default)]
pub struct ThreadNow {
    pub syscall: Option<Pending>,
    pub gc: Option<GcStart>,
    pub clock: Option<ThreadClock>,
}

/// A thread's CPU clock as /proc shows it: the scheduler's charged sum (`schedstat`, at most a
/// tick behind while it runs), in the base of the kernel side's `cpu_start_ns`.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct ThreadClock {
    /// Running or ready to run (state `R`): not blocked or asleep.
    pub running: bool,
    pub cpu_ns: u64,
}

impl Kernel {
    /// Loads the kernel programs and attaches every tracepoint.
    /// Returns them and, apart, the ring buffer their records arrive on.
    /// `watch_execs` (daemon): the kernel traces every process that execs a WSGI server name.
    /// `cpu_time`: read the serving thread's CPU clock at each request's start and response
    /// writes (off: no CPU time per request, and none of those reads).
    pub fn load(watch_execs: bool, cpu_time: bool) -> Result<(Self, RingBuf<MapData>)> {
        check_capabilities()?;
        check_kernel_btf()?;
        ensure_tracefs()?;
        raise_memlock();
        let fork = tracepoint_format("sched", "sched_process_fork")?;
        let child_off = field_offset(&fork, "child_pid")
            .ok_or_else(|| anyhow!("sched_process_fork has no child_pid field on this kernel"))?;
        // Kernels before 6.x lack group_dead: 0 tells the kernel side to use tid == tgid.
        let group_dead_off = field_offset(&tracepoint_format("sched", "sched_process_exit")?, "group_dead").unwrap_or(0);
        let layout_matches = |name: &str| {
            FIXED_LAYOUTS.iter().find(|l| l.name == name).is_some_and(|l| fixed_layout_matches(l.category, l.name, l.fields).is_ok())
        };
        // A syscall's enter hands over to its exit in the CPU's slot where sched_switch, which
        // moves the slot off the CPU with a thread that leaves it, is attached.
        let pending_on_cpu = layout_matches("sched_switch");

        // Offsets from the kernel's BTF: the resident-page counters (memory growth per request)
        // and the task's own CPU clock (read where a request needs it). The BTF (mapped, or
        // parsed whole on kernels before 6.16: tens of MB) is freed before aya parses its own
        // copy to load the programs, so the two never add up in the agent's peak memory.
        let (rss, sum_exec, steal, rq_clock) = {
            let btf = rss::kernel_btf();
            let rss = btf.as_ref().map_err(|e| anyhow!("{e:#}")).and_then(rss::layout).unwrap_or_else(|e| {
                log::warn!("memory growth per request is not measured: {e:#}");
                rss::RssLayout { mm: 0, rss_stat: 0, words: [0; 3] }
            });
            let sum_exec = if cpu_time {
                btf.as_ref().map_err(|e| anyhow!("{e:#}")).and_then(cpu_clock::sum_exec_offset).unwrap_or_else(|e| {
                    log::warn!("CPU time per request is not measured: {e:#}");
                    0
                })
            } else {
                // All CPU clock offsets 0: the kernel side reads no clock.
                log::info!("CPU time per request is not measured (--no-cpu-time)");
                0
            };
            let steal = if sum_exec == 0 {
                [0; 3]
            } else {
                btf.as_ref()
                    .map_err(|e| anyhow!("{e:#}"))
                    .and_then(|btf| if cpu_clock::steal_left_out(btf) { cpu_clock::steal_layout(btf) } else { Err(anyhow!("this kernel leaves none out of task clocks")) })
                    .unwrap_or_else(|e| {
                        // Bare metal has none to leave out.
                        log::info!("CPU clocks do not leave out a hypervisor's steal time: {e:#}");
                        [0; 3]
                    })
            };
            // What a running task ran since its last charge: its runqueue's clock.
            let rq_clock = btf
                .as_ref()
                .map_err(|e| anyhow!("{e:#}"))
                .and_then(|btf| if sum_exec != 0 { cpu_clock::rq_clock_layout(btf, steal[0] != 0) } else { Err(anyhow!("no task clock to carry")) })
                .unwrap_or_else(|e| {
                    if sum_exec != 0 {
                        log::warn!("CPU time per request is not measured: {e:#}");
                    }
                    [0; 6]
                });
            (rss, sum_exec, steal, rq_clock)
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_RSS_MM_OFFSET, &rss.mm, true)
            .override_global(GLOBAL_RSS_STAT_OFFSET, &rss.rss_stat, true)
            .override_global(GLOBAL_RSS_WORDS, &rss.words, true)
            .override_global(GLOBAL_FORK_CHILD_PID_OFFSET, &child_off, true)
            .override_global(GLOBAL_EXIT_GROUP_DEAD_OFFSET, &group_dead_off, true)
            .override_global(GLOBAL_WATCH_EXECS, &u32::from(watch_execs), true)
            .override_global(GLOBAL_PENDING_ON_CPU, &u32::from(pending_on_cpu), true)
            .override_global(GLOBAL_SUM_EXEC_OFFSET, &sum_exec, true)
            .override_global(GLOBAL_STEAL_LAYOUT, &steal, true)
            .override_global(GLOBAL_RQ_CLOCK_LAYOUT, &rq_clock, true)
            .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsgiscope-ebpf")))
            .context("loading the eBPF programs failed (kernel without BPF or BTF support, or a verifier rejection)")?;

        // The two parsed copies of the kernel's BTF (ours, then aya's) are freed by now, but
        // glibc keeps freed heap for reuse: give it back, or the agent keeps it resident.
        // SAFETY: malloc_trim only releases free memory.
        unsafe { libc::malloc_trim(0) };

        // Every tracepoint program, where its name says.
        let mut links = Vec::new();
        for (name, prog) in ebpf.programs_mut() {
            let Ok(prog) = <&mut TracePoint>::try_from(prog) else { continue };
            let category = tracepoint_category(name).ok_or_else(|| anyhow!("program {name}: no tracepoint of that name"))?;
            match FIXED_LAYOUTS.iter().find(|l| l.name == name) {
                None => links.push(attach_tracepoint(prog, category, name)?),
                Some(l) => match attach_fixed_layout(prog, category, name, l.fields) {
                    Ok(link) => links.push(link),
                    // Its layout matched, so the hand-over of writes counts on it.
                    Err(e) if name == "sched_switch" && pending_on_cpu => {
                        return Err(e.context("sched/sched_switch could not be attached, though its fields are as expected: write times cannot be followed across CPUs without it"));
                    }
                    Err(e) => log::warn!("{category}/{name} unavailable, so {} is not measured: {e:#}", l.feature),
                },
            }
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let events = RingBuf::try_from(take(&mut ebpf, MAP_EVENTS)?)?;
        let traced = HashMap::try_from(take(&mut ebpf, MAP_TRACED)?)?;
        let traced_tasks = Array::try_from(take(&mut ebpf, MAP_TRACED_TASKS)?)?;
        let conns = HashMap::try_from(take(&mut ebpf, MAP_CONNS)?)?;
        let pending = HashMap::try_from(take(&mut ebpf, MAP_PENDING)?)?;
        let pending_on_cpu =
            if pending_on_cpu { Some(PerCpuArray::try_from(take(&mut ebpf, MAP_PENDING_ON_CPU)?)?) } else { None };
        let downstream = HashMap::try_from(take(&mut ebpf, MAP_DOWNSTREAM)?)?;
        let gc_started = HashMap::try_from(take(&mut ebpf, MAP_GC_STARTED)?)?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, MAP_STATS)?)?;
        // GC probes are attached per interpreter binary, as servers are found.
        for name in GC_PROGRAMS {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load().with_context(|| format!("the kernel refused program {name}"))?;
        }
        let kernel = Self {
            ebpf,
            links,
            usdt_links: Vec::new(),
            gc_binaries: HashSet::new(),
            traced,
            traced_tasks,
            conns,
            pending,
            pending_on_cpu,
            downstream,
            gc_started,
            stats,
        };
        Ok((kernel, events))
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
        // The list first: a task the kernel sees marked is listed. A task already marked with
        // this root (daemon mode: traced from its exec) is left alone: its marks are the
        // kernel's to keep.
        let mark = self.traced_tasks.get(&pid, 0).unwrap_or_default();
        self.traced
            .insert(pid, root, 0)
            .and_then(|()| {
                if mark.root == root {
                    Ok(())
                } else {
                    self.traced_tasks.set(pid, TaskMark { root, marks: mark.marks }, 0)
                }
            })
            .with_context(|| format!("cannot add process {pid} to the traced set"))
    }

    /// Removes and returns the connection states (by fd) still held for an exited process:
    /// the kernel closed its sockets without a close syscall.
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

    /// Makes socket `fd` of `tgid` (connected before attach) a downstream socket.
    pub fn seed_downstream(&mut self, tgid: u32, fd: u32, root: u32) -> Result<()> {
        // SAFETY: plain data; an idle socket's other fields are set when a call starts.
        let mut d: Downstream = unsafe { std::mem::zeroed() };
        d.root = root;
        d.state = CALL_IDLE;
        self.downstream.insert(conn_key(tgid, fd), d, 0).with_context(|| {
            format!("cannot add socket {fd} of process {tgid} to the downstream table (full?): its calls are not seen")
        })
    }

    /// Every downstream socket the kernel holds, by `conn_key(tgid, fd)`, with its call.
    pub fn downstream(&self) -> impl Iterator<Item = (u64, Downstream)> + '_ {
        self.downstream.iter().filter_map(Result::ok)
    }

    /// Forgets the downstream sockets of an exited process (closed without a close syscall).
    pub fn forget_downstream(&mut self, tgid: u32) {
        let lo = conn_key(tgid, 0);
        let hi = conn_key(tgid, u32::MAX);
        let keys: Vec<u64> =
            self.downstream.keys().filter_map(Result::ok).filter(|k| (lo..=hi).contains(k)).collect();
        for k in keys {
            let _ = self.downstream.remove(&k);
        }
    }

    /// Every connection the kernel holds state for, by `conn_key(tgid, fd)`.
    pub fn connections(&self) -> impl Iterator<Item = (u64, ConnState)> + '_ {
        self.conns.iter().filter_map(Result::ok)
    }

    /// What thread `tid` of `tgid` is in the middle of, now: the syscall it is inside (if the
    /// kernel stashed one: writes and polls), its collection in progress, and its CPU clock
    /// (from /proc). One lookup per table (the live views ask per request in progress).
    pub fn thread_now(&self, tgid: u32, tid: u32) -> ThreadNow {
        let id = (u64::from(tgid) << 32) | u64::from(tid);
        ThreadNow {
            syscall: self.on_cpu(tid).or_else(|| self.pending.get(&id, 0).ok().filter(|p| p.op != 0)),
            gc: self.gc_started.get(&id, 0).ok(),
            clock: thread_clock(tgid, tid),
        }
    }

    /// The syscall in flight of thread `tid` if it is running and made one (in its CPU's slot).
    fn on_cpu(&self, tid: u32) -> Option<Pending> {
        let slots = self.pending_on_cpu.as_ref()?.get(&0, 0).ok()?;
        slots.iter().find(|p| p.op != 0 && p.tid == tid).copied()
    }

    /// Stops tracing every process traced on behalf of `root` (a process that turned out not
    /// to be a WSGI server).
    pub fn untrace_root(&mut self, root: u32) {
        let tasks: Vec<u32> =
            self.traced.iter().filter_map(Result::ok).filter(|(_, r)| *r == root).map(|(t, _)| t).collect();
        for t in tasks {
            let _ = self.traced_tasks.set(t, TaskMark::default(), 0);
            let _ = self.traced.remove(&t);
        }
    }

    /// Entries in the maps that hold per-connection, per-socket, per-syscall and per-process
    /// state (`connections` and `downstream` as scans of `connections()` and `downstream()`
    /// counted them).
    pub fn map_sizes(&self, connections: usize, downstream: usize) -> [(&'static str, usize); 4] {
        [
            ("connections", connections),
            ("downstream", downstream),
            // Slots stay per thread (and per CPU); those holding a syscall in flight count.
            ("pending", self.pending.iter().filter_map(Result::ok).filter(|(_, p)| p.op != 0).count() + self.pending_now_on_cpu()),
            ("traced", self.traced.keys().count()),
        ]
    }

    /// CPUs' slots holding a syscall in flight.
    fn pending_now_on_cpu(&self) -> usize {
        let slots = self.pending_on_cpu.as_ref().and_then(|m| m.get(&0, 0).ok());
        slots.map_or(0, |s| s.iter().filter(|p| p.op != 0).count())
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
    use std::collections::HashSet;

    use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
    use wsgiscope_common::{
        tracepoint_category, FIXED_LAYOUTS, GC_PROGRAMS, GLOBAL_EXIT_GROUP_DEAD_OFFSET, GLOBAL_FORK_CHILD_PID_OFFSET,
        GLOBAL_PENDING_ON_CPU, GLOBAL_RSS_MM_OFFSET, GLOBAL_RSS_STAT_OFFSET, GLOBAL_RQ_CLOCK_LAYOUT, GLOBAL_RSS_WORDS, GLOBAL_STEAL_LAYOUT, GLOBAL_SUM_EXEC_OFFSET, GLOBAL_WATCH_EXECS, MAP_CONNS, MAP_DOWNSTREAM, MAP_EVENTS, MAP_GC_STARTED, MAP_PENDING, MAP_PENDING_ON_CPU, MAP_STATS,
        MAP_THREADS, MAP_TRACED, MAP_TRACED_TASKS,
    };

    const OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsgiscope-ebpf"));

    /// The names the agent looks for are the names the kernel programs have: each map and
    /// global of the contract is in the object, and every tracepoint program is named after a
    /// tracepoint the loader knows the category of.
    #[test]
    fn the_ebpf_object_matches_the_contract() {
        let obj = object::File::parse(OBJECT).unwrap();
        let symbols: HashSet<&str> = obj.symbols().filter_map(|s| s.name().ok()).collect();
        let names = [MAP_EVENTS, MAP_TRACED, MAP_TRACED_TASKS, MAP_CONNS, MAP_PENDING, MAP_PENDING_ON_CPU, MAP_STATS, MAP_DOWNSTREAM, MAP_THREADS, MAP_GC_STARTED];
        let globals = [
            GLOBAL_FORK_CHILD_PID_OFFSET,
            GLOBAL_EXIT_GROUP_DEAD_OFFSET,
            GLOBAL_WATCH_EXECS,
            GLOBAL_PENDING_ON_CPU,
            GLOBAL_RSS_MM_OFFSET,
            GLOBAL_RSS_STAT_OFFSET,
            GLOBAL_RSS_WORDS,
            GLOBAL_SUM_EXEC_OFFSET,
            GLOBAL_STEAL_LAYOUT,
            GLOBAL_RQ_CLOCK_LAYOUT,
        ];
        for name in names.into_iter().chain(globals).chain(GC_PROGRAMS) {
            assert!(symbols.contains(name), "{name} missing from the eBPF object");
        }
        let mut tracepoints = Vec::new();
        for sym in obj.symbols().filter(|s| s.kind() == SymbolKind::Text) {
            let section = sym.section_index().and_then(|i| obj.section_by_index(i).ok());
            if section.and_then(|s| s.name().ok()).is_some_and(|n| n.starts_with("tracepoint")) {
                let name = sym.name().unwrap();
                assert!(tracepoint_category(name).is_some(), "program {name}: no tracepoint category");
                tracepoints.push(name);
            }
        }
        assert_eq!(tracepoints.len(), 27 + 4, "{tracepoints:?}");
        for l in FIXED_LAYOUTS {
            assert!(tracepoints.contains(&l.name), "{}", l.name);
        }
    }

    /// No program on a syscall, scheduler or socket hook calls `memset`, `memmove`, `memcpy` or
    /// `memcmp`: on BPF they are byte loops (~7 instructions a byte), which LLVM calls for struct
    /// copies and runs of zeroing stores unless they are written word by word
    /// (`wsgiscope_common::words`). Only the exec program of `daemon`, once per exec of a
    /// server's name, compares a command name with one.
    #[test]
    fn no_hot_program_calls_a_byte_loop() {
        let obj = object::File::parse(OBJECT).unwrap();
        let mut callers = HashSet::new();
        for section in obj.sections().filter(|s| s.name().is_ok_and(|n| n.starts_with("tracepoint"))) {
            let functions: Vec<_> = obj
                .symbols()
                .filter(|s| s.kind() == SymbolKind::Text && s.section_index() == Some(section.index()))
                .collect();
            for (offset, reloc) in section.relocations() {
                let object::RelocationTarget::Symbol(target) = reloc.target() else { continue };
                let target = obj.symbol_by_index(target).unwrap().name().unwrap();
                if !["memset", "memmove", "memcpy", "memcmp"].contains(&target) {
                    continue;
                }
                let caller = functions
                    .iter()
                    .find(|f| (f.address()..f.address() + f.size()).contains(&offset))
                    .map_or("?", |f| f.name().unwrap());
                callers.insert(caller);
            }
        }
        callers.remove("sched_process_exec");
        assert!(callers.is_empty(), "programs calling a byte-loop mem function: {callers:?}");
    }
}
