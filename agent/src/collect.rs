//! The attached session: read the kernel's records and carry each through reconstruct and
//! aggregate, follow workers as they fork and exit, keep /metrics up until told to stop.
use std::sync::Arc;

use anyhow::{Context, Result};
use log::{info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::{interval, Duration},
};
use wsgiscope_common::{RequestEvent, CONN_IN_REQUEST, END_PROCESS_EXIT, EVENT_REQUEST, REQ_HEAD_LEN, RESP_HEAD_LEN};

use crate::{
    aggregate::Aggregator,
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
    master_exited: bool,
}

impl Session<'_> {
    fn request(&mut self, ev: &RequestEvent) {
        let Some(r) = reconstruct::reconstruct(self.kind, ev) else {
            self.agg.unparsed();
            return;
        };
        match r.protocol {
            // Workers that read uwsgi packets sit behind a front end.
            Protocol::Uwsgi => self.http_is_relay = true,
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
                    if let Some(slot) = self.agg.worker_started(child) {
                        info!("worker {child} started (slot {slot})");
                    }
                }
            }
            Event::Exit { tgid } => {
                for (fd, c) in probes.take_connections(tgid) {
                    if c.flags & CONN_IN_REQUEST != 0 {
                        self.request(&orphan_request(tgid, fd, &c));
                    }
                }
                if tgid == self.master {
                    self.master_exited = true;
                } else {
                    self.agg.worker_exited(tgid);
                }
            }
        }
    }
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
        http_is_relay: target.http_router,
        agg: Aggregator::new(&metrics, &target.service, args.per_worker, args.max_routes),
        master_exited: false,
    };
    // Rescanned after tracing began: a worker forked since discovery is among them.
    let mut workers = discover::children_of(target.master);
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
                let ring = guard.get_inner_mut();
                let mut batch = Vec::new();
                while let Some(item) = ring.next() {
                    match reconstruct::decode(item.as_ref()) {
                        Some(ev) => batch.push(ev),
                        None => warn!("ignored a malformed kernel record of {} bytes", item.len()),
                    }
                }
                guard.clear_ready();
                for ev in batch {
                    session.handle(ev, &mut probes);
                }
            }
            _ = tick.tick() => session.agg.kernel_stats(probes.stats()),
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
