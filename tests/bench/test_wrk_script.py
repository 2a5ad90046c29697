"""The benchmark's wrk script (bench/wrk/rank.lua) and how bench/serving/load.py counts its answers:
real wrk against a small HTTP server that answers every POST /rank the same way (one way a run):
shed answers (429 or 503 with Retry-After, whatever the header's case) are not errors, a 503 without
Retry-After is one, and 200 bodies that say "degraded":true are counted as degraded."""

import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.serving.load import answers
from bench.serving.systems import run_wrk

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")]


def serve(status: int, headers: dict[str, str], body: bytes) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects

        def do_POST(self):  # noqa: N802 - the http.server name
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status, headers, body, want", [
    (200, {}, b'{"items":[],"degraded":false}', {"degraded": 0, "shed": 0, "failed": 0}),
    (200, {}, b'{"items":[],"degraded":true,"degraded_reason":"timeout"}', {"degraded": "ok", "shed": 0, "failed": 0}),
    (429, {"Retry-After": "1"}, b'{"detail":"overloaded"}', {"degraded": 0, "shed": "non2xx", "failed": 0}),
    (503, {"retry-after": "1"}, b'{"detail":"overloaded"}', {"degraded": 0, "shed": "non2xx", "failed": 0}),
    (503, {}, b'{"detail":"feature store unavailable"}', {"degraded": 0, "shed": 0, "failed": "non2xx"}),
    (503, {"Retry-After": "1"}, b'{"error":{"code":"feature_store_unavailable","message":"feature store unavailable"}'
                                b',"request_id":"r"}', {"degraded": 0, "shed": 0, "failed": "non2xx"}),
    (500, {"Retry-After": "1"}, b'{"detail":"internal error"}', {"degraded": 0, "shed": 0, "failed": "non2xx"}),
], ids=["ok", "degraded", "429-shed", "503-shed", "503-error", "503-error-retry-after", "500-error"])
def test_wrk_counts(tmp_path, status, headers, body, want):
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text('{"user_id":"u1","items":["a","b"]}\n{"user_id":"u2","items":["c"]}\n')
    server = serve(status, headers, body)
    try:
        res, cpu = run_wrk(f"http://127.0.0.1:{server.server_port}", bodies, c=2, seconds=1)
    finally:
        server.shutdown()
        server.server_close()
    got = answers(res)
    assert res["requests"] > 10 and cpu >= 0, res
    assert got["statuses"] == {status: got["ok"] + got["non2xx"]}, got
    assert got["socket_errors"] == 0, res["errors"]
    assert (got["ok"], got["non2xx"]) == ((res["requests"], 0) if status == 200 else (0, res["requests"])), got
    for k, v in want.items():
        assert got[k] == (got[v] if isinstance(v, str) else v), (k, got)
