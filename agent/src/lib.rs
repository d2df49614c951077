//! wsgiscope: an eBPF profiler for pre-forked Python WSGI servers.
//!
//! One request's way, module by module, each using only those before it:
//! the kernel programs (`ebpf/`) aggregate it per connection and emit one record, in the shapes
//! `wsgiscope_common` defines → `record` decodes it → `reconstruct` parses it into a typed
//! request → `session` (one watched server) adds what it knows of the process and hands it to
//! `aggregate`, which updates the series that `metrics` declares (label values are
//! `labels::Value`, escaped when written; routes from `route` under `route_cap`) → `export`
//! serves /metrics.
//!
//! Around it: `commands` (attach, run, daemon) set up `kernel` (load, attach, maps) and run the
//! `collect` loop; `discover` finds servers, workers and services (`server` holds what is known
//! of each server kind), `python` the interpreter's GC probe points, `k8s` pod labels, `sockets`
//! the downstream connections a worker opened before the agent attached; `slots`,
//! `exits` and `kernel_stats` are the aggregator's worker slots, exit causes and the kernel's
//! own counters; `cli` is the command line. `top` is a client: a terminal view of the live API
//! (`views::api`) that a running agent serves.
pub mod aggregate;
pub mod cli;
pub mod collect;
pub mod commands;
pub mod discover;
pub mod downstream;
pub mod exits;
pub mod export;
pub mod k8s;
pub mod kernel;
pub mod kernel_stats;
pub mod labels;
pub mod memory;
pub mod metrics;
pub mod python;
pub mod reconstruct;
pub mod record;
pub mod route;
pub mod route_cap;
pub mod server;
pub mod session;
pub mod slots;
pub mod sockets;
pub mod top;
pub mod views;
