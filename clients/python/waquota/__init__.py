"""Python client for waquota, the WhatsApp Business messaging-limit service.

    from waquota import Client
    with Client("127.0.0.1:50051") as wq:
        d = wq.acquire("15550100", "+49 151 1234 5678")
        if d.allowed: ...

See docs/worker-guide.md in the waquota repository for the worker patterns.
"""
from ._aio import AsyncClient, AsyncOutageHook
from ._client import Client, OutageHook
from ._convert import allow_on_outage
from ._errors import (
    DeadlineExceeded,
    Denied,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    WaquotaError,
)
from ._types import (
    Category,
    Decision,
    DecisionCode,
    FailureReport,
    MessageKind,
    Scope,
    StoreOutage,
    Tier,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncOutageHook",
    "Category",
    "Client",
    "DeadlineExceeded",
    "Decision",
    "DecisionCode",
    "Denied",
    "FailedPrecondition",
    "FailureReport",
    "Internal",
    "InvalidArgument",
    "MessageKind",
    "NotFound",
    "OutageHook",
    "PermissionDenied",
    "ResourceExhausted",
    "Scope",
    "StoreOutage",
    "Tier",
    "Unauthenticated",
    "Unavailable",
    "WaquotaError",
    "allow_on_outage",
]
