//! One watched server: its master, its workers and front ends, and the aggregator its requests
//! go to. The collector routes each kernel record to the session of the master it descends from.
use std::collections::{HashMap, HashSet, VecDeque};

use log::{debug, info};
use wsgiscope_common::{CallEvent, RequestEvent};

use crate::{
    aggregate::Aggregator,
    discover,
    downstream::Calls,
    exits::ExitReason,
    sockets::Peer,
    reconstruct::{self, Facts, Protocol},
    server::ServerKind,
};

pub struct Session<'m> {
    pub kind: ServerKind,
    pub master: u32,
    /// HTTP requests are relays by a front end (uWSGI router, Apache child): the workers count them.
    http_is_relay: bool,
    pub agg: Aggregator<'m>,
    /// Children not yet known to be workers (a mod_wsgi daemon retitles itself after fork).
    undecided: Vec<u32>,
    /// Processes SIGKILL or SIGABRT was sent to, and when.
    kill_signalled: HashMap<u32, u64>,
    /// Workers that exited, until their master reaps them (the wait status tells why).
    exited_workers: HashSet<u32>,
    /// Recent garbage collections per process (start, end ns): the requests they fell in
    /// arrive after them.
    gcs: HashMap<u32, VecDeque<(u64, u64)>>,
    /// Downstream calls: peers, protocol state, and calls waiting for their request's record.
    calls: Calls,
}

/// Calls wait this long (ns) for the record of their request before they count as `late`.
const CALLS_WAIT_NS: u64 = 600_000_000_000;

/// Collections kept per process, and for how long (ns), to attribute them to requests.
const GC_KEEP: usize = 4096;
const GC_KEEP_NS: u64 = 300_000_000_000;

impl<'m> Session<'m> {
    pub fn new(kind: ServerKind, master: u32, http_is_relay: bool, agg: Aggregator<'m>) -> Self {
        Session {
            kind,
            master,
            http_is_relay,
            agg,
            undecided: Vec::new(),
            kill_signalled: HashMap::new(),
            exited_workers: HashSet::new(),
            gcs: HashMap::new(),
            calls: Calls::default(),
        }
    }

    /// Gives a slot to each undecided child that /proc now shows is a worker.
    pub fn decide(&mut self) {
        let kind = self.kind;
        let (workers, rest): (Vec<u32>, Vec<u32>) =
            self.undecided.drain(..).partition(|&p| discover::is_worker(kind, p));
        self.undecided = rest;
        for w in workers {
            if let Some(slot) = self.agg.worker_started(w) {
                info!("{}: worker {w} started (slot {slot})", self.agg.service());
            }
        }
    }

    pub fn request(&mut self, ev: &RequestEvent) {
        // What the record cannot say: a kill signal sent to its process, its collections.
        let gcs = self.gcs.get_mut(&ev.tgid).map(|q| {
            while q.front().is_some_and(|&(_, e)| e + GC_KEEP_NS < ev.agg.start_ns) {
                q.pop_front();
            }
            &*q.make_contiguous()
        });
        let facts = Facts { killed_at: self.kill_signalled.get(&ev.tgid).copied(), gcs: gcs.unwrap_or_default() };
        let (calls, released) = self.calls.take((ev.tgid, ev.fd, ev.agg.start_ns));
        for (call, attribution) in released {
            self.agg.call(&call, attribution);
        }
        let unrecorded = calls.calls();
        let Some(r) = reconstruct::reconstruct(self.kind, ev, facts) else {
            self.agg.unparsed();
            self.agg.unattributed("late", unrecorded);
            return;
        };
        // One line per request at debug level: the kernel's aggregate, for diagnosing framing.
        let a = &ev.agg;
        debug!(
            "{} pid {} fd {} {} {}: status {}, {} write calls ({} continuations, first {} bytes), {} blocks, {} bytes, end reason {}",
            self.agg.service(),
            r.tgid,
            r.fd,
            r.method,
            r.path.as_deref().unwrap_or("(not captured)"),
            r.status,
            a.write_calls,
            a.continuations,
            a.first_write_len,
            r.blocks,
            r.bytes,
            ev.end_reason
        );
        match r.protocol {
            // Workers that read uwsgi packets or mod_wsgi requests sit behind a front end.
            Protocol::Uwsgi | Protocol::ModWsgi => self.http_is_relay = true,
            Protocol::Http if self.http_is_relay => {
                self.agg.relayed(r.tgid);
                self.agg.unattributed("late", unrecorded);
                return;
            }
            Protocol::Http => {}
        }
        self.agg.record(&r, &calls);
    }

    /// A downstream call ended (its request's record comes after it).
    pub fn call(&mut self, ev: &CallEvent) {
        for (call, attribution) in self.calls.call(ev) {
            debug!(
                "{} pid {} fd {}: {} call {:?} to {} ({}, {:.6} s), {attribution:?}",
                self.agg.service(),
                ev.tgid,
                ev.fd,
                call.protocol.as_str(),
                call.operation,
                call.peer,
                call.outcome.as_str(),
                call.seconds
            );
            self.agg.call(&call, attribution);
        }
    }

    /// Downstream sockets now in the kernel's table: calls of no request that have been quiet
    /// for a while are counted now (the kernel would record them only when their socket is
    /// used again).
    pub fn quiet_calls(&mut self, calls: &[CallEvent]) {
        for ev in calls {
            self.call(ev);
        }
    }

    /// Process `tgid` connected (or, found at attach, had connected) socket `fd` to `peer`.
    pub fn connected(&mut self, tgid: u32, fd: u32, peer: Option<&Peer>) {
        self.calls.connected(tgid, fd, peer);
    }

    /// Calls whose request record never came (lost, or not a request) stop waiting.
    pub fn expire_calls(&mut self, now_ns: u64) {
        let late = self.calls.expire(now_ns.saturating_sub(CALLS_WAIT_NS));
        self.agg.unattributed("late", late);
    }

    pub fn gc(&mut self, tgid: u32, generation: i32, start_ns: u64, end_ns: u64) {
        self.agg.gc_pause(tgid, generation, end_ns.saturating_sub(start_ns) as f64 / 1e9);
        let q = self.gcs.entry(tgid).or_default();
        if q.len() >= GC_KEEP {
            q.pop_front();
        }
        q.push_back((start_ns, end_ns));
    }

    pub fn forked(&mut self, parent: u32, child: u32) {
        if parent == self.master && discover::is_process(child) {
            self.undecided.push(child);
            self.decide();
        }
    }

    /// A process of this server exited; `orphans` are the requests still open on its sockets.
    pub fn exited(&mut self, tgid: u32, orphans: &[RequestEvent]) {
        for ev in orphans {
            self.request(ev);
        }
        self.undecided.retain(|&p| p != tgid);
        self.gcs.remove(&tgid);
        let late = self.calls.exited(tgid);
        self.agg.unattributed("late", late);
        if tgid != self.master && self.agg.worker_exited(tgid) {
            self.exited_workers.insert(tgid);
        }
    }

    pub fn signalled(&mut self, tgid: u32, sig: i32, ts_ns: u64) {
        info!("{}: process {tgid} was sent signal {sig}", self.agg.service());
        self.kill_signalled.entry(tgid).or_insert(ts_ns);
    }

    pub fn reaped(&mut self, child: u32, status: i32) {
        let signalled = self.kill_signalled.remove(&child).is_some();
        if self.exited_workers.remove(&child) {
            let reason = ExitReason::classify(self.kind, status, signalled);
            info!("{}: worker {child} exited: {} (wait status {status:#x})", self.agg.service(), reason.as_str());
            self.agg.worker_exit(reason);
        }
    }
}
