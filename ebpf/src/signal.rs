//! Signals that end a worker from outside: SIGKILL (gunicorn after its graceful timeout, uWSGI
//! harakiri, the OOM killer, an operator) and SIGABRT (gunicorn's `--timeout`). The exit status
//! alone cannot tell them apart from a crash: gunicorn workers exit(1) on SIGABRT.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use wsgiscope_common::{signal_generate::{PID, SIG}, EventKind, SignalEvent};

use crate::{conn::now, events::emit, maps::root_of, tp::field};

#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    const SIGABRT: i32 = 6;
    const SIGKILL: i32 = 9;
    // Read at fixed offsets (the agent checks them in tracefs before attaching).
    let sig = field::<i32>(&ctx, SIG as usize);
    if sig != SIGKILL && sig != SIGABRT {
        return 0;
    }
    let pid = field::<u32>(&ctx, PID as usize);
    if let Some(root) = root_of(pid) {
        emit(&SignalEvent { kind: EventKind::Signal as u32, tgid: pid, signal: sig as u32, root, ts_ns: now() });
    }
    0
}
