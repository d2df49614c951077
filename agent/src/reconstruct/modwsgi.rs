//! Apache mod_wsgi daemon mode: the Apache child sends the daemon `u64 LE length`, then
//! (`length` bytes) `u64 LE count` and `count` NUL-terminated strings, CGI vars as key, value…
//! The daemon answers with a 24-byte handshake that is not application output, then CGI-style
//! headers (`Status: 200 OK\r\n…\r\n\r\n`) with the first block, one writev per later block.
use super::Vars;

/// mod_wsgi's "request accepted" handshake, the daemon's first write on every request.
pub const HANDSHAKE: &[u8] = b"Status: 200 Continue\r\n\r\n";
/// What the daemon sends instead of headers when the application failed: Apache answers 500.
const ERROR_MARKER: &[u8] = b"Status: 200 Error\r\n\r\n";

/// Is this the start of a mod_wsgi request (plausible length and string count, then a var name)?
pub fn is_request(head: &[u8]) -> bool {
    let (Some(len), Some(count)) = (le64(head, 0), le64(head, 8)) else { return false };
    (9..1 << 24).contains(&len)
        && count > 0
        && count % 2 == 0
        && count < len
        && head.get(16).is_some_and(|c| c.is_ascii_alphabetic())
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The vars of a request; the head may be truncated: a var cut off is kept as `Vars::cut`.
pub fn parse(head: &[u8]) -> Option<Vars> {
    if !is_request(head) {
        return None;
    }
    let len = le64(head, 0)? as usize;
    let body = &head[16..head.len().min(8 + len)];
    let mut vars = Vars::default();
    // Complete strings end in a NUL: what follows the last one may be cut off.
    let last_nul = body.iter().rposition(|&c| c == 0);
    let complete = &body[..last_nul.unwrap_or(0)];
    let tail = &body[last_nul.map_or(0, |i| i + 1)..];
    let mut strings = complete.split(|&c| c == 0).peekable();
    while let Some(key) = strings.next() {
        let key = String::from_utf8_lossy(key).into_owned();
        match strings.next() {
            Some(val) => vars.set(&key, String::from_utf8_lossy(val).into_owned()),
            // The key is whole, its value the part after the last NUL.
            None => vars.cut = Some((key, String::from_utf8_lossy(tail).into_owned())),
        }
    }
    Some(vars)
}

/// The response head without the handshake, when it carries one.
pub fn strip_handshake(resp_head: &[u8]) -> &[u8] {
    resp_head.strip_prefix(HANDSHAKE).unwrap_or(resp_head)
}

/// Status of a daemon response head (handshake already stripped): `Status: NNN …`, or 500 for
/// the error marker.
pub fn parse_status(head: &[u8]) -> Option<u16> {
    if head.starts_with(ERROR_MARKER) {
        return Some(500);
    }
    let rest = head.strip_prefix(b"Status: ")?;
    let code = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    (100..600).contains(&code).then_some(code)
}

/// Length of the CGI header block at the start of `head` (through the blank line), if complete.
pub fn header_len(head: &[u8]) -> Option<usize> {
    head.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(vars: &[(&str, &str)]) -> Vec<u8> {
        let mut body = ((2 * vars.len()) as u64).to_le_bytes().to_vec();
        for (k, v) in vars {
            body.extend(k.as_bytes());
            body.push(0);
            body.extend(v.as_bytes());
            body.push(0);
        }
        let mut r = (body.len() as u64).to_le_bytes().to_vec();
        r.extend(body);
        r
    }

    #[test]
    fn parses_apache_vars() {
        let r = request(&[
            ("GATEWAY_INTERFACE", "CGI/1.1"),
            ("REQUEST_METHOD", "GET"),
            ("QUERY_STRING", "x=1"),
            ("REQUEST_URI", "/app/hello?x=1"),
            ("SCRIPT_NAME", "/app"),
            ("PATH_INFO", "/hello"),
            ("REMOTE_ADDR", "10.0.0.7"),
        ]);
        assert!(is_request(&r));
        let v = parse(&r).unwrap();
        assert_eq!(v.method.as_deref(), Some("GET"));
        assert_eq!(v.script_name.as_deref(), Some("/app"));
        assert_eq!(v.path_info.as_deref(), Some("/hello"));
        assert_eq!(v.request_uri.as_deref(), Some("/app/hello?x=1"));
        assert_eq!(v.remote_addr.as_deref(), Some("10.0.0.7"));
    }

    #[test]
    fn a_truncated_head_keeps_the_complete_vars() {
        let r = request(&[("REQUEST_METHOD", "POST"), ("PATH_INFO", "/upload"), ("REMOTE_ADDR", "10.0.0.7")]);
        let v = parse(&r[..r.len() - 4]).unwrap();
        assert_eq!(v.method.as_deref(), Some("POST"));
        assert_eq!(v.path_info.as_deref(), Some("/upload"));
        assert_eq!(v.remote_addr, None);
    }

    #[test]
    fn http_uwsgi_and_garbage_are_not_mod_wsgi() {
        assert!(!is_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!is_request(&[0, 0x20, 0, 0, 14, 0, b'R', b'E', b'Q', 0, 0, 0, 0, 0, 0, 0, b'A']));
        assert!(!is_request(&[0xff; 32]));
        assert!(!is_request(&[5, 0, 0, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn statuses_behind_the_handshake() {
        let head = b"Status: 200 Continue\r\n\r\nStatus: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope";
        let h = strip_handshake(head);
        assert_eq!(parse_status(h), Some(404));
        assert_eq!(header_len(h), Some(h.len() - 4));
        let err = b"Status: 200 Continue\r\n\r\nStatus: 200 Error\r\n\r\n";
        assert_eq!(parse_status(strip_handshake(err)), Some(500));
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), None);
    }
}
