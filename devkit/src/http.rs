//! Plain HTTP GETs to loopback servers through ureq: scrapes of /metrics, the Prometheus HTTP
//! API, and the demo's and the bench's traffic. Each request opens a connection of its own (no
//! pool), as a client per request does; every status is an answer, not an error. For the bytes
//! on the wire, keep-alive sequences and raw requests, see [`crate::wire`].
use std::{fmt::Display, io, sync::OnceLock, time::Duration};

use anyhow::{bail, Context, Result};

/// What a /metrics body or an API answer may weigh at most.
const BODY_LIMIT: u64 = 256 << 20;

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(0)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_per_read(Some(Duration::from_secs(30)))
            .build()
            .new_agent()
    })
}

fn call(addr: impl Display, path: &str) -> Result<ureq::http::Response<ureq::Body>> {
    let url = format!("http://{addr}{path}");
    agent()
        .get(&url)
        .call()
        .with_context(|| format!("GET {url}"))
}

/// GET `path` (with its query string) from `addr` (`host:port`): status and body (invalid UTF-8
/// replaced).
pub fn get(addr: impl Display, path: &str) -> Result<(u16, String)> {
    let mut response = call(&addr, path)?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(BODY_LIMIT)
        .lossy_utf8(true)
        .read_to_string()
        .with_context(|| format!("reading the body of {addr}{path}"))?;
    Ok((status, body))
}

/// GET `path` from `addr`, the body read to its end and dropped: the status.
pub fn get_status(addr: impl Display, path: &str) -> Result<u16> {
    let mut response = call(&addr, path)?;
    io::copy(&mut response.body_mut().as_reader(), &mut io::sink())
        .with_context(|| format!("reading the body of {addr}{path}"))?;
    Ok(response.status().as_u16())
}

/// The body of GET /metrics from `addr`; any status but 200 is an error.
pub fn scrape(addr: impl Display) -> Result<String> {
    let (status, body) = get(&addr, "/metrics")?;
    if status != 200 {
        bail!("scraping {addr}/metrics: HTTP {status}: {body}");
    }
    Ok(body)
}

/// Percent-encodes a query-string value: every byte but the RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        net::TcpListener,
        thread,
    };

    use super::*;

    /// A one-shot server on loopback: answers one request with `response`; returns what it got.
    fn serve_once(response: &'static [u8]) -> (String, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = String::new();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            while reader.read_line(&mut head).unwrap() > 2 {}
            s.write_all(response).unwrap();
            head
        });
        (addr, server)
    }

    #[test]
    fn reads_chunked_bodies_and_error_statuses() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 503 Unavailable\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        );
        let (status, body) = get(&addr, "/api/v1/query?query=up&match[]=x").unwrap();
        assert_eq!((status, body.as_str()), (503, "hello world"));
        let head = server.join().unwrap();
        assert!(
            head.starts_with("GET /api/v1/query?query=up&match[]=x HTTP/1.1\r\n"),
            "{head}"
        );
    }

    #[test]
    fn scrape_wants_200() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nup 1\n");
        assert_eq!(scrape(&addr).unwrap(), "up 1\n");
        assert!(server
            .join()
            .unwrap()
            .starts_with("GET /metrics HTTP/1.1\r\n"));
        let (addr, server) = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert!(scrape(&addr).is_err());
        server.join().unwrap();
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(get_status(&addr, "/hello").unwrap(), 200);
        server.join().unwrap();
    }

    #[test]
    fn url_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            url_encode("up{job=\"a b\"}[5m]"),
            "up%7Bjob%3D%22a%20b%22%7D%5B5m%5D"
        );
        assert_eq!(url_encode("A-z_0.9~"), "A-z_0.9~");
    }
}
