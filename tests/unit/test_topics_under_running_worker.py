"""Topics deleted under a running worker: the rebalance gate that re-checks the input topics before any batch, and
the filter that turns aiokafka's missing-topic flood into one line every ~10 s."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

import streams.app as app_module
from streams.app import MissingTopicFilter, Worker, install_missing_topic_filter
from streams.settings import WorkerSettings
from streams.state import MemoryStateStore
from tagstream.errors import TopicsRecreatedError
from tests.events import behaviour
from tests.models import featurized_bundle

NOT_FOUND = "Topic %s not found in cluster metadata"


def _record(topic: str) -> logging.LogRecord:
    return logging.LogRecord("aiokafka.cluster", logging.ERROR, __file__, 1, NOT_FOUND, (topic,), None)


def test_the_missing_topic_error_is_let_through_once_per_topic_every_10_s_naming_the_remedy() -> None:
    now = [0.0]
    flt = MissingTopicFilter(clock=lambda: now[0])
    first = _record("ts-dead-letter")
    assert flt.filter(first)
    assert "Kafka has no topic ts-dead-letter" in first.getMessage()
    assert "`tagstream topics` creates it" in first.getMessage()
    assert not any(flt.filter(_record("ts-dead-letter")) for _ in range(1600))  # the rest of a second's flood
    assert flt.filter(_record("ts-behavior"))  # another topic has its own line
    now[0] = 9.9
    assert not flt.filter(_record("ts-dead-letter"))
    now[0] = 10.0
    again = _record("ts-dead-letter")
    assert flt.filter(again)
    assert "1601 repeats of this line left out" in again.getMessage()
    other = logging.LogRecord("aiokafka.cluster", logging.ERROR, __file__, 1, "Error fetching metadata", (), None)
    assert flt.filter(other) and other.getMessage() == "Error fetching metadata"  # other lines untouched


def test_the_worker_installs_the_filter_on_aiokafkas_cluster_logger_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = WorkerSettings(topic_prefix="harness-", app_id="harness", data_dir=tmp_path / "faust")
    Worker(settings, store_factory=lambda: MemoryStateStore("h"), capture_output=True)
    Worker(settings, store_factory=lambda: MemoryStateStore("h"), capture_output=True)
    logger = logging.getLogger("aiokafka.cluster")
    assert sum(isinstance(f, MissingTopicFilter) for f in logger.filters) == 1
    assert install_missing_topic_filter() in logger.filters
    topic = f"gone-{uuid.uuid4().hex}"
    with caplog.at_level(logging.ERROR, logger="aiokafka.cluster"):
        for _ in range(2000):
            logger.error(NOT_FOUND, topic)
    lines = [r.getMessage() for r in caplog.records if topic in r.getMessage()]
    assert len(lines) == 1 and "`tagstream topics` creates it" in lines[0]


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Worker:
    settings = WorkerSettings(
        topic_prefix="harness-", app_id="harness", model_path=featurized_bundle(tmp_path / "reg"), tick_idle_s=0
    )
    worker = Worker(settings, store_factory=lambda: MemoryStateStore("h"), capture_output=True, store_checked=True)
    monkeypatch.setattr(app_module, "RedisStateStore", MemoryStateStore)  # so the check runs on the harness store
    monkeypatch.setattr(worker, "_warn_of_missing_inputs", lambda: None)  # no consumer here (see the last test)
    return worker


def _refusing(release: asyncio.Event, error: Exception | None) -> Callable[..., Any]:
    async def refuse(store: Any, settings: WorkerSettings) -> None:
        await release.wait()
        if error is not None:
            raise error

    return refuse


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_no_batch_runs_after_a_rebalance_until_the_input_topics_are_checked(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    monkeypatch.setattr(app_module, "refuse_if_topics_recreated", _refusing(release, None))
    async with worker.behavior_agent.test_context() as agent:
        await agent.put(key=b"b1", value=orjson.dumps(behaviour("b1", "u1", 1_764_316_800_000)))
        await _until(lambda: worker.stats.consumed == 1)  # before any rebalance: the gate is open
        worker.inputs_rebalancing()
        check = worker.inputs_assigned(set())
        # records of the new assignment arrive while its check runs (Faust resumes fetching without waiting for it)
        await agent.put(key=b"b1", value=orjson.dumps(behaviour("b1", "u2", 1_764_316_801_000)))
        await asyncio.sleep(0.2)
        assert worker.stats.consumed == 1
        release.set()
        await check
        await _until(lambda: worker.stats.consumed == 2)


async def test_a_recreated_input_topic_found_after_a_rebalance_crashes_the_app_before_any_batch(
    worker: Worker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()
    error = TopicsRecreatedError("Redis holds tagstream state under prefix 'h' applied from records Kafka ...")
    monkeypatch.setattr(app_module, "refuse_if_topics_recreated", _refusing(release, error))
    crashed: list[BaseException] = []

    async def crash(reason: BaseException) -> None:
        crashed.append(reason)

    monkeypatch.setattr(worker.app, "crash", crash)
    async with worker.behavior_agent.test_context() as agent:
        worker.inputs_rebalancing()
        check = worker.inputs_assigned(set())
        await agent.put(key=b"b1", value=orjson.dumps(behaviour("b1", "u1", 1_764_316_800_000)))
        release.set()
        with caplog.at_level(logging.ERROR, logger="streams.app"):
            await check
        await asyncio.sleep(0.2)
        assert crashed == [error]
        assert [r.getMessage() for r in caplog.records if r.name == "streams.app"] == [str(error)]
        assert worker.stats.consumed == 0  # the new topic's record was neither applied nor skipped as applied


async def test_a_newer_assignment_replaces_the_check_of_an_older_one(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    monkeypatch.setattr(app_module, "refuse_if_topics_recreated", _refusing(release, None))
    first = worker.inputs_assigned(set())
    second = worker.inputs_assigned(set())
    release.set()
    await second
    assert first.cancelled()
    await asyncio.wait_for(worker._inputs_check_passed(), 1)


async def test_a_check_still_running_when_the_next_rebalance_begins_never_opens_the_gate(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It would let records of the coming assignment through before that assignment's own check."""
    release = asyncio.Event()
    monkeypatch.setattr(app_module, "refuse_if_topics_recreated", _refusing(release, None))
    older = worker.inputs_assigned(set())
    worker.inputs_rebalancing()  # partitions revoked: the next assignment is on its way
    release.set()
    await asyncio.sleep(0.05)
    assert older.cancelled() and not worker._inputs_checked.is_set()


def test_a_deleted_input_topic_is_warned_of_once_naming_tagstream_topics(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    counts = {worker.settings.topic("products"): 2, worker.settings.topic("behavior"): 0}
    worker.app.consumer = SimpleNamespace(topic_partitions=counts.get)  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="streams.app"):
        Worker._warn_of_missing_inputs(worker)
        Worker._warn_of_missing_inputs(worker)
        counts[worker.settings.topic("behavior")] = 2
        Worker._warn_of_missing_inputs(worker)
        counts[worker.settings.topic("behavior")] = 0
        Worker._warn_of_missing_inputs(worker)
    lines = [r.getMessage() for r in caplog.records if r.name == "streams.app" and r.levelno == logging.WARNING]
    assert len(lines) == 2  # once per disappearance
    assert "input topic harness-behavior was deleted under this running worker" in lines[0]
    assert "`tagstream topics`" in lines[0] and "TopicsRecreatedError" in lines[0]
