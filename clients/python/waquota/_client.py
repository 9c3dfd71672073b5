"""The synchronous client."""
from __future__ import annotations

import contextlib
import random
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import grpc

from . import _convert as cv
from ._channel import PemSource, credentials, metadata
from ._errors import Denied, Unavailable, WaquotaError, from_status
from ._proto.waquota.v1 import waquota_pb2_grpc as pb_grpc
from ._types import CategoryLike, Decision, FailureReport, KindLike, MessageKind, StoreOutage

OutageHook = Callable[[StoreOutage], Optional[Decision]]

_ACQUIRES = ("acquire", "acquire_batch")


class Client:
    """A blocking client of `waquota.v1.QuotaService`.

    addr: "host:port" of a waquota server (or of a balancer in front of several).
    token: a bearer token (docs/operations.md, "Authentication and roles"), sent with every call.
    tls / ca / cert / key: TLS (with `tls=True` alone, the system's roots); `ca` a PEM CA to
        verify the server against; `cert` and `key` a client certificate for mutual TLS. PEM
        values are bytes or a file path.
    timeout: each call's deadline in seconds (None: no deadline).
    on_store_outage: called when the server answers UNAVAILABLE (its store cannot be reached);
        see `StoreOutage` and docs/worker-guide.md for what its return value does.
    channel: an already built grpc.Channel to use instead of addr and the TLS options.
    """

    def __init__(
        self,
        addr: str = "127.0.0.1:50051",
        *,
        token: Optional[str] = None,
        tls: bool = False,
        ca: Optional[PemSource] = None,
        cert: Optional[PemSource] = None,
        key: Optional[PemSource] = None,
        timeout: Optional[float] = 10.0,
        on_store_outage: Optional[OutageHook] = None,
        channel: Optional[grpc.Channel] = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if channel is None:
            creds = credentials(tls, ca, cert, key)
            if creds is None:
                channel = grpc.insecure_channel(addr, options=list(options))
            else:
                channel = grpc.secure_channel(addr, creds, options=list(options))
            self._owns_channel = True
        else:
            self._owns_channel = False
        self._channel = channel
        self._stub: Any = pb_grpc.QuotaServiceStub(channel)  # type: ignore[no-untyped-call]
        self._metadata = metadata(token)
        self._timeout = timeout
        self._on_store_outage = on_store_outage

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _invoke(self, rpc: Any, request: Any) -> Any:
        try:
            return rpc(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_status(e.code(), e.details()) from None

    def _outage(
        self, method: str, sender: str, recipients: Sequence[str], err: Unavailable
    ) -> list[Decision]:
        """The hook's answer to an UNAVAILABLE, or `err` raised."""
        if self._on_store_outage is None:
            raise err
        result = self._on_store_outage(StoreOutage(method, sender, tuple(recipients), err.message))
        if result is None or method not in _ACQUIRES:
            raise err
        return cv.outage_decisions(result, recipients)

    # ------------------------------------------------------------------ QuotaService

    def acquire(
        self,
        sender: str,
        recipient: str,
        *,
        kind: KindLike = MessageKind.TEMPLATE,
        category: CategoryLike = None,
        at: Optional[datetime] = None,
        dry_run: bool = False,
    ) -> Decision:
        """May this message go out now? Opens a slot when it may and one is needed.

        `at` is honoured only by a server started with --trust-client-clock (replays, tests).
        """
        req = cv.acquire_request(sender, recipient, kind, category, at, dry_run)
        try:
            return cv.decision(self._invoke(self._stub.Acquire, req))
        except Unavailable as e:
            return self._outage("acquire", sender, [recipient], e)[0]

    def acquire_batch(
        self,
        sender: str,
        recipients: Sequence[str],
        *,
        kind: KindLike = MessageKind.TEMPLATE,
        category: CategoryLike = None,
        at: Optional[datetime] = None,
        dry_run: bool = False,
    ) -> list[Decision]:
        """Decides every recipient in one atomic step, in order; one Decision per recipient."""
        req = cv.acquire_batch_request(sender, recipients, kind, category, at, dry_run)
        try:
            return [cv.decision(r) for r in self._invoke(self._stub.AcquireBatch, req).results]
        except Unavailable as e:
            return self._outage("acquire_batch", sender, list(recipients), e)

    def release(
        self, sender: str, recipient: str, reservation: str, *, at: Optional[datetime] = None
    ) -> bool:
        """Frees the slot `reservation` opened (the send failed). True when a slot was freed;
        False when there was none to free (already released, touched by a delivery, ended)."""
        req = cv.release_request(sender, recipient, reservation, at)
        try:
            return bool(self._invoke(self._stub.Release, req).released)
        except Unavailable as e:
            self._outage("release", sender, [recipient], e)
            raise  # pragma: no cover - _outage always raises for this method

    def confirm(
        self,
        sender: str,
        recipient: str,
        reservation: str,
        *,
        delivered_at: Optional[datetime] = None,
        at: Optional[datetime] = None,
    ) -> Optional[datetime]:
        """The message was delivered: the slot's clock starts at `delivered_at` (default: now,
        or `at`). Answers the slot's new end. After it the slot can no longer be released."""
        req = cv.confirm_request(sender, recipient, reservation, delivered_at, at)
        try:
            return cv.opt_datetime(self._invoke(self._stub.Confirm, req), "expires_at")
        except Unavailable as e:
            self._outage("confirm", sender, [recipient], e)
            raise  # pragma: no cover

    def report_failure(
        self,
        sender: str,
        recipient: str,
        reservation: Optional[str],
        error_code: int,
        *,
        at: Optional[datetime] = None,
    ) -> FailureReport:
        """WhatsApp refused the message with `error_code`: frees the slot as release() does, and
        for 131049 holds marketing to the user for 24 h (`hold_until`)."""
        req = cv.report_failure_request(sender, recipient, reservation, error_code, at)
        try:
            return cv.failure_report(self._invoke(self._stub.ReportFailure, req))
        except Unavailable as e:
            self._outage("report_failure", sender, [recipient], e)
            raise  # pragma: no cover

    def record_inbound(
        self,
        sender: str,
        recipient: str,
        *,
        free_entry_point: bool = False,
        at: Optional[datetime] = None,
    ) -> Optional[datetime]:
        """The user wrote to the sender: opens (or restarts) a customer service window; answers
        when it ends (24 h, or 72 h from a click-to-WhatsApp ad with `free_entry_point`)."""
        req = cv.record_inbound_request(sender, recipient, free_entry_point, at)
        try:
            r = self._invoke(self._stub.RecordInbound, req)
            return cv.opt_datetime(r, "service_window_expires_at")
        except Unavailable as e:
            self._outage("record_inbound", sender, [recipient], e)
            raise  # pragma: no cover

    # ------------------------------------------------------------------ patterns

    @contextlib.contextmanager
    def reserve(
        self,
        sender: str,
        recipient: str,
        *,
        kind: KindLike = MessageKind.TEMPLATE,
        category: CategoryLike = None,
        at: Optional[datetime] = None,
    ) -> Iterator[Decision]:
        """Acquire, run the body (the send), then settle the slot.

        Yields the admitted Decision; raises `Denied` (carrying the refusal) when it is refused.
        When the body raises an Exception, the slot the Acquire opened is released and the
        exception goes on; when it returns, the slot is confirmed as delivered now (`at` when
        given). An interruption (KeyboardInterrupt, asyncio.CancelledError: not an Exception)
        leaves the slot counting, neither released nor confirmed: the send may have gone out,
        and an uncounted delivery is the one error the ledger must not make (docs/contract.md,
        "Reservations"). Keep only the send in the body, for the same reason. A Decision
        with no reservation (a counted user, a service window, a store-outage admission) has
        nothing to settle. With the webhook bridge confirming deliveries, prefer acquire() and
        release() on a failed send: the bridge confirms at the real delivery time.
        """
        d = self.acquire(sender, recipient, kind=kind, category=category, at=at)
        if not d.allowed:
            raise Denied(d)
        try:
            yield d
        except Exception as body_error:
            if d.reservation:
                try:
                    self.release(sender, recipient, d.reservation, at=at)
                except WaquotaError as e:
                    _note(body_error, f"waquota: releasing {d.reservation} failed: {e}")
            raise
        if d.reservation:
            self.confirm(sender, recipient, d.reservation, at=at)

    def acquire_when_allowed(
        self,
        sender: str,
        recipient: str,
        *,
        deadline: Union[datetime, timedelta],
        jitter: timedelta = timedelta(milliseconds=50),
        kind: KindLike = MessageKind.TEMPLATE,
        category: CategoryLike = None,
        clock: Callable[[], datetime] = cv.utcnow,
        sleep: Callable[[float], None] = time.sleep,
        clock_as_at: bool = False,
        rng: Optional[random.Random] = None,
    ) -> Decision:
        """Acquires, waiting out refusals that carry `retry_at`.

        Each refusal with `retry_at` is retried at that moment plus a random jitter in
        [0, jitter] (never past the deadline). Returns the first admission, or the last refusal:
        at once for one without `retry_at` (docs/contract.md, "Retrying a refusal": never retry
        it on a timer), or when the next `retry_at` falls past `deadline` (a datetime, or a
        timedelta from the first attempt). A `retry_at` already past on `clock` (a clock ahead of
        the ledger's) waits `retry_after` from now instead. `clock` and `sleep` are the time
        source; with
        `clock_as_at` every Acquire carries `at=clock()` (a --trust-client-clock server).
        """
        rng = rng or random.Random()
        now = clock()
        end = cv.deadline_at(deadline, now)
        while True:
            d = self.acquire(
                sender, recipient, kind=kind, category=category, at=now if clock_as_at else None
            )
            nxt = cv.next_attempt(d, now, end, jitter, rng)
            if nxt is None:
                return d
            delay = (nxt - now).total_seconds()
            if delay > 0:
                sleep(delay)
            now = clock()


def _note(error: BaseException, text: str) -> None:
    add_note = getattr(error, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(text)


__all__ = ["Client", "OutageHook"]
