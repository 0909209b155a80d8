"""The Faust agents' logic through `agent.test_context()`: in memory, no broker, no Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError
from faust.types import TP

from streams.app import Worker
from streams.arrival import AT_FETCH, last_summary
from streams.processor import BatchOutput, InMessage, now_ms
from streams.settings import WorkerSettings
from streams.state import MemoryStateStore
from streams.transport import RecordBatchMessage
from tagstream.errors import DeliveryError
from tests.events import behaviour, upsert
from tests.models import featurized_bundle


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    settings = WorkerSettings(topic_prefix="harness-", app_id="harness", model_path=featurized_bundle(tmp_path / "reg"))
    return Worker(settings, store_factory=lambda: MemoryStateStore("h"), capture_output=True)


async def test_product_agent_publishes_tags_and_dead_letters(worker: Worker) -> None:
    async with worker.products_agent.test_context() as agent:
        await agent.put(
            key=b"p1", value=orjson.dumps(upsert("p1", "Nike Women Red Shoes", attributes={"colour": "Red"}))
        )
        await agent.put(key=b"p2", value=b"not json at all")
        await _until(lambda: worker.stats.consumed == 2)  # put() returns once the stream took it, not processed it
    updates = [orjson.loads(v) for _, v in worker.captured["tag-updates"]]
    dead = [orjson.loads(v) for _, v, _ in worker.captured["dead-letter"]]
    assert [u["product_id"] for u in updates] == ["p1"]
    assert "colour:Red" in {t["tag"] for t in updates[0]["tags"]}
    assert updates[0]["model_version"] == (await worker.processor()).model_provider().version
    assert len(dead) == 1 and dead[0]["error_type"] == "EventDecodeError"
    assert worker.stats.consumed == 2


async def test_behaviour_agent_applies_clicks_once_each(worker: Worker) -> None:
    t0 = 1_764_316_800_000
    async with worker.behavior_agent.test_context() as agent:
        for i in range(25):
            await agent.put(key=b"b1", value=orjson.dumps(behaviour("b1", f"u{i % 8}", t0 + i * 1000)))
        await _until(lambda: worker.stats.consumed == 25)
    store = (await worker.processor()).store
    state = (await store.read(["b1"]))["b1"]
    assert sum(v for k, v in state.beh.items() if k.startswith("m:")) == 25
    assert any("trending" in orjson.loads(v)["added"] for _, v in worker.captured["tag-updates"])


async def test_an_agent_counts_its_buffer_before_the_model_is_loaded(worker: Worker) -> None:
    # The consumer fetches only while the agents' buffers hold fewer than max_buffered_records; an agent whose
    # buffer is not counted yet (its processor still loading the model) let a backlog be fetched without a bound.
    loading = asyncio.Event()
    ready = worker.processor

    async def slow_processor() -> Any:
        await loading.wait()
        return await ready()

    worker.processor = slow_processor  # type: ignore[method-assign]
    async with worker.behavior_agent.test_context() as agent:
        await _until(lambda: len(worker.app.record_queues) == 1)
        assert worker.stats.consumed == 0  # still waiting for its processor
        worker.app.max_buffered_records = 3
        for i in range(3):
            await agent.put(key=b"b1", value=orjson.dumps(behaviour("b1", "u1", 1_764_316_800_000 + i)), wait=False)
        assert worker.app.buffered_records() == 3  # what the consumer's fetch loop waits on
        loading.set()
        await _until(lambda: worker.stats.consumed == 3)
        assert worker.app.buffered_records() == 0


async def _until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Let the event loop run until `condition()` holds (AssertionError after `timeout` seconds)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def _prepare(messages: Sequence[InMessage]) -> SimpleNamespace:
    return SimpleNamespace(product_ids={m.key.decode() for m in messages if m.key})


def _steps(process: Callable[..., Any]) -> Callable[[], Any]:
    async def steps() -> tuple[Callable[..., Any], Callable[..., Any]]:
        return process, _prepare

    return steps


class _FakeEvent:
    def __init__(self, offset: int) -> None:
        self.message = SimpleNamespace(
            topic="behavior", partition=0, offset=offset, key=b"k", value=b"{}", timestamp=1.0, headers=[]
        )


class _FakeStream:
    """What `_run_batches` uses of a Faust stream: noack(), its channel queue, events() and ack()."""

    def __init__(self, batches: list[list[_FakeEvent]], gate: asyncio.Event) -> None:
        self.batches, self.gate = batches, gate
        self.acked: list[int] = []
        self.channel = SimpleNamespace(queue=asyncio.Queue())

    def noack(self) -> _FakeStream:
        return self

    async def events(self) -> AsyncIterator[_FakeEvent]:
        queue = self.channel.queue
        for batch in self.batches:
            for i, event in enumerate(batch):
                while not queue.empty():  # the queue holds what is still buffered after this event
                    queue.get_nowait()
                for rest in batch[i + 1 :]:
                    queue.put_nowait(rest)
                yield event
            await self.gate.wait()

    async def ack(self, event: _FakeEvent) -> None:
        self.acked.append(event.message.offset)


async def test_batches_are_acknowledged_only_after_their_updates_are_delivered(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    deliveries: list[asyncio.Future[None]] = []

    async def enqueue(out: BatchOutput) -> list[asyncio.Future[None]]:
        deliveries.append(loop.create_future())
        return [deliveries[-1]]

    processed: list[list[int]] = []

    async def process(messages: Sequence[InMessage], prepared: object, hold: object) -> BatchOutput:
        processed.append([m.offset for m in messages])
        return BatchOutput(updates=[(b"k", b"{}")])

    gate = asyncio.Event()
    stream = _FakeStream([[_FakeEvent(0), _FakeEvent(1)], [_FakeEvent(2)]], gate)
    worker._enqueue = enqueue  # type: ignore[method-assign]
    running = asyncio.ensure_future(worker._run_batches(stream, _steps(process)))  # type: ignore[arg-type]
    gate.set()
    await _until(lambda: len(processed) == 2)
    # both batches processed while the first one's delivery is still pending; nothing acknowledged yet
    assert processed == [[0, 1], [2]] and stream.acked == []
    assert stream.channel.queue in worker.app.record_queues
    deliveries[1].set_result(None)
    for _ in range(50):  # the second batch is delivered, but acknowledgements keep the consumed order
        await asyncio.sleep(0)
    assert stream.acked == []
    deliveries[0].set_result(None)
    await running
    assert stream.acked == [0, 1, 2]


def _fetched(offsets: range, produced_ms: int = 1000) -> SimpleNamespace:
    """An event carrying a RecordBatchMessage: the records one fetch returned for partition 0 (record o produced at
    `produced_ms` + o)."""
    records = [
        SimpleNamespace(
            topic="behavior",
            partition=0,
            offset=o,
            key=b"k",
            value=b"{}",
            timestamp=produced_ms + o,
            timestamp_type=0,
            headers=[],
        )
        for o in offsets
    ]
    return SimpleNamespace(message=RecordBatchMessage(TP("behavior", 0), records, generation_id=1))


async def test_a_fetched_batch_is_processed_in_chunks_and_acknowledged_after_its_last_chunk(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    worker.settings = worker.settings.model_copy(update={"batch_max": 4})
    deliveries: list[asyncio.Future[None]] = []

    async def enqueue(out: BatchOutput) -> list[asyncio.Future[None]]:
        deliveries.append(loop.create_future())
        return [deliveries[-1]]

    processed: list[list[tuple[int, int]]] = []

    async def process(messages: Sequence[InMessage], prepared: object, hold: object) -> BatchOutput:
        processed.append([(m.offset, m.timestamp_ms) for m in messages])
        return BatchOutput(updates=[(b"k", b"{}")])

    gate = asyncio.Event()
    fetched = _fetched(range(10, 20))
    stream = _FakeStream([[fetched]], gate)  # type: ignore[list-item]
    worker._enqueue = enqueue  # type: ignore[method-assign]
    running = asyncio.ensure_future(worker._run_batches(stream, _steps(process)))  # type: ignore[arg-type]
    await _until(lambda: len(processed) == 3)
    # ten records, batch_max 4: three chunks, records in offset order with their own timestamps
    assert [[o for o, _ in chunk] for chunk in processed] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert processed[2] == [(18, 1018), (19, 1019)]
    deliveries[2].set_result(None)
    deliveries[0].set_result(None)
    for _ in range(50):
        await asyncio.sleep(0)
    assert stream.acked == []  # the middle chunk's updates are not delivered yet
    deliveries[1].set_result(None)
    gate.set()
    await running
    assert stream.acked == [19]  # the message (offset = its last record's) once, after all its chunks


async def test_the_worker_tells_how_old_records_were_when_fetched_and_when_their_batch_started(worker: Worker) -> None:
    # A latency that is there at the fetch already is upstream (producer, broker, a delayed fetch); what is added
    # between the two is the time the records waited in the worker's buffers behind earlier batches.
    now = now_ms()
    fetched = _fetched(range(4), produced_ms=now - 3_000)  # records produced 3.0 s to 2.997 s ago
    fetched.message.fetched_ms = now - 1_000  # and fetched 2 s later, a second ago

    async def process(messages: Sequence[InMessage], prepared: object, hold: object) -> BatchOutput:
        return BatchOutput()

    gate = asyncio.Event()
    gate.set()
    await worker._run_batches(_FakeStream([[fetched]], gate), _steps(process))  # type: ignore[arg-type]
    at_fetch, at_start = worker.stats.fetched, worker.stats.arrival
    assert at_fetch.counted("behavior") == at_start.counted("behavior") == 4
    assert [at_fetch.percentile("behavior", q) for q in (1, 50, 100)] == [1_997, 1_998, 2_000]
    assert at_start.percentile("behavior", 1) >= 2_997  # type: ignore[operator]
    logged = worker.stats.fetched.summary() + "\n" + worker.stats.arrival.summary()
    assert last_summary(logged, AT_FETCH) == {"behavior": {"p50": 1_998, "p99": 2_000, "n": 4}}
    assert last_summary(logged)["behavior"]["p50"] >= 2_998  # type: ignore[index]


async def test_a_failed_delivery_stops_the_agent_and_leaves_its_batch_unacknowledged(worker: Worker) -> None:
    loop = asyncio.get_running_loop()

    async def enqueue(out: BatchOutput) -> list[asyncio.Future[None]]:
        failed: asyncio.Future[None] = loop.create_future()
        failed.set_exception(KafkaTimeoutError("broker gone"))
        return [failed]

    async def process(messages: Sequence[InMessage], prepared: object, hold: object) -> BatchOutput:
        return BatchOutput(updates=[(b"k", b"{}")])

    gate = asyncio.Event()
    gate.set()
    stream = _FakeStream([[_FakeEvent(0)], [_FakeEvent(1)]], gate)
    worker._enqueue = enqueue  # type: ignore[method-assign]
    with pytest.raises(DeliveryError, match=r"Kafka refused a record .* \(KafkaTimeoutError: .*broker gone\)"):
        await worker._run_batches(stream, _steps(process))  # type: ignore[arg-type]
    assert stream.acked == []
    # its buffer no longer counts towards the records that hold fetching back (a restarted agent has its own)
    assert stream.channel.queue not in worker.app.record_queues


class _FailsOn:
    """A model that cannot score one title (an unexpected error, not a bad event)."""

    version = "fails-on-boom"

    def score(self, products: Sequence[object]) -> list[list[object]]:
        if any(getattr(p, "title", "") == "boom" for p in products):
            raise RuntimeError("the scorer crashed")
        return [[] for _ in products]


async def test_a_batch_that_fails_is_retried_one_message_at_a_time_and_only_the_bad_one_dead_lettered(
    worker: Worker,
) -> None:
    processor = await worker.processor()
    failing = _FailsOn()
    processor.model_provider = lambda: failing
    messages = [
        InMessage("products", 0, i, pid.encode(), orjson.dumps(upsert(pid, title)))
        for i, (pid, title) in enumerate([("p1", "Nike Women Red Shoes"), ("p2", "boom"), ("p3", "Titan Watch")])
    ]
    _, out = await worker._process_batch(messages, processor.process_products, processor.prepare_products)
    assert sorted(orjson.loads(v)["product_id"] for _, v in out.updates) == ["p1", "p3"]
    [(key, dead, _)] = out.dead_letters
    assert key == b"p2" and orjson.loads(dead)["error_type"] == "RuntimeError"
    assert len(processor.locks) == 0  # every product released


async def test_an_idle_worker_logs_its_counters_once_not_every_ten_seconds(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    assert not worker.log_stats()  # nothing consumed yet
    async with worker.products_agent.test_context() as agent:
        await agent.put(key=b"p1", value=orjson.dumps(upsert("p1", "Nike Women Red Shoes")))
        await _until(lambda: worker.stats.consumed == 1)
    with caplog.at_level("INFO", logger="streams.app"):
        assert worker.log_stats()
        assert not worker.log_stats() and not worker.log_stats()  # idle since: before, the same lines every 10 s
    assert sum("consumed 1 in 1 batches" in r.getMessage() for r in caplog.records) == 1
    async with worker.products_agent.test_context() as agent:
        await agent.put(key=b"p2", value=orjson.dumps(upsert("p2", "Levis Men Black Jeans")))
        await _until(lambda: worker.stats.consumed == 2)
    assert worker.log_stats()  # something happened: logged again
