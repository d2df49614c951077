//! The raw-socket client, for what an HTTP library hides: every byte a response took on the
//! wire, whether it was chunked, a sequence of requests on one keep-alive connection, and
//! arbitrary bytes (pipelined or malformed requests) with the statuses that came back. Loopback
//! only: servers are addressed by port on 127.0.0.1.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{anyhow, bail, Result};

const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A response as the client saw it on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    /// Every byte received: status line, headers, framing, body.
    pub wire_bytes: u64,
    pub chunked: bool,
}

fn connect(port: u16, read_timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(read_timeout))?;
    Ok(s)
}

/// GET over a fresh TCP connection (HTTP/1.1, Connection: close), read to EOF.
pub fn get(port: u16, path: &str) -> Result<Response> {
    let mut s = connect(port, READ_TIMEOUT)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: wsgiscope-tests\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no response head"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line"))?;
    Ok(Response {
        status,
        wire_bytes: raw.len() as u64,
        chunked: head.contains("transfer-encoding: chunked"),
    })
}

/// GETs over one keep-alive connection (reconnecting when the server closes it), reading each
/// response by its Content-Length or chunked framing. A request the server closed on without
/// a response gets status 0.
pub fn get_keepalive(port: u16, paths: &[&str]) -> Result<Vec<Response>> {
    let mut out = Vec::new();
    let mut conn: Option<BufReader<TcpStream>> = None;
    for path in paths {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => conn.insert(BufReader::new(connect(port, READ_TIMEOUT)?)),
        };
        write!(
            c.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: wsgiscope-tests\r\n\r\n"
        )?;
        match read_response(c) {
            Ok((r, keep)) => {
                out.push(r);
                if !keep {
                    conn = None;
                }
            }
            Err(_) => {
                // The server closed without a response (e.g. uWSGI on an exception).
                out.push(Response {
                    status: 0,
                    wire_bytes: 0,
                    chunked: false,
                });
                conn = None;
            }
        }
    }
    Ok(out)
}

/// One response off a keep-alive connection, and whether the connection stays open.
fn read_response(c: &mut BufReader<TcpStream>) -> Result<(Response, bool)> {
    let mut wire = 0u64;
    let mut line = String::new();
    let read_line = |c: &mut BufReader<TcpStream>, line: &mut String| -> Result<usize> {
        line.clear();
        let n = c.read_line(line)?;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(n)
    };
    wire += read_line(c, &mut line)? as u64;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let (mut length, mut chunked, mut keep) = (None, false, true);
    loop {
        wire += read_line(c, &mut line)? as u64;
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse::<u64>().ok();
        }
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
        keep &= !(l.starts_with("connection:") && l.contains("close"));
    }
    if chunked {
        loop {
            wire += read_line(c, &mut line)? as u64;
            let size = u64::from_str_radix(line.trim(), 16)?;
            let mut body = vec![0u8; size as usize + 2];
            c.read_exact(&mut body)?;
            wire += body.len() as u64;
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        let mut body = vec![0u8; n as usize];
        c.read_exact(&mut body)?;
        wire += n;
    } else {
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)?;
        wire += rest.len() as u64;
        keep = false;
    }
    Ok((
        Response {
            status,
            wire_bytes: wire,
            chunked,
        },
        keep,
    ))
}

/// Sends `bytes` as they are on a new connection and returns every byte read back until the
/// server closes or stays quiet for `quiet`.
pub fn send_raw(port: u16, bytes: &[u8], quiet: Duration) -> Result<Vec<u8>> {
    let mut s = connect(port, quiet)?;
    s.write_all(bytes)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    Ok(raw)
}

/// The statuses of the response heads in a byte stream, without interim 1xx responses. A head
/// is `HTTP/1.x NNN` at the start of a line (so a body must not hold such text).
pub fn final_statuses(raw: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    for (i, w) in raw.windows(13).enumerate() {
        let at_line_start = i == 0 || raw[i - 1] == b'\n';
        if at_line_start && w.starts_with(b"HTTP/1.") && w[8] == b' ' {
            if let Ok(code) = std::str::from_utf8(&w[9..12]).unwrap_or("").parse::<u16>() {
                if !(100..200).contains(&code) {
                    out.push(code);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, thread};

    use super::*;

    /// A loopback server that reads one request head per response in `responses` on one
    /// connection, answers it, and closes after the last.
    fn serve(responses: &'static [&'static [u8]]) -> (u16, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            for response in responses {
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                (&s).write_all(response).unwrap();
            }
        });
        (port, server)
    }

    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    const SIZED: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno";

    #[test]
    fn get_counts_every_byte_and_sees_chunking() {
        let (port, server) = serve(&[CHUNKED]);
        let r = get(port, "/x").unwrap();
        server.join().unwrap();
        let expected = Response {
            status: 200,
            wire_bytes: CHUNKED.len() as u64,
            chunked: true,
        };
        assert_eq!(r, expected);
    }

    #[test]
    fn keepalive_reads_each_response_by_its_framing() {
        let (port, server) = serve(&[CHUNKED, SIZED]);
        let got = get_keepalive(port, &["/a", "/b"]).unwrap();
        server.join().unwrap();
        let sizes: Vec<(u16, u64, bool)> = got
            .iter()
            .map(|r| (r.status, r.wire_bytes, r.chunked))
            .collect();
        assert_eq!(
            sizes,
            [
                (200, CHUNKED.len() as u64, true),
                (404, SIZED.len() as u64, false)
            ]
        );
    }

    #[test]
    fn raw_bytes_and_the_final_statuses_that_came_back() {
        const INTERIM: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        let (port, server) = serve(&[INTERIM, SIZED]);
        let raw = send_raw(
            port,
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            Duration::from_secs(5),
        )
        .unwrap();
        server.join().unwrap();
        assert_eq!(raw, [INTERIM, SIZED].concat());
        assert_eq!(final_statuses(&raw), [404]);
        assert_eq!(
            final_statuses(b"HTTP/1.0 200 OK\r\n\r\nnot HTTP/1.1 500 at a line start"),
            [200]
        );
    }
}
