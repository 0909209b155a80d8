"""The consumer's inline message hand-off behaves like awaiting the callback, blocked or not; a fetched record
batch, acknowledged, lets the commit advance past all of its records and no further."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from types import SimpleNamespace

import pytest
from faust.types import TP
from intervaltree import IntervalTree

from streams.transport import FastConsumer, RecordBatchMessage, run_inline_first

TOPIC_TP = TP("behavior", 0)


async def test_a_callback_that_does_not_block_finishes_inline() -> None:
    seen: list[int] = []

    async def callback() -> None:
        seen.append(1)

    assert run_inline_first(callback()) is None
    assert seen == [1]


async def test_a_blocked_callback_is_finished_by_the_returned_coroutine() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def callback() -> str:
        steps.append("before")
        got = await gate
        steps.append(f"after {got}")
        await asyncio.sleep(0)
        return "done"

    rest = run_inline_first(callback())
    assert rest is not None and steps == ["before"]
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    assert not task.done()
    gate.set_result("open")
    assert await task == "done"
    assert steps == ["before", "after open"]


async def test_errors_propagate_before_and_after_blocking() -> None:
    async def fails_at_once() -> None:
        raise ValueError("bad message")

    with pytest.raises(ValueError, match="bad message"):
        run_inline_first(fails_at_once())

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def fails_later() -> None:
        await gate
        raise KeyError("later")

    rest = run_inline_first(fails_later())
    assert rest is not None
    gate.set_result(None)
    with pytest.raises(KeyError):
        await rest


async def test_cancelling_a_blocked_callback_runs_its_cleanup() -> None:
    cleaned: list[bool] = []

    async def callback() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    rest = run_inline_first(callback())
    assert rest is not None
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


def _consumer(committed: int | None) -> FastConsumer:
    """A FastConsumer with only the bookkeeping `ack` and Faust's `_new_offset` use (no broker)."""
    consumer = FastConsumer.__new__(FastConsumer)
    consumer.app = SimpleNamespace(  # type: ignore[assignment]
        topics=SimpleNamespace(acks_enabled_for=lambda topic: True), consumer_generation_id=1
    )
    consumer._committed_offset = defaultdict(lambda: committed)
    consumer._acked_index = defaultdict(set)
    consumer._acked = defaultdict(list)
    consumer._gap = defaultdict(IntervalTree)
    consumer._n_acked = 0
    consumer._unacked_messages = set()
    consumer._waiting_for_ack = None
    return consumer


def _batch(offsets: range) -> RecordBatchMessage:
    records = [
        SimpleNamespace(
            topic="behavior", partition=0, offset=o, key=None, value=b"{}", timestamp=5, timestamp_type=0, headers=[]
        )
        for o in offsets
    ]
    return RecordBatchMessage(TOPIC_TP, records, generation_id=1)


def test_acknowledging_a_record_batch_commits_past_all_of_its_records() -> None:
    consumer = _consumer(committed=99)
    batch = _batch(range(100, 110))
    assert (batch.offset, batch.first_offset, batch.timestamp) == (109, 100, 0.005)
    assert consumer.ack(batch) is True
    assert consumer._n_acked == 10  # counts towards broker_commit_every like ten records
    assert consumer._new_offset(TOPIC_TP) == 110
    assert consumer.ack(batch) is False  # acknowledged once


def test_a_later_batch_acknowledged_first_does_not_let_the_commit_pass_an_earlier_one() -> None:
    consumer = _consumer(committed=99)
    first, second = _batch(range(100, 110)), _batch(range(110, 120))
    consumer.ack(second)
    assert consumer._new_offset(TOPIC_TP) is None  # 100..109 are not done
    consumer.ack(first)
    assert consumer._new_offset(TOPIC_TP) == 120


def test_a_batch_fetched_before_a_rebalance_does_not_move_the_commit() -> None:
    consumer = _consumer(committed=99)
    stale = _batch(range(100, 110))  # generation 1
    consumer.app.consumer_generation_id = 2  # type: ignore[attr-defined]
    assert consumer.ack(stale) is False  # e.g. skipped unprocessed by its stream
    assert consumer._n_acked == 0 and consumer._new_offset(TOPIC_TP) is None
    fresh = RecordBatchMessage(TOPIC_TP, stale.records, generation_id=2)  # fetched again after the rebalance
    assert consumer.ack(fresh) is True
    assert consumer._new_offset(TOPIC_TP) == 110


async def test_fetching_waits_while_the_agents_buffers_hold_too_many_records() -> None:
    buffered = {"records": 25}
    consumer = FastConsumer.__new__(FastConsumer)
    consumer.app = SimpleNamespace(  # type: ignore[assignment]
        buffered_records=lambda: buffered["records"],
        max_buffered_records=20,
        records_taken=asyncio.Event(),
        buffered_high_water=0,
    )
    waiting = asyncio.ensure_future(consumer._wait_for_buffer_room(lambda: False))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done()
    buffered["records"] = 21  # an agent took a batch, still too many
    consumer.app.records_taken.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done()
    buffered["records"] = 3
    consumer.app.records_taken.set()
    await asyncio.wait_for(waiting, 1.0)


async def test_the_workers_kafka_consumer_fetches_with_its_fetch_settings(tmp_path) -> None:
    from streams.app import Worker
    from streams.settings import WorkerSettings
    from streams.state import MemoryStateStore

    settings = WorkerSettings(
        fetch_min_bytes=12_345,
        fetch_max_wait_ms=7,
        fetch_max_partition_bytes=65_536,
        data_dir=tmp_path,
        app_id="fetch-settings",
    )
    worker = Worker(settings, store_factory=MemoryStateStore, capture_output=True)
    consumer = worker.app.consumer._thread._create_worker_consumer(worker.app.transport)
    try:
        # what aiokafka hands its Fetcher on start: the broker holds each fetch for 12,345 bytes or 7 ms
        assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (12_345, 7)
        # and a fetch returns at most 64 KiB per partition: a backlog is fetched ahead of the agents in small steps
        assert consumer._max_partition_fetch_bytes == 65_536
    finally:
        await consumer.stop()


@pytest.mark.parametrize("idle_wait_ms", [250, 0])
async def test_the_consumer_thread_long_polls_while_idle_and_batches_while_records_flow(
    tmp_path, monkeypatch: pytest.MonkeyPatch, idle_wait_ms: int
) -> None:
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from streams.app import Worker
    from streams.settings import WorkerSettings
    from streams.state import MemoryStateStore

    answers = iter([False, True, False])  # what each fetch response brought: nothing, records, nothing

    async def fetch(assignment: object, node_id: int, request: object) -> bool:
        return next(answers)

    fetcher = SimpleNamespace(_proc_fetch_request=fetch, _fetch_min_bytes=1, _fetch_max_wait_ms=1500)

    async def started(self: faust_aiokafka.AIOKafkaConsumerThread) -> None:  # aiokafka's consumer, started
        self._consumer = SimpleNamespace(_fetcher=fetcher, _fetch_min_bytes=12_345, _fetch_max_wait_ms=7)

    monkeypatch.setattr(faust_aiokafka.AIOKafkaConsumerThread, "on_start", started)
    settings = WorkerSettings(
        fetch_min_bytes=12_345, fetch_max_wait_ms=7, fetch_idle_wait_ms=idle_wait_ms, data_dir=tmp_path, app_id="lp"
    )
    worker = Worker(settings, store_factory=MemoryStateStore, capture_output=True)
    thread = worker.app.consumer._thread
    await thread.on_start()
    if not idle_wait_ms:  # switched off: every fetch as when busy
        assert thread.long_poll is None and fetcher._proc_fetch_request is fetch
        return
    settings_of = lambda: (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms)  # noqa: E731
    assert settings_of() == (12_345, 7)
    assert await fetcher._proc_fetch_request(None, 0, None) is False
    assert settings_of() == (1, 250)  # idle: the broker answers the first byte, or after 250 ms
    assert await fetcher._proc_fetch_request(None, 0, None) is True
    assert settings_of() == (12_345, 7)  # records flow: fewer, fuller fetches again
    await fetcher._proc_fetch_request(None, 0, None)
    assert settings_of() == (1, 250) and thread.long_poll is not None and thread.long_poll.fetches == 3


class _StartedConsumer:
    """Stands in for aiokafka's consumer once started (no broker here); remembers where it ran."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.current_thread()
        self._fetcher = None
        self.stopped_on: asyncio.AbstractEventLoop | None = None

    async def stop(self) -> None:
        self.stopped_on = asyncio.get_running_loop()


@pytest.mark.parametrize("consumer_thread", [False, True])
async def test_the_consumer_runs_on_the_workers_loop_unless_set_to_a_thread_and_stopping_it_spares_the_app(
    tmp_path, monkeypatch: pytest.MonkeyPatch, consumer_thread: bool
) -> None:
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from streams.app import Worker
    from streams.settings import WorkerSettings
    from streams.state import MemoryStateStore

    async def started(self: faust_aiokafka.AIOKafkaConsumerThread) -> None:
        self._consumer = _StartedConsumer()

    monkeypatch.setattr(faust_aiokafka.AIOKafkaConsumerThread, "on_start", started)
    settings = WorkerSettings(consumer_thread=consumer_thread, data_dir=tmp_path, app_id="ct")
    worker = Worker(settings, store_factory=MemoryStateStore, capture_output=True)
    consumer_service = worker.app.consumer._thread
    app_loop = asyncio.get_running_loop()
    bystander = asyncio.create_task(asyncio.Event().wait())  # one of the app's tasks, running until cancelled
    threads_before = threading.active_count()

    await consumer_service.start()
    started_consumer = consumer_service._consumer
    assert isinstance(started_consumer, _StartedConsumer)
    if consumer_thread:  # Faust's way: its own thread and loop
        assert started_consumer.thread is not threading.current_thread()
        assert started_consumer.loop is not app_loop
        assert threading.active_count() == threads_before + 1
    else:  # the worker's loop, no thread
        assert started_consumer.thread is threading.current_thread()
        assert started_consumer.loop is app_loop
        assert threading.active_count() == threads_before

    # calls reach the consumer where it runs, plain functions and coroutines alike
    def where() -> threading.Thread:
        return threading.current_thread()

    async def which_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert await consumer_service.call_thread(where) is started_consumer.thread
    assert await consumer_service.call_thread(which_loop) is started_consumer.loop

    await consumer_service.stop()
    assert started_consumer.stopped_on is started_consumer.loop  # aiokafka's consumer was stopped where it ran
    assert not bystander.done()  # and stopping it cancelled none of the app's own tasks
    bystander.cancel()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # Faust's thread re-raises it
@pytest.mark.parametrize("consumer_thread", [False, True])
async def test_a_consumer_that_cannot_start_fails_the_start_in_either_mode(
    tmp_path, monkeypatch: pytest.MonkeyPatch, consumer_thread: bool
) -> None:
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from streams.app import Worker
    from streams.settings import WorkerSettings
    from streams.state import MemoryStateStore

    async def unreachable(self: faust_aiokafka.AIOKafkaConsumerThread) -> None:
        raise ConnectionError("no broker at 127.0.0.1:1")

    monkeypatch.setattr(faust_aiokafka.AIOKafkaConsumerThread, "on_start", unreachable)
    settings = WorkerSettings(consumer_thread=consumer_thread, data_dir=tmp_path, app_id="ct-fail")
    worker = Worker(settings, store_factory=MemoryStateStore, capture_output=True)
    consumer_service = worker.app.consumer._thread
    with pytest.raises(ConnectionError, match="no broker"):
        await consumer_service.start()
    if consumer_thread:
        consumer_service._thread.join(5)  # it ends on its own, with the same error
        assert not consumer_service._thread.is_alive()
