//! Recognising HTTP/1.x in the bytes of a syscall: a request line's start, a response head's
//! start, an interim response, the end of a request head.
use wsgiscope_common::{
    heads::{blank_line_end, is_http1},
    ConnState, REQ_HEAD_LEN, RESP_HEAD_LEN,
};

use crate::user::read_user;

/// Does this data begin like a new request? (HTTP/1.x: an upper-case method token and a space.)
#[inline(always)]
pub fn looks_like_request(src: u64, n: u64) -> bool {
    if n < 4 {
        return false;
    }
    let Some(b) = read_user::<[u8; 8]>(src) else { return false };
    let mut i = 0;
    while i < 8 {
        let ch = b[i];
        if ch == b' ' {
            return i >= 3 && (i as u64) < n;
        }
        if !ch.is_ascii_uppercase() {
            return false;
        }
        i += 1;
    }
    false
}

/// Does user memory at `src` (`avail` bytes) begin a response head, `HTTP/1.x NNN `?
#[inline(always)]
pub fn is_response_head(src: u64, avail: u64) -> bool {
    if avail < 13 {
        return false;
    }
    let Some(b) = read_user::<[u8; 13]>(src) else { return false };
    let digit = |i: usize| b[i].is_ascii_digit();
    is_http1(&b) && b[8] == b' ' && digit(9) && digit(10) && digit(11) && (b[12] == b' ' || b[12] == b'\r')
}

/// Does the captured response head start with an interim response, `HTTP/1.x 1xx` other than
/// `101` (which switches protocols and is final)?
#[inline(always)]
pub fn is_interim(h: &[u8; 2 * RESP_HEAD_LEN], len: u32) -> bool {
    len >= 13 && is_http1(h) && h[8] == b' ' && h[9] == b'1' && !(h[10] == b'0' && h[11] == b'1')
}

/// Did the read of `n` bytes that started the request hold more than an HTTP head? Finds the
/// captured head's blank line; unknown (false) when the head is not all captured.
#[inline(always)]
pub fn bytes_after_head(c: &ConnState, n: u64) -> bool {
    let len = c.agg.req_head_len as usize;
    // HTTP only: a method's first letter (uwsgi and mod_wsgi requests come one per connection).
    if len < 16 || !c.req_head[0].is_ascii_uppercase() {
        return false;
    }
    // SAFETY: the state's heads are 8-byte aligned (asserted in `conn`).
    let end = unsafe { blank_line_end::<REQ_HEAD_LEN, { 2 * REQ_HEAD_LEN }>(&c.req_head, len) };
    end.is_some_and(|i| (i as u64 + 1) < n)
}
