//! The figures the report derives from the measurements: medians over rounds, costs against
//! the app alone (per request and per downstream call), paired probe-cost differences, agent
//! CPU per 1k req/s.
use super::super::{
    capacity::Capacity,
    micro::{Mode, Placement, Sample, State},
    overhead::{Config, Load, Measurement, Overhead, REDIS_CALLS, REDIS_ROUTE},
    stats::{median, throughput_cost},
};

/// Median over rounds of one number of one route × load × configuration.
pub(super) fn median_of(
    o: &Overhead,
    route: &str,
    load: Load,
    config: Config,
    f: impl Fn(&Measurement) -> f64,
) -> Option<f64> {
    let values: Vec<f64> = o
        .measurements
        .iter()
        .filter(|m| m.route == route && m.load == load && m.config == config)
        .map(f)
        .collect();
    median(&values)
}

/// Throughput cost of a configuration against the app alone at saturation (medians).
pub(super) fn saturation_cost(o: &Overhead, route: &str, config: Config) -> Option<f64> {
    let base = median_of(o, route, Load::Saturation, Config::Alone, |m| {
        m.run.req_per_s
    })?;
    let with = median_of(o, route, Load::Saturation, config, |m| m.run.req_per_s)?;
    Some(throughput_cost(base, with))
}

/// Extra worker CPU time per request against the app alone at saturation (medians): 0.1 = 10 % more.
pub(super) fn cpu_cost(o: &Overhead, route: &str, config: Config) -> Option<f64> {
    let base = median_of(o, route, Load::Saturation, Config::Alone, |m| {
        m.worker_cpu_us
    })?;
    let with = median_of(o, route, Load::Saturation, config, |m| m.worker_cpu_us)?;
    Some(with / base - 1.0)
}

/// Worker CPU time per request a configuration adds to the app alone, in µs (medians over rounds).
pub(super) fn added_cpu_us(o: &Overhead, route: &str, load: Load, config: Config) -> Option<f64> {
    let base = median_of(o, route, load, Config::Alone, |m| m.worker_cpu_us)?;
    let with = median_of(o, route, load, config, |m| m.worker_cpu_us)?;
    Some(with - base)
}

/// The worker CPU time wsgiscope adds per downstream call, in µs: what it adds per request of
/// the Redis route over the REDIS_CALLS calls each request makes.
pub(super) fn added_cpu_per_call_us(o: &Overhead, load: Load) -> Option<f64> {
    Some(added_cpu_us(o, REDIS_ROUTE, load, Config::Wsgiscope)? / f64::from(REDIS_CALLS))
}

/// Whether the agent counted REDIS_CALLS downstream calls for every Redis-route request it counted.
pub(super) fn redis_calls_exact(o: &Overhead) -> bool {
    o.redis_counted > 0.0 && o.redis_calls_counted == f64::from(REDIS_CALLS) * o.redis_counted
}

/// What the agent's scheduler program (sched_switch) costs a context switch
/// of any process, in ns: the agent's cost on the switch loop less that of the empty probes, which
/// is the traced syscall path of the loop's futex calls alone (no scheduler program).
pub(super) fn scheduler_cost(samples: &[Sample]) -> Option<f64> {
    let cost = |state| probe_cost(samples, Placement::Untraced, Mode::Switch, state);
    Some(cost(State::Agent)? - cost(State::EmptyProbes)?)
}

/// Worker CPU two do-nothing programs on the write tracepoints add to an untraced process's
/// write on a socketpair (ns): the floor of any program hooking each write.
pub(super) fn write_hook_floor(samples: &[Sample]) -> Option<f64> {
    probe_cost(samples, Placement::Untraced, Mode::Unix, State::EmptyProbes)
}

/// What each kind of hook costs, in ns per syscall, with programs that do nothing: on a syscall
/// it hooks (the untraced socketpair write) and on one it does not (getppid).
pub(super) struct HookKindFloors {
    pub tracepoint_hooked: f64,
    pub tracepoint_other: f64,
    pub btf_hooked: f64,
    pub btf_other: f64,
}

pub(super) fn hook_kind_floors(samples: &[Sample]) -> Option<HookKindFloors> {
    let cost = |mode, state| probe_cost(samples, Placement::Untraced, mode, state);
    Some(HookKindFloors {
        tracepoint_hooked: cost(Mode::Unix, State::EmptyProbes)?,
        tracepoint_other: cost(Mode::Getppid, State::EmptyProbes)?,
        btf_hooked: cost(Mode::Unix, State::EmptyBtf)?,
        btf_other: cost(Mode::Getppid, State::EmptyBtf)?,
    })
}

/// Median over rounds of (ns with `state` − ns with nothing attached) for one probe-cost case.
pub(super) fn probe_cost(
    samples: &[Sample],
    placement: Placement,
    mode: Mode,
    state: State,
) -> Option<f64> {
    let of = |state: State, round: usize| {
        samples
            .iter()
            .find(|s| {
                s.placement == placement && s.mode == mode && s.state == state && s.round == round
            })
            .map(|s| s.ns_per_call)
    };
    let rounds = samples.iter().map(|s| s.round).max().map_or(0, |r| r + 1);
    let diffs: Vec<f64> = (0..rounds)
        .filter_map(|round| Some(of(state, round)? - of(State::Nothing, round)?))
        .collect();
    median(&diffs)
}

pub(super) fn probe_median(
    samples: &[Sample],
    placement: Placement,
    mode: Mode,
    state: State,
) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.placement == placement && s.mode == mode && s.state == state)
        .map(|s| s.ns_per_call)
        .collect();
    median(&v)
}

pub(super) fn cpu_per_1k(c: &Capacity) -> Option<f64> {
    let rate = c.burst.run.req_per_s;
    (rate > 0.0 && c.agent_peak_rss_kib > 0).then(|| c.burst.agent_cpu_percent / (rate / 1000.0))
}
