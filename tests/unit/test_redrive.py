"""Which dead letters `tagstream redrive` sends back, and as what (no services)."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest

from streams.processor import InMessage, dead_letter
from streams.redrive import Resend, plan_resend
from streams.settings import WorkerSettings
from tagstream.errors import EventDecodeError, EventTimeError

SETTINGS = WorkerSettings(topic_prefix="t1.")


def _letter(topic: str = "t1.products", exc: Exception | None = None, value: bytes | None = b'{"a":1}') -> tuple:
    msg = InMessage(topic, 2, 40, b"p-1", value, 1_764_316_800_000, [("traceparent", b"00-ab-cd-01")])
    return dead_letter(msg, exc or EventTimeError("ahead"))


def test_a_letter_is_sent_back_whole_to_its_source_with_where_it_was() -> None:
    _, value, headers = _letter()
    plan = plan_resend(value, headers, 7, SETTINGS)
    sent_headers = [("traceparent", b"00-ab-cd-01"), ("tagstream-redriven-from", b"t1.dead-letter:7")]
    # the source's Kafka timestamp header is not sent on: the new record has its own
    # named by its source record: letters of one event (dead-lettered again after a restart) name the same one
    assert plan == Resend("products", b"p-1", b'{"a":1}', sent_headers, source="t1.products:2:40")


@pytest.mark.parametrize(
    ("letter", "kwargs", "reason"),
    [
        (_letter(topic="t1.model-updates"), {}, "not an input topic"),
        (_letter(topic="t2.products"), {}, "not an input topic"),  # another prefix's topic
        (_letter(topic="t1.behavior"), {"sources": ["products"]}, "source not selected"),
        (_letter(exc=EventDecodeError("bad")), {"error_types": ["EventTimeError"]}, "error type not selected"),
        (_letter(value=None), {}, "no value"),
    ],
)
def test_letters_not_selected_are_skipped_with_the_reason(letter: tuple, kwargs: dict, reason: str) -> None:
    _, value, headers = letter
    seen: Counter[str] = Counter()
    assert plan_resend(value, headers, 0, SETTINGS, **kwargs, seen_types=seen) == reason
    # error types are counted for the letters of input topics (a typed --error-type is checked against them)
    assert seen == (Counter() if reason == "not an input topic" else Counter([orjson.loads(value)["error_type"]]))


@pytest.mark.parametrize(
    "value",
    [b"not json", orjson.dumps({"schema_version": 1}), None, orjson.loads(_letter()[1]) | {"value_b64": "%%"}],
)
def test_a_record_that_is_not_a_dead_letter_is_unreadable(value: object) -> None:
    raw = orjson.dumps(value) if isinstance(value, dict) else value
    assert plan_resend(raw, [], 0, SETTINGS) == "unreadable"  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [None, b"p-2"])
def test_a_letter_dead_lettered_for_its_key_is_sent_keyed_by_its_product_id(key: bytes | None) -> None:
    from streams.processor import key_error

    event = b'{"product_id": "p-1", "a": 1}'
    msg = InMessage("t1.behavior", 0, 3, key, event, 1_764_316_800_000)
    _, value, headers = dead_letter(msg, key_error(key, "p-1"))
    plan = plan_resend(value, headers, 9, SETTINGS)
    assert isinstance(plan, Resend) and plan.rekeyed  # as it was, it would be dead-lettered again at every redrive
    assert (plan.topic, plan.key, plan.value) == ("behavior", b"p-1", event)
    other = plan_resend(*_letter()[1:], 9, SETTINGS)  # any other error: its own key, whole
    assert isinstance(other, Resend) and other.key == b"p-1" and not other.rekeyed
