"""`tagstream redrive`: send dead-lettered events back to the topic they came from, once their cause is fixed.

A dead letter keeps its event whole (SPEC.md §1): the key and value as base64, and the source record's headers as its
own. `redrive` reads a range of the `dead-letter` topic (its one partition, up to the end it has when the run
starts, so letters the workers write meanwhile are not read again), picks the letters of the input topics
(`products`, `behavior`) whose error type and source are selected, and produces each event with its key and headers
to its source topic, adding `tagstream-redriven-from` (`<dead-letter topic>:<offset>`). An event dead-lettered for its
key (`EventKeyError`) is sent keyed by its `product_id` instead, where its product's events go. An event that fails
again is dead-lettered again, with that header: nothing is lost either way.

An event is sent back once: its letter's `source` (topic, partition, offset) names it, and the Redis hash
`<prefix>:redriven` (SPEC.md §3) records each one sent, after the broker acknowledged it. A letter of an event sent
already, by an earlier run or earlier in this one (a worker that restarted before committing dead-letters the same
event again), is skipped, so running the same command twice counts no click twice; `again` sends such letters anyway.
An event sent back that fails again gets a letter of its own source (where it was sent), which a later run sends.
Letters are sent one at a time; one the broker refuses stops the run there, with `error` in the line and
`next_offset` at that letter (all before it were sent). A run stopped between a send and its record in Redis (a
crash, Redis gone) sends that one event again next time: at least once, never lost.
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
from tagstream.errors import ConfigError, EventKeyError, StateError, TagstreamError

REDRIVEN_FROM_HEADER = "tagstream-redriven-from"
INPUT_TOPICS = (PRODUCTS.name, BEHAVIOR.name)
ALREADY_SENT = "event already sent back"  # the skip reason of a letter whose event a run sent
REDIS_TIMEOUT_S = 5.0


def redriven_key(redis_prefix: str) -> str:
    """The Redis hash of the events redrive sent back: `<topic>:<partition>:<offset>` of the event's source record →
    `<dead-letter topic>:<offset>` of the letter it was sent from (SPEC.md §3)."""
    return f"{redis_prefix}:redriven"


@dataclass(frozen=True, slots=True)
class Resend:
    """One event to send again: its logical source topic, key, value and headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    rekeyed: bool = False  # an EventKeyError letter: sent keyed by its event's product_id instead of its own key
    source: str = ""  # the event's source record, `<topic>:<partition>:<offset>`: what names it across letters


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
    error_types: Counter[str] = field(default_factory=Counter)  # of the readable letters of input topics read

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
    seen_types: Counter[str] | None = None,
) -> Resend | str:
    """The event a dead-letter record at `offset` holds, to send again; or why it is skipped (one short reason:
    `unreadable`, `not an input topic`, `source not selected`, `error type not selected`, `no value`). The error
    type of a readable letter of an input topic is counted in `seen_types`."""
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
    if seen_types is not None:
        seen_types[letter.error_type] += 1
    if topic not in sources:
        return "source not selected"
    if error_types and letter.error_type not in error_types:
        return "error type not selected"
    if event is None:
        return "no value"
    kept = [(k, v) for k, v in headers if k != SOURCE_TIMESTAMP_HEADER]
    where = f"{settings.topic(DEAD_LETTER.name)}:{offset}".encode()
    source = f"{name}:{letter.source.partition}:{letter.source.offset}"
    product_id = _product_id(event) if letter.error_type == EventKeyError.__name__ else None
    if product_id is not None:  # its own key was the error: sent where its product's events go
        rekeyed = [*kept, (REDRIVEN_FROM_HEADER, where)]
        return Resend(topic, product_id.encode(), event, rekeyed, rekeyed=True, source=source)
    return Resend(topic, key, event, [*kept, (REDRIVEN_FROM_HEADER, where)], source=source)


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
    again: bool = False,
) -> RedriveResult:
    """Send the selected dead letters in [from_offset (default: the topic's first), to_offset (default: its end at
    the start of the run)) back to their source topics (`plan_resend`), each event once (`<prefix>:redriven`; with
    `again`, also events sent by earlier runs); with `dry_run`, only count them. StateError when Redis, where the
    events sent are recorded, does not answer."""
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.errors import KafkaError
    from redis.exceptions import RedisError

    name = settings.topic(DEAD_LETTER.name)
    sent_key = redriven_key(settings.redis_prefix)
    store = aioredis.from_url(
        settings.redis_url.get_secret_value(),
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    producer = None
    try:
        try:
            await store.ping()
        except RedisError as exc:
            raise StateError(
                f"could not reach Redis ({exc}): redrive records there ({sent_key}) the events it sent back, so that "
                "no run sends one twice; see TAGSTREAM_REDIS_URL"
            ) from exc
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
        this_run: set[str] = set()  # the events this run sent (or, dry, would send)
        while await consumer.position(tp) < stop:
            planned: list[tuple[int, Resend]] = []
            for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if record.offset >= stop:
                    break
                plan = plan_resend(
                    record.value,
                    record.headers,
                    record.offset,
                    settings,
                    sources=sources,
                    error_types=error_types,
                    seen_types=result.error_types,
                )
                if isinstance(plan, str):
                    result.skipped[plan] += 1
                else:
                    planned.append((record.offset, plan))
            if not planned:
                continue
            try:
                earlier = (
                    [False] * len(planned) if again else await store.hmget(sent_key, [p.source for _, p in planned])
                )
            except RedisError as exc:
                result.next_offset = planned[0][0]
                result.error = f"dead letter {planned[0][0]}: could not read {sent_key} from Redis: {exc}"
                return result
            for (offset, plan), sent_before in zip(planned, earlier, strict=True):
                if sent_before or plan.source in this_run:
                    result.skipped[ALREADY_SENT] += 1
                    continue
                if producer is not None:
                    try:  # one at a time: a refusal stops the run at this letter, all before it sent
                        await producer.send_and_wait(
                            settings.topic(plan.topic), plan.value, key=plan.key, headers=plan.headers
                        )
                    except KafkaError as exc:
                        result.next_offset = offset
                        result.error = f"dead letter {offset} to {settings.topic(plan.topic)}: {exc!r}"
                        return result
                    try:
                        await store.hset(sent_key, plan.source, f"{name}:{offset}")
                    except RedisError as exc:  # sent, not recorded: a run from here would send it once more
                        result.sent[plan.topic] += 1
                        result.rekeyed += plan.rekeyed
                        result.next_offset = offset + 1
                        result.error = (
                            f"dead letter {offset} was sent to {settings.topic(plan.topic)} but could not be "
                            f"recorded in {sent_key} ({exc}): a run including it sends it again"
                        )
                        return result
                this_run.add(plan.source)
                result.sent[plan.topic] += 1
                result.rekeyed += plan.rekeyed
        return result
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()
        await store.aclose()
