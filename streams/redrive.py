"""`tagstream redrive`: send dead-lettered events back to the topic they came from, once their cause is fixed.

A dead letter keeps its event whole (SPEC.md §1): the key and value as base64, and the source record's headers as its
own. `redrive` reads a range of the `dead-letter` topic (its one partition, up to the end it has when the run
starts, so letters the workers write meanwhile are not read again), picks the letters of the input topics
(`products`, `behavior`) whose error type and source are selected, and produces each event with its key and headers
to its source topic, adding `tagstream-redriven-from` (`<dead-letter topic>:<offset>`). An event dead-lettered for its
key (`EventKeyError`) is sent keyed by its `product_id` instead, where its product's events go. An event that fails
again is dead-lettered again, with that header: nothing is lost either way.

An event is sent back once: its letter's `source` (topic, partition, offset) names it, and the Redis hash
`<prefix>:redriven` (SPEC.md §3) records it. Before a send, the run claims the event (`HSETNX` `pending:<run-id>`);
once the broker acknowledged it, the record becomes the letter's `<dead-letter topic>:<offset>`. A letter of an event
sent already, by an earlier run or earlier in this one (a worker that restarted before committing dead-letters the same
event again), is skipped as `event already sent back`, so running the same command twice counts no click twice; one
whose event another run claimed (a run going on at the same time, or one that stopped between its send and its
record: a crash, Redis gone, a broker timeout) is skipped as `claimed by another run, send in doubt`, so two runs at
once send no event twice either. `again` resends events sent or claimed by earlier runs (overwriting their record);
within one run each event is still sent once. A dry run reads the records and writes none.
An event sent back that fails again gets a letter of its own source (where it was sent), which a later run sends.
Letters are sent one at a time; one the broker refuses stops the run there, with `error` in the line and
`next_offset` at that letter (all before it were sent; `skipped` and the error types count only the letters before
it). A refusal that may still have been appended (a timeout) leaves the event claimed: in doubt, sent again only with
`again`; never lost, never sent twice unless asked to.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import uuid
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from schemas import DeadLetter
from streams.processor import SOURCE_TIMESTAMP_HEADER
from streams.settings import WorkerSettings
from streams.topics import BEHAVIOR, DEAD_LETTER, DEAD_LETTER_MAX_BYTES, PRODUCTS, partition_counts
from tagstream.errors import ConfigError, EventKeyError, StateError, TagstreamError

REDRIVEN_FROM_HEADER = "tagstream-redriven-from"
INPUT_TOPICS = (PRODUCTS.name, BEHAVIOR.name)
ALREADY_SENT = "event already sent back"  # the skip reason of a letter whose event a run sent
# the skip reason of a letter whose event another run claimed (`pending:<run-id>`) and has not recorded as sent: that
# run is sending it now, or it stopped not knowing whether the broker took it (a crash, Redis gone, a timeout)
IN_DOUBT = "claimed by another run, send in doubt"
PENDING = "pending:"  # `<prefix>:redriven` value of an event a run claimed, before the broker acknowledged it
REDIS_TIMEOUT_S = 5.0


def redriven_key(redis_prefix: str) -> str:
    """The Redis hash of the events redrive sent back: `<topic>:<partition>:<offset>` of the event's source record →
    `<dead-letter topic>:<offset>` of the letter it was sent from, or `pending:<run-id>` while that run sends it
    (SPEC.md §3)."""
    return f"{redis_prefix}:redriven"


def skip_reason(recorded: bytes | str | None) -> str | None:
    """Why a letter is not sent whose event `<prefix>:redriven` records as `recorded` (None: not recorded, send it):
    `ALREADY_SENT` for a completed send, `IN_DOUBT` for another run's claim."""
    if recorded is None:
        return None
    text = recorded.decode() if isinstance(recorded, bytes) else recorded
    return IN_DOUBT if text.startswith(PENDING) else ALREADY_SENT


def in_doubt(exc: Exception) -> bool:
    """Whether a send that raised `exc` may still have been appended (a timeout, a connection lost, an error after
    the append): then its claim stays; a refusal (too large, not authorized, ...) appended nothing."""
    from aiokafka.errors import KafkaTimeoutError

    return bool(getattr(exc, "retriable", False)) or isinstance(exc, KafkaTimeoutError)


class _Hashes(Protocol):  # the few calls of redis.asyncio.Redis that Claims makes
    async def hmget(self, name: str, keys: list[str]) -> list[Any]: ...
    async def hget(self, name: str, key: str) -> Any: ...
    async def hset(self, name: str, key: str, value: str) -> Any: ...
    async def hsetnx(self, name: str, key: str, value: str) -> Any: ...
    async def eval(self, script: str, numkeys: int, *args: str) -> Any: ...


_RELEASE = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end"


@dataclass(slots=True)
class Claims:
    """One run's hold on the events it sends, in `<prefix>:redriven` (`key`): before a send it claims the event
    (`HSETNX` `pending:<run_id>`), so that a run going on at the same time skips it; after the broker acknowledged it,
    `record` writes the letter's `<dead_letter_topic>:<offset>`. With `again`, a claim or record of another run is
    overwritten; with `dry_run`, nothing is written (and with both, nothing is read)."""

    store: _Hashes
    key: str
    dead_letter_topic: str
    run_id: str
    dry_run: bool = False
    again: bool = False
    known: dict[str, Any] = field(default_factory=dict)  # what `read` found, by source

    async def read(self, sources: list[str]) -> None:
        """Read the records of a batch's events at once (one round trip; `claim` checks again before a send)."""
        self.known = {}
        if sources and not self.again:
            self.known = dict(zip(sources, await self.store.hmget(self.key, sources), strict=True))

    async def claim(self, source: str) -> str | None:
        """Claim the event `source` for this run (dry: only check): None when this run sends it, else why not."""
        if self.again:
            if not self.dry_run:
                await self.store.hset(self.key, source, PENDING + self.run_id)
            return None
        reason = skip_reason(self.known.get(source))
        if reason is not None or self.dry_run:
            return reason
        if await self.store.hsetnx(self.key, source, PENDING + self.run_id):
            return None
        return skip_reason(await self.store.hget(self.key, source)) or IN_DOUBT  # another run came first

    async def record(self, source: str, offset: int) -> None:
        """The broker acknowledged the event `source`, sent from the letter at `offset`."""
        await self.store.hset(self.key, source, f"{self.dead_letter_topic}:{offset}")

    async def release(self, source: str) -> None:
        """Drop this run's claim of an event the broker refused for sure (still this run's: not another's record)."""
        await self.store.eval(_RELEASE, 1, self.key, source, PENDING + self.run_id)


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

    def count_sent(self, plan: Resend, seen: Counter[str]) -> None:
        """A letter whose event this run sent (or, dry, would send); `seen`: its error type."""
        self.sent[plan.topic] += 1
        self.rekeyed += plan.rekeyed
        self.error_types.update(seen)

    def count_skipped(self, reason: str, seen: Counter[str]) -> None:
        """A letter skipped for `reason`; `seen`: its error type, if it is a readable letter of an input topic."""
        self.skipped[reason] += 1
        self.error_types.update(seen)

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
    the start of the run)) back to their source topics (`plan_resend`), each event once (claimed and recorded in
    `<prefix>:redriven`; with `again`, also events sent or claimed by earlier runs; within the run, still once); with
    `dry_run`, only count them (reading the records, writing none). StateError when Redis, where the
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
        run = Claims(store, sent_key, name, run_id=uuid.uuid4().hex, dry_run=dry_run, again=again)
        this_run: set[str] = set()  # the events this run sent (or, dry, would send)
        while await consumer.position(tp) < stop:
            read: list[tuple[int, Resend | str, Counter[str]]] = []  # counted once the run passes their offsets
            for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if record.offset >= stop:
                    break
                seen: Counter[str] = Counter()
                plan = plan_resend(
                    record.value,
                    record.headers,
                    record.offset,
                    settings,
                    sources=sources,
                    error_types=error_types,
                    seen_types=seen,
                )
                read.append((record.offset, plan, seen))
            unread: RedisError | None = None
            try:
                await run.read([p.source for _, p, _ in read if isinstance(p, Resend) and p.source not in this_run])
            except RedisError as exc:  # the run stops at the batch's first letter to send
                unread = exc
            for offset, plan, seen in read:
                if isinstance(plan, str) or plan.source in this_run:
                    result.count_skipped(plan if isinstance(plan, str) else ALREADY_SENT, seen)
                    continue
                try:
                    if unread is not None:
                        raise unread
                    reason = await run.claim(plan.source)
                except RedisError as exc:
                    result.next_offset = offset
                    result.error = f"dead letter {offset}: could not read or claim its event in {sent_key}: {exc}"
                    return result
                if reason is not None:
                    result.count_skipped(reason, seen)
                    continue
                if producer is not None:
                    try:  # one at a time: a refusal stops the run at this letter, all before it sent
                        await producer.send_and_wait(
                            settings.topic(plan.topic), plan.value, key=plan.key, headers=plan.headers
                        )
                    except KafkaError as exc:
                        result.next_offset = offset
                        result.error = f"dead letter {offset} to {settings.topic(plan.topic)}: {exc!r}"
                        if in_doubt(exc):  # its claim stays
                            result.error += (
                                f"; the broker may have taken it: a later run skips it ({IN_DOUBT}); --again sends it"
                            )
                        else:  # refused for sure: a run from here sends it
                            with contextlib.suppress(RedisError):
                                await run.release(plan.source)
                        return result
                    try:
                        await run.record(plan.source, offset)
                    except RedisError as exc:  # sent, not recorded: its claim stays
                        result.count_sent(plan, seen)
                        result.next_offset = offset + 1
                        result.error = (
                            f"dead letter {offset} was sent to {settings.topic(plan.topic)} but could not be "
                            f"recorded in {sent_key} ({exc}): a later run skips it ({IN_DOUBT}); --again sends it"
                        )
                        return result
                this_run.add(plan.source)
                result.count_sent(plan, seen)
        return result
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()
        await store.aclose()
