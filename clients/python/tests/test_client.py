"""The client against the real server, on both ledgers (the `server` fixture is parametrized)."""
from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest

import waquota
from waquota import (
    AsyncClient,
    Category,
    Client,
    DecisionCode,
    Denied,
    InvalidArgument,
    MessageKind,
    Scope,
    Tier,
)

from conftest import T0, FakeClock, WaquotaServer

H = timedelta(hours=1)
MS = timedelta(milliseconds=1)


@pytest.fixture
def client(server: WaquotaServer):
    with Client(server.addr) as c:
        yield c


def fill(client: Client, sender: str, n: int, step: timedelta = H) -> None:
    for i in range(n):
        d = client.acquire(sender, f"u{i}", at=T0 + i * step)
        assert d.decision is DecisionCode.ALLOWED_NEW, d


def test_full_sender_retry_at_is_when_the_oldest_slot_frees(server, client, sender):
    server.put_policy(sender, custom_limit=3)
    fill(client, sender, 3)  # slots open at T0, T0+1h, T0+2h

    d = client.acquire(sender, "late", at=T0 + 3 * H)
    assert d.allowed is False
    assert d.decision is DecisionCode.DENIED_LIMIT
    assert d.retry_at == T0 + 24 * H  # the T0 slot ends 24 h after it opened
    assert d.retry_at.tzinfo is not None and d.retry_at.utcoffset() == timedelta(0)
    assert d.retry_after == 21 * H
    assert (d.limit, d.used, d.remaining) == (3, 3, 0)
    assert d.scope is Scope.SENDER and d.reservation is None and d.retryable

    assert client.acquire(sender, "late", at=d.retry_at - MS).decision is DecisionCode.DENIED_LIMIT
    ok = client.acquire(sender, "late", at=d.retry_at)
    assert ok.decision is DecisionCode.ALLOWED_NEW
    assert ok.reservation and ok.reservation.startswith("r")
    assert ok.expires_at == T0 + 48 * H and ok.retry_at is None and ok.retry_after is None


def test_throughput_refusals_in_a_batch_are_staggered(server, client, sender):
    server.put_policy(sender, messages_per_second=4)  # one message per 250 ms
    recipients = [f"b{i}" for i in range(7)]
    ds = client.acquire_batch(sender, recipients, at=T0)

    assert [d.recipient for d in ds] == recipients
    assert [d.decision for d in ds[:4]] == [DecisionCode.ALLOWED_NEW] * 4
    refused = ds[4:]
    assert [d.decision for d in refused] == [DecisionCode.DENIED_THROUGHPUT] * 3
    # The k-th refusal retries k intervals after the first (docs/contract.md).
    assert [d.retry_at for d in refused] == [T0 + k * 250 * MS for k in (1, 2, 3)]
    assert [d.retry_after for d in refused] == [k * 250 * MS for k in (1, 2, 3)]
    # ... and each one is admitted at exactly its retry_at.
    for d in refused:
        assert client.acquire(sender, d.recipient, at=d.retry_at).decision is DecisionCode.ALLOWED_NEW


def test_reserve_releases_on_exception(server, client, sender):
    server.put_policy(sender, custom_limit=1)

    class SendFailed(Exception):
        pass

    with pytest.raises(SendFailed):
        with client.reserve(sender, "first", at=T0) as d:
            assert d.decision is DecisionCode.ALLOWED_NEW and d.reservation
            raise SendFailed()

    # The slot is free again: a second user gets in at the limit of 1.
    assert server.used(sender, T0) == 0
    assert client.acquire(sender, "second", at=T0).decision is DecisionCode.ALLOWED_NEW
    # And now the window is full: reserve raises Denied carrying the refusal.
    with pytest.raises(Denied) as exc:
        with client.reserve(sender, "third", at=T0):
            pytest.fail("the body must not run when refused")
    assert exc.value.decision.decision is DecisionCode.DENIED_LIMIT
    assert exc.value.decision.retry_at == T0 + 24 * H


def test_reserve_leaves_an_interrupted_send_counting(server, client, sender):
    # The send may have gone out before the interruption: the slot must keep counting.
    with pytest.raises(KeyboardInterrupt):
        with client.reserve(sender, "first", at=T0) as d:
            raise KeyboardInterrupt()
    assert server.used(sender, T0) == 1
    assert client.release(sender, "first", d.reservation, at=T0) is True  # neither confirmed


def test_reserve_confirms_on_success(server, client, sender):
    server.put_policy(sender, custom_limit=1)
    with client.reserve(sender, "first", at=T0) as d:
        token = d.reservation
    assert token
    # A confirmed slot is a delivery: its reservation can no longer free it (docs/contract.md).
    assert client.release(sender, "first", token, at=T0) is False
    assert server.used(sender, T0) == 1
    assert client.acquire(sender, "second", at=T0).decision is DecisionCode.DENIED_LIMIT
    # Confirm is accepted again (idempotent on the slot) and keeps the end at delivery + 24 h.
    assert client.confirm(sender, "first", token, at=T0) == T0 + 24 * H


def test_reserve_of_a_counted_user_settles_nothing(server, client, sender):
    fill(client, sender, 1)
    with client.reserve(sender, "u0", at=T0 + H) as d:
        assert d.decision is DecisionCode.ALLOWED_COUNTED and d.reservation is None


def test_wait_helper_retries_at_retry_at(server, client, sender):
    server.put_policy(sender, custom_limit=1)
    fill(client, sender, 1)
    clock = FakeClock(T0 + H)
    d = client.acquire_when_allowed(
        sender, "waiting", deadline=timedelta(hours=25), jitter=timedelta(0),
        clock=clock, sleep=clock.sleep, clock_as_at=True,
    )
    assert d.decision is DecisionCode.ALLOWED_NEW
    assert clock.sleeps == [(23 * H).total_seconds()]  # from T0+1h to the T0 slot's end
    assert clock.now == T0 + 24 * H
    assert d.expires_at == T0 + 48 * H


def test_wait_helper_jitter_stays_within_bounds(server, client, sender):
    server.put_policy(sender, messages_per_second=1)
    assert client.acquire(sender, "a", at=T0).allowed
    clock = FakeClock(T0)
    d = client.acquire_when_allowed(
        sender, "b", deadline=timedelta(seconds=10), jitter=timedelta(milliseconds=200),
        clock=clock, sleep=clock.sleep, clock_as_at=True, rng=random.Random(7),
    )
    assert d.decision is DecisionCode.ALLOWED_NEW
    assert len(clock.sleeps) == 1
    assert 1.0 <= clock.sleeps[0] <= 1.2  # retry_at (T0 + 1 s) plus at most the jitter


def test_wait_helper_stops_at_the_deadline(server, client, sender):
    server.put_policy(sender, custom_limit=1)
    fill(client, sender, 1)
    clock = FakeClock(T0 + H)
    d = client.acquire_when_allowed(
        sender, "waiting", deadline=timedelta(hours=22), clock=clock, sleep=clock.sleep,
        clock_as_at=True,
    )
    # retry_at (T0+24h) lies past the deadline (T0+23h): the refusal comes back, unslept.
    assert d.decision is DecisionCode.DENIED_LIMIT and d.retry_at == T0 + 24 * H
    assert clock.sleeps == []
    # An absolute deadline works the same way, and one at retry_at is reached.
    d = client.acquire_when_allowed(
        sender, "waiting", deadline=T0 + 24 * H, jitter=timedelta(seconds=5), clock=clock,
        sleep=clock.sleep, clock_as_at=True,
    )
    assert d.decision is DecisionCode.ALLOWED_NEW
    assert clock.now == T0 + 24 * H  # the jitter never carries a retry past the deadline


def test_wait_helper_never_retries_a_refusal_without_retry_at(server, client, sender):
    server.put_policy(sender, status=4)  # SENDER_STATUS_PAUSED, with no status_until
    clock = FakeClock(T0)
    calls = []

    def counting_clock():
        calls.append(clock.now)
        return clock.now

    d = client.acquire_when_allowed(
        sender, "x", deadline=timedelta(days=30), clock=counting_clock, sleep=clock.sleep,
        clock_as_at=True,
    )
    assert d.decision is DecisionCode.DENIED_SENDER_BLOCKED
    assert d.retry_at is None and d.retry_after is None and not d.retryable
    assert clock.sleeps == [] and len(calls) == 1


def test_bad_input_raises_an_error_naming_the_field(server, client, sender):
    cases = [
        (lambda: client.acquire(sender, "+49 (151", at=T0), "recipient"),
        (lambda: client.acquire("", "u1", at=T0), "sender"),
        (lambda: client.acquire_batch(sender, [], at=T0), "recipients"),
        (lambda: client.release(sender, "u1", "r123.1.nothex", at=T0), "reservation"),
        (lambda: client.confirm(sender, "u1", "", at=T0), "reservation"),
        (lambda: client.acquire(sender, "u1", at=T0.replace(tzinfo=None)), "at"),
        (lambda: client.acquire(sender, "u1", category="promo", at=T0), "category"),
        (lambda: client.acquire_batch(sender, "u1", at=T0), "recipients"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as exc:
            call()
        assert exc.value.field == field, exc.value
        assert isinstance(exc.value, ValueError)
    # None of them changed anything.
    assert server.used(sender, T0) == 0


def test_other_calls_map_to_dataclasses(server, client, sender):
    until = client.record_inbound(sender, "+49 151 1234 5678", at=T0)
    assert until == T0 + 24 * H
    d = client.acquire(sender, "4915112345678", kind=MessageKind.FREE_FORM, at=T0 + H)
    assert d.decision is DecisionCode.ALLOWED_SERVICE_WINDOW and d.expires_at == until
    assert client.acquire(sender, "other", kind="free_form", at=T0 + H).decision is (
        DecisionCode.DENIED_OUTSIDE_SERVICE_WINDOW
    )

    # Time only moves forward within a window, as on a live ledger.
    m = client.acquire(sender, "m1", category=Category.MARKETING, at=T0 + 2 * H)
    assert m.tier is Tier.T_250 and m.limit == 250
    report = client.report_failure(sender, "m1", m.reservation, 131049, at=T0 + 2 * H)
    assert report.released is True and report.hold_until == T0 + 26 * H
    held = client.acquire(sender, "m1", category="marketing", at=T0 + 3 * H)
    assert held.decision is DecisionCode.DENIED_MARKETING_CAP and held.retry_at == T0 + 26 * H

    with pytest.raises(waquota.NotFound):
        client.confirm(sender, "m1", m.reservation, at=T0 + 3 * H)
    dry = client.acquire(sender, "dry", at=T0 + 3 * H, dry_run=True)
    assert dry.allowed and dry.reservation is None


def test_async_client(server, sender):
    server.put_policy(sender, custom_limit=1)

    async def scenario() -> None:
        async with AsyncClient(server.addr) as c:
            with pytest.raises(RuntimeError):
                async with c.reserve(sender, "first", at=T0):
                    raise RuntimeError("send failed")
            assert server.used(sender, T0) == 0
            async with c.reserve(sender, "second", at=T0) as d:
                assert d.decision is DecisionCode.ALLOWED_NEW
            assert await c.release(sender, "second", d.reservation, at=T0) is False

            clock = FakeClock(T0 + H)
            w = await c.acquire_when_allowed(
                sender, "third", deadline=timedelta(days=2), jitter=timedelta(0),
                clock=clock, sleep=clock.async_sleep, clock_as_at=True,
            )
            assert w.decision is DecisionCode.ALLOWED_NEW and clock.now == T0 + 24 * H
            batch = await c.acquire_batch(sender, ["third", "fourth"], at=T0 + 24 * H)
            assert [b.decision for b in batch] == [
                DecisionCode.ALLOWED_COUNTED, DecisionCode.DENIED_LIMIT,
            ]
            with pytest.raises(InvalidArgument) as exc:
                await c.acquire(sender, "1-", at=T0)
            assert exc.value.field == "recipient"

    asyncio.run(scenario())
