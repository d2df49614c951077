"""WSGI test and demo app for wsgiscope.

Routes cover the shapes of output the WSGI literature measures: one block, a slow handler,
many blocks, one-byte blocks, one big block, an exception, and wsgi.file_wrapper (sendfile).

With TESTAPP_REDIS (a redis:// or unix:// URL) and TESTAPP_BACKEND (the base URL of an HTTP
service answering /ok, such as tests/apps/backend.py), two routes make downstream calls on
connections opened at import: /redis?n=N (N GETs: an N+1 from 20 on) and /api (two Redis
GETs, one HTTP call, about 2 ms of CPU).

The app wraps itself in a small counting/timing middleware: the ground truth the tests compare
wsgiscope against. When WSGISCOPE_TRUTH_LOG is set, the middleware appends one JSON line per
request: route, status, blocks yielded, bytes, elapsed seconds, worker pid.
"""
import gc
import json
import os
import tempfile
import time

FILE_SIZE = 200 * 1024
_file_path = os.path.join(tempfile.gettempdir(), "wsgiscope-testapp-%d.bin" % os.getpid())


def _file():
    if not os.path.exists(_file_path):
        with open(_file_path, "wb") as f:
            f.write(b"f" * FILE_SIZE)
    return _file_path


def _query(environ):
    return dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello World!"]


def sleep(environ, start_response):
    # /sleep?ms=N sleeps N ms (default 50).
    ms = int(_query(environ).get("ms", "50"))
    time.sleep(ms / 1000)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slept %d ms" % ms]


def hang(environ, start_response):
    # Long enough for a test to kill the worker mid-request.
    time.sleep(30)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]


def blocks(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def gen():
        for _ in range(1000):
            yield b"b" * 128

    return gen()


def bytes1(environ, start_response):
    # The "string as iterable" mistake: 102,400 one-byte blocks.
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [b"x"] * (100 * 1024)


def big(environ, start_response):
    # One block of /big?mb=N MiB (default 1).
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [b"B" * (int(_query(environ).get("mb", "1")) * 1024 * 1024)]


def error(environ, start_response):
    raise RuntimeError("wsgiscope test: deliberate failure")


def file(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(FILE_SIZE))])
    environ["testapp.sendfile"] = True
    return environ["wsgi.file_wrapper"](open(_file(), "rb"), 65536)


def upload(environ, start_response):
    # Reads the whole body; /upload?fail=1 then fails (a 500 after a 100-continue upload).
    n = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(n)
    if _query(environ).get("fail"):
        raise RuntimeError("wsgiscope test: upload failed on purpose")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d" % len(body)]


def segv(environ, start_response):
    # A real crash: the worker dereferences NULL.
    import ctypes
    ctypes.string_at(0)


def exit3(environ, start_response):
    # The worker exits with status 3 mid-request.
    os._exit(3)


def page(environ, start_response):
    # A catch-all that answers 200 for any path below /page/ (a CMS or an SPA fallback): what
    # a scanner turns into thousands of distinct successful paths.
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"page"]


_live = []


def gc_route(environ, start_response):
    # /gc?n=N&live=L: N self-referencing lists (cyclic garbage; automatic collections run
    # while they are allocated), then a full collection, which traverses L live objects kept
    # across requests (so full collections take milliseconds).
    q = _query(environ)
    live = int(q.get("live", "300000"))
    if len(_live) < live:
        _live.extend([] for _ in range(live - len(_live)))
    for _ in range(int(q.get("n", "5000"))):
        a = []
        a.append(a)
    gc.collect()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"collected"]


# Downstream services, when configured: connections opened now, before any profiler attaches.
_redis = None
if os.environ.get("TESTAPP_REDIS"):
    import redis

    _redis = redis.Redis.from_url(os.environ["TESTAPP_REDIS"])
    _redis.set("greeting", "hello")
_backend = None
if os.environ.get("TESTAPP_BACKEND"):
    import requests

    _backend = requests.Session()
    _backend.get(os.environ["TESTAPP_BACKEND"] + "/ok", timeout=10).raise_for_status()


def _unconfigured(start_response, what):
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"set %s" % what.encode()]


# Memory growth per request (the agent reads the worker's resident pages at each request's
# start and end): /grow keeps 1 MiB more per request, written so its pages are resident;
# /churn writes 1 MiB and frees it.
_grown = []


def grow(environ, start_response):
    _grown.append(b"g" * (1 << 20))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d MiB held" % len(_grown)]


def churn(environ, start_response):
    block = b"c" * (1 << 20)
    n = len(block)
    del block
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d bytes freed" % n]


def redis_route(environ, start_response):
    if _redis is None:
        return _unconfigured(start_response, "TESTAPP_REDIS")
    n = int(_query(environ).get("n", "20"))
    values = [_redis.get("greeting") for _ in range(n)]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d" % len(values)]


def api(environ, start_response):
    if _redis is None or _backend is None:
        return _unconfigured(start_response, "TESTAPP_REDIS and TESTAPP_BACKEND")
    _redis.get("greeting")
    _redis.get("greeting")
    _backend.get(os.environ["TESTAPP_BACKEND"] + "/ok", timeout=10).raise_for_status()
    end = time.thread_time() + 0.002
    while time.thread_time() < end:
        pass
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"api"]


ROUTES = {
    "/hello": hello,
    "/redis": redis_route,
    "/api": api,
    "/sleep": sleep,
    "/blocks": blocks,
    "/bytes1": bytes1,
    "/big": big,
    "/error": error,
    "/hang": hang,
    "/file": file,
    "/gc": gc_route,
    "/upload": upload,
    "/segv": segv,
    "/exit3": exit3,
    "/grow": grow,
    "/churn": churn,
}


# ---- Worker memory: copy-on-write ----
# With TESTAPP_PRELOAD_MB=N, N MiB of small objects are built at import. Imported by the master
# (gunicorn --preload, uWSGI without --lazy-apps), they are shared with every worker until a
# worker touches them: /touch walks them, and each reference taken writes the object's refcount,
# which gives that worker a private copy of the page (copy-on-write).
_PRELOAD_OBJECT = 1000
_preload = [bytes(_PRELOAD_OBJECT)
            for _ in range(int(os.environ.get("TESTAPP_PRELOAD_MB", "0")) * 1024 * 1024 // _PRELOAD_OBJECT)]


def touch(environ, start_response):
    n = 0
    for _ in _preload:
        n += 1
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%d %d" % (os.getpid(), n)]


ROUTES["/touch"] = touch


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    handler = ROUTES.get(path) or (page if path.startswith("/page/") else None)
    if handler is None:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    return handler(environ, start_response)


# Garbage-collection time of this process, as the interpreter reports it (gc.callbacks).
_gc = {"total": 0.0, "t0": 0.0, "count": 0}


def _gc_callback(phase, info):
    if phase == "start":
        _gc["t0"] = time.perf_counter()
    else:
        _gc["total"] += time.perf_counter() - _gc["t0"]
        _gc["count"] += 1


class Truth:
    """Counting/timing middleware: blocks and bytes the app yielded, its own elapsed time
    from the call to close() (which the server calls after the last write), the time from
    the call to the last block's hand-over (`handed`: the server has read the request before
    and writes that block after, so no request lasts less), and the time the process spent
    collecting garbage meanwhile."""

    def __init__(self, app, log_path):
        self.app = app
        self.log_path = log_path

    def __call__(self, environ, start_response):
        t0 = time.perf_counter()
        gc0 = (_gc["total"], _gc["count"])
        rec = {"route": environ.get("PATH_INFO", ""), "method": environ["REQUEST_METHOD"],
               "status": None, "blocks": 0, "bytes": 0, "pid": os.getpid(), "gc0": gc0}

        def sr(status, headers, exc_info=None):
            rec["status"] = int(status.split()[0])
            # The head as the app gave it: tests derive what each server frames around it.
            rec["status_line"] = status
            rec["headers"] = headers
            return start_response(status, headers, exc_info)

        try:
            result = self.app(environ, sr)
        except Exception:
            rec["status"] = 500
            rec["elapsed"] = time.perf_counter() - t0
            self._log(rec)
            raise
        if environ.get("testapp.sendfile"):
            # Pass file wrappers through untouched so the server can sendfile() them
            # (gunicorn's is a class, uWSGI's a function: marked by the route instead).
            rec["blocks"] = 1
            rec["bytes"] = FILE_SIZE
            rec["elapsed"] = rec["handed"] = time.perf_counter() - t0
            self._log(rec)
            return result
        return self._count(result, rec, t0)

    def _count(self, result, rec, t0):
        try:
            for block in result:
                rec["blocks"] += 1
                rec["bytes"] += len(block)
                rec["handed"] = time.perf_counter() - t0
                yield block
            if not rec["blocks"]:
                # No body: the server sends the head once the iteration ends.
                rec["handed"] = time.perf_counter() - t0
        finally:
            if hasattr(result, "close"):
                result.close()
            rec["elapsed"] = time.perf_counter() - t0
            self._log(rec)

    def _log(self, rec):
        total, count = rec.pop("gc0")
        rec["gc"] = _gc["total"] - total
        rec["gc_count"] = _gc["count"] - count
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


if os.environ.get("WSGISCOPE_TRUTH_LOG"):
    gc.callbacks.append(_gc_callback)
    app = Truth(app, os.environ["WSGISCOPE_TRUTH_LOG"])
