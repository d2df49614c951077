//! Probe cost per syscall: a loop of small write(2) calls, timed, run (a) as a descendant of the
//! gunicorn master, so it is traced when the agent is attached, and (b) as a standalone process,
//! never traced but still passing through the probes, which fire for every process on the node.
//! A getppid loop (untraced) shows what the traced syscall path costs a syscall with no program.
//! A switch loop (untraced) shows what the scheduler hooks cost every context switch on the node.
//!
//! The same loop binary serves both: xtask's hidden `bench-loop` command. The bench app's /loop
//! route starts it as a child of the worker (traced placement); xtask starts it itself (untraced).
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::Path,
    process::Command,
    sync::{Condvar, Mutex},
    thread,
    time::Instant,
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use wsgiscope_devkit::http;

use super::{
    hooks,
    procs::{self, Gunicorn, Middleware},
    stats::median,
    Plan,
};
use crate::group::check_stop;

/// Bytes per write: a small write, like one chunk-framed block of a streaming response.
pub const WRITE_SIZE: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One end of an AF_UNIX socketpair. In a traced process this is any fd that is not a client
    /// connection (logs, pipes, database sockets): the probe looks it up and finds nothing.
    Unix,
    /// An accepted TCP loopback connection on which an HTTP request was read: in a traced process
    /// every write takes the full path (recorded on enter, aggregated into the request on exit).
    Tcp,
    /// No write: getppid(2), a syscall the agent does not hook. Any program on a syscall
    /// tracepoint sends every syscall of every process through the kernel's slower traced
    /// entry and exit; this shows that part alone.
    Getppid,
    /// No write: two threads on one CPU handing a token to each other, so each hand-over is a
    /// context switch, which runs the agent's sched_switch program whatever the process. The
    /// hand-overs are futex calls: one or two syscalls each.
    Switch,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Unix => "unix",
            Mode::Tcp => "tcp",
            Mode::Getppid => "getppid",
            Mode::Switch => "switch",
        }
    }
}

#[derive(Args, Debug)]
pub struct LoopArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    /// Timed writes, rounded up to whole batches (a tenth as many untimed ones warm up first).
    #[arg(long)]
    iters: u64,
}

/// `xtask bench-loop`: prints nanoseconds per write (per getppid, per hand-over).
pub fn loop_main(args: &LoopArgs) -> Result<()> {
    let ns = match args.mode {
        Mode::Unix => unix_loop(args.iters)?,
        Mode::Tcp => tcp_loop(args.iters)?,
        Mode::Getppid => timed_batches(
            args.iters,
            || {
                // SAFETY: getppid has no arguments and cannot fail.
                unsafe { libc::getppid() };
                Ok(())
            },
            || Ok(()),
        )?,
        Mode::Switch => switch_loop(args.iters)?,
    };
    println!("{ns:.2}");
    Ok(())
}

/// Whose turn it is: the number of hand-overs so far (even: the timing thread's turn, odd: its
/// partner's), and whether the partner should stop.
#[derive(Default)]
struct Token {
    handovers: u64,
    stop: bool,
}

/// `iters` round trips of a token between two threads pinned to one CPU; nanoseconds per
/// hand-over (half a round trip). Each side waits on a condition variable until it is its turn,
/// so the CPU must switch to the other thread every time: the voluntary plus involuntary switches
/// the process reports (/usr/bin/time) equal its hand-overs.
fn switch_loop(iters: u64) -> Result<f64> {
    let cpu = first_allowed_cpu()?;
    let state = (Mutex::new(Token::default()), Condvar::new());
    let (token, turn) = &state;
    // Passes the token on; the lock is released before waking the other side, so the woken thread
    // never has to wait for it (that would add switches).
    let hand_over = || {
        token.lock().unwrap().handovers += 1;
        turn.notify_one();
    };
    // Pinned before the partner starts, which inherits the affinity.
    pin_to_cpu(cpu)?;
    thread::scope(|s| {
        let partner = s.spawn(|| loop {
            let t = turn
                .wait_while(token.lock().unwrap(), |t| t.handovers % 2 == 0 && !t.stop)
                .unwrap();
            if t.stop {
                return;
            }
            drop(t);
            hand_over();
        });
        let timed = timed_batches(
            iters,
            || {
                hand_over();
                drop(turn.wait_while(token.lock().unwrap(), |t| t.handovers % 2 == 1));
                Ok(())
            },
            || Ok(()),
        );
        token.lock().unwrap().stop = true;
        turn.notify_one();
        partner
            .join()
            .map_err(|_| anyhow!("switch partner panicked"))?;
        Ok(timed? / 2.0)
    })
}

/// The lowest-numbered CPU this process may run on (CPU 0 unless a cpuset says otherwise).
fn first_allowed_cpu() -> Result<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity with pid 0 fills it for
    // the calling thread.
    let (rc, set) = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set);
        (rc, set)
    };
    ensure!(
        rc == 0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: CPU_ISSET reads a bit of the set; the index is below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .context("no CPU allowed")
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes one bit below CPU_SETSIZE;
    // sched_setaffinity with pid 0 applies to the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set)
    };
    ensure!(
        rc == 0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn unix_loop(iters: u64) -> Result<f64> {
    let (writer, reader) = UnixStream::pair()?;
    timed_writes(&writer, reader, iters)
}

fn tcp_loop(iters: u64) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    client.write_all(b"GET /bench-loop HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let (mut conn, _) = listener.accept()?;
    // Read the request head, so a traced process has a request in progress on this connection.
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        ensure!(n > 0, "client closed before sending its request");
        head.extend_from_slice(&buf[..n]);
    }
    conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
    // One segment per write, whatever Nagle and delayed ACKs would do: steadier timings.
    conn.set_nodelay(true)?;
    let ns = timed_writes(&conn, client, iters)?;
    conn.shutdown(Shutdown::Write)?;
    Ok(ns)
}

/// Writes between two drains of the peer: few enough to fit the socket buffer (a 16-byte write
/// takes up to ~1 KiB of it), many enough that reading the clock twice per batch is noise.
pub const BATCH: u64 = 64;

/// `iters` write(2) calls of WRITE_SIZE bytes; nanoseconds per call (see `timed_batches`). The
/// peer is drained between batches by this same thread: no reader thread to wake per write, whose
/// scheduling would swamp tens of nanoseconds. The writer is non-blocking so a full buffer fails
/// loudly instead of hanging.
fn timed_writes(fd: &impl AsRawFd, mut peer: impl Read + AsRawFd, iters: u64) -> Result<f64> {
    set_nonblocking(fd)?;
    set_nonblocking(&peer)?;
    let block = [b'w'; WRITE_SIZE];
    let mut sink = vec![0u8; 1 << 20];
    let write = || {
        // libc::write, not std's Write, so the syscall is exactly write(2).
        // SAFETY: a valid fd and a buffer of WRITE_SIZE bytes.
        let rc = unsafe { libc::write(fd.as_raw_fd(), block.as_ptr().cast(), WRITE_SIZE) };
        if rc != WRITE_SIZE as isize {
            bail!("write returned {rc}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    };
    let drain = || loop {
        match peer.read(&mut sink) {
            Ok(0) => bail!("peer closed"),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    };
    timed_batches(iters, write, drain)
}

/// Runs `call` `iters` times in batches of BATCH, `between` after each batch (untimed), after a
/// tenth as many untimed warm-up calls. Returns nanoseconds per call in the median batch, which
/// ignores batches in which the loop was preempted (the machine may be shared).
fn timed_batches(
    iters: u64,
    mut call: impl FnMut() -> Result<()>,
    mut between: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut run = |batches: u64| -> Result<Vec<f64>> {
        let mut ns = Vec::with_capacity(batches as usize);
        for _ in 0..batches {
            let t = Instant::now();
            for _ in 0..BATCH {
                call()?;
            }
            ns.push(t.elapsed().as_nanos() as f64);
            between()?;
        }
        Ok(ns)
    };
    let batches = iters.div_ceil(BATCH).max(1);
    run(batches / 10)?;
    let per_batch = run(batches)?;
    Ok(median(&per_batch).unwrap_or(f64::NAN) / BATCH as f64)
}

fn set_nonblocking(fd: &impl AsRawFd) -> Result<()> {
    // SAFETY: fcntl on a valid fd.
    let ok = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    ensure!(ok, "fcntl: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The loop as a child of a gunicorn worker (through the bench app's /loop route).
pub fn traced(server: &Gunicorn, mode: Mode, iters: u64) -> Result<f64> {
    let path = format!("/loop?mode={}&iters={iters}", mode.name());
    let (status, text) = http::get(server.addr, &path)?;
    ensure!(status == 200, "GET {path} answered {status}: {text}");
    text.trim()
        .parse()
        .with_context(|| format!("bad /loop answer {text:?}"))
}

/// The loop as a child of xtask: not a descendant of any server.
pub fn untraced(mode: Mode, iters: u64) -> Result<f64> {
    let out = Command::new(std::env::current_exe()?)
        .args([
            "bench-loop",
            "--mode",
            mode.name(),
            "--iters",
            &iters.to_string(),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "bench-loop failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim()
        .parse()
        .with_context(|| format!("bad bench-loop output {text:?}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    /// A child of a gunicorn worker: traced while the agent is attached.
    Traced,
    /// A child of xtask: never traced.
    Untraced,
}

/// What is attached to the syscall tracepoints while a loop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Nothing,
    Agent,
    /// bpftrace with two programs that do nothing, on sys_enter_write and sys_exit_write only:
    /// the floor any program on these tracepoints costs, whatever it does. The switch loop runs
    /// under them too: with no scheduler program attached, what they cost it is the traced
    /// syscall path of its futex calls, the part of the agent's cost there that is not the
    /// scheduler program.
    EmptyProbes,
    /// Two programs that do nothing on the BTF tracepoints `sys_enter` and `sys_exit` (`hooks.rs`):
    /// the other kind of hook, which runs for every syscall. Untraced loops only, as above.
    EmptyBtf,
}

#[derive(Clone, Debug)]
pub struct Sample {
    pub placement: Placement,
    pub mode: Mode,
    pub state: State,
    pub round: usize,
    /// Nanoseconds per write, per getppid, or per hand-over (Mode::Switch).
    pub ns_per_call: f64,
    pub foreign_agent: bool,
}

/// The switch loop runs untraced only: the scheduler program fires for every process, and a loop
/// child of a worker has no serving threads for them to find anyway.
pub const CASES: [(Placement, Mode); 6] = [
    (Placement::Traced, Mode::Tcp),
    (Placement::Traced, Mode::Unix),
    (Placement::Untraced, Mode::Tcp),
    (Placement::Untraced, Mode::Unix),
    (Placement::Untraced, Mode::Getppid),
    (Placement::Untraced, Mode::Switch),
];

/// Programs that never match (pid 1 writes rarely and is not what we time) and do nothing.
pub const EMPTY_PROBES: &str =
    "tracepoint:syscalls:sys_enter_write /pid == 1/ { @enter = count(); } \
tracepoint:syscalls:sys_exit_write /pid == 1/ { @exit = count(); }";

/// Each round measures every case with nothing attached and with the agent attached (which first
/// alternates), so the cost is a paired difference taken a minute, not a whole run, apart; then,
/// if bpftrace is installed, the untraced cases under EMPTY_PROBES.
pub fn run(root: &Path, work: &Path, plan: &Plan, redis: &str) -> Result<Vec<Sample>> {
    let server = procs::gunicorn(root, work, Middleware::None, redis)?;
    let floor = procs::bpftrace_available();
    if !floor {
        println!("bench: bpftrace not found: the empty-probe floor is not measured");
    }
    let mut samples = Vec::new();
    for round in 0..plan.micro_rounds {
        let mut states = if round % 2 == 0 {
            vec![State::Nothing, State::Agent]
        } else {
            vec![State::Agent, State::Nothing]
        };
        if floor {
            states.push(State::EmptyProbes);
        }
        states.push(State::EmptyBtf);
        for state in states {
            // Held for the block: dropping them detaches.
            let attached = match state {
                State::Nothing | State::EmptyBtf => None,
                State::Agent => Some(procs::agent(root, work, server.group.pid())?.group),
                State::EmptyProbes => Some(procs::bpftrace(work, EMPTY_PROBES)?),
            };
            let _btf = match state {
                State::EmptyBtf => Some(hooks::attach_btf_pair(root)?),
                _ => None,
            };
            let ours: Vec<u32> = attached.iter().map(|g| g.pid()).collect();
            for (placement, mode) in CASES {
                if matches!(state, State::EmptyProbes | State::EmptyBtf) && placement == Placement::Traced {
                    continue; // do-nothing programs trace nobody: only the untraced loop applies
                }
                check_stop()?;
                // Loops in separate processes differ by more than the probes cost: on this
                // kind of VM a process runs its whole life in a fast or a ~30 % slower mode
                // (the host's placement), so take the fastest of a few, the least disturbed.
                let runs: Vec<f64> = (0..plan.micro_reps)
                    .map(|_| match placement {
                        Placement::Traced => traced(&server, mode, plan.micro_iters),
                        Placement::Untraced => untraced(mode, plan.micro_iters),
                    })
                    .collect::<Result<_>>()?;
                let ns_per_call = runs.iter().copied().fold(f64::NAN, f64::min);
                let foreign_agent = !procs::foreign_agents(&ours).is_empty();
                println!(
                    "bench: round {} {:<11} {placement:?} {:<4} {ns_per_call:>8.1} ns/call{}",
                    round + 1,
                    format!("{state:?}"),
                    mode.name(),
                    if foreign_agent {
                        " [another wsgiscope agent was running]"
                    } else {
                        ""
                    },
                );
                samples.push(Sample {
                    placement,
                    mode,
                    state,
                    round,
                    ns_per_call,
                    foreign_agent,
                });
            }
        }
    }
    Ok(samples)
}
