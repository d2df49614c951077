//! HTTP/1.x heads: the request line (method, path without query) and the response status.

/// Methods kept as label values; anything else becomes `OTHER` (bounds cardinality).
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];

/// Longest method token taken for a request line (gunicorn allows 20).
const MAX_METHOD: usize = 20;

/// What a request head says, as far as it was captured.
#[derive(Debug, PartialEq)]
pub struct RequestLine {
    pub method: String,
    /// The path without query string or fragment; `None` when the captured bytes end inside it
    /// (a request line longer than the kernel keeps) or the target is no path.
    pub path: Option<String>,
}

/// The request line of an HTTP/1.x head, leniently: a method token and a space are enough to
/// count a request (the rest may have been cut off by the kernel's capture, or be malformed
/// in a way the server answers with a 4xx). The query string and fragment are dropped here:
/// they must never reach a label. `None`: not an HTTP request (binary, TLS, …).
pub fn parse_request(head: &[u8]) -> Option<RequestLine> {
    let sp = head.iter().take(MAX_METHOD + 1).position(|&c| c == b' ')?;
    let method = &head[..sp];
    if method.is_empty() || !method.iter().all(|&c| is_tchar(c)) || !method[0].is_ascii_alphabetic() {
        return None;
    }
    let method = normalise_method(std::str::from_utf8(method).ok()?);
    let rest = &head[sp + 1..];
    let target_end = rest.iter().position(|&c| matches!(c, b' ' | b'\r' | b'\n'));
    let target = &rest[..target_end.unwrap_or(rest.len())];
    let path_end = target.iter().position(|&c| c == b'?' || c == b'#');
    let complete = path_end.is_some() || target_end.is_some();
    let path = if complete { origin_path(&target[..path_end.unwrap_or(target.len())]) } else { None };
    Some(RequestLine { method, path })
}

/// The path of a request target: origin form (`/a/b`) as it is, absolute form
/// (`http://host/a/b`) without scheme and authority, `*` (OPTIONS) as it is.
fn origin_path(target: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(target);
    if text.starts_with('/') || text == "*" {
        return Some(text.into_owned());
    }
    let lower = text.to_ascii_lowercase();
    let after_scheme = lower.strip_prefix("http://").or_else(|| lower.strip_prefix("https://"))?;
    let skip = text.len() - after_scheme.len();
    Some(match text[skip..].find('/') {
        Some(i) => text[skip + i..].to_string(),
        None => "/".to_string(),
    })
}

/// RFC 9110 token characters.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Where the next request would begin (pipelining): after the blank line and a
/// `Content-Length` body (unknown for a chunked body or a head not captured whole).
fn next_request_at(head: &[u8]) -> Option<usize> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let mut body = 0usize;
    for line in head[..end].split(|&c| c == b'\n').skip(1) {
        let line = String::from_utf8_lossy(line);
        let Some((name, value)) = line.split_once(':') else { continue };
        let name = name.trim().to_ascii_lowercase();
        if name == "content-length" {
            body = value.trim().parse().ok()?;
        } else if name == "transfer-encoding" {
            return None;
        }
    }
    end.checked_add(body)
}

/// The `index`-th request (0 first) of a read that held several (pipelining). `None`: the
/// first is no HTTP request; `Some(None)`: a later one (the kernel saw its response) lies
/// beyond the captured bytes or behind a body of unknown length.
pub fn parse_pipelined(head: &[u8], index: u16) -> Option<Option<RequestLine>> {
    if index == 0 {
        return parse_request(head).map(Some);
    }
    let mut at = 0usize;
    for _ in 0..index {
        if parse_request(&head[at..]).is_none() {
            return Some(None);
        }
        match next_request_at(&head[at..]) {
            Some(n) if at + n < head.len() => at += n,
            _ => return Some(None),
        }
    }
    Some(parse_request(&head[at..]))
}

/// The method as a label value: a standard method, else `OTHER`.
pub fn normalise_method(method: &str) -> String {
    if METHODS.contains(&method) { method } else { "OTHER" }.to_string()
}

/// Status code of an HTTP/1.x response head, and the bytes of the interim `1xx` responses
/// (`100 Continue`, `103 Early Hints`) that came before the final one: they are skipped.
/// `101 Switching Protocols` is final.
pub fn parse_status(head: &[u8]) -> (Option<u16>, usize) {
    let mut at = 0;
    loop {
        let code = status_code(&head[at..]);
        match code {
            Some(c @ 100..=199) if c != 101 => match head[at..].windows(4).position(|w| w == b"\r\n\r\n") {
                Some(end) => at += end + 4,
                None => return (None, at),
            },
            _ => return (code, at),
        }
    }
}

fn status_code(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.")?;
    if rest.len() < 5 || !rest[0].is_ascii_digit() || rest[1] != b' ' {
        return None;
    }
    let code = std::str::from_utf8(&rest[2..5]).ok()?.parse().ok()?;
    (100..1000).contains(&code).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(method: &str, path: Option<&str>) -> (String, Option<String>) {
        (method.to_string(), path.map(str::to_string))
    }

    fn parsed(h: &[u8]) -> Option<(String, Option<String>)> {
        parse_request(h).map(|r| (r.method, r.path))
    }

    #[test]
    fn request_line_without_query() {
        let h = b"GET /users/42?token=secret#x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(parsed(h), Some(line("GET", Some("/users/42"))));
    }

    #[test]
    fn truncated_head_still_gives_request_line() {
        let h = b"POST /upload HTTP/1.1\r\nHost: example\r\nContent-Ty";
        assert_eq!(parsed(h), Some(line("POST", Some("/upload"))));
    }

    #[test]
    fn a_request_cut_inside_its_path_is_still_a_request() {
        assert_eq!(parsed(b"GET /lo"), Some(line("GET", None)));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(600));
        assert_eq!(parsed(&long.as_bytes()[..512]), Some(line("GET", None)));
        // The query string is cut, the path is whole.
        let q = format!("GET /hello?{} HTTP/1.1\r\n", "q".repeat(600));
        assert_eq!(parsed(&q.as_bytes()[..512]), Some(line("GET", Some("/hello"))));
    }

    #[test]
    fn binary_and_tls_are_not_requests() {
        assert_eq!(parsed(b"G"), None);
        assert_eq!(parsed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), None);
        assert_eq!(parsed(b"\x00\x01\x02 garbage"), None);
        assert_eq!(parsed(b" / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn hostile_paths_are_kept_as_text() {
        assert_eq!(parsed(b"GET /q\"x HTTP/1.1\r\n\r\n"), Some(line("GET", Some("/q\"x"))));
        assert_eq!(parsed(b"GET /a\\b HTTP/1.1\r\n\r\n"), Some(line("GET", Some("/a\\b"))));
        assert_eq!(parsed(b"GET /caf\xe9 HTTP/1.1\r\n\r\n"), Some(line("GET", Some("/caf\u{fffd}"))));
        assert_eq!(parsed(b"GET http://example.com/x?y HTTP/1.1\r\n\r\n"), Some(line("GET", Some("/x"))));
        assert_eq!(parsed(b"GET http://example.com HTTP/1.1\r\n\r\n"), Some(line("GET", Some("/"))));
        assert_eq!(parsed(b"GET example.com:443 HTTP/1.1\r\n\r\n"), Some(line("GET", None)));
    }

    #[test]
    fn unknown_method_is_other() {
        assert_eq!(parsed(b"BREW /pot HTTP/1.1\r\n"), Some(line("OTHER", Some("/pot"))));
    }

    #[test]
    fn pipelined_requests_are_found_in_order() {
        let h = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /c?q HTTP/1.1\r\n\r\n";
        let nth = |i| parse_pipelined(h, i).map(|r| r.map(|l| (l.method, l.path)));
        assert_eq!(nth(0), Some(Some(line("GET", Some("/a")))));
        assert_eq!(nth(1), Some(Some(line("POST", Some("/b")))));
        assert_eq!(nth(2), Some(Some(line("GET", Some("/c")))));
        assert_eq!(nth(3), Some(None), "beyond what was captured");
        let chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(parse_pipelined(chunked, 1).map(|r| r.is_none()), Some(true));
    }

    #[test]
    fn status_from_truncated_head() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Mon"), (Some(200), 0));
        assert_eq!(parse_status(b"HTTP/1.0 500 Internal Server Error\r\n\r\n"), (Some(500), 0));
        assert_eq!(parse_status(b"HTTP/1.1 20").0, None);
        assert_eq!(parse_status(b"Status: 200 Continue\r\n").0, None);
    }

    #[test]
    fn interim_responses_are_skipped() {
        let h = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Internal Server Error\r\n";
        assert_eq!(parse_status(h), (Some(500), 25));
        let h = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert_eq!(parse_status(h), (Some(200), 25 + 37));
        assert_eq!(parse_status(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), (Some(101), 0));
        assert_eq!(parse_status(b"HTTP/1.1 100 Continue\r\n\r\n"), (None, 25), "final head not written");
    }
}
