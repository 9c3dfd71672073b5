"""on_store_outage, with the server's Redis really killed. Only a Redis ledger has a store that
can go away, so this file runs on Redis alone (the memory ledger cannot be unreachable)."""
from __future__ import annotations

import asyncio

import pytest

from waquota import (
    AsyncClient,
    Client,
    Decision,
    DecisionCode,
    StoreOutage,
    Unavailable,
    allow_on_outage,
)

from conftest import T0, Outage


def test_on_store_outage_is_called_when_redis_is_killed(outage_server: Outage, sender: str):
    seen: list[StoreOutage] = []
    answer: list[object] = [allow_on_outage]

    def hook(outage: StoreOutage):
        seen.append(outage)
        return answer[0](outage) if callable(answer[0]) else answer[0]

    with Client(outage_server.server.addr, on_store_outage=hook) as c:
        before = c.acquire(sender, "u1", at=T0)
        assert before.decision is DecisionCode.ALLOWED_NEW and seen == []

        outage_server.redis.kill()

        # The hook's Decision stands in for the answer, once per recipient.
        d = c.acquire(sender, "u2", at=T0)
        assert d == Decision(
            allowed=True, decision=DecisionCode.ALLOWED_NEW, recipient="u2", store_outage=True
        )
        assert seen[-1].method == "acquire" and seen[-1].sender == sender
        assert seen[-1].recipients == ("u2",) and seen[-1].message

        batch = c.acquire_batch(sender, ["u3", "u4"], at=T0)
        assert [b.recipient for b in batch] == ["u3", "u4"]
        assert all(b.allowed and b.store_outage for b in batch)
        assert seen[-1].method == "acquire_batch" and seen[-1].recipients == ("u3", "u4")

        # None from the hook: the call raises Unavailable.
        answer[0] = None
        with pytest.raises(Unavailable):
            c.acquire(sender, "u5", at=T0)
        assert seen[-1].recipients == ("u5",)

        # Calls other than the Acquires: the hook is told, and Unavailable is raised whatever
        # it returns (nothing can stand in for an unrecorded release).
        answer[0] = allow_on_outage
        with pytest.raises(Unavailable):
            c.release(sender, "u1", before.reservation or "", at=T0)
        assert seen[-1].method == "release"
        with pytest.raises(Unavailable):
            c.record_inbound(sender, "u1", at=T0)
        assert seen[-1].method == "record_inbound"
        assert len(seen) == 5

    # Without a hook, the outage is an Unavailable.
    with Client(outage_server.server.addr) as plain:
        with pytest.raises(Unavailable):
            plain.acquire(sender, "u6", at=T0)


def test_async_on_store_outage_awaits_a_coroutine_hook(outage_server: Outage, sender: str):
    outage_server.redis.kill()
    seen: list[str] = []

    async def hook(outage: StoreOutage):
        seen.append(outage.method)
        await asyncio.sleep(0)
        return allow_on_outage(outage)

    async def scenario() -> None:
        async with AsyncClient(outage_server.server.addr, on_store_outage=hook) as c:
            d = await c.acquire(sender, "u1", at=T0)
            assert d.allowed and d.store_outage and d.recipient == "u1"
            with pytest.raises(Unavailable):
                await c.confirm(sender, "u1", "r1.1.00000000000000000000000000000000", at=T0)

    asyncio.run(scenario())
    assert seen == ["acquire", "confirm"]
