//! The attached session: read the kernel's records and carry each through reconstruct and
//! aggregate, follow workers as they fork and exit, keep /metrics up until told to stop.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use anyhow::{Context, Result};
use log::{info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::{interval, Duration},
};
use wsgiscope_common::{RequestEvent, CONN_IN_REQUEST, END_PROCESS_EXIT, EVENT_REQUEST, REQ_HEAD_LEN, RESP_HEAD_LEN};

use crate::{
    aggregate::{Aggregator, ExitReason},
    attach::Probes,
    cli::AttachArgs,
    discover::{self, ServerKind, Target},
    export,
    metrics::Metrics,
    reconstruct::{self, Event, Protocol},
};

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A request still open on a socket of a process that exited, as a kernel record would carry it.
fn orphan_request(tgid: u32, fd: u32, c: &wsgiscope_common::ConnState) -> RequestEvent {
    RequestEvent {
        kind: EVENT_REQUEST,
        end_reason: END_PROCESS_EXIT,
        tgid,
        fd,
        root: c.root,
        _pad: 0,
        end_ns: monotonic_ns(),
        agg: c.agg,
        // The kept part of the (twice as large) connection-state buffers.
        req_head: c.req_head[..REQ_HEAD_LEN].try_into().expect("buffer holds the kept head"),
        resp_head: c.resp_head[..RESP_HEAD_LEN].try_into().expect("buffer holds the kept head"),
    }
}

struct Session<'m> {
    kind: ServerKind,
    master: u32,
    /// HTTP requests are relays by a front end (uWSGI router): the workers count them.
    http_is_relay: bool,
    agg: Aggregator<'m>,
    /// Children not yet known to be workers (a mod_wsgi daemon retitles itself after fork).
    undecided: Vec<u32>,
    /// Processes SIGKILL or SIGABRT was sent to, and when.
    kill_signalled: HashMap<u32, u64>,
    /// Workers that exited, until their master reaps them (the wait status tells why).
    exited_workers: HashSet<u32>,
    master_exited: bool,
}

impl Session<'_> {
    /// Gives a slot to each undecided child that /proc now shows is a worker.
    fn decide(&mut self) {
        let kind = self.kind;
        let (workers, rest): (Vec<u32>, Vec<u32>) =
            self.undecided.drain(..).partition(|&p| discover::is_worker(kind, p));
        self.undecided = rest;
        for w in workers {
            if let Some(slot) = self.agg.worker_started(w) {
                info!("worker {w} started (slot {slot})");
            }
        }
    }

    fn request(&mut self, ev: &RequestEvent) {
        let Some(mut r) = reconstruct::reconstruct(self.kind, ev) else {
            self.agg.unparsed();
            return;
        };
        // In progress when its worker was sent SIGKILL/SIGABRT: whatever the dying worker
        // wrote after (gunicorn's error page on its --timeout), the request was aborted.
        if let Some(&killed_at) = self.kill_signalled.get(&r.tgid) {
            let end = r.start_ns + (r.duration * 1e9) as u64;
            if r.start_ns <= killed_at && killed_at <= end {
                r.status = "aborted".to_string();
            }
        }
        match r.protocol {
            // Workers that read uwsgi packets or mod_wsgi requests sit behind a front end.
            Protocol::Uwsgi | Protocol::ModWsgi => self.http_is_relay = true,
            Protocol::Http if self.http_is_relay => {
                self.agg.relayed(r.tgid);
                return;
            }
            Protocol::Http => {}
        }
        self.agg.record(&r);
    }

    fn handle(&mut self, event: Event, probes: &mut Probes) {
        match event {
            Event::Request(ev) => self.request(&ev),
            Event::Fork { parent, child } => {
                if parent == self.master && discover::is_process(child) {
                    self.undecided.push(child);
                    self.decide();
                }
            }
            Event::Exit { tgid } => {
                for (fd, c) in probes.take_connections(tgid) {
                    if c.flags & CONN_IN_REQUEST != 0 {
                        self.request(&orphan_request(tgid, fd, &c));
                    }
                }
                self.undecided.retain(|&p| p != tgid);
                if tgid == self.master {
                    self.master_exited = true;
                } else if self.agg.worker_exited(tgid) {
                    self.exited_workers.insert(tgid);
                }
            }
            Event::Signal { tgid, sig, ts_ns } => {
                info!("process {tgid} was sent signal {sig}");
                self.kill_signalled.entry(tgid).or_insert(ts_ns);
            }
            Event::Reap { parent: _, child, status } => {
                let signalled = self.kill_signalled.remove(&child).is_some();
                if self.exited_workers.remove(&child) {
                    let reason = ExitReason::classify(status, signalled);
                    info!("worker {child} exited: {} (wait status {status:#x})", reason.as_str());
                    self.agg.worker_exit(reason);
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

/// `wsgiscope attach`: runs until SIGINT/SIGTERM or until the server's master exits.
pub async fn attach(args: AttachArgs) -> Result<()> {
    let target: Target = discover::find_target(args.pid, args.service.as_deref())?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| {
        format!("cannot listen on {} for /metrics: choose another address with --listen", args.listen)
    })?;
    let (mut probes, events) = Probes::load()?;
    // Master first: from here on the kernel follows every fork; then those forked before.
    probes.trace(target.master, target.master)?;
    for pid in discover::descendants_of(target.master) {
        probes.trace(pid, target.master)?;
    }

    let metrics = Arc::new(Metrics::new());
    let mut session = Session {
        kind: target.kind,
        master: target.master,
        http_is_relay: target.http_relayed,
        agg: Aggregator::new(&metrics, &target.service, &target.kind.to_string(), args.per_worker, args.max_routes),
        undecided: Vec::new(),
        kill_signalled: HashMap::new(),
        exited_workers: HashSet::new(),
        master_exited: false,
    };
    // Rescanned after tracing began: a worker forked since discovery is among them.
    let mut workers = discover::children_of(target.master);
    workers.retain(|&w| discover::is_worker(target.kind, w));
    for f in &target.front_ends {
        info!("process {f} is a front end (relays requests to the workers)");
        session.agg.front_end(*f);
    }
    workers.retain(|w| !target.front_ends.contains(w));
    workers.sort_unstable();
    for w in &workers {
        session.agg.worker_started(*w);
    }
    info!(
        "attached to {} master {} (service \"{}\"): {} workers {:?}; metrics on http://{}/metrics",
        target.kind,
        target.master,
        target.service,
        workers.len(),
        workers,
        listener.local_addr()?
    );

    let server = tokio::spawn(export::serve(listener, metrics.clone()));
    // SAFETY: the ring buffer owns its fd and lives as long as the AsyncFd.
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|e| e.into_parts().1)
        .context("cannot poll the ring buffer")?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let batch = drain(guard.get_inner_mut());
                guard.clear_ready();
                for ev in batch {
                    session.handle(ev, &mut probes);
                }
            }
            _ = tick.tick() => {
                // Records first, so a request that just ended is not also seen in progress.
                for ev in drain(events.get_mut()) {
                    session.handle(ev, &mut probes);
                }
                session.agg.in_progress(monotonic_ns(), &probes.in_progress());
                session.agg.kernel_stats(probes.stats());
                session.decide();
            }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
        }
        if session.master_exited {
            info!("master {} exited: detaching", target.master);
            break;
        }
    }
    session.agg.kernel_stats(probes.stats());
    server.abort();
    drop(probes);
    Ok(())
}
