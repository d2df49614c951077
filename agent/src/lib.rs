//! wsgiscope: an eBPF profiler for pre-forked Python WSGI servers.
//!
//! One request's way, module by module: the kernel programs (ebpf/) aggregate it per
//! connection and emit one record; `collect` reads the record, `reconstruct` parses it into a
//! request, `aggregate` updates the series defined in `metrics`, `export` serves them.
//! `discover` finds the server and its workers, `attach` loads and attaches the probes,
//! `session` keeps the state of one watched server, `route` normalises paths, `k8s` finds pod
//! labels.
pub mod aggregate;
pub mod cli;
pub mod collect;
pub mod commands;
pub mod discover;
pub mod exits;
pub mod export;
pub mod k8s;
pub mod kernel;
pub mod kernel_stats;
pub mod labels;
pub mod metrics;
pub mod python;
pub mod reconstruct;
pub mod record;
pub mod route;
pub mod route_cap;
pub mod server;
pub mod session;
pub mod slots;
