"""Which dead letters `tagstream redrive` sends back, and as what (no services)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest

from streams.processor import InMessage, dead_letter
from streams.redrive import ALREADY_SENT, IN_DOUBT, Claims, Resend, in_doubt, plan_resend, skip_reason
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


class _Hash:
    """The few Redis hash calls `Claims` makes, on one dict (bytes values, as redis-py returns them)."""

    def __init__(self) -> None:
        self.fields: dict[str, bytes] = {}

    async def hmget(self, name: str, keys: list[str]) -> list[Any]:
        return [self.fields.get(k) for k in keys]

    async def hget(self, name: str, key: str) -> Any:
        return self.fields.get(key)

    async def hset(self, name: str, key: str, value: str) -> int:
        self.fields[key] = value.encode()
        return 1

    async def hsetnx(self, name: str, key: str, value: str) -> int:
        if key in self.fields:
            return 0
        self.fields[key] = value.encode()
        return 1

    async def eval(self, script: str, numkeys: int, key: str, source: str, value: str) -> int:
        return int(self.fields.get(source) == value.encode() and self.fields.pop(source) is not None)


def _claims(store: _Hash, run_id: str, **kwargs: bool) -> Claims:
    return Claims(store, "t1:redriven", "t1.dead-letter", run_id, **kwargs)  # type: ignore[arg-type]


def test_two_runs_at_once_send_an_event_once() -> None:
    """Both runs read the batch before either sent (HMGET, then HSET after each send): both sent every event."""
    store = _Hash()

    async def go() -> list[str | None]:
        one, two = _claims(store, "r1"), _claims(store, "r2")
        await one.read(["t1.behavior:0:7"])
        await two.read(["t1.behavior:0:7"])  # not sent yet when both read
        got = [await one.claim("t1.behavior:0:7"), await two.claim("t1.behavior:0:7")]
        await one.record("t1.behavior:0:7", 3)
        third = _claims(store, "r3")
        await third.read(["t1.behavior:0:7"])
        return [*got, await third.claim("t1.behavior:0:7")]

    assert asyncio.run(go()) == [None, IN_DOUBT, ALREADY_SENT]
    assert store.fields == {"t1.behavior:0:7": b"t1.dead-letter:3"}


def test_an_event_left_claimed_is_in_doubt_until_sent_again_with_again() -> None:
    store = _Hash()
    store.fields["t1.products:1:4"] = b"pending:crashed"  # a run stopped between its send and its record

    async def go() -> list[str | None]:
        got = []
        for kwargs in ({}, {"dry_run": True}, {"dry_run": True, "again": True}):
            run = _claims(store, "r1", **kwargs)
            await run.read(["t1.products:1:4"])
            got.append(await run.claim("t1.products:1:4"))
        assert store.fields == {"t1.products:1:4": b"pending:crashed"}  # a dry run writes nothing
        again = _claims(store, "r2", again=True)
        got.append(await again.claim("t1.products:1:4"))
        assert store.fields == {"t1.products:1:4": b"pending:r2"}  # claimed anew: a crash now leaves it in doubt
        await again.record("t1.products:1:4", 9)
        return got

    assert asyncio.run(go()) == [IN_DOUBT, IN_DOUBT, None, None]
    assert store.fields == {"t1.products:1:4": b"t1.dead-letter:9"}


def test_a_claim_is_released_only_by_its_run_and_only_when_the_broker_refused_for_sure() -> None:
    from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, RequestTimedOutError

    store = _Hash()

    async def go() -> None:
        one = _claims(store, "r1")
        assert await one.claim("s") is None
        await _claims(store, "r2").release("s")  # not its claim
        assert store.fields == {"s": b"pending:r1"}
        await one.release("s")
        assert store.fields == {}

    asyncio.run(go())
    assert not in_doubt(MessageSizeTooLargeError())  # refused: nothing appended, a run from there sends it
    assert in_doubt(RequestTimedOutError()) and in_doubt(KafkaTimeoutError())  # may have been appended
    assert (skip_reason(None), skip_reason(b"pending:x"), skip_reason("t1.dead-letter:3")) == (
        None,
        IN_DOUBT,
        ALREADY_SENT,
    )
