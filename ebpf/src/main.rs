//! Kernel side of wsgiscope: syscall tracepoints → per-(tgid, fd) connection state →
//! per-request aggregate → one ring-buffer record per request.
//!
//! Modules follow the hook families: `process` (fork/exit: which processes are traced),
//! `accept` (which sockets are connections), `read` (request start and request bytes),
//! `write` (response writes), `close` (close and shutdown end a request), `tcp` (handshakes
//! completed, for the accept-queue wait), `signal` (workers killed from outside), `python`
//! (CPython garbage collections, by uprobe).
//! `downstream` (calls to databases, caches and HTTP services on sockets the worker connected),
//! `threads` (what each serving thread serves, and a request's CPU time, read off its thread's
//! clock: `cpu_clock`),
//! `memory` (the process's resident pages at a request's start and end).
//! `conn` holds the connection-state helpers they share, `maps` the maps, `events` every write
//! to the ring buffer; `tp` reads tracepoint records, `user` the traced process's memory,
//! `pending` remembers a syscall from its enter to its exit (across context switches), `sniff` recognises HTTP bytes,
//! `steal` reads the time the hypervisor took from a CPU (left out of CPU clocks).
//! What both sides agree on (records, state, names, offsets) is in `wsgiscope_common`.
#![no_std]
#![no_main]

mod accept;
mod close;
mod conn;
mod cpu_clock;
mod downstream;
mod events;
mod maps;
mod memory;
mod pending;
mod process;
mod python;
mod read;
mod runtime;
mod signal;
mod sniff;
mod steal;
mod tcp;
mod threads;
mod tp;
mod user;
mod write;
