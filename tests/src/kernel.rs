//! What the kernel holds for the agent: its BPF programs, and the USDT semaphore it enables.
//! Tracepoint programs are not pinned: the agent's go when it exits.
use std::{io::Read, process::Command};

/// IDs of the tracepoint programs process `pid` holds open.
pub fn tracepoint_program_ids(pid: u32) -> Vec<u32> {
    const BPF_PROG_TYPE_TRACEPOINT: &str = "prog_type:\t5\n";
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let mut ids = Vec::new();
    for fd in fds.filter_map(|e| e.ok()) {
        let is_prog = std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-prog");
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))
            .unwrap_or_default();
        if is_prog && info.contains(BPF_PROG_TYPE_TRACEPOINT) {
            ids.extend(info.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse::<u32>().ok()));
        }
    }
    ids
}

/// Is a BPF program with this ID still loaded anywhere in the kernel (BPF_PROG_GET_FD_BY_ID)?
pub fn bpf_program_exists(id: u32) -> bool {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    let attr: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: bpf(2) reads `attr` (prog_id, next_id, open_flags) and returns an fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, attr.as_ptr(), size_of_val(&attr)) };
    if fd >= 0 {
        unsafe { libc::close(fd as i32) };
    }
    fd >= 0
}

/// The value of the `gc__start` USDT semaphore in process `pid` (0 when no tracer enables it).
pub fn gc_semaphore(pid: u32) -> u16 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // The interpreter: libpython if mapped, else the python executable.
    let line = maps
        .lines()
        .find(|l| l.contains("libpython3"))
        .or_else(|| maps.lines().find(|l| l.contains("/python3")))
        .expect("an interpreter mapping");
    let path = line.split_whitespace().nth(5).unwrap();
    let base = maps
        .lines()
        .filter(|l| l.ends_with(path))
        .find(|l| l.split_whitespace().nth(2) == Some("00000000"))
        .and_then(|l| u64::from_str_radix(l.split('-').next().unwrap(), 16).ok())
        .expect("the mapping at file offset 0");
    let notes = Command::new("readelf").args(["-n", path]).output().expect("readelf (binutils)");
    let text = String::from_utf8_lossy(&notes.stdout);
    let block = text.split("Name: gc__start").nth(1).expect("a gc__start note");
    let sem = block.split("Semaphore: 0x").nth(1).unwrap().split_whitespace().next().unwrap();
    let vaddr = u64::from_str_radix(sem, 16).unwrap();
    // A fixed-address executable (Debian's python3.11) uses its addresses as they are; PIE and
    // shared objects are loaded at `base`, their first segment being at virtual address 0.
    let header = Command::new("readelf").args(["-h", path]).output().unwrap();
    let fixed = String::from_utf8_lossy(&header.stdout).contains("EXEC (Executable file)");
    let addr = if fixed { vaddr } else { base + vaddr };
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = [0u8; 2];
    std::io::Seek::seek(&mut mem, std::io::SeekFrom::Start(addr)).unwrap();
    mem.read_exact(&mut buf).unwrap();
    u16::from_ne_bytes(buf)
}
