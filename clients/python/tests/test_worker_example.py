"""examples/python/worker.py end to end: a real server, a local HTTP endpoint standing in for the
send (it fails one recipient), and the worker run as its own process."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest

from waquota import Client

from conftest import REPO, T0, WaquotaServer

WORKER = REPO / "examples" / "python" / "worker.py"
FAILING = "4915100000002"


class SendEndpoint:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                self.send_response(500 if body["to"] == FAILING else 200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/send"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def endpoint() -> Iterator[SendEndpoint]:
    e = SendEndpoint()
    yield e
    e.close()


def run_worker(*args: str) -> subprocess.CompletedProcess:
    # The worker imports this checkout's client, as the tests do.
    path = os.pathsep.join(p for p in (str(REPO / "clients" / "python"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": path},
    )


def test_worker_runs_end_to_end(server: WaquotaServer, sender: str, endpoint: SendEndpoint, tmp_path: Path):
    server.put_policy(sender, custom_limit=2)
    jobs = tmp_path / "jobs.jsonl"
    tos = ["4915100000001", FAILING, "4915100000003", "4915100000004", "4915100000004"]
    jobs.write_text("".join(json.dumps({"id": str(i), "to": to}) + "\n" for i, to in enumerate(tos, 1)))

    r = run_worker(
        "--addr", server.addr, "--sender", sender, "--jobs", str(jobs), "--send-url", endpoint.url,
        "--at", T0.isoformat(), "--deadline", str(25 * 3600), "--jitter-ms", "0",
    )
    assert r.returncode == 0, r.stderr
    lines = [re.sub(r"wq=r[0-9a-f.]+", "wq=<reservation>", ln) for ln in r.stdout.splitlines()]
    assert lines == [
        "job 1 -> 4915100000001: ALLOWED_NEW, sent job=1;wq=<reservation>",
        "job 2 -> 4915100000002: send failed (HTTP 500), released=True",
        "job 3 -> 4915100000003: ALLOWED_NEW, sent job=3;wq=<reservation>",
        "job 4 -> 4915100000004: waited 1 day, 0:00:00 until 2026-03-03T07:00:00+00:00",
        "job 4 -> 4915100000004: ALLOWED_NEW, sent job=4;wq=<reservation>",
        "job 5 -> 4915100000004: ALLOWED_COUNTED, sent job=5",
        "summary: jobs=5 sent=4 send_failed=1 released=1 refused=0 gave_up=0 unavailable=0 "
        "waited=1 day, 0:00:00",
    ], r.stdout

    # What reached the endpoint: the Cloud API body, the reservation as wq=<token>.
    assert [b["to"] for b in endpoint.bodies] == tos
    first = endpoint.bodies[0]
    assert first["messaging_product"] == "whatsapp" and first["type"] == "template"
    assert first["template"] == {"name": "order_update", "language": {"code": "en"}}
    fourth = endpoint.bodies[3]["biz_opaque_callback_data"]
    assert fourth.startswith("job=4;wq=")
    token = fourth.split(";wq=")[1]
    day = timedelta(hours=24)
    with Client(server.addr) as c:
        # The token is the real reservation of that sender and user: job 5's counted delivery
        # touched its slot, so it can no longer free it, but it confirms it.
        assert c.release(sender, tos[3], token, at=T0 + day) is False
        assert c.confirm(sender, tos[3], token, at=T0 + day) == T0 + 2 * day


def test_worker_prints_bodies_and_never_retries_without_retry_at(server: WaquotaServer, sender: str):
    r = run_worker("--addr", server.addr, "--sender", sender, "--generate", "1", "--at", T0.isoformat())
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == (
        f"job 1 -> 4915100000001: ALLOWED_NEW, POST https://graph.facebook.com/v21.0/{sender}/messages"
    )
    body = json.loads(out[1])
    assert re.fullmatch(r"job=1;wq=r\d+\.\d+\.[0-9a-f]{32}", body["biz_opaque_callback_data"])
    assert out[-1].startswith("summary: jobs=1 sent=1 ")

    server.put_policy(sender, status=4)  # paused, with no end
    r = run_worker("--addr", server.addr, "--sender", sender, "--generate", "1", "--at", T0.isoformat())
    assert r.stdout.splitlines() == [
        "job 1 -> 4915100000001: refused DENIED_SENDER_BLOCKED (no retry_at: not retried on a timer)",
        "summary: jobs=1 sent=0 send_failed=0 released=0 refused=1 gave_up=0 unavailable=0 waited=0:00:00",
    ]
