"""The bearer token reaches the server on every call (docs/operations.md, "Authentication and roles")."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from waquota import Client, DecisionCode, Unauthenticated

from conftest import WaquotaServer


@pytest.fixture(scope="module")
def auth_server(workdir: Path) -> Iterator[WaquotaServer]:
    srv = WaquotaServer(workdir, "--auth-sender-tokens", "worker-token")
    yield srv
    srv.stop()


def test_token_is_sent_with_every_call(auth_server: WaquotaServer, sender: str) -> None:
    with Client(auth_server.addr, token="worker-token") as c:
        d = c.acquire(sender, "u1")
        assert d.decision is DecisionCode.ALLOWED_NEW and d.reservation
        assert c.release(sender, "u1", d.reservation) is True
    for token in (None, "wrong-token"):
        with Client(auth_server.addr, token=token) as c:
            with pytest.raises(Unauthenticated):
                c.acquire(sender, "u2")
