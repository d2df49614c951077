//! HTTP/1.x heads: the request line (method, path without query) and the response status.

/// Methods kept as label values; anything else becomes `OTHER` (bounds cardinality).
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];

/// Method and path of an HTTP/1.x request head (possibly truncated after the request line).
/// The query string and fragment are dropped here: they must never reach a label.
pub fn parse_request(head: &[u8]) -> Option<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    // A truncated head is fine as long as the request line is complete.
    if let Err(httparse::Error::TooManyHeaders) | Err(httparse::Error::HeaderName) = req.parse(head) {
        // httparse stops at the first bad header but has parsed the request line.
    }
    let (method, path) = (req.method?, req.path?);
    req.version?;
    let path = path.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') && path != "*" {
        return None; // absolute-form or garbage: not a server route
    }
    Some((normalise_method(method), path.to_string()))
}

/// The method as a label value: a standard method, else `OTHER`.
pub fn normalise_method(method: &str) -> String {
    if METHODS.contains(&method) { method } else { "OTHER" }.to_string()
}

/// Status code of an HTTP/1.x response head.
pub fn parse_status(head: &[u8]) -> Option<u16> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let _ = resp.parse(head);
    resp.version?;
    resp.code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_without_query() {
        let h = b"GET /users/42?token=secret#x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(parse_request(h), Some(("GET".into(), "/users/42".into())));
    }

    #[test]
    fn truncated_head_still_gives_request_line() {
        let h = b"POST /upload HTTP/1.1\r\nHost: example\r\nContent-Ty";
        assert_eq!(parse_request(h), Some(("POST".into(), "/upload".into())));
    }

    #[test]
    fn incomplete_request_line_is_not_a_request() {
        assert_eq!(parse_request(b"GET /lo"), None);
        assert_eq!(parse_request(b"G"), None);
        assert_eq!(parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), None);
    }

    #[test]
    fn unknown_method_is_other() {
        assert_eq!(parse_request(b"BREW /pot HTTP/1.1\r\n"), Some(("OTHER".into(), "/pot".into())));
    }

    #[test]
    fn status_from_truncated_head() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Mon"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 500 Internal Server Error\r\n\r\n"), Some(500));
        assert_eq!(parse_status(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status(b"Status: 200 Continue\r\n"), None);
    }
}
