"""The HTTP service tests/apps/downstream.py calls: /ok answers 200, /fail 503, /slow?ms=N
sleeps N ms (default 50) and answers 200. Serve it with a keep-alive worker (gunicorn gthread
with a long --keep-alive), so that the callers' sessions keep their connections."""
import time


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/ok":
        status, body = "200 OK", b"ok"
    elif path == "/fail":
        status, body = "503 Service Unavailable", b"unavailable"
    elif path == "/slow":
        query = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
        time.sleep(int(query.get("ms", "50")) / 1000)
        status, body = "200 OK", b"slow"
    else:
        status, body = "404 Not Found", b"not found"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
