//! Why a worker exited, from the wait status its master reaped it with and the kill signals
//! sent to it.
use crate::server::ServerKind;

/// Why a worker exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Exited cleanly (exit 0, uWSGI's reload and stop codes, or stopped by
    /// SIGTERM/SIGINT/SIGQUIT/SIGHUP): max-requests, reload, scale-down.
    Recycled,
    /// SIGKILL or SIGABRT from outside: gunicorn `--timeout`, uWSGI harakiri, the OOM killer.
    Killed,
    /// Non-zero exit or a fatal signal of its own (SIGSEGV, …).
    Crashed,
}

impl ExitReason {
    pub const ALL: [ExitReason; 3] = [ExitReason::Recycled, ExitReason::Killed, ExitReason::Crashed];

    /// From the wait status the master reaped, and whether SIGKILL/SIGABRT was sent to it.
    pub fn classify(kind: ServerKind, status: i32, kill_signal_sent: bool) -> Self {
        if kill_signal_sent {
            return ExitReason::Killed;
        }
        if libc::WIFEXITED(status) {
            return if kind.is_clean_exit(libc::WEXITSTATUS(status)) { ExitReason::Recycled } else { ExitReason::Crashed };
        }
        match libc::WTERMSIG(status) {
            libc::SIGKILL => ExitReason::Killed,
            libc::SIGTERM | libc::SIGINT | libc::SIGQUIT | libc::SIGHUP => ExitReason::Recycled,
            _ => ExitReason::Crashed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Recycled => "recycled",
            ExitReason::Killed => "killed",
            ExitReason::Crashed => "crashed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_from_wait_status_and_signals() {
        let exited = |code: i32| code << 8;
        use ServerKind::{Gunicorn, Uwsgi};
        assert_eq!(ExitReason::classify(Gunicorn, exited(0), false), ExitReason::Recycled);
        assert_eq!(ExitReason::classify(Gunicorn, exited(1), false), ExitReason::Crashed);
        assert_eq!(ExitReason::classify(Gunicorn, exited(1), true), ExitReason::Killed); // gunicorn on SIGABRT
        assert_eq!(ExitReason::classify(Gunicorn, libc::SIGKILL, false), ExitReason::Killed);
        assert_eq!(ExitReason::classify(Gunicorn, libc::SIGTERM, false), ExitReason::Recycled);
        assert_eq!(ExitReason::classify(Gunicorn, libc::SIGSEGV | 0x80, false), ExitReason::Crashed);
        // uWSGI: reload 17, stop and scale-down 30; a segfault exits 1 through its handler.
        assert_eq!(ExitReason::classify(Uwsgi, exited(17), false), ExitReason::Recycled);
        assert_eq!(ExitReason::classify(Uwsgi, exited(30), false), ExitReason::Recycled);
        assert_eq!(ExitReason::classify(Uwsgi, exited(1), false), ExitReason::Crashed);
        assert_eq!(ExitReason::classify(Uwsgi, exited(3), false), ExitReason::Crashed);
        assert_eq!(ExitReason::classify(Gunicorn, exited(30), false), ExitReason::Crashed);
    }
}
