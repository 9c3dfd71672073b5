#!/usr/bin/env python3
"""A complete waquota worker: takes jobs, acquires per recipient, waits per retry_at, builds the
WhatsApp Cloud API send body with the reservation in biz_opaque_callback_data, releases the slot
when the send fails, and prints a summary. See docs/worker-guide.md.

    python3 examples/python/worker.py --sender 15550100 --generate 5
    python3 examples/python/worker.py --sender 15550100 --jobs jobs.jsonl --send-url http://127.0.0.1:8000/send

Jobs are JSON lines: {"id": "42", "to": "+49 151 1234 5678", "template": "order_update",
"lang": "en", "category": "utility"} (only "to" is required). Without --send-url the body is
printed instead of sent; nothing here ever calls Meta.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

try:
    import waquota
except ImportError:  # run from a checkout without `pip install ./clients/python`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))
    import waquota

from waquota import Client, Decision, StoreOutage, Unavailable, WaquotaError

GRAPH_URL = "https://graph.facebook.com/v21.0/{sender}/messages"


@dataclass
class Job:
    id: str
    to: str
    template: str = "order_update"
    lang: str = "en"
    category: Optional[str] = None


@dataclass
class Summary:
    jobs: int = 0
    sent: int = 0
    send_failed: int = 0
    released: int = 0
    refused: int = 0
    gave_up: int = 0
    unavailable: int = 0
    waited: timedelta = field(default_factory=timedelta)

    def line(self) -> str:
        return (
            f"summary: jobs={self.jobs} sent={self.sent} send_failed={self.send_failed} "
            f"released={self.released} refused={self.refused} gave_up={self.gave_up} "
            f"unavailable={self.unavailable} waited={self.waited}"
        )


class SendError(Exception):
    pass


class SimulatedClock:
    """--at: a clock that starts at the given moment and moves only when the worker waits, for
    dry runs and replays against a server started with --trust-client-clock."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def read_jobs(args: argparse.Namespace) -> Iterator[Job]:
    if args.jobs:
        with open(args.jobs, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                raw = json.loads(line)
                if "to" not in raw:
                    raise SystemExit(f"worker: {args.jobs}: line {n}: a job needs \"to\"")
                yield Job(
                    id=str(raw.get("id", n)),
                    to=str(raw["to"]),
                    template=raw.get("template", "order_update"),
                    lang=raw.get("lang", "en"),
                    category=raw.get("category", args.category),
                )
    else:
        for i in range(1, args.generate + 1):
            yield Job(id=str(i), to=f"4915100000{i:03d}", category=args.category)


def send_body(job: Job, d: Decision) -> dict[str, Any]:
    """The Cloud API body. The reservation goes into biz_opaque_callback_data as `wq=<token>`,
    which WhatsApp echoes in every status of the message, so the webhook bridge confirms or
    frees exactly this slot (docs/contract.md, "The webhook bridge")."""
    callback = f"job={job.id}"
    if d.reservation:
        callback += f";wq={d.reservation}"
    return {
        "messaging_product": "whatsapp",
        "to": d.recipient or job.to,
        "type": "template",
        "template": {"name": job.template, "language": {"code": job.lang}},
        "biz_opaque_callback_data": callback,
    }


def post(url: str, body: dict[str, Any], timeout: float) -> None:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        raise SendError(f"HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SendError(str(getattr(e, "reason", e))) from None


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> Summary:
    clock: Callable[[], datetime]
    sleep: Callable[[float], None]
    if args.at:
        sim = SimulatedClock(datetime.fromisoformat(args.at.replace("Z", "+00:00")))
        clock, sleep = sim, sim.sleep
    else:
        clock, sleep = (lambda: datetime.now(timezone.utc)), time.sleep

    summary = Summary()

    def counted_sleep(seconds: float) -> None:
        summary.waited += timedelta(seconds=seconds)
        sleep(seconds)

    def on_outage(o: StoreOutage) -> Optional[Decision]:
        # Waiting for the store is the safe side: nothing goes out that the ledger did not count.
        out(f"waquota unavailable on {o.method} for {', '.join(o.recipients)}: {o.message}")
        return None

    with Client(args.addr, token=args.token, on_store_outage=on_outage) as wq:
        for job in read_jobs(args):
            summary.jobs += 1
            waited_before = summary.waited
            try:
                d = wq.acquire_when_allowed(
                    args.sender,
                    job.to,
                    deadline=timedelta(seconds=args.deadline),
                    jitter=timedelta(milliseconds=args.jitter_ms),
                    category=job.category,
                    clock=clock,
                    sleep=counted_sleep,
                    clock_as_at=bool(args.at),
                )
            except Unavailable:
                summary.unavailable += 1
                out(f"job {job.id} -> {job.to}: not sent, waquota is unavailable")
                continue
            waited = summary.waited - waited_before
            if waited:
                out(f"job {job.id} -> {job.to}: waited {waited} until {clock().isoformat()}")
            if not d.allowed:
                if d.retry_at is None:
                    summary.refused += 1
                    out(f"job {job.id} -> {job.to}: refused {d.decision.name} (no retry_at: not retried on a timer)")
                else:
                    summary.gave_up += 1
                    out(f"job {job.id} -> {job.to}: gave up, {d.decision.name} until {d.retry_at.isoformat()} is past the deadline")
                continue

            body = send_body(job, d)
            try:
                if args.send_url:
                    post(args.send_url, body, timeout=10.0)
                    out(f"job {job.id} -> {d.recipient}: {d.decision.name}, sent {body['biz_opaque_callback_data']}")
                else:
                    out(f"job {job.id} -> {d.recipient}: {d.decision.name}, POST {GRAPH_URL.format(sender=args.sender)}")
                    out("  " + json.dumps(body, sort_keys=True))
                summary.sent += 1
            except SendError as e:
                summary.send_failed += 1
                # The message never left: give the slot back so that it does not count for 24 h
                # (docs/contract.md, "Reservations"). A counted user or a service window opened no slot.
                if d.reservation:
                    try:
                        freed = wq.release(args.sender, job.to, d.reservation, at=clock() if args.at else None)
                    except WaquotaError as err:
                        # The slot then keeps counting until it ends: the safe side.
                        out(f"job {job.id} -> {d.recipient}: send failed ({e}), release failed: {err}")
                        continue
                    summary.released += int(freed)
                    out(f"job {job.id} -> {d.recipient}: send failed ({e}), released={freed}")
                else:
                    out(f"job {job.id} -> {d.recipient}: send failed ({e}), no slot to release")
    out(summary.line())
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="A waquota worker (prints or posts WhatsApp send bodies).")
    p.add_argument("--addr", default="127.0.0.1:50051", help="waquota gRPC address")
    p.add_argument("--token", default=None, help="bearer token (a sender token)")
    p.add_argument("--sender", required=True, help="the business number (phone_number_id)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jobs", help="a JSONL file of jobs")
    src.add_argument("--generate", type=int, help="make this many jobs to generated recipients")
    p.add_argument("--category", default=None, help="category of jobs that name none (e.g. marketing)")
    p.add_argument("--send-url", default=None, help="POST each body here instead of printing it")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds a job may wait for its slot")
    p.add_argument("--jitter-ms", type=float, default=50.0, help="random delay added to each retry_at")
    p.add_argument("--at", default=None, help="run on a simulated clock from this ISO time (needs a --trust-client-clock server)")
    args = p.parse_args(argv)
    if args.generate is not None and args.generate < 1:
        p.error("--generate: must be at least 1")
    summary = run(args)
    return 1 if summary.unavailable else 0


if __name__ == "__main__":
    sys.exit(main())
