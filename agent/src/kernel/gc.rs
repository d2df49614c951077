//! CPython's garbage collections: the GC programs attached to a server's interpreter binary,
//! at its USDT notes or, without them, at `gc_collect_main`'s entry and return.
use std::os::{
    fd::{AsFd, AsRawFd},
    unix::fs::MetadataExt,
};

use anyhow::{Context, Result};
use aya::programs::{
    uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    UProbe,
};
use wsgiscope_common::{PROG_GC_DONE, PROG_GC_RETURN, PROG_GC_START};

use super::{
    usdt::{link_with_cookie, usdt_perf_event},
    Kernel,
};
use crate::python::{self, GcProbes, Runtime};

impl Kernel {
    /// Attaches the GC probes to a server's interpreter binary (once per binary). `Ok(false)`
    /// when the binary has neither USDT notes nor the collector symbol.
    pub fn attach_gc(&mut self, rt: &Runtime) -> Result<bool> {
        let meta = std::fs::metadata(&rt.host_path).with_context(|| format!("cannot stat {}", rt.host_path.display()))?;
        if !self.gc_binaries.insert((meta.dev(), meta.ino())) {
            return Ok(!matches!(rt.gc, GcProbes::None));
        }
        match &rt.gc {
            GcProbes::Usdt { start, done } => {
                for (probes, prog_name) in [(start, PROG_GC_START), (done, PROG_GC_DONE)] {
                    let prog: &mut UProbe = self.ebpf.program_mut(prog_name).expect("loaded").try_into()?;
                    let prog_fd = prog.fd()?.as_fd().as_raw_fd();
                    for p in probes {
                        // Where gc__start passes the generation; gc__done's argument is unused.
                        let cookie = if prog_name == PROG_GC_START {
                            python::arg_cookie(p.args.split_whitespace().next().unwrap_or(""))?
                        } else {
                            0
                        };
                        let perf = usdt_perf_event(&rt.host_path, p.offset, p.semaphore)?;
                        let link = link_with_cookie(prog_fd, &perf, cookie)?;
                        self.usdt_links.push((link, perf));
                    }
                }
                Ok(true)
            }
            GcProbes::Symbol(symbol) => {
                for (prog_name, cookie) in [(PROG_GC_START, Some(python::symbol_generation_cookie())), (PROG_GC_RETURN, None)] {
                    let prog: &mut UProbe = self.ebpf.program_mut(prog_name).expect("loaded").try_into()?;
                    let point = UProbeAttachPoint { location: UProbeAttachLocation::Symbol(symbol), cookie };
                    let id = prog
                        .attach(point, &rt.host_path, UProbeScope::AllProcesses)
                        .with_context(|| format!("uprobe on {symbol} in {}", rt.path.display()))?;
                    self.links.push(Box::new(prog.take_link(id)?));
                }
                Ok(true)
            }
            GcProbes::None => Ok(false),
        }
    }
}
