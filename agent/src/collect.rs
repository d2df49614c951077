//! Collect: read the kernel's records and route each to the session of the server it belongs
//! to (its root master), follow servers as they start and stop, keep /metrics up. The three
//! ways to run wsgiscope (`attach`, `run`, `daemon`) share this loop.
use std::{
    collections::HashMap,
    path::Path,
    sync::Arc,
    time::{Duration as StdDuration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use log::{info, warn};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    time::{interval, Duration, MissedTickBehavior},
};
use wsgiscope_common::CONN_IN_REQUEST;

use crate::{
    aggregate::{Aggregator, InProgress, KernelStats, Options},
    attach::Probes,
    cli::{AttachArgs, DaemonArgs, ExportArgs, RunArgs},
    discover::{self, Target},
    export, k8s,
    labels::label,
    metrics::Metrics,
    python::{self, GcProbes},
    reconstruct::{self, Event},
    session::{orphan_request, Session},
};

/// A process that exec'd a server name stays a candidate this long while it is not yet
/// recognisable (uWSGI and Apache load Python after exec).
const CANDIDATE_PATIENCE: StdDuration = StdDuration::from_secs(10);
/// `daemon`: how often /proc is rescanned for servers the exec tracepoint cannot see (started
/// as `python -m gunicorn`, or daemonized away from their exec'd parent).
const RESCAN_EVERY: StdDuration = StdDuration::from_secs(5);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct Collector<'m> {
    metrics: &'m Metrics,
    probes: Probes,
    options: Options,
    /// Watched servers by master PID (the kernel's root).
    sessions: HashMap<u32, Session<'m>>,
    kernel: KernelStats<'m>,
    /// `daemon`: processes that exec'd a server name, until they show as WSGI masters.
    candidates: HashMap<u32, Instant>,
    /// Records of candidates, kept until they are recognised (then replayed) or given up:
    /// a server's first requests can come before it looks like one in /proc.
    held: HashMap<u32, Vec<Event>>,
    /// Masters that exited since the loop last looked.
    ended: Vec<u32>,
}

/// Records held per candidate at most (a busy server that never gets recognised).
const HELD_MAX: usize = 100_000;

/// The server (root master) a record belongs to.
fn root_of(event: &Event) -> u32 {
    match event {
        Event::Request(ev) => ev.root,
        Event::Fork { root, .. } | Event::Exit { root, .. } | Event::Signal { root, .. } | Event::Reap { root, .. } => *root,
        Event::Exec { pid } => *pid,
        Event::Gc { root, .. } => *root,
    }
}

impl<'m> Collector<'m> {
    fn new(metrics: &'m Metrics, probes: Probes, options: Options) -> Self {
        Collector {
            metrics,
            probes,
            options,
            sessions: HashMap::new(),
            kernel: KernelStats::new(metrics),
            candidates: HashMap::new(),
            held: HashMap::new(),
            ended: Vec::new(),
        }
    }

    /// Starts watching a server: traces it and every process below it, gives its workers slots.
    fn watch(&mut self, target: Target) -> Result<()> {
        let master = target.master;
        // Master first: from here on the kernel follows every fork; then those forked before.
        self.probes.trace(master, master)?;
        for pid in discover::descendants_of(master) {
            self.probes.trace(pid, master)?;
        }
        // Two servers of one app on a node (outside Kubernetes) keep apart by master PID.
        let mut service = target.service.clone();
        if self.sessions.values().any(|s| s.agg.service() == service) {
            service = format!("{service}-{master}");
        }
        let mut base = vec![label("service", service.clone())];
        base.extend(k8s::labels(Path::new("/proc"), master));
        let mut agg = Aggregator::new(self.metrics, base.clone(), &target.kind.to_string(), self.options.clone());
        self.python_runtime(&service, master, &mut agg);
        let mut session = Session::new(target.kind, master, target.http_relayed, agg);
        for f in &target.front_ends {
            info!("{service}: process {f} is a front end (relays requests to the workers)");
            session.agg.front_end(*f);
        }
        // Rescanned after tracing began: a worker forked since discovery is among them.
        let mut workers = discover::children_of(master);
        workers.retain(|w| discover::is_worker(target.kind, *w) && !target.front_ends.contains(w));
        workers.sort_unstable();
        for w in &workers {
            session.agg.worker_started(*w);
        }
        info!(
            "attached to {} master {master} (service \"{service}\"{}): {} workers {workers:?}",
            target.kind,
            base.iter().skip(1).map(|(k, v)| format!(", {k} \"{v}\"")).collect::<String>(),
            workers.len(),
        );
        self.sessions.insert(master, session);
        Ok(())
    }

    /// Finds the server's CPython and attaches the GC probes to it; GC data is optional.
    fn python_runtime(&mut self, service: &str, master: u32, agg: &mut Aggregator<'_>) {
        let Some(rt) = python::runtime_of(master) else {
            warn!("{service}: no CPython found in /proc/{master}/maps (not loaded yet?): no GC data");
            return;
        };
        agg.set_python(&rt.version, rt.has_usdt());
        let how = match &rt.gc {
            GcProbes::Usdt { .. } => "USDT gc__start/gc__done",
            GcProbes::Symbol(s) => s,
            GcProbes::None => "nothing",
        };
        match self.probes.attach_gc(&rt) {
            Ok(true) => info!("{service}: Python {} in {}: GC probed at {how}", rt.version, rt.path.display()),
            Ok(false) => warn!(
                "{service}: Python {} in {} has neither USDT notes nor the {} symbol (stripped?): no GC data",
                rt.version,
                rt.path.display(),
                python::GC_FUNCTION
            ),
            Err(e) => warn!("{service}: cannot probe garbage collections in {}: {e:#}; no GC data", rt.path.display()),
        }
    }

    fn handle(&mut self, event: Event) {
        let root = root_of(&event);
        if !matches!(event, Event::Exec { .. }) && !self.sessions.contains_key(&root) && self.candidates.contains_key(&root) {
            let held = self.held.entry(root).or_default();
            if held.len() < HELD_MAX {
                held.push(event);
            }
            return;
        }
        match event {
            Event::Request(ev) => {
                if let Some(s) = self.sessions.get_mut(&ev.root) {
                    s.request(&ev);
                }
            }
            Event::Fork { parent, child, root } => {
                if let Some(s) = self.sessions.get_mut(&root) {
                    s.forked(parent, child);
                }
            }
            Event::Exit { tgid, root } => {
                let now = monotonic_ns();
                let orphans: Vec<_> = self
                    .probes
                    .take_connections(tgid)
                    .into_iter()
                    .filter(|(_, c)| c.flags & CONN_IN_REQUEST != 0)
                    .map(|(fd, c)| orphan_request(tgid, fd, &c, now))
                    .collect();
                self.candidates.remove(&tgid);
                let Some(s) = self.sessions.get_mut(&root) else { return };
                s.exited(tgid, &orphans);
                if tgid == root {
                    self.end_session(root);
                }
            }
            Event::Signal { tgid, sig, ts_ns, root } => {
                if let Some(s) = self.sessions.get_mut(&root) {
                    s.signalled(tgid, sig, ts_ns);
                }
            }
            Event::Reap { child, status, root, .. } => {
                if let Some(s) = self.sessions.get_mut(&root) {
                    s.reaped(child, status);
                }
            }
            Event::Exec { pid } => {
                self.candidates.insert(pid, Instant::now());
            }
            Event::Gc { tgid, root, generation, start_ns, end_ns } => {
                if let Some(s) = self.sessions.get_mut(&root) {
                    s.gc(tgid, generation, start_ns, end_ns);
                }
            }
        }
    }

    /// Every 500 ms: requests in progress, kernel loss counters, workers to recognise, and
    /// (daemon) servers to start watching.
    fn tick(&mut self) {
        let mut running: HashMap<u32, Vec<InProgress>> = HashMap::new();
        let (in_progress, connections) = self.probes.in_progress();
        for (root, r) in in_progress {
            running.entry(root).or_default().push(r);
        }
        let now = monotonic_ns();
        for (root, s) in &mut self.sessions {
            s.agg.in_progress(now, running.get(root).map(Vec::as_slice).unwrap_or_default());
            s.decide();
        }
        self.kernel.update(self.probes.stats());
        self.kernel.map_sizes(&self.probes.map_sizes(connections));
        self.check_candidates();
        // A master that died before the kernel traced it sends no exit record.
        let gone: Vec<u32> = self.sessions.keys().copied().filter(|&m| !discover::is_alive(m)).collect();
        for master in gone {
            self.end_session(master);
        }
    }

    /// The server's master exited: stop watching it (its series stay).
    fn end_session(&mut self, master: u32) {
        if let Some(s) = self.sessions.remove(&master) {
            info!("{}: master {master} exited", s.agg.service());
        }
        self.ended.push(master);
    }

    /// Exec'd processes that now look like WSGI masters are watched; the rest given up.
    fn check_candidates(&mut self) {
        let pids: Vec<(u32, Instant)> = self.candidates.iter().map(|(p, t)| (*p, *t)).collect();
        for (pid, since) in pids {
            match discover::find_target(pid, None) {
                Ok(t) if self.sessions.contains_key(&t.master) => {
                    self.candidates.remove(&pid);
                    self.held.remove(&pid);
                }
                Ok(t) => {
                    self.candidates.remove(&pid);
                    let held = self.held.remove(&pid).unwrap_or_default();
                    let master = t.master;
                    if master != pid {
                        self.probes.untrace_root(pid);
                    }
                    if let Err(e) = self.watch(t) {
                        warn!("cannot watch the server of process {pid}: {e:#}");
                    } else if master == pid {
                        // Traced since its exec: what it did before it was recognised counts.
                        for ev in held {
                            self.handle(ev);
                        }
                    }
                }
                Err(_) if since.elapsed() < CANDIDATE_PATIENCE && discover::is_process(pid) => {}
                Err(_) => {
                    self.candidates.remove(&pid);
                    self.held.remove(&pid);
                    self.probes.untrace_root(pid);
                }
            }
        }
    }

    /// `daemon`: every WSGI master on the node not watched yet.
    fn rescan(&mut self) {
        for t in discover::find_masters() {
            if !self.sessions.contains_key(&t.master) {
                if let Err(e) = self.watch(t) {
                    warn!("cannot watch a server: {e:#}");
                }
            }
        }
    }
}

/// Every record waiting in the ring buffer.
fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<Event> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        match reconstruct::decode(item.as_ref()) {
            Some(ev) => batch.push(ev),
            None => warn!("ignored a malformed kernel record of {} bytes", item.len()),
        }
    }
    batch
}

async fn bind(export: &ExportArgs) -> Result<TcpListener> {
    TcpListener::bind(export.listen).await.with_context(|| {
        format!("cannot listen on {} for /metrics: choose another address with --listen", export.listen)
    })
}

/// How the loop ends.
enum Until {
    /// `attach`: the master exits, or SIGINT/SIGTERM.
    MasterExits,
    /// `run`: the server exits; SIGINT/SIGTERM are passed on to it.
    ChildExits(u32),
    /// `daemon`: SIGINT/SIGTERM only.
    Signal,
}

/// How often the ring buffer is read when the kernel has not woken us.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// The shared loop: serve /metrics, read records, tick every 500 ms.
async fn collect(
    mut c: Collector<'_>,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    listener: TcpListener,
    metrics: Arc<Metrics>,
    until: Until,
) -> Result<()> {
    info!("metrics on http://{}/metrics", listener.local_addr()?);
    let server = tokio::spawn(export::serve(listener, metrics));
    // SAFETY: the ring buffer owns its fd and lives as long as the AsyncFd.
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|e| e.into_parts().1)
        .context("cannot poll the ring buffer")?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = interval(Duration::from_millis(500));
    // The kernel wakes us only when the ring fills up (see `quiet_submit` in the eBPF maps), so
    // records are read on this clock: at most this late, and in batches.
    let mut drain_tick = interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_scan = Instant::now();
    let forward = |sig: i32| {
        if let Until::ChildExits(pid) = until {
            // SAFETY: plain kill(2) to our own child.
            unsafe { libc::kill(pid as i32, sig) };
        }
    };
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let batch = drain(guard.get_inner_mut());
                guard.clear_ready();
                for ev in batch {
                    c.handle(ev);
                }
            }
            _ = drain_tick.tick() => {
                for ev in drain(events.get_mut()) {
                    c.handle(ev);
                }
            }
            _ = tick.tick() => {
                // Records first, so a request that just ended is not also seen in progress.
                for ev in drain(events.get_mut()) {
                    c.handle(ev);
                }
                c.tick();
                if matches!(until, Until::Signal) && last_scan.elapsed() >= RESCAN_EVERY {
                    c.rescan();
                    last_scan = Instant::now();
                }
            }
            _ = sigint.recv() => {
                if matches!(until, Until::ChildExits(_)) { forward(libc::SIGINT); } else { info!("SIGINT: detaching"); break; }
            }
            _ = sigterm.recv() => {
                if matches!(until, Until::ChildExits(_)) { forward(libc::SIGTERM); } else { info!("SIGTERM: detaching"); break; }
            }
        }
        if !c.ended.is_empty() && !matches!(until, Until::Signal) {
            break;
        }
        c.ended.clear();
    }
    for ev in drain(events.get_mut()) {
        c.handle(ev);
    }
    c.kernel.update(c.probes.stats());
    server.abort();
    c.probes.detach();
    Ok(())
}

/// `wsgiscope attach`: runs until SIGINT/SIGTERM or until the server's master exits.
pub async fn attach(args: AttachArgs) -> Result<()> {
    let options = args.export.options()?;
    let target = discover::find_target(args.pid, args.service.as_deref())?;
    let listener = bind(&args.export).await?;
    let (probes, events) = Probes::load(false)?;
    let metrics = Arc::new(Metrics::with_buckets(&args.export.buckets()));
    let mut c = Collector::new(&metrics, probes, options);
    c.watch(target)?;
    collect(c, events, listener, metrics.clone(), Until::MasterExits).await
}

/// `wsgiscope daemon`: every WSGI server on the node, now and later, until SIGINT/SIGTERM.
pub async fn daemon(args: DaemonArgs) -> Result<()> {
    let options = args.export.options()?;
    let listener = bind(&args.export).await?;
    let (probes, events) = Probes::load(true)?;
    let metrics = Arc::new(Metrics::with_buckets(&args.export.buckets()));
    let mut c = Collector::new(&metrics, probes, options);
    c.rescan();
    info!("daemon: watching {} servers; new ones are found at exec and by a /proc rescan every {RESCAN_EVERY:?}", c.sessions.len());
    collect(c, events, listener, metrics.clone(), Until::Signal).await
}

/// `wsgiscope run -- SERVER…`: starts the server held at a gate (a shell waiting on a pipe)
/// until its PID is traced, so its very first fork and request are seen; returns its exit code.
pub async fn run(args: RunArgs) -> Result<i32> {
    let options = args.export.options()?;
    let argv0 = args.command.first().ok_or_else(|| anyhow!("no server command given after --"))?;
    let comm: String = argv0.rsplit('/').next().unwrap_or(argv0).chars().take(15).collect();
    let Some(kind) = discover::server_kind(&comm, &args.command) else {
        bail!(
            "`{}` is not a server wsgiscope knows: `wsgiscope run` starts gunicorn, uWSGI or Apache \
             (e.g. `wsgiscope run -- gunicorn -w 4 app:app`). To watch another process, use \
             `wsgiscope attach --pid`",
            args.command.join(" ")
        );
    };
    let listener = bind(&args.export).await?;
    let (probes, events) = Probes::load(false)?;

    let mut gate = [0i32; 2];
    // SAFETY: pipe2 fills the two fds.
    if unsafe { libc::pipe2(gate.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    let [gate_r, gate_w] = gate;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args(["-c", "read -r _ <&3 && exec \"$@\" 3<&-", "wsgiscope-run"]).args(&args.command);
    // SAFETY: only dup2/fcntl (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if gate_r == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(gate_r, 3) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{}`", args.command.join(" ")))?;
    let pid = child.id().ok_or_else(|| anyhow!("the server exited at once"))?;
    // SAFETY: our end of the gate's read side is not needed any more.
    unsafe { libc::close(gate_r) };

    let metrics = Arc::new(Metrics::with_buckets(&args.export.buckets()));
    let mut c = Collector::new(&metrics, probes, options);
    c.watch(Target::new(pid, kind, &args.command, args.service.as_deref()))?;
    // Traced: open the gate.
    // SAFETY: writes one byte to our pipe, then closes it.
    unsafe {
        libc::write(gate_w, b"\n".as_ptr().cast(), 1);
        libc::close(gate_w);
    }
    collect(c, events, listener, metrics.clone(), Until::ChildExits(pid)).await?;
    let status = child.wait().await.context("waiting for the server")?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
