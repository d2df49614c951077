//! Issue 17's /blocks bound, measured on its own: the workers' CPU per /blocks request that
//! wsgiscope adds to the app alone, against what the in-process timing middleware adds, in many
//! short paired cycles. Section 1's five configurations in a few long rounds leave this
//! difference under the host's noise (there wsgiscope once measured less than programs doing
//! nothing on its hooks); here each cycle measures the app alone before and after, and the two
//! instrumentations in between (in alternating order), so drift on the shared machine cancels
//! within a cycle, and a sign test over the cycles says whether the bound is met, missed, or not
//! resolved at this noise.
//!
//! One gunicorn (sync, 2 workers) serves all three: `/blocks` alone, `/timing/blocks` through the
//! middleware; the agent is attached for its run of each cycle only. Worker CPU is read in
//! nanoseconds (/proc/PID/schedstat), with the kernel's BPF run-time counting off.
//!
//! With bpftrace installed each cycle also runs the app under programs that do nothing on every
//! tracepoint the agent attaches to (section 1's floor): what any programs on those hooks add
//! before they do anything. Where that alone is more than half the middleware's, no programs on
//! these hooks can meet the bound on this host, and the report says so with the numbers.
use std::path::Path;

use anyhow::{ensure, Context, Result};

use super::{
    load, objects,
    overhead::do_nothing_program,
    procs::{self, Middleware},
    stats::median,
    Plan,
};

/// The share of the middleware's added CPU wsgiscope may add (issue 17).
pub const SHARE_MAX: f64 = 0.5;

/// One cycle's worker CPU per /blocks request, µs: the app alone before and after, with the
/// middleware, with wsgiscope attached, and under do-nothing programs on the agent's
/// tracepoints (without bpftrace: none).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cycle {
    pub app_before: f64,
    pub timing: f64,
    pub wsgiscope: f64,
    pub app_after: f64,
    pub floor: Option<f64>,
}

impl Cycle {
    fn base(&self) -> f64 {
        (self.app_before + self.app_after) / 2.0
    }
    pub fn timing_added(&self) -> f64 {
        self.timing - self.base()
    }
    pub fn wsgiscope_added(&self) -> f64 {
        self.wsgiscope - self.base()
    }
    pub fn floor_added(&self) -> Option<f64> {
        self.floor.map(|f| f - self.base())
    }
    /// Did wsgiscope add at most `SHARE_MAX` of what the middleware added, in this cycle?
    pub fn within(&self) -> bool {
        self.wsgiscope_added() <= SHARE_MAX * self.timing_added()
    }
    /// Did the do-nothing programs add at most `SHARE_MAX` of the middleware's (None: not run)?
    pub fn floor_within(&self) -> Option<bool> {
        self.floor_added().map(|f| f <= SHARE_MAX * self.timing_added())
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlocksAb {
    pub cycles: Vec<Cycle>,
    pub secs: u64,
}

/// The bound's result over the cycles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Met,
    Missed,
    NotResolved,
}

impl BlocksAb {
    pub fn timing_added(&self) -> Option<f64> {
        median(&self.cycles.iter().map(Cycle::timing_added).collect::<Vec<_>>())
    }
    pub fn wsgiscope_added(&self) -> Option<f64> {
        median(&self.cycles.iter().map(Cycle::wsgiscope_added).collect::<Vec<_>>())
    }
    /// Median of what the do-nothing programs added, over the cycles that ran them.
    pub fn floor_added(&self) -> Option<f64> {
        median(&self.cycles.iter().filter_map(Cycle::floor_added).collect::<Vec<_>>())
    }
    /// Cycles in which wsgiscope added at most half the middleware's.
    pub fn within(&self) -> usize {
        self.cycles.iter().filter(|c| c.within()).count()
    }
    /// Cycles that ran the do-nothing programs, and those in which they added at most half.
    pub fn floor_within(&self) -> (usize, usize) {
        let runs: Vec<bool> = self.cycles.iter().filter_map(Cycle::floor_within).collect();
        (runs.len(), runs.iter().filter(|w| **w).count())
    }

    /// A two-sided sign test at 5 %: if wsgiscope's share were exactly the bound, a cycle would
    /// fall on either side of it with even odds. Met when so many cycles fall within that even
    /// odds would give as many less than 2.5 % of the time; missed when so few do.
    pub fn verdict(&self) -> Verdict {
        sign_test(self.cycles.len(), self.within())
    }

    /// The same test for the do-nothing programs: `Missed` means the bound is below the floor
    /// of these hooks here (None: they were not run).
    pub fn floor_verdict(&self) -> Option<Verdict> {
        let (n, k) = self.floor_within();
        (n > 0).then(|| sign_test(n, k))
    }
}

/// `k` of `n` cycles within the bound: met, missed, or not resolved at 5 % (two-sided).
fn sign_test(n: usize, k: usize) -> Verdict {
    let (n, k) = (n as u64, k as u64);
    if n == 0 {
        Verdict::NotResolved
    } else if binomial_tail_at_least(n, k) <= 0.025 {
        Verdict::Met
    } else if binomial_tail_at_least(n, n - k) <= 0.025 {
        Verdict::Missed
    } else {
        Verdict::NotResolved
    }
}

/// P(X ≥ k) for X ~ Binomial(n, ½).
fn binomial_tail_at_least(n: u64, k: u64) -> f64 {
    // C(n, i) / 2^n, built up in floating point (n is a few dozen).
    let mut term = 0.5f64.powi(n as i32);
    let mut sum = 0.0;
    for i in 0..=n {
        if i >= k {
            sum += term;
        }
        term = term * (n - i) as f64 / (i + 1) as f64;
    }
    sum
}

/// wrk on `path` for `secs`: the workers' CPU per request, µs.
fn cpu_per_request(server: &procs::Gunicorn, path: &str, plan: &Plan, secs: u64) -> Result<f64> {
    let before = procs::children_run_ns(server.group.pid());
    let run = load::wrk(server.addr, path, plan.wrk_connections, secs)?;
    let after = procs::children_run_ns(server.group.pid());
    ensure!(run.requests > 0 && run.errors == 0, "{path}: {} requests, {} errors", run.requests, run.errors);
    Ok(after.saturating_sub(before) as f64 / run.requests as f64 / 1e3)
}

/// /blocks's workers' CPU per request while `held` (an agent, bpftrace) is attached; dropping it
/// detaches.
fn blocks_while_held<T>(server: &procs::Gunicorn, plan: &Plan, secs: u64, held: T) -> Result<f64> {
    let cpu = cpu_per_request(server, "/blocks", plan, secs);
    drop(held);
    cpu
}

/// `plan.blocks_cycles` cycles; nothing else of the bench runs meanwhile.
pub fn run(root: &Path, work: &Path, plan: &Plan, redis: &str) -> Result<BlocksAb> {
    let server = procs::gunicorn(root, work, Middleware::All, redis)?;
    let secs = plan.blocks_secs;
    let floor_program = if procs::bpftrace_available() {
        Some(do_nothing_program(&objects::agent_tracepoints(root)?))
    } else {
        println!("bench: bpftrace not found: the /blocks cycles run without the do-nothing programs");
        None
    };
    // Warm-up: the first requests of a worker pay imports and caches.
    for path in ["/blocks", "/timing/blocks"] {
        cpu_per_request(&server, path, plan, 1)?;
    }
    let mut app = cpu_per_request(&server, "/blocks", plan, secs)?;
    let mut cycles = Vec::new();
    for i in 0..plan.blocks_cycles {
        let timing = || cpu_per_request(&server, "/timing/blocks", plan, secs);
        let with_agent = || {
            let agent = procs::agent(root, work, server.group.pid()).context("attaching the agent")?;
            blocks_while_held(&server, plan, secs, agent)
        };
        let floor = |program: &str| {
            let bpftrace = procs::bpftrace(work, program).context("attaching the do-nothing programs")?;
            blocks_while_held(&server, plan, secs, bpftrace)
        };
        // Rotating order: no instrumentation always follows the app alone.
        let (mut t, mut w, mut f) = (None, None, None);
        for step in 0..3 {
            match (i + step) % 3 {
                0 => t = Some(timing()?),
                1 => w = Some(with_agent()?),
                _ => f = floor_program.as_deref().map(floor).transpose()?,
            }
        }
        let (Some(timing), Some(wsgiscope)) = (t, w) else { unreachable!("each cycle runs both") };
        let app_after = cpu_per_request(&server, "/blocks", plan, secs)?;
        let c = Cycle { app_before: app, timing, wsgiscope, app_after, floor: f };
        println!(
            "bench: /blocks cycle {}: app {:.0}/{:.0} µs, timing middleware +{:.0} µs, wsgiscope +{:.0} µs, do-nothing programs {} per request",
            i + 1,
            c.app_before,
            c.app_after,
            c.timing_added(),
            c.wsgiscope_added(),
            c.floor_added().map_or("not run".into(), |f| format!("+{f:.0} µs")),
        );
        cycles.push(c);
        app = app_after;
    }
    Ok(BlocksAb { cycles, secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycle(timing: f64, wsgiscope: f64) -> Cycle {
        Cycle { app_before: 1000.0, timing: 1000.0 + timing, wsgiscope: 1000.0 + wsgiscope, app_after: 1000.0, floor: None }
    }

    #[test]
    fn binomial_tails() {
        assert!((binomial_tail_at_least(1, 1) - 0.5).abs() < 1e-12);
        assert!((binomial_tail_at_least(4, 0) - 1.0).abs() < 1e-12);
        // 25 cycles: 18 or more happen 2.2 % of the time, 17 or more 5.4 %.
        assert!((binomial_tail_at_least(25, 18) - 0.021_643).abs() < 1e-5);
        assert!((binomial_tail_at_least(25, 17) - 0.053_876).abs() < 1e-5);
    }

    #[test]
    fn a_cycle_adds_to_the_mean_of_the_app_before_and_after() {
        let c = Cycle { app_before: 900.0, timing: 1800.0, wsgiscope: 1300.0, app_after: 1100.0, floor: None };
        assert_eq!(c.timing_added(), 800.0);
        assert_eq!(c.wsgiscope_added(), 300.0);
        assert!(c.within());
        assert!(!Cycle { wsgiscope: 1401.0, ..c }.within());
        assert_eq!((c.floor_added(), c.floor_within()), (None, None));
        let f = Cycle { floor: Some(1250.0), ..c };
        assert_eq!((f.floor_added(), f.floor_within()), (Some(250.0), Some(true)));
        assert_eq!(Cycle { floor: Some(1401.0), ..c }.floor_within(), Some(false));
    }

    #[test]
    fn verdicts_by_sign_test() {
        let ab = |within: usize, n: usize| BlocksAb {
            cycles: (0..n).map(|i| if i < within { cycle(800.0, 300.0) } else { cycle(800.0, 500.0) }).collect(),
            secs: 2,
        };
        assert_eq!(ab(18, 25).verdict(), Verdict::Met);
        assert_eq!(ab(17, 25).verdict(), Verdict::NotResolved);
        assert_eq!(ab(8, 25).verdict(), Verdict::NotResolved);
        assert_eq!(ab(7, 25).verdict(), Verdict::Missed);
        assert_eq!(ab(0, 0).verdict(), Verdict::NotResolved);
        let a = ab(18, 25);
        assert_eq!(a.within(), 18);
        assert_eq!(a.timing_added(), Some(800.0));
        assert_eq!(a.wsgiscope_added(), Some(300.0));
        assert_eq!((a.floor_added(), a.floor_verdict()), (None, None));
        // The do-nothing programs over half the middleware's in 20 cycles of 25: below the floor.
        let floors = BlocksAb {
            cycles: (0..25).map(|i| Cycle { floor: Some(1000.0 + if i < 20 { 600.0 } else { 300.0 }), ..cycle(800.0, 700.0) }).collect(),
            secs: 2,
        };
        assert_eq!(floors.floor_within(), (25, 5));
        assert_eq!(floors.floor_added(), Some(600.0));
        assert_eq!(floors.floor_verdict(), Some(Verdict::Missed));
    }
}
