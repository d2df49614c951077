//! Memory series of a server's processes: one set per worker slot, one for the master. They
//! describe a live process, so a worker's are removed when it exits (the next worker in the
//! slot has its own from its first read), and all of a server's when its master exits.
use super::Aggregator;
use crate::{
    labels::{label, Labels},
    memory::Usage,
};

/// The `worker` label of the master's series.
pub const MASTER: &str = "master";

impl Aggregator<'_> {
    /// `slot` None: the master.
    fn memory_labels(&self, slot: Option<usize>) -> Labels {
        match slot {
            Some(s) => self.worker_labels(s),
            None => {
                let mut l = self.service_labels();
                l.push(label("worker", MASTER.to_string()));
                l
            }
        }
    }

    fn with_kind(base: &Labels, kind: &str) -> Labels {
        let mut l = base.clone();
        l.push(label("kind", kind.to_string()));
        l
    }

    /// A reading of process `pid`: the master's, or a worker's while it still holds its slot
    /// (a reading taken just before the worker exited is dropped).
    pub fn memory(&self, pid: u32, is_master: bool, u: &Usage) {
        let slot = match (is_master, self.slots.slot_of(pid)) {
            (true, _) => None,
            (false, Some(s)) => Some(s),
            (false, None) => return,
        };
        let base = self.memory_labels(slot);
        for (kind, v) in Usage::KINDS.iter().zip(u.values()) {
            self.metrics.worker_memory.get_or_create(&Self::with_kind(&base, kind)).set(v as i64);
        }
        if slot.is_some() {
            self.metrics.worker_memory_shared.get_or_create(&base).set(u.shared_ratio());
        }
    }

    /// Removes the memory series of a process: a worker's slot (`Some`), or the master's.
    pub fn forget_memory_of(&self, pid: u32, is_master: bool) {
        match (is_master, self.slots.slot_of(pid)) {
            (true, _) => self.forget_memory(None),
            (false, Some(s)) => self.forget_memory(Some(s)),
            (false, None) => {}
        }
    }

    pub(super) fn forget_memory(&self, slot: Option<usize>) {
        let base = self.memory_labels(slot);
        for kind in Usage::KINDS {
            self.metrics.worker_memory.remove(&Self::with_kind(&base, kind));
        }
        self.metrics.worker_memory_shared.remove(&base);
    }

    /// The master exited: every memory series of the server goes.
    pub fn forget_all_memory(&self) {
        self.forget_memory(None);
        for slot in self.info.keys() {
            self.forget_memory(Some(*slot));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{aggregate::Options, metrics::Metrics, memory::Usage};

    use super::*;

    const MB: u64 = 1 << 20;

    fn usage(private: u64, shared: u64) -> Usage {
        Usage { rss: private + shared, pss: private + shared / 2, uss: private, shared, swap: 0 }
    }

    #[test]
    fn series_follow_the_process_holding_the_slot() {
        let m = Metrics::new();
        let mut a = Aggregator::new(&m, vec![label("service", "app".to_string())], "gunicorn", Options::default());
        a.worker_started(7);
        a.memory(1, true, &usage(30 * MB, 10 * MB));
        a.memory(7, false, &usage(10 * MB, 30 * MB));
        let text = m.encode();
        assert!(text.contains(r#"wsgi_worker_memory_bytes{service="app",worker="0",kind="uss"} 10485760"#), "{text}");
        assert!(text.contains(r#"wsgi_worker_memory_bytes{service="app",worker="0",kind="pss"} 26214400"#), "{text}");
        assert!(text.contains(r#"wsgi_worker_memory_bytes{service="app",worker="master",kind="rss"} 41943040"#), "{text}");
        assert!(text.contains(r#"wsgi_worker_memory_shared_ratio{service="app",worker="0"} 0.75"#), "{text}");
        assert!(!text.contains(r#"wsgi_worker_memory_shared_ratio{service="app",worker="master"}"#), "{text}");

        // The worker exits: its series go; a reading taken before its exit is dropped.
        a.worker_exited(7);
        a.memory(7, false, &usage(10 * MB, 30 * MB));
        let text = m.encode();
        assert!(!text.contains(r#"worker="0",kind"#), "{text}");
        assert!(!text.contains("wsgi_worker_memory_shared_ratio{"), "{text}");
        assert!(text.contains(r#"worker="master",kind="uss"} 31457280"#), "{text}");

        // The next worker in the slot has series of its own; the master's exit removes them all.
        a.worker_started(9);
        a.memory(9, false, &usage(20 * MB, 20 * MB));
        assert!(m.encode().contains(r#"wsgi_worker_memory_shared_ratio{service="app",worker="0"} 0.5"#));
        a.forget_all_memory();
        let text = m.encode();
        assert!(!text.contains("wsgi_worker_memory_bytes{"), "{text}");
        assert!(!text.contains("wsgi_worker_memory_shared_ratio{"), "{text}");
    }

    #[test]
    fn an_unreadable_process_loses_its_series() {
        let m = Metrics::new();
        let mut a = Aggregator::new(&m, vec![label("service", "app".to_string())], "gunicorn", Options::default());
        a.worker_started(7);
        a.memory(7, false, &usage(MB, MB));
        a.forget_memory_of(7, false);
        assert!(!m.encode().contains("wsgi_worker_memory_bytes{"));
    }
}
