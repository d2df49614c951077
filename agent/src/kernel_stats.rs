//! The kernel side's own state, exported: its loss counters and the sizes of its maps.
use wsgiscope_common::{STAT_COUNT, STAT_REASONS};

use crate::{labels::label, metrics::Metrics};

/// The kernel's loss counters (monotonic per-CPU totals), folded into
/// The kernel's loss counters (monotonic per-CPU totals), folded into
/// `wsgiscope_lost_events_total`: one for the whole agent.
pub struct KernelStats<'m> {
    metrics: &'m Metrics,
    seen: [u64; STAT_COUNT as usize],
}

impl<'m> KernelStats<'m> {
    pub fn new(metrics: &'m Metrics) -> Self {
        for reason in STAT_REASONS {
            let _ = metrics.lost_events.get_or_create(&vec![label("reason", reason.to_string())]);
        }
        KernelStats { metrics, seen: [0; STAT_COUNT as usize] }
    }

    /// Sizes of the kernel maps: state that must return to its baseline when traffic stops.
    pub fn map_sizes(&self, sizes: &[(&'static str, usize)]) {
        for (map, n) in sizes {
            self.metrics.map_entries.get_or_create(&vec![label("map", map.to_string())]).set(*n as i64);
        }
    }

    pub fn update(&mut self, totals: [u64; STAT_COUNT as usize]) {
        for (i, reason) in STAT_REASONS.into_iter().enumerate() {
            let delta = totals[i].saturating_sub(self.seen[i]);
            self.seen[i] = totals[i].max(self.seen[i]);
            if delta > 0 {
                self.metrics.lost_events.get_or_create(&vec![label("reason", reason.to_string())]).inc_by(delta);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_losses_are_counted_once() {
        let m = Metrics::new();
        let mut k = KernelStats::new(&m);
        k.update([3, 0, 1, 0, 0]);
        k.update([5, 0, 1, 0, 0]);
        let text = m.encode();
        assert!(text.contains(r#"wsgiscope_lost_events_total{reason="ringbuf_full"} 5"#), "{text}");
        assert!(text.contains(r#"wsgiscope_lost_events_total{reason="pending_table_full"} 1"#));
        assert!(text.contains(r#"wsgiscope_lost_events_total{reason="conn_table_full"} 0"#));
    }
}
