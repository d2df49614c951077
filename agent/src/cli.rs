//! Command line.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::{
    aggregate::{Options, DEFAULT_MAX_OPERATIONS, DEFAULT_MAX_ROUTES, DEFAULT_REPEATED_CALLS},
    metrics::{BucketConfig, BLOCK_BUCKETS, BYTE_BUCKETS, LATENCY_BUCKETS},
    route::Templates,
    views::{requests::DEFAULT_KEPT, Views},
};

#[derive(Parser, Debug)]
#[command(name = "wsgiscope", version, about = "eBPF profiler for pre-forked Python WSGI servers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to a running server (master or worker PID) and export its requests to Prometheus.
    Attach(AttachArgs),
    /// Start a server with wsgiscope attached before its first request; exit with its exit code.
    Run(RunArgs),
    /// Node-wide: discover every WSGI server running now or started later, attach to each.
    Daemon(DaemonArgs),
    /// Live view of a running agent in the terminal: its workers and routes, read from its API.
    Top(TopArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// The agent to read: its --listen address.
    #[arg(long, default_value = "http://127.0.0.1:9464")]
    pub url: String,
    /// Exit with status 2 once the agent has not answered for this many seconds (0: keep
    /// retrying).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub exit_after: f64,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS", value_parser = parse_interval)]
    pub interval: f64,
}

#[derive(Args, Debug, Clone)]
pub struct AttachArgs {
    /// PID of the server's master or of one of its workers.
    #[arg(long)]
    pub pid: u32,
    /// Value of the `service` label (default: the app module from the master's command line).
    #[arg(long, value_parser = parse_service)]
    pub service: Option<String>,
    #[command(flatten)]
    pub export: ExportArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Value of the `service` label (default: the app module from the server's command line).
    #[arg(long, value_parser = parse_service)]
    pub service: Option<String>,
    #[command(flatten)]
    pub export: ExportArgs,
    /// The server command, after `--`: e.g. `-- gunicorn -w 4 myapp.wsgi:application`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub export: ExportArgs,
}

/// How the requests are exported: the same options for every subcommand.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// Address for the Prometheus endpoint (/metrics).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// Also label the per-request series with the worker slot (more series).
    #[arg(long)]
    pub per_worker: bool,
    /// Distinct routes kept per service; the rest are reported as route="other".
    #[arg(long, default_value_t = DEFAULT_MAX_ROUTES)]
    pub max_routes: usize,
    /// Distinct downstream operations (SQL templates, Redis commands…) and peers kept per
    /// service; the rest are reported as operation="other" / peer="other".
    #[arg(long, default_value_t = DEFAULT_MAX_OPERATIONS)]
    pub max_operations: usize,
    /// A request that makes at least this many downstream calls of one operation is counted
    /// in wsgi_repeated_call_requests_total (N+1 queries).
    #[arg(long, default_value_t = DEFAULT_REPEATED_CALLS, value_parser = clap::value_parser!(u64).range(2..))]
    pub repeated_calls: u64,
    /// Route templates, one per line (e.g. `/users/{id}/posts`); they take precedence over the
    /// automatic normalisation of ids, UUIDs and tokens.
    #[arg(long, value_name = "FILE")]
    pub routes: Option<PathBuf>,
    /// Upper bounds of the latency buckets in seconds, comma-separated (e.g. 0.005,0.05,0.5).
    #[arg(long, value_name = "LIST", value_parser = parse_buckets)]
    pub latency_buckets: Option<BucketList>,
    /// Upper bounds of the blocks-per-response buckets, comma-separated.
    #[arg(long, value_name = "LIST", value_parser = parse_buckets)]
    pub blocks_buckets: Option<BucketList>,
    /// Upper bounds of the bytes-per-response buckets, comma-separated.
    #[arg(long, value_name = "LIST", value_parser = parse_buckets)]
    pub bytes_buckets: Option<BucketList>,
    /// The live views on the same address: the page at `/` and the JSON API under `/api/`
    /// (every recent request, what each worker does now, routes over the last minute).
    /// `off` serves /metrics only.
    #[arg(long, value_enum, default_value_t = Ui::On)]
    pub ui: Ui,
    /// Requests kept per service for the live views (the newest; older ones are dropped).
    #[arg(long, default_value_t = DEFAULT_KEPT as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub ui_requests: u64,
    /// Seconds between reads of each worker's and master's /proc/PID/smaps_rollup
    /// (wsgi_worker_memory_bytes); `0` or `off` reads none. A read walks the process's page
    /// tables, off the request path.
    #[arg(long, default_value = "10", value_name = "SECONDS", value_parser = parse_period)]
    pub memory_every: Period,
    /// Do not measure each request's CPU time (wsgi_request_cpu_seconds,
    /// wsgi_worker_cpu_seconds_total, the live views' cpu_time and on_cpu): the kernel programs
    /// then read no thread's CPU clock, at a request's start nor at each of its response writes.
    #[arg(long)]
    pub no_cpu_time: bool,
}

/// A period that can be turned off (`None`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Period(pub Option<Duration>);

/// `10`, `2.5s`, `0` or `off`; at least 0.1 s when on.
fn parse_period(s: &str) -> Result<Period> {
    if s == "off" {
        return Ok(Period(None));
    }
    let secs = parse_seconds(s.strip_suffix('s').unwrap_or(s))?;
    match secs {
        0.0 => Ok(Period(None)),
        v if v >= 0.1 => Ok(Period(Some(Duration::from_secs_f64(v)))),
        _ => bail!("read at most every 0.1 s (or `off`)"),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ui {
    On,
    Off,
}

impl ExportArgs {
    pub fn options(&self) -> Result<Options> {
        let templates = match &self.routes {
            Some(path) => Templates::load(path)?,
            None => Templates::default(),
        };
        Ok(Options {
            per_worker: self.per_worker,
            max_routes: self.max_routes,
            max_operations: self.max_operations,
            repeated_calls: self.repeated_calls,
            templates,
        })
    }

    /// The live views, unless `--ui off`.
    pub fn views(&self) -> Option<Arc<Views>> {
        (self.ui == Ui::On).then(|| Arc::new(Views::new(self.ui_requests as usize)))
    }

    pub fn buckets(&self) -> BucketConfig {
        let pick = |v: &Option<BucketList>, default: &[f64]| v.as_ref().map_or_else(|| default.to_vec(), |b| b.0.clone());
        BucketConfig {
            latency: pick(&self.latency_buckets, LATENCY_BUCKETS),
            blocks: pick(&self.blocks_buckets, BLOCK_BUCKETS),
            bytes: pick(&self.bytes_buckets, BYTE_BUCKETS),
        }
    }
}

/// A bucket list from the command line. A type of its own: clap takes an `Option<Vec<_>>`
/// field for a list of separate values, and would panic on a parser that returns a whole list.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketList(pub Vec<f64>);

/// `0.005,0.01,0.1` → increasing positive bucket bounds.
fn parse_buckets(s: &str) -> Result<BucketList> {
    let bounds: Vec<f64> = s
        .split(',')
        .map(|b| b.trim().parse::<f64>().map_err(|_| anyhow::anyhow!("{b:?} is not a number")))
        .collect::<Result<_>>()?;
    if bounds.is_empty() || bounds.iter().any(|b| !b.is_finite() || *b <= 0.0) {
        bail!("bucket bounds must be positive numbers, e.g. 0.005,0.05,0.5");
    }
    if bounds.windows(2).any(|w| w[0] >= w[1]) {
        bail!("bucket bounds must increase, e.g. 0.005,0.05,0.5");
    }
    Ok(BucketList(bounds))
}

/// A number of seconds, 0 or more.
fn parse_seconds(s: &str) -> Result<f64> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1e9).contains(&v) => Ok(v),
        _ => bail!("{s:?} is not a number of seconds (0 or more)"),
    }
}

/// A refresh interval: at least 0.1 s.
fn parse_interval(s: &str) -> Result<f64> {
    match parse_seconds(s)? {
        v if v >= 0.1 => Ok(v),
        _ => bail!("refresh at most every 0.1 s"),
    }
}

/// Longest `--service` accepted.
const MAX_SERVICE_LEN: usize = 128;

/// A `--service` name: printable text of at most 128 characters (it is a label value on every
/// series; escaping keeps any text safe, but a name nobody can type in a query is a mistake).
fn parse_service(s: &str) -> Result<String> {
    if s.trim().is_empty() {
        bail!("the service name is empty: give a name such as --service shop");
    }
    if s.chars().count() > MAX_SERVICE_LEN {
        bail!("the service name is {} characters long; at most {MAX_SERVICE_LEN} are allowed", s.chars().count());
    }
    if s.chars().any(char::is_control) {
        bail!("the service name {s:?} holds control characters (newline, tab, …): use printable text");
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_lists_are_checked() {
        assert_eq!(parse_buckets("0.005, 0.05,1").unwrap(), BucketList(vec![0.005, 0.05, 1.0]));
        assert!(parse_buckets("0.1,0.05").is_err());
        assert!(parse_buckets("a,b").is_err());
        assert!(parse_buckets("0,1").is_err());
    }

    #[test]
    fn bucket_flags_parse_through_clap() {
        let cli = Cli::try_parse_from([
            "wsgiscope", "attach", "--pid", "1", "--latency-buckets", "0.01,0.1,1", "--blocks-buckets", "1,10",
            "--bytes-buckets", "1000,1e6",
        ])
        .unwrap();
        let Command::Attach(a) = cli.command else { panic!("not attach") };
        let b = a.export.buckets();
        assert_eq!(b.latency, [0.01, 0.1, 1.0]);
        assert_eq!(b.blocks, [1.0, 10.0]);
        assert_eq!(b.bytes, [1000.0, 1e6]);
        let err = Cli::try_parse_from(["wsgiscope", "attach", "--pid", "1", "--latency-buckets", "1,0.5"]).unwrap_err();
        assert!(err.to_string().contains("must increase"), "{err}");
    }

    #[test]
    fn the_memory_period_parses_and_turns_off() {
        let every = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["wsgiscope", "attach", "--pid", "1"], args].concat()).unwrap();
            let Command::Attach(a) = cli.command else { panic!("not attach") };
            a.export.memory_every.0
        };
        assert_eq!(every(&[]), Some(Duration::from_secs(10)));
        assert_eq!(every(&["--memory-every", "2.5s"]), Some(Duration::from_millis(2500)));
        assert_eq!(every(&["--memory-every", "0"]), None);
        assert_eq!(every(&["--memory-every", "off"]), None);
        assert!(parse_period("0.01").is_err());
        assert!(parse_period("-1").is_err());
        assert!(parse_period("soon").is_err());
    }

    #[test]
    fn service_names_are_checked() {
        assert_eq!(parse_service("shop \"eu\"").unwrap(), "shop \"eu\"");
        assert!(parse_service("").is_err());
        assert!(parse_service("a\nb").is_err());
        assert!(parse_service(&"x".repeat(129)).is_err());
    }

    #[test]
    fn run_takes_the_server_command_after_dashes() {
        let cli = Cli::try_parse_from(["wsgiscope", "run", "--service", "shop", "--", "gunicorn", "-w", "2", "app:app"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.command, ["gunicorn", "-w", "2", "app:app"]);
        assert_eq!(run.service.as_deref(), Some("shop"));
        assert!(Cli::try_parse_from(["wsgiscope", "run"]).is_err());
    }

    #[test]
    fn top_reads_the_default_listen_address() {
        let cli = Cli::try_parse_from(["wsgiscope", "top"]).unwrap();
        let Command::Top(top) = cli.command else { panic!("not top") };
        assert_eq!(top.url, "http://127.0.0.1:9464");
        assert_eq!((top.exit_after, top.interval), (5.0, 1.0));
        let cli = Cli::try_parse_from(["wsgiscope", "top", "--url", "10.0.0.1:9", "--exit-after", "0"]).unwrap();
        let Command::Top(top) = cli.command else { panic!("not top") };
        assert_eq!((top.url.as_str(), top.exit_after), ("10.0.0.1:9", 0.0));
        assert!(Cli::try_parse_from(["wsgiscope", "top", "--interval", "0"]).is_err());
        assert!(Cli::try_parse_from(["wsgiscope", "top", "--exit-after", "-1"]).is_err());
    }
}
