"""The in-process instrumentation that `cargo xtask bench` compares wsgiscope against.

- `Timing`: the counting/timing middleware of the WSGI literature. It wraps start_response (and the
  write() callable it returns) and the response iterable, counts blocks and bytes, and times the
  application (producing each block) and the output (the server writing it, while the generator
  is suspended). Cost: a Python generator step and a few clock reads per block.
- `Prometheus`: a prometheus_client middleware in multiprocess mode (PROMETHEUS_MULTIPROC_DIR
  must be set before this module is imported): one Counter increment and one Histogram
  observation per request. It hands the app's own iterator to the server, so it costs nothing
  per block, only per request.

Both keep their numbers in the worker (per process); nothing is logged per request, so the
benchmark measures the instrumentation, not a log file.
"""
import os
import time


class Timing:
    def __init__(self, app):
        self.app = app
        self.stats = {"requests": 0, "blocks": 0, "bytes": 0, "write_calls": 0,
                      "app_seconds": 0.0, "output_seconds": 0.0, "pid": os.getpid()}

    def __call__(self, environ, start_response):
        stats = self.stats
        t0 = time.perf_counter()

        def counting_start_response(status, headers, exc_info=None):
            write = start_response(status, headers, exc_info)

            # The legacy write() callable is output too: time and count it like a block.
            def counting_write(data):
                t = time.perf_counter()
                write(data)
                stats["output_seconds"] += time.perf_counter() - t
                stats["write_calls"] += 1
                stats["bytes"] += len(data)

            return counting_write

        result = self.app(environ, counting_start_response)
        stats["app_seconds"] += time.perf_counter() - t0
        return self._blocks(result)

    def _blocks(self, result):
        stats = self.stats
        it = iter(result)
        try:
            while True:
                t = time.perf_counter()
                try:
                    block = next(it)
                except StopIteration:
                    break
                t_block = time.perf_counter()
                stats["app_seconds"] += t_block - t
                stats["blocks"] += 1
                stats["bytes"] += len(block)
                yield block
                # While we were suspended the server wrote the block to the client.
                stats["output_seconds"] += time.perf_counter() - t_block
        finally:
            if hasattr(result, "close"):
                result.close()
            stats["requests"] += 1


class _Observed:
    """The app's iterable with a close() that records the request; __iter__ hands the server the
    app's own iterator, so the per-block path is untouched."""

    def __init__(self, result, on_close):
        self.result = result
        self.on_close = on_close

    def __iter__(self):
        return iter(self.result)

    def close(self):
        try:
            if hasattr(self.result, "close"):
                self.result.close()
        finally:
            self.on_close()


class Prometheus:
    def __init__(self, app):
        # Imported here: multiprocess mode reads PROMETHEUS_MULTIPROC_DIR at import time.
        from prometheus_client import Counter, Histogram

        self.app = app
        self.requests = Counter("app_requests_total", "Requests served.",
                                ["method", "route", "status"])
        self.duration = Histogram("app_request_duration_seconds",
                                  "Application call to close() of the response.",
                                  ["method", "route"])

    def __call__(self, environ, start_response):
        t0 = time.perf_counter()
        status = ["none"]

        def recording_start_response(s, headers, exc_info=None):
            status[0] = s.split(" ", 1)[0]
            return start_response(s, headers, exc_info)

        method = environ.get("REQUEST_METHOD", "")
        route = environ.get("PATH_INFO", "")
        result = self.app(environ, recording_start_response)

        def record():
            self.requests.labels(method, route, status[0]).inc()
            self.duration.labels(method, route).observe(time.perf_counter() - t0)

        return _Observed(result, record)
