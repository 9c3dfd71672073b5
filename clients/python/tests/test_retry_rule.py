"""The wait helper's scheduling rule on its own (no server: pure arithmetic on a Decision)."""
from __future__ import annotations

import random
from datetime import timedelta

from waquota import Decision, DecisionCode
from waquota._convert import next_attempt

from conftest import T0

S = timedelta(seconds=1)


def refusal(retry_at, retry_after):
    return Decision(allowed=False, decision=DecisionCode.DENIED_LIMIT, recipient="u",
                    retry_at=retry_at, retry_after=retry_after)


def test_next_attempt_follows_retry_at_and_the_deadline():
    rng = random.Random(1)
    zero = timedelta(0)
    assert next_attempt(refusal(T0 + 5 * S, 5 * S), T0, T0 + 60 * S, zero, rng) == T0 + 5 * S
    # Past the deadline: stop. Jitter never carries a retry past it.
    assert next_attempt(refusal(T0 + 61 * S, 61 * S), T0, T0 + 60 * S, zero, rng) is None
    assert next_attempt(refusal(T0 + 60 * S, 60 * S), T0, T0 + 60 * S, 9 * S, rng) == T0 + 60 * S
    # No retry_at: never on a timer; admitted: nothing to retry.
    assert next_attempt(refusal(None, None), T0, T0 + 60 * S, zero, rng) is None
    ok = Decision(allowed=True, decision=DecisionCode.ALLOWED_NEW, recipient="u")
    assert next_attempt(ok, T0, T0 + 60 * S, zero, rng) is None


def test_a_retry_at_already_past_on_our_clock_waits_retry_after():
    # The worker's clock runs 10 s ahead of the ledger's: retry_at is in our past.
    rng = random.Random(1)
    d = refusal(T0 + 2 * S, 2 * S)
    assert next_attempt(d, T0 + 10 * S, T0 + 60 * S, timedelta(0), rng) == T0 + 12 * S
