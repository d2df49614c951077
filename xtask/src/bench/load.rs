//! Load generators: wrk (Debian) at saturation, and clients of our own (one connection per
//! request, through `wsgiscope_devkit::http`) for a fixed request rate (open loop) and for an
//! exactly counted burst (closed loop).
use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use wsgiscope_devkit::http;

use super::stats::percentile;
use crate::group::check_stop;

/// One load run: completed requests, failures (errors, non-200), rate and latency percentiles.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Run {
    pub requests: u64,
    pub errors: u64,
    pub req_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// wrk's arguments for a saturation run (the URL follows); also printed in the report.
pub fn wrk_args(connections: usize, seconds: u64) -> Vec<String> {
    vec![
        "-t1".into(),
        format!("-c{connections}"),
        format!("-d{seconds}s"),
        "--latency".into(),
    ]
}

/// `wrk` against `http://addr{path}` for `seconds`, as many requests as the server takes.
pub fn wrk(addr: SocketAddr, path: &str, connections: usize, seconds: u64) -> Result<Run> {
    check_stop()?;
    let out = Command::new("wrk")
        .args(wrk_args(connections, seconds))
        .arg(format!("http://{addr}{path}"))
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

/// Reads what wrk --latency prints: `N requests in`, `Requests/sec:`, the 50 % and 99 % lines
/// of "Latency Distribution", socket errors and non-2xx/3xx responses.
pub fn parse_wrk(text: &str) -> Result<Run> {
    let mut run = Run::default();
    let (mut p50, mut p99, mut rate, mut count) = (None, None, None, None);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => p50 = Some(wrk_duration_ms(v)?),
            ["99%", v] => p99 = Some(wrk_duration_ms(v)?),
            ["Requests/sec:", v] => rate = Some(v.parse::<f64>()?),
            [n, "requests", "in", ..] => count = Some(n.parse::<u64>()?),
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for n in rest.iter().skip(1).step_by(2) {
                    run.errors += n.trim_end_matches(',').parse::<u64>()?;
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => run.errors += n.parse::<u64>()?,
            _ => {}
        }
    }
    run.p50_ms = p50.ok_or_else(|| anyhow!("no 50% latency line"))?;
    run.p99_ms = p99.ok_or_else(|| anyhow!("no 99% latency line"))?;
    run.req_per_s = rate.ok_or_else(|| anyhow!("no Requests/sec line"))?;
    run.requests = count.ok_or_else(|| anyhow!("no request count line"))?;
    Ok(run)
}

/// wrk prints durations as `812.00us`, `1.52ms`, `2.01s`, `1.00m`.
fn wrk_duration_ms(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| anyhow!("duration without unit: {v}"))?;
    let (number, unit) = v.split_at(split);
    let number: f64 = number.parse()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => bail!("unknown duration unit in {v}"),
    };
    Ok(number * scale)
}

/// Open loop at a fixed rate: request i is due at start + i/rate whatever happened before, and its
/// latency runs from that due time, so a stall delays the requests behind it and shows in the
/// percentiles (no coordinated omission). `threads` bounds requests in flight; it must exceed
/// rate × latency or requests start late (which then shows as latency, as it should).
pub fn paced(
    addr: SocketAddr,
    path: &str,
    rate: f64,
    duration: Duration,
    threads: usize,
) -> Result<Run> {
    check_stop()?;
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let next = AtomicU64::new(0);
    let run = collect(threads, |latencies, errors| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return;
        }
        let due = start + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        match http::get_status(addr, path) {
            Ok(200) => latencies.push(due.elapsed().as_secs_f64() * 1e3),
            _ => *errors += 1,
        }
    });
    Ok(finish(run, start))
}

/// Closed loop: `connections` clients, each sending its next request as soon as the previous one
/// is answered, for `duration`. Every request is counted exactly (no request is cut off at the end).
pub fn burst(addr: SocketAddr, path: &str, connections: usize, duration: Duration) -> Result<Run> {
    check_stop()?;
    let start = Instant::now();
    let end = start + duration;
    let run = collect(connections, |latencies, errors| {
        while Instant::now() < end {
            let t = Instant::now();
            match http::get_status(addr, path) {
                Ok(200) => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                _ => *errors += 1,
            }
        }
    });
    Ok(finish(run, start))
}

/// Runs `client` on `threads` threads; returns all latencies (ms), errors, and when the last ended.
fn collect(
    threads: usize,
    client: impl Fn(&mut Vec<f64>, &mut u64) + Sync,
) -> (Vec<f64>, u64, Instant) {
    let all: Mutex<(Vec<f64>, u64)> = Mutex::default();
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let (mut latencies, mut errors) = (Vec::new(), 0);
                client(&mut latencies, &mut errors);
                let mut all = all.lock().unwrap();
                all.0.extend(latencies);
                all.1 += errors;
            });
        }
    });
    let (latencies, errors) = all.into_inner().unwrap();
    (latencies, errors, Instant::now())
}

fn finish((mut latencies, errors, ended): (Vec<f64>, u64, Instant), start: Instant) -> Run {
    latencies.sort_by(f64::total_cmp);
    let seconds = ended.duration_since(start).as_secs_f64();
    Run {
        requests: latencies.len() as u64,
        errors,
        req_per_s: latencies.len() as f64 / seconds,
        p50_ms: percentile(&latencies, 0.5).unwrap_or(f64::NAN),
        p99_ms: percentile(&latencies, 0.99).unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://127.0.0.1:8000/hello
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.31ms  410.12us   9.87ms   80.12%
    Req/Sec     3.45k   120.00     3.60k    70.00%
  Latency Distribution
     50%    2.25ms
     75%    2.50ms
     90%    2.80ms
     99%  812.00us
  17250 requests in 5.00s, 2.53MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:   3449.87
Transfer/sec:    517.11KB
";

    #[test]
    fn parses_wrk_latency_output() {
        let run = parse_wrk(WRK).unwrap();
        assert_eq!(run.requests, 17250);
        assert_eq!(run.errors, 6);
        assert_eq!(run.req_per_s, 3449.87);
        assert_eq!(run.p50_ms, 2.25);
        assert!((run.p99_ms - 0.812).abs() < 1e-12);
    }

    #[test]
    fn wrk_output_without_latency_distribution_is_an_error() {
        assert!(parse_wrk("  100 requests in 1.00s, 1MB read\nRequests/sec: 100.0\n").is_err());
    }

    #[test]
    fn wrk_duration_units() {
        assert_eq!(wrk_duration_ms("1.50s").unwrap(), 1500.0);
        assert_eq!(wrk_duration_ms("2.00m").unwrap(), 120000.0);
        assert!(wrk_duration_ms("3.0").is_err());
    }
}
