//! One watched server: its master, its workers and front ends, and the aggregator its requests
//! go to. The collector routes each kernel record to the session of the master it descends from.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use log::{debug, info, warn};
use wsgiscope_common::{CallEvent, Downstream, RequestEvent, REQ_HEAD_LEN};

use crate::{
    aggregate::Aggregator,
    discover,
    downstream::Calls,
    exits::ExitReason,
    kernel::Kernel,
    memory::{Job, Reading, Unread},
    record::InProgress,
    views::{
        active::{self, Doing},
        api::{InFlight, Wait, WorkerNow},
        unix_clock,
    },
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
    /// A process's memory could not be read once already (said once per server, then at debug).
    memory_warned: bool,
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
            memory_warned: false,
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
            "{} pid {} fd {} {} {}: status {}, {} write calls ({} continuations, first {} bytes), {} blocks, {} bytes, end reason {}, thread {} CPU {}..{} flags {:#x}",
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
            ev.end_reason,
            a.tid,
            a.cpu_start_ns,
            a.cpu_end_ns,
            a.flags
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

    /// What every worker of this server is doing at `now_ns`: its requests in progress
    /// (`running`, from the connection table), each one's thread as the kernel shows it, and
    /// `waits`: per request, a downstream call sent and not yet answered.
    pub fn active(
        &self,
        now_ns: u64,
        running: &[InProgress],
        kernel: &Kernel,
        waits: &HashMap<(u32, u32, u64), (u32, Downstream)>,
    ) -> Vec<WorkerNow> {
        let service = self.agg.service().to_string();
        let mut slots: BTreeMap<usize, WorkerNow> = self
            .agg
            .workers_now()
            .into_iter()
            .map(|(slot, pid)| {
                let w = WorkerNow { service: service.clone(), worker: slot as u32, pid, state: "idle".into(), requests: Vec::new() };
                (slot, w)
            })
            .collect();
        let secs = |ns: u64| ns as f64 / 1e9;
        let unix_of = unix_clock();
        for r in running {
            let Some(w) = self.agg.slot_of(r.tgid).and_then(|s| slots.get_mut(&s)) else { continue };
            let c = &r.conn;
            let thread = kernel.thread_now(r.tgid, c.agg.tid);
            let call = waits.get(&(r.tgid, r.fd, r.start_ns)).map(|(fd, d)| (*fd, d));
            let Some(now) = active::classify(now_ns, r.tgid, r.fd, c, &thread, call) else { continue };
            let head = &c.req_head[..(c.agg.req_head_len as usize).min(REQ_HEAD_LEN)];
            let parsed = reconstruct::parse_request_head(head, c.agg.pipeline_index);
            let wait = match (now.doing, call) {
                (Doing::Downstream { fd }, Some((_, d))) => {
                    let dc = self.calls.in_progress(r.tgid, fd, d);
                    Some(Wait {
                        protocol: dc.protocol.as_str().to_string(),
                        peer: self.agg.label_now(&dc.peer, true),
                        operation: self.agg.label_now(&dc.operation, false),
                    })
                }
                _ => None,
            };
            w.state = "busy".into();
            w.requests.push(InFlight {
                route: self.agg.route_now(parsed.as_ref().and_then(|h| h.path.as_deref())),
                method: parsed.map_or_else(|| reconstruct::UNKNOWN_METHOD.to_string(), |h| h.method),
                start: unix_of(r.start_ns),
                elapsed: secs(now_ns.saturating_sub(r.start_ns)),
                doing: now.doing.as_str().to_string(),
                doing_for: now.since_ns.map(|s| secs(now_ns.saturating_sub(s))),
                wait,
                on_cpu: now.on_cpu,
                cpu_time: now.cpu_ns.map(secs),
            });
        }
        let mut out: Vec<WorkerNow> = slots.into_values().collect();
        for w in &mut out {
            w.requests.sort_by(|a, b| a.start.total_cmp(&b.start));
        }
        out
    }

    /// The processes whose memory is read: the master and each worker holding a slot.
    pub fn memory_jobs(&self) -> impl Iterator<Item = Job> + '_ {
        let master = self.master;
        let workers = self.agg.workers_now().into_iter().map(|(_, pid)| pid);
        std::iter::once(master).chain(workers).map(move |pid| Job { master, pid })
    }

    /// A memory reading of one of this server's processes. A process that exited since it was
    /// listed is skipped quietly (its exit removes its series); one that cannot be read has its
    /// series removed, and the first such failure is logged.
    pub fn memory(&mut self, r: Reading) {
        let is_master = r.job.pid == self.master;
        match r.usage {
            Ok(u) => self.agg.memory(r.job.pid, is_master, &u),
            Err(Unread::Gone) => debug!("{}: process {} exited before its memory was read", self.agg.service(), r.job.pid),
            Err(Unread::Failed(e)) => {
                self.agg.forget_memory_of(r.job.pid, is_master);
                if std::mem::replace(&mut self.memory_warned, true) {
                    debug!("{}: cannot read the memory of process {}: {e}", self.agg.service(), r.job.pid);
                } else {
                    warn!(
                        "{}: cannot read /proc/{}/smaps_rollup: {e}; processes of this server whose memory cannot be read have no wsgi_worker_memory_bytes series (said once)",
                        self.agg.service(),
                        r.job.pid
                    );
                }
            }
        }
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
