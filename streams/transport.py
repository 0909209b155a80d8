"""Faust's aiokafka transport with five changes: an idempotent acks=all producer, a cheaper message hand-off,
fetched records delivered to batch agents as one Faust message per partition and fetch, fetches that wait for
`fetch_min_bytes` (at most `fetch_max_wait_ms`), and the consumer on the app's event loop instead of a thread.

faust-streaming 0.15.3 hands every fetched message to the agents through
`await self.wait_first(callback(message), self.suspend_flow.wait())`: two tasks and an `asyncio.wait` per message,
so that a callback blocked on a full stream buffer can be abandoned when a rebalance suspends the flow. Almost every
callback finishes without blocking, so `FastConsumer` first runs the callback's coroutine one step inline; only a
callback that really blocks is finished under `wait_first`, as Faust does. On this machine that took a no-op agent
from ~13k to ~16.5k messages/s and cut its CPU per message by about 40% (`bench/RESULTS.md`).

Even so, Faust's per-message path (a `ConsumerMessage`, a decoded `Event`, the stream buffer, the stream iterator's
sensors and bookkeeping, an ack) costs ~60 µs per message here, about as much as all of tagstream's own work. The
worker's agents process micro-batches anyway, so for the topics in `app.batched_topics` `FastConsumer.getmany` wraps
all the records one fetch returned for a partition in one `RecordBatchMessage` (offset = its last record's; the
records ride along, undecoded). The agent reads `message.records`; acknowledging the message acknowledges every
offset from its first record's to its last (`FastConsumer.ack`), so commits advance exactly as if each record had
been acknowledged on its own, and a crash before the acknowledgement redelivers the whole batch. Fetching stops
while the agents' buffers hold `app.max_buffered_records` records (`_wait_for_buffer_room`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any, cast

from aiokafka.structs import OffsetAndMetadata
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import ConsumerMessage, ack_lock
from mode import Service
from mode.utils.futures import maybe_async

__all__ = ["RecordBatchMessage", "TagstreamTransport", "run_inline_first"]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Drive `coro` on from where it yielded `pending` (a future it waits for), forwarding sends and throws."""
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation and errors go to the coroutine, as with `await`
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], pending: Any) -> Any:
    return await _resume(coro, pending)


def run_inline_first(coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any] | None:
    """Run `coro` until it first blocks: None if it finished (its result is dropped, its exception raised), else a
    coroutine that finishes it from there (to be awaited or wrapped in a task)."""
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return _finish(coro, pending)


class RecordBatchMessage(ConsumerMessage):
    """The records one fetch returned for one partition of a batched topic, as one Faust message.

    `offset`/`timestamp` are the last record's; `first_offset` is the first record's; `records` are the aiokafka
    `ConsumerRecord`s in offset order (key, value and timestamp in ms undecoded); `fetched_ms` is when the consumer
    handed them to Faust (wall clock, ms). key and value are empty."""

    __slots__ = ("fetched_ms", "first_offset", "records")

    def __init__(self, tp: TP, records: list[Any], generation_id: int | None) -> None:
        last = records[-1]
        super().__init__(
            tp.topic,
            tp.partition,
            last.offset,
            last.timestamp / 1000.0 if last.timestamp is not None else cast(float, None),
            last.timestamp_type,
            None,
            None,
            b"",
            None,
            0,
            0,
            tp,
            generation_id=generation_id,
        )
        self.first_offset: int = records[0].offset
        self.records: list[Any] = records
        self.fetched_ms: int = time.time_ns() // 1_000_000


class IdleLongPoll:
    """Switches an aiokafka fetcher between batching fetches while records flow and one long poll while none do.

    Busy: the broker holds each fetch until `min_bytes` are ready or `max_wait_ms` passed (fewer, fuller fetches).
    Idle (the last fetch returned no record): the next fetch asks for 1 byte and may wait `idle_wait_ms`, so the
    broker answers as soon as a record arrives instead of every `max_wait_ms`. With the busy settings alone an idle
    worker sent a fetch every ~5 ms, and each costs ~0.5 ms of CPU in aiokafka's protocol code: ~0.09 cores of an
    idle worker (a bare aiokafka consumer with the same settings: 0.11; bench/RESULTS.md, thirteenth session).
    The mode is the fetcher's, not a broker's: with several brokers, a busy one asked for 1 byte answers at once with
    what it has, and the next fetch batches again.
    """

    def __init__(self, fetcher: Any, min_bytes: int, max_wait_ms: int, idle_wait_ms: int) -> None:
        self.fetcher = fetcher
        self.busy = (min_bytes, max_wait_ms)
        self.idle = (1, max(idle_wait_ms, max_wait_ms))
        self.fetches = 0  # fetch responses seen (read by tests)
        self._proc = fetcher._proc_fetch_request
        fetcher._proc_fetch_request = self._proc_fetch_request
        self._use(self.busy)

    def _use(self, settings: tuple[int, int]) -> None:
        # aiokafka builds every FetchRequest from these two attributes (Fetcher._get_actions_per_node)
        self.fetcher._fetch_min_bytes, self.fetcher._fetch_max_wait_ms = settings

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        got_records = await self._proc(assignment, node_id, request)
        self.fetches += 1
        self._use(self.busy if got_records else self.idle)
        return bool(got_records)


def _committing_metadata(commit: Callable[..., Any], app: Any) -> Callable[..., Any]:
    """aiokafka's `commit`, with the app's `commit_metadata` (the Redis store the worker writes) on every offset
    Faust commits without metadata: a worker of the same group on another store sees it (`streams.app`)."""

    async def commit_with_metadata(offsets: Any = None) -> Any:
        metadata = getattr(app, "commit_metadata", "")
        if metadata and offsets:
            unnamed = [tp for tp, at in offsets.items() if isinstance(at, OffsetAndMetadata) and not at.metadata]
            offsets = {**offsets, **{tp: OffsetAndMetadata(offsets[tp].offset, metadata) for tp in unnamed}}
        return await commit(offsets)

    return commit_with_metadata


class BatchingConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with the app's `fetch_min_bytes` and `fetch_max_wait_ms` (Faust leaves aiokafka's
    fetch_min_bytes=1: the broker answers every fetch as soon as one record arrives, so at a steady rate the consumer
    thread sends about one fetch per produce request, each a round trip through the GIL and the event loops), a
    long poll while no record arrives (`IdleLongPoll`, with the app's `fetch_idle_wait_ms`), and, unless
    `app.consumer_thread`, no thread: aiokafka runs on the app's event loop and every call to it is a plain await.

    In Faust's thread every fetch is two hand-offs between event loops (`call_soon_threadsafe` each way) and the
    fetched records wait for the GIL while the main thread works; on the app's loop they are taken as soon as the
    loop is free. Four alternating pairs at 6,000 and 9,000 events/s (bench/RESULTS.md, fourteenth session): p99
    53 / 52 / 200 / 415 ms on the loop against 125 / 86 / 328 / 2,358 in a thread."""

    long_poll: IdleLongPoll | None = None

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        #: False: the consumer runs on the app's event loop (`app.consumer_thread`), not in a thread of its own
        self.in_thread = bool(getattr(consumer.app, "consumer_thread", True))
        if not self.in_thread:
            kwargs["thread_loop"] = kwargs.get("loop") or asyncio.get_event_loop()
        super().__init__(consumer, **kwargs)

    async def start(self) -> None:
        """Start in a thread (Faust's way), or serve on the app's loop: the same start-up, shutdown and crash path
        (`ServiceThread._serve`) run as a task instead of in a thread."""
        if self.in_thread:
            return await super().start()
        self._thread_started.set()
        self._thread_running = asyncio.Future(loop=self.parent_loop)
        self._serve_task = self.parent_loop.create_task(self._serve())
        # a crash reaches start() (below) or the app (`ServiceThread._serve`); the task's own copy is not news
        self._serve_task.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            await self._thread_running  # set when started; its exception if start-up crashed
        finally:
            self._thread_running = None

    async def call_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call `fun` where the consumer runs: through the thread's method queue, or directly on the loop."""
        if self.in_thread:
            return await super().call_thread(fun, *args, **kwargs)
        return await maybe_async(fun(*args, **kwargs))  # as Faust's method queue calls it in the thread

    async def _gather_remaining_tasks(self) -> None:
        # on the app's loop the "remaining tasks" are the whole app's: the thread's sweep must not cancel them
        if self.in_thread:
            await super()._gather_remaining_tasks()

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka hands these to its Fetcher when the consumer starts; the consumer is not started yet
        consumer._fetch_min_bytes = getattr(self.app, "fetch_min_bytes", consumer._fetch_min_bytes)
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", consumer._fetch_max_wait_ms)
        # only committed records: a transactional producer's aborted records never happened (Faust reads them
        # unless it runs exactly-once itself); without transactions this changes nothing
        consumer._isolation_level = "read_committed"
        consumer.commit = _committing_metadata(consumer.commit, self.app)
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        idle_wait_ms = getattr(self.app, "fetch_idle_wait_ms", 0)
        consumer = self._consumer
        fetcher = getattr(consumer, "_fetcher", None)
        if idle_wait_ms and fetcher is not None:
            self.long_poll = IdleLongPoll(fetcher, consumer._fetch_min_bytes, consumer._fetch_max_wait_ms, idle_wait_ms)


class FastConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer whose fetch loop runs each message's callback inline until it blocks, and which
    delivers the records of `app.batched_topics` as one `RecordBatchMessage` per partition and fetch."""

    def _new_consumer_thread(self) -> BatchingConsumerThread:
        return BatchingConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        """`faust.transport.consumer.Consumer.getmany` (0.15.3), with one `RecordBatchMessage` per partition of a
        batched topic instead of one message per record (records of other topics: as there)."""
        batched: frozenset[str] = getattr(self.app, "batched_topics", frozenset())
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
            try:
                await self.perform_seek()
            except Exception as ex:
                self.log.warning(f"exception performing seek when flow not active {ex}")
            return
        to_message = self._to_message
        for tp, tp_records in records.items():
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                break  # rebalancing: the rest is fetched again from the committed offsets
            if not tp_records or not (
                active_partitions is None or tp in active_partitions or tp in self._buffered_partitions
            ):
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            if tp.topic in batched:
                yield tp, RecordBatchMessage(tp, tp_records, generation_id)
            else:
                for record in tp_records:
                    yield tp, to_message(tp, record)

    async def _wait_for_buffer_room(self, should_stop: Callable[[], bool]) -> None:
        """Fetch on only while the batch agents' buffers hold fewer than `app.max_buffered_records` records.

        This bounds a backlog's memory by records instead of by Faust's per-stream message count: a Faust buffer
        that reaches maxsize / 1.25 messages pauses its partitions, and each pause and resume cost ~100 ms of
        latency here, while a fetched batch holds anything from one record to a whole 1 MB fetch."""
        app = self.app
        buffered = getattr(app, "buffered_records", None)
        if buffered is None:
            return
        held = buffered()
        app.buffered_high_water = max(app.buffered_high_water, held)
        while held >= app.max_buffered_records and not should_stop():
            app.records_taken.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(app.records_taken.wait(), 0.5)
            held = buffered()

    def ack(self, message: Message) -> bool:
        """Mark a message acknowledged; a `RecordBatchMessage` acknowledges every offset it spans.

        A message fetched before the latest rebalance is not counted: Faust acknowledges such a message when its
        stream skips it unprocessed, and after the rebalance its offsets are fetched and processed again, so
        counting it could let a commit pass records that are not done yet. (Skipping the acknowledgement of one that
        was processed only means it is redelivered, and offset-fenced.)"""
        generation = getattr(message, "generation_id", None)
        if generation is not None and generation != self.app.consumer_generation_id:
            with ack_lock:
                message.acked = True
                self._unacked_messages.discard(message)
            return False
        if isinstance(message, RecordBatchMessage):
            with ack_lock:
                if message.acked or not self.app.topics.acks_enabled_for(message.topic):
                    return super().ack(message)
                tp = message.tp
                committed = self._committed_offset[tp]
                acked_index = self._acked_index[tp]
                acked_for_tp = self._acked[tp]
                for offset in range(message.first_offset, message.offset):
                    if (committed is None or offset >= committed) and offset not in acked_index:
                        acked_index.add(offset)
                        acked_for_tp.append(offset)
                        self._n_acked += 1
                return super().ack(message)
        return super().ack(message)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by the worker tests
        """`faust.transport.consumer.Consumer._drain_messages` (0.15.3), with `wait_first` only for callbacks that
        block (see the module docstring); commits and read offsets as there, gaps end before a message's first
        offset."""
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        yield_every = 100
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                await self._wait_for_buffer_room(consumer_should_stop)
                set_flag(CONSUMER_FETCHING)
                ait = cast(AsyncIterator, getmany(timeout=1.0))
                await self.sleep(0)  # getmany can be called in a loop without ever releasing the event loop
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await asyncio.sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        first = getattr(message, "first_offset", offset)
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = first - (r_offset or 0)
                            if gap > 1 and r_offset is not None and acks_enabled_for(message.topic):
                                # the missing offsets only (Faust's own call also covers `offset`, which would
                                # let a commit pass it before it is acknowledged); after offset 0 too (Faust skips
                                # it as false): an aborted transaction there left a gap no commit would pass
                                await self._add_gap(tp, r_offset + 1, first - 1)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            rest = run_inline_first(callback(message))
                            if rest is not None:
                                await self.wait_first(rest, self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's aiokafka producer with acks=all and idempotence (Faust enables them only in exactly-once mode)."""

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


class TagstreamTransport(faust_aiokafka.Transport):
    """The aiokafka transport with FastConsumer and IdempotentProducer."""

    Consumer = FastConsumer
    Producer = IdempotentProducer
