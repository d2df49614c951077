use super::{
    at_most,
    figures::{
        added_cpu_per_call_us, added_cpu_us, cpu_cost, hook_kind_floors, probe_cost,
        redis_calls_exact, saturation_cost, scheduler_cost,
    },
    num, percent, render, signed,
    targets::cheaper,
};
use crate::bench::{
    capacity::Capacity,
    load::Run,
    micro::{Mode, Placement, Sample, State},
    overhead::{
        Config, Load, Measurement, Overhead, REDIS_CALLS, REDIS_LABEL, REDIS_ROUTE, ROUTES,
    },
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
        ns_per_call: ns,
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

fn switch_sample(state: State, round: usize, ns: f64) -> Sample {
    Sample {
        state,
        ..sample(Placement::Untraced, Mode::Switch, false, round, ns)
    }
}

#[test]
fn added_cpu_per_downstream_call_is_per_request_over_the_calls() {
    let mut o = Overhead::default();
    let with_cpu = |config, us| Measurement {
        worker_cpu_us: us,
        ..measurement(REDIS_ROUTE, config, 500.0)
    };
    for (alone, ours, timing) in [
        (3000.0, 3400.0, 3050.0),
        (3100.0, 3300.0, 3000.0),
        (2900.0, 3500.0, 3100.0),
    ] {
        o.measurements.push(with_cpu(Config::Alone, alone));
        o.measurements.push(with_cpu(Config::Wsgiscope, ours));
        o.measurements.push(with_cpu(Config::Timing, timing));
    }
    // Medians 3000, 3400 and 3050 µs: wsgiscope adds 400 µs per request, 400 / 20 per call.
    let added = added_cpu_us(&o, REDIS_ROUTE, Load::Saturation, Config::Wsgiscope).unwrap();
    assert!((added - 400.0).abs() < 1e-9, "{added}");
    let per_call = added_cpu_per_call_us(&o, Load::Saturation).unwrap();
    assert!(
        (per_call - 400.0 / f64::from(REDIS_CALLS)).abs() < 1e-9,
        "{per_call}"
    );
    let timing = added_cpu_us(&o, REDIS_ROUTE, Load::Saturation, Config::Timing).unwrap();
    assert!((timing - 50.0).abs() < 1e-9, "{timing}");
    // No fixed-rate runs, no other route: nothing to report.
    assert_eq!(added_cpu_per_call_us(&o, Load::Fixed), None);
    assert_eq!(
        added_cpu_us(&o, "/hello", Load::Saturation, Config::Wsgiscope),
        None
    );
}

#[test]
fn redis_route_is_consistent() {
    assert!(ROUTES.contains(&REDIS_ROUTE));
    assert_eq!(REDIS_ROUTE, format!("{REDIS_LABEL}?n={REDIS_CALLS}"));
}

#[test]
fn downstream_calls_exact_only_at_twenty_per_request() {
    let counted = |requests, calls| Overhead {
        redis_counted: requests,
        redis_calls_counted: calls,
        ..Overhead::default()
    };
    assert!(redis_calls_exact(&counted(10.0, 200.0)));
    assert!(!redis_calls_exact(&counted(10.0, 199.0)));
    assert!(!redis_calls_exact(&counted(10.0, 220.0)));
    // Nothing counted is not a pass.
    assert!(!redis_calls_exact(&counted(0.0, 0.0)));
}

#[test]
fn scheduler_cost_is_agent_cost_less_empty_probe_cost() {
    let s = vec![
        switch_sample(State::Nothing, 0, 2000.0),
        switch_sample(State::Agent, 0, 2300.0),
        switch_sample(State::EmptyProbes, 0, 2100.0),
        switch_sample(State::Nothing, 1, 2600.0),
        switch_sample(State::Agent, 1, 2850.0),
        switch_sample(State::EmptyProbes, 1, 2700.0),
        switch_sample(State::Nothing, 2, 2050.0),
        switch_sample(State::Agent, 2, 2400.0),
        switch_sample(State::EmptyProbes, 2, 2120.0),
    ];
    // Agent: differences 300, 250, 350 (median 300); empty probes: 100, 100, 70 (median 100).
    assert_eq!(scheduler_cost(&s), Some(200.0));
    // Without bpftrace there is no floor to take off.
    let no_floor: Vec<Sample> = s
        .into_iter()
        .filter(|x| x.state != State::EmptyProbes)
        .collect();
    assert_eq!(scheduler_cost(&no_floor), None);
}

#[test]
fn hook_kinds_compare_a_hooked_syscall_and_another() {
    let at = |mode, state, round, ns| Sample {
        state,
        ..sample(Placement::Untraced, mode, false, round, ns)
    };
    let mut s = Vec::new();
    for round in 0..3 {
        let shift = 10.0 * round as f64;
        s.push(at(Mode::Unix, State::Nothing, round, 900.0 + shift));
        s.push(at(Mode::Unix, State::EmptyProbes, round, 1190.0 + shift));
        s.push(at(Mode::Unix, State::EmptyBtf, round, 1050.0 + shift));
        s.push(at(Mode::Getppid, State::Nothing, round, 180.0 + shift));
        s.push(at(Mode::Getppid, State::EmptyProbes, round, 230.0 + shift));
        s.push(at(Mode::Getppid, State::EmptyBtf, round, 305.0 + shift));
    }
    let k = hook_kind_floors(&s).unwrap();
    assert_eq!(
        (k.tracepoint_hooked, k.tracepoint_other, k.btf_hooked, k.btf_other),
        (290.0, 50.0, 150.0, 125.0)
    );
    // Without the BTF pair's runs there is nothing to compare.
    let no_btf: Vec<Sample> = s.iter().filter(|x| x.state != State::EmptyBtf).cloned().collect();
    assert!(hook_kind_floors(&no_btf).is_none());
    // Section 2 says what each costs and what it makes of the /blocks route's 1001 writes.
    let md = render(&Results {
        micro: s,
        ..empty_results()
    });
    assert!(
        md.contains("cost a write they hook 290 ns and a syscall they do not hook 50 ns")
            && md.contains("150 ns a write and 125 ns a getppid")
            && md.contains("140 ns less and every other syscall of every process on the node 75 ns more")
            && md.contains("would be 150 µs instead of 290 µs per request"),
        "{md}"
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
    assert_eq!(signed(Some(12.345), 1), "+12.3");
    assert_eq!(signed(Some(-3.0), 0), "-3");
    assert_eq!(signed(None, 0), "-");
    assert_eq!(at_most(Some(40.0), 40.0), "pass");
    assert_eq!(at_most(Some(41.0), 40.0), "**miss**");
    assert_eq!(at_most(None, 40.0), "**miss**");
}

fn empty_results() -> Results {
    Results {
        plan: Plan::new(true),
        env: Environment::default(),
        overhead: Overhead::default(),
        micro: Vec::new(),
        capacity: Capacity::default(),
        views: Default::default(),
        memory: Default::default(),
        kernel: Default::default(),
    }
}

#[test]
fn renders_every_section_with_empty_results() {
    let md = render(&empty_results());
    for heading in [
        "## Targets",
        "## 1. Overhead on gunicorn",
        "## 2. Probe cost per syscall and per context switch",
        "### Context switches (any process)",
        "### /redis?n=20 (20 Redis GETs in a loop, then one block)",
        "## 3. Capacity",
        "## 4. Live views (page and API)",
        "## 5. Worker memory (smaps_rollup reads)",
        "## 6. Kernel programs: run time per program",
        "## Exact commands",
        "## Versions",
    ] {
        assert!(md.contains(heading), "missing {heading}");
    }
    // Nothing measured: every target is a miss, none a pass.
    assert!(!md.contains("| pass |"), "{md}");
    assert!(md.contains("Quick mode"));
}
