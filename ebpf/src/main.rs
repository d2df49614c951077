//! Kernel side of wsgiscope: syscall tracepoints → per-(tgid, fd) connection state →
//! per-request aggregate → one ring-buffer record per request.
//!
//! Modules follow the hook families: `process` (fork/exit: which processes are traced),
//! `accept` (which sockets are connections), `read` (request start and request bytes),
//! `write` (response writes), `close` (close and shutdown end a request), `tcp` (handshakes
//! completed, for the accept-queue wait), `signal` (workers killed from outside), `python`
//! (CPython garbage collections, by uprobe).
//! `conn` holds the connection-state helpers they share, `maps` the maps.
#![no_std]
#![no_main]

mod accept;
mod close;
mod conn;
mod maps;
mod process;
mod python;
mod read;
mod signal;
mod syscall;
mod tcp;
mod write;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
