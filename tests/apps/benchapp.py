"""The app `cargo xtask bench` serves: the test app's routes, optionally wrapped in the
instrumentation wsgiscope is compared with, plus /loop for the probe-cost microbenchmark.

WSGISCOPE_BENCH_MIDDLEWARE selects the wrappers: "none" (default), or "all": then requests under
/timing/ and /prometheus/ (the prefix taken off the path, as a WSGI mount does) go through those
middlewares (see bench_middleware.py) and the others through the app alone, so one server, the
same worker processes, serves every configuration the bench compares (on a shared host a process
can run its whole life faster or slower than another: separate servers made the differences
between configurations unreliable). WSGISCOPE_BENCH_LOOP is the xtask binary whose hidden `bench-loop`
command runs the write loop. The bench sets TESTAPP_REDIS, so the test app's /redis route works.
"""
import os
import subprocess
from urllib.parse import parse_qs

import testapp

LOOP_MODES = ("unix", "tcp")


def loop(environ, start_response):
    """GET /loop?mode=unix|tcp&iters=N: runs the write loop as a child of this worker, so the
    loop process is a descendant of the server's master (traced when wsgiscope is attached),
    and returns the loop's report ("<ns per write>\\n")."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    mode = query.get("mode", ["unix"])[0]
    iters = query.get("iters", ["100000"])[0]
    if mode not in LOOP_MODES or not iters.isdigit():
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"mode must be unix or tcp, iters a number\n"]
    out = subprocess.run([os.environ["WSGISCOPE_BENCH_LOOP"], "bench-loop", "--mode", mode,
                          "--iters", iters], capture_output=True, check=True, timeout=25)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [out.stdout]


def _app(environ, start_response):
    if environ.get("PATH_INFO") == "/loop":
        return loop(environ, start_response)
    return testapp.app(environ, start_response)


def _mounted(wrapped):
    """(prefix, app) pairs: a request whose path starts with prefix + "/" goes to app."""

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        for prefix, inner in wrapped:
            if path.startswith(prefix + "/"):
                environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
                environ["PATH_INFO"] = path[len(prefix):]
                return inner(environ, start_response)
        return _app(environ, start_response)

    return app


_middleware = os.environ.get("WSGISCOPE_BENCH_MIDDLEWARE", "none")
if _middleware == "all":
    from bench_middleware import Prometheus, Timing

    app = _mounted([("/timing", Timing(_app)), ("/prometheus", Prometheus(_app))])
elif _middleware == "none":
    app = _app
else:
    raise RuntimeError("WSGISCOPE_BENCH_MIDDLEWARE must be none or all")
