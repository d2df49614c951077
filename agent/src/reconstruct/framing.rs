//! From raw write calls to application blocks: what each server adds around the blocks the
//! WSGI application yielded (the per-server write sequences are listed in the README).
use wsgiscope_common::RequestAgg;

use super::modwsgi;
use crate::server::ServerKind;

/// gunicorn's chunked-encoding terminator, always its own `sendto`.
const CHUNK_TERMINATOR: &[u8] = b"0\r\n\r\n";

/// Is the first write of the response exactly its status line and headers?
fn headers_alone_first(agg: &RequestAgg, resp_head: &[u8]) -> bool {
    resp_head.windows(4).position(|w| w == b"\r\n\r\n").is_some_and(|i| i + 4 == agg.first_write_len as usize)
}

/// Application blocks of a response.
/// gunicorn writes the status line and headers in a separate call, then one call per block,
/// then (chunked responses) the terminator. Its own error page is one call: zero app blocks.
/// uWSGI coalesces the headers with the first block (one writev), except before a sendfile.
/// mod_wsgi writes its handshake first, then coalesces the headers with the first block; a
/// response with no body (or its error marker) is headers alone.
/// `interim`: bytes of interim `1xx` responses at the start of `resp_head`; one written alone
/// (gunicorn's `100 Continue`) is one more framing write.
pub fn app_blocks(kind: ServerKind, agg: &RequestAgg, resp_head: &[u8], interim: usize) -> u64 {
    // Continuations of partial writes are the same block, not new ones.
    let calls = agg.write_calls.saturating_sub(agg.continuations) as u64;
    let interim_alone = interim > 0 && agg.first_write_len as usize == interim;
    let calls = calls.saturating_sub(u64::from(interim_alone));
    match kind {
        ServerKind::Gunicorn => {
            let terminator = agg.last_write_len as usize == CHUNK_TERMINATOR.len()
                && agg.last_write_prefix.starts_with(CHUNK_TERMINATOR);
            calls.saturating_sub(1 + u64::from(terminator && calls > 1))
        }
        // After an interim write the first write is unknown: headers are taken to ride with a block.
        ServerKind::Uwsgi if interim_alone => calls,
        ServerKind::Uwsgi => calls.saturating_sub(u64::from(headers_alone_first(agg, resp_head))),
        ServerKind::ModWsgi => {
            let handshake = resp_head.starts_with(modwsgi::HANDSHAKE);
            let skip = if handshake { modwsgi::HANDSHAKE.len() } else { 0 };
            let bodyless = modwsgi::header_len(&resp_head[skip..])
                .is_some_and(|h| agg.write_bytes == (skip + h) as u64);
            calls.saturating_sub(u64::from(handshake) + u64::from(bodyless))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(kind: ServerKind, a: &RequestAgg) -> u64 {
        app_blocks(kind, a, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 0)
    }

    fn agg(calls: u32, last: &[u8]) -> RequestAgg {
        // SAFETY: RequestAgg is plain data; all zeroes is a valid value to fill in.
        let mut a: RequestAgg = unsafe { core::mem::zeroed() };
        a.write_calls = calls;
        a.last_write_len = last.len() as u32;
        a.last_write_prefix[..last.len().min(8)].copy_from_slice(&last[..last.len().min(8)]);
        a
    }

    #[test]
    fn gunicorn_chunked_response() {
        // headers + 1000 blocks + terminator
        assert_eq!(blocks(ServerKind::Gunicorn, &agg(1002, b"0\r\n\r\n")), 1000);
        assert_eq!(blocks(ServerKind::Gunicorn, &agg(3, b"0\r\n\r\n")), 1);
    }

    #[test]
    fn gunicorn_content_length_response_has_no_terminator() {
        assert_eq!(blocks(ServerKind::Gunicorn, &agg(2, b"abcdefghij")), 1);
        // headers + sendfile
        assert_eq!(blocks(ServerKind::Gunicorn, &agg(2, b"")), 1);
    }

    #[test]
    fn gunicorn_error_page_is_no_app_block() {
        assert_eq!(blocks(ServerKind::Gunicorn, &agg(1, b"HTTP/1.1")), 0);
        assert_eq!(blocks(ServerKind::Gunicorn, &agg(0, b"")), 0);
    }

    #[test]
    fn a_five_byte_block_that_is_not_a_terminator_counts() {
        assert_eq!(blocks(ServerKind::Gunicorn, &agg(3, b"5\r\nab")), 2);
    }

    #[test]
    fn uwsgi_coalesces_headers_with_the_first_block() {
        // writev [headers, block] + 999 writes
        let mut a = agg(1000, b"bbbbbbbb");
        a.first_write_len = 38 + 128;
        assert_eq!(blocks(ServerKind::Uwsgi, &a), 1000);
        // a 1 MiB block written as a partial writev + 3 continuations
        let mut a = agg(4, b"BBBBBBBB");
        a.first_write_len = 65536;
        a.continuations = 3;
        assert_eq!(blocks(ServerKind::Uwsgi, &a), 1);
    }

    #[test]
    fn mod_wsgi_handshake_and_headers_are_no_blocks() {
        let head: &[u8] = b"Status: 200 Continue\r\n\r\nStatus: 200 OK\r\nContent-Type: text/plain\r\n\r\nHello World!";
        // handshake, [headers, block], 999 blocks
        let mut a = agg(1001, b"bbbbbbbb");
        a.write_bytes = 24 + 44 + 128_000;
        assert_eq!(app_blocks(ServerKind::ModWsgi, &a, head, 0), 1000);
        // handshake + error marker
        let err: &[u8] = b"Status: 200 Continue\r\n\r\nStatus: 200 Error\r\n\r\n";
        let mut a = agg(2, b"Status: ");
        a.write_bytes = err.len() as u64;
        assert_eq!(app_blocks(ServerKind::ModWsgi, &a, err, 0), 0);
    }

    #[test]
    fn gunicorn_100_continue_is_one_more_framing_write() {
        // 100 Continue, headers, one block
        let mut a = agg(3, b"hello wo");
        a.first_write_len = 25;
        let head = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Internal Server Error\r\n";
        assert_eq!(app_blocks(ServerKind::Gunicorn, &a, head, 25), 1);
        // gunicorn's own error page after the interim response: no application block
        let mut a = agg(2, b"HTTP/1.1");
        a.first_write_len = 25;
        assert_eq!(app_blocks(ServerKind::Gunicorn, &a, head, 25), 0);
    }

    #[test]
    fn uwsgi_headers_alone_before_sendfile_are_no_block() {
        let mut a = agg(2, b"");
        a.first_write_len = 38; // "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        assert_eq!(blocks(ServerKind::Uwsgi, &a), 1);
    }
}
