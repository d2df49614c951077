"""WSGI app that calls real downstream services with the client libraries applications use:
PostgreSQL through psycopg 3, MySQL/MariaDB through PyMySQL, Redis through redis-py and HTTP
through requests. It logs every call it makes: the ground truth the tests compare against.

Environment:
  DOWNSTREAM_PG_TCP, DOWNSTREAM_PG_UNIX        libpq conninfo strings
  DOWNSTREAM_MYSQL_TCP                         mysql://user@127.0.0.1:PORT/DB
  DOWNSTREAM_MYSQL_UNIX                        mysql://user@localhost/DB?unix_socket=PATH
  DOWNSTREAM_REDIS_TCP, DOWNSTREAM_REDIS_UNIX  redis://127.0.0.1:PORT/0, unix:///PATH
  DOWNSTREAM_HTTP                              base URL of tests/apps/backend.py (keep-alive)
  DOWNSTREAM_THREADS                           connection sets to open, one per server thread (default 1)
  DOWNSTREAM_PG_PREPARE_THRESHOLD              psycopg's prepare_threshold: a number or "none"
                                               (default psycopg's, 5; see below)
  DOWNSTREAM_LOG                               file the ground truth is appended to (optional)
  DOWNSTREAM_HOSTILE                           garbage,truncated,silent peers as host:port (optional)

Connections: every connection is opened when the module is imported, i.e. in each worker as it
boots (do not use gunicorn --preload: forked workers would share sockets), before a profiler
attaches to the running server. DOWNSTREAM_THREADS sets of connections (each: PostgreSQL,
MySQL and Redis over TCP and over the UNIX socket, and a requests.Session holding one
keep-alive connection to the backend) wait in a queue; a request takes one set for its
duration, so threads never share a connection. Give gthread workers as many sets as
--threads. Only /pg/fresh opens (and closes) a connection during a request, and each /hostile
route opens its own at its first request.
psycopg and PyMySQL run in autocommit mode: no implicit BEGIN/COMMIT round trips.

On the wire: psycopg sends a query with parameters as Parse/Bind/Describe/Execute/Sync in one
write, one without as a simple Query. Once a connection has run the same query
prepare_threshold times, psycopg prepares it: that execution first sends Parse with a statement
name (_pg3_0...) and Sync, one extra round trip, and every later one only Bind (naming the
statement)/Describe/Execute/Sync, without the SQL. PyMySQL interpolates parameters itself and
writes each query in one send. redis-py 8 speaks RESP3 (HELLO 3 at connect) and checks the
pooled connection with a non-blocking recv (EAGAIN) before each command; its incr() sends
INCRBY. requests polls the kept-alive socket (timeout 0) before reusing it.

Routes (via=tcp|unix picks the transport where it applies, default tcp; n= counts):
  /pg/one?id=      one SELECT with a parameter (extended protocol)
  /pg/simple       one SELECT without parameters (simple query protocol)
  /pg/nplus1?n=25  n SELECTs by id
  /pg/batched?n=25 one SELECT ... WHERE id = ANY($1)
  /pg/error        a SELECT on a missing table (caught: 200 "error")
  /pg/fresh        connect over TCP, one SELECT, close
  /mysql/one?id=, /mysql/nplus1?n=25, /mysql/batched?n=25, /mysql/error   the same on MariaDB
  /redis/one       one GET;   /redis/many?n=20  n GETs;   /redis/pipeline?n=10  one pipeline of n GETs
  /redis/error     INCRBY on a string that is not a number (-ERR, caught)
  /http/one        GET backend /ok;  /http/error  GET backend /fail (503);  /http/slow?ms=  backend /slow
  /cpu?ms=N        N ms of this thread's CPU time, no call
  /hostile/garbage, /hostile/truncated, /hostile/silent   (DOWNSTREAM_HOSTILE) a Redis PING to a
                   peer that answers garbage, a truncated reply, or nothing within 50 ms
  /pg/distinct?n=&from=   n statements with n distinct templates (a column alias each)
  /mixed           one PostgreSQL SELECT, two Redis GETs, one HTTP GET and ~2 ms of CPU

Ground truth (DOWNSTREAM_LOG), one JSON object per line:
  {"kind": "ready", "pid", "threads"}    a worker opened its connections (at import)
  {"kind": "call", "pid", "tid", "route", "protocol": "postgresql|mysql|redis|http",
   "transport": "tcp|unix", "operation", "outcome": "ok|error", "start_ns", "end_ns", "commands"}
    operation: the SQL text as sent (psycopg: %s sent as $1, $2...; PyMySQL: parameters
    interpolated by the client), the Redis command name (a pipeline: its commands' name, with
    "commands" the number of commands), the HTTP method ("status" is added for HTTP; 4xx and
    5xx are errors), or "connect"/"terminate" around opening and closing a connection.
    start_ns/end_ns: time.monotonic_ns() around the library call; tid: threading.get_native_id().
    wire_start_ns/wire_end_ns: time.monotonic_ns() before the call's first byte was written and
    after its response's last byte was read, taken in socket.socket's send/recv methods (redis-py,
    PyMySQL, requests) or around psycopg's calls into libpq's C functions (psycopg runs on its
    Python binding to libpq, PSYCOPG_IMPL=python, for that): the span wsgiscope measures, without the client
    library's own encoding and decoding.
  {"kind": "request", "pid", "tid", "route", "start_ns", "end_ns", "thread_cpu_ns",
   "downstream_ns", "calls"}
    thread_cpu_ns: time.thread_time_ns() from the WSGI call to the hand-over of its body's block;
    downstream_ns: the sum of its calls' durations; calls: how many call lines it has.
A request's lines are written together, in one write(2) on an O_APPEND descriptor, once its
body has been iterated: no log write happens between its downstream calls.
"""
import itertools
import json
import os
import queue
import re
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

# psycopg on its Python binding to libpq (the same libpq, the same bytes on the wire): its
# calls into libpq can be timed below, which the compiled binding's cannot.
os.environ["PSYCOPG_IMPL"] = "python"
import psycopg
import psycopg.pq._pq_ctypes as libpq
import pymysql
import redis
import requests

TRANSPORTS = ("tcp", "unix")
PG = {t: os.environ["DOWNSTREAM_PG_" + t.upper()] for t in TRANSPORTS}
MYSQL = {t: os.environ["DOWNSTREAM_MYSQL_" + t.upper()] for t in TRANSPORTS}
REDIS = {t: os.environ["DOWNSTREAM_REDIS_" + t.upper()] for t in TRANSPORTS}
HTTP = os.environ["DOWNSTREAM_HTTP"].rstrip("/")
THREADS = int(os.environ.get("DOWNSTREAM_THREADS", "1"))
HOSTILE = os.environ.get("DOWNSTREAM_HOSTILE")
_threshold = os.environ.get("DOWNSTREAM_PG_PREPARE_THRESHOLD")
PG_OPTIONS = {"autocommit": True}
if _threshold:
    PG_OPTIONS["prepare_threshold"] = None if _threshold == "none" else int(_threshold)

_log_path = os.environ.get("DOWNSTREAM_LOG")
_log_fd = os.open(_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _log_path else None


# Wire time: when a call's first byte went out and its response's last byte came in, taken at
# the socket: the span the agent measures (the library call around it adds the client's own
# encoding and decoding). Python sockets (redis-py, PyMySQL, requests) are timed in
# socket.socket; psycopg's libpq does its I/O in C, so its calls into libpq that write and read
# are timed instead.
_wire = threading.local()


def _sent_first():
    if getattr(_wire, "on", False) and _wire.first is None:
        _wire.first = time.monotonic_ns()


def _received_last():
    if getattr(_wire, "on", False):
        _wire.last = time.monotonic_ns()


def _timed_send(send):
    def timed(self, *args, **kwargs):
        _sent_first()
        return send(self, *args, **kwargs)
    return timed


def _timed_recv(recv):
    def timed(self, *args, **kwargs):
        r = recv(self, *args, **kwargs)
        n = r if isinstance(r, int) else len(r) if isinstance(r, bytes) else r[0] if isinstance(r[0], int) else len(r[0])
        if n:
            _received_last()
        return r
    return timed


for _name in ("send", "sendall", "sendto", "sendmsg"):
    setattr(socket.socket, _name, _timed_send(getattr(socket.socket, _name)))
for _name in ("recv", "recv_into", "recvfrom", "recvfrom_into", "recvmsg", "recvmsg_into"):
    setattr(socket.socket, _name, _timed_recv(getattr(socket.socket, _name)))


def _timed_libpq(fn, writes, reads):
    def timed(*args):
        if writes:
            _sent_first()
        r = fn(*args)
        if reads:
            _received_last()
        return r
    return timed


# The libpq functions (as the binding calls them, right at the C call) that write (a query is
# sent as soon as it is queued), read, or both (the handshake).
for _name, _writes, _reads in [("PQsendQuery", True, False), ("PQsendQueryParams", True, False),
                               ("PQsendPrepare", True, False), ("PQsendQueryPrepared", True, False),
                               ("PQflush", True, False), ("PQconsumeInput", False, True),
                               ("PQconnectPoll", True, True), ("PQfinish", True, False)]:
    setattr(libpq, _name, _timed_libpq(getattr(libpq, _name), _writes, _reads))


def _log(records):
    if _log_fd is not None:
        os.write(_log_fd, "".join(json.dumps(r) + "\n" for r in records).encode())


def _mysql_connect(url):
    u = urlsplit(url)
    socket = parse_qs(u.query).get("unix_socket")
    where = {"unix_socket": socket[0]} if socket else {"host": u.hostname, "port": u.port or 3306}
    return pymysql.connect(user=u.username, password=u.password or "", database=u.path.lstrip("/"),
                           autocommit=True, **where)


def _redis_client(url):
    # A pool of one connection per client: commands and pipelines share it, and a second
    # connection would be an error ("Too many connections") rather than a silent new socket.
    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, max_connections=1))
    client.ping()  # connects now, not at the first request
    return client


class Connections:
    """What one server thread uses: one connection per service and transport, one session."""

    def __init__(self):
        self.pg = {t: psycopg.connect(PG[t], **PG_OPTIONS) for t in TRANSPORTS}
        self.mysql = {t: _mysql_connect(MYSQL[t]) for t in TRANSPORTS}
        self.redis = {t: _redis_client(REDIS[t]) for t in TRANSPORTS}
        self.http = requests.Session()
        # Opens the session's keep-alive connection now.
        self.http.get(HTTP + "/ok", timeout=10).raise_for_status()
        # Hostile peers (DOWNSTREAM_HOSTILE: garbage,truncated,silent as host:port each, an
        # IPv6 one as [::1]:port), connected at their route's first request (see _hostile).
        self.hostile = {}
        self.hostile_addr = {}
        if HOSTILE:
            for name, addr in zip(("garbage", "truncated", "silent"), HOSTILE.split(",")):
                host, port = addr.rsplit(":", 1)
                self.hostile_addr[name] = (host.strip("[]"), int(port))


_pool = queue.Queue()
for _ in range(THREADS):
    _pool.put(Connections())
_log([{"kind": "ready", "pid": os.getpid(), "threads": THREADS}])

# The request a thread is serving: its route and the calls made so far.
_current = threading.local()


def _call(protocol, transport, operation, fn, commands=1):
    """Runs fn (one downstream call), timed and recorded for the current request."""
    rec = {"kind": "call", "pid": os.getpid(), "tid": threading.get_native_id(),
           "route": _current.route, "protocol": protocol, "transport": transport,
           "operation": operation, "outcome": "ok", "commands": commands}
    _wire.on, _wire.first, _wire.last = True, None, None
    start = time.monotonic_ns()
    try:
        return fn()
    except Exception:
        rec["outcome"] = "error"
        raise
    finally:
        end = time.monotonic_ns()
        _wire.on = False
        rec["start_ns"], rec["end_ns"] = start, end
        # A call with nothing on the wire (none here) would keep the library call's span; one
        # without a response (PostgreSQL's Terminate) is its write alone, which PQfinish does
        # not let us time apart from its close: logged as taking no time.
        rec["wire_start_ns"] = _wire.first if _wire.first is not None else start
        rec["wire_end_ns"] = _wire.last if _wire.last is not None else rec["wire_start_ns"]
        _current.calls.append(rec)


def _numbered(sql):
    """The query as psycopg sends it with parameters: each %s becomes $1, $2..."""
    n = itertools.count(1)
    return re.sub("%s", lambda _: "$%d" % next(n), sql)


def _pg(conn, transport, sql, params=None):
    sent = _numbered(sql) if params is not None else sql
    return _call("postgresql", transport, sent, lambda: conn.execute(sql, params).fetchall())


def _mysql(conn, transport, sql, params=None):
    with conn.cursor() as cur:
        sent = cur.mogrify(sql, params)  # exactly what execute() sends

        def run():
            cur.execute(sent)
            return cur.fetchall()

        return _call("mysql", transport, sent, run)


def _http(c, path):
    def run():
        r = c.http.get(HTTP + path, timeout=30)
        if r.status_code >= 400:
            raise requests.HTTPError(response=r)
        return r

    try:
        r = _call("http", "tcp", "GET", run)
    except requests.HTTPError as e:
        r = e.response
    _current.calls[-1]["status"] = r.status_code
    return r


def _ids(n):
    return [i % 100 + 1 for i in range(n)]


def _burn(ms):
    end = time.thread_time_ns() + ms * 1_000_000
    while time.thread_time_ns() < end:
        pass


ONE = "SELECT name FROM items WHERE id = %s"
MISSING = "SELECT name FROM no_such_table"


def pg_one(q, c, t):
    return _pg(c.pg[t], t, ONE, (int(q.get("id", 1)),))[0][0].encode()


def pg_simple(q, c, t):
    return b"%d" % _pg(c.pg[t], t, "SELECT count(*) FROM items")[0][0]


def pg_nplus1(q, c, t):
    names = [_pg(c.pg[t], t, ONE, (i,))[0][0] for i in _ids(int(q.get("n", 25)))]
    return b"%d" % len(names)


def pg_batched(q, c, t):
    rows = _pg(c.pg[t], t, "SELECT name FROM items WHERE id = ANY(%s)", (_ids(int(q.get("n", 25))),))
    return b"%d" % len(rows)


def pg_error(q, c, t):
    try:
        _pg(c.pg[t], t, MISSING)
    except psycopg.Error:
        return b"error"
    return b"no error"


def pg_fresh(q, c, t):
    conn = _call("postgresql", "tcp", "connect", lambda: psycopg.connect(PG["tcp"], **PG_OPTIONS))
    try:
        name = _pg(conn, "tcp", ONE, (1,))[0][0]
    finally:
        _call("postgresql", "tcp", "terminate", conn.close)
    return name.encode()


def mysql_one(q, c, t):
    return _mysql(c.mysql[t], t, ONE, (int(q.get("id", 1)),))[0][0].encode()


def mysql_nplus1(q, c, t):
    names = [_mysql(c.mysql[t], t, ONE, (i,))[0][0] for i in _ids(int(q.get("n", 25)))]
    return b"%d" % len(names)


def mysql_batched(q, c, t):
    rows = _mysql(c.mysql[t], t, "SELECT name FROM items WHERE id IN %s", (_ids(int(q.get("n", 25))),))
    return b"%d" % len(rows)


def mysql_error(q, c, t):
    try:
        _mysql(c.mysql[t], t, MISSING)
    except pymysql.Error:
        return b"error"
    return b"no error"


def redis_one(q, c, t):
    return _call("redis", t, "GET", lambda: c.redis[t].get("item:1"))


def redis_many(q, c, t):
    values = [_call("redis", t, "GET", lambda i=i: c.redis[t].get("item:%d" % i)) for i in _ids(int(q.get("n", 20)))]
    return b"%d" % len(values)


def redis_pipeline(q, c, t):
    pipe = c.redis[t].pipeline(transaction=False)
    ids = _ids(int(q.get("n", 10)))
    for i in ids:
        pipe.get("item:%d" % i)
    return b"%d" % len(_call("redis", t, "GET", pipe.execute, commands=len(ids)))


def redis_error(q, c, t):
    try:
        # redis-py's incr() sends INCRBY key 1.
        _call("redis", t, "INCRBY", lambda: c.redis[t].incr("text"))
    except redis.ResponseError:
        return b"error"
    return b"no error"


def http_one(q, c, t):
    return _http(c, "/ok").content


def http_error(q, c, t):
    _http(c, "/fail")
    return b"error"


def http_slow(q, c, t):
    return _http(c, "/slow?ms=%d" % int(q.get("ms", 50))).content


def cpu(q, c, t):
    _burn(int(q.get("ms", 10)))
    return b"burnt"


PING = b"*1\r\n$4\r\nPING\r\n"


def _hostile(c, name):
    # One Redis PING to a peer that answers garbage, a truncated reply, or nothing (50 ms);
    # read once: whatever comes is the answer. No error reply on the wire: logged as ok. The
    # connection is opened at the route's first request, while a profiler watches: it learns
    # the peer from the connect itself, not from the sockets it finds when it attaches.
    if name not in c.hostile:
        c.hostile[name] = socket.create_connection(c.hostile_addr[name], timeout=10)
    sock = c.hostile[name]

    def run():
        sock.settimeout(0.05)
        sock.sendall(PING)
        try:
            return sock.recv(4096)
        except socket.timeout:
            return b""

    return b"%d" % len(_call("redis", "tcp", "PING", run))


def hostile_garbage(q, c, t):
    return _hostile(c, "garbage")


def hostile_truncated(q, c, t):
    return _hostile(c, "truncated")


def hostile_silent(q, c, t):
    return _hostile(c, "silent")


def pg_distinct(q, c, t):
    # n statements that normalise to n distinct templates (a column alias each), from `from`.
    first, n = int(q.get("from", 0)), int(q.get("n", 1000))
    for i in range(first, first + n):
        _pg(c.pg[t], t, "SELECT name AS c%d FROM items WHERE id = 1" % i)
    return b"%d" % n


def mixed(q, c, t):
    _pg(c.pg[t], t, ONE, (1,))
    _call("redis", t, "GET", lambda: c.redis[t].get("item:1"))
    _call("redis", t, "GET", lambda: c.redis[t].get("item:2"))
    _http(c, "/ok")
    _burn(2)
    return b"mixed"


ROUTES = {
    "/pg/one": pg_one, "/pg/simple": pg_simple, "/pg/nplus1": pg_nplus1, "/pg/batched": pg_batched,
    "/pg/error": pg_error, "/pg/fresh": pg_fresh,
    "/mysql/one": mysql_one, "/mysql/nplus1": mysql_nplus1, "/mysql/batched": mysql_batched,
    "/mysql/error": mysql_error,
    "/redis/one": redis_one, "/redis/many": redis_many, "/redis/pipeline": redis_pipeline,
    "/redis/error": redis_error,
    "/http/one": http_one, "/http/error": http_error, "/http/slow": http_slow,
    "/cpu": cpu, "/mixed": mixed,
    "/hostile/garbage": hostile_garbage, "/hostile/truncated": hostile_truncated,
    "/hostile/silent": hostile_silent, "/pg/distinct": pg_distinct,
}


def app(environ, start_response):
    start, cpu0 = time.monotonic_ns(), time.thread_time_ns()  # the CPU span inside the wall span
    route = environ.get("PATH_INFO", "")
    _current.route, _current.calls = route, []
    handler = ROUTES.get(route)
    if route == "/cpu/stream":
        ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["2"])[-1])
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return _stream(ms, route, start, cpu0)
    if handler is None:
        status, body = "404 Not Found", b"not found"
    else:
        q = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        transport = q.get("via", "tcp")
        if transport not in TRANSPORTS:
            raise ValueError("via=%s: tcp or unix" % transport)
        conns = _pool.get()
        try:
            status, body = "200 OK", handler(q, conns, transport)
        finally:
            _pool.put(conns)
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return _respond(body, route, start, cpu0)


def _stream(ms, route, start, cpu0):
    # Two blocks, the worker off CPU (a sleep) and then on it (`ms` of CPU) between them: its
    # CPU time runs to the hand-over of the second block, which the server writes after.
    yield b"a"
    time.sleep(0.005)
    _burn(ms)
    cpu, end = time.thread_time_ns() - cpu0, time.monotonic_ns()
    yield b"b"
    _log([{"kind": "request", "pid": os.getpid(), "tid": threading.get_native_id(), "route": route,
           "start_ns": start, "end_ns": end, "thread_cpu_ns": cpu, "downstream_ns": 0, "calls": 0}])


def _respond(body, route, start, cpu0):
    # CPU and wall time up to the hand-over of the (only) block: the server writes it after, so
    # this span lies inside the agent's (first byte read to last byte written).
    cpu, end = time.thread_time_ns() - cpu0, time.monotonic_ns()
    # The request is logged once its body has been iterated (or the server closed it early).
    try:
        yield body
    finally:
        calls = _current.calls
        _log(calls + [{"kind": "request", "pid": os.getpid(), "tid": threading.get_native_id(),
                       "route": route, "start_ns": start, "end_ns": end, "thread_cpu_ns": cpu,
                       "downstream_ns": sum(c["end_ns"] - c["start_ns"] for c in calls),
                       "calls": len(calls)}])
