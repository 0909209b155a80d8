"""The Faust agents' logic through `agent.test_context()`: in memory, no broker, no Redis."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from streams.app import Worker
from streams.settings import WorkerSettings
from streams.state import MemoryStateStore
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
    updates = [orjson.loads(v) for _, v in worker.captured["tag-updates"]]
    dead = [orjson.loads(v) for _, v in worker.captured["dead-letter"]]
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
    store = (await worker.processor()).store
    state = (await store.read(["b1"]))["b1"]
    assert sum(v for k, v in state.beh.items() if k.startswith("m:")) == 25
    assert any("trending" in orjson.loads(v)["added"] for _, v in worker.captured["tag-updates"])
