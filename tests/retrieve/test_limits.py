"""Archive limits, the secondary's window and request validation, without peers."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import anyio
import pytest

from gateway.config import WindowSettings
from gateway.retrieve.limits import TokenBucket, window_opens_at
from gateway.retrieve.requests import validate

LONDON = ZoneInfo("Europe/London")


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=LONDON).timestamp()


def test_window_open_closed_and_past_midnight() -> None:
    nights = [WindowSettings(days=["mon", "tue", "wed", "thu", "fri"], start="19:00", end="07:00")]
    weekend = [WindowSettings(days=["sat", "sun"]), *nights]
    # 2026-11-23 is a Monday.
    assert window_opens_at(nights, LONDON, at("2026-11-23T20:00")) is None
    assert window_opens_at(nights, LONDON, at("2026-11-24T06:59")) is None  # Monday's night
    assert window_opens_at(nights, LONDON, at("2026-11-24T07:00")) == at("2026-11-24T19:00")
    assert window_opens_at(nights, LONDON, at("2026-11-23T12:00")) == at("2026-11-23T19:00")
    # Friday night runs into Saturday morning; then nothing until Monday 19:00.
    assert window_opens_at(nights, LONDON, at("2026-11-28T06:00")) is None
    assert window_opens_at(nights, LONDON, at("2026-11-28T08:00")) == at("2026-11-30T19:00")
    assert window_opens_at(weekend, LONDON, at("2026-11-28T08:00")) is None
    assert window_opens_at([], LONDON, at("2026-11-28T08:00")) is None  # no window: always


def test_window_rejects_a_bad_time() -> None:
    with pytest.raises(ValueError, match="'25:00' is not a time of day"):
        WindowSettings(start="25:00")


@pytest.mark.asyncio
async def test_token_bucket_spaces_acquisitions_and_takes_a_new_rate_at_once() -> None:
    bucket = TokenBucket(600.0)  # one every 0.1 s
    started = time.monotonic()
    for _ in range(4):
        await bucket.acquire()
    assert 0.28 <= time.monotonic() - started < 0.6
    slow = TokenBucket(6.0)  # one every 10 s
    await slow.acquire()
    async with anyio.create_task_group() as tg:
        tg.start_soon(slow.acquire)
        await anyio.sleep(0.05)
        slow.set_rate(0)  # unlimited: the waiter goes now
    assert time.monotonic() - started < 2


def test_validate_normalises_and_names_the_problem() -> None:
    known = {"P1"}.__contains__
    clean, reason = validate(
        {"project": " P1 ", "mrn": "123", "accession": "A1", "priority": "4"}, known
    )
    assert reason is None and clean["project"] == "P1" and clean["priority"] == 4
    assert validate({"project": "P1", "study_uid": "1.2.3"}, known)[1] is None
    cases = [
        ({"mrn": "1", "accession": "2"}, "no project"),
        ({"project": "P1", "accession": "A"}, "needs a study_uid, or both mrn and accession"),
        ({"project": "P1", "mrn": "A*", "accession": "B"}, "mrn 'A*' is not usable"),
        ({"project": "P1", "study_uid": "1.2.3", "priority": True}, "priority must be"),
        ({"project": "P1", "study_uid": "1.2.3", "colour": "red"}, "unknown field(s): colour"),
        ({"project": "P1", "study_uid": "1.2.3", "series_uid": "x"}, "series_uid 'x' is not"),
    ]
    for fields, message in cases:
        reason = validate(fields, known)[1]
        assert reason is not None and reason.startswith(message), (fields, reason)
