"""The values the client answers with: plain dataclasses and enums, never proto objects."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional, Union


class _ProtoEnum(enum.IntEnum):
    """An enum whose values are the proto numbers; a number this client does not know yet (a
    newer server, docs/contract.md: fields are added, never renamed) reads as UNSPECIFIED."""

    @classmethod
    def _missing_(cls, value: object) -> "_ProtoEnum":
        return cls(0)


class DecisionCode(_ProtoEnum):
    """`waquota.v1.Decision`, without the `DECISION_` prefix."""

    UNSPECIFIED = 0
    ALLOWED_NEW = 1
    ALLOWED_COUNTED = 2
    ALLOWED_SERVICE_WINDOW = 3
    DENIED_LIMIT = 4
    DENIED_OUTSIDE_SERVICE_WINDOW = 5
    DENIED_THROUGHPUT = 6
    DENIED_PAIR_RATE = 7
    DENIED_SENDER_BLOCKED = 8
    DENIED_MARKETING_CAP = 9
    DENIED_LEDGER_LOST = 10


class Tier(_ProtoEnum):
    """`waquota.v1.Tier`, without the `TIER_` prefix (numbers as `T_...`)."""

    UNSPECIFIED = 0
    T_50 = 1
    T_250 = 2
    T_1K = 3
    T_2K = 4
    T_10K = 5
    T_100K = 6
    UNLIMITED = 7


class Scope(_ProtoEnum):
    """`waquota.v1.Scope`: which window decided."""

    UNSPECIFIED = 0
    SENDER = 1
    PORTFOLIO = 2


class MessageKind(_ProtoEnum):
    """`waquota.v1.MessageKind`; UNSPECIFIED is treated as TEMPLATE by the server."""

    UNSPECIFIED = 0
    TEMPLATE = 1
    FREE_FORM = 2


class Category(_ProtoEnum):
    """`waquota.v1.Category`; only MARKETING changes a decision (the marketing rules)."""

    UNSPECIFIED = 0
    MARKETING = 1
    UTILITY = 2
    AUTHENTICATION = 3
    SERVICE = 4


KindLike = Union[MessageKind, str]
CategoryLike = Union[Category, str, None]


@dataclass(frozen=True)
class Decision:
    """One recipient's answer to Acquire / AcquireBatch (docs/contract.md, "Decisions").

    `retry_after` and `retry_at` are set together on a refusal that waiting cures, and both are
    None on one it does not: such a refusal must not be retried on a timer (docs/contract.md,
    "Retrying a refusal"). `retry_at` is tz-aware UTC, on the ledger's clock.
    """

    allowed: bool
    decision: DecisionCode
    recipient: str
    reservation: Optional[str] = None
    expires_at: Optional[datetime] = None
    retry_after: Optional[timedelta] = None
    retry_at: Optional[datetime] = None
    limit: int = 0
    used: int = 0
    remaining: int = 0
    tier: Tier = Tier.UNSPECIFIED
    scope: Scope = Scope.UNSPECIFIED
    store_outage: bool = False

    @property
    def retryable(self) -> bool:
        """True for a refusal that a timer may retry (it carries `retry_at`)."""
        return not self.allowed and self.retry_at is not None


@dataclass(frozen=True)
class FailureReport:
    """The answer to ReportFailure."""

    released: bool
    hold_until: Optional[datetime] = None


@dataclass(frozen=True)
class StoreOutage:
    """What the `on_store_outage` hook is told: the call the server answered UNAVAILABLE.

    `method` is the client method's name ("acquire", "acquire_batch", "release", "confirm",
    "report_failure", "record_inbound"); `recipients` holds the call's recipients (one, or a
    batch's in order); `message` is the status message. gRPC reports a server that cannot be
    reached at all (connection refused) as UNAVAILABLE too, so the hook sees that case as well;
    `message` tells the two apart ("failed to connect to all addresses" for the latter).
    """

    method: str
    sender: str
    recipients: tuple[str, ...]
    message: str
