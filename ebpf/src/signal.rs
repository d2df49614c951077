//! Signals that end a worker from outside: SIGKILL (gunicorn after its graceful timeout, uWSGI
//! harakiri, the OOM killer, an operator) and SIGABRT (gunicorn's `--timeout`). The exit status
//! alone cannot tell them apart from a crash: gunicorn workers exit(1) on SIGABRT.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use wsgiscope_common::EVENT_SIGNAL;

use crate::{maps::root_of, process::emit, syscall::field};

/// signal:signal_generate field offsets (stable since 4.x; the agent checks them in tracefs).
const SIG_OFFSET: usize = 8;
const PID_OFFSET: usize = 36;

#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    const SIGABRT: i32 = 6;
    const SIGKILL: i32 = 9;
    let sig = field::<i32>(&ctx, SIG_OFFSET);
    if sig != SIGKILL && sig != SIGABRT {
        return 0;
    }
    let pid = field::<u32>(&ctx, PID_OFFSET);
    if let Some(root) = root_of(pid) {
        emit(EVENT_SIGNAL, pid, sig as u32, root, 0);
    }
    0
}
