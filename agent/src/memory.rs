//! Worker memory: `/proc/PID/smaps_rollup` of every worker and master, read on a period by a
//! thread of its own. The kernel walks a process's page tables to answer (milliseconds for a
//! large worker, BENCHMARKS.md §5), so the reads never run on the loop that reads requests.
use std::{
    sync::mpsc::{self, Receiver, SyncSender, TryRecvError},
    thread,
    time::{Duration, Instant},
};

use log::warn;
use procfs::{process::SmapsRollup, ProcError};
use prometheus_client::metrics::counter::Counter;

use crate::metrics::Metrics;

/// One process's memory, in bytes, as smaps_rollup sums it over its mappings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub rss: u64,
    pub pss: u64,
    /// Private_Clean + Private_Dirty: what exiting would free.
    pub uss: u64,
    /// Shared_Clean + Shared_Dirty: pages another process maps too (after a fork, the master
    /// and the other workers; also shared libraries).
    pub shared: u64,
    pub swap: u64,
}

impl Usage {
    /// The `kind` label values, in the order of `values`.
    pub const KINDS: [&'static str; 5] = ["rss", "pss", "uss", "shared", "swap"];

    pub fn values(&self) -> [u64; 5] {
        [self.rss, self.pss, self.uss, self.shared, self.swap]
    }

    /// The share of the resident memory still shared (0 for a process with none resident).
    pub fn shared_ratio(&self) -> f64 {
        if self.rss == 0 {
            0.0
        } else {
            self.shared as f64 / self.rss as f64
        }
    }

    /// `None` when the rollup is empty: a process that exited (a zombie has no memory map).
    pub fn from_rollup(r: &SmapsRollup) -> Option<Usage> {
        let m = &r.memory_map_rollup.0.first()?.extension.map;
        let get = |k: &str| m.get(k).copied().unwrap_or(0);
        Some(Usage {
            rss: *m.get("Rss")?,
            pss: get("Pss"),
            uss: get("Private_Clean") + get("Private_Dirty"),
            shared: get("Shared_Clean") + get("Shared_Dirty"),
            swap: get("Swap"),
        })
    }
}

/// Why a process's memory could not be read.
#[derive(Debug, PartialEq)]
pub enum Unread {
    /// It exited (or became a zombie) since it was listed: expected, not worth a line.
    Gone,
    /// Anything else: the kernel refused it (the agent has neither CAP_PERFMON nor CAP_SYS_PTRACE
    /// over the process, or a security module denies it) or the file could not be parsed.
    Failed(String),
}

impl From<ProcError> for Unread {
    fn from(e: ProcError) -> Self {
        match e {
            ProcError::NotFound(_) | ProcError::Incomplete(_) => Unread::Gone,
            ProcError::Io(ref io, _) if io.raw_os_error() == Some(libc::ESRCH) => Unread::Gone,
            other => Unread::Failed(other.to_string()),
        }
    }
}

/// Reads `/proc/<pid>/smaps_rollup`.
pub fn read(pid: u32) -> Result<Usage, Unread> {
    let rollup = procfs::process::Process::new(pid as i32)?.smaps_rollup()?;
    Usage::from_rollup(&rollup).ok_or(Unread::Gone)
}

/// A process to read, and the server (master PID) it belongs to.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    pub master: u32,
    pub pid: u32,
}

pub struct Reading {
    pub job: Job,
    pub usage: Result<Usage, Unread>,
}

/// The reading thread and its period: the loop hands it the processes to read when a period
/// has passed and the previous sweep is back, and applies what comes back.
pub struct Sampler {
    every: Duration,
    last: Option<Instant>,
    in_flight: bool,
    jobs: SyncSender<Vec<Job>>,
    readings: Receiver<Vec<Reading>>,
}

impl Sampler {
    /// Starts the thread; it reads until the sampler is dropped.
    pub fn start(every: Duration, metrics: &Metrics) -> Sampler {
        let (jobs, todo) = mpsc::sync_channel::<Vec<Job>>(1);
        let (done, readings) = mpsc::channel();
        let counters = Counters {
            seconds: metrics.memory_read_seconds.clone(),
            reads: metrics.memory_reads.clone(),
            failures: metrics.memory_read_failures.clone(),
        };
        let spawned = thread::Builder::new().name("memory".into()).spawn(move || {
            for sweep in todo {
                if done.send(sweep_once(sweep, &counters)).is_err() {
                    break;
                }
            }
        });
        if let Err(e) = spawned {
            warn!("cannot start the memory reading thread: {e}; no worker memory series");
        }
        Sampler { every, last: None, in_flight: false, jobs, readings }
    }

    /// Whether a sweep should start now (the first one starts at once).
    pub fn due(&self, now: Instant) -> bool {
        !self.in_flight && self.last.is_none_or(|t| now.duration_since(t) >= self.every)
    }

    pub fn send(&mut self, now: Instant, jobs: Vec<Job>) {
        self.last = Some(now);
        self.in_flight = self.jobs.try_send(jobs).is_ok();
    }

    /// The readings of the last sweep, once it is done.
    pub fn take(&mut self) -> Vec<Reading> {
        match self.readings.try_recv() {
            Ok(r) => {
                self.in_flight = false;
                r
            }
            Err(TryRecvError::Empty) => Vec::new(),
            Err(TryRecvError::Disconnected) => {
                self.in_flight = false;
                Vec::new()
            }
        }
    }
}

/// The reading thread's own counters (the loop's copies are the same atomics).
struct Counters {
    seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    reads: Counter,
    failures: Counter,
}

fn sweep_once(jobs: Vec<Job>, c: &Counters) -> Vec<Reading> {
    jobs.into_iter()
        .map(|job| {
            let t = Instant::now();
            let usage = read(job.pid);
            c.seconds.inc_by(t.elapsed().as_secs_f64());
            c.reads.inc();
            if matches!(usage, Err(Unread::Failed(_))) {
                c.failures.inc();
            }
            Reading { job, usage }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use procfs::FromBufRead;

    use super::*;

    const ROLLUP: &str = "\
55d5c4a7e000-7ffd3e5f8000 ---p 00000000 00:00 0                          [rollup]
Rss:              102400 kB
Pss:               40960 kB
Pss_Dirty:         30000 kB
Pss_Anon:          30000 kB
Pss_File:          10960 kB
Pss_Shmem:             0 kB
Shared_Clean:      61440 kB
Shared_Dirty:      20480 kB
Private_Clean:      4096 kB
Private_Dirty:     16384 kB
Referenced:       102400 kB
Anonymous:         40000 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
Swap:                512 kB
SwapPss:             256 kB
Locked:                0 kB
";

    #[test]
    fn a_rollup_gives_each_kind_in_bytes() {
        let r = SmapsRollup::from_buf_read(ROLLUP.as_bytes()).unwrap();
        let u = Usage::from_rollup(&r).unwrap();
        let k = 1024;
        assert_eq!(u, Usage { rss: 102_400 * k, pss: 40_960 * k, uss: 20_480 * k, shared: 81_920 * k, swap: 512 * k });
        assert_eq!(u.shared_ratio(), 0.8);
        assert_eq!(u.values()[Usage::KINDS.iter().position(|&k| k == "uss").unwrap()], u.uss);
    }

    #[test]
    fn an_empty_rollup_is_a_process_gone() {
        let r = SmapsRollup::from_buf_read(&b""[..]).unwrap();
        assert_eq!(Usage::from_rollup(&r), None);
        assert_eq!(Usage::default().shared_ratio(), 0.0);
    }

    #[test]
    fn errors_tell_an_exit_from_a_failure() {
        assert_eq!(Unread::from(ProcError::NotFound(None)), Unread::Gone);
        let esrch = std::io::Error::from_raw_os_error(libc::ESRCH);
        assert_eq!(Unread::from(ProcError::Io(esrch, None)), Unread::Gone);
        assert!(matches!(Unread::from(ProcError::PermissionDenied(None)), Unread::Failed(_)));
    }

    #[test]
    fn reads_this_process_and_not_a_missing_one() {
        let me = read(std::process::id()).unwrap();
        assert!(me.rss > 0 && me.rss == me.uss + me.shared, "{me:?}");
        assert!(me.pss <= me.rss && me.pss >= me.uss, "{me:?}");
        // PIDs stop below 2^22 (pid_max).
        assert_eq!(read(u32::MAX >> 1), Err(Unread::Gone));
    }

    #[test]
    fn a_sweep_comes_back_and_the_next_waits_for_the_period() {
        let m = Metrics::new();
        let mut s = Sampler::start(Duration::from_secs(3600), &m);
        let t0 = Instant::now();
        assert!(s.due(t0));
        s.send(t0, vec![Job { master: 1, pid: std::process::id() }]);
        assert!(!s.due(t0 + Duration::from_secs(7200)), "a sweep in flight");
        let mut got = Vec::new();
        while got.is_empty() && t0.elapsed() < Duration::from_secs(10) {
            got = s.take();
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.len(), 1);
        assert!(got[0].usage.is_ok());
        assert_eq!(m.memory_reads.get(), 1);
        assert!(!s.due(t0 + Duration::from_secs(60)));
        assert!(s.due(t0 + Duration::from_secs(3600)));
    }
}
