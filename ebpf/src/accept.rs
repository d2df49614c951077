//! Accepted sockets of traced processes become connections, with their address family
//! (the transport: TCP or a UNIX socket).
use aya_ebpf::programs::TracePointContext;
use wsgiscope_common::{conn_key, words::set, ConnState, AGG_ACCEPT_WAIT, END_FD_REUSED, STAT_CONN_TABLE_FULL};

use crate::{
    conn::{finish_request, now},
    maps::{bump, root_of, take_established, PeerKey, CONNS, SCRATCH},
    tp::{pid_tgid, programs, ret},
    user::{entry_args, read_user},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The sockaddr accept filled in, up to an IPv6 address: family (2 bytes), port (2, big
/// endian), then the IPv4 address, or the IPv6 flow info (4) and address (16).
#[repr(C)]
#[derive(Clone, Copy)]
struct SockAddr {
    family: u16,
    port: [u8; 2],
    v4_or_flow: [u8; 4],
    v6: [u8; 16],
}

/// The family and the TCP peer of an accepted socket, from one read of its sockaddr (a UNIX
/// one is read as far as that too: its path follows the family).
#[inline(always)]
fn peer(addr: u64) -> (u16, Option<PeerKey>) {
    // A buffer just big enough for an IPv4 address at the end of a page: the family alone.
    let Some(a) = read_user::<SockAddr>(addr) else { return (read_user::<u16>(addr).unwrap_or(0), None) };
    let mut key = PeerKey { addr: [0; 16], port: u16::from_be_bytes(a.port) as u32, _pad: 0 };
    match a.family {
        AF_INET => key.addr[..4].copy_from_slice(&a.v4_or_flow),
        AF_INET6 => key.addr = a.v6,
        _ => return (a.family, None),
    }
    (a.family, Some(key))
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) {
    let fd = ret(ctx);
    if fd < 0 {
        return;
    }
    let (_, tgid) = pid_tgid();
    let Some(root) = root_of(tgid) else { return };
    // Where accept wrote the peer address (its first field is the family): the second argument.
    let addr = entry_args().map_or(0, |(_, addr)| addr);
    let ts = now();
    let (family, peer) = if addr != 0 { peer(addr) } else { (0, None) };
    // How long the connection waited in the listen queue for a worker.
    let mut wait = None;
    if let Some(est) = peer.as_ref().and_then(take_established) {
        wait = Some(ts.saturating_sub(est));
    }
    let key = conn_key(tgid, fd as u32);
    let accept_flags = if wait.is_some() { AGG_ACCEPT_WAIT } else { 0 };
    if let Some(old) = CONNS.get_ptr_mut(&key) {
        // SAFETY: map value pointer valid for this program run.
        let old = unsafe { &mut *old };
        // A request still open there lost its close (fd reused); a closed entry is reused.
        finish_request(old, key, END_FD_REUSED, ts);
        reset(old, root, family, accept_flags, wait.unwrap_or(0));
        return;
    }
    let Some(fresh) = SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU scratch; only the fields `reset` sets matter until a request starts.
    unsafe {
        reset(&mut *fresh, root, family, accept_flags, wait.unwrap_or(0));
        if CONNS.insert(&key, &*fresh, 0).is_err() {
            bump(STAT_CONN_TABLE_FULL);
        }
    }
}

/// A new connection's state: root, transport and accept wait; no request yet.
#[inline(always)]
fn reset(c: &mut ConnState, root: u32, family: u16, flags: u16, wait: u64) {
    // `set`: stores kept as written, not merged into a memset call.
    set(&mut c.root, root);
    set(&mut c.flags, 0);
    set(&mut c.partial_left, 0);
    set(&mut c.call_fd, 0);
    set(&mut c.agg.req_head_len, 0);
    set(&mut c.agg.resp_head_len, 0);
    set(&mut c.agg.family, family);
    set(&mut c.agg.flags, flags);
    set(&mut c.agg.accept_wait_ns, wait);
}

programs!(sys_exit_accept, sys_exit_accept4 => |ctx| accepted(&ctx));
