//! Apache 2.4 (Debian's) with mod_wsgi in daemon mode.
use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use super::{app_copy, Server, TRUTH_FILE};
use crate::free_port;

impl Server {
    /// Apache 2.4 (mpm_event, one child) with mod_wsgi in daemon mode: `processes` daemons of
    /// 4 threads in process group `testapp`, fed by Apache over UNIX sockets.
    pub fn apache_modwsgi(processes: u32) -> Result<Self> {
        Self::apache_modwsgi_named("testapp", processes)
    }

    /// Apache + mod_wsgi with daemon process group `group` (the service name).
    pub fn apache_modwsgi_named(group: &str, processes: u32) -> Result<Self> {
        // Daemons run as www-data: give them a copy of the app and a log they may write.
        let dir = app_copy("apache", "testapp")?;
        let d = dir.0.display().to_string();
        let truth = dir.0.join(TRUTH_FILE);
        std::fs::write(&truth, "")?;
        std::fs::set_permissions(&truth, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        let port = free_port();
        let conf = format!(
            "ServerRoot /etc/apache2\nDefaultRuntimeDir {d}\nPidFile {d}/httpd.pid\nMutex file:{d} default\n\
             ErrorLog {d}/error.log\nLogLevel warn\nListen 127.0.0.1:{port}\nServerName localhost\n\
             User www-data\nGroup www-data\n\
             LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so\n\
             LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so\n\
             LoadModule wsgi_module /usr/lib/apache2/modules/mod_wsgi.so\n\
             StartServers 1\nServerLimit 1\nThreadsPerChild 4\nMaxRequestWorkers 4\n\
             WSGISocketPrefix {d}/wsgi\n\
             WSGIDaemonProcess {group} processes={processes} threads=4 display-name=%{{GROUP}} python-path={d}\n\
             WSGIScriptAlias / {d}/testapp.py process-group={group} application-group=%{{GLOBAL}}\n\
             WSGICallableObject app\n\
             <Directory {d}>\n  Require all granted\n</Directory>\n"
        );
        std::fs::write(dir.0.join("httpd.conf"), conf)?;
        if !Path::new("/usr/lib/apache2/modules/mod_wsgi.so").exists() {
            bail!("mod_wsgi missing: run `cargo xtask setup` (it installs apache2 and libapache2-mod-wsgi-py3)");
        }
        let mut cmd = Command::new("/usr/sbin/apache2");
        cmd.args(["-f", &format!("{d}/httpd.conf"), "-DFOREGROUND"]);
        Self::spawn(cmd, port, port, dir)
    }
}
