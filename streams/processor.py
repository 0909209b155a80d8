"""The worker's event logic, independent of Faust: a micro-batch of raw messages in, tag updates and dead letters out.

Per batch: decode and validate every message (bad ones become dead letters), read the touched products' state in
one pipelined round trip, compute each event's effect in order (scoring all upserts of the batch in one ONNX call off
the event loop), write each product's effects with one offset-fenced Lua call per product and partition (one more
round trip, which also carries a behaviour batch's watermarks and active index), and hand back the tag updates to
publish. The caller acknowledges the messages only after the updates are delivered.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeVar

import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from redis.exceptions import RedisError

from schemas import TICK_KEY, BehaviorEvent, DeadLetter, ProductChange, SourceRef, Tag, TagUpdate, WindowTick
from schemas.registry import bounded
from serving.behaviour import (
    BehaviourConfig,
    WindowCounts,
    WindowStats,
    decode_behaviour,
    decode_behaviour_between,
    decode_new,
    next_check_at,
)
from serving.bundle import LabelMap
from serving.decoding import catalog_tags, diff_tags, group_key, merge_tags
from streams.locks import Hold, ProductLocks
from streams.privacy import UserHasher
from streams.state import (
    ActiveIndex,
    EndBatch,
    Ops,
    ProducedAt,
    ProductKeys,
    ProductState,
    StateCache,
    StateStore,
    Write,
    WriteResult,
    now_ms,
    sweep_partition,
)
from streams.topics import DEAD_LETTER_MAX_BYTES, TAG_UPDATE_MAX_BYTES
from streams.windows import GRANULARITIES, event_fields, hll_buckets, live_buckets, stale_fields, window_sums
from tagstream.errors import (
    EventDecodeError,
    EventKeyError,
    EventTimeError,
    OutputTooLargeError,
    StateConflictError,
    StateError,
    TagstreamError,
)

log = logging.getLogger(__name__)
PRUNE_EVERY_MS = GRANULARITIES[0].width_ms
USERS_DECIDE_KEPT = 4096  # products remembered as ones whose unique users decide a tag
CONFLICT_ATTEMPTS = 3  # a batch whose write found a product changed by another writer is processed again, so often


@dataclass(frozen=True, slots=True)
class InMessage:
    """One consumed message, independent of the Kafka client that read it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0
    headers: Headers = ()

    @property
    def fence_field(self) -> str:
        """The fence field of this message's partition (`<topic>:<partition>`)."""
        return f"{self.topic}:{self.partition}"

    @property
    def source(self) -> SourceRef:
        """Where this message came from."""
        return SourceRef(self.topic, self.partition, self.offset)


Headers = Sequence[tuple[str, bytes]]  # Kafka record headers, in order
SOURCE_TIMESTAMP_HEADER = "tagstream-source-timestamp"  # a dead letter's source record's Kafka timestamp (ms, decimal)
HEADERS_DROPPED_HEADER = "tagstream-headers-dropped"  # how many source headers a too large dead letter left out
DEAD_LETTER_MARGIN_BYTES = 64 * 1024  # room for the record batch's own bytes


class DeadLetterRecord(NamedTuple):
    """A dead letter as produced: the source's key, the `dead-letter` JSON, and the source's headers followed by
    SOURCE_TIMESTAMP_HEADER."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(slots=True)
class BatchOutput:
    """What one batch produced: tag updates to publish (key, value) and dead letters."""

    updates: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[DeadLetterRecord] = field(default_factory=list)
    applied: int = 0
    redelivered: int = 0
    stale: int = 0  # product changes ignored: a lower version than the one applied


@dataclass(slots=True)
class _Group:
    """One product's effects from one partition in a batch: one fenced write, every update it produced."""

    keys: ProductKeys
    write: Write
    payloads: list[bytes] = field(default_factory=list)
    events: int = 0


@dataclass(slots=True)
class _Evaluation:
    """A product's behaviour tags to look at after its last event of the batch from one partition."""

    group: _Group
    state: ProductState
    msg: InMessage
    now: int  # the product's event-time clock after it: the tags are decided at this time (the update's event_time)
    batch_users: list[Ops] | None  # the product's writes in the batch: users its HyperLogLogs lack (None: counted)


def _batch_users(writes: list[Ops], now: int) -> list[set[str]]:
    """Per window, the users a product's writes of this batch add to its HyperLogLogs in that window at `now`."""
    out = writes[0].users_in_windows(now)
    for ops in writes[1:]:  # events of one product from several partitions (a producer's own partitioner)
        out = [a | b for a, b in zip(out, ops.users_in_windows(now), strict=True)]
    return out


@dataclass(slots=True)
class _Sweeps:
    """Window-expiry writes made with a behaviour batch's own writes: the products' states, writes and updates."""

    states: dict[str, ProductState]
    writes: list[Write]
    emitted: list[tuple[str, bytes | None]]


def _carries(update: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a tag update carries the tags (and deleted flag) of a product's `current` tag state."""
    return sorted(t["tag"] for t in update["tags"]) == sorted(t["tag"] for t in current.get("tags") or ()) and bool(
        update.get("deleted")
    ) == bool(current.get("deleted"))


def _still_current(update: dict[str, Any], current: dict[str, Any] | None, latest: int) -> bool:
    """Whether a kept update may be sent again: no kept update of its product is newer (`latest`: their newest
    `emit_time`) and it carries the product's `current` tags (when given)."""
    return update["emit_time"] >= latest and (current is None or _carries(update, current))


def _latest(stored: dict[tuple[str, str], bytes | None]) -> dict[str, int]:
    """The newest `emit_time` of the updates kept for each product in `stored`."""
    latest: dict[str, int] = {}
    for (pid, _), raw in stored.items():
        if raw:
            latest[pid] = max(latest.get(pid, 0), orjson.loads(raw)["emit_time"])
    return latest


def _version(model: Any) -> str | None:
    return None if model is None else model.version


@dataclass(slots=True)
class PreparedProducts:
    """A product batch decoded and scored before its products are held: dead letters so far, the decoded events, the
    model that scored them and the model tags of each upsert (by position in `items`; None when scoring failed, to
    be tried again while held)."""

    out: BatchOutput
    items: list[tuple[InMessage, ProductChange]]
    model: ScoringModel | None
    tags: dict[int, list[Tag]] | None
    product_ids: set[str] = field(init=False)  # the products the batch changes (the worker's hold, then the check)

    def __post_init__(self) -> None:
        self.product_ids = {ev.product_id for _, ev in self.items}


@dataclass(slots=True)
class PreparedBehaviour:
    """A behaviour batch decoded before its products are held: dead letters so far and the decoded events (and
    window ticks, the control records that move a partition's event time)."""

    out: BatchOutput
    items: list[tuple[InMessage, BehaviorEvent | WindowTick]]
    product_ids: set[str] = field(init=False)  # the products the batch's events are about

    def __post_init__(self) -> None:
        self.product_ids = {ev.product_id for _, ev in self.items if type(ev) is BehaviorEvent}


class ScoringModel:
    """What the processor needs from a model: a version and batch scoring of product texts into model tags."""

    version: str
    labels: LabelMap | None = None  # its tags' hierarchy (None: merged tags are not checked against one)

    def score(self, products: Sequence[ProductChange]) -> list[list[Tag]]:  # pragma: no cover - protocol
        raise NotImplementedError


async def score_in_steps(model: ScoringModel, products: Sequence[ProductChange], step: int) -> list[list[Tag]]:
    """Score on the event loop, `step` products at a time, yielding the loop between steps so Redis replies, acks
    and heartbeats get through. (Not a thread: featurizing and decoding need the GIL, and each hand-off cost up to the
    5 ms switch interval while the loop was busy, ~11 ms for one product, measured.)"""
    tags: list[list[Tag]] = []
    for start in range(0, len(products), step):
        if start:
            await asyncio.sleep(0)
        tags += model.score(products[start : start + step])
    return tags


def key_error(key: bytes | None, product_id: str) -> EventKeyError:
    """The error of an event whose record key is not its product id (`None`: the record has no key)."""
    why = (
        f"a product's events must be keyed by its product_id ({product_id!r}, UTF-8), so that they all reach one "
        "partition and are applied in order"
    )
    if key is None:
        return EventKeyError(f"the record has no key: {why}")
    shown = key[:100].decode("utf-8", "backslashreplace") + ("…" if len(key) > 100 else "")
    if unicodedata.normalize("NFC", shown) == unicodedata.normalize("NFC", product_id):  # they print alike
        why += f"; they differ in Unicode normal form only: key {shown!a}, product_id {product_id!a}"
    return EventKeyError(f"the record's key {shown!r} is not its product_id: {why}")


def dead_letter(msg: InMessage, exc: BaseException) -> DeadLetterRecord:
    """A dead-letter record keeping the whole message (key, value, headers and Kafka timestamp), the reason and where
    it came from."""
    record = DeadLetter(
        reason=bounded(str(exc) or type(exc).__name__),  # the whole message is in value_b64
        error_type=type(exc).__name__,
        source=msg.source,
        key_b64=base64.b64encode(msg.key).decode() if msg.key is not None else None,
        value_b64=base64.b64encode(msg.value).decode() if msg.value is not None else None,
        failed_at=now_ms(),
    )
    stamp = (SOURCE_TIMESTAMP_HEADER, str(msg.timestamp_ms).encode())
    headers = [*msg.headers, stamp]
    value = orjson.dumps(record.to_dict())
    # The source topic's limit counts compressed bytes: an event with megabytes of compressible headers or value can
    # make a dead letter over its topic's limit, which the producer would refuse at every redelivery. What does not
    # fit is left out, and the reason says so (the event is still at its source until retention removes it).
    budget = DEAD_LETTER_MAX_BYTES - DEAD_LETTER_MARGIN_BYTES
    if DefaultRecordBatchBuilder.estimate_size_in_bytes(msg.key, value, headers) > budget:
        dropped = sum(len(k) + len(v) for k, v in msg.headers)
        headers = [stamp, (HEADERS_DROPPED_HEADER, str(len(msg.headers)).encode())]
        left_out = f"[its {len(msg.headers)} headers ({dropped} bytes) were left out: too large]"
        record = replace(record, reason=f"{record.reason} {left_out}")
        value = orjson.dumps(record.to_dict())
        if DefaultRecordBatchBuilder.estimate_size_in_bytes(msg.key, value, headers) > budget:
            size = len(msg.value or b"")
            record = replace(
                record,
                key_b64=None,
                value_b64=None,
                reason=f"{record.reason} [its value ({size} bytes) was left out: too large for the dead-letter topic; "
                f"it is at {msg.topic}:{msg.partition}@{msg.offset} until retention removes it]",
            )
            value = orjson.dumps(record.to_dict())
            key = msg.key if msg.key is None or len(msg.key) < budget // 4 else None
            return DeadLetterRecord(key, value, headers)
    return DeadLetterRecord(msg.key, value, headers)


# Event times before this are refused while the time checks are on: an epoch in seconds (1764316805) read as
# milliseconds is January 1970, and would be counted in windows of 1970 and tag its product `new` at once.
EARLIEST_EVENT_MS = 946_684_800_000  # 2000-01-01T00:00:00Z


@dataclass(frozen=True, slots=True)
class InputDecoder:
    """How the worker decodes an input topic's values (`replay` checks its lines with the same)."""

    decode_value: Callable[[bytes | None], Any]  # the schema-checked decode; EventDecodeError when it fails
    time_field: str  # the event's time, checked against the clock
    check: Callable[[Any], None] | None = None  # what the schema cannot say; raises EventDecodeError

    def decode(self, value: bytes | None, now: int, ahead_ms: int) -> Any:
        """The event; EventDecodeError when it does not decode, fails `check`, or its time is more than `ahead_ms`
        after `now` or before EARLIEST_EVENT_MS (0: no time check)."""
        ev = self.decode_value(value)
        if self.check is not None:
            self.check(ev)
        if ahead_ms:
            at = getattr(ev, self.time_field)
            if at > now + ahead_ms:
                raise EventTimeError(
                    f"{self.time_field} {at} is more than {ahead_ms} ms ahead of the worker's clock ({now}): not "
                    "milliseconds since the epoch? (TAGSTREAM_MAX_EVENT_AHEAD_MS)"
                )
            if at < EARLIEST_EVENT_MS:
                raise EventTimeError(
                    f"{self.time_field} {at} is before 2000-01-01 ({EARLIEST_EVENT_MS} ms): seconds since the epoch, "
                    "not milliseconds? (TAGSTREAM_MAX_EVENT_AHEAD_MS=0 turns the time checks off)"
                )
        return ev


def one_group_per_attribute(ev: ProductChange) -> None:
    """EventDecodeError when two attribute names of a product change name one tag group (`gender` and `Gender`,
    `color` and `colour`): the group's tags are exclusive, and training refuses such a catalog too."""
    seen: dict[str, str] = {}
    for name in ev.attributes or {}:
        first = seen.setdefault(group_key(name), name)
        if first != name:
            raise EventDecodeError(
                f"attributes {first!r} and {name!r} name one tag group (names are compared ignoring case and width, "
                "and baseColour/color mean colour): send one of them"
            )


# per logical input topic
INPUT_DECODERS = {
    "products": InputDecoder(ProductChange.decode, "updated_at", one_group_per_attribute),
    "behavior": InputDecoder(BehaviorEvent.decode, "ts"),
}
TICK_DECODER = InputDecoder(WindowTick.decode, "ts")  # a behaviour-topic record keyed TICK_KEY

_E = TypeVar("_E")


def _lanes(items: Sequence[tuple[InMessage, _E]], most: int, min_per_lane: int = 1) -> list[list[tuple[InMessage, _E]]]:
    """The decoded messages split into at most `most` lanes of whole partitions (message order kept in each), the
    partitions spread so the lanes hold about as many messages each; one lane per `min_per_lane` messages at most
    (every lane costs its own Redis round trips)."""
    most = min(most, len(items) // max(1, min_per_lane))
    if most <= 1:
        return [list(items)]
    by_partition: dict[tuple[str, int], list[tuple[InMessage, _E]]] = {}
    for item in items:
        by_partition.setdefault((item[0].topic, item[0].partition), []).append(item)
    if len(by_partition) <= 1:
        return [list(items)]
    lanes: list[list[tuple[InMessage, _E]]] = [[] for _ in range(min(most, len(by_partition)))]
    for part in sorted(by_partition.values(), key=len, reverse=True):
        min(lanes, key=len).extend(part)
    return lanes


def _tag_dicts(tags: Sequence[Tag]) -> list[dict[str, Any]]:
    return [{"tag": t.tag, "group": t.group, "score": round(float(t.score), 6), "origin": t.origin} for t in tags]


def _tags(dicts: Sequence[dict[str, Any]] | None) -> list[Tag]:
    return [Tag(**d) for d in dicts or ()]


async def stored_updates(
    store: StateStore, product_ids: Iterable[str], states: dict[str, ProductState]
) -> dict[tuple[str, str], bytes | None]:
    """Every tag update kept for re-sending of these products, by (product, fence field): one per input partition,
    window-expiry pass and re-tag run that wrote it."""
    fences = [
        (pid, f) for pid in sorted(product_ids) for f in states[pid].fence if f != "rev" and not f.startswith("sent:")
    ]
    return await store.stored_emits(fences)


def _is_on(tag_state: dict[str, Any] | None, tag: str) -> bool:
    """Whether a behaviour tag is on in a stored tag state."""
    entry = ((tag_state or {}).get("behaviour") or {}).get(tag)
    return isinstance(entry, dict) and bool(entry.get("on"))


def _expire_if_unlisted(state: ProductState, keys: ProductKeys, ops: Ops) -> None:
    """A product no catalog change named (behaviour events for an id the catalog never sent): at each write its tags
    and fence get the time to live its counters have then, so that ids seen only in behaviour leave Redis with their
    counters instead of staying for ever (its first catalog change removes it: `_apply_product`)."""
    if "version" not in state.doc:
        ops.follow_counters(always=not state.fence)  # a write that makes the fence gives it one


def _empty_tag_state() -> dict[str, Any]:
    return {
        "tags": [],
        "model": [],
        "catalog": [],
        "behaviour_tags": [],
        "behaviour": {},
        "model_version": None,
        "deleted": False,
        "updated_at": 0,
    }


class Processor:
    """Applies micro-batches of product and behaviour messages to the state store and derives tag updates."""

    def __init__(
        self,
        store: StateStore,
        *,
        user_hash_key: bytes,
        score_delta: float = 0.05,
        behaviour: BehaviourConfig | None = None,
        score_step: int = 64,
        model_provider: Callable[[], ScoringModel | None] = lambda: None,
        behaviour_lanes: int = 2,
        lane_min_events: int = 128,
        state_cache: int = 0,
        state_cache_bytes: int | None = None,
        locks: ProductLocks | None = None,
        max_event_ahead_ms: int = 900_000,
        behaviour_topic: str = "behavior",
    ) -> None:
        """Upserts are scored on the event loop, `score_step` at a time (`score_in_steps`; 64 rows: ~3 ms); behaviour
        batches run in up to `behaviour_lanes` concurrent lanes of partitions, one per `lane_min_events` events of the
        batch at most. `state_cache` > 0 keeps that many products' states between batches, taking about
        `state_cache_bytes` at most (None: no such bound; `StateCache`): a batch reads from Redis only the products it
        does not hold. `locks`: the holds of products being processed, shared with the worker (which holds a batch's
        products itself, to enqueue its updates in the same hold). An event whose time is more than `max_event_ahead_ms`
        ahead of the wall clock (0: no check) is dead-lettered. `behaviour_topic`: the behaviour topic's name, whose
        partition N holds the products of product-change partition N (a new product's `new` tag is indexed there, to be
        expired by its window pass)."""
        self.store = store
        self.user_hash_key = user_hash_key
        self._hash_user = UserHasher(user_hash_key)
        self.score_delta = score_delta
        self.behaviour = behaviour or BehaviourConfig()
        self.score_step = score_step
        self.max_event_ahead_ms = max_event_ahead_ms
        self.behaviour_topic = behaviour_topic
        self.model_provider = model_provider
        self.behaviour_lanes = max(1, behaviour_lanes)
        self.lane_min_events = max(1, lane_min_events)
        # Product and behaviour batches both read-modify-write a product's tag state: one batch at a time per product,
        # so neither overwrites the other's effect with a stale read; batches with disjoint products run at once.
        self.locks = locks if locks is not None else ProductLocks()
        # Products whose unique users decided a behaviour tag lately (most recent last): counted with their read.
        self._users_decide: OrderedDict[str, None] = OrderedDict()
        self._seen_counts: dict[str, WindowCounts] = {}  # this batch's decoded windows, per product
        self.cache = StateCache(state_cache, state_cache_bytes) if state_cache > 0 else None
        self.conflicts = 0  # batches processed again because another writer changed one of their products

    # ------------------------------------------------------------------ state
    async def _states(
        self, product_ids: list[str], now: dict[str, int] | None = None, *, counters: bool = True
    ) -> dict[str, ProductState]:
        """The state of these products: the cache's where it holds them (their unique users counted where `now`
        asks, beside the read), the others read from Redis (with their counters when the cache is on, to be kept)."""
        now = now or {}
        if self.cache is None:
            return await self.store.read(product_ids, now=now, counters=counters)
        kept = self.cache.take(product_ids)
        missing = [pid for pid in product_ids if pid not in kept]
        count = {pid: now[pid] for pid in kept if pid in now}
        read_now = {pid: at for pid, at in now.items() if pid not in kept}
        if count:
            states, users = await asyncio.gather(self.store.read(missing, now=read_now), self.store.count_users(count))
            for pid, counted in users.items():
                kept[pid].users = counted
        else:
            states = await self.store.read(missing, now=read_now) if missing else {}
        states.update(kept)
        return states

    @staticmethod
    def _expect_revisions(writes: list[Write], states: dict[str, ProductState]) -> None:
        """Fence each write on the revision its product's state was read at (a product's second write in the same
        round trip on the revision its first leaves)."""
        expect: dict[str, int] = {}
        for w in writes:
            state = states[w.product_id]
            w.expect_rev = expect[w.product_id] = expect.get(w.product_id, state.rev - 1) + 1
            w.expect_counters = state.stored_counters

    def _keep_applied(self, writes: list[Write], results: list[WriteResult], states: dict[str, ProductState]) -> None:
        """Keep every product whose writes all applied (or that had none) in the cache. Raises StateConflictError
        when another writer changed a product since the read: nothing of that product was written, and the batch
        must be processed again from fresh state (its applied writes are then redeliveries)."""
        conflicted = sorted({w.product_id for w, r in zip(writes, results, strict=True) if r.conflict})
        if conflicted:
            self.conflicts += 1
            raise StateConflictError(f"{len(conflicted)} product(s) changed by another writer, e.g. {conflicted[0]}")
        if self.cache is None:
            return
        rev: dict[str, int | None] = {}
        for w, r in zip(writes, results, strict=True):
            rev[w.product_id] = r.rev if r.applied and rev.get(w.product_id, 0) is not None else None
        for pid, state in states.items():
            if pid not in rev:
                self.cache.put(state)
            elif (at := rev[pid]) is not None:
                self.cache.put(state, at)

    async def _again_on_conflict(self, what: str, n: int, attempt: Callable[[], Any]) -> Any:
        """`attempt()`, repeated from fresh state while another writer changes its products in between."""
        for tries in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return await attempt()
            except StateConflictError as exc:
                if tries == CONFLICT_ATTEMPTS:
                    raise
                log.info("%s batch of %d: %s; processing it again", what, n, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ shared
    def _update(
        self,
        state: ProductState,
        tag_state: dict[str, Any],
        merged: list[Tag],
        reason: str,
        source: SourceRef,
        event_time: int,
        force: bool = False,
    ) -> bytes | None:
        """Store the merged tags in `tag_state`; return the tag-update JSON if the tag set changed (or `force`)."""
        old = _tags(tag_state.get("tags"))
        added, removed, changed = diff_tags(old, merged, self.score_delta)
        tag_state["tags"] = _tag_dicts(merged)
        if not (changed or force):
            return None
        update = TagUpdate(
            product_id=state.product_id,
            tags=tuple(merged),
            added=tuple(added),
            removed=tuple(removed),
            model_version=tag_state.get("model_version"),
            reason=reason,  # type: ignore[arg-type]
            source=source,
            event_time=event_time,
            emit_time=now_ms(),
            deleted=bool(tag_state.get("deleted")),
        )
        payload = orjson.dumps(update.to_dict(check=False))
        if len(payload) > TAG_UPDATE_MAX_BYTES:  # checked before anything is written: the event is dead-lettered
            raise OutputTooLargeError(
                f"the tag update of {state.product_id} would be {len(payload)} bytes ({len(merged)} tags), over the "
                f"{TAG_UPDATE_MAX_BYTES} the tag-updates topic takes"
            )
        return payload

    def _merge(self, tag_state: dict[str, Any]) -> list[Tag]:
        """The tag state's merged tags; with the active model's label map, so a catalog attribute that replaces a
        category level also drops the model's deeper levels (no child without its parent)."""
        if tag_state.get("deleted"):
            return []
        model = self.model_provider()
        return merge_tags(
            _tags(tag_state.get("model")),
            _tags(tag_state.get("catalog")),
            _tags(tag_state.get("behaviour_tags")),
            labels=getattr(model, "labels", None),  # a model without one (None, or a test double) checks nothing
        )

    def _decode_all(
        self, messages: Sequence[InMessage], decoder: InputDecoder, out: BatchOutput, *, ticks: bool = False
    ) -> list[tuple[InMessage, Any]]:
        """The decoded events (with `ticks`, a record keyed TICK_KEY as a WindowTick); the others (bad bytes, schema
        violations, a time too far ahead) as dead letters."""
        good = []
        now = now_ms()
        for msg in messages:
            try:
                if ticks and msg.key == TICK_KEY:
                    good.append((msg, TICK_DECODER.decode(msg.value, now, self.max_event_ahead_ms)))
                    continue
                event = decoder.decode(msg.value, now, self.max_event_ahead_ms)
                if msg.key != event.product_id.encode():
                    raise key_error(msg.key, event.product_id)
                good.append((msg, event))
            except EventDecodeError as exc:
                out.dead_letters.append(dead_letter(msg, exc))
        return good

    async def _read(self, items: Sequence[tuple[InMessage, Any]]) -> dict[str, ProductState]:
        """The state product changes need: no behaviour counters (unless they are to be kept)."""
        return await self._states(sorted({ev.product_id for _, ev in items}), counters=False)

    def _group(self, groups: dict[tuple[str, str], _Group], msg: InMessage, product_id: str, fence: str) -> _Group:
        """The write collecting this product's effects from this message's partition (`fence`, the message's
        `fence_field`, built once per message by the caller) in the batch."""
        group = groups.get((product_id, fence))
        if group is None:
            keys = ProductKeys(self.store.prefix, product_id)
            write = Write(product_id, fence, msg.offset, Ops(keys), input_fence=True)
            group = groups[(product_id, fence)] = _Group(keys, write)
        return group

    @staticmethod
    def _record(group: _Group, state: ProductState, msg: InMessage, fence: str, payload: bytes | None) -> None:
        group.events += 1
        group.write.last_offset = msg.offset
        group.write.last_timestamp = msg.timestamp_ms
        state.fence[fence] = str(msg.offset)
        if payload is not None:
            Processor._attach(group, payload)

    @staticmethod
    def _attach(group: _Group, payload: bytes) -> None:
        """`payload` is the tag update of the group's latest message: send it, keep it for re-sending."""
        group.write.emit = payload
        group.payloads.append(payload)

    async def _finish(
        self,
        groups: dict[tuple[str, str], _Group],
        redelivered: dict[tuple[str, str], int],
        states: dict[str, ProductState],
        out: BatchOutput,
        end_batch: EndBatch | None = None,
        sweeps: _Sweeps | None = None,
        swept: list[tuple[bytes, bytes]] | None = None,
        new_until: ActiveIndex | None = None,
        produced_at: ProducedAt | None = None,
    ) -> dict[tuple[str, int], list[str]]:
        """Write every product's effects (one fenced call each) — and, with `end_batch`, the batch's watermarks and
        active index in the same round trip, returning the due lists, and the `sweeps` of products that were due
        already (their updates into `swept`, before a conflict is raised); with `new_until`, a look for the window
        pass no later than these times; collect updates, re-sending the stored update of redelivered messages."""
        writes = [g.write for g in groups.values()]
        if sweeps is not None:
            writes += sweeps.writes
            states = {**states, **sweeps.states}
        due: dict[tuple[str, int], list[str]] = {}
        # before the writes: every update kept for the redelivered products, to re-send one only if none is later
        stored = await self._stored_updates({pid for pid, _ in redelivered}, states) if redelivered else {}
        self._expect_revisions(writes, states)
        if new_until:
            results = await self.store.apply_and_index(writes, new_until, earlier_only=True)
        elif end_batch is None:
            results = await self.store.apply(writes)
        else:
            results, due = await self.store.apply_and_end_batch(writes, end_batch, produced_at)
        if sweeps is not None and swept is not None:
            watermarks = {tp: wm for tp, (wm, _) in (end_batch or {}).items()}
            await self._settle_sweeps(sweeps.writes, sweeps.emitted, results[len(groups) :], watermarks, swept)
        self._keep_applied(writes, results, states)
        raced = {g.write.product_id for g, r in zip(groups.values(), results, strict=False) if not r.applied}
        now_states, now_latest = {}, {}
        if raced:  # applied meanwhile by another delivery (a rebalance race, a paused worker): as it is now
            now_states = await self.store.read(sorted(raced), counters=False)
            now_latest = _latest(await self._stored_updates(raced, now_states))
        latest = _latest(stored)
        for group, result in zip(groups.values(), results[: len(groups)], strict=True):
            pid = group.write.product_id
            if result.applied:
                out.applied += group.events
                out.updates += [(pid.encode(), p) for p in group.payloads]
            else:  # re-send what the other delivery produced, unless the product moved on since
                current = now_states[pid].tags
                self._resend(pid, group.write.offset, result.stored_emit, out, current, now_latest.get(pid, 0))
        for (pid, fence_field), offset in redelivered.items():
            current = states[pid].tags
            self._resend(pid, offset, stored[(pid, fence_field)], out, current, latest.get(pid, 0))
        return due

    async def _stored_updates(
        self, product_ids: set[str], states: dict[str, ProductState]
    ) -> dict[tuple[str, str], bytes | None]:
        return await stored_updates(self.store, product_ids, states)

    @staticmethod
    def _resend(
        pid: str, offset: int, stored: bytes | None, out: BatchOutput, current: dict[str, Any] | None, latest: int
    ) -> None:
        """Re-send the update an already applied offset produced, if it was produced at or after that offset — and
        only if it is the product's latest kept update (`latest`: the newest `emit_time` of them) and still carries
        its `current` tags. Otherwise a later change (from the other input topic, a window-expiry pass, a re-tag)
        superseded it: that update is either delivered (its batch committed) or re-sent by its own redelivery, and
        re-sending this one after it would leave stale tags or scores last on the topic."""
        out.redelivered += 1
        if stored is None:
            return
        update = orjson.loads(stored)
        if update["source"]["offset"] >= offset and _still_current(update, current, latest):
            out.updates.append((pid.encode(), stored))

    async def _resend_swept(self, since: dict[tuple[str, int], int], out: BatchOutput, hold: Hold) -> None:
        """Re-send the window-expiry updates of the products that batches of these partitions swept at or after the
        redelivered offset `since[tp]`: a restart redelivers a batch whose sweeps were written but whose updates may
        not have been delivered. Only an update that still carries its product's current tags is sent again (a
        later one superseded the others), and only for products no other batch holds (the one holding it sends
        what it changes)."""
        swept = await self.store.swept_since(since)
        free = set(hold.take_free({pid for pids in swept.values() for pid in pids}))
        fences = [(pid, f"sweep:{topic}:{partition}") for (topic, partition), pids in swept.items() for pid in pids]
        fences = [(pid, fence) for pid, fence in fences if pid in free]
        if not fences:
            return
        states = await self._states(sorted(free))
        stored = await self._stored_updates({pid for pid, _ in fences}, states)
        latest = _latest(stored)
        for pid, fence in fences:
            raw, current = stored.get((pid, fence)), states[pid].tags
            if raw is None or current is None:
                continue
            if _still_current(orjson.loads(raw), current, latest[pid]):
                out.updates.append((pid.encode(), raw))

    # ---------------------------------------------------------------- products
    async def prepare_products(self, messages: Sequence[InMessage]) -> PreparedProducts:
        """Decode a product batch and score its upserts — the slow part, which needs no state and no lock, so the
        worker runs it before taking its locks and behaviour batches do not wait for ONNX Runtime."""
        out = BatchOutput()
        items = self._decode_all(messages, INPUT_DECODERS["products"], out)
        model = self.model_provider()
        upserts = [i for i, (_, ev) in enumerate(items) if ev.op == "upsert"]
        try:
            tags: dict[int, list[Tag]] | None = await self._score(model, [items[i][1] for i in upserts], upserts)
        except Exception:  # tried again while the products are held (and dead-lettered there if it fails again)
            log.exception("scoring a batch of %d product changes failed", len(upserts))
            tags = None
        return PreparedProducts(out, items, model, tags)

    async def _score(
        self, model: ScoringModel | None, products: list[ProductChange], positions: list[int]
    ) -> dict[int, list[Tag]]:
        if not products or model is None:
            return {}
        return dict(zip(positions, await score_in_steps(model, products, self.score_step), strict=True))

    async def process_products(
        self, messages: Sequence[InMessage], prepared: PreparedProducts | None = None, hold: Hold | None = None
    ) -> BatchOutput:
        """Apply a batch of product upserts and deletes (`prepared`: its `prepare_products`, if already done), holding
        its products (inside `hold`, when the caller holds them already)."""
        if prepared is None:
            prepared = await self.prepare_products(messages)
        async with self.locks.hold(prepared.product_ids, within=hold):
            return await self._again_on_conflict("product", len(messages), lambda: self._process_products(prepared))

    async def _process_products(self, prepared: PreparedProducts) -> BatchOutput:
        out, items = BatchOutput(dead_letters=list(prepared.out.dead_letters)), prepared.items
        if not items:
            return out
        states = await self._read(items)
        model, model_tags = self.model_provider(), prepared.tags
        if model_tags is None or _version(model) != _version(prepared.model):  # not scored, or swapped meanwhile
            todo = [
                i
                for i, (msg, ev) in enumerate(items)
                if ev.op == "upsert" and msg.offset > states[ev.product_id].applied_offset(msg.fence_field)
            ]
            model_tags = await self._score(model, [items[i][1] for i in todo], todo)

        groups: dict[tuple[str, str], _Group] = {}
        redelivered: dict[tuple[str, str], int] = {}
        new_until: ActiveIndex = {}  # products `new` turned on for: their window pass must look at its end
        for i, (msg, ev) in enumerate(items):
            state = states[ev.product_id]
            fence = msg.fence_field
            if msg.offset <= state.applied_offset(fence):
                redelivered.setdefault((ev.product_id, fence), msg.offset)
                continue
            tags_for_event = model_tags.get(i) if ev.op == "upsert" and model is not None else None
            group = self._group(groups, msg, ev.product_id, fence)
            out.stale += ev.version < int(state.doc.get("version", -1))  # `_apply_product` ignores it
            payload = self._apply_product(state, group.keys, group.write.ops, msg, ev, tags_for_event, model)
            self._record(group, state, msg, fence, payload)
            if _is_on(state.tags, "new"):
                until = int(state.doc["first_seen"]) + self.behaviour.new_ms
                new_until.setdefault((self.behaviour_topic, msg.partition), {})[ev.product_id] = until
        await self._finish(groups, redelivered, states, out, new_until=new_until)
        return out

    def _apply_product(
        self,
        state: ProductState,
        keys: ProductKeys,
        ops: Ops,
        msg: InMessage,
        ev: ProductChange,
        model_tags: list[Tag] | None,
        model: ScoringModel | None,
    ) -> bytes | None:
        known = "version" in state.doc  # a product's first change always emits its tags, even none
        stored_version = int(state.doc.get("version", -1))
        if ev.version < stored_version:
            log.info("stale %s of %s: version %d < %d, ignored", ev.op, ev.product_id, ev.version, stored_version)
            return None
        tag_state = state.tags or _empty_tag_state()
        scored_by = tag_state.get("model_version")  # the model the stored tags came from
        doc: dict[str, Any] = {"version": ev.version, "updated_at": ev.updated_at}
        if "first_seen" not in state.doc:
            doc["first_seen"] = ev.updated_at
        if ev.op == "delete":
            doc["deleted"] = 1
            tag_state.update(deleted=True, model=[], catalog=[], behaviour_tags=[], behaviour={})
            reason = "product-delete"
        else:
            doc.update(
                deleted=0,
                title=ev.title,
                description=ev.description or "",
                brand=ev.brand or "",
                price="" if ev.price is None else ev.price,
                currency=ev.currency or "",
                category_hints=orjson.dumps(list(ev.category_hints)).decode(),
                attributes=orjson.dumps(ev.attributes).decode(),
            )
            tag_state.update(
                deleted=False,
                model=_tag_dicts(model_tags or []),
                catalog=_tag_dicts(catalog_tags(ev.attributes)),
                model_version=model.version if model is not None else None,
            )
            first_seen = int(doc.get("first_seen") or state.doc["first_seen"])
            self._decide_new(tag_state, first_seen, ev.updated_at)
            reason = "product-upsert"
        state.doc.update({k: str(v) for k, v in doc.items()})
        merged = self._merge(tag_state)
        # an update also when another model scored it, tags unchanged: the topic's last update names its tags' model
        # (a swap's re-tag skips a product already at the active model, so no later update would)
        force = ev.op == "delete" or not known or tag_state.get("model_version") != scored_by
        payload = self._update(state, tag_state, merged, reason, msg.source, ev.updated_at, force=force)
        tag_state["updated_at"] = ev.updated_at
        state.tags = tag_state
        ops.hset(keys.doc, doc)
        ops.set(keys.tags, orjson.dumps(tag_state))  # a SET: the tags' time to live, if any, goes with it
        if not known:  # clicks may have made its fence before the catalog named the product
            ops.persist(keys.fence)
        return payload

    def _decide_new(self, tag_state: dict[str, Any], first_seen: int, now: int) -> None:
        """Decide `new` at a product change's time (time alone decides it, so a product nobody looked at is new too);
        `decode_new` leaves it as it is at a time before its last switch (a change older than the behaviour the tag
        was decided at)."""
        tags, state = decode_new(first_seen, now, tag_state.get("behaviour") or {}, self.behaviour)
        tag_state["behaviour"] = state
        tag_state["behaviour_tags"] = _tag_dicts(tags)

    # --------------------------------------------------------------- behaviour
    def _counts(self, state: ProductState, now: int) -> WindowCounts:
        """Window counts at `now` with the stored unique users (0 when not counted): for the times windows change."""
        return self._window_counts(state, now, None)[0]

    def _window_counts(
        self, state: ProductState, now: int, batch_users: list[Ops] | None
    ) -> tuple[WindowCounts, WindowCounts | None]:
        """Window counts at `now` with the fewest unique users there can be, and the same counts with the most when
        they are not known exactly (else None). A window's users are the union of its stored HyperLogLogs
        (`state.users`, counted or not) and the batch's users in it (`batch_users`, not written yet): at least the
        larger of the two and at most their sum; uncounted stored users are at most one per interaction."""
        sums = window_sums(state.beh, now)
        first_seen = int(state.doc["first_seen"]) if "first_seen" in state.doc else None
        batch = [len(u) for u in _batch_users(batch_users, now)] if batch_users else [0, 0, 0]
        stored = state.users
        if stored:
            fewest = [max(stored.get(g.window, 0), b) for g, b in zip(GRANULARITIES, batch, strict=True)]
            most = [stored.get(g.window, 0) + b for g, b in zip(GRANULARITIES, batch, strict=True)]
        else:  # one user per interaction, plus the batch's (the HyperLogLogs' estimates may be a little above)
            fewest = batch
            most = [s[0] + s[1] + s[2] + s[3] + b for s, b in zip(sums, batch, strict=True)]
        counts = WindowCounts(
            now, *(WindowStats(*s[:4], u, s[4]) for s, u in zip(sums, fewest, strict=True)), first_seen
        )
        if most == fewest:
            return counts, None
        return counts, WindowCounts(
            now, *(WindowStats(*s[:4], u, s[4]) for s, u in zip(sums, most, strict=True)), first_seen
        )

    def _behaviour_tags(
        self, state: ProductState, tag_state: dict[str, Any], now: int, batch_users: list[Ops] | None = None
    ) -> WindowCounts | None:
        """Decode the behaviour tags into `tag_state`; return the window counts they were decoded from. When the
        product's unique users are not known exactly (not counted, or counted before this batch's users, who may
        have been seen before), decide only if they cannot matter; otherwise leave `tag_state` as it is and return
        None (count them with the batch's users and call again).

        Every tag is monotone in the unique-user counts (enter needs users ≥ a level, exit happens below one), and the
        counts lie between the fewest and the most there can be (`_window_counts`); when both ends decode alike, so
        does the count. Most products are far from every threshold, so most batches skip the `PFCOUNT`s (their
        unions of up to 24 HyperLogLogs were half of Redis's time per event)."""
        counts, most = self._window_counts(state, now, batch_users)
        previous = tag_state.get("behaviour") or {}
        if most is None:
            tags, new_state = decode_behaviour(counts, previous, self.behaviour)
        elif (decoded := decode_behaviour_between(counts, most, previous, self.behaviour)) is None:
            return None
        else:
            tags, new_state = decoded
        tag_state["behaviour"] = new_state
        tag_state["behaviour_tags"] = _tag_dicts(tags)
        return counts

    def _behaviour_update(
        self,
        state: ProductState,
        tag_state: dict[str, Any],
        before: Any,
        reason: str,
        source: SourceRef,
        event_time: int,
    ) -> bytes | None:
        """The tag update after the behaviour tags were decoded into `tag_state`; None without a merge or a diff when
        they equal `before` (the stored merged tags stand: every writer stores the merge of the stored parts)."""
        if tag_state["behaviour_tags"] == before:
            return None
        return self._update(state, tag_state, self._merge(tag_state), reason, source, event_time)

    async def _count_users(
        self,
        states: dict[str, ProductState],
        now: dict[str, int],
        batch_users: dict[str, list[Ops]] | None = None,
    ) -> None:
        """Count the unique users of these products at `now[pid]` (one round trip) into their states: the union of
        their HyperLogLogs and, for those in `batch_users`, the batch's users not written yet."""
        batch = {pid: _batch_users(writes, now[pid]) for pid, writes in (batch_users or {}).items() if pid in now}
        for pid, users in (await self.store.count_users(now, batch)).items():
            states[pid].users = users

    async def prepare_behaviour(self, messages: Sequence[InMessage]) -> PreparedBehaviour:
        """Decode a behaviour batch (bad events become dead letters), which names the products it needs to hold."""
        out = BatchOutput()
        return PreparedBehaviour(out, self._decode_all(messages, INPUT_DECODERS["behavior"], out, ticks=True))

    async def process_behaviour(
        self, messages: Sequence[InMessage], prepared: PreparedBehaviour | None = None, hold: Hold | None = None
    ) -> BatchOutput:
        """Apply a batch of behaviour events, then expire behaviour tags whose windows passed, holding the products
        (inside `hold`, when the caller holds the batch's products already; due products are added to it).

        The batch's partitions are processed in up to `behaviour_lanes` concurrent lanes: a product's events are all
        in one partition, so lanes touch disjoint products, and while one lane waits for Redis another computes."""
        if prepared is None:
            prepared = await self.prepare_behaviour(messages)
        # The updates of applied sweeps, kept across attempts: an attempt that meets a conflict is processed again, and
        # its events are then redeliveries that re-send their updates, but the products it swept are not due any more.
        swept: list[tuple[bytes, bytes]] = []
        async with self.locks.hold(prepared.product_ids, within=hold) as held:
            out: BatchOutput = await self._again_on_conflict(
                "behaviour", len(messages), lambda: self._behaviour_batch(prepared, held, swept)
            )
        out.updates += swept
        return out

    async def _behaviour_batch(
        self, prepared: PreparedBehaviour, hold: Hold, swept: list[tuple[bytes, bytes]]
    ) -> BatchOutput:
        self._seen_counts = {}
        lanes = _lanes(prepared.items, self.behaviour_lanes, self.lane_min_events)
        out = BatchOutput(dead_letters=list(prepared.out.dead_letters))
        if len(lanes) == 1:
            parts: list[Any] = [await self._process_behaviour(lanes[0], hold, swept)]
        else:
            # every lane runs to its end (its writes are fenced either way); the first error is raised as it is
            lane_runs = (self._process_behaviour(lane, hold, swept) for lane in lanes)
            parts = await asyncio.gather(*lane_runs, return_exceptions=True)
            for part in parts:
                if isinstance(part, BaseException):
                    raise part
        for part in parts:
            out.updates += part.updates
            out.dead_letters += part.dead_letters
            out.applied += part.applied
            out.redelivered += part.redelivered
        return out

    async def _process_behaviour(
        self, items: list[tuple[InMessage, Any]], hold: Hold, swept: list[tuple[bytes, bytes]]
    ) -> BatchOutput:
        out = BatchOutput()
        if not items:
            return out
        by_partition: dict[tuple[str, int], int] = {}
        last_offsets: dict[tuple[str, int], int] = {}
        touched: dict[tuple[str, int], set[str]] = {}
        # per partition, the smallest (Kafka timestamp - event time) of the batch's records: how live the stream was
        lag: dict[tuple[str, int], int] = {}
        redelivered_from: dict[tuple[str, int], int] = {}  # the first redelivered offset of each partition
        ticks = False
        for msg, ev in items:  # a tick moves its partition's clock as an event does, for no product
            key = (msg.topic, msg.partition)
            by_partition[key] = max(by_partition.get(key, 0), ev.ts)
            if msg.timestamp_ms > 0 and (late := msg.timestamp_ms - ev.ts) < lag.get(key, late + 1):
                lag[key] = late
            last_offsets[key] = msg.offset  # a partition's messages come in offset order
            products = touched.setdefault(key, set())
            if type(ev) is WindowTick:
                # a tick applies nothing itself, so nothing fences it: its batch's sweeps made before a restart, if
                # any, are found by their offset (none for a tick seen the first time) and their updates sent again
                redelivered_from.setdefault(key, msg.offset)
                ticks = True
            else:
                products.add(ev.product_id)
        if ticks:
            items = [(msg, ev) for msg, ev in items if type(ev) is not WindowTick]
        latest: dict[str, int] = {}
        for _, ev in items:
            latest[ev.product_id] = max(latest.get(ev.product_id, 0), ev.ts)
        # Unique users are counted only where they decide a tag: with the read for products where they did lately
        # (hot products near a threshold), after it for the others that turn out to need them.
        wanted = {pid: at for pid, at in latest.items() if pid in self._users_decide}
        if self.cache is None:
            states, due_before = await self._states(sorted(latest), now=wanted), {}
        else:  # the products already due at the batch's watermarks, to expire with its writes (see _early_sweeps)
            states, due_before = await asyncio.gather(
                self._states(sorted(latest), now=wanted), self.store.due_lists(by_partition)
            )
        batch_users: dict[str, list[Ops]] = {}  # each product's writes
        groups: dict[tuple[str, str], _Group] = {}
        redelivered: dict[tuple[str, str], int] = {}
        # Counters change with every event, tags only need a look at a product's last event of the batch (its write
        # is one fenced call anyway): window sums, behaviour decoding, the tag diff and the tag-state JSON once per
        # product instead of once per event (Zipf traffic repeats hot products inside a batch).
        fences = [msg.fence_field for msg, _ in items]  # built once per message
        last = {(ev.product_id, fence): i for i, ((_, ev), fence) in enumerate(zip(items, fences, strict=True))}
        evaluate: list[_Evaluation] = []
        for i, (msg, ev) in enumerate(items):
            state = states[ev.product_id]
            fence = fences[i]
            if msg.offset <= state.applied_offset(fence):
                redelivered.setdefault((ev.product_id, fence), msg.offset)
                tp = (msg.topic, msg.partition)
                redelivered_from[tp] = min(redelivered_from.get(tp, msg.offset), msg.offset)  # a tick's may be set
                continue
            user = self._hash_user(ev.user_id)
            group = self._group(groups, msg, ev.product_id, fence)
            if not group.events:
                _expire_if_unlisted(state, group.keys, group.write.ops)
                batch_users.setdefault(ev.product_id, []).append(group.write.ops)
            now = self._apply_behaviour(state, group.keys, group.write.ops, ev, user)
            self._record(group, state, msg, fence, None)
            if last[(ev.product_id, fence)] == i:
                evaluate.append(_Evaluation(group, state, msg, now, batch_users[ev.product_id]))
        undecided = [e for e in evaluate if not self._evaluate_behaviour(e)]
        if undecided:
            now_of: dict[str, int] = {}
            for e in undecided:
                now_of[e.state.product_id] = max(now_of.get(e.state.product_id, 0), e.now)
            await self._count_users(states, now_of, batch_users)
            for e in undecided:
                e.batch_users = None  # counted with the rest: the union, exact
                self._evaluate_behaviour(e)
            for pid in now_of:
                self._users_decide[pid] = None
                self._users_decide.move_to_end(pid)
            while len(self._users_decide) > USERS_DECIDE_KEPT:
                self._users_decide.popitem(last=False)
        if redelivered_from:  # a restart: the updates of this batch's first sweeps may not have been delivered
            await self._resend_swept(redelivered_from, out, hold)
        early = await self._early_sweeps(due_before, by_partition, latest, hold, last_offsets)
        # the writes and sweeps, then watermarks, active index and due lists of every partition: one round trip
        end = {k: (wm, {pid: self._due(states[pid]) for pid in touched[k]}) for k, wm in by_partition.items()}
        sweeps = None
        if early is not None:
            sweeps, index = early
            for tp, entries in index.items():
                end[tp][1].update(entries)
        produced_at = {tp: by_partition[tp] + late for tp, late in lag.items()}  # as if its newest record was that live
        due = await self._finish(
            groups, redelivered, states, out, end_batch=end, sweeps=sweeps, swept=swept, produced_at=produced_at
        )
        if any(due.values()):
            due = {tp: pids for tp, pids in due.items() if pids}
            await self._expire(due, by_partition, swept, hold, last_offsets)
        return out

    def _apply_behaviour(self, state: ProductState, keys: ProductKeys, ops: Ops, ev: BehaviorEvent, user: str) -> int:
        """Add one event to the product's counters and unique-user HyperLogLogs; return the product's event time.
        An event older than the product's clock counts only in the buckets still in their windows there (one older
        than every window writes nothing: its buckets would never be counted, nor deleted)."""
        beh = state.beh
        counters = ops.counters(keys.beh)
        previous = beh.get("last_ts", 0)
        fields = event_fields(ev.ts, ev.event_type)
        live = None if ev.ts >= previous else live_buckets(ev.ts, previous)  # in order: in every window
        for i, name in enumerate(fields):  # a bucket's first counter makes its HyperLogLog: it gets the time to live
            if name not in beh and (live is None or live[i]):
                ops.expire(keys.hll(*hll_buckets(ev.ts)[i]))
        if live is None or all(live):
            ops.add_user(ev.ts, user)
        else:
            fields = tuple(name for name, keep in zip(fields, live, strict=True) if keep)
            ops.add_user_to(ev.ts, user, live)
        for name in fields:
            beh[name] = beh.get(name, 0) + 1
            counters[name] = counters.get(name, 0) + 1
        if ev.ts <= previous:
            return previous
        beh["last_ts"] = ev.ts
        ops.hset_field(keys.beh, "last_ts", ev.ts)
        if ev.ts // PRUNE_EVERY_MS != previous // PRUNE_EVERY_MS:  # buckets leave windows only at bucket edges
            ops.expire(keys.beh)  # the counters live on for the time to live after the product's clock moved
            for code, bucket in hll_buckets(ev.ts):  # and the current buckets' HyperLogLogs (made before it was on)
                ops.expire(keys.hll(code, bucket))
            self._prune(beh, keys, ops, ev.ts)
        return ev.ts

    def _evaluate_behaviour(self, e: _Evaluation) -> bool:
        """The behaviour tags of a product after its last event of the batch, and the tag update if they changed;
        False when its unique users decide and were not counted yet (nothing changed)."""
        state = e.state
        tag_state = state.tags or _empty_tag_state()
        if tag_state.get("deleted"):
            state.tags = tag_state
            return True
        before = tag_state.get("behaviour_tags")
        before_state = tag_state.get("behaviour")
        counts = self._behaviour_tags(state, tag_state, e.now, e.batch_users)
        if counts is None:
            return False
        self._seen_counts[state.product_id] = counts
        if state.tags is not None and tag_state["behaviour_tags"] == before and tag_state["behaviour"] == before_state:
            return True  # the stored tag state stands: no rewrite of its JSON (most events of a busy product)
        payload = self._behaviour_update(state, tag_state, before, "behaviour", e.msg.source, e.now)
        tag_state["updated_at"] = max(int(tag_state.get("updated_at") or 0), e.now)
        state.tags = tag_state
        e.group.write.ops.set(e.group.keys.tags, orjson.dumps(tag_state))
        if payload is not None:
            self._attach(e.group, payload)
        return True

    @staticmethod
    def _prune(beh: dict[str, int], keys: ProductKeys, ops: Ops, now: int) -> None:
        stale, buckets = stale_fields(beh, now)
        if not stale:
            return
        for name in stale:
            del beh[name]
        for code, bucket in buckets:
            ops.delete(keys.hll(code, bucket))
        ops.hdel(keys.beh, stale)

    def _due(self, state: ProductState, now: int | None = None) -> int | None:
        """When this product's behaviour tags next need a look after `now`, the event time they were decoded at (None
        when none is on). `now` defaults to the product's last event; a sweep passes the watermark it looked at, or
        a look already due then (the end of a tag's minimum dwell, say) would make it due again at every batch. A
        deleted product has none on (its delete and any later pass clear them; its counters stay for an upsert)."""
        tag_state = state.tags or {}
        if not any(s.get("on") for s in (tag_state.get("behaviour") or {}).values()):
            return None
        if now is None:
            now = int(state.beh.get("last_ts", 0))
        counts = self._seen_counts.get(state.product_id)  # its tags were just decoded at its clock: same windows
        if counts is None or counts.now != now:
            counts = self._counts(state, now)
        return next_check_at(counts, tag_state.get("behaviour") or {}, self.behaviour)

    async def _early_sweeps(
        self,
        due: dict[tuple[str, int], list[str]],
        watermarks: dict[tuple[str, int], int],
        batch_products: dict[str, int],
        hold: Hold,
        last_offsets: dict[tuple[str, int], int],
    ) -> tuple[_Sweeps, ActiveIndex] | None:
        """The sweeps of the products that were due at the batch's watermarks before it, made with the batch's own
        write instead of a pass of their own: those the batch has no event of, no other batch holds, and whose
        states are kept (the others are left to `_expire` after the write, which finds them still due). Products
        the batch touches are looked at with their events, and after the write if they are due then."""
        if self.cache is None or not due:
            return None
        wanted = {pid for pids in due.values() for pid in pids if pid not in batch_products}
        kept = self.cache.take_kept(hold.take_free(wanted))
        early = {tp: ready for tp, pids in due.items() if (ready := [pid for pid in pids if pid in kept])}
        if not early:
            return None
        writes, emitted, index = await self._sweeps(early, watermarks, kept, last_offsets)
        return _Sweeps(kept, writes, emitted), index

    async def _expire(
        self,
        due: dict[tuple[str, int], list[str]],
        watermarks: dict[tuple[str, int], int],
        swept: list[tuple[bytes, bytes]],
        hold: Hold,
        last_offsets: dict[tuple[str, int], int],
    ) -> None:
        """Re-evaluate the behaviour tags of the due products of every partition, whose windows moved by event time
        (the partition's watermark): one read and one write round trip for all of them (and one more to count unique
        users where they decide a tag), their updates into `swept`. A due product another batch holds or awaits is
        left in the active index for a later batch (the one holding it may change it)."""
        free = set(hold.take_free({pid for pids in due.values() for pid in pids}))
        due = {tp: kept for tp, pids in due.items() if (kept := [pid for pid in pids if pid in free])}
        if not due:
            return
        states = await self._states(sorted({pid for pids in due.values() for pid in pids}))
        writes, emitted, index = await self._sweeps(due, watermarks, states, last_offsets)
        self._expect_revisions(writes, states)
        results = await self.store.apply_and_index(writes, index)
        await self._settle_sweeps(writes, emitted, results, watermarks, swept)
        self._keep_applied(writes, results, states)

    async def _sweeps(
        self,
        due: dict[tuple[str, int], list[str]],
        watermarks: dict[tuple[str, int], int],
        states: dict[str, ProductState],
        last_offsets: dict[tuple[str, int], int],
    ) -> tuple[list[Write], list[tuple[str, bytes | None]], ActiveIndex]:
        """The window-expiry writes of the due products (their states in `states`; unique users counted only where
        they decide, in one round trip), the update each one emits if applied, and their next looks for the index;
        each write names its batch's last offset in the partition (`last_offsets`), to be found on redelivery."""
        now_of: dict[str, int] = {}
        for tp, pids in due.items():
            for pid in pids:
                now_of[pid] = max(now_of.get(pid, 0), watermarks[tp])
        looks: dict[str, tuple[ProductKeys, Ops, int, dict[str, Any], Any, Any]] = {}
        undecided: dict[str, int] = {}
        for pid in now_of:
            state = states[pid]
            keys = ProductKeys(self.store.prefix, pid)
            ops = Ops(keys)
            now = max(now_of[pid], int(state.beh.get("last_ts", 0)))
            self._prune(state.beh, keys, ops, now)
            self._seen_counts.pop(pid, None)  # its windows changed
            tag_state = state.tags or _empty_tag_state()
            # the windows were moved to the stream's clock: what they hold is as of then, not of the last event
            tag_state["swept_at"] = max(int(tag_state.get("swept_at") or 0), now)
            looks[pid] = (keys, ops, now, tag_state, tag_state.get("behaviour_tags"), tag_state.get("behaviour"))
            if tag_state.get("deleted"):  # no behaviour tag until an upsert brings it back (its counters stay)
                tag_state["behaviour"], tag_state["behaviour_tags"] = {}, []
            elif self._behaviour_tags(state, tag_state, now) is None:
                undecided[pid] = now
        if undecided:
            await self._count_users(states, undecided)
            for pid in undecided:
                self._behaviour_tags(states[pid], looks[pid][3], looks[pid][2])
        writes: list[Write] = []
        emitted: list[tuple[str, bytes | None]] = []
        index: ActiveIndex = {}
        next_check: dict[str, int | None] = {}
        for (topic, partition), pids in due.items():
            watermark = watermarks[(topic, partition)]
            swept_by = last_offsets[(topic, partition)]  # the update's source: the batch's last message there
            for pid in pids:
                if pid not in next_check:  # a product listed by two partitions (after repartitioning): once
                    state = states[pid]
                    keys, ops, now, tag_state, before, before_state = looks[pid]
                    payload = self._behaviour_update(
                        state, tag_state, before, "window-expired", SourceRef(topic, partition, swept_by), now
                    )
                    if tag_state["behaviour_tags"] != before or tag_state["behaviour"] != before_state:
                        tag_state["updated_at"] = max(int(tag_state.get("updated_at") or 0), now)
                    state.tags = tag_state
                    ops.set(keys.tags, orjson.dumps(tag_state))
                    _expire_if_unlisted(state, keys, ops)
                    # fenced at the event time it looked at, but always past the last sweep's: a batch of late events
                    # looks at an earlier time than the one before, and a sweep the fence turned into a no-op would
                    # still move the product in the index (off it, with its tags left on in Redis)
                    fence = f"sweep:{topic}:{partition}"
                    offset = max(now, state.applied_offset(fence) + 1)
                    state.fence[fence] = str(offset)
                    writes.append(Write(pid, fence, offset, ops, payload, swept_by=swept_by))
                    emitted.append((pid, payload))
                    next_check[pid] = self._due(state, now)
                check = next_check[pid]
                index.setdefault((topic, partition), {})[pid] = (
                    watermark + 1 if check is not None and check <= watermark else check
                )
        return writes, emitted, index

    async def _settle_sweeps(
        self,
        writes: list[Write],
        emitted: list[tuple[str, bytes | None]],
        results: list[WriteResult],
        watermarks: dict[tuple[str, int], int],
        swept: list[tuple[bytes, bytes]],
    ) -> None:
        """Publish (into `swept`) the update of every applied sweep that produced one. A sweep that was not applied
        (another writer changed its product since the read) had its next look indexed from an evaluation that did
        not happen: it is indexed as due at its partition's watermark again, for the next batch to look at."""
        missed: ActiveIndex = {}
        for w, (pid, payload), result in zip(writes, emitted, results, strict=True):
            if result.applied:
                if payload is not None:
                    swept.append((pid.encode(), payload))
                continue
            tp = sweep_partition(w.fence_field)
            missed.setdefault(tp, {})[pid] = watermarks.get(tp, 0)
        if missed:
            await self.store.apply_and_index([], missed)

    # --------------------------------------------------------------- fallback
    async def process_each(
        self, messages: Sequence[InMessage], process: Callable[[Sequence[InMessage]], Any]
    ) -> BatchOutput:
        """Process one message at a time, dead-lettering any whose processing raises (after a batch failed). An error
        of the state store (Redis out of memory, read-only, a conflict that does not settle) is no fault of the event:
        it is raised, so the batch stops (and the worker with it) instead of dead-lettering every event it sees."""
        out = BatchOutput()
        for msg in messages:
            try:
                one = await process([msg])
            except (RedisError, StateError):
                raise
            except TagstreamError as exc:
                out.dead_letters.append(dead_letter(msg, exc))
                continue
            except Exception as exc:
                log.exception("processing %s:%d@%d failed; dead-lettered", msg.topic, msg.partition, msg.offset)
                out.dead_letters.append(dead_letter(msg, exc))
                continue
            out.updates += one.updates
            out.dead_letters += one.dead_letters
            out.applied += one.applied
            out.redelivered += one.redelivered
        return out
