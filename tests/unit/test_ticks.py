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
    """The behaviour topic as the ticker sees it: a processor reading each partition (at wall time `wall`), and the
    records sent to it."""

    def __init__(self, model: BundleModel) -> None:
        self.wall = T0
        self.store = MemoryStateStore("t", clock=lambda: self.wall)
        self.processor = Processor(self.store, user_hash_key=b"secret", model_provider=lambda: model)
        self.offsets: dict[int, int] = {}
        self.sent: list[tuple[str, int, bytes, bytes, int]] = []
        self.read = 0
        self.sending_at = 0  # the Kafka timestamp a sent record gets (0: none, the store's clock stands in)

    async def get_store(self) -> MemoryStateStore:
        return self.store

    async def send(self, topic: str, partition: int, key: bytes, value: bytes) -> None:
        self.sent.append((topic, partition, key, value, self.sending_at))

    def message(self, partition: int, key: bytes, value: bytes, produced_at: int = 0) -> InMessage:
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        return InMessage("behavior", partition, offset, key, value, produced_at)

    async def clicks(
        self, partition: int, product: str, start: int, n: int = 30, users: int = 9, produced_lag: int | None = None
    ) -> list[dict]:
        """`n` clicks from `start` on, 5 s apart (produced `produced_lag` ms after they happened; None: records
        without a Kafka timestamp), read at wall time `wall`."""
        events = [behaviour(product, f"u{i % users}", start + i * 5000) for i in range(n)]
        out = await self.processor.process_behaviour(
            [
                self.message(
                    partition, product.encode(), orjson.dumps(e), 0 if produced_lag is None else e["ts"] + produced_lag
                )
                for e in events
            ]
        )
        return [orjson.loads(v) for _, v in out.updates]

    async def read_back(self) -> list[dict]:
        """The worker consuming what the ticker sent since the last read_back (at wall time `wall`)."""
        updates = []
        fresh, self.read = self.sent[self.read :], len(self.sent)
        for _, partition, key, value, produced_at in fresh:
            out = await self.processor.process_behaviour([self.message(partition, key, value, produced_at)])
            assert out.dead_letters == []
            updates += [orjson.loads(v) for _, v in out.updates]
        return updates


def ticker(parts: Partitions, idle_ms: int = 60_000, live_ms: int = HOUR) -> Ticker:
    return Ticker("behavior", idle_ms=idle_ms, live_ms=live_ms, worker_id="w1", store=parts.get_store, send=parts.send)


def removed(updates: list[dict]) -> list[tuple[str, list[str]]]:
    return [(u["product_id"], u["removed"]) for u in updates if u["reason"] == "window-expired"]


async def test_a_quiet_partition_gets_ticks_until_its_trending_and_hot_tags_are_off(model: BundleModel) -> None:
    parts = Partitions(model)
    clock = T0 + 299 * 5000  # the burst's last click
    parts.wall = clock + 2000  # read two seconds after it was made: a live stream
    added = [t for u in await parts.clicks(0, "a", T0, n=300, users=60) for t in u["added"]]
    assert {"trending", "hot"} <= set(added)
    await parts.clicks(1, "b", T0)
    t = ticker(parts)
    assert await t.check([0, 1], parts.wall) == []  # just assigned: quiet from now on
    t.saw([1], parts.wall + 2 * HOUR - 10_000)  # partition 1 keeps getting records
    now = parts.wall + 2 * HOUR
    assert await t.check([0, 1], now) == [0]
    [(topic, partition, key, value, _)] = parts.sent
    assert (topic, partition, key) == ("behavior", 0, TICK_KEY)
    # event time goes on from the partition's own at the wall clock's pace: two hours after it last rose
    assert WindowTick.decode(value) == WindowTick(clock + 2 * HOUR, "w1")
    parts.wall = now + 100
    assert removed(await parts.read_back()) == [("a", ["trending"])]
    # hot needs its 24 h window to pass: the partition stays quiet, far longer than an hour behind the wall clock,
    # and still gets the tick that turns hot off (before: an hour behind, it counted as a replay and got none)
    now = parts.wall + 23 * HOUR
    assert await t.check([0], now) == [0]
    parts.wall = now + 100
    assert removed(await parts.read_back()) == [("a", ["hot"])]
    assert await t.check([0], now + 30 * HOUR) == [] and t.sent == 2  # nothing left on: no more ticks


async def test_no_tick_for_a_replay_of_older_events(model: BundleModel) -> None:
    parts = Partitions(model)
    parts.wall = T0 + 3 * HOUR  # events of three hours ago read now: a replay, whose windows follow its own times
    assert any("trending" in u["added"] for u in await parts.clicks(0, "a", T0))
    t = ticker(parts)
    t.saw([0, 1], parts.wall)
    assert await t.check([0, 1], parts.wall + 2 * HOUR) == [] and parts.sent == []
    # the same with the replay read within live_ms of its times: live, and then the partition gets its tick
    lenient = ticker(parts, live_ms=4 * HOUR)
    lenient.saw([0, 1], parts.wall)
    assert await lenient.check([0, 1], parts.wall + 2 * HOUR) == [0]  # partition 1 never had an event: no tick


async def test_after_an_outage_a_new_worker_ticks_a_partition_left_quiet(model: BundleModel) -> None:
    parts = Partitions(model)
    parts.wall = T0 + 29 * 5000 + 1000
    assert any("trending" in u["added"] for u in await parts.clicks(0, "a", T0))
    # the worker stopped; another starts five hours later and owns the partition, still quiet
    successor = ticker(parts)
    restart = parts.wall + 5 * HOUR
    assert await successor.check([0], restart) == []  # just assigned
    assert await successor.check([0], restart + 60_000) == [0]
    parts.wall = restart + 60_100
    assert removed(await parts.read_back()) == [("a", ["trending"])]


async def test_no_tick_when_nothing_is_due_and_a_revoked_partition_is_forgotten(model: BundleModel) -> None:
    parts = Partitions(model)
    parts.wall = T0 + 20_000
    updates = await parts.clicks(0, "calm", T0, n=3)  # too few clicks for any behaviour tag
    assert not any(u.get("added") for u in updates if u["reason"] == "behaviour")
    t = ticker(parts)
    t.saw([0], parts.wall)
    assert await t.check([0], parts.wall + HOUR // 2) == [] and parts.sent == []
    # revoked, then assigned again: quiet only from its new assignment on
    assert await t.check([], parts.wall + HOUR // 2) == []
    parts.wall = T0 + HOUR // 2 + 29 * 5000 + 1000
    await parts.clicks(0, "a", T0 + HOUR // 2)
    assert await t.check([0], parts.wall + HOUR // 2) == []
    assert await t.check([0], parts.wall + HOUR // 2 + 60_000) == [0]


async def test_a_stream_read_late_is_no_replay_and_its_ticks_go_on_after_an_outage(model: BundleModel) -> None:
    # before: "live" was judged by when the worker read the records, so a burst read two hours late (workers down)
    # counted as a replay and got no tick, and so did a partition whose last tick was read after an outage
    parts = Partitions(model)
    clock = T0 + 29 * 5000
    parts.wall = clock + 2 * HOUR  # produced a second after each click, read two hours later
    assert any("trending" in u["added"] for u in await parts.clicks(0, "a", T0, produced_lag=1000))
    t = ticker(parts)
    t.saw([0], parts.wall)
    now = parts.wall + 60_000
    parts.sending_at = now
    assert await t.check([0], now) == [0]
    assert WindowTick.decode(parts.sent[-1][3]).ts == clock + (now - (clock + 1000))
    parts.wall = now + 3 * HOUR  # the tick is read after a three-hour outage: still the stream's own time
    assert removed(await parts.read_back()) == [("a", ["trending"])]
    assert await parts.store.watermark_raised("behavior", 0) == (clock + now - clock - 1000, now)


async def test_a_batch_is_as_live_as_its_liveliest_record(model: BundleModel) -> None:
    # before: the Kafka timestamp of the record with the newest time stood for the batch, so one late upload (an
    # offline client's) among live clicks made the partition a replay, and equal times depended on record order
    parts = Partitions(model)
    clock = T0 + 29 * 5000
    parts.wall = clock + 2000
    live = [behaviour("a", f"u{i % 9}", T0 + i * 5000) for i in range(30)]
    late = behaviour("b", "offline", clock)  # as new as the newest click, uploaded two hours later
    batch = [parts.message(0, e["product_id"].encode(), orjson.dumps(e), e["ts"] + 1000) for e in live]
    batch.append(parts.message(0, b"b", orjson.dumps(late), clock + 2 * HOUR))
    assert any(
        "trending" in u["added"]
        for u in (orjson.loads(v) for _, v in (await parts.processor.process_behaviour(batch)).updates)
    )
    assert await parts.store.watermark_raised("behavior", 0) == (clock, clock + 1000)
    t = ticker(parts)
    t.saw([0], parts.wall)
    assert await t.check([0], parts.wall + 2 * HOUR) == [0]


async def test_a_watermark_raised_by_a_worker_that_keeps_no_time_gets_no_tick(model: BundleModel) -> None:
    # a worker from before ticks raises the watermark and leaves the time kept for an older one: that time is not
    # used (before: a tick hours ahead of the stream, and trending off a minute after it came on)
    parts = Partitions(model)
    parts.wall = T0 + 29 * 5000 + 1000
    assert any("trending" in u["added"] for u in await parts.clicks(0, "a", T0))
    parts.store.hashes["t:watermark"]["behavior:0"] = str(T0 + 6 * HOUR)  # what an older worker's script writes
    assert await parts.store.watermark_raised("behavior", 0) == (T0 + 6 * HOUR, None)
    t = ticker(parts)
    t.saw([0], parts.wall)
    assert await t.check([0], parts.wall + 7 * HOUR) == [] and parts.sent == []


def test_ticks_are_on_by_default_and_zero_turns_them_off(tmp_path: Path) -> None:
    from streams.app import Worker

    on = Worker(WorkerSettings(data_dir=tmp_path, tick_idle_s=60), capture_output=True)
    off = Worker(WorkerSettings(data_dir=tmp_path, tick_idle_s=0), capture_output=True)
    assert on.ticker is not None and on.ticker.idle_ms == 60_000 and on.ticker.topic == on.settings.topic("behavior")
    assert off.ticker is None


@pytest.mark.parametrize("worker_id", ["", "w" * 257])
def test_a_worker_id_a_tick_cannot_carry_is_refused_at_start(worker_id: str) -> None:
    # before: accepted, and every tick then failed its schema (ticks silently off, a warning at every check)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="worker_id"):
        WorkerSettings(worker_id=worker_id)
    assert WindowTick(T0, WorkerSettings(worker_id="w" * 256).worker_id).to_dict()["worker_id"] == "w" * 256
