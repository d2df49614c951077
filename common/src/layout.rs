//! Names and numbers both sides use: programs, maps and globals of the eBPF object,
//! tracepoint record layouts, registers, loss counters, and the server names the daemon
//! watches for.

// ---- Programs -------------------------------------------------------------------------------
// A tracepoint program is named after its tracepoint; the loader attaches every tracepoint
// program of the object where `tracepoint_category` says. Uprobe programs are attached to each
// server's interpreter binary.

/// The tracefs category of the tracepoint a program is named after.
pub fn tracepoint_category(program: &str) -> Option<&'static str> {
    if program.starts_with("sys_enter_") || program.starts_with("sys_exit_") {
        return Some("syscalls");
    }
    if program.starts_with("sched_process_") {
        return Some("sched");
    }
    FIXED_LAYOUTS.iter().find(|l| l.name == program).map(|l| l.category)
}

/// A collection starts: USDT `python:gc__start`, or the entry of `gc_collect_main`.
pub const PROG_GC_START: &str = "gc_start";
/// A collection ends: USDT `python:gc__done`.
pub const PROG_GC_DONE: &str = "gc_done";
/// A collection ends: the return of `gc_collect_main`.
pub const PROG_GC_RETURN: &str = "gc_return";
pub const GC_PROGRAMS: [&str; 3] = [PROG_GC_START, PROG_GC_DONE, PROG_GC_RETURN];

// ---- Maps and globals -----------------------------------------------------------------------

/// Ring buffer of records (`events`).
pub const MAP_EVENTS: &str = "EVENTS";
/// Traced tasks → their root master.
pub const MAP_TRACED: &str = "TRACED";
/// Task id → 1 if it has a `TRACED` entry (the programs' first, inlined check).
pub const MAP_TRACED_TASKS: &str = "TRACED_TASKS";
/// `conn_key(tgid, fd)` → `ConnState`.
pub const MAP_CONNS: &str = "CONNS";
/// pid_tgid → `Pending`: syscalls in flight whose thread left the CPU before their exit.
pub const MAP_PENDING: &str = "PENDING";
/// Per CPU, one `Pending`: the syscall in flight of the thread running there (`tid` says which).
pub const MAP_PENDING_ON_CPU: &str = "PENDING_ON_CPU";
/// Per-CPU loss counters, indexed by `STAT_*`.
pub const MAP_STATS: &str = "STATS";
/// `conn_key(tgid, fd)` → `Downstream` (sockets a traced process connected).
pub const MAP_DOWNSTREAM: &str = "DOWNSTREAM";
/// tid → `ThreadReq` (threads that serve requests: their request and CPU clock).
pub const MAP_THREADS: &str = "THREADS";
/// pid_tgid → `GcStart` (collections in progress).
pub const MAP_GC_STARTED: &str = "GC_STARTED";

/// Globals the loader rewrites: the offset of `child_pid` in `sched_process_fork` records…
pub const GLOBAL_FORK_CHILD_PID_OFFSET: &str = "FORK_CHILD_PID_OFFSET";
/// …of `group_dead` in `sched_process_exit` (0: the kernel has none; tid == tgid then)…
pub const GLOBAL_EXIT_GROUP_DEAD_OFFSET: &str = "EXIT_GROUP_DEAD_OFFSET";
/// …whether to trace processes that exec a server name (`wsgiscope daemon`)…
pub const GLOBAL_WATCH_EXECS: &str = "WATCH_EXECS";
/// …whether `sched_switch` is attached, so that a syscall's enter can hand over to its exit
/// in the CPU's slot (`PENDING_ON_CPU`; the switch moves it to `PENDING`)…
pub const GLOBAL_PENDING_ON_CPU: &str = "PENDING_ON_CPU_ENABLED";
/// …where a task's own CPU clock is (`task_struct.se.sum_exec_runtime`; 0: no CPU time per
/// request)…
pub const GLOBAL_SUM_EXEC_OFFSET: &str = "SUM_EXEC_OFFSET";
/// …where this CPU's steal time is (`STEAL_LAYOUT`: `task_struct.se.cfs_rq`, `cfs_rq.rq`, and
/// the per-CPU `steal_time` minus `runqueues`, wrapping; all 0: not read)…
pub const GLOBAL_STEAL_LAYOUT: &str = "STEAL_LAYOUT";
/// …and what it runs on since its last charge (`RQ_CLOCK_LAYOUT`: `task_struct.se.cfs_rq`,
/// `cfs_rq.rq`, `task_struct.se.exec_start`, `rq.clock`, `rq.clock_task`,
/// `rq.prev_steal_time_rq`; all 0: no CPU time per request)…
pub const GLOBAL_RQ_CLOCK_LAYOUT: &str = "RQ_CLOCK_LAYOUT";
/// Where a task's resident-page counters are (0: not measured): `task_struct.mm`…
pub const GLOBAL_RSS_MM_OFFSET: &str = "RSS_MM_OFFSET";
/// …`mm_struct.rss_stat`…
pub const GLOBAL_RSS_STAT_OFFSET: &str = "RSS_STAT_OFFSET";
/// …and, counted in u64 words from there (within `RSS_READ` bytes), the words holding the
/// counts of file, anon and shmem pages.
pub const GLOBAL_RSS_WORDS: &str = "RSS_WORDS";
/// Bytes at `rss_stat` the counters must lie within.
pub const RSS_READ: usize = 256;

// ---- Loss counters --------------------------------------------------------------------------

/// Indices of the per-CPU `STATS` counters, and their `reason` label.
pub const STAT_RINGBUF_FULL: u32 = 0;
pub const STAT_CONN_TABLE_FULL: u32 = 1;
pub const STAT_PENDING_TABLE_FULL: u32 = 2;
pub const STAT_DOWNSTREAM_TABLE_FULL: u32 = 3;
pub const STAT_THREAD_TABLE_FULL: u32 = 4;
pub const STAT_COUNT: u32 = 5;
pub const STAT_REASONS: [&str; STAT_COUNT as usize] =
    ["ringbuf_full", "conn_table_full", "pending_table_full", "downstream_table_full", "thread_table_full"];

// ---- Tracepoint records ---------------------------------------------------------------------

/// `syscalls/sys_enter_*` records carry six 8-byte arguments from this offset…
pub const SYSCALL_ARGS_OFFSET: usize = 16;
/// …`syscalls/sys_exit_*` records the return value here.
pub const SYSCALL_RET_OFFSET: usize = 16;

/// `sock:inet_sock_set_state` (stable since 4.16).
pub mod sock_state {
    pub const OLDSTATE: u32 = 16;
    pub const NEWSTATE: u32 = 20;
    pub const DPORT: u32 = 26;
    pub const FAMILY: u32 = 28;
    pub const PROTOCOL: u32 = 30;
    pub const DADDR: u32 = 36;
    pub const DADDR_V6: u32 = 56;
}

/// `signal:signal_generate` (stable since 4.x).
pub mod signal_generate {
    pub const SIG: u32 = 8;
    pub const PID: u32 = 36;
}

/// `sched:sched_switch` (stable since 4.x).
pub mod sched_switch {
    pub const PREV_PID: u32 = 24;
    /// `TASK_*` bits: `S` (1) or `D` (2) set, it went to sleep; else it was preempted.
    pub const PREV_STATE: u32 = 32;
}

/// A tracepoint the kernel programs read at fixed offsets; the agent checks the offsets in
/// tracefs before attaching and leaves `feature` off on a mismatch.
pub struct FixedLayout {
    pub category: &'static str,
    pub name: &'static str,
    pub fields: &'static [(&'static str, u32)],
    pub feature: &'static str,
}

pub const FIXED_LAYOUTS: &[FixedLayout] = &[
    FixedLayout {
        category: "sock",
        name: "inet_sock_set_state",
        fields: &[
            ("oldstate", sock_state::OLDSTATE),
            ("newstate", sock_state::NEWSTATE),
            ("dport", sock_state::DPORT),
            ("family", sock_state::FAMILY),
            ("protocol", sock_state::PROTOCOL),
            ("daddr", sock_state::DADDR),
            ("daddr_v6", sock_state::DADDR_V6),
        ],
        feature: "the accept-queue wait (wsgi_accept_wait_seconds)",
    },
    FixedLayout {
        category: "signal",
        name: "signal_generate",
        fields: &[("sig", signal_generate::SIG), ("pid", signal_generate::PID)],
        feature: "telling killed workers from crashed ones (wsgi_worker_exits_total)",
    },
    FixedLayout {
        category: "sched",
        name: "sched_switch",
        fields: &[("prev_pid", sched_switch::PREV_PID), ("prev_state", sched_switch::PREV_STATE)],
        feature: "telling a write that waited on its client from a preempted one (wsgi_slow_client_responses)",
    },
];

// ---- Registers ------------------------------------------------------------------------------

/// x86-64 `struct pt_regs`, as indices of its 8-byte slots (offset = index × 8).
pub mod reg {
    pub const R15: u64 = 0;
    pub const R14: u64 = 1;
    pub const R13: u64 = 2;
    pub const R12: u64 = 3;
    pub const RBP: u64 = 4;
    pub const RBX: u64 = 5;
    pub const RAX: u64 = 10;
    pub const RCX: u64 = 11;
    pub const RDX: u64 = 12;
    pub const RSI: u64 = 13;
    pub const RDI: u64 = 14;
    pub const RSP: u64 = 19;
    /// The registers a probe may name, by their 64- and 32-bit names.
    pub const NAMES: &[(&str, &str, u64)] = &[
        ("r15", "r15d", R15),
        ("r14", "r14d", R14),
        ("r13", "r13d", R13),
        ("r12", "r12d", R12),
        ("rbp", "ebp", RBP),
        ("rbx", "ebx", RBX),
        ("rax", "eax", RAX),
        ("rcx", "ecx", RCX),
        ("rdx", "edx", RDX),
        ("rsi", "esi", RSI),
        ("rdi", "edi", RDI),
        ("rsp", "esp", RSP),
    ];
}

/// Where a uprobe finds the GC generation, packed in the attach cookie by the agent:
/// `GEN_IN_REG | reg`, or `GEN_IN_MEM | reg << 16 | offset as u16` (an int at reg + offset),
/// `reg` from [`reg`].
pub const GEN_IN_REG: u64 = 1 << 32;
pub const GEN_IN_MEM: u64 = 2 << 32;

/// `gc_collect_main(tstate, generation, …)`: the generation is its second argument.
pub const GC_FUNCTION_GENERATION_REG: u64 = reg::RSI;

// ---- Servers --------------------------------------------------------------------------------

/// Process names (comm) of the WSGI servers: a process that execs one of them is traced from
/// its exec in daemon mode, and /proc discovery recognises them.
pub const SERVER_COMMS: [&str; 4] = ["gunicorn", "uwsgi", "apache2", "httpd"];
