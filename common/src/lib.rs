//! The contract between the kernel programs (`wsgiscope-ebpf`) and the agent: everything both
//! sides must agree on is defined here, once.
//!
//! - [`events`]: the ring-buffer records, one struct per kind, each starting with its
//!   [`events::EventKind`].
//! - [`state`]: the per-connection and per-syscall state the kernel keeps in maps (the agent
//!   reads it for requests in progress and for those a dying worker left open).
//! - [`layout`]: names of programs and maps, tracepoint field offsets read at fixed places,
//!   register numbers, loss counters, the server names the daemon watches for.
//! - [`heads`]: what the kernel programs do with captured heads: find a request head's end,
//!   tell a response head written alone, copy the kept bytes into a record (unit-tested here).
//!
//! Everything is `#[repr(C)]` plain data: the kernel writes the bytes, the agent reads them back.
#![no_std]

pub mod events;
pub mod heads;
pub mod layout;
pub mod state;
pub mod words;

pub use events::*;
pub use layout::*;
pub use state::*;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain old data of integers and byte arrays: every bit pattern is valid.
    unsafe impl aya::Pod for ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RequestAgg {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Pending {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Downstream {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ThreadReq {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GcStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TaskMark {}
}
