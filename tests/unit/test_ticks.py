"""Window ticks: which quiet behaviour partitions get one, and what the tick does when the worker reads it back."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from schemas import TICK_KEY, WindowTick
from streams.model import BundleModel
from streams.processor import InMessage, Processor
from streams.settings import WorkerSettings
from streams.state import MemoryStateStore
from streams.ticks import Ticker
from tests.events import behaviour
from tests.models import featurized_bundle

T0 = 1_764_316_800_000
HOUR = 3_600_000


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BundleModel:
    return BundleModel.load(featurized_bundle(tmp_path_factory.mktemp("reg")), WorkerSettings())


class Partitions:
    """The behaviour topic as the ticker sees it: a processor reading each partition, the records sent to it."""

    def __init__(self, model: BundleModel) -> None:
        self.store = MemoryStateStore("t")
        self.processor = Processor(self.store, user_hash_key=b"secret", model_provider=lambda: model)
        self.offsets: dict[int, int] = {}
        self.sent: list[tuple[str, int, bytes, bytes]] = []
        self.read = 0

    async def get_store(self) -> MemoryStateStore:
        return self.store

    async def send(self, topic: str, partition: int, key: bytes, value: bytes) -> None:
        self.sent.append((topic, partition, key, value))

    def message(self, partition: int, key: bytes, value: bytes) -> InMessage:
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        return InMessage("behavior", partition, offset, key, value)

    async def clicks(self, partition: int, product: str, start: int, n: int = 30) -> list[dict]:
        events = [behaviour(product, f"u{i % 9}", start + i * 5000) for i in range(n)]
        out = await self.processor.process_behaviour(
            [self.message(partition, product.encode(), orjson.dumps(e)) for e in events]
        )
        return [orjson.loads(v) for _, v in out.updates]

    async def read_back(self) -> list[dict]:
        """The worker consuming what the ticker sent since the last read_back."""
        updates = []
        fresh, self.read = self.sent[self.read :], len(self.sent)
        for _, partition, key, value in fresh:
            out = await self.processor.process_behaviour([self.message(partition, key, value)])
            assert out.dead_letters == []
            updates += [orjson.loads(v) for _, v in out.updates]
        return updates


def ticker(parts: Partitions, idle_ms: int = 60_000, live_ms: int = HOUR) -> Ticker:
    return Ticker("behavior", idle_ms=idle_ms, live_ms=live_ms, worker_id="w1", store=parts.get_store, send=parts.send)


async def test_a_quiet_partition_gets_a_tick_that_turns_its_trending_tags_off(model: BundleModel) -> None:
    parts = Partitions(model)
    assert any("trending" in u["added"] for u in await parts.clicks(0, "a", T0))
    assert any("trending" in u["added"] for u in await parts.clicks(1, "b", T0))
    t = ticker(parts, live_ms=4 * HOUR)
    clock = T0 + 29 * 5000  # both partitions' event time: their last click
    # the worker was assigned both at `clock` and keeps hearing from partition 1 only
    assert await t.check([0, 1], clock) == []
    t.saw([1], clock + 2 * HOUR - 10_000)
    assert await t.check([0, 1], clock + 2 * HOUR) == [0]  # quiet for two hours, trending is due
    [(topic, partition, key, value)] = parts.sent
    assert (topic, partition, key) == ("behavior", 0, TICK_KEY)
    assert WindowTick.decode(value) == WindowTick(clock + 2 * HOUR, "w1")
    [expired] = await parts.read_back()
    assert (expired["product_id"], expired["reason"], expired["removed"]) == ("a", "window-expired", ["trending"])
    # 0 just ticked, 1 heard from lately: no tick
    assert await t.check([0, 1], clock + 2 * HOUR + 30_000) == []
    # an hour on: 0 is quiet but has nothing due any more; 1 has been quiet for an hour, its trending is due
    assert await t.check([0, 1], clock + 3 * HOUR) == [1] and len(parts.sent) == 2 and t.sent == 2
    assert [(u["product_id"], u["removed"]) for u in await parts.read_back()] == [("b", ["trending"])]


async def test_no_tick_for_a_replay_of_older_events_or_a_partition_without_events(model: BundleModel) -> None:
    parts = Partitions(model)
    await parts.clicks(0, "a", T0)
    t = ticker(parts, live_ms=HOUR)
    assert await t.check([0, 1], T0) == []
    # the partition's event time is three hours behind the wall clock: a replay, whose windows follow its own times
    assert await t.check([0, 1], T0 + 3 * HOUR) == [] and parts.sent == []
    # the same quiet partition, with event time closer to the wall clock than live_ms: a live stream
    assert await ticker(parts, live_ms=4 * HOUR).check([0, 1], T0 + 3 * HOUR) == []  # first check: seen now
    t4 = ticker(parts, live_ms=4 * HOUR)
    t4.saw([0, 1], T0)
    assert await t4.check([0, 1], T0 + 3 * HOUR) == [0]  # partition 1 never had an event: no clock to move


async def test_no_tick_when_nothing_is_due_and_a_revoked_partition_is_forgotten(model: BundleModel) -> None:
    parts = Partitions(model)
    updates = await parts.clicks(0, "calm", T0, n=3)  # too few clicks for any behaviour tag
    assert not any(u.get("added") for u in updates if u["reason"] == "behaviour")
    t = ticker(parts)
    t.saw([0], T0)
    assert await t.check([0], T0 + HOUR // 2) == [] and parts.sent == []
    # revoked, then assigned again: quiet only from its new assignment on
    assert await t.check([], T0 + HOUR // 2) == []
    await parts.clicks(0, "a", T0 + HOUR // 2)
    clock = T0 + HOUR // 2 + 29 * 5000
    assert await t.check([0], clock + HOUR // 2) == []
    assert await t.check([0], clock + HOUR // 2 + 60_000) == [0]


def test_ticks_are_on_by_default_and_zero_turns_them_off(tmp_path: Path) -> None:
    from streams.app import Worker

    on = Worker(WorkerSettings(data_dir=tmp_path, tick_idle_s=60), capture_output=True)
    off = Worker(WorkerSettings(data_dir=tmp_path, tick_idle_s=0), capture_output=True)
    assert on.ticker is not None and on.ticker.idle_ms == 60_000 and on.ticker.topic == on.settings.topic("behavior")
    assert off.ticker is None
