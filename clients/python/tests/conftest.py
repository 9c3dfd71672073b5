"""Fixtures: the real waquota binary on free loopback ports, on the memory ledger and on a
redis-server the fixture starts itself (never a mock, never port 6379)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Optional

import grpc
import pytest

REPO = Path(__file__).resolve().parents[3]
# The source tree, not whatever copy of waquota-client pip installed last: the tests are of
# this checkout.
sys.path.insert(0, str(REPO / "clients" / "python"))

from waquota._proto.waquota.v1 import waquota_pb2 as pb  # noqa: E402
from waquota._proto.waquota.v1 import waquota_pb2_grpc as pb_grpc  # noqa: E402

# A fixed trusted clock (the server runs with --trust-client-clock), so that every figure is
# exact; each test uses its own sender, so tests sharing a server do not see each other.
T0 = datetime(2026, 3, 2, 7, 0, tzinfo=timezone.utc)


def waquota_bin() -> str:
    path = os.environ.get("WAQUOTA_BIN") or str(REPO / "target" / "debug" / "waquota")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"waquota binary not found at {path}: build it (cargo build) or set WAQUOTA_BIN")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_STARTED: list[subprocess.Popen] = []


def _start(args: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    _STARTED.append(proc)
    return proc


@pytest.fixture(scope="session", autouse=True)
def _reap() -> Iterator[None]:
    """Kills whatever a fixture started and could not stop itself (it failed half-way)."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    # Readiness polling, not a sleep through time: it returns as soon as the process answers.
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        if ready():
            return
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"{what} not ready after {timeout} s:\n{log.read_text()}")


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: the Redis ledger tests need it (apt-get install redis-server)")
        self.port = free_port()
        self.log = workdir / f"redis-{self.port}.log"
        self.proc = _start(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            self.log,
        )
        _wait("redis-server", self.ping, self.proc, self.log)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class WaquotaServer:
    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = workdir / f"waquota-{self.port}.log"
        self.proc = _start(
            [waquota_bin(), "serve", "--listen", self.addr, "--trust-client-clock", *extra],
            self.log,
        )
        self.channel = grpc.insecure_channel(self.addr)
        ready = grpc.channel_ready_future(self.channel)

        def connected() -> bool:
            try:
                ready.result(timeout=0.2)
                return True
            except grpc.FutureTimeoutError:
                return False

        try:
            _wait("waquota serve", connected, self.proc, self.log)
        finally:
            ready.cancel()
        self.admin = pb_grpc.AdminServiceStub(self.channel)

    def put_policy(self, sender: str, at: datetime = T0, **policy: object) -> None:
        """Stores a sender's whole policy (admin setup for a test)."""
        req = pb.PutPolicyRequest(target=pb.Target(sender=sender), policy=pb.Policy(**policy))
        req.at.FromDatetime(at)
        self.admin.PutPolicy(req)

    def used(self, sender: str, at: datetime) -> int:
        req = pb.InspectRequest(target=pb.Target(sender=sender))
        req.at.FromDatetime(at)
        return int(self.admin.Inspect(req).used)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="waquota-py-") as d:
        yield Path(d)


@pytest.fixture(scope="session", params=["memory", "redis"])
def server(request: pytest.FixtureRequest, workdir: Path) -> Iterator[WaquotaServer]:
    """One server per ledger for the session; parametrizes every test that uses it."""
    redis: Optional[RedisServer] = None
    extra: list[str] = []
    if request.param == "redis":
        redis = RedisServer(workdir)
        extra = ["--redis", redis.url]
    try:
        srv = WaquotaServer(workdir, *extra)
        yield srv
        srv.stop()
    finally:
        if redis is not None:
            redis.kill()


@dataclass
class Outage:
    """A server on a Redis of its own, which the test may kill."""

    server: WaquotaServer
    redis: RedisServer


@pytest.fixture
def outage_server(workdir: Path) -> Iterator[Outage]:
    redis = RedisServer(workdir)
    try:
        # A short redis_timeout so that calls during the outage answer quickly.
        srv = WaquotaServer(workdir, "--redis", redis.url, "--redis-timeout-ms", "500")
        yield Outage(srv, redis)
        srv.stop()
    finally:
        redis.kill()


@pytest.fixture
def sender() -> str:
    return "s" + uuid.uuid4().hex[:12]


class FakeClock:
    """An injected time source: sleep() moves the clock instead of waiting."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)
