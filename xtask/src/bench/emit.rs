//! Section 6's measure of what emitting one request record costs on its own: the eBPF crate's
//! bench probe (`ebpf/src/bench_emit.rs`, built beside the agent's programs, never loaded by the
//! agent) attached to the hook that ends a request, its ring drained every 50 ms as the agent
//! drains its own. Its programs are this process's (that is how the listing tells them apart).
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, Result};
use aya::{maps::RingBuf, programs::TracePoint, Ebpf};

use super::objects;

/// The probe's object, as the agent's build script leaves it (`objects.rs`).
const OBJECT: &str = "wsgiscope-bench-emit";
/// Its program, and the hook it is attached to (its name).
pub const HOOK: &str = "sys_enter_shutdown";

pub struct EmitProbe {
    _ebpf: Ebpf,
    stop: Arc<AtomicBool>,
    drain: Option<JoinHandle<u64>>,
}

impl EmitProbe {
    pub fn attach(root: &Path) -> Result<EmitProbe> {
        let mut ebpf = objects::load(root, OBJECT)?;
        let prog: &mut TracePoint = ebpf
            .program_mut(HOOK)
            .ok_or_else(|| anyhow!("no program {HOOK} in {OBJECT}"))?
            .try_into()?;
        prog.load()?;
        prog.attach("syscalls", HOOK)?;
        let mut ring = RingBuf::try_from(ebpf.take_map("RECORDS").ok_or_else(|| anyhow!("no map RECORDS"))?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let drain = std::thread::spawn(move || {
            let mut records = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                while ring.next().is_some() {
                    records += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            records
        });
        println!("bench: emit probe ({OBJECT}) attached to {HOOK}");
        Ok(EmitProbe { _ebpf: ebpf, stop, drain: Some(drain) })
    }
}

impl Drop for EmitProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(records) = self.drain.take().and_then(|t| t.join().ok()) {
            println!("bench: emit probe drained {records} records");
        }
    }
}
