"""`tagstream redrive`: send dead-lettered events back to the topic they came from, once their cause is fixed.

A dead letter keeps its event whole (SPEC.md §1): the key and value as base64, and the source record's headers as its
own. `redrive` reads a range of the `dead-letter` topic (its one partition, up to the end it has when the run
starts, so letters the workers write meanwhile are not read again), picks the letters of the input topics
(`products`, `behavior`) whose error type and source are selected, and produces each event with its key and headers
to its source topic, adding `tagstream-redriven-from` (`<dead-letter topic>:<offset>`). An event dead-lettered for its
key (`EventKeyError`) is sent keyed by its `product_id` instead, where its product's events go. An event that fails
again is dead-lettered again, with that header: nothing is lost either way.

Every run re-sends every letter it selects, and a behaviour event sent twice is counted twice: a run prints
`next_offset`, where the next run should start (`--from-offset`). Letters are sent one at a time; one the broker
refuses stops the run there, with `error` in the line and `next_offset` at that letter (all before it were sent).
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas import DeadLetter
from streams.processor import SOURCE_TIMESTAMP_HEADER
from streams.settings import WorkerSettings
from streams.topics import BEHAVIOR, DEAD_LETTER, DEAD_LETTER_MAX_BYTES, PRODUCTS, partition_counts
from tagstream.errors import ConfigError, EventKeyError, TagstreamError

REDRIVEN_FROM_HEADER = "tagstream-redriven-from"
INPUT_TOPICS = (PRODUCTS.name, BEHAVIOR.name)


@dataclass(frozen=True, slots=True)
class Resend:
    """One event to send again: its logical source topic, key, value and headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    rekeyed: bool = False  # an EventKeyError letter: sent keyed by its event's product_id instead of its own key


@dataclass(slots=True)
class RedriveResult:
    """What one run read, sent and left, by dead-letter offset range [first_offset, next_offset)."""

    first_offset: int
    next_offset: int
    dry_run: bool
    sent: Counter[str] = field(default_factory=Counter)  # by logical source topic
    skipped: Counter[str] = field(default_factory=Counter)  # by reason
    error: str | None = None  # why the letter at next_offset could not be sent (the run stopped there)
    rekeyed: int = 0  # EventKeyError letters sent keyed by their product_id

    def to_dict(self) -> dict[str, Any]:
        """The JSON line `tagstream redrive` prints (`error` only when a send was refused)."""
        out: dict[str, Any] = {
            "first_offset": self.first_offset,
            "next_offset": self.next_offset,
            "dry_run": self.dry_run,
            "sent" if not self.dry_run else "would_send": dict(sorted(self.sent.items())),
            "skipped": dict(sorted(self.skipped.items())),
        }
        if self.rekeyed:
            out["rekeyed"] = self.rekeyed
        if self.error is not None:
            out["error"] = self.error
        return out


def plan_resend(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    offset: int,
    settings: WorkerSettings,
    *,
    sources: Collection[str] = INPUT_TOPICS,
    error_types: Collection[str] = (),
) -> Resend | str:
    """The event a dead-letter record at `offset` holds, to send again; or why it is skipped (one short reason:
    `unreadable`, `not an input topic`, `source not selected`, `error type not selected`, `no value`)."""
    try:
        letter = DeadLetter.decode(value)
        key = base64.b64decode(letter.key_b64, validate=True) if letter.key_b64 is not None else None
        event = base64.b64decode(letter.value_b64, validate=True) if letter.value_b64 is not None else None
    except (TagstreamError, binascii.Error, ValueError):
        return "unreadable"
    prefix = settings.topic_prefix
    name = letter.source.topic
    topic = name[len(prefix) :] if name.startswith(prefix) else name
    if topic not in INPUT_TOPICS or not name.startswith(prefix):
        return "not an input topic"
    if topic not in sources:
        return "source not selected"
    if error_types and letter.error_type not in error_types:
        return "error type not selected"
    if event is None:
        return "no value"
    kept = [(k, v) for k, v in headers if k != SOURCE_TIMESTAMP_HEADER]
    where = f"{settings.topic(DEAD_LETTER.name)}:{offset}".encode()
    product_id = _product_id(event) if letter.error_type == EventKeyError.__name__ else None
    if product_id is not None:  # its own key was the error: sent where its product's events go
        return Resend(topic, product_id.encode(), event, [*kept, (REDRIVEN_FROM_HEADER, where)], rekeyed=True)
    return Resend(topic, key, event, [*kept, (REDRIVEN_FROM_HEADER, where)])


def _product_id(event: bytes) -> str | None:
    """The `product_id` of an event's JSON, if it is a string."""
    try:
        found = orjson.loads(event).get("product_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return found if isinstance(found, str) else None


async def redrive(
    settings: WorkerSettings,
    *,
    from_offset: int | None = None,
    to_offset: int | None = None,
    sources: Collection[str] = INPUT_TOPICS,
    error_types: Collection[str] = (),
    dry_run: bool = False,
) -> RedriveResult:
    """Send the selected dead letters in [from_offset (default: the topic's first), to_offset (default: its end at
    the start of the run)) back to their source topics (`plan_resend`); with `dry_run`, only count them."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.errors import KafkaError

    name = settings.topic(DEAD_LETTER.name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    producer = None
    try:
        await consumer.start()
        if name not in await consumer.topics():
            raise ConfigError(
                f"no topic {name} (TAGSTREAM_TOPIC_PREFIX={settings.topic_prefix!r}; see `tagstream topics`)"
            )
        partitions = (await partition_counts(settings.kafka_bootstrap, [name], "tagstream-redrive"))[name]
        if partitions != 1:  # offsets name letters only within one partition
            raise ConfigError(
                f"topic {name} has {partitions} partitions; redrive reads a one-partition dead-letter topic, as "
                "`tagstream topics` creates it"
            )
        tp = TopicPartition(name, 0)
        consumer.assign([tp])
        start = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        first = min(end, max(start, from_offset if from_offset is not None else start))
        stop = max(first, min(end, to_offset) if to_offset is not None else end)
        result = RedriveResult(first_offset=first, next_offset=stop, dry_run=dry_run)
        if first >= stop:
            return result
        if not dry_run:
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap,
                acks="all",
                enable_idempotence=True,
                compression_type="gzip",  # as the event may have been, when its topic took it
                max_request_size=DEAD_LETTER_MAX_BYTES,
            )
            await producer.start()
        consumer.seek(tp, first)
        while await consumer.position(tp) < stop:
            for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if record.offset >= stop:
                    break
                plan = plan_resend(
                    record.value, record.headers, record.offset, settings, sources=sources, error_types=error_types
                )
                if isinstance(plan, str):
                    result.skipped[plan] += 1
                    continue
                if producer is not None:
                    try:  # one at a time: a refusal stops the run at this letter, all before it sent
                        await producer.send_and_wait(
                            settings.topic(plan.topic), plan.value, key=plan.key, headers=plan.headers
                        )
                    except KafkaError as exc:
                        result.next_offset = record.offset
                        result.error = f"dead letter {record.offset} to {settings.topic(plan.topic)}: {exc!r}"
                        return result
                result.sent[plan.topic] += 1
                result.rekeyed += plan.rekeyed
        return result
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()
