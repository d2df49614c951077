//! BENCHMARKS.md from the results: targets first (pass or miss, never adjusted, `targets.rs`),
//! then each part's table (`sections.rs`, from the figures of `figures.rs`), the exact commands
//! and the versions.
mod figures;
pub(super) mod kernel;
mod sections;
mod targets;
#[cfg(test)]
mod tests;

use std::fmt::Write;

use super::{load, micro::EMPTY_PROBES, overhead::ROUTES, procs, Results};
use crate::group::REDIS_ARGS;

pub fn render(r: &Results) -> String {
    let mut md = String::new();
    header(&mut md, r);
    targets::targets(&mut md, r);
    sections::overhead(&mut md, r);
    sections::agent_counts(&mut md, &r.overhead);
    sections::probes(&mut md, r);
    sections::capacity(&mut md, &r.capacity);
    super::views::section(&mut md, &r.views);
    super::memory::section(&mut md, &r.memory);
    let blocks_cpu = |config| figures::added_cpu_us(&r.overhead, "/blocks", super::overhead::Load::Saturation, config);
    let hooks_us = blocks_cpu(super::overhead::Config::Hooks);
    let cpu = blocks_cpu(super::overhead::Config::Wsgiscope)
        .zip(blocks_cpu(super::overhead::Config::Timing))
        .map(|(wsgiscope_us, timing_us)| kernel::MiddlewareCpu { wsgiscope_us, timing_us, hooks_us });
    kernel::section(&mut md, &r.kernel, cpu);
    commands(&mut md, r);
    versions(&mut md, r);
    md
}

/// Replaces the section that starts with `head` (e.g. "\n## 4. Live views") in an existing
/// report, or puts it before the exact commands (or at the end): what `--only PART` writes.
pub(super) fn splice(report: &str, head: &str, section_md: &str) -> String {
    if let Some(start) = report.find(head) {
        let rest = &report[start + head.len()..];
        let end = rest.find("\n## ").map_or(report.len(), |i| start + head.len() + i);
        return format!("{}{}{}", &report[..start], section_md, &report[end..]);
    }
    match report.find("\n## Exact commands") {
        Some(at) => format!("{}{}{}", &report[..at], section_md, &report[at..]),
        None => format!("{report}{section_md}"),
    }
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
    let _ = writeln!(
        md,
        "- BPF run-time counting (`kernel.bpf_stats_enabled`) off, the kernel's default, for every run \
         but section 6's, which turns it on for its own (it was {} before the bench). While on, every \
         program run pays two clock reads and a counter update.",
        if e.bpf_stats_before.is_empty() { "?" } else { e.bpf_stats_before.as_str() }
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

pub(super) fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "**miss**"
    }
}

pub(super) fn percent(x: f64) -> String {
    if x.is_finite() {
        format!("{:+.1} %", 100.0 * x)
    } else {
        "-".into()
    }
}

pub(super) fn num(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".into(),
    }
}

/// A difference with its sign ("+12.3"), or "-".
pub(super) fn signed(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:+.decimals$}"),
        _ => "-".into(),
    }
}

/// "pass" when the whole measured value meets the bound; a missing value is a miss.
pub(super) fn at_most(value: Option<f64>, max: f64) -> &'static str {
    verdict(value.is_some_and(|v| v <= max))
}

fn commands(md: &mut String, r: &Results) {
    let p = &r.plan;
    let _ = writeln!(md, "\n## Exact commands\n");
    let _ = writeln!(md, "```sh");
    let _ = writeln!(
        md,
        "cargo xtask bench{}\nsysctl kernel.bpf_stats_enabled=0   # for the whole bench; then the previous value",
        if p.quick { " --quick" } else { "" }
    );
    // An empty argument (`--save ""`) must stay one in the shell.
    let redis_args: Vec<&str> = REDIS_ARGS
        .iter()
        .map(|a| if a.is_empty() { "''" } else { a })
        .collect();
    let _ = writeln!(
        md,
        "# the Redis the /redis route calls (RPORT = a free loopback port):\n\
         redis-server --port RPORT {} --dir target/xtask-bench",
        redis_args.join(" ")
    );
    let _ = writeln!(
        md,
        "# the server (PORT = a free loopback port; the middlewares under /timing/ and /prometheus/ for the overhead runs, `none` for the other sections):"
    );
    let _ = writeln!(
        md,
        "WSGISCOPE_BENCH_MIDDLEWARE=all|none WSGISCOPE_BENCH_LOOP=target/debug/xtask \\\n  \
         TESTAPP_REDIS=redis://127.0.0.1:RPORT/0 \\\n  \
         [PROMETHEUS_MULTIPROC_DIR=target/xtask-bench/prometheus-multiproc] \\\n  \
         {}",
        procs::gunicorn_spec("127.0.0.1:PORT", "tests/apps").shell_line()
    );
    let _ = writeln!(md, "target/release/wsgiscope attach --pid <gunicorn master pid> --listen 127.0.0.1:<free port>");
    let _ = writeln!(
        md,
        "# the floor of the agent's hooks (section 1's do-nothing programs):\nbpftrace -e '{}'",
        super::overhead::do_nothing_program(&r.overhead.hooks)
    );
    let _ = writeln!(md, "# saturation (calibration: -d{}s):", p.calibrate_secs);
    let _ = writeln!(
        md,
        "wrk {} 'http://127.0.0.1:PORT{}'   # and {}; each also under /timing and /prometheus (e.g. /timing{})",
        load::wrk_args(p.wrk_connections, p.run_secs).join(" "),
        ROUTES[0],
        ROUTES[1..].join(", "),
        ROUTES[1]
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
        "target/debug/xtask bench-loop --mode tcp|unix|getppid|switch --iters {}   # untraced: started by xtask\n\
         bpftrace -e '{EMPTY_PROBES}'   # the empty probes, for the untraced loops\n\
         target/debug/xtask bench-hooks --secs 60   # the empty BTF hooks (ebpf/src/bench_hooks.rs), for the untraced loops",
        p.micro_iters
    );
    let _ = writeln!(
        md,
        "# capacity: {} × GET /bytes1, then /hello closed loop, {} connections, {} s (bench/load.rs `burst`)",
        p.bytes1_requests, p.burst_connections, p.burst_secs
    );
    let _ = writeln!(
        md,
        "# kernel programs: {} round(s) of wrk -d{}s on /hello and /blocks and the write loops above (the traced\n\
         # one twice: then again with the agent restarted with --no-cpu-time, and back), with\n\
         sysctl kernel.bpf_stats_enabled=1   # during the rounds only; then the previous value\n\
         bpftrace -e '{}'\n\
         bpftool prog show -j   # before and after each run\n\
         # the bench's probes (ebpf/src/bench_emit.rs, ebpf/src/bench_write.rs) loaded by xtask beside the agent\n\
         # then, the counting off, {} cycles of: wrk -t1 -c{} -d{}s on /blocks (app alone), then /timing/blocks,\n\
         # /blocks with the agent attached and /blocks under section 1's do-nothing bpftrace programs (in an\n\
         # order that rotates), then /blocks alone again; workers' CPU from /proc/PID/schedstat",
        p.kernel_rounds,
        p.kernel_secs,
        super::kernel::floor_program(),
        p.blocks_cycles,
        p.wrk_connections,
        p.blocks_secs,
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
