//! USDT probes with semaphores, attached by hand: aya 0.14 can neither set a uprobe's
//! `ref_ctr_offset` (the semaphore the kernel counts up while attached) nor give a perf-event
//! link a cookie, so the perf event and the BPF link are made here.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

/// perf_event_attr, as much of it as a uprobe needs (the kernel takes the size we give).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    rest: [u64; 7],
}

/// A uprobe on `path` at file `offset`, with the kernel counting the USDT semaphore at file
/// offset `semaphore` up while attached (aya 0.14 cannot set `ref_ctr_offset`).
pub fn usdt_perf_event(path: &std::path::Path, offset: u64, semaphore: u64) -> Result<OwnedFd> {
    let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .context("this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe/type)")?
        .trim()
        .parse()?;
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let attr = PerfEventAttr {
        kind: pmu,
        size: size_of::<PerfEventAttr>() as u32,
        // ref_ctr_offset lives in config bits 32–63 of the uprobe PMU.
        config: semaphore << 32,
        config1: cpath.as_ptr() as u64,
        config2: offset,
        ..Default::default()
    };
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    // SAFETY: attr and the path outlive the call; pid -1 / cpu 0 is "any process" for uprobes.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        bail!("perf_event_open(uprobe {}:{offset:#x}): {}", path.display(), std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a loaded program to a perf event through a BPF link carrying `cookie`.
pub fn link_with_cookie(prog_fd: i32, perf_fd: &OwnedFd, cookie: u64) -> Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PERF_EVENT: u32 = 41;
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(perf_fd.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_PERF_EVENT.to_ne_bytes());
    attr[16..24].copy_from_slice(&cookie.to_ne_bytes());
    // SAFETY: bpf(2) reads the attr buffer we pass with its size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        bail!("BPF_LINK_CREATE for a USDT probe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

