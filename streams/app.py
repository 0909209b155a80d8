"""The Faust app: topics declared once, one agent per input topic, micro-batches acknowledged only when done.

Every agent runs at concurrency 1 (its effects are offset-fenced in Redis; faust #606 can commit past an unfinished
message at higher concurrency) and acknowledges a batch only after its state is stored and its tag updates and dead
letters are delivered (acks=all, idempotent producer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
import mode
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from redis.exceptions import OutOfMemoryError

from streams.arrival import AT_FETCH, ArrivalAges
from streams.gcwatch import GcPauses
from streams.locks import ProductLocks
from streams.model import ModelHolder
from streams.processor import BatchOutput, InMessage, Processor, now_ms
from streams.settings import DEV_USER_HASH_KEY, WorkerSettings
from streams.state import RedisStateStore, StateStore
from streams.ticks import Ticker
from streams.topics import (
    BEHAVIOR,
    DEAD_LETTER,
    DEAD_LETTER_MAX_BYTES,
    MODEL_UPDATES,
    PRODUCTS,
    TAG_UPDATES,
    TOPICS,
    partition_counts,
    partitions_of,
    refuse_if_input_partitions_differ,
)
from streams.transport import RecordBatchMessage, TagstreamTransport
from tagstream.errors import (
    ConfigError,
    DeliveryError,
    StateError,
    StateLostError,
    StoreMismatchError,
    TopicsRecreatedError,
)

log = logging.getLogger(__name__)

# Faust pauses a stream's partitions once its buffer holds maxsize / 1.25 messages and resumes them at 40%; each
# pause cost ~100 ms of latency here (at 4,000 events/s, a 32-message buffer paused every ~120 ms: p50/p99 73/163 ms;
# 128 never paused: 20/76 ms). A fetched batch holds one record to a whole 1 MB fetch, so the buffer is sized never
# to fill and memory is bounded by records instead (`TagstreamApp.max_buffered_records`, see FastConsumer).
FETCHED_BATCHES_BUFFERED = 1024

# an agent's two batch steps, (process, prepare), as its processor gives them
BatchSteps = tuple[Callable[..., Awaitable[BatchOutput]], Callable[[Sequence[InMessage]], Awaitable[Any]]]


class TagstreamApp(faust.App):
    """A Faust app on TagstreamTransport: idempotent acks=all producer, cheaper message hand-off, and the records of
    `batched_topics` delivered as one `RecordBatchMessage` per partition and fetch, fetched only while the batch
    agents' buffers hold fewer than `max_buffered_records` records."""

    batched_topics: frozenset[str] = frozenset()
    max_buffered_records: int = 20_000
    fetch_min_bytes: int = 1  # aiokafka's defaults until the worker sets its own
    fetch_max_wait_ms: int = 1500  # what Faust passes
    fetch_idle_wait_ms: int = 0  # no long poll while idle until the worker sets it
    commit_metadata: str = ""  # committed with every input offset once the worker knows its store (SPEC.md §3)
    consumer_thread: bool = True  # Faust's consumer thread until the worker sets it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record_queues: list[Any] = []  # the batch agents' stream buffers
        self.records_taken = asyncio.Event()  # set whenever a batch agent takes a message from its buffer
        self.buffered_high_water = 0  # the most records the batch agents' buffers held when a fetch was due

    def buffered_records(self) -> int:
        """Records waiting in the batch agents' buffers (a RecordBatchMessage counts its records)."""
        return sum(
            len(getattr(event.message, "records", ())) or 1 for queue in self.record_queues for event in queue._queue
        )

    def _new_transport(self) -> TagstreamTransport:
        return TagstreamTransport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> TagstreamTransport:
        return TagstreamTransport(self.conf.broker_producer, self)


COMMIT_METADATA_PREFIX = "tagstream-store:"
GROUP_CHECK_S = 10.0  # longest a request of the check of the group's commits waits for Kafka


def commit_metadata(store_id: str, redis_prefix: str) -> str:
    """The metadata a worker commits with its input offsets: the Redis store its batches wrote (SPEC.md §3)."""
    return f"{COMMIT_METADATA_PREFIX}{store_id}:{redis_prefix}"


def committed_store(metadata: str | None) -> tuple[str, str] | None:
    """(store id, Redis prefix) a commit's metadata names; None for a commit of an older worker or of a tool."""
    if not metadata or not metadata.startswith(COMMIT_METADATA_PREFIX):
        return None
    store_id, _, prefix = metadata[len(COMMIT_METADATA_PREFIX) :].partition(":")
    return store_id, prefix


async def _input_commits(settings: WorkerSettings, timeout_s: float = GROUP_CHECK_S) -> dict[Any, Any]:
    """The worker's consumer group's commits (offset and metadata) on its input topics, by TopicPartition; a
    KafkaError when Kafka does not answer a request within `timeout_s` (so the check ends by itself, its client
    closed, rather than by its caller's cancel)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="tagstream-state-check",
        request_timeout_ms=max(1, int(timeout_s * 1000)),
    )
    try:  # a start cut short (a Kafka that never answers, the caller's timeout) closes its connections too
        await admin.start()
        offsets = await admin.list_consumer_group_offsets(settings.app_id)
    finally:
        await admin.close()
    inputs = {settings.topic(PRODUCTS.name), settings.topic(BEHAVIOR.name)}
    return {tp: m for tp, m in offsets.items() if tp.topic in inputs}


async def committed_input_offsets(settings: WorkerSettings, commits: dict[Any, Any] | None = None) -> dict[str, int]:
    """The offsets the worker's consumer group has committed on its input topics (products, behavior), by
    `topic:partition`, where they are past the partition's first offset: a partition without a commit, or whose
    commit is at (or before) its first record, as after a reset to the earliest, has applied nothing still there.
    `commits`: the group's commits when the caller read them already (`_input_commits`)."""
    from aiokafka import AIOKafkaConsumer

    if commits is None:
        commits = await _input_commits(settings)
    committed = {tp: m.offset for tp, m in commits.items() if m.offset > 0}
    if not committed:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    try:
        await consumer.start()
        first = await consumer.beginning_offsets(list(committed))  # retention moves them up
    finally:
        await consumer.stop()
    return {f"{tp.topic}:{tp.partition}": at for tp, at in committed.items() if at > first[tp]}


async def stores_of_the_group(settings: WorkerSettings, timeout_s: float = GROUP_CHECK_S) -> dict[str, tuple[str, str]]:
    """The Redis store (id, prefix) each input partition's last commit by the worker's consumer group names, by
    `topic:partition` (partitions committed by older workers, which name none, left out)."""
    return _stores_named(await _input_commits(settings, timeout_s))


def _stores_named(commits: dict[Any, Any]) -> dict[str, tuple[str, str]]:
    """`stores_of_the_group` of commits already read."""
    named = {f"{tp.topic}:{tp.partition}": committed_store(m.metadata) for tp, m in commits.items()}
    return {where: store for where, store in named.items() if store is not None}


async def refuse_if_group_writes_another_store(store_id: str, settings: WorkerSettings) -> None:
    """StoreMismatchError when the worker's consumer group committed input offsets for another Redis store than
    this worker's: its workers were given different TAGSTREAM_REDIS_URL or TAGSTREAM_REDIS_PREFIX values, and each
    store holds only the events of the partitions its workers happened to own."""
    others = {where: store for where, store in (await stores_of_the_group(settings)).items() if store[0] != store_id}
    if not others:
        return
    named = ", ".join(sorted({f"prefix {prefix!r}, store id {other}" for other, prefix in others.values()}))
    same_prefix = any(prefix == settings.redis_prefix for _, prefix in others.values())
    raise StoreMismatchError(
        f"consumer group {settings.app_id!r} has committed offsets for another Redis store ({named}; "
        f"{_a_few(sorted(others))}) than this worker's (prefix {settings.redis_prefix!r}, store id {store_id}): the "
        "group's workers write to different stores (their TAGSTREAM_REDIS_URL or TAGSTREAM_REDIS_PREFIX differ"
        + (", or this store lost its id: restored from a backup older than those commits" if same_prefix else "")
        + "), so each store lacks the events the other applied. Give every worker of the group the TAGSTREAM_REDIS_URL "
        "and TAGSTREAM_REDIS_PREFIX of the store that is to hold the state, then start the group again from the "
        "earliest offsets: reset them (kafka-consumer-groups.sh --reset-offsets --to-earliest) or set a new "
        "TAGSTREAM_APP_ID. The offset fences skip what that store applied, so nothing counts twice, and it takes "
        "what the other store took, but for events of partitions it owned again after them; with a new, empty "
        "TAGSTREAM_REDIS_PREFIX too, it is rebuilt whole"
    )


def _a_few(items: Iterable[str], n: int = 3) -> str:
    """The first `n` items, comma-separated, and how many more there are."""
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


async def check_state_not_lost(store: RedisStateStore, settings: WorkerSettings) -> None:
    """StateLostError when Redis holds no state under the worker's prefix while its consumer group has committed
    offsets on the input topics: what those events built is gone (a Redis restarted without persistence, a flushed
    database, another TAGSTREAM_REDIS_PREFIX), and the worker would resume after them on an empty store, taking every
    product's next change for its first."""
    if not await store.holds_state():
        await refuse_if_offsets_committed(settings)


async def refuse_if_offsets_committed(settings: WorkerSettings) -> None:
    """StateLostError when the worker's consumer group has committed offsets on the input topics (the store was
    found empty)."""
    commits = await _input_commits(settings)  # one read of the group's commits: their offsets and their stores
    committed = await committed_input_offsets(settings, commits)
    if not committed:
        return
    shown = _a_few(f"{where} at {offset}" for where, offset in sorted(committed.items()))
    stores = _stores_named(commits)
    named = sorted({repr(prefix) for _, prefix in stores.values() if prefix != settings.redis_prefix})
    if named:  # most likely a worker given another prefix or Redis than its group's
        raise StateLostError(
            f"Redis holds no tagstream state under prefix {settings.redis_prefix!r} (no "
            f"{settings.redis_prefix}:meta), but consumer group {settings.app_id!r} has committed offsets ({shown}) "
            f"for the store under prefix {', '.join(named)}: give this worker the TAGSTREAM_REDIS_URL and "
            "TAGSTREAM_REDIS_PREFIX its group's other workers use. If that store is this one and it was lost, "
            "restore Redis (its append-only file), or rebuild the state by replaying the topics: start with a new "
            "TAGSTREAM_APP_ID and a new TAGSTREAM_REDIS_PREFIX"
        )
    raise StateLostError(
        f"Redis holds no tagstream state under prefix {settings.redis_prefix!r} (no {settings.redis_prefix}:meta), "
        f"but consumer group {settings.app_id!r} has committed offsets ({shown}): the state those events built "
        "was lost, and resuming would apply only what comes after them. Restore Redis (its append-only file), check "
        "that TAGSTREAM_REDIS_URL and TAGSTREAM_REDIS_PREFIX are the ones the state was written with, or "
        "rebuild the state by replaying the topics into an empty prefix: start with a new TAGSTREAM_APP_ID (a new "
        "consumer group reads the topics from the start) and a new TAGSTREAM_REDIS_PREFIX (the lookup too), or "
        f"delete the keys under {settings.redis_prefix!r} first (keys a worker wrote after the loss would fence "
        "the replayed events out)"
    )


async def refuse_if_redis_evicts(store: RedisStateStore) -> None:
    """StateError when Redis may evict keys: counters, fences and product records would vanish silently (clicks
    lost, or counted twice once a fence is gone)."""
    problem = await store.eviction_problem()
    if problem:
        raise StateError(
            f"Redis may evict tagstream's state ({problem}): counters, offset fences and product records would be "
            "lost without a word (clicks lost, or counted twice). Set maxmemory-policy noeviction (SPEC.md §3)"
        )


def state_lost_while_running(settings: WorkerSettings) -> StateLostError:
    """The error a running worker stops with when `<prefix>:meta` vanished under it."""
    return StateLostError(
        f"Redis lost tagstream's state under prefix {settings.redis_prefix!r} while this worker ran "
        f"({settings.redis_prefix}:meta is gone: Redis restarted without its data, flushed, or evicted): writing on "
        "would leave wrong counters and tags. The worker stops; see the error it gives at its next start"
    )


MISSING_TOPIC_LOG_EVERY_S = 10.0  # at most one line per missing topic this often (`MissingTopicFilter`)


class MissingTopicFilter(logging.Filter):
    """On aiokafka's `aiokafka.cluster` logger: its `Topic <name> not found in cluster metadata` ERROR, which a
    producer waiting to deliver to a deleted topic repeats at every metadata retry (up to ~1,600 lines a second),
    becomes one ERROR per topic at most every `every_s` naming the remedy; repeats in between are dropped."""

    NOT_FOUND = "Topic %s not found in cluster metadata"

    def __init__(self, every_s: float = MISSING_TOPIC_LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}  # topic -> when its last line was let through
        self.dropped: dict[str, int] = {}  # topic -> lines dropped since its last line

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.NOT_FOUND or not isinstance(record.args, tuple) or len(record.args) != 1:
            return True
        topic = str(record.args[0])
        now = self.clock()
        last = self._last.get(topic)
        if last is not None and now - last < self.every_s:
            self.dropped[topic] = self.dropped.get(topic, 0) + 1
            return False
        self._last[topic] = now
        dropped = self.dropped.pop(topic, 0)
        record.msg = (
            "Kafka has no topic %s (deleted, or never created): `tagstream topics` creates it. Until it exists, "
            "nothing is read from it, and a batch that sends to it waits, unacknowledged (nothing is lost)%s"
        )
        record.args = (topic, f"; {dropped} repeats of this line left out" if dropped else "")
        return True


_missing_topic_filter = MissingTopicFilter()


def install_missing_topic_filter() -> MissingTopicFilter:
    """Put the process's `MissingTopicFilter` on aiokafka's cluster logger (once, however many workers)."""
    logger = logging.getLogger("aiokafka.cluster")
    if _missing_topic_filter not in logger.filters:
        logger.addFilter(_missing_topic_filter)
    return _missing_topic_filter


STATE_WATCH_S = 1.0  # how often a running worker checks that its Redis state is still there
EVICTION_CHECK_EVERY = 30  # state watches between two checks of Redis's eviction policy
TOPICS_CHECK_S = 30.0  # longest a worker's start waits for Kafka to say whether it holds the records Redis applied


async def reused_input_offsets(applied: dict[str, tuple[int, int | None]], settings: WorkerSettings) -> dict[str, str]:
    """The input partitions (`topic:partition` of products, behavior) whose records Redis applied are not the ones
    Kafka holds now, each with why: the offset applied lies at or past the partition's end, or the partition does not
    exist, or the record at that offset has another Kafka timestamp than the one applied. `applied`: offset and
    timestamp (None: unknown) per partition, as `P:offsets` keeps them. A partition's end moves back only when its
    topic is deleted and made again, or when the broker loses the end of its log (an unclean leader election, a
    crash before it reached the disk); retention and deleted records move its start."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    inputs = {settings.topic(PRODUCTS.name), settings.topic(BEHAVIOR.name)}
    mine: dict[Any, tuple[int, int | None]] = {}
    for where, at in applied.items():
        topic, _, partition = where.rpartition(":")
        if topic in inputs and partition.isdigit():
            mine[TopicPartition(topic, int(partition))] = at
    if not mine:
        return {}
    counts = await partition_counts(settings.kafka_bootstrap, (tp.topic for tp in mine), "tagstream-state-check")
    reused = {}
    exist = []
    for tp, (offset, _) in mine.items():
        if tp.partition < counts[tp.topic]:
            exist.append(tp)
        else:
            reused[tp] = f"applied up to {offset}, which does not exist"
    if exist:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
        try:
            await consumer.start()  # inside: a check cancelled while it starts stops its client too
            ends = await consumer.end_offsets(exist)
            starts = await consumer.beginning_offsets(exist)
            check = {}
            for tp in exist:
                offset, timestamp = mine[tp]
                if offset >= ends[tp]:
                    reused[tp] = f"applied up to {offset}, which ends at {ends[tp]}"
                elif timestamp is not None and offset >= starts[tp]:  # else retention removed it: nothing to compare
                    check[tp] = (offset, timestamp)
            for tp, found in (await _timestamps_at(consumer, {tp: o for tp, (o, _) in check.items()})).items():
                offset, timestamp = check[tp]
                if found is not None and found != timestamp:
                    reused[tp] = f"whose record at {offset} was produced at {found}, not at {timestamp} as applied"
        finally:
            await consumer.stop()
    return {f"{tp.topic}:{tp.partition}": why for tp, why in reused.items()}


async def _timestamps_at(consumer: Any, offsets: dict[Any, int]) -> dict[Any, int | None]:
    """The Kafka timestamp of the record at each partition's offset (None when no record is there: a gap)."""
    out: dict[Any, int | None] = {}
    if not offsets:
        return out
    consumer.assign(list(offsets))
    for tp, offset in offsets.items():
        consumer.seek(tp, offset)
        records = (await consumer.getmany(tp, timeout_ms=5000, max_records=1)).get(tp, [])
        out[tp] = records[0].timestamp if records and records[0].offset == offset else None
    return out


async def refuse_if_topics_recreated(store: RedisStateStore, settings: WorkerSettings) -> None:
    """TopicsRecreatedError when the records Redis applied are not the ones Kafka's input topics hold now: their new
    events would be taken for redeliveries of the old ones (fenced out, so never applied)."""
    reused = await reused_input_offsets(await store.applied_offsets(), settings)
    if not reused:
        return
    shown = _a_few(f"{where} {why}" for where, why in sorted(reused.items()))
    raise TopicsRecreatedError(
        f"Redis holds tagstream state under prefix {settings.redis_prefix!r} applied from records Kafka "
        f"({settings.kafka_bootstrap}) no longer holds ({shown}): the topics were deleted and made again (or "
        "this is another Kafka cluster, or the broker lost the end of its logs in a crash), and their new events "
        "would be taken for ones already applied and skipped. The state belongs to the old records: start on a new "
        "TAGSTREAM_REDIS_PREFIX (or delete the old prefix's keys) and send the catalog again"
    )


async def check_state_store(settings: WorkerSettings, wait_s: float = 5.0) -> bool:
    """Before a worker starts: the Redis store holds a state format this worker reads (StateError otherwise, so the
    refusal is one line instead of a crash inside the agents), was not lost (`check_state_not_lost`) and was applied
    from the records Kafka holds (`refuse_if_topics_recreated`). Returns whether every check ran: a Redis that does
    not answer within `wait_s`, or a Kafka that does not answer, leaves them to the worker, which runs them when it
    first uses its store (an empty store's format is then not written here, so the worker's own check still runs)."""
    store = RedisStateStore.from_url(
        settings.redis_url.get_secret_value(), settings.redis_prefix, settings.redis_retry_max_backoff
    )
    try:
        if not await asyncio.wait_for(store.holds_state(), wait_s):
            try:
                await asyncio.wait_for(refuse_if_offsets_committed(settings), wait_s)
            except (KafkaError, TimeoutError) as exc:
                log.warning("Kafka did not answer (%r): the worker checks its group's offsets once it reaches it", exc)
                return False
        else:
            try:
                await asyncio.wait_for(refuse_if_topics_recreated(store, settings), TOPICS_CHECK_S)
            except (KafkaError, TimeoutError) as exc:
                log.warning("Kafka did not answer (%r): the worker checks its topics' offsets once it reaches it", exc)
                return False
        await asyncio.wait_for(store.check_format(), wait_s)
        await asyncio.wait_for(refuse_if_redis_evicts(store), wait_s)
        store_id = await asyncio.wait_for(store.store_id(), wait_s)
        try:
            await asyncio.wait_for(refuse_if_group_writes_another_store(store_id, settings), TOPICS_CHECK_S)
        except (KafkaError, TimeoutError) as exc:
            log.warning("Kafka did not answer (%r): the worker checks its group's store once it reaches it", exc)
            return False
        return True
    except TimeoutError:
        log.warning("Redis did not answer within %gs: its state format is checked once the worker reaches it", wait_s)
        return False
    finally:
        await store.close()


@dataclass(slots=True)
class WorkerStats:
    """Counters a running worker keeps (logged periodically, read by tests and benchmarks)."""

    consumed: int = 0
    updates: int = 0
    dead_letters: int = 0
    redelivered: int = 0
    stale: int = 0  # product changes ignored: a lower version than the one applied
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    arrival: ArrivalAges = field(default_factory=ArrivalAges)  # record ages when their batch starts, per topic
    fetched: ArrivalAges = field(default_factory=lambda: ArrivalAges(AT_FETCH))  # and when they were fetched


class Worker:
    """A tagstream worker: the Faust app, its topics and agents, state store, model and processor."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        store_factory: Callable[[], StateStore] | None = None,
        model_holder: ModelHolder | None = None,
        capture_output: bool = False,
        store_checked: bool = False,
    ) -> None:
        """`capture_output=True` keeps the tag updates and dead letters in `self.captured` instead of sending them
        (the in-memory harness: `agent.test_context()` with a MemoryStateStore needs no broker at all).
        `store_checked`: `check_state_store` ran every check just before, so the worker does not repeat them."""
        self.settings = settings
        self.store_checked = store_checked
        self.store_id: str | None = None  # the Redis store's id (`<prefix>:meta`), committed with the offsets
        self._delivery_error: DeliveryError | None = None  # a batch's records were refused: why the worker stops
        self._crashing: asyncio.Future[None] | None = None  # the crash that stops it
        self.capture_output = capture_output
        self.captured: dict[str, list[tuple[bytes | None, bytes]]] = {TAG_UPDATES.name: [], DEAD_LETTER.name: []}
        if settings.user_hash_key.get_secret_value() == DEV_USER_HASH_KEY:
            log.warning("TAGSTREAM_USER_HASH_KEY is the development default; set a secret key in production")
        self.stats = WorkerStats()
        self._logged_counters: tuple[int, ...] = ()  # the counters `log_stats` last logged
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tagstream-model")  # model loads
        self.models = model_holder or ModelHolder(settings, self.executor)
        self._store_factory = store_factory or (
            lambda: RedisStateStore.from_url(
                settings.redis_url.get_secret_value(),
                settings.redis_prefix,
                settings.redis_retry_max_backoff,
                behaviour_ttl_ms=settings.behaviour_ttl_s * 1000,
            )
        )
        self._processor: Processor | None = None
        self._state_watches = 0  # checks made by `watch_state_store`
        # Open while the input topics are known to hold the records Redis applied; closed from a rebalance until the
        # new assignment's check (`check_inputs_after_rebalance`) passes: the agents wait for it before each batch.
        self._inputs_checked = asyncio.Event()
        self._inputs_checked.set()  # the first assignment: `processor` and `check_state_store` check at start
        self._inputs_check: asyncio.Future[None] | None = None  # the running check of the latest assignment
        self._missing_inputs: set[str] = set()  # input topics Kafka no longer lists (warned once each)
        self._ready_lock = asyncio.Lock()
        self.locks = ProductLocks()  # products held by the batches in progress (shared with the processor)
        self.gc = GcPauses(settings.gc_thresholds)  # installed by `tagstream worker` (process-wide)
        settings.data_dir.expanduser().mkdir(parents=True, exist_ok=True)  # Faust makes only its own dir in it
        self.app = TagstreamApp(
            settings.app_id,
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            datadir=str(settings.data_dir.expanduser() / "{conf.name}"),
            web_enabled=settings.web_port is not None,
            web_port=settings.web_port or 6066,
            topic_partitions=settings.partitions,
            topic_allow_declare=False,
            topic_disable_leader=True,
            producer_acks=-1,
            producer_max_request_size=DEAD_LETTER_MAX_BYTES,  # a dead letter of the largest event an input takes
            # An agent that fails (a delivery that failed, a record nothing can take) stops the worker instead of
            # being restarted in the process: its unacknowledged events would leave a hole in the acknowledged
            # offsets, which Faust either commits past (a lost event) or never commits past (a stalled partition).
            # A restarted process gets them again from the last commit, offset-fenced.
            agent_supervisor=mode.CrashingSupervisor,
            consumer_auto_offset_reset=settings.auto_offset_reset,
            consumer_metadata_max_age_ms=int(settings.metadata_max_age_s * 1000),
            broker_session_timeout=settings.session_timeout,
            broker_heartbeat_interval=min(3.0, settings.session_timeout / 3),
            broker_commit_every=1000,
            broker_commit_interval=0.5,
            stream_wait_empty=False,
            consumer_max_fetch_size=settings.fetch_max_partition_bytes,
            # a buffered fetched batch holds up to a whole fetch of a partition (see FETCHED_BATCHES_BUFFERED)
            stream_buffer_maxsize=FETCHED_BATCHES_BUFFERED if settings.fetch_batches else 4096,
        )
        self.topics = {
            spec.name: self.app.topic(
                settings.topic(spec.name),
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=partitions_of(spec, settings),
            )
            for spec in TOPICS
        }
        self.app.fetch_min_bytes, self.app.fetch_max_wait_ms = settings.fetch_min_bytes, settings.fetch_max_wait_ms
        self.app.fetch_idle_wait_ms = settings.fetch_idle_wait_ms
        self.app.consumer_thread = settings.consumer_thread
        if settings.fetch_batches:
            self.app.batched_topics = frozenset(settings.topic(spec.name) for spec in (PRODUCTS, BEHAVIOR))
            self.app.max_buffered_records = settings.max_buffered_records
        self.ticker = (
            Ticker(
                self.topics[BEHAVIOR.name].get_topic_name(),
                idle_ms=int(settings.tick_idle_s * 1000),
                live_ms=int(settings.tick_live_s * 1000),
                worker_id=settings.worker_id,
                store=self._store,
                send=self._send_one,
            )
            if settings.tick_idle_s > 0
            else None
        )
        self._define_agents()
        self.app.on_before_shutdown.connect(self._log_figures_at_shutdown)
        install_missing_topic_filter()

    def _log_run_figures(self) -> None:
        """Log the record ages at fetch and at batch start, the agents' buffer high-water mark and, when installed,
        the collector's pauses, over the run so far."""
        log.info(self.stats.fetched.summary())
        log.info(self.stats.arrival.summary())
        log.info(
            "agents' buffers held at most %d records before a fetch (bound %d)",
            self.app.buffered_high_water,
            self.app.max_buffered_records,
        )
        if self.gc.installed:
            log.info(self.gc.summary())

    def log_stats(self) -> bool:
        """Log the worker's counters and figures (every 10 s) when they changed since the last time: an idle worker
        logs nothing. Returns whether it logged."""
        stats = self.stats
        counters = (stats.consumed, stats.batches, stats.updates, stats.dead_letters, stats.redelivered, stats.stale)
        if not stats.batches or counters == self._logged_counters:
            return False
        self._logged_counters = counters
        mean = sum(stats.batch_sizes) / max(len(stats.batch_sizes), 1)
        log.info(
            "consumed %d in %d batches (mean of last %d: %.1f), %d tag updates, %d dead letters, %d redelivered, "
            "%d stale product changes ignored (a lower version than the one applied)",
            stats.consumed,
            stats.batches,
            len(stats.batch_sizes),
            mean,
            stats.updates,
            stats.dead_letters,
            stats.redelivered,
            stats.stale,
        )
        self._log_run_figures()
        processor = self._processor
        if processor is not None and processor.cache is not None:
            cache = processor.cache
            looked = cache.hits + cache.misses
            log.info(
                "state cache: %d products kept, %.1f%% of reads kept, %d batches redone after a conflict",
                len(cache),
                100 * cache.hits / looked if looked else 0.0,
                processor.conflicts,
            )
        return True

    async def _log_figures_at_shutdown(self, app: faust.App, **kwargs: Any) -> None:
        self._log_run_figures()  # the whole run's: benchmarks read these last lines

    # ---------------------------------------------------------------- startup
    async def processor(self) -> Processor:
        """The processor, created on first use inside the running event loop (connects Redis, loads the model)."""
        async with self._ready_lock:
            if self._processor is None:
                log.info("event loop: %s", type(asyncio.get_running_loop()).__module__)
                store = self._store_factory()
                if isinstance(store, RedisStateStore) and not self.store_checked:
                    await check_state_not_lost(store, self.settings)
                    try:
                        await asyncio.wait_for(refuse_if_topics_recreated(store, self.settings), TOPICS_CHECK_S)
                    except (KafkaError, TimeoutError) as exc:  # a guard: the worker runs on without it
                        log.warning("could not check that Kafka holds the records Redis applied (%r)", exc)
                    await store.check_format()
                    await refuse_if_redis_evicts(store)
                if isinstance(store, RedisStateStore):
                    self.store_id = await store.store_id()
                    if not self.store_checked:
                        await self._check_group_store(self.store_id)
                    self.app.commit_metadata = commit_metadata(self.store_id, store.prefix)
                await self.models.start()
                self._processor = Processor(
                    store,
                    user_hash_key=self.settings.user_hash_key.get_secret_value().encode(),
                    score_delta=self.settings.score_delta,
                    score_step=self.settings.score_step,
                    model_provider=self.models.get,
                    behaviour_lanes=self.settings.behaviour_lanes,
                    lane_min_events=self.settings.behaviour_lane_min_events,
                    state_cache=self.settings.state_cache,
                    state_cache_bytes=int(self.settings.state_cache_mb * 2**20),
                    locks=self.locks,
                    max_event_ahead_ms=self.settings.max_event_ahead_ms,
                    behaviour_topic=self.settings.topic("behavior"),
                )
            return self._processor

    async def _check_group_store(self, store_id: str) -> None:
        """`refuse_if_group_writes_another_store`; Kafka not answering is a warning (the next check runs it)."""
        try:
            await asyncio.wait_for(refuse_if_group_writes_another_store(store_id, self.settings), TOPICS_CHECK_S)
        except (KafkaError, TimeoutError) as exc:  # a guard: the worker runs on without it
            log.warning("could not check which store the consumer group's commits name (%r)", exc)

    async def _store(self) -> StateStore:
        return (await self.processor()).store

    async def _send_one(self, topic: str, partition: int, key: bytes, value: bytes) -> None:
        """Produce one record to a given partition and wait until Kafka has it (acks=all)."""
        delivered = await self.app.producer.send(topic, key, value, partition=partition, timestamp=None, headers=None)
        await delivered

    async def watch_state_store(self) -> StateError | None:
        """Why the worker must stop writing to its Redis store, checked every STATE_WATCH_S once it runs: its state
        vanished (`<prefix>:meta` gone), or (every EVICTION_CHECK_EVERY checks) Redis was set to evict keys. None
        when all is well or Redis does not answer (the write path retries and logs that)."""
        store = self._processor.store if self._processor is not None else None
        if not isinstance(store, RedisStateStore):
            return None
        self._state_watches += 1
        try:
            if not await asyncio.wait_for(store.client.exists(f"{store.prefix}:meta"), STATE_WATCH_S):
                return state_lost_while_running(self.settings)
            if self._state_watches % EVICTION_CHECK_EVERY == 0:
                await asyncio.wait_for(refuse_if_redis_evicts(store), STATE_WATCH_S)
                if self.store_id is not None:  # workers of the group started together on different stores
                    await asyncio.wait_for(
                        refuse_if_group_writes_another_store(self.store_id, self.settings), 2 * GROUP_CHECK_S
                    )
        except StateError as exc:
            return exc
        except Exception as exc:  # Redis away or loading: nothing is known
            log.debug("state watch: %s: %s", type(exc).__name__, exc)
        return None

    def inputs_rebalancing(self) -> None:
        """A rebalance began: no batch is processed until the next assignment's check passes (an older check still
        running is cancelled: it must not open the gate for the assignment to come)."""
        self._inputs_checked.clear()
        if self._inputs_check is not None:
            self._inputs_check.cancel()

    def inputs_assigned(self, assigned: Any) -> asyncio.Future[None]:
        """Partitions were assigned: close the gate (the agents wait before their next batch), warn of an input
        topic Kafka no longer lists, and check again that the input topics hold the records Redis applied
        (`check_inputs_after_rebalance`, run as a task: Faust's recovery resumes fetching without waiting for the
        `on_partitions_assigned` handlers, so the gate, not the handler, keeps records of the new assignment out)."""
        self._inputs_checked.clear()
        if self._inputs_check is not None:
            self._inputs_check.cancel()  # an older assignment's: this one's check replaces it
        self._warn_of_missing_inputs()
        self._inputs_check = asyncio.ensure_future(self.check_inputs_after_rebalance())
        return self._inputs_check

    def _warn_of_missing_inputs(self) -> None:
        consumer = self.app.consumer
        for spec in (PRODUCTS, BEHAVIOR):
            name = self.settings.topic(spec.name)
            try:
                count = consumer.topic_partitions(name)
            except Exception:  # a consumer not started: nothing known
                continue
            if count is None:
                continue
            if count == 0 and name not in self._missing_inputs:
                self._missing_inputs.add(name)
                log.warning(
                    "input topic %s was deleted under this running worker: its events are not read until it exists "
                    "again. The state in Redis was applied from its old records, so once this worker sees the topic "
                    "made again (`tagstream topics`; within TAGSTREAM_METADATA_MAX_AGE_S, %gs) it stops with "
                    "TopicsRecreatedError, as a worker starting on it refuses to, instead of taking the new events "
                    "for ones already applied",
                    name,
                    self.settings.metadata_max_age_s,
                )
            elif count:
                self._missing_inputs.discard(name)

    async def check_inputs_after_rebalance(self) -> None:
        """After a rebalance: the input topics still hold the records Redis applied (`refuse_if_topics_recreated`)
        and have TAGSTREAM_PARTITIONS partitions each (`refuse_if_input_partitions_differ`), else the error is
        logged (one ERROR line) and the app crashes, the gate left closed so that no record of the new topics (or
        partitions) is applied or acknowledged. Kafka not answering is a warning, as at start: the worker runs on."""
        try:
            store = (await asyncio.shield(self.processor())).store  # a newer assignment's cancel spares its start
            if isinstance(store, RedisStateStore):
                try:
                    await asyncio.wait_for(refuse_if_topics_recreated(store, self.settings), TOPICS_CHECK_S)
                except (KafkaError, TimeoutError) as exc:  # a guard: the worker runs on without it
                    log.warning("could not check that Kafka holds the records Redis applied (%r)", exc)
                if self.store_id is not None:
                    await self._check_group_store(self.store_id)
            try:  # partitions added to one input topic under running workers: they rebalance onto it
                await asyncio.wait_for(refuse_if_input_partitions_differ(self.settings), TOPICS_CHECK_S)
            except (KafkaError, TimeoutError) as exc:  # a guard: the worker runs on without it
                log.warning("could not check the input topics' partition counts (%r)", exc)
        except (StateError, ConfigError) as exc:
            log.error("%s", exc)
            await self.app.crash(exc)
            return
        except Exception as exc:  # the processor could not start: the agents, which start it too, fail with it
            log.debug("input check after a rebalance: %s: %s", type(exc).__name__, exc)
        self._inputs_checked.set()

    async def _inputs_check_passed(self) -> None:
        """Wait, before a batch, until the current assignment's input check passed (at once when it has)."""
        if not self._inputs_checked.is_set():
            await self._inputs_checked.wait()

    async def tick_quiet_partitions(self) -> list[int]:
        """A window tick to each behaviour partition this worker owns that needs one (`streams.ticks`); a failure
        is logged, and the next check tries again."""
        if self.ticker is None:
            return []
        topic = self.ticker.topic
        try:
            owned = [tp.partition for tp in self.app.consumer.assignment() if tp.topic == topic]
            return await self.ticker.check(owned, now_ms())
        except Exception as exc:  # Redis or Kafka away for a moment: the partitions stay quiet until the next check
            log.warning("window ticks: %s: %s", type(exc).__name__, exc)
            return []

    # ----------------------------------------------------------------- agents
    def _define_agents(self) -> None:
        app, topics = self.app, self.topics

        @app.agent(topics[PRODUCTS.name], name="tagstream.products", concurrency=1)
        async def products(stream: faust.StreamT) -> None:
            await self._run_batches(stream, self._product_steps)

        @app.agent(topics[BEHAVIOR.name], name="tagstream.behavior", concurrency=1)
        async def behavior(stream: faust.StreamT) -> None:
            await self._run_batches(stream, self._behaviour_steps)

        if self.ticker is not None:

            @app.timer(max(0.5, min(self.settings.tick_idle_s / 4, 15.0)))
            async def tick_quiet_partitions() -> None:
                await self.tick_quiet_partitions()

        @app.timer(10.0)
        async def log_stats() -> None:
            self.log_stats()

        @app.timer(STATE_WATCH_S)
        async def watch_state_store() -> None:
            problem = await self.watch_state_store()
            if problem is not None:
                log.error("%s", problem)
                await app.crash(problem)

        @app.on_partitions_revoked.connect
        async def forget_kept_states(app: faust.App, revoked: Any, **kwargs: Any) -> None:
            # another worker may own these products now: read them again (expect_rev would catch it anyway)
            self.inputs_rebalancing()
            if self._processor is not None and self._processor.cache is not None:
                self._processor.cache.clear()

        @app.on_partitions_assigned.connect
        async def check_inputs(app: faust.App, assigned: Any, **kwargs: Any) -> None:
            self.inputs_assigned(assigned)

        self.products_agent = products
        self.behavior_agent = behavior
        self.models.attach(self)

    async def _product_steps(self) -> BatchSteps:
        processor = await self.processor()
        return processor.process_products, processor.prepare_products

    async def _behaviour_steps(self) -> BatchSteps:
        processor = await self.processor()
        return processor.process_behaviour, processor.prepare_behaviour

    async def _run_batches(
        self,
        stream: faust.StreamT,
        steps: Callable[[], Awaitable[BatchSteps]],
    ) -> None:
        """Consume in micro-batches: take what is buffered (up to batch_max), process, publish, then ack.

        `steps()` gives the (process, prepare) pair; it is awaited only once the stream's buffer counts toward
        `app.max_buffered_records`. (It creates the processor, which loads the model: before, the consumer fetched
        without a bound for that second or two, and a backlog's first ~190,000 records were buffered at once.)

        An event is one record, or (`fetch_batches`) a `RecordBatchMessage` with all the records one fetch returned
        for a partition; those are processed in chunks of at most batch_max and the event is acknowledged after its
        last chunk. Delivery is pipelined: while a chunk's updates await Kafka's acks=all, the next chunk is
        processed (at most `max_inflight_batches` waiting). Updates are enqueued in processing order, events are
        acknowledged in order and only after their own updates and all earlier ones are delivered, and a failed
        delivery stops the agent (its events are never acknowledged, so the commit cannot pass them and they are
        redelivered, offset-fenced, on restart). `prepare` (decoding, and scoring product changes) runs before the
        batch's products are held, its result handed to `process`.
        """
        manual = stream.noack()
        queue = getattr(manual.channel, "queue", None)
        if queue is not None:
            self.app.record_queues.append(queue)
        batch_max = self.settings.batch_max
        inflight: deque[asyncio.Future[None]] = deque()
        events: list[faust.EventT] = []
        messages: list[InMessage] = []
        try:
            process, prepare = await steps()
            async for event in manual.events():
                events.append(event)
                message = event.message
                if isinstance(message, RecordBatchMessage):  # how old its records were when fetched
                    topic = message.topic.removeprefix(self.settings.topic_prefix)
                    self.stats.fetched.count(topic, message.fetched_ms, (r.timestamp or 0 for r in message.records))
                messages += _in_messages(message)
                self.app.records_taken.set()
                if len(messages) < batch_max and queue is not None and not queue.empty():
                    continue
                await self._inputs_check_passed()  # not after a rebalance until the input topics are checked
                for start in range(0, len(messages), batch_max):
                    chunk = messages[start : start + batch_max]
                    pending, out = await self._process_batch(chunk, process, prepare)
                    done = events if start + batch_max >= len(messages) else []
                    previous = inflight[-1] if inflight else None
                    settled = asyncio.ensure_future(self._settle(pending, out, done, manual, previous))
                    settled.add_done_callback(self._stop_if_undelivered)
                    inflight.append(settled)
                    while inflight and (inflight[0].done() or len(inflight) > self.settings.max_inflight_batches):
                        await self._settled(inflight.popleft())
                events, messages = [], []
            while inflight:
                await self._settled(inflight.popleft())
        finally:
            for waiting in inflight:
                waiting.cancel()  # unacknowledged: redelivered and fenced after a restart
            if queue in self.app.record_queues:
                self.app.record_queues.remove(queue)  # a restarted agent registers its own; this one no longer drains

    async def _settled(self, settled: asyncio.Future[None]) -> None:
        """Wait for a batch to settle; raises the delivery error of a failed batch: the `DeliveryError` that
        `_stop_if_undelivered` logged, without Kafka's error again under it."""
        try:
            await settled
        except KafkaError:
            if self._delivery_error is not None:
                raise self._delivery_error from None
            raise

    def _stop_if_undelivered(self, settled: asyncio.Future[None]) -> None:
        """A batch whose updates or dead letters Kafka refused stops the worker at once, in one ERROR line: its agent
        would only see the failure at its next event, and until then (for ever, on a quiet topic) it committed
        nothing and said nothing. The batch is not acknowledged: the next start delivers it again."""
        if settled.cancelled() or self._delivery_error is not None:
            return
        exc = settled.exception()
        if exc is None or not isinstance(exc, KafkaError):
            return
        hint = ""
        if isinstance(exc, MessageSizeTooLargeError):
            hint = " (a record over its topic's max.message.bytes: the next start sets the limits tagstream needs)"
        error = DeliveryError(
            f"Kafka refused a record of a batch's tag updates or dead letters ({type(exc).__name__}: {exc}); the "
            f"worker stops and its batch, not acknowledged, is delivered again at its next start{hint}"
        )
        log.error("%s", error)
        self._delivery_error = error
        self._crashing = asyncio.ensure_future(self.app.crash(error))

    async def _process_batch(
        self,
        messages: list[InMessage],
        process: Callable[..., Awaitable[BatchOutput]],
        prepare: Callable[[Sequence[InMessage]], Awaitable[Any]],
    ) -> tuple[list[Any], BatchOutput]:
        """Process a batch and enqueue its updates; returns their delivery futures and the batch's output."""
        if messages:
            topic = messages[0].topic.removeprefix(self.settings.topic_prefix)
            now = now_ms()
            self.stats.arrival.count(topic, now, (m.timestamp_ms for m in messages))
            if self.ticker is not None and topic == BEHAVIOR.name:
                self.ticker.saw({m.partition for m in messages}, now)
        prepared = await prepare(messages)
        # Effects are computed and their updates enqueued while the batch holds its products, so a product's updates
        # reach the topic in the order its state changed, whichever agent produced them; a batch waits only for
        # earlier batches with one of its products. Delivery is awaited outside.
        async with self.locks.hold(prepared.product_ids) as hold:
            try:
                out = await process(messages, prepared, hold)
            except OutOfMemoryError as exc:  # no event's fault: stop, unacknowledged, instead of retrying each
                error = StateError(
                    f"Redis is full ({exc}): the worker stops; its batch was not acknowledged and is applied when the "
                    "worker starts again on a Redis with room (raise its maxmemory or free memory)"
                )
                log.error("%s", error)
                raise error from None
            except Exception:
                if not self.settings.dead_letter_all_errors:
                    raise
                log.exception("batch of %d failed; retrying its messages one at a time", len(messages))
                processor = await self.processor()
                out = await processor.process_each(messages, lambda one: process(one, None, hold))
            pending = await self._enqueue(out)
        self.stats.consumed += len(messages)
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(messages))
        del self.stats.batch_sizes[:-1000]
        return pending, out

    async def _settle(
        self,
        pending: list[Any],
        out: BatchOutput,
        events: list[faust.EventT],
        manual: Any,
        previous: asyncio.Future[None] | None,
    ) -> None:
        """Wait until Kafka has the batch's updates and the previous batch is settled, then acknowledge `events`."""
        await self._delivered(pending, out)
        if previous is not None:
            await previous  # acknowledgements in order; raises if an earlier delivery failed
        for done in events:
            await manual.ack(done)

    async def publish(self, out: BatchOutput) -> None:
        """Send the batch's tag updates and dead letters and wait until Kafka has them all."""
        await self._delivered(await self._enqueue(out), out)

    async def _enqueue(self, out: BatchOutput) -> list[Any]:
        """Hand the updates and dead letters to the producer, in order; returns their delivery futures."""
        if self.capture_output:
            self.captured[TAG_UPDATES.name] += out.updates
            self.captured[DEAD_LETTER.name] += out.dead_letters
            return []
        # Straight to the app's (idempotent, acks=all) aiokafka producer: Faust's Topic.send adds ~90 µs per message
        # of its own bookkeeping here (bench/faust_ceiling.py), for records that are already serialized bytes.
        send = self.app.producer.send
        updates, dead = self.topics[TAG_UPDATES.name].get_topic_name(), self.topics[DEAD_LETTER.name].get_topic_name()
        pending = []
        for key, value in out.updates:
            pending.append(await send(updates, key, value, partition=None, timestamp=None, headers=None))
        for key, value, headers in out.dead_letters:
            pending.append(await send(dead, key, value, partition=None, timestamp=None, headers=headers))
        return pending

    async def _delivered(self, pending: list[Any], out: BatchOutput) -> None:
        """Wait until Kafka has every enqueued message (acks=all), then count them."""
        if pending:
            await asyncio.gather(*pending)
        self.stats.updates += len(out.updates)
        self.stats.dead_letters += len(out.dead_letters)
        self.stats.redelivered += out.redelivered
        self.stats.stale += out.stale

    @property
    def model_updates_topic(self) -> faust.TopicT:
        """The topic model updates arrive on."""
        return self.topics[MODEL_UPDATES.name]


def _in_messages(message: Any) -> list[InMessage]:
    """The records a Faust message carries: a `RecordBatchMessage`'s records, or the message itself."""
    if isinstance(message, RecordBatchMessage):
        return [
            InMessage(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp or 0, r.headers)
            for r in message.records
        ]
    return [
        InMessage(
            message.topic,
            message.partition,
            message.offset,
            message.key,
            message.value,
            int((message.timestamp or 0) * 1000),
            list(message.headers or ()),
        )
    ]
