//! Bench only, never loaded by the agent: two programs that do nothing, on the BTF tracepoints
//! `sys_enter` and `sys_exit`, which run for every syscall of every process and are handed its
//! registers. The agent hooks the per-syscall tracepoints instead (`syscalls:sys_enter_write`
//! and the like), which run only for the syscalls hooked but build a record of the arguments
//! each time. `cargo xtask bench` (section 2) times syscalls under this pair and under a
//! do-nothing pair on the write tracepoints: the floor of each kind of hook, on a hooked
//! syscall and on any other.
#![no_std]
#![no_main]

mod runtime;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(_ctx: BtfTracePointContext) -> i32 {
    0
}
