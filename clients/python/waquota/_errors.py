"""Typed exceptions for the gRPC status codes waquota answers (docs/contract.md, "Errors")."""
from __future__ import annotations

import re
from typing import Optional

import grpc

from ._types import Decision


class WaquotaError(Exception):
    """Any error status from the server. `code` is the gRPC status, `message` its details."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(WaquotaError, ValueError):
    """Bad input. `field` is the field the server named (the text before the message's first
    colon, e.g. "recipient" or "reservation"), or None when the message names none."""

    # Server messages read "<field>: <reason>" (docs/contract.md: bad input names the field).
    _FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        m = self._FIELD.match(message)
        self.field: Optional[str] = m.group(1) if m else None


class NotFound(WaquotaError):
    """Confirm of a reservation that has no live slot."""


class Unauthenticated(WaquotaError):
    """A missing, malformed or unknown bearer token."""


class PermissionDenied(WaquotaError):
    """A sender token on an operator-only call."""


class ResourceExhausted(WaquotaError):
    """Load shedding (retry with backoff) or a message over max_message_bytes."""


class DeadlineExceeded(WaquotaError):
    """The call's deadline passed. An Acquire may still have taken its slot: retrying the same
    recipient is safe (docs/contract.md, "Timeouts")."""


class Unavailable(WaquotaError):
    """The store could not be reached (or a sender's reassignment is in flight). Retrying is safe
    for the quota: a user holds at most one slot."""


class FailedPrecondition(WaquotaError):
    """The request is valid but the state forbids it."""


class Internal(WaquotaError):
    """A broken invariant on the server."""


class Denied(Exception):
    """Raised by `reserve()` when the Acquire was refused; `decision` is the refusal (its
    `retry_at` says when to come back, or is None: do not retry on a timer)."""

    def __init__(self, decision: Decision) -> None:
        when = f", retry at {decision.retry_at.isoformat()}" if decision.retry_at else ""
        super().__init__(f"{decision.recipient}: {decision.decision.name}{when}")
        self.decision = decision


_BY_CODE: dict[grpc.StatusCode, type[WaquotaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INTERNAL: Internal,
}


def from_status(code: grpc.StatusCode, message: Optional[str]) -> WaquotaError:
    return _BY_CODE.get(code, WaquotaError)(code, message or "")


def invalid(field: str, reason: str) -> InvalidArgument:
    """A client-side refusal, shaped like the server's."""
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {reason}")
