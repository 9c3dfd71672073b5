import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_KIND_UNSPECIFIED: _ClassVar[MessageKind]
    MESSAGE_KIND_TEMPLATE: _ClassVar[MessageKind]
    MESSAGE_KIND_FREE_FORM: _ClassVar[MessageKind]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOWED_NEW: _ClassVar[Decision]
    DECISION_ALLOWED_COUNTED: _ClassVar[Decision]
    DECISION_ALLOWED_SERVICE_WINDOW: _ClassVar[Decision]
    DECISION_DENIED_LIMIT: _ClassVar[Decision]
    DECISION_DENIED_OUTSIDE_SERVICE_WINDOW: _ClassVar[Decision]
    DECISION_DENIED_THROUGHPUT: _ClassVar[Decision]
    DECISION_DENIED_PAIR_RATE: _ClassVar[Decision]
    DECISION_DENIED_SENDER_BLOCKED: _ClassVar[Decision]
    DECISION_DENIED_MARKETING_CAP: _ClassVar[Decision]
    DECISION_DENIED_LEDGER_LOST: _ClassVar[Decision]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_SENDER: _ClassVar[Scope]
    SCOPE_PORTFOLIO: _ClassVar[Scope]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_50: _ClassVar[Tier]
    TIER_250: _ClassVar[Tier]
    TIER_1K: _ClassVar[Tier]
    TIER_2K: _ClassVar[Tier]
    TIER_10K: _ClassVar[Tier]
    TIER_100K: _ClassVar[Tier]
    TIER_UNLIMITED: _ClassVar[Tier]

class WindowMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WINDOW_MODE_UNSPECIFIED: _ClassVar[WindowMode]
    WINDOW_MODE_CONVERSATION: _ClassVar[WindowMode]
    WINDOW_MODE_ROLLING: _ClassVar[WindowMode]

class SenderStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SENDER_STATUS_UNSPECIFIED: _ClassVar[SenderStatus]
    SENDER_STATUS_CONNECTED: _ClassVar[SenderStatus]
    SENDER_STATUS_FLAGGED: _ClassVar[SenderStatus]
    SENDER_STATUS_RESTRICTED: _ClassVar[SenderStatus]
    SENDER_STATUS_PAUSED: _ClassVar[SenderStatus]
    SENDER_STATUS_BANNED: _ClassVar[SenderStatus]
    SENDER_STATUS_DISCONNECTED: _ClassVar[SenderStatus]

class Quality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUALITY_UNSPECIFIED: _ClassVar[Quality]
    QUALITY_GREEN: _ClassVar[Quality]
    QUALITY_YELLOW: _ClassVar[Quality]
    QUALITY_RED: _ClassVar[Quality]

class RuleSet(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RULE_SET_UNSPECIFIED: _ClassVar[RuleSet]
    RULE_SET_LEGACY: _ClassVar[RuleSet]
    RULE_SET_PORTFOLIO: _ClassVar[RuleSet]

class Category(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATEGORY_UNSPECIFIED: _ClassVar[Category]
    CATEGORY_MARKETING: _ClassVar[Category]
    CATEGORY_UTILITY: _ClassVar[Category]
    CATEGORY_AUTHENTICATION: _ClassVar[Category]
    CATEGORY_SERVICE: _ClassVar[Category]

class TargetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_KIND_UNSPECIFIED: _ClassVar[TargetKind]
    TARGET_KIND_SENDER: _ClassVar[TargetKind]
    TARGET_KIND_PORTFOLIO: _ClassVar[TargetKind]
MESSAGE_KIND_UNSPECIFIED: MessageKind
MESSAGE_KIND_TEMPLATE: MessageKind
MESSAGE_KIND_FREE_FORM: MessageKind
DECISION_UNSPECIFIED: Decision
DECISION_ALLOWED_NEW: Decision
DECISION_ALLOWED_COUNTED: Decision
DECISION_ALLOWED_SERVICE_WINDOW: Decision
DECISION_DENIED_LIMIT: Decision
DECISION_DENIED_OUTSIDE_SERVICE_WINDOW: Decision
DECISION_DENIED_THROUGHPUT: Decision
DECISION_DENIED_PAIR_RATE: Decision
DECISION_DENIED_SENDER_BLOCKED: Decision
DECISION_DENIED_MARKETING_CAP: Decision
DECISION_DENIED_LEDGER_LOST: Decision
SCOPE_UNSPECIFIED: Scope
SCOPE_SENDER: Scope
SCOPE_PORTFOLIO: Scope
TIER_UNSPECIFIED: Tier
TIER_50: Tier
TIER_250: Tier
TIER_1K: Tier
TIER_2K: Tier
TIER_10K: Tier
TIER_100K: Tier
TIER_UNLIMITED: Tier
WINDOW_MODE_UNSPECIFIED: WindowMode
WINDOW_MODE_CONVERSATION: WindowMode
WINDOW_MODE_ROLLING: WindowMode
SENDER_STATUS_UNSPECIFIED: SenderStatus
SENDER_STATUS_CONNECTED: SenderStatus
SENDER_STATUS_FLAGGED: SenderStatus
SENDER_STATUS_RESTRICTED: SenderStatus
SENDER_STATUS_PAUSED: SenderStatus
SENDER_STATUS_BANNED: SenderStatus
SENDER_STATUS_DISCONNECTED: SenderStatus
QUALITY_UNSPECIFIED: Quality
QUALITY_GREEN: Quality
QUALITY_YELLOW: Quality
QUALITY_RED: Quality
RULE_SET_UNSPECIFIED: RuleSet
RULE_SET_LEGACY: RuleSet
RULE_SET_PORTFOLIO: RuleSet
CATEGORY_UNSPECIFIED: Category
CATEGORY_MARKETING: Category
CATEGORY_UTILITY: Category
CATEGORY_AUTHENTICATION: Category
CATEGORY_SERVICE: Category
TARGET_KIND_UNSPECIFIED: TargetKind
TARGET_KIND_SENDER: TargetKind
TARGET_KIND_PORTFOLIO: TargetKind

class AcquireRequest(_message.Message):
    __slots__ = ("sender", "recipient", "kind", "dry_run", "at", "category")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    kind: MessageKind
    dry_run: bool
    at: _timestamp_pb2.Timestamp
    category: Category
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., dry_run: _Optional[bool] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., category: _Optional[_Union[Category, str]] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("decision", "allowed", "expires_at", "retry_after", "limit", "used", "remaining", "tier", "scope", "reservation", "recipient", "store_outage", "retry_at")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    STORE_OUTAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AT_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    allowed: bool
    expires_at: _timestamp_pb2.Timestamp
    retry_after: _duration_pb2.Duration
    limit: int
    used: int
    remaining: int
    tier: Tier
    scope: Scope
    reservation: str
    recipient: str
    store_outage: bool
    retry_at: _timestamp_pb2.Timestamp
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., allowed: _Optional[bool] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., remaining: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., scope: _Optional[_Union[Scope, str]] = ..., reservation: _Optional[str] = ..., recipient: _Optional[str] = ..., store_outage: _Optional[bool] = ..., retry_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AcquireBatchRequest(_message.Message):
    __slots__ = ("sender", "recipients", "kind", "dry_run", "at", "category")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipients: _containers.RepeatedScalarFieldContainer[str]
    kind: MessageKind
    dry_run: bool
    at: _timestamp_pb2.Timestamp
    category: Category
    def __init__(self, sender: _Optional[str] = ..., recipients: _Optional[_Iterable[str]] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., dry_run: _Optional[bool] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., category: _Optional[_Union[Category, str]] = ...) -> None: ...

class AcquireBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AcquireResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[AcquireResponse, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("sender", "recipient", "reservation", "at")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    reservation: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., reservation: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class RecordInboundRequest(_message.Message):
    __slots__ = ("sender", "recipient", "free_entry_point", "at")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    FREE_ENTRY_POINT_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    free_entry_point: bool
    at: _timestamp_pb2.Timestamp
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., free_entry_point: _Optional[bool] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordInboundResponse(_message.Message):
    __slots__ = ("service_window_expires_at",)
    SERVICE_WINDOW_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    service_window_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, service_window_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ConfirmRequest(_message.Message):
    __slots__ = ("sender", "recipient", "reservation", "delivered_at", "at")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_AT_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    reservation: str
    delivered_at: _timestamp_pb2.Timestamp
    at: _timestamp_pb2.Timestamp
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., reservation: _Optional[str] = ..., delivered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ConfirmResponse(_message.Message):
    __slots__ = ("expires_at",)
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("sender", "recipient", "reservation", "error_code", "at")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    reservation: str
    error_code: int
    at: _timestamp_pb2.Timestamp
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., reservation: _Optional[str] = ..., error_code: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportFailureResponse(_message.Message):
    __slots__ = ("released", "hold_until")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    HOLD_UNTIL_FIELD_NUMBER: _ClassVar[int]
    released: bool
    hold_until: _timestamp_pb2.Timestamp
    def __init__(self, released: _Optional[bool] = ..., hold_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("sender", "portfolio")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    sender: str
    portfolio: str
    def __init__(self, sender: _Optional[str] = ..., portfolio: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("tier", "custom_limit", "window_mode", "status", "quality", "messages_per_second", "pair_interval", "pair_burst", "headroom_percent", "sender_cap", "marketing_cap", "marketing_cap_period", "rule_set", "auto_tier", "status_until")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_LIMIT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PAIR_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PAIR_BURST_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SENDER_CAP_FIELD_NUMBER: _ClassVar[int]
    MARKETING_CAP_FIELD_NUMBER: _ClassVar[int]
    MARKETING_CAP_PERIOD_FIELD_NUMBER: _ClassVar[int]
    RULE_SET_FIELD_NUMBER: _ClassVar[int]
    AUTO_TIER_FIELD_NUMBER: _ClassVar[int]
    STATUS_UNTIL_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    custom_limit: int
    window_mode: WindowMode
    status: SenderStatus
    quality: Quality
    messages_per_second: int
    pair_interval: _duration_pb2.Duration
    pair_burst: int
    headroom_percent: int
    sender_cap: int
    marketing_cap: int
    marketing_cap_period: _duration_pb2.Duration
    rule_set: RuleSet
    auto_tier: bool
    status_until: _timestamp_pb2.Timestamp
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., custom_limit: _Optional[int] = ..., window_mode: _Optional[_Union[WindowMode, str]] = ..., status: _Optional[_Union[SenderStatus, str]] = ..., quality: _Optional[_Union[Quality, str]] = ..., messages_per_second: _Optional[int] = ..., pair_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., pair_burst: _Optional[int] = ..., headroom_percent: _Optional[int] = ..., sender_cap: _Optional[int] = ..., marketing_cap: _Optional[int] = ..., marketing_cap_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., rule_set: _Optional[_Union[RuleSet, str]] = ..., auto_tier: _Optional[bool] = ..., status_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PutPolicyRequest(_message.Message):
    __slots__ = ("target", "policy", "at")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    target: Target
    policy: Policy
    at: _timestamp_pb2.Timestamp
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PutPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class AssignSenderRequest(_message.Message):
    __slots__ = ("sender", "portfolio", "at", "create")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    sender: str
    portfolio: str
    at: _timestamp_pb2.Timestamp
    create: bool
    def __init__(self, sender: _Optional[str] = ..., portfolio: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create: _Optional[bool] = ...) -> None: ...

class AssignSenderResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("target", "recipient", "at")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    target: Target
    recipient: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., recipient: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("policy", "scope", "limit", "used", "remaining", "next_slot_free_at", "slots_freeing_next_hour", "open_service_windows", "portfolio", "counted_until", "service_window_until", "recipient", "now", "senders", "effective_limit", "unique_7d", "unique_30d", "projection", "sender_policy", "known")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    NEXT_SLOT_FREE_AT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FREEING_NEXT_HOUR_FIELD_NUMBER: _ClassVar[int]
    OPEN_SERVICE_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    COUNTED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    SERVICE_WINDOW_UNTIL_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_7D_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_30D_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    SENDER_POLICY_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    scope: Scope
    limit: int
    used: int
    remaining: int
    next_slot_free_at: _timestamp_pb2.Timestamp
    slots_freeing_next_hour: int
    open_service_windows: int
    portfolio: str
    counted_until: _timestamp_pb2.Timestamp
    service_window_until: _timestamp_pb2.Timestamp
    recipient: str
    now: _timestamp_pb2.Timestamp
    senders: _containers.RepeatedScalarFieldContainer[str]
    effective_limit: int
    unique_7d: int
    unique_30d: int
    projection: Projection
    sender_policy: Policy
    known: bool
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., scope: _Optional[_Union[Scope, str]] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., remaining: _Optional[int] = ..., next_slot_free_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., slots_freeing_next_hour: _Optional[int] = ..., open_service_windows: _Optional[int] = ..., portfolio: _Optional[str] = ..., counted_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., service_window_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recipient: _Optional[str] = ..., now: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., senders: _Optional[_Iterable[str]] = ..., effective_limit: _Optional[int] = ..., unique_7d: _Optional[int] = ..., unique_30d: _Optional[int] = ..., projection: _Optional[_Union[Projection, _Mapping]] = ..., sender_policy: _Optional[_Union[Policy, _Mapping]] = ..., known: _Optional[bool] = ...) -> None: ...

class Projection(_message.Message):
    __slots__ = ("next_tier", "upgrade_at", "downgrade_at")
    NEXT_TIER_FIELD_NUMBER: _ClassVar[int]
    UPGRADE_AT_FIELD_NUMBER: _ClassVar[int]
    DOWNGRADE_AT_FIELD_NUMBER: _ClassVar[int]
    next_tier: Tier
    upgrade_at: _timestamp_pb2.Timestamp
    downgrade_at: _timestamp_pb2.Timestamp
    def __init__(self, next_tier: _Optional[_Union[Tier, str]] = ..., upgrade_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., downgrade_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListWindowRequest(_message.Message):
    __slots__ = ("target", "page_size", "page_token", "at")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    target: Target
    page_size: int
    page_token: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WindowEntry(_message.Message):
    __slots__ = ("recipient", "expires_at", "sender")
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    recipient: str
    expires_at: _timestamp_pb2.Timestamp
    sender: str
    def __init__(self, recipient: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sender: _Optional[str] = ...) -> None: ...

class ListWindowResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[WindowEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[WindowEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("target", "at")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    target: Target
    at: _timestamp_pb2.Timestamp
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AssignWabaRequest(_message.Message):
    __slots__ = ("waba", "portfolio")
    WABA_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    waba: str
    portfolio: str
    def __init__(self, waba: _Optional[str] = ..., portfolio: _Optional[str] = ...) -> None: ...

class AssignWabaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AcceptLedgerLossRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AcceptLedgerLossResponse(_message.Message):
    __slots__ = ("was_lost", "lost_since")
    WAS_LOST_FIELD_NUMBER: _ClassVar[int]
    LOST_SINCE_FIELD_NUMBER: _ClassVar[int]
    was_lost: bool
    lost_since: _timestamp_pb2.Timestamp
    def __init__(self, was_lost: _Optional[bool] = ..., lost_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("target", "new_users", "recipients", "start", "rate", "category", "deliveries_per_user", "with_upgrades", "horizon", "at")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NEW_USERS_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_PER_USER_FIELD_NUMBER: _ClassVar[int]
    WITH_UPGRADES_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    target: Target
    new_users: int
    recipients: _containers.RepeatedScalarFieldContainer[str]
    start: _timestamp_pb2.Timestamp
    rate: float
    category: Category
    deliveries_per_user: int
    with_upgrades: bool
    horizon: _duration_pb2.Duration
    at: _timestamp_pb2.Timestamp
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., new_users: _Optional[int] = ..., recipients: _Optional[_Iterable[str]] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rate: _Optional[float] = ..., category: _Optional[_Union[Category, str]] = ..., deliveries_per_user: _Optional[int] = ..., with_upgrades: _Optional[bool] = ..., horizon: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PlanHour(_message.Message):
    __slots__ = ("start", "sent", "new_users", "refused_limit", "refused_other", "freed", "used", "remaining", "limit", "tier")
    START_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    NEW_USERS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_LIMIT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_OTHER_FIELD_NUMBER: _ClassVar[int]
    FREED_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    sent: int
    new_users: int
    refused_limit: int
    refused_other: int
    freed: int
    used: int
    remaining: int
    limit: int
    tier: Tier
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sent: _Optional[int] = ..., new_users: _Optional[int] = ..., refused_limit: _Optional[int] = ..., refused_other: _Optional[int] = ..., freed: _Optional[int] = ..., used: _Optional[int] = ..., remaining: _Optional[int] = ..., limit: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class PlannedTier(_message.Message):
    __slots__ = ("tier", "at", "new_users")
    TIER_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    NEW_USERS_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    at: _timestamp_pb2.Timestamp
    new_users: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., new_users: _Optional[int] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("now", "start", "rate", "completes_at", "stalled", "users", "messages", "new_users", "free_users", "skipped_users", "used_at_start", "remaining_at_start", "hours", "upgrades", "ladder", "ladder_note", "senders", "scope")
    NOW_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    COMPLETES_AT_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEW_USERS_FIELD_NUMBER: _ClassVar[int]
    FREE_USERS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_USERS_FIELD_NUMBER: _ClassVar[int]
    USED_AT_START_FIELD_NUMBER: _ClassVar[int]
    REMAINING_AT_START_FIELD_NUMBER: _ClassVar[int]
    HOURS_FIELD_NUMBER: _ClassVar[int]
    UPGRADES_FIELD_NUMBER: _ClassVar[int]
    LADDER_FIELD_NUMBER: _ClassVar[int]
    LADDER_NOTE_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    now: _timestamp_pb2.Timestamp
    start: _timestamp_pb2.Timestamp
    rate: float
    completes_at: _timestamp_pb2.Timestamp
    stalled: str
    users: int
    messages: int
    new_users: int
    free_users: int
    skipped_users: int
    used_at_start: int
    remaining_at_start: int
    hours: _containers.RepeatedCompositeFieldContainer[PlanHour]
    upgrades: _containers.RepeatedCompositeFieldContainer[PlannedTier]
    ladder: _containers.RepeatedCompositeFieldContainer[PlannedTier]
    ladder_note: str
    senders: _containers.RepeatedScalarFieldContainer[str]
    scope: Scope
    def __init__(self, now: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rate: _Optional[float] = ..., completes_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stalled: _Optional[str] = ..., users: _Optional[int] = ..., messages: _Optional[int] = ..., new_users: _Optional[int] = ..., free_users: _Optional[int] = ..., skipped_users: _Optional[int] = ..., used_at_start: _Optional[int] = ..., remaining_at_start: _Optional[int] = ..., hours: _Optional[_Iterable[_Union[PlanHour, _Mapping]]] = ..., upgrades: _Optional[_Iterable[_Union[PlannedTier, _Mapping]]] = ..., ladder: _Optional[_Iterable[_Union[PlannedTier, _Mapping]]] = ..., ladder_note: _Optional[str] = ..., senders: _Optional[_Iterable[str]] = ..., scope: _Optional[_Union[Scope, str]] = ...) -> None: ...

class ListTargetsRequest(_message.Message):
    __slots__ = ("kind", "page_size", "page_token", "at")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    kind: TargetKind
    page_size: int
    page_token: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[TargetKind, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TargetSummary(_message.Message):
    __slots__ = ("target", "scope", "tier", "limit", "used", "remaining", "status", "portfolio", "senders")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    target: Target
    scope: Scope
    tier: Tier
    limit: int
    used: int
    remaining: int
    status: SenderStatus
    portfolio: str
    senders: int
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., scope: _Optional[_Union[Scope, str]] = ..., tier: _Optional[_Union[Tier, str]] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., remaining: _Optional[int] = ..., status: _Optional[_Union[SenderStatus, str]] = ..., portfolio: _Optional[str] = ..., senders: _Optional[int] = ...) -> None: ...

class ListTargetsResponse(_message.Message):
    __slots__ = ("targets", "next_page_token")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[TargetSummary]
    next_page_token: str
    def __init__(self, targets: _Optional[_Iterable[_Union[TargetSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("target", "limit")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    target: Target
    limit: int
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("at", "rpc", "actor", "change", "target")
    AT_FIELD_NUMBER: _ClassVar[int]
    RPC_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    rpc: str
    actor: str
    change: str
    target: Target
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rpc: _Optional[str] = ..., actor: _Optional[str] = ..., change: _Optional[str] = ..., target: _Optional[_Union[Target, _Mapping]] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...
