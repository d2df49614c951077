//! Collect: read the kernel's records, decode them (`record`) and route each to the session of
//! the server it belongs to (its root master); follow servers as they start and stop; keep
//! /metrics up. The three ways to run wsgiscope (`commands`) share this loop.
use std::{
    collections::HashMap,
    path::Path,
    sync::Arc,
    time::{Duration as StdDuration, Instant},
};

use anyhow::{Context, Result};
use log::{info, warn};
use wsgiscope_common::{CallEvent, CALL_WRITING, CONN_CLOSED};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    time::{interval, Duration, MissedTickBehavior},
};

use crate::{
    aggregate::{Aggregator, Options},
    discover::{self, Target},
    export, k8s,
    kernel::Kernel,
    kernel_stats::KernelStats,
    labels::label,
    memory::Sampler,
    metrics::Metrics,
    python::{self, GcProbes},
    record::{self, Event, InProgress},
    session::Session,
    sockets,
    views::{monotonic_ns, Views},
};

/// A process that exec'd a server name stays a candidate this long while it is not yet
/// recognisable (uWSGI and Apache load Python after exec).
const CANDIDATE_PATIENCE: StdDuration = StdDuration::from_secs(10);
/// `daemon`: how often /proc is rescanned for servers the exec tracepoint cannot see (started
/// as `python -m gunicorn`, or daemonized away from their exec'd parent).
pub const RESCAN_EVERY: StdDuration = StdDuration::from_secs(5);

pub struct Collector<'m> {
    metrics: &'m Metrics,
    /// The live views (`None`: `--ui off`).
    views: Option<&'m Views>,
    kernel: Kernel,
    options: Options,
    /// Watched servers by master PID (the kernel's root).
    sessions: HashMap<u32, Session<'m>>,
    kernel_stats: KernelStats<'m>,
    /// `daemon`: processes that exec'd a server name, until they show as WSGI masters.
    candidates: HashMap<u32, Instant>,
    /// Records of candidates, kept until they are recognised (then replayed) or given up:
    /// a server's first requests can come before it looks like one in /proc.
    held: HashMap<u32, Vec<Event>>,
    /// Masters that exited since the loop last looked.
    ended: Vec<u32>,
    /// Reads the memory of masters and workers (`None`: `--memory-every off`).
    memory: Option<Sampler>,
}

/// A call of no request whose socket has been quiet this long (ns) is counted from the kernel's
/// table.
const QUIET_CALL_NS: u64 = 1_000_000_000;

/// Records held per candidate at most (a busy server that never gets recognised).
const HELD_MAX: usize = 100_000;

impl<'m> Collector<'m> {
    /// `memory_every`: the period of the memory reads (`None`: none).
    pub fn new(
        metrics: &'m Metrics,
        views: Option<&'m Views>,
        kernel: Kernel,
        options: Options,
        memory_every: Option<StdDuration>,
    ) -> Self {
        Collector {
            metrics,
            views,
            kernel,
            options,
            sessions: HashMap::new(),
            kernel_stats: KernelStats::new(metrics),
            candidates: HashMap::new(),
            held: HashMap::new(),
            ended: Vec::new(),
            memory: memory_every.map(|every| Sampler::start(every, metrics)),
        }
    }

    /// Servers watched now.
    pub fn watched(&self) -> usize {
        self.sessions.len()
    }

    /// Starts watching a server: traces it and every process below it, gives its workers slots.
    pub fn watch(&mut self, target: Target) -> Result<()> {
        let master = target.master;
        // Master first: from here on the kernel follows every fork; then those forked before.
        self.kernel.trace(master, master)?;
        for pid in discover::descendants_of(master) {
            self.kernel.trace(pid, master)?;
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
        if let Some(v) = self.views {
            agg.set_views(v);
        }
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
        // Connections the processes opened before we attached (pools, persistent DB connections).
        for pid in std::iter::once(master).chain(workers.iter().copied()) {
            self.seed_downstream(&mut session, pid, master);
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

    /// Makes the downstream sockets process `pid` has open now known to the kernel and the
    /// session (later ones are seen connecting).
    fn seed_downstream(&mut self, session: &mut Session<'m>, pid: u32, root: u32) {
        let sockets = match sockets::downstream_of(pid) {
            Ok(s) => s,
            Err(e) => return warn!("cannot list the sockets of process {pid}: {e:#}; its calls on connections opened before attach are not seen"),
        };
        for (fd, peer) in sockets {
            if let Err(e) = self.kernel.seed_downstream(pid, fd, root) {
                warn!("{e:#}");
                break;
            }
            session.connected(pid, fd, Some(&peer));
        }
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
        match self.kernel.attach_gc(&rt) {
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
        let root = event.root();
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
                    .kernel
                    .take_connections(tgid)
                    .into_iter()
                    .filter_map(|(fd, c)| record::orphan(tgid, fd, &c, now))
                    .collect();
                self.kernel.forget_downstream(tgid);
                self.candidates.remove(&tgid);
                let Some(s) = self.sessions.get_mut(&root) else { return };
                s.exited(tgid, &orphans);
                if tgid == root {
                    self.end_session(root);
                }
            }
            Event::Signal { tgid, signal, ts_ns, root } => {
                if let Some(s) = self.sessions.get_mut(&root) {
                    s.signalled(tgid, signal, ts_ns);
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
            Event::Call(ev) => {
                if let Some(s) = self.sessions.get_mut(&ev.root) {
                    s.call(&ev);
                }
            }
            Event::Connect { tgid, fd, root, peer } => {
                if let Some(s) = self.sessions.get_mut(&root) {
                    s.connected(tgid, fd, peer.as_ref());
                }
            }
        }
    }

    /// Every 500 ms: requests in progress, kernel loss counters, workers to recognise, and
    /// (daemon) servers to start watching.
    fn tick(&mut self) {
        let mut running: HashMap<u32, Vec<InProgress>> = HashMap::new();
        let mut connections = 0;
        for (key, c) in self.kernel.connections() {
            // A closed one is kept only for its fd number's next accept.
            connections += usize::from(c.flags & CONN_CLOSED == 0);
            if let Some(r) = record::in_progress(key, &c) {
                running.entry(r.root).or_default().push(r);
            }
        }
        let now = monotonic_ns();
        let mut quiet: HashMap<u32, Vec<CallEvent>> = HashMap::new();
        // Calls sent on behalf of a request and not answered yet (the live views).
        let mut waits = HashMap::new();
        let mut downstream = 0;
        for (key, d) in self.kernel.downstream() {
            downstream += 1;
            if let Some(ev) = record::quiet_call(key, &d, now.saturating_sub(QUIET_CALL_NS)) {
                quiet.entry(ev.root).or_default().push(ev);
            }
            if self.views.is_some() && d.state == CALL_WRITING && d.call.req_start_ns != 0 {
                waits.insert(((key >> 32) as u32, d.call.req_fd, d.call.req_start_ns), (key as u32, d));
            }
        }
        let mut workers = Vec::new();
        for (root, s) in &mut self.sessions {
            let running = running.get(root).map(Vec::as_slice).unwrap_or_default();
            s.quiet_calls(quiet.get(root).map(Vec::as_slice).unwrap_or_default());
            s.agg.in_progress(now, running);
            s.decide();
            s.expire_calls(now);
            if self.views.is_some() {
                workers.extend(s.active(now, running, &self.kernel, &waits));
            }
        }
        if let Some(v) = self.views {
            workers.sort_by(|a, b| (&a.service, a.worker).cmp(&(&b.service, b.worker)));
            v.set_active(workers);
        }
        self.kernel_stats.update(self.kernel.stats());
        self.kernel_stats.map_sizes(&self.kernel.map_sizes(connections, downstream));
        self.check_candidates();
        self.memory();
        // A master that died before the kernel traced it sends no exit record.
        let gone: Vec<u32> = self.sessions.keys().copied().filter(|&m| !discover::is_alive(m)).collect();
        for master in gone {
            self.end_session(master);
        }
    }

    /// Applies the memory readings that came back; hands the reading thread the processes to
    /// read when a period has passed.
    fn memory(&mut self) {
        let Some(m) = &mut self.memory else { return };
        for r in m.take() {
            if let Some(s) = self.sessions.get_mut(&r.job.master) {
                s.memory(r);
            }
        }
        let now = Instant::now();
        if m.due(now) && !self.sessions.is_empty() {
            m.send(now, self.sessions.values().flat_map(Session::memory_jobs).collect());
        }
    }

    /// The server's master exited: stop watching it (its series stay, but for the memory of
    /// its processes, which are gone).
    fn end_session(&mut self, master: u32) {
        if let Some(s) = self.sessions.remove(&master) {
            info!("{}: master {master} exited", s.agg.service());
            s.agg.forget_all_memory();
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
                        self.kernel.untrace_root(pid);
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
                    self.kernel.untrace_root(pid);
                }
            }
        }
    }

    /// `daemon`: every WSGI master on the node not watched yet.
    pub fn rescan(&mut self) {
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
        match record::decode(item.as_ref()) {
            Some(ev) => batch.push(ev),
            None => warn!("ignored a malformed kernel record of {} bytes", item.len()),
        }
    }
    batch
}

/// How the loop ends.
pub enum Until {
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
pub async fn collect(
    mut c: Collector<'_>,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    listener: TcpListener,
    metrics: Arc<Metrics>,
    views: Option<Arc<Views>>,
    until: Until,
) -> Result<()> {
    let addr = listener.local_addr()?;
    info!("metrics on http://{addr}/metrics");
    if views.is_some() {
        info!("live views on http://{addr}/ (JSON API under /api/; --ui off turns them off)");
    }
    let server = tokio::spawn(export::serve(listener, metrics, views));
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
    c.kernel_stats.update(c.kernel.stats());
    // The listener closes before the detach (which takes a while): a client then sees its
    // connection refused, not accepted by the kernel and reset when the agent exits. An aborted
    // task is dropped when the runtime next polls it: awaited here.
    server.abort();
    let _ = server.await;
    c.kernel.detach();
    Ok(())
}

