//! The sections of the three parts: overhead on gunicorn, probe cost per syscall, capacity.
use std::fmt::Write;

use super::{
    super::{
        capacity::{Capacity, BYTES1_BLOCKS},
        micro::{Mode, Placement, State, BATCH, CASES, EMPTY_PROBES, WRITE_SIZE},
        overhead::{
            route_description, Config, Load, Measurement, Overhead, CONFIGS, REDIS_CALLS,
            REDIS_LABEL, REDIS_ROUTE, ROUTES,
        },
        stats::median,
        Results,
    },
    figures::{
        added_cpu_per_call_us, added_cpu_us, cpu_cost, cpu_per_1k, median_of, probe_cost,
        hook_kind_floors, probe_median, redis_calls_exact, saturation_cost, scheduler_cost,
    },
    num, percent, signed,
    targets::BURST_RATE_GOAL,
};

pub(super) fn overhead(md: &mut String, r: &Results) {
    let o = &r.overhead;
    let _ = writeln!(md, "\n## 1. Overhead on gunicorn\n");
    let _ = writeln!(
        md,
        "gunicorn sync, 2 workers, serving `tests/apps/benchapp.py` (the test app's routes; \
         {REDIS_ROUTE} makes {REDIS_CALLS} GETs on a connection each worker opened at start to a \
         redis-server the bench runs on loopback, without persistence). Five configurations, each \
         round running all five in an order rotated by one per round; {} round(s) of {} s per run; every number is the median over rounds. \
         All five run on one server, the same two worker processes: the middlewares wrap the app for \
         requests under `/timing/` and `/prometheus/` (the prefix taken off the path, as a WSGI mount \
         does), and \"app + wsgiscope\" is the app alone with the agent attached for that block of the \
         round (and detached otherwise, so its probes never run during the other configurations). \
         \"app + do-nothing programs\" is the app alone with bpftrace attached for its block, running a \
         program that does nothing on each of the {} tracepoints the agent attaches to (read from the \
         agent's eBPF object; the command is under Exact commands): what any programs on those hooks \
         cost the workers before they do anything, the floor under wsgiscope's row. (The agent's \
         uprobes, which run at the start and end of the interpreter's garbage collections, are not \
         in it.) On this shared host a process can run its whole life faster or slower than another, so \
         configurations on separate servers differed by more than what they measure.\n",
        r.plan.rounds, r.plan.run_secs, o.hooks.len()
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
        let _ = writeln!(md, "\n### {route} ({})\n", route_description(route));
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
        if route == REDIS_ROUTE {
            redis_costs(md, o);
        }
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

/// The DB-heavy route: worker CPU per request and what each configuration adds to it, per request
/// and (wsgiscope, which follows every call) per downstream call; and the agent's call count.
fn redis_costs(md: &mut String, o: &Overhead) {
    let calls = f64::from(REDIS_CALLS);
    let _ = writeln!(
        md,
        "\nWorker CPU per request and per Redis call. Added = workers' CPU µs/request minus the app \
         alone's (medians over rounds); per call = wsgiscope's added µs/request / {REDIS_CALLS}. \
         wsgiscope follows each call in the kernel (every write and read on the Redis connection \
         looks up the downstream map; one ring-buffer record per call); the middlewares do nothing \
         per call. The workers' CPU includes the BPF programs run in their syscalls; the scheduler \
         program runs at every context switch (each GET blocks the worker), see section 2 for its \
         cost per switch.\n"
    );
    let _ = writeln!(
        md,
        "| configuration | saturation: workers' CPU µs/request | added µs/request | added µs/call | fixed rate: workers' CPU µs/request | added µs/request | added µs/call |\n|---|---|---|---|---|---|---|"
    );
    for config in CONFIGS {
        let mut row = format!("| {} |", config.label());
        for load in [Load::Saturation, Load::Fixed] {
            let cpu = median_of(o, REDIS_ROUTE, load, config, |m| m.worker_cpu_us);
            let (added, per_call) = match config {
                Config::Alone => ("-".to_string(), "-".to_string()),
                Config::Wsgiscope => (
                    signed(added_cpu_us(o, REDIS_ROUTE, load, config), 0),
                    signed(added_cpu_per_call_us(o, load), 1),
                ),
                _ => (
                    signed(added_cpu_us(o, REDIS_ROUTE, load, config), 0),
                    "-".to_string(),
                ),
            };
            let _ = write!(row, " {} | {added} | {per_call} |", num(cpu, 0));
        }
        let _ = writeln!(md, "{row}");
    }
    let agent_per_call = median_of(o, REDIS_ROUTE, Load::Saturation, Config::Wsgiscope, |m| {
        m.agent_cpu_us.unwrap_or(f64::NAN) / calls
    });
    let _ =
        writeln!(
        md,
        "\nThe agent's own CPU per Redis call at saturation: {} µs. Over all wsgiscope blocks it \
         counted {} {REDIS_LABEL} requests and {} downstream calls on them \
         (`wsgi_request_downstream_calls_sum{{route=\"{REDIS_LABEL}\"}}`), {} per request: {}.",
        num(agent_per_call, 2),
        o.redis_counted,
        o.redis_calls_counted,
        num((o.redis_counted > 0.0).then(|| o.redis_calls_counted / o.redis_counted), 2),
        if redis_calls_exact(o) {
            format!("exactly {REDIS_CALLS}, as sent")
        } else {
            format!("**not {REDIS_CALLS} as sent**")
        }
    );
}

pub(super) fn agent_counts(md: &mut String, o: &Overhead) {
    let _ = writeln!(
        md,
        "\nOver all wsgiscope blocks the agent counted {} requests; the clients saw {} answered (wrk \
         may leave one request per connection in flight when it stops, which the server still \
         answers); lost events: {}.",
        o.agent_counted, o.client_completed, o.agent_lost_events
    );
}

pub(super) fn probes(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "\n## 2. Probe cost per syscall and per context switch\n"
    );
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
         is the floor that any program on these two tracepoints costs on this kernel, whatever it does.\n\
         - Empty BTF hooks: the other kind of hook a syscall passes, two programs that do nothing \
         on the BTF tracepoints `sys_enter` and `sys_exit` (tp_btf; `ebpf/src/bench_hooks.rs`, \
         attached by xtask), which run for every syscall of every process, hooked or not, and are \
         handed its registers instead of a record of its arguments.\n"
    );
    let _ = writeln!(
        md,
        "| process | fd | nothing attached ns/call | agent attached ns/call | agent cost ns/call | empty probes ns/call | empty-probe cost ns/call | empty BTF hooks ns/call | empty-BTF cost ns/call |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (placement, mode) in CASES.into_iter().filter(|&(_, m)| m != Mode::Switch) {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            match placement {
                Placement::Traced => "traced",
                Placement::Untraced => "untraced",
            },
            mode.name(),
            probe_cells(r, placement, mode),
        );
    }
    if !r.micro.iter().any(|s| s.state == State::EmptyProbes) {
        let _ = writeln!(md, "\n(bpftrace was not installed: no empty-probe floor.)");
    }
    hook_kinds(md, r);
    switches(md, r);
}

/// A loop's cells: nothing attached, agent attached, agent cost, empty probes, their cost.
fn probe_cells(r: &Results, placement: Placement, mode: Mode) -> String {
    [
        probe_median(&r.micro, placement, mode, State::Nothing),
        probe_median(&r.micro, placement, mode, State::Agent),
        probe_cost(&r.micro, placement, mode, State::Agent),
        probe_median(&r.micro, placement, mode, State::EmptyProbes),
        probe_cost(&r.micro, placement, mode, State::EmptyProbes),
        probe_median(&r.micro, placement, mode, State::EmptyBtf),
        probe_cost(&r.micro, placement, mode, State::EmptyBtf),
    ]
    .map(|v| num(v, 1))
    .join(" | ")
}

/// The two kinds of hook side by side: what each costs a hooked syscall (the write) and any other
/// (getppid), and what that makes of a response written in 1000 blocks.
fn hook_kinds(md: &mut String, r: &Results) {
    let Some(k) = hook_kind_floors(&r.micro) else { return };
    let _ = writeln!(
        md,
        "\nThe floor of each kind of hook (untraced loops, do-nothing programs): the per-syscall \
         tracepoints cost a write they hook {} ns and a syscall they do not hook {} ns (getppid: \
         the traced syscall path alone); the BTF tracepoints cost every syscall alike, {} ns a \
         write and {} ns a getppid. Hooking on `sys_enter` and `sys_exit` would cost a hooked \
         syscall {} ns less and every other syscall of every process on the node {} ns more; on a \
         response written in 1000 blocks (the /blocks route: 1001 writes) the floor under the \
         writes alone would be {} µs instead of {} µs per request.",
        num(Some(k.tracepoint_hooked), 0),
        num(Some(k.tracepoint_other), 0),
        num(Some(k.btf_hooked), 0),
        num(Some(k.btf_other), 0),
        num(Some(k.tracepoint_hooked - k.btf_hooked), 0),
        num(Some(k.btf_other - k.tracepoint_other), 0),
        num(Some(k.btf_hooked * 1001.0 / 1000.0), 0),
        num(Some(k.tracepoint_hooked * 1001.0 / 1000.0), 0),
    );
}

/// The switch loop: what the scheduler program costs every context switch on the node.
fn switches(md: &mut String, r: &Results) {
    let _ = writeln!(md, "\n### Context switches (any process)\n");
    let _ = writeln!(
        md,
        "The agent's `sched:sched_switch` program runs at every context switch on the node, \
         whatever the process (two array lookups for a task wsgiscope does not trace). The `switch` loop \
         (untraced, started by xtask): two threads pinned to one CPU hand a token to each other \
         through a mutex and a condition variable, {} round trips in batches of {BATCH}, so every \
         hand-over is one context switch (the process's voluntary plus involuntary switches equal \
         its hand-overs); nanoseconds per hand-over in the median batch, fastest process and paired \
         differences as above. Each hand-over makes one or two futex calls, which any program on a \
         syscall tracepoint sends through the slower traced path (the getppid row): the empty \
         probes, which have no scheduler program, cost the loop that part alone, so the agent's \
         cost less theirs is what the scheduler program costs per switch.\n",
        r.plan.micro_iters
    );
    let (placement, mode) = (Placement::Untraced, Mode::Switch);
    let _ = writeln!(
        md,
        "| loop | nothing attached ns/hand-over | agent attached ns/hand-over | agent cost ns/hand-over | empty probes ns/hand-over | empty-probe cost ns/hand-over (traced syscall path) | empty BTF hooks ns/hand-over | empty-BTF cost ns/hand-over (its futex calls) |\n|---|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(md, "| untraced switch | {} |", probe_cells(r, placement, mode));
    let _ = writeln!(
        md,
        "\nsched_switch, per context switch of any process (agent cost − \
         empty-probe cost): **{} ns**.",
        num(scheduler_cost(&r.micro), 0)
    );
}

pub(super) fn capacity(md: &mut String, c: &Capacity) {
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
