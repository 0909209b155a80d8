"""Per-product state in Redis (SPEC.md §3): pipelined reads and offset-fenced, idempotent writes via one Lua script.

`MemoryStateStore` has the same semantics without a server; the agents' in-memory test harness uses it, and an
integration test checks that both stores end in the same state for the same events.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import hiredis
import orjson
import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    DataError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ResponseError,
    TimeoutError,
)

from streams.windows import FINEST_MS, GRANULARITIES, GRANULARITY_INDEX, hll_buckets, window_buckets
from tagstream.errors import StateError

log = logging.getLogger(__name__)

STATE_FORMAT = 3
UPGRADABLE_FORMATS = (2,)  # format 3 = format 2 + the fence's `rev`, absent (0) in a format-2 store
# After a behaviour batch, per (topic, partition): (watermark, {product_id: next check time, None = none active})
EndBatch = dict[tuple[str, int], tuple[int, dict[str, int | None]]]
# Per (topic, partition): {product_id: when its behaviour tags next need a look, None = nothing active}
ActiveIndex = dict[tuple[str, int], dict[str, int | None]]
_RETRYABLE = (ConnectionError, TimeoutError, BusyLoadingError, ConnectionResetError, OSError)


def _refused(key: str, what: str, exc: ResponseError) -> str:
    """Why Redis refused a command on tagstream's `key`: full (OOM), or (WRONGTYPE) another program's key (a user
    without the permission is told so by `_retry`)."""
    if isinstance(exc, OutOfMemoryError):
        return f"Redis is full ({exc}): raise its maxmemory or free memory, then start the worker again"
    return f"{key} is not tagstream's {what} ({exc}): another program's key?"


def _no_permission(exc: BaseException) -> str:
    """The one line for a Redis user that may not run a command tagstream needs."""
    return (
        f"Redis refused a command to tagstream's user ({exc}): the user of TAGSTREAM_REDIS_URL needs read, write and "
        "scripting commands (EVALSHA, SCRIPT LOAD) on every key under TAGSTREAM_REDIS_PREFIX (e.g. "
        "`ACL SETUSER <user> ~<prefix>:* +@read +@write +@scripting`)"
    )


class ProductKeys:
    """Key names of one product; all share the hash tag `{product_id}` (Redis Cluster safe)."""

    __slots__ = ("beh", "doc", "fence", "prefix", "product_id", "tags")

    def __init__(self, prefix: str, product_id: str) -> None:
        self.prefix = prefix
        self.product_id = product_id
        base = f"{prefix}:{{{product_id}}}"
        self.doc = f"{base}:doc"
        self.beh = f"{base}:beh"
        self.tags = f"{base}:tags"
        self.fence = f"{base}:fence"

    def hll(self, granularity: str, bucket: int) -> str:
        """HyperLogLog of hashed user ids seen in one time bucket."""
        return f"{self.prefix}:{{{self.product_id}}}:uu:{granularity}:{bucket}"


def active_key(prefix: str, topic: str, partition: int) -> str:
    """Sorted set of products with a behaviour tag on, scored by when their windows next need a look."""
    return f"{prefix}:active:{topic}:{partition}"


def swept_key(prefix: str, topic: str, partition: int) -> str:
    """Sorted set of the products behaviour batches of a partition swept, scored by each batch's last offset there."""
    return f"{prefix}:swept:{topic}:{partition}"


def sweep_partition(fence_field: str) -> tuple[str, int]:
    """The (topic, partition) of a window-expiry write's fence field, `sweep:<topic>:<partition>`."""
    topic, _, partition = fence_field.removeprefix("sweep:").rpartition(":")
    return topic, int(partition)


def offsets_key(prefix: str) -> str:
    """Hash `<topic>:<partition>` → `<offset>:<timestamp>`, the highest offset applied from that input partition."""
    return f"{prefix}:offsets"


def watermark_key(prefix: str) -> str:
    """Hash `<topic>:<partition>` → newest event time seen."""
    return f"{prefix}:watermark"


@dataclass(slots=True)
class ProductState:
    """What Redis holds for one product (empty collections when the product is unknown)."""

    product_id: str
    doc: dict[str, str] = field(default_factory=dict)
    beh: dict[str, int] = field(default_factory=dict)
    tags: dict[str, Any] | None = None
    fence: dict[str, str] = field(default_factory=dict)  # the offsets: `emit:` fields are read by `stored_emits`
    # Approximate unique users per window ("h1", "h24", "d7") at the time asked for; empty when not counted.
    users: dict[str, int] = field(default_factory=dict)
    # Whether Redis held behaviour counters for the product when this state was read or last written (`beh` changes
    # as a batch applies events): a write computed from them is applied only while they exist (they may expire).
    stored_counters: bool = field(init=False)

    def __post_init__(self) -> None:
        self.stored_counters = bool(self.beh)

    def applied_offset(self, fence_field: str) -> int:
        """Last offset applied from `fence_field` (`<topic>:<partition>`), -1 if none."""
        value = self.fence.get(fence_field)
        return int(value) if value is not None else -1

    @property
    def rev(self) -> int:
        """The product's revision this state is at: the number of writes applied to it."""
        return int(self.fence.get("rev", 0))


class Ops:
    """The compacted ops of one fenced write; KEYS[1] is always the product's fence key.

    Several events' ops merge into one write: counters add up, hash fields and strings keep their last value, and
    deletions run last (a field deleted in a batch is one whose bucket left its window, so it stays deleted).
    """

    def __init__(self, keys: ProductKeys) -> None:
        self._product = keys
        self._keys: list[str] = [keys.fence]
        self._index: dict[str, int] = {keys.fence: 1}
        self._users: dict[int, set[str]] = {}  # finest time bucket -> hashed users seen in it
        self._incr: dict[int, dict[str, int]] = {}
        self._hset: dict[int, dict[str, str]] = {}
        self._hdel: dict[int, set[str]] = {}
        self._set: dict[int, str] = {}
        self._del: set[int] = set()
        self._pfadd: dict[int, set[str]] = {}
        self._expire: set[int] = set()
        self._persist: set[int] = set()
        self._follow: str | None = None  # `follow_counters`

    @property
    def keys(self) -> list[str]:
        """The keys the ops name (KEYS of the script), the fence first."""
        self._flush_users()
        if self._follow is not None:  # `ops` may name the tags (read in either order)
            self._k(self._product.tags)
        return self._keys

    def _k(self, key: str) -> int:
        index = self._index.get(key)
        if index is None:
            self._keys.append(key)
            index = self._index[key] = len(self._keys)
        return index

    def add_user(self, ts: int, user: str) -> None:
        """Add a hashed user to the product's unique-user HyperLogLogs of every bucket holding event time `ts`."""
        finest = ts // FINEST_MS
        users = self._users.get(finest)
        if users is None:
            users = self._users[finest] = set()
        users.add(user)

    def add_user_to(self, ts: int, user: str, live: tuple[bool, ...]) -> None:
        """`add_user` for the buckets of event time `ts` that `live` marks (GRANULARITIES order) only."""
        for (code, bucket), keep in zip(hll_buckets(ts), live, strict=True):
            if keep:
                self._hll_users(code, bucket).add(user)

    def _hll_users(self, code: str, bucket: int) -> set[str]:
        """The users to add to the product's HyperLogLog of that bucket."""
        return self._pfadd.setdefault(self._k(self._product.hll(code, bucket)), set())

    def users_in_windows(self, now: int) -> list[set[str]]:
        """Per window (GRANULARITIES order), the hashed users these ops add to the product's HyperLogLogs of the
        buckets in that window at event time `now` (in Redis only once the write is applied)."""
        self._flush_users()
        out: list[set[str]] = [set() for _ in GRANULARITIES]
        for index, users in self._pfadd.items():
            _, code, bucket = self._keys[index - 1].rsplit(":", 2)
            i = GRANULARITY_INDEX[code]
            if int(bucket) in window_buckets(GRANULARITIES[i], now):
                out[i] |= users
        return out

    def _flush_users(self) -> None:
        for finest, users in self._users.items():
            for code, bucket in hll_buckets(finest * FINEST_MS):
                self._hll_users(code, bucket).update(users)
        self._users.clear()

    def hset(self, key: str, mapping: dict[str, Any]) -> None:
        """Set hash fields."""
        if mapping:
            self._hset.setdefault(self._k(key), {}).update({k: str(v) for k, v in mapping.items()})

    def counters(self, key: str) -> dict[str, int]:
        """The hash counter increments of `key` (field -> amount), to add to in place."""
        return self._incr.setdefault(self._k(key), {})

    def hset_field(self, key: str, name: str, value: Any) -> None:
        """Set one hash field."""
        self._hset.setdefault(self._k(key), {})[name] = str(value)

    def hdel(self, key: str, names: list[str]) -> None:
        """Delete hash fields."""
        if names:
            self._hdel.setdefault(self._k(key), set()).update(names)

    def set(self, key: str, value: str | bytes) -> None:
        """Set a string key."""
        self._set[self._k(key)] = value.decode() if isinstance(value, bytes) else value

    def delete(self, key: str) -> None:
        """Delete a key."""
        self._del.add(self._k(key))

    def expire(self, key: str) -> None:
        """Give a behaviour key the store's time to live again (`behaviour_ttl_ms`; none when it is 0), last."""
        self._expire.add(self._k(key))

    def follow_counters(self, *, always: bool = False) -> None:
        """Give the product's tags and fence the time to live its counters (P:{pid}:beh) have after the write (the
        store's when they have none; nothing when it is 0): a product no catalog change named. Only when the write
        can change one of those times to live: it renews the counters' (`expire` of P:{pid}:beh), sets the tags
        (a SET drops a key's time to live), or `always` (it makes the fence); any other write leaves all three as
        they were."""
        self._follow = "always" if always else self._follow or "on-change"

    def persist(self, key: str) -> None:
        """Remove a key's time to live (a product's fence at its first catalog change)."""
        self._persist.add(self._k(key))

    @property
    def ops(self) -> list[list[Any]]:
        """The op list the Lua script applies, in order: adds, counters, fields, strings, deletions, then times to
        live."""
        self._flush_users()
        out: list[list[Any]] = []
        out += [["pfadd", k, *sorted(v)] for k, v in self._pfadd.items()]
        for k, fields in self._incr.items():
            flat: list[Any] = []
            for name, n in fields.items():
                flat += [name, n]
            out.append(["hincrby", k, *flat])
        for k, mapping in self._hset.items():
            flat = []
            for name, value in mapping.items():
                flat += [name, value]
            out.append(["hset", k, *flat])
        out += [["set", k, v] for k, v in self._set.items()]
        out += [["hdel", k, *sorted(v)] for k, v in self._hdel.items()]
        out += [["del", k] for k in sorted(self._del)]
        out += [["persist", k] for k in sorted(self._persist)]
        out += [["pexpire", k] for k in sorted(self._expire)]
        if self._follow is not None:
            product = self._product
            beh, tags = self._index.get(product.beh), self._index.get(product.tags)
            if self._follow == "always" or beh in self._expire or tags in self._set:
                out += [["pexpire_with_counters", self._k(product.tags)], ["pexpire_with_counters", 1]]
        return out


def approx_state_bytes(state: ProductState) -> int:
    """A cheap estimate of the memory a kept product state takes (within about ±30 % on the bench mix and on
    products with 19,000-character descriptions and 100 attributes): a fixed cost per hash field and per tag, plus
    the length of its strings (the description, the `emit:` updates in its fence), so that a few very large products
    weigh what they take (`StateCache`'s byte budget)."""
    doc, fence, tags = state.doc, state.fence, state.tags
    n = (
        1000
        + 120 * (len(doc) + len(state.beh) + len(fence))
        + sum(map(len, doc.values()))
        + sum(map(len, fence.values()))
    )
    if tags:
        got = tags.get
        n += 400 * (
            len(got("tags") or ())
            + len(got("model") or ())
            + len(got("catalog") or ())
            + len(got("behaviour_tags") or ())
        )
    return n


class StateCache:
    """Product states as this worker last read or wrote them, most recently used last, at most `size` of them and
    about `max_bytes` (`approx_state_bytes`; None: no bound): a product with a 19,000-character description and 100
    attributes takes ~100 KB, thirteen times a product of the bench mix, so a count alone let 4,000 such products take
    a gigabyte.

    A batch `take`s the states it needs (they are out of the cache while it mutates them) and `put`s back each one
    whose writes were all applied, at the revision they left. Everything else is dropped: a state whose write failed,
    conflicted or was never made is read from Redis next time. A kept state that another writer changed since is
    caught by the write's `expect_rev`, so the cache can be stale but never makes a write wrong."""

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._states: OrderedDict[str, ProductState] = OrderedDict()
        self._bytes: dict[str, int] = {}  # each kept state's estimate when it was put
        self.bytes = 0  # their sum
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def take(self, product_ids: Collection[str]) -> dict[str, ProductState]:
        """Remove and return the kept states of these (distinct) products; the others are misses."""
        taken = self.take_kept(product_ids)
        self.misses += len(product_ids) - len(taken)
        return taken

    def take_kept(self, product_ids: Iterable[str]) -> dict[str, ProductState]:
        """Remove and return the kept states of these products; the others are not counted as misses (a batch
        looking ahead, not reading)."""
        pop = self._states.pop
        taken = {pid: state for pid in product_ids if (state := pop(pid, None)) is not None}
        if taken and self._bytes:  # weighed only under a byte budget
            forget = self._bytes.pop
            self.bytes -= sum(forget(pid, 0) for pid in taken)
        self.hits += len(taken)
        return taken

    def put(self, state: ProductState, rev: int | None = None) -> None:
        """Keep `state` (as Redis holds it, at revision `rev` if given), dropping the least recently used beyond the
        size and the byte budget; its unique-user counts are not kept (they are counted at a given time)."""
        if rev is not None:
            state.fence["rev"] = str(rev)
        state.users = {}
        state.stored_counters = bool(state.beh)  # as Redis holds it now
        pid = state.product_id
        self._states[pid] = state
        self._states.move_to_end(pid)
        if self.max_bytes is not None:
            weight = approx_state_bytes(state)
            self.bytes += weight - self._bytes.get(pid, 0)
            self._bytes[pid] = weight
            while self.bytes > self.max_bytes and self._states:
                dropped, _ = self._states.popitem(last=False)
                self.bytes -= self._bytes.pop(dropped, 0)
        while len(self._states) > self.size:
            dropped, _ = self._states.popitem(last=False)
            self.bytes -= self._bytes.pop(dropped, 0)

    def discard(self, product_ids: Iterable[str]) -> None:
        """Forget these products (another writer changed them)."""
        for pid in product_ids:
            self._states.pop(pid, None)
            self.bytes -= self._bytes.pop(pid, 0)

    def clear(self) -> None:
        """Forget every product (partitions moved: others may write them now)."""
        self._states.clear()
        self._bytes.clear()
        self.bytes = 0


@dataclass(slots=True)
class Write:
    """One fenced effect on one product: the events of one partition from `offset` to `last_offset` (inclusive),
    applied at most once. `emit` is the last tag update they produced (kept for re-sending on redelivery)."""

    product_id: str
    fence_field: str
    offset: int
    ops: Ops
    emit: bytes | None = None
    last_offset: int | None = None
    expect_rev: int | None = None  # apply only while the product is at this revision (None: at any)
    # computed from a state with behaviour counters: apply only while P:{pid}:beh exists (it may have expired since)
    expect_counters: bool = False
    swept_by: int | None = None  # a window-expiry write: the last offset of its batch in the swept partition
    # a write of events consumed from an input partition (its fence field names it): the store records the offset
    input_fence: bool = False
    last_timestamp: int = 0  # with input_fence: the Kafka timestamp (ms) of the record at stored_offset (0: none)

    @property
    def stored_offset(self) -> int:
        """The offset the fence holds after this write."""
        return self.offset if self.last_offset is None else self.last_offset


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Whether a write was applied (and the product's revision after it), was a redelivery (then the update its
    offset produced before), or found the product at another revision than `Write.expect_rev` (`conflict`)."""

    applied: bool
    stored_emit: bytes | None = None
    rev: int | None = None
    conflict: bool = False


class StateStore(Protocol):
    """Where per-product state lives: Redis in production, memory in the agents' test harness."""

    prefix: str

    async def read(
        self, product_ids: list[str], now: dict[str, int] | None = None, *, counters: bool = True
    ) -> dict[str, ProductState]: ...

    async def count_users(
        self, now: dict[str, int], batch: dict[str, list[set[str]]] | None = None
    ) -> dict[str, dict[str, int]]: ...

    async def stored_emits(self, fences: list[tuple[str, str]]) -> dict[tuple[str, str], bytes | None]: ...

    async def due_lists(self, watermarks: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[str]]: ...

    async def watermark_raised(self, topic: str, partition: int) -> tuple[int, int | None]: ...

    async def swept_since(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[str]]: ...

    async def apply(self, writes: list[Write]) -> list[WriteResult]: ...

    async def apply_and_end_batch(
        self, writes: list[Write], end_batch: EndBatch, produced_at: ProducedAt | None = None
    ) -> tuple[list[WriteResult], dict[tuple[str, int], list[str]]]: ...

    async def apply_and_index(
        self, writes: list[Write], index: ActiveIndex, *, earlier_only: bool = False
    ) -> list[WriteResult]: ...

    async def close(self) -> None: ...


def _swept_by_partition(writes: list[Write]) -> dict[tuple[str, int], dict[str, int]]:
    """The window-expiry writes' products per swept partition, each with its batch's last offset there (recorded
    whether the write applied or not: a batch redelivered later re-sends only updates that are current)."""
    out: dict[tuple[str, int], dict[str, int]] = {}
    for w in writes:
        if w.swept_by is not None:
            out.setdefault(sweep_partition(w.fence_field), {})[w.product_id] = w.swept_by
    return out


def _input_offsets(writes: list[Write]) -> dict[str, tuple[int, int]]:
    """The last offset of each input partition (`<topic>:<partition>`) the writes carry events of, with the Kafka
    timestamp of its record."""
    out: dict[str, tuple[int, int]] = {}
    for w in writes:
        if w.input_fence and out.get(w.fence_field, (-1, 0))[0] < w.stored_offset:
            out[w.fence_field] = (w.stored_offset, w.last_timestamp)
    return out


# P:offsets keeps each partition's highest offset: a late batch of a worker that lost the partition, or a write
# refused by its fence, never lowers it. ARGV = (field, offset, "<offset>:<timestamp>") triples.
_OFFSETS_LUA = (
    "for i = 1, #ARGV, 3 do "
    "local v = redis.call('HGET', KEYS[1], ARGV[i]); "
    "local at = v and tonumber(string.match(v, '^%d+')); "
    "if (not at) or at < tonumber(ARGV[i + 1]) then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2]) end "
    "end return 0"
)


def parse_applied_offset(value: str) -> tuple[int, int | None]:
    """A `P:offsets` value, `<offset>:<timestamp>` (or an offset alone), as (offset, timestamp or None);
    ValueError when it is neither."""
    offset, _, timestamp = value.partition(":")
    return int(offset), int(timestamp or 0) or None


def _decode_tags(raw: bytes | str | None) -> dict[str, Any] | None:
    return orjson.loads(raw) if raw else None


# Raise a partition's watermark (never lower it); when it rises, keep `<watermark>:<produced_at>` beside it (when
# the batch that raised it was produced, for window ticks)
_WATERMARK_LUA = (
    "local v = redis.call('HGET', KEYS[1], ARGV[1]); "
    "if (not v) or tonumber(v) < tonumber(ARGV[2]) then "
    "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. ':raised', ARGV[2] .. ':' .. ARGV[3]) end"
)
# Per partition: when a batch's newest event time was produced, by its records' Kafka timestamps: the newest time
# plus the smallest (timestamp - event time) of its records (the liveliest record of the batch speaks for it)
ProducedAt = dict[tuple[str, int], int]


def _raised_at(watermark: int, pair: str | None) -> int | None:
    """The produced-at time kept with `watermark` in a `<watermark>:<produced_at>` pair; None when the pair belongs
    to another watermark (raised since by a worker that keeps none) or there is none."""
    if not pair:
        return None
    kept, _, at = pair.partition(":")
    return int(at) if kept == str(watermark) and at.isdigit() else None


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


DUE_LIMIT = 1000  # products one due list names at most (the rest stay due for the next batch)
# A partition's swept products are kept for this many offsets behind the newest batch that swept: far more than a
# consumer's uncommitted offsets, which a restart redelivers (SPEC.md §3).
SWEPT_KEEP_OFFSETS = 100_000


def _due_command(active: str, watermark: int) -> tuple[Any, ...]:
    """The products of an active index due at or before `watermark`, soonest first."""
    return ("ZRANGEBYSCORE", active, "-inf", watermark, "LIMIT", 0, DUE_LIMIT)


def _write_result(reply: list[Any]) -> WriteResult:
    """A state.lua reply: {1, rev} applied, {0, offset, emit} already applied, {2, rev} at another revision."""
    code = int(reply[0])
    if code == 1:
        return WriteResult(True, rev=int(reply[1]))
    if code == 2:
        return WriteResult(False, rev=int(reply[1]), conflict=True)
    return WriteResult(False, reply[2].encode() if reply[2] else None)


class _Script:
    """A Lua script run by EVALSHA inside pipelines, loaded again only when Redis answers NOSCRIPT (redis-py's own
    pipeline scripts cost a SCRIPT EXISTS round trip on every execute)."""

    def __init__(self, name: str) -> None:
        self.text = resources.files("streams").joinpath(name).read_text()
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()

    def queue(self, pipe: list[tuple[Any, ...]], keys: list[str], args: list[Any]) -> None:
        """Queue one call on a pipeline."""
        pipe.append(("EVALSHA", self.sha, len(keys), *keys, *args))


def _buckets(now: int) -> list[int]:
    """The buckets of event time `now` in each granularity (users.lua's ARGV)."""
    return [now // g.width_ms for g in GRANULARITIES]


def _users(reply: list[int]) -> dict[str, int]:
    """users.lua's reply as unique users per window."""
    return {g.window: int(u) for g, u in zip(GRANULARITIES, reply, strict=True)}


def _pairs(reply: dict[str, str] | list[str]) -> Any:
    """The field-value pairs of an HGETALL reply: a map (RESP3) or a flat list (RESP2)."""
    if isinstance(reply, dict):
        return reply.items()
    values = iter(reply)
    return zip(values, values, strict=True)


def _score_members(scores: dict[str, int]) -> list[Any]:
    flat: list[Any] = []
    for member, score in scores.items():
        flat += [score, member]
    return flat


class _Pipeline:
    """Pipelined round trips on kept connections (up to `size` at once, for concurrent callers): the commands packed
    by hiredis into one write, the replies parsed by one hiredis reader. redis-py's pipeline spent ~3 µs of Python
    per command and reply, on hundreds per batch; this is the one place the store needs that speed (other calls use
    the client). One caller's round trips run in order; concurrent callers' may interleave in Redis."""

    def __init__(self, client: aioredis.Redis, timeout: float = 30.0, size: int = 4, pooled: bool = False) -> None:
        """`pooled`: take each round trip's connection from the client's pool (bounded and waited for as the pool
        says) instead of keeping `size` connections of its own."""
        self._client = client
        self._timeout = timeout
        self._pooled = pooled
        self._idle: list[aioredis.Connection] = []
        self._slots = asyncio.Semaphore(size)

    async def run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send `commands`, return their replies in order; a Redis error reply raises (NOSCRIPT as NoScriptError)
        after every reply was read, so the connection stays usable."""
        if not commands:
            return []
        if self._pooled:
            pool = self._client.connection_pool
            conn = await pool.get_connection()
            try:
                replies = await self._round_trip(conn, commands)
            except BaseException:
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
            return _raise_error_reply(replies)
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            try:
                if conn is None:
                    conn = self._client.connection_pool.make_connection()
                    await conn.connect()
                replies = await self._round_trip(conn, commands)
            except BaseException:
                if conn is not None:
                    await conn.disconnect()
                raise
            self._idle.append(conn)
        return _raise_error_reply(replies)

    async def _round_trip(self, conn: aioredis.Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            packed = b"".join([hiredis.pack_command(c) for c in commands])
        except TypeError as exc:
            raise DataError(str(exc)) from exc
        await conn.send_packed_command(packed, check_health=False)
        stream = conn._reader  # the replies are parsed here, not by the connection
        if stream is None:
            raise ConnectionError("Redis connection not open")
        parser = hiredis.Reader(encoding="utf-8")
        replies: list[Any] = []
        async with asyncio.timeout(self._timeout):
            while len(replies) < len(commands):
                data = await stream.read(1 << 17)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    replies.append(reply)
        return replies

    async def close(self) -> None:
        """Close the kept connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()


def _raise_error_reply(replies: list[Any]) -> list[Any]:
    """`replies`, or the first Redis error reply among them raised (NOSCRIPT as NoScriptError, OOM as
    OutOfMemoryError, as redis-py raises them)."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                raise NoScriptError(message)
            if message.startswith("OOM "):
                raise OutOfMemoryError(message.removeprefix("OOM "))
            raise ResponseError(message)
    return replies


def format_refusal(meta: str, found: int) -> str:
    """Why a worker refuses a store of state format `found` it neither writes nor upgrades, and the remedy (SPEC.md
    §3): keep it with the workers of its format, or build a new one under a new prefix (and consumer group, or the
    new empty store is refused as lost state)."""
    fresh = (
        "or start on a new TAGSTREAM_REDIS_PREFIX with a new TAGSTREAM_APP_ID (a new consumer group rebuilds the "
        "state from what the topics still hold; SPEC.md §3)"
    )
    if found > STATE_FORMAT:
        return (
            f"Redis holds state format {found} ({meta}), newer than this worker's format {STATE_FORMAT}: run the "
            f"tagstream version that wrote it, {fresh}"
        )
    return (
        f"Redis holds state format {found} ({meta}), which this worker (format {STATE_FORMAT}) does not read: drain "
        f"it with the workers of format {found}, {fresh}"
    )


class RedisStateStore:
    """State in Redis: one pipelined round trip to read a batch, one to write it (Lua, offset-fenced)."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        max_backoff: float = 5.0,
        clock: Callable[[], int] = now_ms,
        *,
        retries: int | None = None,
        pooled: bool = False,
        behaviour_ttl_ms: int = 0,
    ) -> None:
        """`clock`: the wall clock (epoch ms) noted when a watermark rises. `retries`: how often a failed round trip
        is tried again (None: until Redis answers, as a worker's writes must; a reader answering a client gives up
        sooner). `pooled`: round trips take their connections from the client's pool, within its limit and wait
        (a worker keeps a few connections of its own instead). `behaviour_ttl_ms`: the time to live every write gives
        the behaviour keys it writes (0: they never expire)."""
        self.client = client
        self.behaviour_ttl_ms = behaviour_ttl_ms
        self.prefix = prefix
        self.clock = clock
        self.max_backoff = max_backoff
        self.retries = retries
        self._eviction_unreadable_logged = False  # `eviction_problem` warns of an unreadable policy once
        self._script = _Script("state.lua")
        self._read_script = _Script("read.lua")
        self._users_script = _Script("users.lua")
        self._pipe = _Pipeline(client, pooled=pooled)

    @classmethod
    def from_url(cls, url: str, prefix: str, max_backoff: float = 5.0, *, behaviour_ttl_ms: int = 0) -> RedisStateStore:
        """Connect lazily to `url`."""
        client = aioredis.from_url(url, decode_responses=True, health_check_interval=30)
        return cls(client, prefix, max_backoff, behaviour_ttl_ms=behaviour_ttl_ms)

    async def _pipelined(self, what: str, queue: Any) -> list[Any]:
        """Run the commands `queue(pipe)` adds in one round trip (retried); on NOSCRIPT (Redis restarted or its
        scripts flushed) load the scripts and run the pipeline again — every write in it is offset-fenced."""

        async def run() -> list[Any]:
            pipe: list[tuple[Any, ...]] = []
            queue(pipe)
            return await self._pipe.run(pipe)

        try:
            return await self._retry(what, run)
        except NoScriptError:
            await self._load_scripts()
            return await self._retry(what, run)

    async def _load_scripts(self) -> None:
        """Load the Lua scripts into Redis (after a restart or `SCRIPT FLUSH`; at start, where a user without
        scripting is told so)."""
        for script in (self._script, self._read_script, self._users_script):
            await self._retry("script load", lambda s=script: self.client.script_load(s.text))

    async def _retry(self, what: str, fn: Any, *, forbidden_ok: bool = False) -> Any:
        """Run `fn()` until it succeeds (or `retries` times more), backing off exponentially up to `max_backoff`
        between attempts. A command the user may not run is a StateError naming the permissions tagstream needs,
        unless `forbidden_ok` (the caller does without it: NoPermissionError as redis-py raised it)."""
        delay = 0.05
        attempt = 0
        failing_since = 0.0
        while True:
            try:
                result = await fn()
                if attempt:  # the outage's end, for whoever read its warnings
                    log.warning(
                        "redis %s succeeded again after %d failed attempts (%.1f s)",
                        what,
                        attempt,
                        time.monotonic() - failing_since,
                    )
                return result
            except NoPermissionError as exc:  # a user that may not run it: no retry will mend that either
                if forbidden_ok:
                    raise
                raise StateError(_no_permission(exc)) from exc
            except (AuthenticationError, AuthorizationError) as exc:  # ConnectionErrors that no retry will mend
                raise StateError(
                    f"Redis refused tagstream's credentials ({exc}): set the user and password of TAGSTREAM_REDIS_URL "
                    "(redis://USER:PASSWORD@HOST:PORT/DB) to ones this Redis accepts"
                ) from exc
            except _RETRYABLE as exc:
                if not attempt:
                    failing_since = time.monotonic()
                if self.retries is not None and attempt >= self.retries:
                    raise
                attempt += 1
                log.warning("redis %s failed (attempt %d): %s; retrying in %.2fs", what, attempt, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)

    async def applied_offsets(self) -> dict[str, tuple[int, int | None]]:
        """The highest offset a batch applied from each input partition (`<topic>:<partition>`), with its record's
        Kafka timestamp when known (SPEC.md §3)."""
        key = offsets_key(self.prefix)
        try:
            raw = await self._retry("applied offsets", lambda: self.client.hgetall(key))
        except ResponseError as exc:
            raise StateError(_refused(key, "offsets hash", exc)) from None
        out = {}
        for where, value in raw.items():
            try:
                out[where] = parse_applied_offset(value)
            except ValueError:
                raise StateError(f"{key}[{where}] is {value!r}, not an offset and timestamp (corrupt)") from None
        return out

    async def holds_state(self) -> bool:
        """Whether the keyspace holds tagstream state (`<prefix>:meta` exists: the first worker writes it)."""
        return bool(await self._retry("holds_state", lambda: self.client.exists(f"{self.prefix}:meta")))

    async def eviction_problem(self) -> str | None:
        """Why this Redis may evict tagstream's keys (a `maxmemory` with a `maxmemory-policy` other than
        `noeviction`), or None; None too when `INFO memory` is not allowed (a managed Redis may forbid it: logged)."""
        try:
            info = await self._retry("info memory", lambda: self.client.info("memory"), forbidden_ok=True)
        except ResponseError as exc:
            if not self._eviction_unreadable_logged:  # once: a running worker asks every 30 s
                self._eviction_unreadable_logged = True
                log.warning("cannot read Redis's eviction policy (INFO memory: %s); it must be noeviction", exc)
            return None
        policy, limit = str(info.get("maxmemory_policy", "noeviction")), int(info.get("maxmemory", 0) or 0)
        if limit > 0 and policy != "noeviction":
            return f"maxmemory-policy is {policy} with maxmemory {limit} bytes"
        return None

    async def check_format(self) -> None:
        """Write the state format on an empty keyspace; refuse to run on another format."""

        async def run() -> Any:
            await self.client.hsetnx(f"{self.prefix}:meta", "state_format", STATE_FORMAT)
            return await self.client.hget(f"{self.prefix}:meta", "state_format")

        meta = f"{self.prefix}:meta"
        try:
            written = await self._retry("check_format", run)
        except ResponseError as exc:
            raise StateError(_refused(meta, "state hash", exc)) from None
        try:
            found = int(written)
        except (TypeError, ValueError):
            raise StateError(f"{meta} holds state_format {written!r}, not a format number (corrupt)") from None
        if found in UPGRADABLE_FORMATS:
            await self._retry(
                "upgrade_format", lambda: self.client.hset(f"{self.prefix}:meta", "state_format", STATE_FORMAT)
            )
            log.warning(
                "state format %d upgraded to %d (stop every older worker first, SPEC.md §3)", found, STATE_FORMAT
            )
        elif found != STATE_FORMAT:
            raise StateError(format_refusal(meta, found))
        await self._load_scripts()  # a user without scripting is told so now, not at its first batch

    async def store_id(self) -> str:
        """This store's identity (`<prefix>:meta` field `store_id`, made by the first worker that asks): the same
        store however Redis is reached (another host name, a restore from its append-only file), and another for
        every other prefix or Redis. Workers commit it with their offsets (`streams.app.commit_metadata`)."""

        async def run() -> Any:
            await self.client.hsetnx(f"{self.prefix}:meta", "store_id", secrets.token_hex(8))
            return await self.client.hget(f"{self.prefix}:meta", "store_id")

        found = await self._retry("store_id", run)
        return found.decode() if isinstance(found, bytes) else str(found)

    async def read(
        self, product_ids: list[str], now: dict[str, int] | None = None, *, counters: bool = True
    ) -> dict[str, ProductState]:
        """Read the state of every product in one pipelined round trip: one Lua call per product (read.lua), one
        more for its unique users per window at `now[pid]` (users.lua) and, with `counters`, its behaviour counters
        (`beh` stays empty without)."""
        now = now or {}

        def queue(pipe: list[tuple[Any, ...]]) -> None:
            for pid in product_ids:
                keys = ProductKeys(self.prefix, pid)
                self._read_script.queue(pipe, [keys.doc, keys.tags, keys.fence], [])
                if (t := now.get(pid)) is not None:
                    self._users_script.queue(pipe, [keys.doc], _buckets(t))
                if counters:
                    pipe.append(("HGETALL", keys.beh))

        replies = iter(await self._pipelined("read", queue) if product_ids else [])
        out: dict[str, ProductState] = {}
        for pid in product_ids:
            reply, tags = next(replies)
            users = _users(next(replies)) if pid in now else {}
            beh = next(replies) if counters else []
            got = orjson.loads(reply)
            out[pid] = ProductState(
                pid,
                got["doc"] or {},
                {k: int(v) for k, v in _pairs(beh)},
                _decode_tags(tags),
                got["fence"] or {},
                users,
            )
        return out

    async def stored_emits(self, fences: list[tuple[str, str]]) -> dict[tuple[str, str], bytes | None]:
        """The tag update each (product, `<topic>:<partition>`) last produced and kept for re-sending, in one round
        trip (read only for redelivered offsets)."""

        def queue(pipe: list[tuple[Any, ...]]) -> None:
            for pid, fence_field in fences:
                pipe.append(("HGET", ProductKeys(self.prefix, pid).fence, f"emit:{fence_field}"))

        replies = await self._pipelined("stored emits", queue) if fences else []
        return {f: (v.encode() if v else None) for f, v in zip(fences, replies, strict=True)}

    async def count_users(
        self, now: dict[str, int], batch: dict[str, list[set[str]]] | None = None
    ) -> dict[str, dict[str, int]]:
        """Approximate unique users per window of each product at event time `now[pid]`, in one round trip
        (users.lua: `PFCOUNT` over each window's bucket HyperLogLogs); with `batch[pid]`, per window (GRANULARITIES
        order) hashed users counted with them: a batch's users its write has not added yet."""
        pids = list(now)
        batch = batch or {}

        def queue(pipe: list[tuple[Any, ...]]) -> None:
            for pid in pids:
                args: list[Any] = _buckets(now[pid])
                for users in batch.get(pid, ()):
                    args += [len(users), *sorted(users)]
                self._users_script.queue(pipe, [ProductKeys(self.prefix, pid).doc], args)

        replies = await self._pipelined("count users", queue) if pids else []
        return {pid: _users(r) for pid, r in zip(pids, replies, strict=True)}

    async def apply(self, writes: list[Write]) -> list[WriteResult]:
        """Apply the writes in order in one pipelined round trip; each is a no-op if its offset was applied."""
        results, _ = await self._apply(writes, None)
        return results

    async def due_lists(self, watermarks: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[str]]:
        """The products of each partition whose behaviour windows need a look at or before its watermark, in one
        round trip (the active index as it is; `end_batch` lists the same after updating it)."""

        def queue(pipe: list[tuple[Any, ...]]) -> None:
            for (topic, partition), watermark in watermarks.items():
                pipe.append(_due_command(active_key(self.prefix, topic, partition), watermark))

        replies = await self._pipelined("due lists", queue) if watermarks else []
        return {tp: list(r) for tp, r in zip(watermarks, replies, strict=True)}

    async def swept_since(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[str]]:
        """The products each partition's batches swept whose last offset there is at or after `offsets[tp]`."""

        def queue(pipe: list[tuple[Any, ...]]) -> None:
            for (topic, partition), offset in offsets.items():
                pipe.append(("ZRANGEBYSCORE", swept_key(self.prefix, topic, partition), offset, "+inf"))

        replies = await self._pipelined("swept products", queue) if offsets else []
        return {tp: list(r) for tp, r in zip(offsets, replies, strict=True)}

    async def apply_and_end_batch(
        self, writes: list[Write], end_batch: EndBatch, produced_at: ProducedAt | None = None
    ) -> tuple[list[WriteResult], dict[tuple[str, int], list[str]]]:
        """`apply(writes)` then `end_batch(end_batch)`, in the same round trip; `produced_at`: per partition, the
        Kafka timestamp of the record with its newest event time (kept with a watermark it raises; the store's clock
        where it is missing)."""
        return await self._apply(writes, end_batch, produced_at=produced_at)

    async def apply_and_index(
        self, writes: list[Write], index: ActiveIndex, *, earlier_only: bool = False
    ) -> list[WriteResult]:
        """`apply(writes)` then `index_active` of every partition in `index`, in the same round trip; with
        `earlier_only`, an indexed product's next look only moves earlier (`ZADD LT`)."""
        results, _ = await self._apply(writes, None, index, earlier_only)
        return results

    async def _apply(
        self,
        writes: list[Write],
        end_batch: EndBatch | None,
        index: ActiveIndex | None = None,
        earlier_only: bool = False,
        produced_at: ProducedAt | None = None,
    ) -> tuple[list[WriteResult], dict[tuple[str, int], list[str]]]:
        # Every round trip counts: a socket write costs ~0.25 ms of system time on this machine's loopback.
        ttl = self.behaviour_ttl_ms

        def queue(pipe: list[tuple[Any, ...]]) -> None:
            for w in writes:
                emit = w.emit or b""
                expect = "" if w.expect_rev is None else w.expect_rev
                args = [w.fence_field, w.offset, emit, orjson.dumps(w.ops.ops), w.stored_offset, expect, ttl]
                self._script.queue(pipe, w.ops.keys, [*args, 1 if w.expect_counters else 0])
            if end_batch:
                self._queue_end_batch(pipe, end_batch, produced_at or {})
            for (topic, partition), entries in (index or {}).items():
                self._queue_index(pipe, active_key(self.prefix, topic, partition), entries, earlier_only)
            for (topic, partition), swept in _swept_by_partition(writes).items():
                key = swept_key(self.prefix, topic, partition)
                pipe.append(("ZADD", key, *_score_members(swept)))
                pipe.append(("ZREMRANGEBYSCORE", key, "-inf", f"({max(swept.values()) - SWEPT_KEEP_OFFSETS}"))
            applied = _input_offsets(writes)  # last: the replies before it are read by position
            if applied:
                args = [x for f, (o, ts) in applied.items() for x in (f, o, f"{o}:{ts}")]
                pipe.append(("EVAL", _OFFSETS_LUA, 1, offsets_key(self.prefix), *args))

        replies = await self._pipelined("apply", queue) if writes or end_batch or index else []
        results = [_write_result(r) for r in replies[: len(writes)]]
        return results, self._due_lists(end_batch, replies[len(writes) :]) if end_batch else {}

    @staticmethod
    def _queue_index(
        pipe: list[tuple[Any, ...]], key: str, entries: dict[str, int | None], earlier_only: bool = False
    ) -> None:
        add = {pid: due for pid, due in entries.items() if due is not None}
        drop = [pid for pid, due in entries.items() if due is None]
        if add:
            pipe.append(("ZADD", key, *(("LT",) if earlier_only else ()), *_score_members(add)))
        if drop:
            pipe.append(("ZREM", key, *drop))

    async def get_watermark(self, topic: str, partition: int) -> int:
        """Newest event time seen on a partition (0 if none)."""
        value = await self._retry(
            "watermark", lambda: self.client.hget(watermark_key(self.prefix), f"{topic}:{partition}")
        )
        return int(value) if value else 0

    async def watermark_raised(self, topic: str, partition: int) -> tuple[int, int | None]:
        """A partition's watermark (0 if none) and when the record that raised it was produced (its Kafka
        timestamp, ms; None when not known: raised by a worker that keeps none, or none kept yet)."""
        field = f"{topic}:{partition}"
        value, pair = await self._retry(
            "watermark", lambda: self.client.hmget(watermark_key(self.prefix), [field, f"{field}:raised"])
        )
        watermark = int(value) if value else 0
        return watermark, _raised_at(watermark, pair)

    def _queue_end_batch(self, pipe: list[tuple[Any, ...]], partitions: EndBatch, produced_at: ProducedAt) -> None:
        """After a behaviour batch, per (topic, partition): raise the watermark (never lowers it), update the active
        index and list the products due at the watermark — four replies each (`_due_lists` reads them)."""
        for topic, partition in partitions:
            watermark, entries = partitions[(topic, partition)]
            key = active_key(self.prefix, topic, partition)
            field = f"{topic}:{partition}"
            at = produced_at.get((topic, partition)) or self.clock()
            pipe.append(("EVAL", _WATERMARK_LUA, 1, watermark_key(self.prefix), field, watermark, at))
            add = {pid: due for pid, due in entries.items() if due is not None}
            drop = [pid for pid, due in entries.items() if due is None]
            pipe.append(("ZADD", key, *_score_members(add)) if add else ("ECHO", "0"))
            pipe.append(("ZREM", key, *drop) if drop else ("ECHO", "0"))
            pipe.append(_due_command(key, watermark))

    @staticmethod
    def _due_lists(partitions: EndBatch, replies: list[Any]) -> dict[tuple[str, int], list[str]]:
        return {tp: list(replies[4 * i + 3]) for i, tp in enumerate(partitions)}

    async def close(self) -> None:
        """Close the connection pool."""
        await self._pipe.close()
        await self.client.aclose()


class MemoryStateStore:
    """The same state semantics as RedisStateStore, in process memory (for the agents' test harness)."""

    def __init__(self, prefix: str = "ts", clock: Callable[[], int] = now_ms) -> None:
        self.prefix = prefix
        self.clock = clock
        self.hashes: dict[str, dict[str, str]] = defaultdict(dict)
        self.strings: dict[str, str] = {}
        self.hlls: dict[str, set[str]] = defaultdict(set)
        self.zsets: dict[str, dict[str, int]] = defaultdict(dict)

    async def store_id(self) -> str:
        """This store's identity (one per store object, as `RedisStateStore.store_id` is one per Redis prefix)."""
        return f"memory-{id(self):x}"

    async def read(
        self, product_ids: list[str], now: dict[str, int] | None = None, *, counters: bool = True
    ) -> dict[str, ProductState]:
        """Read the state of every product (exact unique users per window at `now[pid]`; `beh` only with
        `counters`)."""
        now = now or {}
        out = {}
        for pid in product_ids:
            keys = ProductKeys(self.prefix, pid)
            users = self._users(pid, now[pid]) if pid in now else {}
            out[pid] = ProductState(
                pid,
                dict(self.hashes.get(keys.doc, {})),
                {k: int(v) for k, v in self.hashes.get(keys.beh, {}).items()} if counters else {},
                _decode_tags(self.strings.get(keys.tags)),
                {f: v for f, v in self.hashes.get(keys.fence, {}).items() if not f.startswith("emit:")},
                users,
            )
        return out

    async def stored_emits(self, fences: list[tuple[str, str]]) -> dict[tuple[str, str], bytes | None]:
        """The tag update each (product, `<topic>:<partition>`) last produced and kept for re-sending."""
        out: dict[tuple[str, str], bytes | None] = {}
        for pid, fence_field in fences:
            value = self.hashes.get(ProductKeys(self.prefix, pid).fence, {}).get(f"emit:{fence_field}")
            out[(pid, fence_field)] = value.encode() if value else None
        return out

    async def count_users(
        self, now: dict[str, int], batch: dict[str, list[set[str]]] | None = None
    ) -> dict[str, dict[str, int]]:
        """Exact unique users per window of each product at event time `now[pid]` (with `batch[pid]`'s users)."""
        batch = batch or {}
        return {pid: self._users(pid, at, batch.get(pid)) for pid, at in now.items()}

    def _users(self, product_id: str, now: int, batch: list[set[str]] | None = None) -> dict[str, int]:
        keys = ProductKeys(self.prefix, product_id)
        users = {}
        for i, g in enumerate(GRANULARITIES):
            seen: set[str] = set(batch[i]) if batch else set()
            for b in window_buckets(g, now):
                seen |= self.hlls.get(keys.hll(g.code, b), set())
            users[g.window] = len(seen)
        return users

    async def apply_and_end_batch(
        self, writes: list[Write], end_batch: EndBatch, produced_at: ProducedAt | None = None
    ) -> tuple[list[WriteResult], dict[tuple[str, int], list[str]]]:
        """`apply(writes)` then `end_batch(end_batch, produced_at)`."""
        return await self.apply(writes), await self.end_batch(end_batch, produced_at)

    async def apply_and_index(
        self, writes: list[Write], index: ActiveIndex, *, earlier_only: bool = False
    ) -> list[WriteResult]:
        """`apply(writes)` then `index_active` of every partition in `index`."""
        results = await self.apply(writes)
        for (topic, partition), entries in index.items():
            await self.index_active(topic, partition, entries, earlier_only=earlier_only)
        return results

    async def apply(self, writes: list[Write]) -> list[WriteResult]:
        """Apply the writes in order; each is a no-op if its offset was applied."""
        results = []
        for w in writes:
            fence = self.hashes[w.ops.keys[0]]
            rev = int(fence.get("rev", 0))
            if w.expect_rev is not None and rev != w.expect_rev:  # first, as state.lua: the write may be partly new
                results.append(WriteResult(False, rev=rev, conflict=True))
                continue
            stored = fence.get(w.fence_field)
            if stored is not None and int(stored) >= w.offset:
                emit = fence.get(f"emit:{w.fence_field}")
                results.append(WriteResult(False, emit.encode() if emit else None))
                continue
            beh = w.ops.keys[0].removesuffix("fence") + "beh"
            if w.expect_counters and not self.hashes.get(beh):
                results.append(WriteResult(False, rev=rev, conflict=True))
                continue
            for op in w.ops.ops:
                name, key, args = op[0], w.ops.keys[op[1] - 1], op[2:]
                if name == "hset":
                    self.hashes[key].update({args[i]: args[i + 1] for i in range(0, len(args), 2)})
                elif name == "hincrby":
                    h = self.hashes[key]
                    for i in range(0, len(args), 2):
                        h[args[i]] = str(int(h.get(args[i], 0)) + args[i + 1])
                elif name == "hdel":
                    for f in args:
                        self.hashes[key].pop(f, None)
                elif name == "set":
                    self.strings[key] = args[0]
                elif name == "del":
                    self.hashes.pop(key, None)
                    self.strings.pop(key, None)
                    self.hlls.pop(key, None)
                elif name == "pfadd":
                    self.hlls[key].update(args)
                elif name in ("pexpire", "pexpire_with_counters", "persist"):
                    pass  # no clock-driven expiry in memory
            fence[w.fence_field] = str(w.stored_offset)
            fence["rev"] = str(rev + 1)
            if w.emit:
                fence[f"emit:{w.fence_field}"] = w.emit.decode()
            results.append(WriteResult(True, rev=rev + 1))
        for (topic, partition), swept in _swept_by_partition(writes).items():
            zset = self.zsets[swept_key(self.prefix, topic, partition)]
            zset.update(swept)
            oldest = max(swept.values()) - SWEPT_KEEP_OFFSETS
            for pid in [p for p, offset in zset.items() if offset < oldest]:
                del zset[pid]
        kept = self.hashes[offsets_key(self.prefix)]
        for where, (offset, timestamp) in _input_offsets(writes).items():
            if where not in kept or parse_applied_offset(kept[where])[0] < offset:
                kept[where] = f"{offset}:{timestamp}"
        return results

    async def swept_since(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[str]]:
        """The products each partition's batches swept whose last offset there is at or after `offsets[tp]`."""
        out = {}
        for (topic, partition), offset in offsets.items():
            zset = self.zsets[swept_key(self.prefix, topic, partition)]
            out[(topic, partition)] = sorted((p for p, at in zset.items() if at >= offset), key=lambda p: (zset[p], p))
        return out

    async def index_active(
        self, topic: str, partition: int, entries: dict[str, int | None], *, earlier_only: bool = False
    ) -> None:
        """Record when each product's behaviour tags next need a look (None drops it; with `earlier_only` a look
        already indexed earlier stays)."""
        zset = self.zsets[active_key(self.prefix, topic, partition)]
        for pid, due in entries.items():
            if due is None:
                zset.pop(pid, None)
            else:
                zset[pid] = min(due, zset.get(pid, due)) if earlier_only else due

    async def due_lists(self, watermarks: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[str]]:
        """`due` of every partition at its watermark."""
        return {(t, p): await self.due(t, p, wm) for (t, p), wm in watermarks.items()}

    async def due(self, topic: str, partition: int, until: int) -> list[str]:
        """Products whose behaviour windows need a look at or before `until`."""
        zset = self.zsets[active_key(self.prefix, topic, partition)]
        return sorted((p for p, due in zset.items() if due <= until), key=lambda p: (zset[p], p))[:DUE_LIMIT]

    async def get_watermark(self, topic: str, partition: int) -> int:
        """Newest event time seen on a partition (0 if none)."""
        return int(self.hashes[watermark_key(self.prefix)].get(f"{topic}:{partition}", 0))

    async def end_batch(
        self, partitions: EndBatch, produced_at: ProducedAt | None = None
    ) -> dict[tuple[str, int], list[str]]:
        """Watermarks, active index and due lists of every partition (RedisStateStore._queue_end_batch)."""
        due = {}
        for (topic, partition), (watermark, entries) in partitions.items():
            await self.set_watermark(topic, partition, watermark, (produced_at or {}).get((topic, partition)))
            await self.index_active(topic, partition, entries)
            due[(topic, partition)] = await self.due(topic, partition, watermark)
        return due

    async def watermark_raised(self, topic: str, partition: int) -> tuple[int, int | None]:
        """A partition's watermark (0 if none) and when the record that raised it was produced (None if unknown)."""
        h = self.hashes[watermark_key(self.prefix)]
        watermark = int(h.get(f"{topic}:{partition}", 0))
        return watermark, _raised_at(watermark, h.get(f"{topic}:{partition}:raised"))

    async def set_watermark(self, topic: str, partition: int, ts: int, produced_at: int | None = None) -> None:
        """Raise a partition's watermark to `ts`, keeping with it when the record that raised it was produced
        (`produced_at`, else the store's clock)."""
        h = self.hashes[watermark_key(self.prefix)]
        field = f"{topic}:{partition}"
        if ts > int(h.get(field, 0)) or field not in h:
            h[field] = str(ts)
            h[f"{field}:raised"] = f"{ts}:{produced_at or self.clock()}"

    async def close(self) -> None:
        """Nothing to close."""
