"""The asyncio client (grpc.aio), with the same methods as `Client`."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
from datetime import datetime, timedelta
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence, Union

import grpc
import grpc.aio

from . import _convert as cv
from ._channel import PemSource, credentials, metadata
from ._errors import Denied, Unavailable, WaquotaError, from_status
from ._proto.waquota.v1 import waquota_pb2_grpc as pb_grpc
from ._types import CategoryLike, Decision, FailureReport, KindLike, MessageKind, StoreOutage

# The hook may be a plain function or a coroutine function.
AsyncOutageHook = Callable[
    [StoreOutage], Union[Optional[Decision], Awaitable[Optional[Decision]]]
]

_ACQUIRES = ("acquire", "acquire_batch")


class AsyncClient:
    """An asyncio client of `waquota.v1.QuotaService`; the options are those of `Client`.

    Create it inside a running event loop (grpc.aio binds the channel to it); close it with
    `await client.close()` or `async with AsyncClient(...) as client:`.
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
        on_store_outage: Optional[AsyncOutageHook] = None,
        channel: Optional[grpc.aio.Channel] = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if channel is None:
            creds = credentials(tls, ca, cert, key)
            if creds is None:
                channel = grpc.aio.insecure_channel(addr, options=list(options))
            else:
                channel = grpc.aio.secure_channel(addr, creds, options=list(options))
            self._owns_channel = True
        else:
            self._owns_channel = False
        self._channel = channel
        self._stub: Any = pb_grpc.QuotaServiceStub(channel)  # type: ignore[no-untyped-call]
        self._metadata = metadata(token)
        self._timeout = timeout
        self._on_store_outage = on_store_outage

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ plumbing

    async def _invoke(self, rpc: Any, request: Any) -> Any:
        try:
            return await rpc(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_status(e.code(), e.details()) from None

    async def _outage(
        self, method: str, sender: str, recipients: Sequence[str], err: Unavailable
    ) -> list[Decision]:
        if self._on_store_outage is None:
            raise err
        result = self._on_store_outage(StoreOutage(method, sender, tuple(recipients), err.message))
        if inspect.isawaitable(result):
            result = await result
        if result is None or method not in _ACQUIRES:
            raise err
        return cv.outage_decisions(result, recipients)

    # ------------------------------------------------------------------ QuotaService

    async def acquire(
        self,
        sender: str,
        recipient: str,
        *,
        kind: KindLike = MessageKind.TEMPLATE,
        category: CategoryLike = None,
        at: Optional[datetime] = None,
        dry_run: bool = False,
    ) -> Decision:
        """See `Client.acquire`."""
        req = cv.acquire_request(sender, recipient, kind, category, at, dry_run)
        try:
            return cv.decision(await self._invoke(self._stub.Acquire, req))
        except Unavailable as e:
            return (await self._outage("acquire", sender, [recipient], e))[0]

    async def acquire_batch(
        self,
        sender: str,
        recipients: Sequence[str],
        *,
        kind: KindLike = MessageKind.TEMPLATE,
        category: CategoryLike = None,
        at: Optional[datetime] = None,
        dry_run: bool = False,
    ) -> list[Decision]:
        """See `Client.acquire_batch`."""
        req = cv.acquire_batch_request(sender, recipients, kind, category, at, dry_run)
        try:
            r = await self._invoke(self._stub.AcquireBatch, req)
            return [cv.decision(x) for x in r.results]
        except Unavailable as e:
            return await self._outage("acquire_batch", sender, list(recipients), e)

    async def release(
        self, sender: str, recipient: str, reservation: str, *, at: Optional[datetime] = None
    ) -> bool:
        """See `Client.release`."""
        req = cv.release_request(sender, recipient, reservation, at)
        try:
            return bool((await self._invoke(self._stub.Release, req)).released)
        except Unavailable as e:
            await self._outage("release", sender, [recipient], e)
            raise  # pragma: no cover - _outage always raises for this method

    async def confirm(
        self,
        sender: str,
        recipient: str,
        reservation: str,
        *,
        delivered_at: Optional[datetime] = None,
        at: Optional[datetime] = None,
    ) -> Optional[datetime]:
        """See `Client.confirm`."""
        req = cv.confirm_request(sender, recipient, reservation, delivered_at, at)
        try:
            return cv.opt_datetime(await self._invoke(self._stub.Confirm, req), "expires_at")
        except Unavailable as e:
            await self._outage("confirm", sender, [recipient], e)
            raise  # pragma: no cover

    async def report_failure(
        self,
        sender: str,
        recipient: str,
        reservation: Optional[str],
        error_code: int,
        *,
        at: Optional[datetime] = None,
    ) -> FailureReport:
        """See `Client.report_failure`."""
        req = cv.report_failure_request(sender, recipient, reservation, error_code, at)
        try:
            return cv.failure_report(await self._invoke(self._stub.ReportFailure, req))
        except Unavailable as e:
            await self._outage("report_failure", sender, [recipient], e)
            raise  # pragma: no cover

    async def record_inbound(
        self,
        sender: str,
        recipient: str,
        *,
        free_entry_point: bool = False,
        at: Optional[datetime] = None,
    ) -> Optional[datetime]:
        """See `Client.record_inbound`."""
        req = cv.record_inbound_request(sender, recipient, free_entry_point, at)
        try:
            r = await self._invoke(self._stub.RecordInbound, req)
            return cv.opt_datetime(r, "service_window_expires_at")
        except Unavailable as e:
            await self._outage("record_inbound", sender, [recipient], e)
            raise  # pragma: no cover

    # ------------------------------------------------------------------ patterns

    @contextlib.asynccontextmanager
    async def reserve(
        self,
        sender: str,
        recipient: str,
        *,
        kind: KindLike = MessageKind.TEMPLATE,
        category: CategoryLike = None,
        at: Optional[datetime] = None,
    ) -> AsyncIterator[Decision]:
        """See `Client.reserve` (here `async with client.reserve(...) as decision:`)."""
        d = await self.acquire(sender, recipient, kind=kind, category=category, at=at)
        if not d.allowed:
            raise Denied(d)
        try:
            yield d
        except Exception as body_error:
            if d.reservation:
                try:
                    await self.release(sender, recipient, d.reservation, at=at)
                except WaquotaError as e:
                    add_note = getattr(body_error, "add_note", None)
                    if add_note is not None:
                        add_note(f"waquota: releasing {d.reservation} failed: {e}")
            raise
        if d.reservation:
            await self.confirm(sender, recipient, d.reservation, at=at)

    async def acquire_when_allowed(
        self,
        sender: str,
        recipient: str,
        *,
        deadline: Union[datetime, timedelta],
        jitter: timedelta = timedelta(milliseconds=50),
        kind: KindLike = MessageKind.TEMPLATE,
        category: CategoryLike = None,
        clock: Callable[[], datetime] = cv.utcnow,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock_as_at: bool = False,
        rng: Optional[random.Random] = None,
    ) -> Decision:
        """See `Client.acquire_when_allowed`; `sleep` is awaited."""
        rng = rng or random.Random()
        now = clock()
        end = cv.deadline_at(deadline, now)
        while True:
            d = await self.acquire(
                sender, recipient, kind=kind, category=category, at=now if clock_as_at else None
            )
            nxt = cv.next_attempt(d, now, end, jitter, rng)
            if nxt is None:
                return d
            delay = (nxt - now).total_seconds()
            if delay > 0:
                await sleep(delay)
            now = clock()


__all__ = ["AsyncClient", "AsyncOutageHook"]
