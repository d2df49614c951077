//! Accept-queue wait: when the kernel completes a TCP handshake on a server socket
//! (SYN_RECV → ESTABLISHED) the connection waits in the listen queue until a worker accepts it.
//! Remembered here by peer address and port; `accept.rs` takes it when a traced worker accepts.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::{
    conn::now,
    maps::{PeerKey, ESTABLISHED},
};

/// sock:inet_sock_set_state field offsets (stable since 4.16; the agent checks them in tracefs).
const OLDSTATE: usize = 16;
const NEWSTATE: usize = 20;
const DPORT: usize = 26;
const FAMILY: usize = 28;
const PROTOCOL: usize = 30;
const DADDR: usize = 36;
const DADDR_V6: usize = 56;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    const TCP_ESTABLISHED: i32 = 1;
    const TCP_SYN_RECV: i32 = 3;
    const IPPROTO_TCP: u16 = 6;
    const AF_INET: u16 = 2;
    // SAFETY: in-bounds fields of the record.
    let read = |off| unsafe { ctx.read_at::<i32>(off) }.unwrap_or(0);
    if read(OLDSTATE) != TCP_SYN_RECV || read(NEWSTATE) != TCP_ESTABLISHED {
        return 0;
    }
    let read16 = |off| unsafe { ctx.read_at::<u16>(off) }.unwrap_or(0);
    if read16(PROTOCOL) != IPPROTO_TCP {
        return 0;
    }
    let mut key = PeerKey { addr: [0; 16], port: read16(DPORT) as u32, _pad: 0 };
    if read16(FAMILY) == AF_INET {
        let Ok(a) = (unsafe { ctx.read_at::<[u8; 4]>(DADDR) }) else { return 0 };
        key.addr[..4].copy_from_slice(&a);
    } else {
        let Ok(a) = (unsafe { ctx.read_at::<[u8; 16]>(DADDR_V6) }) else { return 0 };
        key.addr = a;
    }
    let _ = ESTABLISHED.insert(&key, &now(), 0);
    0
}
