//! uwsgi packets (what nginx `uwsgi_pass` and the uWSGI `--http` router send to workers):
//! `u8 modifier1, u16 LE datasize, u8 modifier2`, then `u16 LE keylen, key, u16 LE vallen, val`…

use super::Vars;

/// Is this the header of a uwsgi packet for a WSGI request (modifier1 0, modifier2 0)?
pub fn is_packet(head: &[u8]) -> bool {
    head.len() >= 6 && head[0] == 0 && head[3] == 0 && u16::from_le_bytes([head[1], head[2]]) > 0
        // the first var's key is printable
        && head.get(6).is_some_and(|c| c.is_ascii_uppercase())
}

/// The vars of a packet; the head may be truncated, so parsing stops at the first var cut short.
pub fn parse(head: &[u8]) -> Option<Vars> {
    if !is_packet(head) {
        return None;
    }
    let size = u16::from_le_bytes([head[1], head[2]]) as usize;
    let body = &head[4..head.len().min(4 + size)];
    let mut vars = Vars::default();
    let mut rest = body;
    let take = |r: &mut &[u8]| -> Option<String> {
        let len = u16::from_le_bytes([*r.first()?, *r.get(1)?]) as usize;
        let s = r.get(2..2 + len)?;
        *r = &r[2 + len..];
        Some(String::from_utf8_lossy(s).into_owned())
    };
    while let Some(key) = take(&mut rest) {
        let Some(val) = take(&mut rest) else { break };
        vars.set(&key, val);
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
    }

    #[test]
    fn http_and_garbage_are_not_packets() {
        assert!(!is_packet(b"GET / HTTP/1.1\r\n"));
        assert!(!is_packet(&[0, 0, 0, 0, 0, 0, 0]));
        assert!(parse(b"\x00\x10\x00\x00\xff\xff\xff").is_none());
    }
}
