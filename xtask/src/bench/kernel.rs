//! Kernel programs' run time, per program (issue 17): the kernel's own counters
//! (`kernel.bpf_stats_enabled`, read with `bpftool prog show -j`) differenced over load runs and
//! write loops, for the agent's programs and, in the same runs, for do-nothing bpftrace programs
//! on the same hooks (the floor any program there costs), for bpftrace programs doing only
//! what accept and a request's end cannot do without, and for the bench's own probes (a record
//! emitted, `emit.rs`; a timed write on the agent's connections, `write_probe.rs`). After the
//! rounds, with the counting off, the /blocks comparison with the timing middleware
//! (`blocks_ab.rs`). The report is `report/kernel.rs`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use super::{
    capacity::{wait_counted, Snapshot},
    load,
    micro::{self, Mode},
    blocks_ab::{self, BlocksAb},
    emit::EmitProbe,
    write_probe::WriteProbe,
    procs::{self, Middleware},
    Plan,
};
use crate::group::check_stop;

/// The routes measured: one block, and 1000 blocks of 128 bytes.
pub const ROUTES: [&str; 2] = ["/hello", "/blocks"];

/// The hooks that get a do-nothing program: those of the figures the report compares.
pub const FLOOR_HOOKS: [&str; 7] = [
    "sys_enter_write",
    "sys_exit_write",
    "sys_enter_sendto",
    "sys_exit_sendto",
    "sys_exit_accept4",
    "sys_enter_shutdown",
    "sys_enter_close",
];

/// bpftrace's program: empty actions on FLOOR_HOOKS.
pub fn floor_program() -> String {
    FLOOR_HOOKS
        .iter()
        .map(|h| format!("tracepoint:syscalls:{h} {{}}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a program on a once-per-request hook cannot do without, alone in a bpftrace program
/// on that hook, in the same runs as the agent's: under the same load, with the caches as the
/// app leaves them (the primitives below are measured with hot caches).
pub struct Essential {
    pub hook: &'static str,
    pub what: &'static str,
    pub program: &'static str,
}

pub const ESSENTIALS: [Essential; 2] = [
    Essential {
        hook: "sys_exit_accept4",
        what: "the connection's state created: a clock read (the accept wait ends) and a hash update keyed by (task, fd)",
        program: "tracepoint:syscalls:sys_exit_accept4 /args->ret >= 0/ { @conn[tid, args->ret] = nsecs; }",
    },
    Essential {
        hook: "sys_enter_shutdown",
        what: "the connection's state found: a hash lookup by (task, fd) and a clock read (no record written)",
        program: "tracepoint:syscalls:sys_enter_shutdown { $c = @conn[tid, args->fd]; $t = nsecs; }",
    },
];

/// bpftrace's program for ESSENTIALS.
pub fn essential_program() -> String {
    ESSENTIALS.iter().map(|e| e.program).collect::<Vec<_>>().join(" ")
}

/// The kernel keeps names of 15 characters: bpftrace's programs are named after their probe
/// (cut there), while bpftool restores the agent's full names from BTF.
pub fn floor_hook(name: &str) -> Option<&'static str> {
    FLOOR_HOOKS
        .into_iter()
        .find(|h| *h == name || (name.len() == 15 && h.starts_with(name)))
}

/// One operation a program does, measured alone: a bpftrace program on getppid(2) (which the
/// agent does not hook) while the loop harness calls it outside the server; `hook` names the
/// program measured (the kernel's 15-character name).
pub struct Primitive {
    pub what: &'static str,
    pub program: &'static str,
    pub hook: &'static str,
}

const ENTER_GETPPID: &str = "sys_enter_getpp";

/// The operations the agent's programs are made of. The first is the floor; the hash map's
/// key is the task id, so its rows include reading that.
pub const PRIMITIVES: [Primitive; 6] = [
    Primitive { what: "nothing (the floor)", program: "tracepoint:syscalls:sys_enter_getppid {}", hook: ENTER_GETPPID },
    Primitive {
        what: "read the clock (bpf_ktime_get_ns)",
        program: "tracepoint:syscalls:sys_enter_getppid { $t = nsecs; }",
        hook: ENTER_GETPPID,
    },
    Primitive {
        what: "read the task id (bpf_get_current_pid_tgid)",
        program: "tracepoint:syscalls:sys_enter_getppid { $t = tid; }",
        hook: ENTER_GETPPID,
    },
    Primitive {
        what: "task id, then a hash lookup that finds it",
        program: "tracepoint:syscalls:sys_enter_getppid { $v = @m[tid]; } tracepoint:syscalls:sys_exit_getppid { @m[tid] = 1; }",
        hook: ENTER_GETPPID,
    },
    Primitive {
        what: "task id, then a hash update of an existing key",
        program: "tracepoint:syscalls:sys_enter_getppid { $v = @m[tid]; } tracepoint:syscalls:sys_exit_getppid { @m[tid] = 1; }",
        hook: "sys_exit_getppi",
    },
    Primitive {
        what: "read a field of the current task (bpf_get_current_task, bpf_probe_read_kernel)",
        program: "tracepoint:syscalls:sys_enter_getppid { $p = curtask->pid; }",
        hook: ENTER_GETPPID,
    },
];

/// Each primitive's run time: its program attached alone, `iters` getppid(2) calls (once per
/// program: primitives that share one read its programs' counters from the same run).
fn primitives(work: &Path, iters: u64) -> Result<Vec<Cost>> {
    let mut out = Vec::new();
    let mut last: Option<(&str, BTreeMap<String, Cost>)> = None;
    for p in &PRIMITIVES {
        if last.as_ref().is_none_or(|(program, _)| *program != p.program) {
            check_stop()?;
            let bpftrace = procs::bpftrace(work, p.program)?;
            let owner = prog_ids_of(bpftrace.pid());
            let before = bpftool_progs()?;
            micro::untraced(Mode::Getppid, iters)?;
            let after = bpftool_progs()?;
            drop(bpftrace);
            last = Some((p.program, delta(&before, &after, &owner)));
        }
        let cost = last.as_ref().and_then(|(_, d)| d.get(p.hook)).copied().unwrap_or_default();
        println!("bench: primitive {:?}: {} ns per run", p.what, cost.ns_per_run().map_or("-".into(), |v| format!("{v:.0}")));
        out.push(cost);
    }
    Ok(out)
}

/// One program's counters, as `bpftool prog show -j` prints them.
#[derive(Clone, Debug, PartialEq)]
pub struct Prog {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Processes holding it (bpftool's `pids`, printed only by builds with skeleton support;
    /// Debian's has none, so `owned` falls back to /proc).
    pub pids: Vec<u32>,
}

/// Parses `bpftool prog show -j` (programs without stats, loaded while they were off, count 0).
pub fn parse_progs(json: &str) -> Result<Vec<Prog>> {
    let v: serde_json::Value = serde_json::from_str(json).context("bpftool's JSON")?;
    let list = v.as_array().context("bpftool: not a list")?;
    list.iter()
        .map(|p| {
            Ok(Prog {
                id: p["id"].as_u64().context("program without id")? as u32,
                name: p["name"].as_str().unwrap_or("").to_string(),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                pids: p["pids"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x["pid"].as_u64()).map(|x| x as u32).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

pub fn bpftool_progs() -> Result<Vec<Prog>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("cannot run bpftool")?;
    ensure!(out.status.success(), "bpftool failed: {}", String::from_utf8_lossy(&out.stderr));
    parse_progs(&String::from_utf8_lossy(&out.stdout))
}

/// The ids of the BPF programs a process holds a descriptor of (program or link), from
/// /proc/PID/fdinfo: what bpftool's `pids` shows, for builds that cannot show it.
pub fn prog_ids_of(pid: u32) -> BTreeSet<u32> {
    fdinfo_ids(pid, "prog_id:")
}

/// The ids of the BPF maps a process holds a descriptor of, from /proc/PID/fdinfo.
pub fn map_ids_of(pid: u32) -> BTreeSet<u32> {
    fdinfo_ids(pid, "map_id:")
}

/// The `field` (e.g. `prog_id:`) of each of the process's descriptors that has one.
fn fdinfo_ids(pid: u32, field: &str) -> BTreeSet<u32> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return BTreeSet::new() };
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter_map(|info| {
            let line = info.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .collect()
}

/// Run time and runs of one program (or of several with one name) over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub runs: u64,
    pub ns: u64,
}

impl Cost {
    pub fn ns_per_run(self) -> Option<f64> {
        (self.runs > 0).then(|| self.ns as f64 / self.runs as f64)
    }
}

/// What `owner`'s programs ran between two listings, by name (a program loaded meanwhile counts
/// from zero; one unloaded meanwhile is left out).
pub fn delta(before: &[Prog], after: &[Prog], owner: &BTreeSet<u32>) -> BTreeMap<String, Cost> {
    let mut out: BTreeMap<String, Cost> = BTreeMap::new();
    for p in after.iter().filter(|p| owner.contains(&p.id)) {
        let (ns0, runs0) = before
            .iter()
            .find(|b| b.id == p.id)
            .map_or((0, 0), |b| (b.run_time_ns, b.run_cnt));
        let c = out.entry(p.name.clone()).or_default();
        c.ns += p.run_time_ns.saturating_sub(ns0);
        c.runs += p.run_cnt.saturating_sub(runs0);
    }
    out
}

/// One measured stretch: the agent's programs and the floor programs (by hook), and what was
/// done: requests the agent counted, or write calls of a loop.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    pub requests: f64,
    pub calls: u64,
    pub seconds: f64,
    pub agent: BTreeMap<String, Cost>,
    pub floor: BTreeMap<String, Cost>,
    /// ESSENTIALS' programs, by hook.
    pub essential: BTreeMap<String, Cost>,
    /// The bench's own probes (`emit.rs`, `write_probe.rs`), by hook.
    pub probes: BTreeMap<String, Cost>,
}

impl Window {
    /// Adds another round's window (sums: the figures are totals over totals).
    pub fn add(&mut self, o: &Window) {
        self.requests += o.requests;
        self.calls += o.calls;
        self.seconds += o.seconds;
        for (into, from) in [
            (&mut self.agent, &o.agent),
            (&mut self.floor, &o.floor),
            (&mut self.essential, &o.essential),
            (&mut self.probes, &o.probes),
        ] {
            for (name, c) in from {
                let e = into.entry(name.clone()).or_default();
                e.runs += c.runs;
                e.ns += c.ns;
            }
        }
    }

    /// Sum of ns per run of `names` (e.g. a syscall's enter and exit); None if one did not run.
    pub fn per_run(costs: &BTreeMap<String, Cost>, names: &[&str]) -> Option<f64> {
        names.iter().map(|n| costs.get(*n).and_then(|c| c.ns_per_run())).sum()
    }

    /// Runs of the agent's program `name` per request.
    pub fn runs_per_request(&self, name: &str) -> Option<f64> {
        let runs = self.agent.get(name)?.runs as f64 / self.requests;
        runs.is_finite().then_some(runs)
    }

    /// All the agent's programs: ns and runs per request.
    pub fn total_per_request(&self) -> Option<(f64, f64)> {
        (self.requests > 0.0).then(|| {
            let ns: u64 = self.agent.values().map(|c| c.ns).sum();
            let runs: u64 = self.agent.values().map(|c| c.runs).sum();
            (ns as f64 / self.requests, runs as f64 / self.requests)
        })
    }
}

/// Turns the kernel's BPF run-time counters on for its lifetime and puts back the value found,
/// also on error and on Ctrl-C (which ends the bench by an error, dropping this).
pub struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    /// Counting on: section 6's runs.
    pub fn enable() -> Result<BpfStats> {
        Self::set("1")
    }

    /// Counting off (the kernel's default): every other run. While it is on, each program run
    /// pays two clock reads and a counter update, which would inflate the overhead figures.
    pub fn disable() -> Result<BpfStats> {
        Self::set("0")
    }

    /// `kernel.bpf_stats_enabled` = `value` until the guard is dropped, then what it was.
    fn set(value: &str) -> Result<BpfStats> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS, value).with_context(|| format!("cannot write {BPF_STATS}"))?;
        println!("bench: kernel.bpf_stats_enabled = {value} (was {previous})");
        Ok(BpfStats { previous })
    }

    pub fn previous(&self) -> &str {
        &self.previous
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        match std::fs::write(BPF_STATS, &self.previous) {
            Ok(()) => println!("bench: kernel.bpf_stats_enabled restored to {}", self.previous),
            Err(e) => eprintln!("bench: cannot restore kernel.bpf_stats_enabled to {}: {e}", self.previous),
        }
    }
}

/// The measured stretches: /hello and /blocks under wrk, and write(2) loops on an accepted
/// TCP connection as a child of a worker (traced; once more with the agent restarted with
/// `--no-cpu-time`) and outside the server on a socketpair (untraced).
#[derive(Clone, Debug, Default)]
pub struct Windows {
    pub hello: Window,
    pub blocks: Window,
    pub traced_loop: Window,
    pub traced_loop_no_cpu: Window,
    pub untraced_loop: Window,
}

/// The names the report uses for them.
pub const TRACED_LOOP: &str = "traced loop";
pub const TRACED_LOOP_NO_CPU: &str = "traced loop, `--no-cpu-time`";
pub const UNTRACED_LOOP: &str = "untraced loop";

impl Windows {
    pub fn get(&self, name: &str) -> &Window {
        match name {
            "/blocks" => &self.blocks,
            TRACED_LOOP => &self.traced_loop,
            TRACED_LOOP_NO_CPU => &self.traced_loop_no_cpu,
            UNTRACED_LOOP => &self.untraced_loop,
            _ => &self.hello,
        }
    }

    fn add(&mut self, o: &Windows) {
        self.hello.add(&o.hello);
        self.blocks.add(&o.blocks);
        self.traced_loop.add(&o.traced_loop);
        self.traced_loop_no_cpu.add(&o.traced_loop_no_cpu);
        self.untraced_loop.add(&o.untraced_loop);
    }
}

#[derive(Clone, Debug, Default)]
pub struct Kernel {
    pub rounds: usize,
    pub run_secs: u64,
    pub loop_iters: u64,
    /// Sums over rounds (the figures), and each round's (their spread).
    pub total: Windows,
    pub per_round: Vec<Windows>,
    /// `PRIMITIVES`' run time, in their order (measured once, after the rounds).
    pub primitives: Vec<Cost>,
    pub stats_previous: String,
    /// The /blocks comparison with the timing middleware (`blocks_ab.rs`), after the rounds.
    pub blocks: Option<BlocksAb>,
    pub load_before: String,
    pub load_after: String,
    /// Set by `--only kernel` (the full bench's header has them).
    pub date: String,
    pub commit: String,
}

/// The processes whose programs are measured: the agent's and bpftrace's (two: the floor's
/// and the essential operations').
struct Owners {
    agent: u32,
    floor: u32,
    essential: u32,
    /// This process: it holds the bench's probes.
    probes: u32,
}

impl Owners {
    /// Splits a before/after pair of listings into the agent's and the floor's deltas.
    fn window(&self, before: &[Prog], after: &[Prog]) -> Result<Window> {
        let ids = |pid: u32, progs: &[Prog]| -> BTreeSet<u32> {
            let mut ids = prog_ids_of(pid);
            ids.extend(progs.iter().filter(|p| p.pids.contains(&pid)).map(|p| p.id));
            ids
        };
        let agent = delta(before, after, &ids(self.agent, after));
        let by_hook = |owner: u32| -> Result<BTreeMap<String, Cost>> {
            let mut out = BTreeMap::new();
            for (name, c) in delta(before, after, &ids(owner, after)) {
                let hook = floor_hook(&name).with_context(|| format!("bpftrace program {name:?}"))?;
                out.insert(hook.to_string(), c);
            }
            Ok(out)
        };
        let (floor, essential, probes) = (by_hook(self.floor)?, by_hook(self.essential)?, by_hook(self.probes)?);
        if agent.is_empty() {
            bail!("no program of the agent (pid {}) found in bpftool's listing", self.agent);
        }
        Ok(Window { agent, floor, essential, probes, ..Window::default() })
    }

    /// Lists the programs around `f`, which returns (requests, calls).
    fn measure(&self, f: impl FnOnce() -> Result<(f64, u64)>) -> Result<Window> {
        check_stop()?;
        let before = bpftool_progs()?;
        let t = std::time::Instant::now();
        let (requests, calls) = f()?;
        let seconds = t.elapsed().as_secs_f64();
        let after = bpftool_progs()?;
        Ok(Window { requests, calls, seconds, ..self.window(&before, &after)? })
    }
}

/// wrk on `route`; the requests are those the agent counted over the run.
fn load_run(addr: SocketAddr, metrics: SocketAddr, route: &str, plan: &Plan) -> Result<(f64, u64)> {
    let before = Snapshot::read(metrics)?;
    let run = load::wrk(addr, route, plan.wrk_connections, plan.kernel_secs)?;
    let after = wait_counted(metrics, before.requests + run.requests as f64)?;
    Ok((after.requests - before.requests, 0))
}

/// gunicorn (sync, 2 workers) with the agent and the floor's bpftrace attached; bpf stats on for
/// the rounds only. Each round: /hello and /blocks under wrk, then the traced and untraced loops.
pub fn run(root: &Path, work: &Path, plan: &Plan, redis: &str) -> Result<Kernel> {
    let server = procs::gunicorn(root, work, Middleware::None, redis)?;
    let mut agent = procs::agent(root, work, server.group.pid())?;
    let floor = procs::bpftrace(work, &floor_program())?;
    let essential = procs::bpftrace(work, &essential_program())?;
    let emit = EmitProbe::attach(root)?;
    let mut write_probe = WriteProbe::attach(root, work, agent.group.pid())?;
    let mut owners = Owners {
        agent: agent.group.pid(),
        floor: floor.pid(),
        essential: essential.pid(),
        probes: std::process::id(),
    };
    let mut k = Kernel {
        rounds: plan.kernel_rounds,
        run_secs: plan.kernel_secs,
        loop_iters: plan.micro_iters,
        load_before: procs::loadavg(),
        ..Kernel::default()
    };
    println!("bench: kernel programs: load average before: {}", k.load_before);
    let stats = BpfStats::enable()?;
    k.stats_previous = stats.previous().to_string();
    for round in 0..plan.kernel_rounds {
        let mut r = Windows::default();
        for route in ROUTES {
            let w = owners.measure(|| load_run(server.addr, agent.metrics, route, plan))?;
            println!(
                "bench: round {} kernel {route}: {:.0} requests, {:.2} µs of BPF per request",
                round + 1,
                w.requests,
                w.total_per_request().map_or(f64::NAN, |t| t.0 / 1e3)
            );
            if route == "/blocks" {
                r.blocks = w;
            } else {
                r.hello = w;
            }
        }
        let iters = plan.micro_iters;
        let traced_loop = |owners: &Owners| owners.measure(|| Ok((0.0, micro::traced(&server, Mode::Tcp, iters).map(|_| iters)?)));
        r.traced_loop = traced_loop(&owners)?;
        // The same loop with the agent restarted with --no-cpu-time, then back: what reading the
        // serving thread's CPU clock at each response write costs.
        // The write probe reads the agent's maps: a new one for each agent started.
        drop(write_probe);
        drop(agent);
        let bare = procs::agent_with(root, work, server.group.pid(), &["--no-cpu-time"])?;
        owners.agent = bare.group.pid();
        write_probe = WriteProbe::attach(root, work, bare.group.pid())?;
        r.traced_loop_no_cpu = traced_loop(&owners)?;
        drop(write_probe);
        drop(bare);
        agent = procs::agent(root, work, server.group.pid())?;
        owners.agent = agent.group.pid();
        write_probe = WriteProbe::attach(root, work, agent.group.pid())?;
        r.untraced_loop = owners.measure(|| Ok((0.0, micro::untraced(Mode::Unix, iters).map(|_| iters)?)))?;
        let write = |w: &Window| Window::per_run(&w.agent, &["sys_enter_write", "sys_exit_write"]).unwrap_or(f64::NAN);
        println!(
            "bench: round {} kernel write loops: traced {:.0} ns ({:.0} ns with --no-cpu-time), untraced {:.0} ns per write (enter + exit)",
            round + 1,
            write(&r.traced_loop),
            write(&r.traced_loop_no_cpu),
            write(&r.untraced_loop),
        );
        k.total.add(&r);
        k.per_round.push(r);
    }
    k.load_after = procs::loadavg();
    println!("bench: kernel programs: load average after: {}", k.load_after);
    drop(write_probe);
    drop(emit);
    drop(essential);
    drop(floor);
    drop(agent);
    drop(server);
    k.primitives = primitives(work, plan.micro_iters)?;
    drop(stats);
    // With the counting off: it would add to every program run of the agent's.
    let off = BpfStats::disable()?;
    k.blocks = Some(blocks_ab::run(root, work, plan, redis)?);
    drop(off);
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `bpftool prog show -j` output (v7.1.0, Debian), cut to a few programs: the agent's
    /// and bpftrace's.
    const FIXTURE: &str = include_str!("kernel_fixture.json");

    #[test]
    fn parses_bpftool_json() {
        let progs = parse_progs(FIXTURE).unwrap();
        assert!(progs.len() >= 4);
        assert!(progs.iter().any(|p| p.name == "sys_exit_accept4" && p.run_cnt > 0 && p.run_time_ns > 0));
        // bpftrace's names are cut to 15 characters.
        assert!(progs.iter().any(|p| p.name == "sys_exit_accept"));
        assert_eq!(floor_hook("sys_enter_sendt"), Some("sys_enter_sendto"));
        // A uprobe the run never reached: no counters in the listing.
        assert!(progs.iter().any(|p| p.name == "gc_start" && p.run_cnt == 0 && p.run_time_ns == 0));
        assert!(parse_progs("{}").is_err());
        let with_pids = r#"[{"id":7,"name":"x","run_time_ns":10,"run_cnt":2,"pids":[{"pid":42,"comm":"wsgiscope"}]}]"#;
        assert_eq!(parse_progs(with_pids).unwrap()[0].pids, vec![42]);
        // Loaded while stats were off: no counters.
        assert_eq!(parse_progs(r#"[{"id":8,"name":"y"}]"#).unwrap()[0].run_cnt, 0);
    }

    #[test]
    fn floor_programs_map_to_their_hooks() {
        assert_eq!(floor_hook("sys_exit_accept"), Some("sys_exit_accept4"));
        assert_eq!(floor_hook("sys_enter_shutd"), Some("sys_enter_shutdown"));
        assert_eq!(floor_hook("sys_enter_write"), Some("sys_enter_write"));
        assert_eq!(floor_hook("sys_exit_wri"), None);
        assert_eq!(floor_program().matches("{}").count(), FLOOR_HOOKS.len());
    }

    #[test]
    fn essential_programs_are_on_floor_hooks() {
        // Their programs are told apart by hook as the floor's are (floor_hook), and the report
        // sets them beside the floor of the same hook.
        for e in &ESSENTIALS {
            assert!(FLOOR_HOOKS.contains(&e.hook), "{}", e.hook);
            assert!(e.program.starts_with(&format!("tracepoint:syscalls:{} ", e.hook)), "{}", e.program);
            assert_eq!(floor_hook(&e.hook[..e.hook.len().min(15)]), Some(e.hook));
        }
        assert_eq!(essential_program().matches("tracepoint:").count(), ESSENTIALS.len());
    }

    fn prog(id: u32, name: &str, ns: u64, runs: u64) -> Prog {
        Prog { id, name: name.into(), run_time_ns: ns, run_cnt: runs, pids: vec![] }
    }

    #[test]
    fn deltas_per_owner_and_name() {
        let before = [prog(1, "a", 100, 1), prog(2, "b", 50, 5), prog(3, "theirs", 0, 0)];
        let after = [prog(1, "a", 400, 4), prog(2, "b", 50, 5), prog(3, "theirs", 9, 9), prog(4, "a", 30, 1)];
        let d = delta(&before, &after, &BTreeSet::from([1, 2, 4]));
        assert_eq!(d["a"], Cost { runs: 4, ns: 330 });
        assert_eq!(d["b"], Cost { runs: 0, ns: 0 });
        assert!(!d.contains_key("theirs"));
        assert_eq!(d["b"].ns_per_run(), None);
    }

    #[test]
    fn per_request_and_per_run_figures() {
        let mut w = Window { requests: 10.0, ..Window::default() };
        w.agent.insert("sys_enter_sendto".into(), Cost { runs: 30, ns: 6000 });
        w.agent.insert("sys_exit_sendto".into(), Cost { runs: 30, ns: 3000 });
        let mut other = w.clone();
        other.requests = 30.0;
        w.add(&other);
        assert_eq!(w.requests, 40.0);
        assert_eq!(w.agent["sys_enter_sendto"], Cost { runs: 60, ns: 12000 });
        // 18,000 ns over 40 requests, 120 runs over 40 requests.
        assert_eq!(w.total_per_request(), Some((450.0, 3.0)));
        assert_eq!(Window::per_run(&w.agent, &["sys_enter_sendto", "sys_exit_sendto"]), Some(300.0));
        assert_eq!(Window::per_run(&w.agent, &["sys_enter_sendto", "sys_exit_write"]), None);
        assert_eq!(Window::default().total_per_request(), None);
    }
}
