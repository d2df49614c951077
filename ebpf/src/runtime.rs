//! What every eBPF object built here needs, the agent's and the bench's alike: a panic handler
//! (never reached: the verifier admits no path to it) and the GPL licence the kernel requires of
//! programs that call GPL-only helpers.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
