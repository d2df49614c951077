//! The three ways to run wsgiscope: `attach` to a running server, `run` one held at a gate
//! until the kernel traces it, `daemon` for every server on the node. Each sets up the kernel
//! side and the collector, then runs the shared loop (`collect`).
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use log::info;
use tokio::net::TcpListener;

use crate::{
    cli::{AttachArgs, DaemonArgs, ExportArgs, RunArgs},
    collect::{collect, Collector, Until, RESCAN_EVERY},
    discover::{self, Target},
    kernel::Kernel,
    metrics::Metrics,
};

async fn bind(export: &ExportArgs) -> Result<TcpListener> {
    TcpListener::bind(export.listen).await.with_context(|| {
        format!("cannot listen on {} for /metrics: choose another address with --listen", export.listen)
    })
}

/// `wsgiscope attach`: runs until SIGINT/SIGTERM or until the server's master exits.
pub async fn attach(args: AttachArgs) -> Result<()> {
    let options = args.export.options()?;
    let target = discover::find_target(args.pid, args.service.as_deref())?;
    let listener = bind(&args.export).await?;
    let (kernel, events) = Kernel::load(false, !args.export.no_cpu_time)?;
    let metrics = Arc::new(Metrics::with_buckets(&args.export.buckets()));
    let views = args.export.views();
    let mut c = Collector::new(&metrics, views.as_deref(), kernel, options, args.export.memory_every.0);
    c.watch(target)?;
    collect(c, events, listener, metrics.clone(), views.clone(), Until::MasterExits).await
}

/// `wsgiscope daemon`: every WSGI server on the node, now and later, until SIGINT/SIGTERM.
pub async fn daemon(args: DaemonArgs) -> Result<()> {
    let options = args.export.options()?;
    let listener = bind(&args.export).await?;
    let (kernel, events) = Kernel::load(true, !args.export.no_cpu_time)?;
    let metrics = Arc::new(Metrics::with_buckets(&args.export.buckets()));
    let views = args.export.views();
    let mut c = Collector::new(&metrics, views.as_deref(), kernel, options, args.export.memory_every.0);
    c.rescan();
    info!("daemon: watching {} servers; new ones are found at exec and by a /proc rescan every {RESCAN_EVERY:?}", c.watched());
    collect(c, events, listener, metrics.clone(), views.clone(), Until::Signal).await
}

/// `wsgiscope run -- SERVER…`: starts the server held at a gate (a shell waiting on a pipe)
/// until its PID is traced, so its very first fork and request are seen; returns its exit code.
pub async fn run(args: RunArgs) -> Result<i32> {
    let options = args.export.options()?;
    let argv0 = args.command.first().ok_or_else(|| anyhow!("no server command given after --"))?;
    let comm: String = argv0.rsplit('/').next().unwrap_or(argv0).chars().take(15).collect();
    let Some(kind) = discover::server_kind(&comm, &args.command) else {
        bail!(
            "`{}` is not a server wsgiscope knows: `wsgiscope run` starts gunicorn, uWSGI or Apache \
             (e.g. `wsgiscope run -- gunicorn -w 4 app:app`). To watch another process, use \
             `wsgiscope attach --pid`",
            args.command.join(" ")
        );
    };
    let listener = bind(&args.export).await?;
    let (kernel, events) = Kernel::load(false, !args.export.no_cpu_time)?;

    let mut gate = [0i32; 2];
    // SAFETY: pipe2 fills the two fds.
    if unsafe { libc::pipe2(gate.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    let [gate_r, gate_w] = gate;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args(["-c", "read -r _ <&3 && exec \"$@\" 3<&-", "wsgiscope-run"]).args(&args.command);
    // SAFETY: only dup2/fcntl (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if gate_r == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(gate_r, 3) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{}`", args.command.join(" ")))?;
    let pid = child.id().ok_or_else(|| anyhow!("the server exited at once"))?;
    // SAFETY: our end of the gate's read side is not needed any more.
    unsafe { libc::close(gate_r) };

    let metrics = Arc::new(Metrics::with_buckets(&args.export.buckets()));
    let views = args.export.views();
    let mut c = Collector::new(&metrics, views.as_deref(), kernel, options, args.export.memory_every.0);
    c.watch(Target::new(pid, kind, &args.command, args.service.as_deref()))?;
    // Traced: open the gate.
    // SAFETY: writes one byte to our pipe, then closes it.
    unsafe {
        libc::write(gate_w, b"\n".as_ptr().cast(), 1);
        libc::close(gate_w);
    }
    collect(c, events, listener, metrics.clone(), views.clone(), Until::ChildExits(pid)).await?;
    let status = child.wait().await.context("waiting for the server")?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
