"""Conversions between the proto messages and the client's own types, shared by the sync and the
asyncio client. Proto objects never leave this module's callers."""
from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timedelta, timezone
from typing import Any, Optional, Sequence

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ._errors import invalid
from ._proto.waquota.v1 import waquota_pb2 as pb
from ._types import (
    Category,
    CategoryLike,
    Decision,
    DecisionCode,
    FailureReport,
    KindLike,
    MessageKind,
    Scope,
    Tier,
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(field: str, t: datetime) -> Timestamp:
    # A naive datetime is ambiguous (local time? UTC?), and a wrong guess shifts every slot.
    if not isinstance(t, datetime):
        raise invalid(field, f"expected a datetime, got {type(t).__name__}")
    if t.tzinfo is None or t.utcoffset() is None:
        raise invalid(field, "a naive datetime; give a timezone-aware one (e.g. tzinfo=timezone.utc)")
    ts = Timestamp()
    ts.FromDatetime(t.astimezone(timezone.utc))
    return ts


def set_at(msg: Any, field: str, t: Optional[datetime]) -> None:
    if t is not None:
        getattr(msg, field).CopyFrom(timestamp(field, t))


def opt_datetime(msg: Any, field: str) -> Optional[datetime]:
    if not msg.HasField(field):
        return None
    ts: Timestamp = getattr(msg, field)
    t: datetime = ts.ToDatetime(tzinfo=timezone.utc)
    return t


def opt_timedelta(msg: Any, field: str) -> Optional[timedelta]:
    if not msg.HasField(field):
        return None
    d: Duration = getattr(msg, field)
    td: timedelta = d.ToTimedelta()
    return td


# Any: the proto's enum fields take its own enum value type, which a plain int is at run time.
def kind(value: KindLike) -> Any:
    return int(_coerce(MessageKind, "kind", value))


def category(value: CategoryLike) -> Any:
    if value is None:
        return int(Category.UNSPECIFIED)
    return int(_coerce(Category, "category", value))


def _coerce(enum_type: Any, field: str, value: Any) -> Any:
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        try:
            return enum_type[value.strip().upper().replace("-", "_")]
        except KeyError:
            names = ", ".join(m.name.lower() for m in enum_type if m.value != 0)
            raise invalid(field, f"unknown value {value!r}: use one of {names}") from None
    raise invalid(field, f"expected {enum_type.__name__} or str, got {type(value).__name__}")


def decision(r: Any) -> Decision:
    return Decision(
        allowed=r.allowed,
        decision=DecisionCode(r.decision),
        recipient=r.recipient,
        reservation=r.reservation or None,
        expires_at=opt_datetime(r, "expires_at"),
        retry_after=opt_timedelta(r, "retry_after"),
        retry_at=opt_datetime(r, "retry_at"),
        limit=r.limit,
        used=r.used,
        remaining=r.remaining,
        tier=Tier(r.tier),
        scope=Scope(r.scope),
        store_outage=r.store_outage,
    )


def failure_report(r: Any) -> FailureReport:
    return FailureReport(released=r.released, hold_until=opt_datetime(r, "hold_until"))


def acquire_request(
    sender: str,
    recipient: str,
    kind_: KindLike,
    category_: CategoryLike,
    at: Optional[datetime],
    dry_run: bool,
) -> Any:
    req = pb.AcquireRequest(
        sender=sender,
        recipient=recipient,
        kind=kind(kind_),
        category=category(category_),
        dry_run=dry_run,
    )
    set_at(req, "at", at)
    return req


def acquire_batch_request(
    sender: str,
    recipients: Sequence[str],
    kind_: KindLike,
    category_: CategoryLike,
    at: Optional[datetime],
    dry_run: bool,
) -> Any:
    if isinstance(recipients, str):
        # A lone string would be split into one recipient per character.
        raise invalid("recipients", "expected a sequence of recipients, got one string")
    req = pb.AcquireBatchRequest(
        sender=sender,
        recipients=list(recipients),
        kind=kind(kind_),
        category=category(category_),
        dry_run=dry_run,
    )
    set_at(req, "at", at)
    return req


def release_request(sender: str, recipient: str, reservation: str, at: Optional[datetime]) -> Any:
    req = pb.ReleaseRequest(sender=sender, recipient=recipient, reservation=reservation)
    set_at(req, "at", at)
    return req


def confirm_request(
    sender: str,
    recipient: str,
    reservation: str,
    delivered_at: Optional[datetime],
    at: Optional[datetime],
) -> Any:
    req = pb.ConfirmRequest(sender=sender, recipient=recipient, reservation=reservation)
    # The server requires delivered_at and clamps it to [reservation time, now], so "now" (the
    # request's clock when it sets one) is the honest default for "delivered just now".
    set_at(req, "delivered_at", delivered_at or at or utcnow())
    set_at(req, "at", at)
    return req


def report_failure_request(
    sender: str, recipient: str, reservation: Optional[str], error_code: int, at: Optional[datetime]
) -> Any:
    req = pb.ReportFailureRequest(
        sender=sender, recipient=recipient, reservation=reservation or "", error_code=error_code
    )
    set_at(req, "at", at)
    return req


def record_inbound_request(
    sender: str, recipient: str, free_entry_point: bool, at: Optional[datetime]
) -> Any:
    req = pb.RecordInboundRequest(
        sender=sender, recipient=recipient, free_entry_point=free_entry_point
    )
    set_at(req, "at", at)
    return req


def outage_decisions(result: object, recipients: Sequence[str]) -> list[Decision]:
    """The hook's Decision, once per recipient of the call (its recipient filled in)."""
    if not isinstance(result, Decision):
        raise TypeError(
            f"on_store_outage must return a waquota.Decision or None, got {type(result).__name__}"
        )
    return [dataclasses.replace(result, recipient=r) for r in recipients]


def allow_on_outage(outage: object) -> Decision:
    """An `on_store_outage` hook that admits, as the server's `on_store_error = allow` does:
    ALLOWED_NEW with `store_outage` set and no reservation (docs/operations.md, "Store-outage policy")."""
    return Decision(allowed=True, decision=DecisionCode.ALLOWED_NEW, recipient="", store_outage=True)


def deadline_at(deadline: "datetime | timedelta", now: datetime) -> datetime:
    if isinstance(deadline, timedelta):
        return now + deadline
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise invalid("deadline", "a naive datetime; give a timezone-aware one")
        return deadline
    raise invalid("deadline", f"expected a datetime or timedelta, got {type(deadline).__name__}")


def next_attempt(
    d: Decision, now: datetime, deadline: datetime, jitter: timedelta, rng: random.Random
) -> Optional[datetime]:
    """When to ask again after `d`, or None to stop: it was admitted, it has no `retry_at` (not
    to be retried on a timer, docs/contract.md "Retrying a refusal"), or the retry would fall past
    the deadline. The jitter spreads workers told the same moment."""
    if d.allowed or d.retry_at is None:
        return None
    if d.retry_at > deadline:
        return None
    spread = jitter.total_seconds()
    delay = timedelta(seconds=rng.uniform(0.0, spread) if spread > 0 else 0.0)
    at = d.retry_at
    if at <= now and d.retry_after is not None:
        # retry_at is on the ledger's clock; one already past on ours means the clocks disagree
        # by more than retry_after. Waiting retry_after from now keeps a skewed worker from
        # asking again and again until the ledger's clock catches up.
        at = now + max(d.retry_after, timedelta(milliseconds=1))
    return max(min(at + delay, deadline), now)
