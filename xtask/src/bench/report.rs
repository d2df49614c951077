//! BENCHMARKS.md from the results: targets first (pass or miss, never adjusted), then each part's
//! table, the exact commands and the versions.
use std::fmt::Write;

use super::{
    capacity::{Capacity, BYTES1_BLOCKS},
    load,
    micro::{Mode, Placement, Sample, State, BATCH, CASES, EMPTY_PROBES, WRITE_SIZE},
    overhead::{Config, Load, Measurement, Overhead, CONFIGS, ROUTES},
    procs,
    stats::{median, throughput_cost},
    Results,
};

/// Targets from the project's issue 7.
const HELLO_COST_MAX: f64 = 0.01;
const BLOCKS_COST_MAX: f64 = 0.03;
const CHEAPER_THAN_MIDDLEWARE: f64 = 5.0;
const TRACED_NS_MAX: f64 = 150.0;
const UNTRACED_NS_MAX: f64 = 40.0;
const CPU_PER_1K_MAX: f64 = 5.0;
const RSS_MAX_BYTES: f64 = 40e6;
const BURST_RATE_GOAL: f64 = 10_000.0;

pub fn render(r: &Results) -> String {
    let mut md = String::new();
    header(&mut md, r);
    targets(&mut md, r);
    overhead(&mut md, r);
    agent_counts(&mut md, &r.overhead);
    probes(&mut md, r);
    capacity(&mut md, &r.capacity);
    commands(&mut md, r);
    versions(&mut md, r);
    md
}

fn header(md: &mut String, r: &Results) {
    let e = &r.env;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench{}` on {} (took {:.0} min), wsgiscope at commit {}.",
        if r.plan.quick { " --quick" } else { "" },
        e.date,
        e.elapsed.as_secs_f64() / 60.0,
        e.commit
    );
    if r.plan.quick {
        let _ = writeln!(
            md,
            "\n**Quick mode: runs of a few seconds, one round. These numbers only show that the harness works.**"
        );
    }
    let _ = writeln!(
        md,
        "\n- Machine: {}, {} RAM, `{}`",
        e.cpu, e.memory, e.uname
    );
    if !e.mitigations.is_empty() {
        let _ = writeln!(
            md,
            "- CPU mitigations in force: {}. They tax every call and return in the kernel, so each BPF \
             program run and each helper it calls costs several times what it would on bare metal.",
            e.mitigations
        );
    }
    let _ = writeln!(
        md,
        "- Load average (1, 5, 15 min) before: {}, after: {}. The load generators, gunicorn and the \
         agent share these cores; nothing is pinned.",
        e.load_before, e.load_after
    );
    let foreign = foreign_counts(r);
    if foreign.0 > 0 {
        let _ = writeln!(
            md,
            "- **Shared machine:** in {} of {} measurements another wsgiscope agent (not started by the \
             benchmark) was running; its probes fire for every process, so those measurements carry \
             its cost too, including the \"agent off\" ones.",
            foreign.0, foreign.1
        );
    }
}

fn foreign_counts(r: &Results) -> (usize, usize) {
    let flags: Vec<bool> = r
        .overhead
        .measurements
        .iter()
        .map(|m| m.foreign_agent)
        .chain(r.micro.iter().map(|s| s.foreign_agent))
        .chain([r.capacity.burst.foreign_agent])
        .collect();
    (flags.iter().filter(|&&f| f).count(), flags.len())
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "**miss**"
    }
}

fn percent(x: f64) -> String {
    if x.is_finite() {
        format!("{:+.1} %", 100.0 * x)
    } else {
        "-".into()
    }
}

fn num(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".into(),
    }
}

/// Median over rounds of one number of one route × load × configuration.
fn median_of(
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
fn saturation_cost(o: &Overhead, route: &str, config: Config) -> Option<f64> {
    let base = median_of(o, route, Load::Saturation, Config::Alone, |m| {
        m.run.req_per_s
    })?;
    let with = median_of(o, route, Load::Saturation, config, |m| m.run.req_per_s)?;
    Some(throughput_cost(base, with))
}

/// Extra worker CPU time per request against the app alone at saturation (medians): 0.1 = 10 % more.
fn cpu_cost(o: &Overhead, route: &str, config: Config) -> Option<f64> {
    let base = median_of(o, route, Load::Saturation, Config::Alone, |m| {
        m.worker_cpu_us
    })?;
    let with = median_of(o, route, Load::Saturation, config, |m| m.worker_cpu_us)?;
    Some(with / base - 1.0)
}

/// Median over rounds of (ns with `state` − ns with nothing attached) for one probe-cost case.
fn probe_cost(samples: &[Sample], placement: Placement, mode: Mode, state: State) -> Option<f64> {
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

fn probe_median(samples: &[Sample], placement: Placement, mode: Mode, state: State) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.placement == placement && s.mode == mode && s.state == state)
        .map(|s| s.ns_per_write)
        .collect();
    median(&v)
}

/// "pass" when the whole measured value meets the bound; a missing value is a miss.
fn at_most(value: Option<f64>, max: f64) -> &'static str {
    verdict(value.is_some_and(|v| v <= max))
}

fn targets(md: &mut String, r: &Results) {
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
    for route in ROUTES {
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
    let floor = probe_cost(
        &r.micro,
        Placement::Untraced,
        Mode::Unix,
        State::EmptyProbes,
    );
    if floor.is_some() {
        let _ = writeln!(
            md,
            "| (reference) two programs that do nothing on the write tracepoints, untraced process, socketpair | - | {} ns | floor of any tracepoint program |",
            num(floor, 0)
        );
    }
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
fn cheaper(ours: Option<f64>, theirs: Option<f64>) -> (String, bool) {
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

fn cpu_per_1k(c: &Capacity) -> Option<f64> {
    let rate = c.burst.run.req_per_s;
    (rate > 0.0 && c.agent_peak_rss_kib > 0).then(|| c.burst.agent_cpu_percent / (rate / 1000.0))
}

fn overhead(md: &mut String, r: &Results) {
    let o = &r.overhead;
    let _ = writeln!(md, "\n## 1. Overhead on gunicorn\n");
    let _ = writeln!(
        md,
        "gunicorn sync, 2 workers, serving `tests/apps/benchapp.py` (the test app's routes). Four \
         configurations, each round running all four in an order rotated by one per round; \
         {} round(s) of {} s per run; every number is the median over rounds. \"app + wsgiscope\" is \
         the app-alone server with the agent attached for that block of the round (and detached \
         otherwise, so its probes never run during the other configurations).\n",
        r.plan.rounds, r.plan.run_secs
    );
    let _ = writeln!(
        md,
        "- Saturation: `wrk` with {} connections; throughput and wrk's latency percentiles.",
        r.plan.wrk_connections
    );
    let rates: Vec<String> = ROUTES
        .iter()
        .map(|route| {
            format!(
                "{route} {} req/s (half of {} req/s)",
                num(o.fixed_rate.get(route).copied(), 0),
                num(o.calibration.get(route).copied(), 0)
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "- Fixed rate, near 50 % utilisation: half the app-alone saturation throughput of a \
         calibration run: {}. Open-loop client (xtask, {} threads, one connection per request): \
         latency counts from each request's scheduled send time, so stalls are not hidden \
         (no coordinated omission).",
        rates.join(", "),
        r.plan.paced_threads
    );
    let _ = writeln!(
        md,
        "- Cost = throughput lost against the app alone (saturation medians); negative = faster, i.e. noise. \
         Workers' CPU per request = utime + stime of gunicorn's workers over the run (from /proc) over \
         the requests answered: it includes the time the BPF programs run inside the workers' \
         syscalls, and is steadier than throughput on a shared machine; CPU cost compares it with the \
         app alone at saturation."
    );
    for route in ROUTES {
        let what = if route == "/hello" {
            "one block"
        } else {
            "1000 blocks of 128 bytes"
        };
        let _ = writeln!(md, "\n### {route} ({what})\n");
        let _ = writeln!(
            md,
            "| configuration | saturation req/s | cost | p50 ms | p99 ms | workers' CPU µs/request | CPU cost | fixed rate req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for config in CONFIGS {
            let m = |load, f: fn(&Measurement) -> f64| median_of(o, route, load, config, f);
            let vs_alone = |cost: Option<f64>| match config {
                Config::Alone => "-".to_string(),
                _ => cost.map_or("-".into(), percent),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                config.label(),
                num(m(Load::Saturation, |m| m.run.req_per_s), 0),
                vs_alone(saturation_cost(o, route, config)),
                num(m(Load::Saturation, |m| m.run.p50_ms), 2),
                num(m(Load::Saturation, |m| m.run.p99_ms), 2),
                num(m(Load::Saturation, |m| m.worker_cpu_us), 0),
                vs_alone(cpu_cost(o, route, config)),
                num(m(Load::Fixed, |m| m.run.req_per_s), 0),
                num(m(Load::Fixed, |m| m.run.p50_ms), 2),
                num(m(Load::Fixed, |m| m.run.p99_ms), 2),
            );
        }
        let agent_cpu = |load| {
            median_of(o, route, load, Config::Wsgiscope, |m| {
                m.agent_cpu_us.unwrap_or(f64::NAN)
            })
        };
        let _ = writeln!(
            md,
            "\nThe agent's own CPU time per request (not in the workers' column): {} µs at saturation, {} µs at the fixed rate.",
            num(agent_cpu(Load::Saturation), 1),
            num(agent_cpu(Load::Fixed), 1)
        );
        let alone: Vec<f64> = o
            .measurements
            .iter()
            .filter(|m| m.route == route && m.load == Load::Saturation && m.config == Config::Alone)
            .map(|m| m.run.req_per_s)
            .collect();
        if alone.len() > 1 {
            let (lo, hi) = alone
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            let _ = writeln!(
                md,
                "\nNoise: the app alone ranged {lo:.0}–{hi:.0} req/s at saturation over the rounds \
                 ({:.1} % of the median); costs smaller than that are not resolved.",
                100.0 * (hi - lo) / median(&alone).unwrap_or(f64::NAN)
            );
        }
        let errors: u64 = o
            .measurements
            .iter()
            .filter(|m| m.route == route)
            .map(|m| m.run.errors)
            .sum();
        if errors > 0 {
            let _ = writeln!(
                md,
                "\nClient-side errors on {route} over all runs: {errors}."
            );
        }
    }
}

fn agent_counts(md: &mut String, o: &Overhead) {
    let _ = writeln!(
        md,
        "\nOver all wsgiscope blocks the agent counted {} requests; the clients saw {} answered (wrk \
         may leave one request per connection in flight when it stops, which the server still \
         answers); lost events: {}.",
        o.agent_counted, o.client_completed, o.agent_lost_events
    );
}

fn probes(md: &mut String, r: &Results) {
    let _ = writeln!(md, "\n## 2. Probe cost per syscall\n");
    let _ = writeln!(
        md,
        "A loop of {} write(2) calls of {WRITE_SIZE} bytes on a non-blocking socket, in batches of \
         {BATCH} between which the same thread drains the peer (untimed); after {} untimed warm-up \
         writes. A loop reports nanoseconds per write in its median batch (robust to preemption on \
         a shared machine). Each case runs {} loop process(es) per agent state and round, the fastest \
         taken (a process here runs its whole life in a fast or a ~30 % slower mode, set by the host); {} round(s), each measuring every case with the agent off and attached (which \
         first alternates). Cost = median over rounds of the paired difference (on − off).\n",
        r.plan.micro_iters,
        r.plan.micro_iters / 10,
        r.plan.micro_reps,
        r.plan.micro_rounds
    );
    let _ = writeln!(
        md,
        "- Traced: the loop runs as a child of a gunicorn worker (started by the bench app's \
         `/loop` route), so it descends from the attached master.\n\
         - Untraced: the same loop started by xtask, outside the server's process tree.\n\
         - `tcp`: an accepted loopback TCP connection on which the loop first read an HTTP request, \
         so in a traced process each write takes the agent's full path (recorded on syscall enter, \
         aggregated into the request on exit). `unix`: one end of an AF_UNIX socketpair, which \
         in a traced process is an fd that is not a client connection (the probe looks it up and \
         stops). `getppid`: no write at all but getppid(2), which the agent does not hook: any \
         program on a syscall tracepoint sends every syscall of every process through the kernel's \
         slower traced entry and exit, and this row shows that part alone.\n"
    );
    let _ = writeln!(
        md,
        "- Empty probes: with nothing else attached, bpftrace runs two programs that do nothing on \
         `sys_enter_write` and `sys_exit_write` (`{EMPTY_PROBES}`); their cost on the untraced loop \
         is the floor that any program on these two tracepoints costs on this kernel, whatever it does.\n"
    );
    let _ = writeln!(
        md,
        "| process | fd | nothing attached ns/call | agent attached ns/call | agent cost ns/call | empty probes ns/call | empty-probe cost ns/call |\n|---|---|---|---|---|---|---|"
    );
    for (placement, mode) in CASES {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            match placement {
                Placement::Traced => "traced",
                Placement::Untraced => "untraced",
            },
            mode.name(),
            num(probe_median(&r.micro, placement, mode, State::Nothing), 1),
            num(probe_median(&r.micro, placement, mode, State::Agent), 1),
            num(probe_cost(&r.micro, placement, mode, State::Agent), 1),
            num(
                probe_median(&r.micro, placement, mode, State::EmptyProbes),
                1
            ),
            num(probe_cost(&r.micro, placement, mode, State::EmptyProbes), 1),
        );
    }
    if !r.micro.iter().any(|s| s.state == State::EmptyProbes) {
        let _ = writeln!(md, "\n(bpftrace was not installed: no empty-probe floor.)");
    }
}

fn capacity(md: &mut String, c: &Capacity) {
    let b = &c.bytes1;
    let burst = &c.burst;
    let _ = writeln!(md, "\n## 3. Capacity\n");
    let _ = writeln!(
        md,
        "The agent attached to a fresh gunicorn (sync, 2 workers). Client counts are exact (every \
         request is answered or counted as an error); the agent's are deltas of \
         `wsgi_requests_total` and `wsgi_response_blocks_sum`, read once it had caught up (or after 10 s).\n"
    );
    let _ = writeln!(
        md,
        "| check | client | agent | lost events |\n|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| /bytes1 (102,400 one-byte blocks), {} requests one at a time, {:.2} s each | {} requests, {} blocks | {} requests, {} blocks | {} |",
        b.requests,
        b.seconds_per_request,
        b.requests,
        BYTES1_BLOCKS * b.requests as f64,
        b.counted,
        b.blocks_counted,
        b.lost
    );
    let _ = writeln!(
        md,
        "| burst: /hello closed loop, {} connections, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms | {} requests ({} errors) | {} requests | {} |",
        burst.connections,
        burst.run.req_per_s,
        burst.run.p50_ms,
        burst.run.p99_ms,
        burst.run.requests,
        burst.run.errors,
        burst.counted,
        burst.lost
    );
    let _ = writeln!(
        md,
        "\nAgent CPU over the burst (utime + stime from /proc, from the burst's start until it had \
         counted every request, over the burst's duration): {:.2} % of one core at {:.0} req/s = \
         {} % per 1k req/s. During the /bytes1 requests: {:.2} CPU-seconds for {} requests. Peak RSS \
         (VmHWM) at the end: {:.1} MiB.",
        burst.agent_cpu_percent,
        burst.run.req_per_s,
        num(cpu_per_1k(c), 2),
        b.agent_cpu_seconds,
        b.requests,
        c.agent_peak_rss_kib as f64 / 1024.0
    );
    if burst.run.req_per_s < BURST_RATE_GOAL {
        let _ = writeln!(
            md,
            "\nThe ~{BURST_RATE_GOAL:.0} req/s burst was not reached: {:.0} req/s is what gunicorn's two \
             sync workers served with the client on the same {} cores.",
            burst.run.req_per_s,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
}

fn commands(md: &mut String, r: &Results) {
    let p = &r.plan;
    let _ = writeln!(md, "\n## Exact commands\n");
    let _ = writeln!(md, "```sh");
    let _ = writeln!(
        md,
        "cargo xtask bench{}",
        if p.quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "# the servers (one per middleware; PORT = a free loopback port):"
    );
    let _ = writeln!(
        md,
        "WSGISCOPE_BENCH_MIDDLEWARE=none|timing|prometheus WSGISCOPE_BENCH_LOOP=target/debug/xtask \\\n  \
         [PROMETHEUS_MULTIPROC_DIR=target/xtask-bench/prometheus-multiproc] \\\n  \
         {}",
        procs::gunicorn_spec("127.0.0.1:PORT", "tests/apps").shell_line()
    );
    let _ = writeln!(md, "target/release/wsgiscope attach --pid <gunicorn master pid> --listen 127.0.0.1:<free port>");
    let _ = writeln!(md, "# saturation (calibration: -d{}s):", p.calibrate_secs);
    let _ = writeln!(
        md,
        "wrk {} http://127.0.0.1:PORT/hello   # and /blocks",
        load::wrk_args(p.wrk_connections, p.run_secs).join(" ")
    );
    let _ = writeln!(
        md,
        "# fixed rate: xtask's open-loop client (bench/load.rs `paced`), {} threads, {} s per run",
        p.paced_threads, p.run_secs
    );
    let _ = writeln!(
        md,
        "# probe cost, traced: GET /loop?mode=tcp|unix&iters={} (the worker runs the loop below)",
        p.micro_iters
    );
    let _ = writeln!(
        md,
        "target/debug/xtask bench-loop --mode tcp|unix|getppid --iters {}   # untraced: started by xtask",
        p.micro_iters
    );
    let _ = writeln!(
        md,
        "# capacity: {} × GET /bytes1, then /hello closed loop, {} connections, {} s (bench/load.rs `burst`)",
        p.bytes1_requests, p.burst_connections, p.burst_secs
    );
    let _ = writeln!(md, "```");
    let _ = writeln!(
        md,
        "\nThe timing middleware and the prometheus_client middleware are in \
         `tests/apps/bench_middleware.py`: the first wraps start_response, write() and the iterable \
         (per-block counting and timing), the second records one Counter increment and one Histogram \
         observation per request in multiprocess mode (its /metrics endpoint is not scraped during the \
         runs; neither is wsgiscope's)."
    );
    let _ = writeln!(
        md,
        "\nRaw per-run numbers are printed by the command as it runs."
    );
}

fn versions(md: &mut String, r: &Results) {
    let _ = writeln!(md, "\n## Versions\n");
    for (name, version) in &r.env.versions {
        let _ = writeln!(md, "- {name}: {version}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{load::Run, Environment, Plan};

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
}
