use super::{
    at_most,
    figures::{cpu_cost, probe_cost, saturation_cost},
    num, percent, render,
    targets::cheaper,
};
use crate::bench::{
    capacity::Capacity,
    load::Run,
    micro::{Mode, Placement, Sample, State},
    overhead::{Config, Load, Measurement, Overhead},
    Environment, Plan, Results,
};

fn measurement(route: &'static str, config: Config, rate: f64) -> Measurement {
    Measurement {
        route,
        load: Load::Saturation,
        config,
        run: Run {
            requests: rate as u64,
            errors: 0,
            req_per_s: rate,
            p50_ms: 1.0,
            p99_ms: 2.0,
        },
        worker_cpu_us: 2e6 / rate,
        agent_cpu_us: None,
        foreign_agent: false,
    }
}

fn sample(placement: Placement, mode: Mode, agent: bool, round: usize, ns: f64) -> Sample {
    Sample {
        placement,
        mode,
        state: if agent { State::Agent } else { State::Nothing },
        round,
        ns_per_write: ns,
        foreign_agent: false,
    }
}

#[test]
fn saturation_cost_uses_medians_over_rounds() {
    let mut o = Overhead::default();
    for (alone, ours) in [(1000.0, 990.0), (1100.0, 1000.0), (900.0, 995.0)] {
        o.measurements
            .push(measurement("/hello", Config::Alone, alone));
        o.measurements
            .push(measurement("/hello", Config::Wsgiscope, ours));
    }
    // Medians 1000 and 995: 0.5 %.
    let cost = saturation_cost(&o, "/hello", Config::Wsgiscope).unwrap();
    assert!((cost - 0.005).abs() < 1e-12);
    // CPU per request 2000 and 2010.05 µs (2e6 / rate): medians give 995 / 1000 - 1.
    let cpu = cpu_cost(&o, "/hello", Config::Wsgiscope).unwrap();
    assert!((cpu - (1000.0 / 995.0 - 1.0)).abs() < 1e-12, "{cpu}");
    assert_eq!(saturation_cost(&o, "/blocks", Config::Wsgiscope), None);
}

#[test]
fn probe_cost_is_the_median_of_paired_differences() {
    let s = vec![
        sample(Placement::Untraced, Mode::Unix, false, 0, 500.0),
        sample(Placement::Untraced, Mode::Unix, true, 0, 530.0),
        sample(Placement::Untraced, Mode::Unix, false, 1, 700.0),
        sample(Placement::Untraced, Mode::Unix, true, 1, 720.0),
        sample(Placement::Untraced, Mode::Unix, false, 2, 510.0),
        sample(Placement::Untraced, Mode::Unix, true, 2, 600.0),
    ];
    assert_eq!(
        probe_cost(&s, Placement::Untraced, Mode::Unix, State::Agent),
        Some(30.0)
    );
    assert_eq!(
        probe_cost(&s, Placement::Traced, Mode::Unix, State::Agent),
        None
    );
    assert_eq!(
        probe_cost(&s, Placement::Untraced, Mode::Unix, State::EmptyProbes),
        None
    );
}

#[test]
fn cheaper_than_middleware_verdicts() {
    assert!(cheaper(Some(0.01), Some(0.10)).1);
    assert!(!cheaper(Some(0.03), Some(0.10)).1);
    let (text, pass) = cheaper(Some(-0.002), Some(0.10));
    assert!(pass && text.contains("not measurable"), "{text}");
    assert!(!cheaper(Some(-0.002), Some(-0.01)).1);
    assert!(!cheaper(None, Some(0.1)).1);
    let (text, pass) = cheaper(Some(0.05), Some(-0.01));
    assert!(
        !pass && text.contains("middleware cost not measurable"),
        "{text}"
    );
}

#[test]
fn formatting_helpers() {
    assert_eq!(percent(0.0123), "+1.2 %");
    assert_eq!(percent(-0.004), "-0.4 %");
    assert_eq!(num(Some(12.345), 1), "12.3");
    assert_eq!(num(None, 1), "-");
    assert_eq!(at_most(Some(40.0), 40.0), "pass");
    assert_eq!(at_most(Some(41.0), 40.0), "**miss**");
    assert_eq!(at_most(None, 40.0), "**miss**");
}

#[test]
fn renders_every_section_with_empty_results() {
    let r = Results {
        plan: Plan::new(true),
        env: Environment::default(),
        overhead: Overhead::default(),
        micro: Vec::new(),
        capacity: Capacity::default(),
    };
    let md = render(&r);
    for heading in [
        "## Targets",
        "## 1. Overhead on gunicorn",
        "## 2. Probe cost per syscall",
        "## 3. Capacity",
        "## Exact commands",
        "## Versions",
    ] {
        assert!(md.contains(heading), "missing {heading}");
    }
    // Nothing measured: every target is a miss, none a pass.
    assert!(!md.contains("| pass |"), "{md}");
    assert!(md.contains("Quick mode"));
}
