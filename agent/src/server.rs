//! The WSGI servers wsgiscope knows, and the facts about each that parsing, discovery and exit
//! classification share.
use std::fmt;

use wsgiscope_common::SERVER_COMMS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Gunicorn,
    Uwsgi,
    ModWsgi,
}

impl ServerKind {
    /// The server a process name (comm) belongs to: the names the kernel's exec watch uses.
    pub fn from_comm(comm: &str) -> Option<Self> {
        const _: () = assert!(SERVER_COMMS.len() == 4);
        match SERVER_COMMS.iter().position(|c| *c == comm)? {
            0 => Some(ServerKind::Gunicorn),
            1 => Some(ServerKind::Uwsgi),
            _ => Some(ServerKind::ModWsgi), // apache2, httpd
        }
    }

    /// Is a worker's exit code one its master asked for (a recycle, not a crash)? 0 always;
    /// uWSGI also exits on purpose with its own codes (uwsgi.h): 15 go cheap, 17 reload
    /// (SIGHUP), 29 quiet, 30 end (stop, brutal reload, `--cheaper` scale-down, master gone).
    /// A uWSGI crash exits 1 (its SIGSEGV handler too) or with the application's code.
    pub fn is_clean_exit(self, code: i32) -> bool {
        code == 0 || (self == ServerKind::Uwsgi && [15, 17, 29, 30].contains(&code))
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::Gunicorn => "gunicorn",
            ServerKind::Uwsgi => "uwsgi",
            ServerKind::ModWsgi => "mod_wsgi",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_names() {
        assert_eq!(ServerKind::from_comm("gunicorn"), Some(ServerKind::Gunicorn));
        assert_eq!(ServerKind::from_comm("uwsgi"), Some(ServerKind::Uwsgi));
        assert_eq!(ServerKind::from_comm("httpd"), Some(ServerKind::ModWsgi));
        assert_eq!(ServerKind::from_comm("python3"), None);
    }

    #[test]
    fn clean_exits() {
        assert!(ServerKind::Gunicorn.is_clean_exit(0));
        assert!(!ServerKind::Gunicorn.is_clean_exit(30));
        assert!(ServerKind::Uwsgi.is_clean_exit(17) && ServerKind::Uwsgi.is_clean_exit(30));
        assert!(!ServerKind::Uwsgi.is_clean_exit(1));
    }
}
