//! The maps shared by all hook families (and read by the agent, by the names in
//! `wsgiscope_common::layout`: `MAP_*`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use wsgiscope_common::{ConnState, Downstream, Pending, TaskMark, ThreadReq, CONN_CLOSED, STAT_COUNT, TASK_SERVING};

/// Traced processes and threads: task id → tgid of the attached master (the "root").
/// Seeded by the agent at attach, grown on fork in the kernel so no new worker is missed.
/// The programs read the root from `TRACED_TASKS` (an array); this hash is the list the agent
/// can walk.
#[map]
pub static TRACED: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

/// Accepted sockets of traced processes: `conn_key(tgid, fd)` → state of the request in progress.
/// Read it through `conn`: an entry marked `CONN_CLOSED` is no connection.
#[map]
pub static CONNS: HashMap<u64, ConnState> = HashMap::with_max_entries(8192, 0);

/// The connection `key`, unless there is none (or only a closed one kept for reuse).
#[inline(always)]
pub fn conn(key: u64) -> Option<&'static mut ConnState> {
    let c = CONNS.get_ptr_mut(&key)?;
    // SAFETY: map value pointer valid for this program run (the program's whole life here).
    let c = unsafe { &mut *c };
    (c.flags & CONN_CLOSED == 0).then_some(c)
}

/// Sockets traced processes connected (downstream: databases, caches, HTTP services):
/// `conn_key(tgid, fd)` → the call in progress. Seeded by the agent for sockets connected
/// before it attached, grown on connect.
#[map]
pub static DOWNSTREAM: HashMap<u64, Downstream> = HashMap::with_max_entries(16384, 0);

/// Threads of traced processes that read a request: tid → that request.
#[map]
pub static THREADS: HashMap<u32, ThreadReq> = HashMap::with_max_entries(16384, 0);

/// Does thread `tid` serve requests (has it a `THREADS` entry)? Asked before a hash lookup
/// that would find none (an array lookup is inlined by the JIT, a hash lookup is a helper call).
#[inline(always)]
pub fn serving(tid: u32) -> bool {
    has_mark(tid, TASK_SERVING)
}

/// Has task `tid` the `TASK_*` mark `mark`?
#[inline(always)]
pub fn has_mark(tid: u32, mark: u32) -> bool {
    TRACED_TASKS.get(tid).is_some_and(|m| m.marks & mark != 0)
}

/// Sets or clears task `tid`'s `TASK_*` mark `mark` (its root, in the same slot, is left as is).
/// Only the task itself (or the scheduler's programs while it is the current task) writes them.
#[inline(always)]
pub fn set_mark(tid: u32, mark: u32, on: bool) {
    if let Some(m) = TRACED_TASKS.get_ptr_mut(tid) {
        // SAFETY: array slot, valid for the program run; a 4-byte store of its own field.
        unsafe {
            if on {
                (*m).marks |= mark;
            } else {
                (*m).marks &= !mark;
            }
        }
    }
}

/// Syscalls in flight: pid_tgid → what the exit tracepoint needs.
#[map]
pub static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(8192, 0);

/// Size of `EVENTS`.
pub const EVENTS_BYTES: u32 = 8 << 20;

/// Request, fork and exit records for the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-CPU counters of what could not be recorded (`STAT_*`).
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// A TCP peer as the server sees it: address (IPv4 in the first 4 bytes) and port (host order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PeerKey {
    pub addr: [u8; 16],
    pub port: u32,
    pub _pad: u32,
}

/// A TCP handshake completed on this node: the peer, and when (0: the slot is free).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Established {
    pub peer: PeerKey,
    pub ts: u64,
}

/// Slots of `ESTABLISHED` (a power of two).
const ESTABLISHED_SLOTS: u32 = 1 << 16;

/// TCP connections established on this node, not yet accepted: a direct-mapped table, the slot
/// chosen by the peer's port and address. Most handshakes are accepted by processes wsgiscope
/// does not trace and never taken out; an LRU hash forgot them, at ~650 ns per insert here,
/// while writing and reading a slot are array accesses the JIT inlines. Live connections from
/// one address have distinct ports, so distinct slots; a slot another address's handshake takes
/// over before the accept costs that connection its wait (not measured, never wrong: the peer
/// is compared).
#[map]
pub static ESTABLISHED: Array<Established> = Array::with_max_entries(ESTABLISHED_SLOTS, 0);

#[inline(always)]
fn established_slot(peer: &PeerKey) -> u32 {
    let mut a = 0u32;
    let mut i = 0;
    while i < 16 {
        a ^= u32::from_ne_bytes([peer.addr[i], peer.addr[i + 1], peer.addr[i + 2], peer.addr[i + 3]]);
        i += 4;
    }
    // The address folded to 16 bits, the port on top: one address's connections differ in it.
    (peer.port ^ a ^ (a >> 16)) & (ESTABLISHED_SLOTS - 1)
}

/// The handshake with `peer` completed at `ts`.
#[inline(always)]
pub fn established(peer: PeerKey, ts: u64) {
    if let Some(e) = ESTABLISHED.get_ptr_mut(established_slot(&peer)) {
        // SAFETY: array slot, valid for the program run.
        unsafe { *e = Established { peer, ts } };
    }
}

/// When the handshake with `peer` completed, if its slot still holds it (the slot is freed).
#[inline(always)]
pub fn take_established(peer: &PeerKey) -> Option<u64> {
    let e = ESTABLISHED.get_ptr_mut(established_slot(peer))?;
    // SAFETY: array slot, valid for the program run.
    unsafe {
        let ts = (*e).ts;
        let p = &(*e).peer;
        if ts == 0 || p.port != peer.port || p.addr != peer.addr {
            return None;
        }
        (*e).ts = 0;
        Some(ts)
    }
}

/// Room to build a `ConnState` (too large for the 512-byte BPF stack).
#[map]
pub static SCRATCH: PerCpuArray<ConnState> = PerCpuArray::with_max_entries(1, 0);

/// Room to build a `Downstream`.
#[map]
pub static CALL_SCRATCH: PerCpuArray<Downstream> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn bump(stat: u32) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// The largest pid Linux can give (PID_MAX_LIMIT on 64-bit).
const PID_MAX_LIMIT: u32 = 4 << 20;

/// What the programs know of each task id (`TaskMark`: its root, 0 for one not traced, and
/// its `TASK_*` marks): one 8-byte slot per possible id (32 MiB; an array's slots are 8 bytes
/// whatever the value). Every syscall program asks this first, and the programs that
/// need the root (accept, fork, exit, connect) read it here: an array lookup is inlined by the
/// JIT, so neither a process wsgiscope does not trace nor a traced one pays a hash lookup (a
/// helper call, with this VM's retpoline/return-thunk tax) for it. `TRACED` holds the same
/// roots for the agent to list.
#[map]
pub static TRACED_TASKS: Array<TaskMark> = Array::with_max_entries(PID_MAX_LIMIT, 0);

/// Is task `task` traced?
#[inline(always)]
pub fn traced(task: u32) -> bool {
    root_of(task).is_some()
}

/// The master `task` is traced on behalf of, if it is traced.
#[inline(always)]
pub fn root_of(task: u32) -> Option<u32> {
    TRACED_TASKS.get(task).map(|m| m.root).filter(|&root| root != 0)
}

/// Traces `task` on behalf of master `root` (the list first: a task marked traced is listed).
#[inline(always)]
pub fn trace_task(task: u32, root: u32) {
    if TRACED.insert(&task, &root, 0).is_ok() {
        set_root(task, root);
    }
}

/// Stops tracing `task` (the mark first).
#[inline(always)]
pub fn untrace_task(task: u32) {
    set_root(task, 0);
    let _ = TRACED.remove(&task);
}

#[inline(always)]
fn set_root(task: u32, root: u32) {
    if let Some(m) = TRACED_TASKS.get_ptr_mut(task) {
        // SAFETY: array slot of this map, valid for the program run; a 4-byte store of its own
        // field (the thread's marks are its own to write).
        unsafe { (*m).root = root };
    }
}
