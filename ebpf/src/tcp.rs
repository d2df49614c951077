//! Accept-queue wait: when the kernel completes a TCP handshake on a server socket
//! (SYN_RECV → ESTABLISHED) the connection waits in the listen queue until a worker accepts it.
//! Remembered here by peer address and port; `accept.rs` takes it when a traced worker accepts.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use wsgiscope_common::sock_state::{DADDR, DADDR_V6, DPORT, FAMILY, NEWSTATE, OLDSTATE, PROTOCOL};

use crate::{
    conn::now,
    maps::{established, PeerKey},
    tp,
};

/// A field at its fixed offset (the agent checks the offsets in tracefs before attaching).
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: u32) -> T {
    tp::field(ctx, offset as usize)
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    const TCP_ESTABLISHED: i32 = 1;
    const TCP_SYN_RECV: i32 = 3;
    const IPPROTO_TCP: u16 = 6;
    const AF_INET: u16 = 2;
    if field::<i32>(&ctx, OLDSTATE) != TCP_SYN_RECV || field::<i32>(&ctx, NEWSTATE) != TCP_ESTABLISHED {
        return 0;
    }
    if field::<u16>(&ctx, PROTOCOL) != IPPROTO_TCP {
        return 0;
    }
    let mut key = PeerKey { addr: [0; 16], port: field::<u16>(&ctx, DPORT) as u32, _pad: 0 };
    if field::<u16>(&ctx, FAMILY) == AF_INET {
        key.addr[..4].copy_from_slice(&field::<u32>(&ctx, DADDR).to_ne_bytes());
    } else {
        key.addr[..8].copy_from_slice(&field::<u64>(&ctx, DADDR_V6).to_ne_bytes());
        key.addr[8..].copy_from_slice(&field::<u64>(&ctx, DADDR_V6 + 8).to_ne_bytes());
    }
    established(key, now());
    0
}
