//! The Targets table: each bound next to what was measured, pass or miss.
use std::fmt::Write;

use super::{
    super::{
        capacity::BYTES1_BLOCKS,
        micro::{Mode, Placement, State},
        overhead::{Config, Load, REDIS_CALLS, REDIS_LABEL, REDIS_ROUTE, ROUTES},
        Results,
    },
    at_most,
    figures::{
        added_cpu_per_call_us, added_cpu_us, cpu_cost, cpu_per_1k, probe_cost, redis_calls_exact,
        saturation_cost, scheduler_cost, write_hook_floor,
    },
    num, percent, signed, verdict,
};

/// Targets from the project's issue 7 (for its two routes, /hello and /blocks; issue 14 added
/// the Redis route and the scheduler program without bounds: reference rows).
const ISSUE7_ROUTES: [&str; 2] = ["/hello", "/blocks"];
const HELLO_COST_MAX: f64 = 0.01;
const BLOCKS_COST_MAX: f64 = 0.03;
const CHEAPER_THAN_MIDDLEWARE: f64 = 5.0;
const TRACED_NS_MAX: f64 = 150.0;
const UNTRACED_NS_MAX: f64 = 40.0;
const CPU_PER_1K_MAX: f64 = 5.0;
const RSS_MAX_BYTES: f64 = 40e6;
pub(super) const BURST_RATE_GOAL: f64 = 10_000.0;

pub(super) fn targets(md: &mut String, r: &Results) {
    let o = &r.overhead;
    let _ = writeln!(md, "\n## Targets\n");
    let _ = writeln!(
        md,
        "| target | bound | measured | result |\n|---|---|---|---|"
    );
    for (route, max) in [("/hello", HELLO_COST_MAX), ("/blocks", BLOCKS_COST_MAX)] {
        let cost = saturation_cost(o, route, Config::Wsgiscope);
        let _ = writeln!(
            md,
            "| wsgiscope throughput cost at saturation, {route} | ≤ {:.0} % | {} | {} |",
            max * 100.0,
            cost.map_or("-".into(), percent),
            at_most(cost, max)
        );
    }
    for route in ISSUE7_ROUTES {
        let ours = saturation_cost(o, route, Config::Wsgiscope);
        let theirs = saturation_cost(o, route, Config::Timing);
        let (text, pass) = cheaper(ours, theirs);
        let cpu = |c| cpu_cost(o, route, c).map_or("-".into(), percent);
        let _ = writeln!(
            md,
            "| wsgiscope vs in-process timing middleware, throughput cost at saturation, {route} | ≥ {CHEAPER_THAN_MIDDLEWARE:.0}× cheaper | {text}; worker CPU per request {} vs {} | {} |",
            cpu(Config::Wsgiscope),
            cpu(Config::Timing),
            verdict(pass)
        );
    }
    for (placement, mode, max, what) in [
        (
            Placement::Traced,
            Mode::Tcp,
            TRACED_NS_MAX,
            "traced process, write on its client connection (full path)",
        ),
        (
            Placement::Traced,
            Mode::Unix,
            TRACED_NS_MAX,
            "traced process, write on another fd (socketpair)",
        ),
        (
            Placement::Untraced,
            Mode::Unix,
            UNTRACED_NS_MAX,
            "untraced process, write on a socketpair",
        ),
        (
            Placement::Untraced,
            Mode::Tcp,
            UNTRACED_NS_MAX,
            "untraced process, write on a TCP connection",
        ),
    ] {
        let cost = probe_cost(&r.micro, placement, mode, State::Agent);
        let _ = writeln!(
            md,
            "| probe cost per write syscall, {what} | ≤ {max:.0} ns | {} ns | {} |",
            num(cost, 0),
            at_most(cost, max)
        );
    }
    let floor = write_hook_floor(&r.micro);
    if floor.is_some() {
        let _ = writeln!(
            md,
            "| (reference) two programs that do nothing on the write tracepoints, untraced process, socketpair | - | {} ns | floor of any tracepoint program |",
            num(floor, 0)
        );
    }
    let added = |config| added_cpu_us(o, REDIS_ROUTE, Load::Saturation, config);
    let _ = writeln!(
        md,
        "| (reference) worker CPU wsgiscope adds on {REDIS_ROUTE}, per request and per downstream call (saturation) | - | {} µs/request, {} µs/call; timing middleware {} µs/request | see section 1 |",
        signed(added(Config::Wsgiscope), 0),
        signed(added_cpu_per_call_us(o, Load::Saturation), 1),
        signed(added(Config::Timing), 0),
    );
    let _ = writeln!(
        md,
        "| (reference) sched_switch, per context switch of any process | - | {} ns | see section 2 |",
        num(scheduler_cost(&r.micro), 0)
    );
    let c = &r.capacity;
    let lost = c.bytes1.lost + c.burst.lost + o.agent_lost_events;
    // wrk may leave one request per connection unanswered when it stops: the agent can count up
    // to that many more than the clients saw.
    let slack = (r.plan.wrk_connections * ROUTES.len() * r.plan.rounds) as f64;
    let overhead_counted = o.agent_counted >= o.client_completed as f64
        && o.agent_counted <= o.client_completed as f64 + slack;
    let exact = c.bytes1.requests > 0
        && c.burst.run.requests > 0
        && overhead_counted
        && c.bytes1.counted == c.bytes1.requests as f64
        && c.bytes1.blocks_counted == BYTES1_BLOCKS * c.bytes1.requests as f64
        && c.burst.counted == c.burst.run.requests as f64;
    let _ = writeln!(
        md,
        "| lost events (all agent runs), requests and blocks counted exactly | 0 lost, exact | {lost} lost; {} | {} |",
        if exact { "counts exact" } else { "counts not exact (see sections 1 and 3)" },
        verdict(lost == 0.0 && exact)
    );
    let _ = writeln!(
        md,
        "| downstream calls counted, {REDIS_LABEL} ({REDIS_CALLS} per request) | exact | {} calls for {} requests | {} |",
        o.redis_calls_counted,
        o.redis_counted,
        verdict(redis_calls_exact(o))
    );
    let per_1k = cpu_per_1k(c);
    let _ = writeln!(
        md,
        "| agent CPU per 1k req/s (burst of {:.0} req/s) | ≤ {CPU_PER_1K_MAX:.0} % of a core | {} % | {} |",
        c.burst.run.req_per_s,
        num(per_1k, 2),
        at_most(per_1k, CPU_PER_1K_MAX)
    );
    let rss = c.agent_peak_rss_kib as f64 * 1024.0;
    let _ = writeln!(
        md,
        "| agent peak RSS (VmHWM) | ≤ 40 MB | {:.1} MB | {} |",
        rss / 1e6,
        verdict(c.agent_peak_rss_kib > 0 && rss <= RSS_MAX_BYTES)
    );
    let _ = writeln!(
        md,
        "| sustained burst rate (one-block requests) | ~{BURST_RATE_GOAL:.0} req/s or the machine's max | {:.0} req/s | {} |",
        c.burst.run.req_per_s,
        if c.burst.run.req_per_s >= BURST_RATE_GOAL {
            "reached"
        } else {
            "the most this machine served (see Capacity)"
        }
    );
}

/// How many times cheaper wsgiscope is than the middleware; "pass" when ≥ 5×. A cost at or below
/// zero (within noise) cannot be divided by: it passes only if the middleware's cost is positive.
pub(super) fn cheaper(ours: Option<f64>, theirs: Option<f64>) -> (String, bool) {
    match (ours, theirs) {
        (Some(o), Some(t)) if o > 0.0 && t <= 0.0 => (
            format!(
                "middleware cost not measurable, wsgiscope's is ({} vs {})",
                percent(o),
                percent(t)
            ),
            false,
        ),
        (Some(o), Some(t)) if o > 0.0 => {
            let ratio = t / o;
            (
                format!("{ratio:.1}× ({} vs {})", percent(o), percent(t)),
                ratio >= CHEAPER_THAN_MIDDLEWARE,
            )
        }
        (Some(o), Some(t)) => (
            format!(
                "wsgiscope cost not measurable ({} vs {})",
                percent(o),
                percent(t)
            ),
            t > 0.0,
        ),
        _ => ("-".into(), false),
    }
}
