//! Command line.
use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

use crate::aggregate::DEFAULT_MAX_ROUTES;

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
}

#[derive(Args, Debug, Clone)]
pub struct AttachArgs {
    /// PID of the server's master or of one of its workers.
    #[arg(long)]
    pub pid: u32,
    /// Address for the Prometheus endpoint (/metrics).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
    /// Value of the `service` label (default: the app module from the master's command line).
    #[arg(long)]
    pub service: Option<String>,
    /// Also label the per-request series with the worker slot (more series).
    #[arg(long)]
    pub per_worker: bool,
    /// Distinct routes kept per service; the rest are reported as route="other".
    #[arg(long, default_value_t = DEFAULT_MAX_ROUTES)]
    pub max_routes: usize,
}
