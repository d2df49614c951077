//! uwsgi packets (what nginx `uwsgi_pass` and the uWSGI `--http` router send to workers):
//! `u8 modifier1, u16 LE datasize, u8 modifier2`, then `u16 LE keylen, key, u16 LE vallen, val`…

use super::Vars;

/// Is this the header of a uwsgi packet for a WSGI request (modifier1 0, modifier2 0)?
pub fn is_packet(head: &[u8]) -> bool {
    head.len() >= 6 && head[0] == 0 && head[3] == 0 && u16::from_le_bytes([head[1], head[2]]) > 0
        // the first var's key is printable
        && head.get(6).is_some_and(|c| c.is_ascii_uppercase())
}

/// The vars of a packet. The head may be truncated: parsing stops at the first var cut short,
/// whose captured part is kept as `Vars::cut`.
pub fn parse(head: &[u8]) -> Option<Vars> {
    if !is_packet(head) {
        return None;
    }
    let size = u16::from_le_bytes([head[1], head[2]]) as usize;
    let mut rest = &head[4..head.len().min(4 + size)];
    let mut vars = Vars::default();
    // A length-prefixed string: whole, or (`Err`) the part the capture kept.
    let take = |r: &mut &[u8]| -> Option<Result<String, String>> {
        let len = u16::from_le_bytes([*r.first()?, *r.get(1)?]) as usize;
        let kept = &r[2..];
        if kept.len() < len {
            *r = &[];
            return Some(Err(String::from_utf8_lossy(kept).into_owned()));
        }
        *r = &kept[len..];
        Some(Ok(String::from_utf8_lossy(&kept[..len]).into_owned()))
    };
    while let Some(Ok(key)) = take(&mut rest) {
        match take(&mut rest) {
            Some(Ok(val)) => vars.set(&key, val),
            Some(Err(part)) => vars.cut = Some((key, part)),
            None => vars.cut = Some((key, String::new())),
        }
    }
    Some(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(vars: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in vars {
            body.extend((k.len() as u16).to_le_bytes());
            body.extend(k.as_bytes());
            body.extend((v.len() as u16).to_le_bytes());
            body.extend(v.as_bytes());
        }
        let mut p = vec![0];
        p.extend((body.len() as u16).to_le_bytes());
        p.push(0);
        p.extend(body);
        p
    }

    #[test]
    fn parses_nginx_vars() {
        let p = packet(&[
            ("QUERY_STRING", "a=1"),
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/blocks?a=1"),
            ("PATH_INFO", "/blocks"),
            ("REMOTE_ADDR", "10.1.2.3"),
        ]);
        let v = parse(&p).unwrap();
        assert_eq!(v.method.as_deref(), Some("GET"));
        assert_eq!(v.path_info.as_deref(), Some("/blocks"));
        assert_eq!(v.request_uri.as_deref(), Some("/blocks?a=1"));
        assert_eq!(v.remote_addr.as_deref(), Some("10.1.2.3"));
    }

    #[test]
    fn truncated_packet_keeps_the_complete_vars() {
        let p = packet(&[("REQUEST_METHOD", "POST"), ("PATH_INFO", "/x"), ("REMOTE_ADDR", "10.0.0.1")]);
        let v = parse(&p[..p.len() - 3]).unwrap();
        assert_eq!(v.method.as_deref(), Some("POST"));
        assert_eq!(v.path_info.as_deref(), Some("/x"));
        assert_eq!(v.remote_addr, None);
        assert_eq!(v.cut, Some(("REMOTE_ADDR".to_string(), "10.0.".to_string())));
    }

    #[test]
    fn a_long_query_string_first_still_gives_method_and_path() {
        // nginx's uwsgi_params: QUERY_STRING first, then REQUEST_METHOD, …, REQUEST_URI, PATH_INFO.
        let q = "q".repeat(250);
        let uri = format!("/hello?{q}");
        let p = packet(&[
            ("QUERY_STRING", &q),
            ("REQUEST_METHOD", "GET"),
            ("CONTENT_TYPE", ""),
            ("CONTENT_LENGTH", ""),
            ("REQUEST_URI", &uri),
            ("PATH_INFO", "/hello"),
        ]);
        let head = super::super::parse_request_head(&p[..512.min(p.len())], 0).unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.path.as_deref(), Some("/hello"));
        // Cut inside REQUEST_URI's query: the path before '?' is whole.
        let cut = p.windows(7).position(|w| w == b"/hello?").unwrap() + 20;
        let head = super::super::parse_request_head(&p[..cut], 0).unwrap();
        assert_eq!((head.method.as_str(), head.path.as_deref()), ("GET", Some("/hello")));
        // A query so long that nothing else was captured: still a request, route unknown.
        let q = "q".repeat(2000);
        let p = packet(&[("QUERY_STRING", &q), ("REQUEST_METHOD", "GET"), ("PATH_INFO", "/hello")]);
        let head = super::super::parse_request_head(&p[..512], 0).unwrap();
        assert_eq!((head.method.as_str(), head.path), ("unknown", None));
    }

    #[test]
    fn http_and_garbage_are_not_packets() {
        assert!(!is_packet(b"GET / HTTP/1.1\r\n"));
        assert!(!is_packet(&[0, 0, 0, 0, 0, 0, 0]));
        assert!(parse(b"\x00\x10\x00\x00\xff\xff\xff").is_none());
    }
}
