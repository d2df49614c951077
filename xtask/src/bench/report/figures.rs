//! The figures the report derives from the measurements: medians over rounds, costs against
//! the app alone, paired probe-cost differences, agent CPU per 1k req/s.
use super::super::{
    capacity::Capacity,
    micro::{Mode, Placement, Sample, State},
    overhead::{Config, Load, Measurement, Overhead},
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
            .map(|s| s.ns_per_write)
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
        .map(|s| s.ns_per_write)
        .collect();
    median(&v)
}

pub(super) fn cpu_per_1k(c: &Capacity) -> Option<f64> {
    let rate = c.burst.run.req_per_s;
    (rate > 0.0 && c.agent_peak_rss_kib > 0).then(|| c.burst.agent_cpu_percent / (rate / 1000.0))
}
