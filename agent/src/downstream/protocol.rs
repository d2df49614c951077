//! Recognises one downstream call — what a worker wrote to a database, cache or HTTP socket and
//! the reply it read — from the first bytes of each (the capture keeps up to 256 bytes of the
//! request, 128 of the response). Pure: a `Connection` holds what one socket's earlier calls
//! taught (its protocol, prepared statements); nothing here does I/O.
//!
//! Recognition is by shape, strictest first: PostgreSQL (a chain of typed, length-prefixed
//! messages), MySQL (a packet whose length matches what was written), TLS (a record header),
//! HTTP/1.x (a request line), Redis (RESP arrays, or an inline command answered in RESP).
use std::borrow::Borrow;
use std::collections::VecDeque;

use super::sql::{self, Dialect};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Postgres,
    Mysql,
    Redis,
    Http,
    Tls,
    Other,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgresql",
            Protocol::Mysql => "mysql",
            Protocol::Redis => "redis",
            Protocol::Http => "http",
            Protocol::Tls => "tls",
            Protocol::Other => "other",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub protocol: Protocol,
    /// Normalised operation: SQL template, Redis command name (upper case), HTTP method,
    /// or a fixed word for protocol housekeeping ("connect", "terminate", "ping", "prepared", "tls", "other" ...).
    pub operation: String,
    pub outcome: Outcome,
    /// Commands in the call as far as the captured bytes show (a Redis pipeline, several PG
    /// queries in one write): >= 1; 0 for a PostgreSQL call that only prepares a statement
    /// (Parse, Sync: psycopg's automatic prepare, a round trip of its own before the execute).
    pub commands: u32,
}

impl Call {
    fn new(protocol: Protocol, operation: impl Into<String>, response: &[u8]) -> Self {
        Call { protocol, operation: operation.into(), outcome: outcome(protocol, response), commands: 1 }
    }
}

/// Prepared statements remembered per connection; beyond this the oldest is forgotten.
const MAX_STATEMENTS: usize = 256;

/// What one downstream connection remembers between calls: its protocol once recognised, and
/// prepared statements (PostgreSQL statement name -> template; MySQL statement id -> template), at most 256 per connection (oldest/any evicted).
#[derive(Default, Debug, Clone)]
pub struct Connection {
    protocol: Option<Protocol>,
    pg_statements: Statements<Vec<u8>>,
    mysql_statements: Statements<u32>,
}

impl Connection {
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// Classifies one call. `request_cut`: the request was longer than `request` (capture limit).
    pub fn classify(&mut self, request: &[u8], request_cut: bool, response: &[u8]) -> Call {
        use Protocol::*;
        let call = if request.is_empty() {
            self.unsolicited(response)
        } else {
            match self.protocol {
                // Past the handshake every record is opaque.
                Some(Tls) => Call::new(Tls, "tls", response),
                // A known protocol sticks: what does not parse is a continuation or a TLS upgrade.
                Some(known) => self.recognise(known, request, request_cut, response).unwrap_or_else(|| {
                    let (operation, read_as) = if tls_record(request) { ("tls", Tls) } else { ("other", known) };
                    Call { protocol: known, operation: operation.into(), outcome: outcome(read_as, response), commands: 1 }
                }),
                None => [Postgres, Mysql, Tls, Http, Redis]
                    .into_iter()
                    .find_map(|p| self.recognise(p, request, request_cut, response))
                    .unwrap_or_else(|| Call::new(Other, "other", response)),
            }
        };
        if call.protocol != Other {
            self.protocol = Some(call.protocol);
        }
        call
    }

    /// The request parsed as protocol `p`, or None.
    fn recognise(&mut self, p: Protocol, request: &[u8], cut: bool, response: &[u8]) -> Option<Call> {
        let (operation, commands) = match p {
            Protocol::Postgres => postgres(request, cut, &mut self.pg_statements)?,
            Protocol::Mysql => {
                let known = self.protocol == Some(Protocol::Mysql);
                (mysql(request, cut, response, known, &mut self.mysql_statements)?, 1)
            }
            Protocol::Redis => {
                let (operation, commands) = redis(request, response)?;
                (operation, commands.max(1))
            }
            Protocol::Http => (http(request, cut)?, 1),
            Protocol::Tls => (tls_record(request).then(|| "tls".to_string())?, 1),
            Protocol::Other => return None,
        };
        Some(Call { commands, ..Call::new(p, operation, response) })
    }

    /// Bytes read with nothing written: a MySQL server's greeting, or whatever a known server
    /// pushes (Redis pub/sub, PostgreSQL notifications).
    fn unsolicited(&mut self, response: &[u8]) -> Call {
        if matches!(self.protocol, None | Some(Protocol::Mysql)) && mysql_greeting(response) {
            return Call::new(Protocol::Mysql, "connect", response);
        }
        Call::new(self.protocol.unwrap_or(Protocol::Other), "unsolicited", response)
    }
}

fn outcome(protocol: Protocol, response: &[u8]) -> Outcome {
    let error = match protocol {
        Protocol::Postgres => postgres_error(response),
        // The first packet's payload starts with 0xFF: ERR_Packet.
        Protocol::Mysql => response.get(4) == Some(&0xff),
        Protocol::Redis => redis_error(response),
        Protocol::Http => http_error(response),
        // A plaintext alert record: the handshake failed.
        Protocol::Tls => response.starts_with(&[0x15, 0x03]),
        Protocol::Other => false,
    };
    if error {
        Outcome::Error
    } else {
        Outcome::Ok
    }
}

/// Templates by statement key, oldest first.
#[derive(Debug, Clone)]
struct Statements<K> {
    entries: VecDeque<(K, String)>,
}

impl<K> Default for Statements<K> {
    fn default() -> Self {
        Statements { entries: VecDeque::new() }
    }
}

impl<K: PartialEq> Statements<K> {
    fn insert(&mut self, key: K, template: String) {
        self.entries.retain(|(k, _)| *k != key);
        if self.entries.len() >= MAX_STATEMENTS {
            self.entries.pop_front();
        }
        self.entries.push_back((key, template));
    }

    fn get<Q: PartialEq + ?Sized>(&self, key: &Q) -> Option<&str>
    where
        K: Borrow<Q>,
    {
        self.entries.iter().find(|(k, _)| k.borrow() == key).map(|(_, t)| t.as_str())
    }

    fn remove<Q: PartialEq + ?Sized>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
    {
        self.entries.retain(|(k, _)| k.borrow() != key);
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn le32(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

/// A NUL-terminated string at the start of `b`, and whether its NUL was captured.
fn cstr(b: &[u8]) -> (&[u8], bool) {
    match b.iter().position(|&c| c == 0) {
        Some(n) => (&b[..n], true),
        None => (b, false),
    }
}

fn template(text: &[u8], dialect: Dialect, cut: bool) -> String {
    let t = sql::normalise_with(&String::from_utf8_lossy(text), dialect, cut);
    if t.is_empty() {
        "empty".into()
    } else {
        t
    }
}

// ---- PostgreSQL ----

/// Frontend message types of the v3 protocol.
const PG_FRONTEND: &[u8] = b"QPBDESHCFXpdcf";
/// PostgreSQL's own limit on a message (1 GB); it also keeps text (`POST `, `DELETE`) from
/// passing for a type and a length.
const PG_MAX_LEN: u32 = 0x3fff_ffff;
/// A message cut by the capture must declare less than this: a MySQL packet read as
/// PostgreSQL declares at least 16 MB (its command byte becomes the length's low byte).
const PG_CUT_MAX_LEN: u32 = 1 << 24;

const PG_PROTOCOL_3: u32 = 196_608;
const PG_SSL_REQUEST: u32 = 80_877_103;
const PG_GSSENC_REQUEST: u32 = 80_877_104;
const PG_CANCEL_REQUEST: u32 = 80_877_102;

/// The operation and command count of a frontend request, or None when it is not one.
fn postgres(req: &[u8], cut: bool, statements: &mut Statements<Vec<u8>>) -> Option<(String, u32)> {
    if let Some(word) = postgres_untyped(req, cut) {
        return Some((word.into(), 1));
    }
    let messages = postgres_messages(req, cut)?;
    let mut statement = None; // template of the first query (Q) or parse (P)
    let mut bound = None; // statement named by the first Bind
    let mut word = None; // housekeeping, when there is no statement
    let mut commands = 0;
    let mut parsed = false;
    for &(kind, body) in &messages {
        match kind {
            b'Q' => {
                commands += 1;
                let (query, whole) = cstr(body);
                statement.get_or_insert_with(|| template(query, Dialect::Standard, !whole));
            }
            // Statement name, then the query.
            b'P' => {
                let (name, _) = cstr(body);
                if let Some((query, whole)) = body.get(name.len() + 1..).map(cstr) {
                    let t = template(query, Dialect::Standard, !whole);
                    // The unnamed statement ("") too: a later Bind may use it.
                    statements.insert(name.to_vec(), t.clone());
                    statement.get_or_insert(t);
                    parsed = true;
                }
            }
            // Portal name, then the statement's.
            b'B' => {
                let (portal, _) = cstr(body);
                if let Some((name, true)) = body.get(portal.len() + 1..).map(cstr) {
                    bound.get_or_insert(name);
                }
            }
            b'E' => commands += 1,
            // Close of a statement ('S') rather than a portal ('P').
            b'C' => {
                if let Some((b'S', rest)) = body.split_first() {
                    if let (name, true) = cstr(rest) {
                        statements.remove(name);
                    }
                }
            }
            _ => {}
        }
        if word.is_none() {
            word = postgres_word(kind);
        }
    }
    let operation = statement
        .or_else(|| bound.map(|name| statements.get(name).unwrap_or("prepared").to_string()))
        .unwrap_or_else(|| word.unwrap_or("sync").to_string());
    // Only a Parse without an Execute prepares; any other call is at least one command.
    Some((operation, if parsed && commands == 0 { 0 } else { commands.max(1) }))
}

/// The operation of a call without a statement, by the message types it holds.
fn postgres_word(kind: u8) -> Option<&'static str> {
    match kind {
        b'C' => Some("close"),
        b'X' => Some("terminate"),
        b'p' => Some("connect"),
        b'd' | b'c' | b'f' => Some("copy"),
        b'F' => Some("function"),
        _ => None, // D, S, H: describe, sync, flush
    }
}

/// The untyped first messages: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.
fn postgres_untyped(req: &[u8], cut: bool) -> Option<&'static str> {
    if req.len() < 8 {
        return None;
    }
    let (len, code) = (be32(req) as usize, be32(&req[4..]));
    let fits = if cut { len >= req.len() } else { len == req.len() };
    match (len, code) {
        _ if !fits => None,
        (8, PG_SSL_REQUEST | PG_GSSENC_REQUEST) => Some("connect"),
        (16, PG_CANCEL_REQUEST) => Some("cancel"),
        // The server refuses startup packets over 10000 bytes.
        (9..=10_000, PG_PROTOCOL_3) => Some("connect"),
        _ => None,
    }
}

/// The (type, body) messages of `req` when all of it is a chain of frontend messages; the last
/// may be cut when `cut`.
fn postgres_messages(req: &[u8], cut: bool) -> Option<Vec<(u8, &[u8])>> {
    let mut messages = Vec::new();
    let mut rest = req;
    while let Some(&kind) = rest.first() {
        if !PG_FRONTEND.contains(&kind) {
            return None;
        }
        if rest.len() < 5 {
            // The capture ended inside the header.
            if !cut {
                return None;
            }
            break;
        }
        let len = be32(&rest[1..]);
        if !(4..=PG_MAX_LEN).contains(&len) {
            return None;
        }
        let total = 1 + len as usize;
        if rest.len() < total {
            if !cut || len >= PG_CUT_MAX_LEN {
                return None;
            }
            messages.push((kind, &rest[5..]));
            break;
        }
        let body = &rest[5..total];
        if !postgres_body_ok(kind, body) {
            return None;
        }
        messages.push((kind, body));
        rest = &rest[total..];
    }
    (!messages.is_empty()).then_some(messages)
}

/// Shape checks on a whole message, so that other bytes do not pass for PostgreSQL.
fn postgres_body_ok(kind: u8, body: &[u8]) -> bool {
    let nuls = body.iter().filter(|&&b| b == 0).count();
    match kind {
        b'Q' => body.last() == Some(&0),
        b'P' | b'B' => nuls >= 2,
        // Portal name, then the int32 row limit.
        b'E' => body.len() >= 5 && body[body.len() - 5] == 0,
        b'D' | b'C' => matches!(body.first(), Some(b'S' | b'P')) && body.last() == Some(&0),
        b'S' | b'H' | b'X' | b'c' => body.is_empty(),
        _ => true,
    }
}

/// An ErrorResponse among the backend messages, walked by their lengths as far as captured.
fn postgres_error(resp: &[u8]) -> bool {
    let mut pos = 0;
    while let Some(&kind) = resp.get(pos) {
        if kind == b'E' {
            return true;
        }
        let Some(len) = resp.get(pos + 1..pos + 5).map(be32) else { break };
        if len < 4 {
            break;
        }
        pos = pos.saturating_add(1 + len as usize);
    }
    false
}

// ---- MySQL / MariaDB ----

const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_PING: u8 = 0x0e;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;
/// Command bytes above this are not MySQL commands.
const COM_LAST: u8 = 0x1f;

/// The operation of a client packet, or None when it is not one. `known`: the connection is
/// already known to be MySQL (then a sequence-1 packet is the handshake response).
fn mysql(req: &[u8], cut: bool, resp: &[u8], known: bool, statements: &mut Statements<u32>) -> Option<String> {
    if req.len() < 5 {
        return None;
    }
    let len = u32::from_le_bytes([req[0], req[1], req[2], 0]) as usize;
    let payload = &req[4..];
    let fits = if cut { len >= payload.len() } else { len == payload.len() };
    if !fits {
        return None;
    }
    match req[3] {
        0 => {}
        1 if known => return Some("connect".into()),
        _ => return None,
    }
    let body = &payload[1..];
    let operation = match payload[0] {
        COM_QUIT => "quit".into(),
        COM_INIT_DB => "use".into(),
        COM_PING => "ping".into(),
        COM_QUERY => {
            // With CLIENT_QUERY_ATTRIBUTES the text follows a parameter count (0) and set count (1).
            let text = body.strip_prefix(&[0, 1]).unwrap_or(body);
            template(text, Dialect::Mysql, cut)
        }
        COM_STMT_PREPARE => {
            let t = template(body, Dialect::Mysql, cut);
            if let Some(id) = mysql_prepare_ok(resp) {
                statements.insert(id, t.clone());
            }
            t
        }
        COM_STMT_EXECUTE => le32(body).and_then(|id| statements.get(&id)).unwrap_or("prepared").into(),
        COM_STMT_CLOSE => {
            if let Some(id) = le32(body) {
                statements.remove(&id);
            }
            "close".into()
        }
        COM_STMT_RESET => "reset".into(),
        0..=COM_LAST => "command".into(),
        _ => return None,
    };
    Some(operation)
}

/// The statement id of a COM_STMT_PREPARE_OK reply (a 12-byte payload starting 0x00).
fn mysql_prepare_ok(resp: &[u8]) -> Option<u32> {
    match resp {
        [12, 0, 0, 1, 0, rest @ ..] => le32(rest),
        _ => None,
    }
}

/// The server's first packet: a protocol-10 greeting with a version string, or an error (e.g.
/// "Too many connections").
fn mysql_greeting(resp: &[u8]) -> bool {
    let Some(payload) = resp.get(4..).filter(|p| !p.is_empty()) else { return false };
    let len = u32::from_le_bytes([resp[0], resp[1], resp[2], 0]) as usize;
    if resp[3] != 0 || len < payload.len() {
        return false;
    }
    match payload[0] {
        0x0a => match cstr(&payload[1..]) {
            (version, true) => (1..=64).contains(&version.len()) && version.iter().all(|b| (0x20..0x7f).contains(b)),
            _ => false,
        },
        0xff => payload.len() >= 3,
        _ => false,
    }
}

// ---- TLS ----

/// A TLS record header: content type (change_cipher_spec, alert, handshake, application data),
/// version 3.x, and a length within the record limit when captured.
fn tls_record(b: &[u8]) -> bool {
    let header = matches!(b, [0x14..=0x17, 0x03, 0x00..=0x04, ..]);
    let len_ok = b.get(3..5).is_none_or(|l| u16::from_be_bytes([l[0], l[1]]) <= (1 << 14) + 2048);
    header && len_ok
}

// ---- HTTP/1.x ----

const HTTP_METHODS: [&[u8]; 9] = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"];

/// The method of an HTTP/1.x request line.
fn http(req: &[u8], cut: bool) -> Option<String> {
    let sp = req.iter().position(|&b| b == b' ')?;
    let method = &req[..sp];
    if !(1..=16).contains(&method.len()) || !method.iter().all(u8::is_ascii_uppercase) {
        return None;
    }
    let rest = &req[sp + 1..];
    let target = rest.iter().position(|b| !b.is_ascii_graphic()).unwrap_or(rest.len());
    let ok = match &rest[target..] {
        _ if target == 0 => false,
        // A long target the capture cut: only a known method tells it is HTTP.
        [] => cut && HTTP_METHODS.contains(&method),
        [b' ', version @ ..] => http_version(version, cut),
        _ => false,
    };
    ok.then(|| String::from_utf8_lossy(method).into_owned())
}

fn http_version(v: &[u8], cut: bool) -> bool {
    const PREFIX: &[u8] = b"HTTP/1.";
    match v.get(PREFIX.len()) {
        None => cut && PREFIX.starts_with(v),
        Some(d) => v.starts_with(PREFIX) && d.is_ascii_digit() && matches!(v.get(PREFIX.len() + 1), None | Some(b'\r' | b'\n')),
    }
}

/// A 5xx status line.
fn http_error(resp: &[u8]) -> bool {
    match resp {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', _, b' ', d @ b'0'..=b'9', b'0'..=b'9', b'0'..=b'9', ..] => *d >= b'5',
        _ => false,
    }
}

// ---- Redis (RESP) ----

/// Why a RESP value could not be read.
#[derive(Debug)]
enum Resp {
    /// The capture ended inside it.
    Cut,
    /// Not RESP.
    Bad,
}

/// The operation and command count of RESP commands: arrays of bulk strings (what clients
/// send), or inline commands (`PING\r\n`, only when a RESP reply was read).
fn redis(req: &[u8], resp: &[u8]) -> Option<(String, u32)> {
    let mut names: Vec<&[u8]> = Vec::new();
    let mut commands = 0;
    let mut pos = 0;
    while pos < req.len() {
        let step = if req[pos] == b'*' { redis_array(req, pos, &mut names) } else { redis_inline(req, pos, &mut names) };
        match step {
            Ok(end) => {
                commands += 1;
                pos = end;
            }
            // The array's start is visible: it counts.
            Err(Resp::Cut) => {
                commands += 1;
                break;
            }
            Err(Resp::Bad) if commands == 0 => return None,
            Err(Resp::Bad) => break,
        }
    }
    let first = *names.first()?;
    // Inline text could be many protocols: only a RESP reply tells it is Redis.
    if req[0] != b'*' && !resp.first().is_some_and(|b| b"+-:$*_,#!=(%~>|".contains(b)) {
        return None;
    }
    let operation = if names.iter().all(|n| n.eq_ignore_ascii_case(first)) {
        String::from_utf8_lossy(first).to_ascii_uppercase()
    } else {
        "PIPELINE".into()
    };
    Some((operation, commands))
}

/// One `*<n>\r\n$<len>\r\n<name>\r\n...` command at `pos`; its end. Its name goes to `names`
/// when fully captured.
fn redis_array<'a>(buf: &'a [u8], pos: usize, names: &mut Vec<&'a [u8]>) -> Result<usize, Resp> {
    let (n, mut p) = resp_int(buf, pos + 1)?;
    if n < 1 {
        return Err(Resp::Bad);
    }
    for k in 0..n {
        match buf.get(p) {
            None => return Err(Resp::Cut),
            Some(b'$') => {}
            Some(_) => return Err(Resp::Bad),
        }
        let (len, start) = resp_int(buf, p + 1)?;
        let end = usize::try_from(len).ok().and_then(|l| start.checked_add(l)).ok_or(Resp::Bad)?;
        let data = buf.get(start..end).ok_or(Resp::Cut)?;
        if k == 0 {
            if !command_name(data) {
                return Err(Resp::Bad);
            }
            names.push(data);
        }
        p = crlf(buf, end)?;
    }
    Ok(p)
}

/// One inline command line at `pos`; its end.
fn redis_inline<'a>(buf: &'a [u8], pos: usize, names: &mut Vec<&'a [u8]>) -> Result<usize, Resp> {
    let rest = &buf[pos..];
    let nl = rest.iter().position(|&b| b == b'\n').ok_or(Resp::Bad)?;
    let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
    let name = line.split(|&b| b == b' ').next().unwrap_or_default();
    if !command_name(name) || !line.iter().all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic()) {
        return Err(Resp::Bad);
    }
    names.push(name);
    Ok(pos + nl + 1)
}

/// A command name as clients send it: `GET`, `client`, `JSON.SET`.
fn command_name(name: &[u8]) -> bool {
    (1..=32).contains(&name.len())
        && name[0].is_ascii_alphabetic()
        && name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A decimal integer ending with CRLF at `pos`; the position after the CRLF.
fn resp_int(buf: &[u8], pos: usize) -> Result<(i64, usize), Resp> {
    let rest = buf.get(pos..).ok_or(Resp::Cut)?;
    let digits = rest.iter().take_while(|&&b| b.is_ascii_digit() || b == b'-').count();
    if digits > 18 {
        return Err(Resp::Bad);
    }
    if digits == rest.len() {
        return Err(Resp::Cut);
    }
    let text = std::str::from_utf8(&rest[..digits]).map_err(|_| Resp::Bad)?;
    let n = text.parse().map_err(|_| Resp::Bad)?;
    Ok((n, crlf(buf, pos + digits)?))
}

fn crlf(buf: &[u8], at: usize) -> Result<usize, Resp> {
    match buf.get(at..) {
        None | Some([] | [b'\r']) => Err(Resp::Cut),
        Some([b'\r', b'\n', ..]) => Ok(at + 2),
        Some(_) => Err(Resp::Bad),
    }
}

/// An error reply (`-ERR ...`, RESP3 `!<len>` bulk error) at the top level of the replies, walked
/// as far as captured (a pipeline's replies follow one another).
fn redis_error(resp: &[u8]) -> bool {
    let mut pos = 0;
    while let Some(&kind) = resp.get(pos) {
        if kind == b'-' || kind == b'!' {
            return true;
        }
        match resp_skip(resp, pos, 0) {
            Ok(end) => pos = end,
            Err(_) => break,
        }
    }
    false
}

/// The end of the RESP2/RESP3 value at `pos`.
fn resp_skip(buf: &[u8], pos: usize, depth: u32) -> Result<usize, Resp> {
    // Deep nesting is not worth following (and must not exhaust the stack).
    if depth > 8 {
        return Err(Resp::Bad);
    }
    let kind = *buf.get(pos).ok_or(Resp::Cut)?;
    match kind {
        // Simple string, error, integer, null, double, boolean, big number: one line.
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
            let nl = buf[pos..].iter().position(|&b| b == b'\n').ok_or(Resp::Cut)?;
            Ok(pos + nl + 1)
        }
        // Bulk string, bulk error, verbatim string.
        b'$' | b'!' | b'=' => {
            let (len, start) = resp_int(buf, pos + 1)?;
            let Ok(len) = usize::try_from(len) else { return Ok(start) }; // -1: null
            let end = start.checked_add(len).ok_or(Resp::Bad)?;
            crlf(buf, end)
        }
        // Array, set, push; map and attribute hold pairs.
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let (n, mut p) = resp_int(buf, pos + 1)?;
            let n = if matches!(kind, b'%' | b'|') { n.saturating_mul(2) } else { n };
            for _ in 0..n.max(0) {
                p = resp_skip(buf, p, depth + 1)?;
            }
            Ok(p)
        }
        _ => Err(Resp::Bad),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Protocol::*;

    const REQUEST_CAPTURE: usize = 256;
    const RESPONSE_CAPTURE: usize = 128;

    /// `request` and `response` as the capture would keep them.
    fn classify(conn: &mut Connection, request: &[u8], response: &[u8]) -> Call {
        let cut = request.len() > REQUEST_CAPTURE;
        let request = &request[..request.len().min(REQUEST_CAPTURE)];
        conn.classify(request, cut, &response[..response.len().min(RESPONSE_CAPTURE)])
    }

    fn one(request: &[u8], response: &[u8]) -> Call {
        classify(&mut Connection::default(), request, response)
    }

    fn call(protocol: Protocol, operation: &str, outcome: Outcome, commands: u32) -> Call {
        Call { protocol, operation: operation.into(), outcome, commands }
    }

    // PostgreSQL messages.
    fn pg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend((body.len() as u32 + 4).to_be_bytes());
        m.extend(body);
        m
    }
    fn cstrs(parts: &[&str]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.bytes().chain([0])).collect()
    }
    fn query(sql: &str) -> Vec<u8> {
        pg(b'Q', &cstrs(&[sql]))
    }
    fn parse(name: &str, sql: &str) -> Vec<u8> {
        pg(b'P', &[cstrs(&[name, sql]), vec![0, 0]].concat())
    }
    fn bind(statement: &str) -> Vec<u8> {
        pg(b'B', &[cstrs(&["", statement]), vec![0, 0, 0, 0, 0, 0]].concat())
    }
    fn execute() -> Vec<u8> {
        pg(b'E', &[0, 0, 0, 0, 0])
    }
    fn sync() -> Vec<u8> {
        pg(b'S', &[])
    }
    fn pg_ok() -> Vec<u8> {
        [pg(b'1', &[]), pg(b'2', &[]), pg(b'C', b"SELECT 1\0"), pg(b'Z', b"I")].concat()
    }
    fn pg_err() -> Vec<u8> {
        [pg(b'E', b"SERROR\0C42P01\0Mrelation \"nope\" does not exist\0\0"), pg(b'Z', b"I")].concat()
    }
    fn startup() -> Vec<u8> {
        let body = [PG_PROTOCOL_3.to_be_bytes().to_vec(), cstrs(&["user", "app", "database", "app", ""])].concat();
        [(body.len() as u32 + 4).to_be_bytes().to_vec(), body].concat()
    }

    // MySQL packets.
    fn my(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_le_bytes();
        [&[len[0], len[1], len[2], seq], payload].concat()
    }
    fn com(cmd: u8, body: &[u8]) -> Vec<u8> {
        my(0, &[&[cmd], body].concat())
    }
    fn my_ok() -> Vec<u8> {
        my(1, &[0, 1, 0, 2, 0, 0, 0])
    }
    fn my_err() -> Vec<u8> {
        my(1, b"\xff\x7a\x04#42S02Table 'app.nope' doesn't exist")
    }
    fn greeting() -> Vec<u8> {
        my(0, &[b"\x0a8.0.36\0".as_slice(), &[0x2a, 0, 0, 0], b"abcdefgh\0\xff\xff"].concat())
    }
    fn prepare_ok(id: u32) -> Vec<u8> {
        my(1, &[&[0], id.to_le_bytes().as_slice(), &[1, 0, 1, 0, 0, 0, 0]].concat())
    }

    #[test]
    fn names() {
        assert_eq!(Postgres.as_str(), "postgresql");
        assert_eq!(Tls.as_str(), "tls");
        assert_eq!(Outcome::Error.as_str(), "error");
    }

    #[test]
    fn postgres_handshake() {
        let mut c = Connection::default();
        let ssl = [8u32.to_be_bytes(), PG_SSL_REQUEST.to_be_bytes()].concat();
        assert_eq!(classify(&mut c, &ssl, b"N"), call(Postgres, "connect", Outcome::Ok, 1));
        assert_eq!(c.protocol(), Some(Postgres));
        assert_eq!(classify(&mut c, &startup(), &pg(b'R', &[0, 0, 0, 10])).operation, "connect");
        assert_eq!(classify(&mut c, &pg(b'p', b"secret\0"), &pg(b'R', &[0, 0, 0, 0])).operation, "connect");
        let gss = [8u32.to_be_bytes(), PG_GSSENC_REQUEST.to_be_bytes()].concat();
        assert_eq!(one(&gss, b"N").operation, "connect");
        assert_eq!(one(&startup(), &pg_err()), call(Postgres, "connect", Outcome::Error, 1));
        assert_eq!(one(&pg(b'X', &[]), b""), call(Postgres, "terminate", Outcome::Ok, 1));
    }

    #[test]
    fn postgres_simple_query() {
        assert_eq!(
            one(&query("SELECT * FROM users WHERE id = 42"), &pg_ok()),
            call(Postgres, "SELECT * FROM users WHERE id = ?", Outcome::Ok, 1)
        );
        assert_eq!(one(&query("SELECT * FROM nope"), &pg_err()).outcome, Outcome::Error);
        assert_eq!(one(&query("BEGIN; UPDATE t SET a = 1; COMMIT"), &pg_ok()).operation, "BEGIN; UPDATE t SET a = ?; COMMIT");
        // Several Q messages in one write.
        let two = [query("SELECT 1"), query("SELECT 2")].concat();
        assert_eq!(one(&two, &pg_ok()), call(Postgres, "SELECT ?", Outcome::Ok, 2));
        // The error comes after other messages.
        let late = [pg(b'T', &[0, 0]), pg(b'D', &[0, 0]), pg_err()].concat();
        assert_eq!(one(&query("SELECT 1"), &late).outcome, Outcome::Error);
    }

    #[test]
    fn postgres_extended_query() {
        let mut c = Connection::default();
        // psycopg 3: unnamed statement, Parse + Bind + Describe + Execute + Sync in one write.
        let req = [parse("", "SELECT * FROM t WHERE id = $1"), bind(""), pg(b'D', b"P\0"), execute(), sync()].concat();
        assert_eq!(classify(&mut c, &req, &pg_ok()), call(Postgres, "SELECT * FROM t WHERE id = ?", Outcome::Ok, 1));
        // A named statement, prepared once and bound later.
        let prepare = [parse("_pg3_1", "UPDATE t SET a = $1 WHERE id = $2"), sync()].concat();
        assert_eq!(classify(&mut c, &prepare, b"1\0\0\0\x04").operation, "UPDATE t SET a = ? WHERE id = ?");
        let run = [bind("_pg3_1"), execute(), sync()].concat();
        assert_eq!(classify(&mut c, &run, &pg_ok()).operation, "UPDATE t SET a = ? WHERE id = ?");
        assert_eq!(classify(&mut c, &[bind("other"), execute(), sync()].concat(), &pg_ok()).operation, "prepared");
        // executemany: one Parse, many Bind + Execute.
        let many = [parse("", "INSERT INTO t VALUES ($1)"), bind(""), execute(), bind(""), execute(), bind(""), execute(), sync()].concat();
        assert_eq!(classify(&mut c, &many, &pg_ok()).commands, 3);
        // A later Bind of the unnamed statement.
        assert_eq!(classify(&mut c, &[bind(""), execute(), sync()].concat(), &pg_ok()).operation, "INSERT INTO t VALUES (?)");
        // Closing the statement forgets it.
        let close = [pg(b'C', b"S_pg3_1\0"), sync()].concat();
        assert_eq!(classify(&mut c, &close, b"3\0\0\0\x04").operation, "close");
        assert_eq!(classify(&mut c, &run, &pg_err()), call(Postgres, "prepared", Outcome::Error, 1));
    }

    #[test]
    fn postgres_cut_request() {
        let long = format!("SELECT {} FROM t WHERE id = 7", (0..60).map(|i| format!("c{i}")).collect::<Vec<_>>().join(", "));
        let c = one(&[query(&long), sync()].concat(), &pg_ok());
        assert_eq!(c.protocol, Postgres);
        assert!(c.operation.starts_with("SELECT c0, c1") && c.operation.ends_with('…'), "{}", c.operation);
        // The last message's header cut.
        let mut req = query(&"x".repeat(248));
        req.extend(&execute()[..3]);
        assert_eq!(one(&req, b"").protocol, Postgres);
        // Not cut, yet incomplete: not PostgreSQL.
        assert_eq!(one(&query("SELECT 1")[..8], b"").protocol, Other);
    }

    #[test]
    fn mysql_connection() {
        let mut c = Connection::default();
        assert_eq!(classify(&mut c, b"", &greeting()), call(Mysql, "connect", Outcome::Ok, 1));
        let handshake = my(1, &[&[0x8d, 0xa6, 0x0f, 0], [0; 28].as_slice(), b"app\0"].concat());
        assert_eq!(classify(&mut c, &handshake, &my(2, &[0, 0, 0, 2, 0, 0, 0])).operation, "connect");
        assert_eq!(classify(&mut c, &com(COM_INIT_DB, b"app"), &my_ok()).operation, "use");
        assert_eq!(classify(&mut c, &com(COM_PING, b""), &my_ok()).operation, "ping");
        assert_eq!(
            classify(&mut c, &com(COM_QUERY, br"SELECT * FROM t WHERE id = 42 AND name = 'O\'Brien'"), &my_ok()),
            call(Mysql, "SELECT * FROM t WHERE id = ? AND name = ?", Outcome::Ok, 1)
        );
        assert_eq!(classify(&mut c, &com(COM_QUERY, b"SELECT * FROM nope"), &my_err()).outcome, Outcome::Error);
        assert_eq!(classify(&mut c, &com(0x1f, b""), &my_ok()).operation, "command");
        assert_eq!(classify(&mut c, &com(COM_QUIT, b""), b"").operation, "quit");
        // Too many connections: an error instead of the greeting.
        let refused = my(0, b"\xff\x10\x04Too many connections");
        assert_eq!(one(b"", &refused), call(Mysql, "connect", Outcome::Error, 1));
    }

    #[test]
    fn mysql_query_attributes_and_cut() {
        let with_attrs = com(COM_QUERY, b"\x00\x01SELECT 1");
        assert_eq!(one(&with_attrs, &my_ok()).operation, "SELECT ?");
        let long = format!("SELECT * FROM t WHERE id IN ({})", (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(", "));
        assert_eq!(one(&com(COM_QUERY, long.as_bytes()), &my_ok()).operation, "SELECT * FROM t WHERE id IN (?…");
    }

    #[test]
    fn mysql_prepared_statements() {
        let mut c = Connection::default();
        classify(&mut c, b"", &greeting());
        let prepare = com(COM_STMT_PREPARE, b"SELECT * FROM t WHERE id = ?");
        assert_eq!(classify(&mut c, &prepare, &prepare_ok(7)).operation, "SELECT * FROM t WHERE id = ?");
        let exec = com(COM_STMT_EXECUTE, &[7, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(classify(&mut c, &exec, &my_ok()), call(Mysql, "SELECT * FROM t WHERE id = ?", Outcome::Ok, 1));
        assert_eq!(classify(&mut c, &com(COM_STMT_RESET, &[7, 0, 0, 0]), &my_ok()).operation, "reset");
        assert_eq!(classify(&mut c, &com(COM_STMT_CLOSE, &[7, 0, 0, 0]), b"").operation, "close");
        assert_eq!(classify(&mut c, &exec, &my_err()), call(Mysql, "prepared", Outcome::Error, 1));
    }

    #[test]
    fn mysql_lengths_must_match() {
        let mut bad = com(COM_QUERY, b"SELECT 1");
        bad[0] += 1;
        assert_eq!(one(&bad, b"").protocol, Other);
        let mut seq = com(COM_QUERY, b"SELECT 1");
        seq[3] = 2;
        assert_eq!(one(&seq, b"").protocol, Other);
        // The handshake response only on a connection known to be MySQL.
        assert_eq!(one(&my(1, &[0; 32]), b"").protocol, Other);
        assert_eq!(one(&com(0x40, b"x"), b"").protocol, Other);
        // A cut query whose length starts with 'Q' (0x151 bytes) is not read as PostgreSQL.
        let q = com(COM_QUERY, format!("SELECT {}", "a".repeat(0x151 - 8)).as_bytes());
        assert_eq!(&q[..5], &[0x51, 0x01, 0, 0, COM_QUERY]);
        assert_eq!(one(&q, &my_ok()).protocol, Mysql);
    }

    #[test]
    fn prepared_statements_are_bounded() {
        let mut c = Connection::default();
        for i in 0..300 {
            let p = [parse(&format!("s{i}"), &format!("SELECT {i} FROM t{i}")), sync()].concat();
            classify(&mut c, &p, b"");
        }
        assert_eq!(c.pg_statements.entries.len(), MAX_STATEMENTS);
        assert_eq!(classify(&mut c, &[bind("s0"), execute(), sync()].concat(), b"").operation, "prepared");
        assert_eq!(classify(&mut c, &[bind("s299"), execute(), sync()].concat(), b"").operation, "SELECT ? FROM t299");
    }

    #[test]
    fn redis_commands() {
        assert_eq!(one(b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n", b"$-1\r\n"), call(Redis, "GET", Outcome::Ok, 1));
        assert_eq!(one(b"*3\r\n$6\r\nclient\r\n$7\r\nsetinfo\r\n$3\r\nlib\r\n", b"+OK\r\n").operation, "CLIENT");
        assert_eq!(
            one(b"*3\r\n$4\r\nLPOP\r\n$1\r\nk\r\n$1\r\n1\r\n", b"-WRONGTYPE Operation against a key\r\n"),
            call(Redis, "LPOP", Outcome::Error, 1)
        );
        assert_eq!(one(b"PING\r\n", b"+PONG\r\n"), call(Redis, "PING", Outcome::Ok, 1));
        // Inline text answered in something else is not Redis.
        assert_eq!(one(b"get foo\r\n", b"END\r\n").protocol, Other);
    }

    #[test]
    fn redis_pipelines() {
        let gets = b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nget\r\n$1\r\nb\r\n";
        assert_eq!(one(gets, b"$1\r\nx\r\n$-1\r\n"), call(Redis, "GET", Outcome::Ok, 2));
        let mixed = b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*1\r\n$4\r\nEXEC\r\n";
        assert_eq!(one(mixed, b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n"), call(Redis, "PIPELINE", Outcome::Ok, 3));
        // An error in any visible reply.
        assert_eq!(one(gets, b"$1\r\nx\r\n-ERR oops\r\n").outcome, Outcome::Error);
        assert_eq!(one(gets, b"*2\r\n$1\r\nx\r\n%1\r\n+a\r\n:1\r\n!5\r\nERR x\r\n").outcome, Outcome::Error);
        // A cut pipeline counts the arrays whose start is visible.
        let sets: Vec<u8> = (0..20).flat_map(|i| format!("*3\r\n$3\r\nSET\r\n$4\r\nk{i:03}\r\n$5\r\nvalue\r\n").into_bytes()).collect();
        let c = one(&sets, b"+OK\r\n");
        assert_eq!((c.operation.as_str(), c.commands), ("SET", 256usize.div_ceil(34) as u32));
    }

    #[test]
    fn http_requests() {
        assert_eq!(one(b"GET /users/1 HTTP/1.1\r\nHost: api\r\n\r\n", b"HTTP/1.1 200 OK\r\n"), call(Http, "GET", Outcome::Ok, 1));
        assert_eq!(one(b"POST /x HTTP/1.0\r\n\r\n", b"HTTP/1.1 503 Service Unavailable\r\n").outcome, Outcome::Error);
        assert_eq!(one(b"PUT /x HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n").outcome, Outcome::Ok);
        assert_eq!(one(b"PURGE /x HTTP/1.1\r\n\r\n", b"").operation, "PURGE");
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(300));
        assert_eq!(one(long.as_bytes(), b"").operation, "GET");
        assert_eq!(one(b"get / HTTP/1.1\r\n", b"").protocol, Other);
        assert_eq!(one(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"").protocol, Other);
    }

    #[test]
    fn tls_sticks() {
        let hello = [&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01][..], &[0; 60]].concat();
        let mut c = Connection::default();
        assert_eq!(classify(&mut c, &hello, &[0x16, 0x03, 0x03, 0x00, 0x40]), call(Tls, "tls", Outcome::Ok, 1));
        assert_eq!(classify(&mut c, b"\x01\x02 continuation", b""), call(Tls, "tls", Outcome::Ok, 1));
        assert_eq!(one(&hello, &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]).outcome, Outcome::Error);
        // PostgreSQL upgraded to TLS stays PostgreSQL.
        let mut pg_conn = Connection::default();
        let ssl = [8u32.to_be_bytes(), PG_SSL_REQUEST.to_be_bytes()].concat();
        classify(&mut pg_conn, &ssl, b"S");
        assert_eq!(classify(&mut pg_conn, &hello, &[0x16, 0x03, 0x03]), call(Postgres, "tls", Outcome::Ok, 1));
        // Encrypted bytes are never read as a MySQL error.
        let mut my_conn = Connection::default();
        classify(&mut my_conn, b"", &greeting());
        assert_eq!(classify(&mut my_conn, &[0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5], &[0x17, 3, 3, 0, 0xff]).outcome, Outcome::Ok);
    }

    #[test]
    fn known_protocols_stick() {
        let mut c = Connection::default();
        classify(&mut c, b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n");
        assert_eq!(classify(&mut c, b"garbage", b"-ERR unknown\r\n"), call(Redis, "other", Outcome::Error, 1));
        assert_eq!(classify(&mut c, b"", b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n"), call(Redis, "unsolicited", Outcome::Ok, 1));
        // Once Redis, a PostgreSQL-looking write is still Redis.
        assert_eq!(classify(&mut c, &query("SELECT 1"), b"").protocol, Redis);
        assert_eq!(one(b"\x00\x01garbage", b""), call(Other, "other", Outcome::Ok, 1));
        assert_eq!(one(b"", b"hello"), call(Other, "unsolicited", Outcome::Ok, 1));
        let mut nothing = Connection::default();
        classify(&mut nothing, b"garbage", b"");
        assert_eq!(nothing.protocol(), None);
    }

    /// xorshift64: deterministic noise without a crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, max: usize) -> Vec<u8> {
            // Half the time from a small alphabet of protocol bytes, so parsers get deeper.
            const ALPHABET: &[u8] = b"*$\r\n0123-+:QPBESX\x00\x01\x03\x04\x16\x17'\"`(),?%/";
            let n = self.below(max + 1);
            let small = self.next().is_multiple_of(2);
            (0..n).map(|_| if small { ALPHABET[self.below(ALPHABET.len())] } else { self.next() as u8 }).collect()
        }
    }

    fn check(conn: &mut Connection, request: &[u8], cut: bool, response: &[u8]) {
        let c = conn.classify(request, cut, response);
        assert!(c.commands >= 1 || c.protocol == Protocol::Postgres, "{c:?}");
        assert!(c.operation.len() <= sql::MAX_TEMPLATE, "{c:?}");
        assert!(!c.operation.is_empty(), "{c:?}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut sticky = Connection::default();
        for _ in 0..20_000 {
            let (req, resp) = (rng.bytes(REQUEST_CAPTURE), rng.bytes(RESPONSE_CAPTURE));
            let cut = rng.next().is_multiple_of(2);
            check(&mut Connection::default(), &req, cut, &resp);
            check(&mut sticky, &req, cut, &resp);
            let sql = String::from_utf8_lossy(&req);
            for dialect in [Dialect::Standard, Dialect::Mysql] {
                assert!(sql::normalise_with(&sql, dialect, cut).len() <= sql::MAX_TEMPLATE);
            }
        }
    }

    #[test]
    fn cut_prefixes_never_panic() {
        let requests = [
            [parse("s1", "SELECT * FROM t WHERE a = $1 AND b = 'x''y'"), bind("s1"), execute(), sync()].concat(),
            query("INSERT INTO t VALUES (1, 'a'), (2, E'b\\'c'), ($$d$$, /* e */ 3)"),
            startup(),
            com(COM_QUERY, b"SELECT `a`, \"b\\\"\" FROM t # c"),
            com(COM_STMT_EXECUTE, &[7, 0, 0, 0, 0, 1, 0, 0, 0]),
            greeting(),
            b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*2\r\n$3\r\nGET\r\n$1\r\na\r\n".to_vec(),
            b"GET /path HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
        ];
        let responses = [pg_ok(), pg_err(), my_err(), prepare_ok(7), greeting(), b"+OK\r\n-ERR x\r\n*2\r\n$1\r\na\r\n:1\r\n".to_vec(), b"HTTP/1.1 500 Oops\r\n".to_vec()];
        let mut sticky = Connection::default();
        for req in &requests {
            for resp in &responses {
                for n in 0..=req.len() {
                    for m in [0, 1, 4, 5, 9, resp.len() / 2, resp.len()] {
                        let resp = &resp[..m.min(resp.len())];
                        check(&mut Connection::default(), &req[..n], n < req.len(), resp);
                        check(&mut Connection::default(), &req[..n], false, resp);
                        check(&mut sticky, &req[..n], n < req.len(), resp);
                    }
                }
            }
        }
    }
}
