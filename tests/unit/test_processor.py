"""The worker's event logic with the in-memory state store: no Kafka, no Redis."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.exceptions import ResponseError

from schemas import TICK_KEY, ProductChange, Tag, WindowTick, validate
from serving.bundle import LabelMap
from streams.features import product_features
from streams.model import BundleModel, ShadowScoring, ShadowStats
from streams.processor import InMessage, Processor, dead_letter
from streams.settings import WorkerSettings
from streams.state import MemoryStateStore, Ops, ProductKeys, ProductState, Write
from tagstream.errors import EventDecodeError, OutputTooLargeError, StateError
from tests.events import behaviour, delete, upsert
from tests.models import featurized_bundle
from tests.tinymodel import DEFAULT_LABELS

T0 = 1_764_316_800_000


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BundleModel:
    return BundleModel.load(featurized_bundle(tmp_path_factory.mktemp("reg")), WorkerSettings())


@pytest.fixture
def processor(model: BundleModel) -> Processor:
    return Processor(MemoryStateStore("t"), user_hash_key=b"secret", model_provider=lambda: model)


class Feed:
    """Numbers messages per topic partition like Kafka does."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}

    def __call__(self, topic: str, *events: Any, partition: int = 0) -> list[InMessage]:
        out = []
        for ev in events:
            offset = self.offsets.get(topic, 0)
            self.offsets[topic] = offset + 1
            value = ev if isinstance(ev, bytes) else orjson.dumps(ev)
            key = ev["product_id"].encode() if isinstance(ev, dict) and "product_id" in ev else None
            out.append(InMessage(topic, partition, offset, key, value))
        return out


def updates(out: Any) -> list[dict[str, Any]]:
    return [orjson.loads(v) for _, v in out.updates]


async def test_an_upsert_emits_the_model_and_catalog_tags(processor: Processor, model: BundleModel) -> None:
    feed = Feed()
    event = upsert("p1", "Nike Women Red Running Shoes", attributes={"gender": "Women"})
    out = await processor.process_products(feed("products", event))
    [update] = updates(out)
    validate("tag-update", update)
    expected = {t.tag for t in model.score([ProductChange.from_dict(event)])[0]} | {"gender:Women", "new"}
    assert {t["tag"] for t in update["tags"]} == expected
    assert update["model_version"] == model.version and update["source"]["offset"] == 0


@pytest.mark.parametrize("title", ["   ", "\u200b", "!!! ??? ...", "\U0001f642\U0001f642"])
async def test_a_title_with_no_text_the_model_knows_gets_catalog_tags_only(processor: Processor, title: str) -> None:
    """Spaces, a zero-width space, punctuation or emoji: the model's priors were published as confident tags."""
    out = await processor.process_products(Feed()("products", upsert("blank", title, attributes={"colour": "Red"})))
    [update] = updates(out)
    assert not [t for t in update["tags"] if t["origin"] == "model"] and update["model_version"] is not None
    assert ("colour:Red", "catalog") in [(t["tag"], t["origin"]) for t in update["tags"]]


async def test_an_unchanged_upsert_emits_nothing_and_a_stale_version_is_ignored(processor: Processor) -> None:
    feed = Feed()
    await processor.process_products(feed("products", upsert("p1", "Levis Men Black Jeans", version=5)))
    again = await processor.process_products(feed("products", upsert("p1", "Levis Men Black Jeans", version=6)))
    assert again.updates == [] and again.applied == 1
    stale = await processor.process_products(feed("products", upsert("p1", "Totally different", version=4)))
    assert stale.updates == [] and stale.dead_letters == []
    assert stale.stale == 1 and again.stale == 0  # counted in the worker's stats line (was only an INFO line)
    state = (await processor.store.read(["p1"]))["p1"]
    assert state.doc["title"] == "Levis Men Black Jeans" and state.doc["version"] == "6"


async def test_a_redelivered_batch_is_a_no_op_that_resends_the_last_update(processor: Processor) -> None:
    feed = Feed()
    batch = feed("behavior", *[behaviour("p9", f"u{i % 7}", T0 + i * 1000) for i in range(30)])
    first = await processor.process_behaviour(batch)
    before = await processor.store.read(["p9"])
    again = await processor.process_behaviour(batch)
    after = await processor.store.read(["p9"])
    assert again.applied == 0 and again.redelivered == 1
    assert after["p9"].beh == before["p9"].beh  # nothing counted twice
    assert [u for _, u in again.updates] == [first.updates[-1][1]]  # the last update is sent again


async def test_a_redelivered_update_superseded_from_the_other_topic_is_not_sent_again(processor: Processor) -> None:
    # the state changed by a click burst (behavior topic), then by a catalog change (products topic); after a crash
    # both batches come back: the burst's stored update is stale and must not end up last on the topic
    feed = Feed()
    await processor.process_products(feed("products", upsert("p5", "Shoes", attributes={"colour": "Red"})))
    burst = feed("behavior", *[behaviour("p5", f"u{i % 9}", T0 + i * 5000) for i in range(30)])
    assert any("trending" in u["added"] for u in updates(await processor.process_behaviour(burst)))
    change = feed("products", upsert("p5", "Shoes", attributes={"colour": "Blue"}, version=2))
    [final] = updates(await processor.process_products(change))
    assert "colour:Blue" in {t["tag"] for t in final["tags"]}

    again_burst = await processor.process_behaviour(burst)
    again_change = await processor.process_products(change)
    assert again_burst.redelivered == 1 and again_burst.updates == []
    assert updates(again_change) == [final]


async def test_a_click_burst_turns_trending_on_and_it_expires_with_event_time(processor: Processor) -> None:
    feed = Feed()
    out = await processor.process_behaviour(
        feed("behavior", *[behaviour("hot", f"u{i % 9}", T0 + i * 5000) for i in range(30)])
    )
    assert any("trending" in u["added"] for u in updates(out))
    later = await processor.process_behaviour(feed("behavior", behaviour("other", "u1", T0 + 3 * 3_600_000)))
    expired = [u for u in updates(later) if u["product_id"] == "hot"]
    assert expired and expired[0]["reason"] == "window-expired" and "trending" in expired[0]["removed"]


def tick(offset: int, ts: int, partition: int = 0, value: bytes | None = None) -> InMessage:
    """A window tick on the behaviour topic, as a worker writes one to a quiet partition."""
    raw = value if value is not None else orjson.dumps(WindowTick(ts, "w1").to_dict())
    return InMessage("behavior", partition, offset, TICK_KEY, raw)


@pytest.mark.parametrize("cache", [0, 100])
async def test_a_tick_on_a_quiet_partition_expires_its_tags_and_a_restart_re_sends_the_expiry(
    model: BundleModel, cache: int
) -> None:
    store = MemoryStateStore("t")
    burst = [
        InMessage("behavior", 0, i, b"a", orjson.dumps(behaviour("a", f"u{i % 9}", T0 + i * 5000))) for i in range(30)
    ]
    worker = Processor(store, user_hash_key=b"secret", model_provider=lambda: model, state_cache=cache)
    assert any("trending" in u["added"] for u in updates(await worker.process_behaviour(burst)))
    # the partition gets no event: a tick two hours of event time later turns trending off, as an event would
    out = await worker.process_behaviour([tick(30, T0 + 2 * 3_600_000)])
    [expired] = updates(out)
    assert expired["product_id"] == "a" and expired["reason"] == "window-expired"
    assert expired["removed"] == ["trending"] and expired["source"] == {
        "topic": "behavior",
        "partition": 0,
        "offset": 30,
    }
    assert out.dead_letters == [] and out.applied == 0
    state = (await store.read(["a"]))["a"]
    assert state.tags is not None and "trending" not in {t["tag"] for t in state.tags["tags"]}
    # the worker died before the update reached Kafka: its successor gets the tick again and sends it again
    successor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model, state_cache=cache)
    assert updates(await successor.process_behaviour([tick(30, T0 + 2 * 3_600_000)])) == [expired]
    # a later tick is no redelivery: nothing to send
    assert updates(await successor.process_behaviour([tick(31, T0 + 3 * 3_600_000)])) == []


async def test_a_tick_inside_a_batch_of_events_moves_only_its_own_partitions_clock(processor: Processor) -> None:
    feed = Feed()
    burst = [behaviour("a", f"u{i % 9}", T0 + i * 5000) for i in range(30)]
    await processor.process_behaviour(feed("behavior", *burst, partition=1))
    late = T0 + 2 * 3_600_000
    batch = [tick(0, late, partition=0), *feed("behavior", behaviour("b", "u1", T0 + 200_000), partition=1)]
    out = await processor.process_behaviour(batch)
    assert [u["product_id"] for u in updates(out) if u["reason"] == "window-expired"] == []  # a's partition: 1
    assert out.applied == 1
    swept = await processor.process_behaviour([tick(1, late, partition=1)])
    assert [(u["product_id"], u["removed"]) for u in updates(swept)] == [("a", ["trending"])]


async def test_a_bad_tick_is_dead_lettered_and_an_event_keyed_like_a_tick_is_read_as_a_tick(
    processor: Processor,
) -> None:
    clicks = orjson.dumps(behaviour("p", "u1", T0))
    out = await processor.process_behaviour(
        [tick(0, T0, value=b'{"schema_version": 1, "ts": -5}'), tick(1, T0, value=clicks)]
    )
    assert out.updates == [] and len(out.dead_letters) == 2
    reasons = [orjson.loads(v)["reason"] for _, v, _ in out.dead_letters]
    assert all(r.startswith("tick:") for r in reasons), reasons


class SweepCountingStore(MemoryStateStore):
    """The in-memory store, counting each product's window-expiry writes (sweeps)."""

    def __init__(self) -> None:
        super().__init__("t")
        self.sweeps: dict[str, int] = {}

    async def apply(self, writes: list[Any]) -> list[Any]:
        for w in writes:
            if w.fence_field.startswith("sweep:"):
                self.sweeps[w.product_id] = self.sweeps.get(w.product_id, 0) + 1
        return await super().apply(writes)


async def test_a_tag_past_its_minimum_dwell_is_swept_once_not_at_every_batch(model: BundleModel) -> None:
    store = SweepCountingStore()
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model)
    feed = Feed()
    out = await processor.process_behaviour(
        feed("behavior", *[behaviour("hot", f"u{i % 9}", T0 + i * 5000) for i in range(30)])
    )
    assert any("trending" in u["added"] for u in updates(out))
    # other products' clicks move the partition's event time past trending's 10-minute dwell, one minute a batch;
    # the burst stays in the 1-hour window, so trending stays on and needs no look until that window loses it
    for minute in range(15, 25):
        later = await processor.process_behaviour(feed("behavior", behaviour("other", "u1", T0 + minute * 60_000)))
        assert [u for u in updates(later) if u["product_id"] == "hot"] == []
    assert store.sweeps["hot"] == 1
    expired = await processor.process_behaviour(feed("behavior", behaviour("other", "u2", T0 + 2 * 3_600_000)))
    assert [u["removed"] for u in updates(expired) if u["product_id"] == "hot"] == [["trending"]]
    assert store.sweeps["hot"] == 2


async def test_a_late_event_never_turns_new_on_again_after_a_pass_turned_it_off(model: BundleModel) -> None:
    store = MemoryStateStore("t")
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model)
    feed = Feed()
    new_ends = T0 + 7 * 86_400_000
    created = await processor.process_products(feed("products", upsert("p", "Levis Men Black Jeans", updated_at=T0)))
    assert [u["added"] for u in updates(created) if "new" in u["added"]]
    swept = await processor.process_behaviour(feed("behavior", behaviour("q", "u2", new_ends + 1000)))
    assert [u["removed"] for u in updates(swept) if u["product_id"] == "p"] == [["new"]]
    # at p's own clock it would still be new, but its switch off was decided later: it stays off, no flapping
    late = await processor.process_behaviour(feed("behavior", behaviour("p", "u3", new_ends - 1000)))
    assert updates(late) == []
    again = await processor.process_behaviour(feed("behavior", behaviour("q", "u4", new_ends + 500)))
    assert [u for u in updates(again) if u["product_id"] == "p"] == []
    state = (await store.read(["p"]))["p"]
    assert state.tags is not None and "new" not in {t["tag"] for t in state.tags["tags"]}


async def test_clicks_from_before_a_products_first_change_leave_it_new(model: BundleModel) -> None:
    """A click log replayed after the catalog: a click older than the product's first change neither turns `new`
    off nor drops the product from the looks that turn it off a week later."""
    store = MemoryStateStore("t")
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model)
    feed = Feed()
    day = 86_400_000
    created = await processor.process_products(feed("products", upsert("p", "Levis Men Black Jeans", updated_at=T0)))
    assert [u["added"] for u in updates(created) if "new" in u["added"]]
    early = await processor.process_behaviour(feed("behavior", behaviour("p", "u1", T0 - 2 * 3_600_000)))
    assert updates(early) == []
    later = await processor.process_behaviour(feed("behavior", behaviour("q", "u2", T0 + day)))
    assert [u for u in updates(later) if u["product_id"] == "p"] == []
    state = (await store.read(["p"]))["p"]
    assert state.tags is not None and "new" in {t["tag"] for t in state.tags["tags"]}
    week = await processor.process_behaviour(feed("behavior", behaviour("q", "u3", T0 + 7 * day + 1000)))
    assert [u["removed"] for u in updates(week) if u["product_id"] == "p"] == [["new"]]


async def test_a_window_pass_records_the_clock_it_moved_the_windows_to(model: BundleModel) -> None:
    store = MemoryStateStore("t")
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model)
    feed = Feed()
    out = await processor.process_behaviour(
        feed("behavior", *[behaviour("hot", f"u{i % 9}", T0 + i * 5000) for i in range(30)])
    )
    assert any("trending" in u["added"] for u in updates(out))
    later = T0 + 3 * 3_600_000
    expired = await processor.process_behaviour(feed("behavior", behaviour("other", "u1", later)))
    assert [u["removed"] for u in updates(expired) if u["product_id"] == "hot"] == [["trending"]]
    features = await product_features(store, "hot")
    assert features is not None and features["as_of"] == later  # not its last event's time, 3 hours before
    assert features["windows"]["h1"]["clicks"] == 0 and features["windows"]["h24"]["clicks"] == 30
    tags = (await store.read(["hot"]))["hot"].tags
    assert tags is not None and tags["updated_at"] == later  # the pass changed the tag state then


@pytest.mark.parametrize("changed", ["b", "a"])  # the batch's own product, or the product it sweeps
async def test_a_window_expiry_is_sent_when_its_batch_meets_another_writer(model: BundleModel, changed: str) -> None:
    store = MemoryStateStore("t")
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model, state_cache=100)
    feed = Feed()
    burst = [behaviour("a", f"u{i % 9}", T0 + i * 5000) for i in range(30)] + [behaviour("b", "x", T0)]
    assert any("trending" in u["added"] for u in updates(await processor.process_behaviour(feed("behavior", *burst))))
    # another writer (a re-tag run, another worker after a rebalance) changes a product the worker keeps
    keys = ProductKeys(store.prefix, changed)
    ops = Ops(keys)
    ops.set(keys.tags, orjson.dumps((await store.read([changed]))[changed].tags))
    assert (await store.apply([Write(changed, "retag:v2", 1, ops)]))[0].applied
    later = await processor.process_behaviour(feed("behavior", behaviour("b", "y", T0 + 2 * 3_600_000)))
    assert processor.conflicts == 1
    assert [u["removed"] for u in updates(later) if u["product_id"] == "a"] == [["trending"]]
    state = (await store.read(["a"]))["a"]
    assert state.tags is not None and "trending" not in {t["tag"] for t in state.tags["tags"]}


@pytest.mark.parametrize("cache", [0, 100])
async def test_a_restart_re_sends_the_window_expiry_of_a_redelivered_batch(model: BundleModel, cache: int) -> None:
    store = MemoryStateStore("t")
    burst = [
        InMessage("behavior", 0, i, b"a", orjson.dumps(behaviour("a", f"u{i % 9}", T0 + i * 5000))) for i in range(30)
    ]
    later = [InMessage("behavior", 0, 30, b"b", orjson.dumps(behaviour("b", "y", T0 + 2 * 3_600_000)))]
    worker = Processor(store, user_hash_key=b"secret", model_provider=lambda: model, state_cache=cache)
    await worker.process_behaviour(burst)
    [expired] = [u for u in updates(await worker.process_behaviour(later)) if u["product_id"] == "a"]
    assert expired["removed"] == ["trending"]
    # the worker died before that update reached Kafka: its successor gets the batch again
    successor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model, state_cache=cache)
    again = await successor.process_behaviour(later)
    assert [u for u in updates(again) if u["product_id"] == "a"] == [expired]
    # a batch after it is no redelivery: nothing is sent again
    after = [InMessage("behavior", 0, 31, b"b", orjson.dumps(behaviour("b", "z", T0 + 2 * 3_600_000 + 1)))]
    assert [u for u in updates(await successor.process_behaviour(after)) if u["product_id"] == "a"] == []


class OutOfMemoryStore(MemoryStateStore):
    """The in-memory store answering every write as a Redis out of memory does."""

    async def apply(self, writes: list[Any]) -> list[Any]:
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")


async def test_a_state_store_failure_is_raised_not_dead_lettered(processor: Processor) -> None:
    broken = Processor(OutOfMemoryStore("t"), user_hash_key=b"secret", model_provider=processor.model_provider)
    messages = Feed()("behavior", behaviour("p", "u1", T0), behaviour("p", "u2", T0 + 1))
    # the worker's fallback after a failed batch: one message at a time, dead-lettering the bad ones; a Redis that
    # refuses writes is no bad event, and its events must not be dead-lettered (they are valid and would be lost)
    with pytest.raises(ResponseError, match="OOM"):
        await broken.process_each(messages, broken.process_behaviour)


async def test_the_tag_state_time_moves_only_when_the_tags_change(processor: Processor) -> None:
    feed = Feed()
    await processor.process_products(feed("products", upsert("p1", "Levis Men Black Jeans", updated_at=T0)))

    async def tag_state() -> dict[str, Any]:
        state = (await processor.store.read(["p1"]))["p1"]
        assert state.tags is not None
        return state.tags

    await processor.process_behaviour(feed("behavior", behaviour("p1", "u1", T0 + 30_000, "view")))
    before = await tag_state()
    quiet = await processor.process_behaviour(feed("behavior", behaviour("p1", "u2", T0 + 60_000, "view")))
    assert quiet.updates == [] and await tag_state() == before and before["updated_at"] < T0 + 60_000
    burst = [behaviour("p1", f"u{i % 9}", T0 + 120_000 + i * 5000) for i in range(30)]
    out = await processor.process_behaviour(feed("behavior", *burst))
    [turned_on] = [u for u in updates(out) if "trending" in u["added"]]
    stored = await tag_state()
    assert "trending" in {t["tag"] for t in stored["tags"]} and stored["updated_at"] == turned_on["event_time"] > T0


async def test_few_users_cannot_make_a_product_trend(processor: Processor) -> None:
    feed = Feed()
    out = await processor.process_behaviour(
        feed("behavior", *[behaviour("bot", f"u{i % 2}", T0 + i * 1000) for i in range(60)])
    )
    assert not any("trending" in u["added"] for u in updates(out))


class CountingStore(MemoryStateStore):
    """The in-memory store, recording which products had their unique users counted."""

    def __init__(self) -> None:
        super().__init__("t")
        self.counted: list[str] = []
        self.read_with_users: list[str] = []

    async def read(
        self, product_ids: list[str], now: dict[str, int] | None = None, *, counters: bool = True
    ) -> dict[str, ProductState]:
        self.read_with_users += sorted(now or {})
        return await super().read(product_ids, now, counters=counters)

    async def count_users(
        self, now: dict[str, int], batch: dict[str, list[set[str]]] | None = None
    ) -> dict[str, dict[str, int]]:
        self.counted += sorted(now)
        return await super().count_users(now, batch)


@pytest.mark.parametrize(
    ("earlier_users", "trends"),
    [(9, True), (1, False)],  # the users of an earlier batch count towards trending's 5, the repeat users do not
)
async def test_unique_users_of_earlier_batches_decide_trending(
    model: BundleModel, earlier_users: int, trends: bool
) -> None:
    store = CountingStore()
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model)
    feed = Feed()
    first = [behaviour("p", f"u{i % earlier_users}", T0 + i * 1000) for i in range(15)]  # < 20 interactions
    assert updates(await processor.process_behaviour(feed("behavior", *first))) == []
    second = [behaviour("p", "u0", T0 + 20_000 + i * 1000) for i in range(10)]  # one user, 25 interactions in all
    out = await processor.process_behaviour(feed("behavior", *second))
    assert any("trending" in u["added"] for u in updates(out)) is trends
    assert store.counted == ["p"]  # counted once: in the second batch, where the users decided
    # from then on its users come with its read, and still decide: 4 users make 5 (or 13) when they are new; the
    # read's count (before the batch) and the batch's 4 users leave 4 to 5 (or 9 to 13) users, so the union of
    # the two is counted (one more round trip) where that decides
    third = [behaviour("p", f"new{i % 4}", T0 + 40_000 + i * 1000) for i in range(8)]
    out = await processor.process_behaviour(feed("behavior", *third))
    assert store.read_with_users == ["p"]
    assert store.counted == (["p"] if trends else ["p", "p"])
    assert any("trending" in u["added"] for u in updates(out)) is not trends


async def test_users_of_earlier_batches_who_come_back_count_once(model: BundleModel) -> None:
    """A window's unique users are the union of the users stored before a batch and the batch's own: four users
    who view a product in two batches are four users (trending needs five), whatever the batches."""
    store = CountingStore()
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model)
    feed = Feed()
    for batch in range(4):  # 15 views of 4 users each time: 20+ interactions, a ratio far above 3
        views = [behaviour("p", f"u{i % 4}", T0 + batch * 60_000 + i * 1000) for i in range(15)]
        out = await processor.process_behaviour(feed("behavior", *views))
        assert updates(out) == [], batch
    state = (await store.read(["p"], now={"p": T0 + 240_000}))["p"]
    assert state.users["h1"] == 4
    # a fifth user, in the next batch, makes five
    out = await processor.process_behaviour(feed("behavior", behaviour("p", "u4", T0 + 250_000)))
    assert [u["added"] for u in updates(out)] == [["trending"]]


async def test_hot_needs_its_unique_users_however_often_they_come_back(model: BundleModel) -> None:
    """hot needs 200 interactions of 50 users in 24 h: 40 users viewing 220 times in two batches stay below it."""
    store = CountingStore()
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model)
    feed = Feed()
    hour = 3_600_000
    for batch in range(2):  # an hour apart: trending's 1 h window never holds the ratio it needs twice
        views = [behaviour("h", f"u{i % 40}", T0 + batch * 2 * hour + i * 1000) for i in range(110)]
        out = await processor.process_behaviour(feed("behavior", *views))
        assert not any("hot" in u["added"] for u in updates(out)), batch
    more = [behaviour("h", f"v{i}", T0 + 2 * hour + 200_000 + i * 1000) for i in range(10)]  # 50 users in all
    out = await processor.process_behaviour(feed("behavior", *more))
    assert any("hot" in u["added"] for u in updates(out))


async def test_unique_users_are_not_counted_for_products_far_from_every_threshold(
    model: BundleModel,
) -> None:
    store = CountingStore()
    processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model)
    feed = Feed()
    for batch in range(3):
        events = [behaviour(f"p{i}", f"u{i + batch}", T0 + batch * 60_000 + i) for i in range(50)]
        await processor.process_behaviour(feed("behavior", *events))
    assert store.counted == []
    state = (await store.read(["p7"], now={"p7": T0 + 180_000}))["p7"]
    assert state.users["h1"] == 3  # the users were still recorded


async def test_a_delete_removes_every_tag_and_later_clicks_add_none(processor: Processor) -> None:
    feed = Feed()
    await processor.process_products(feed("products", upsert("d1", "小米 充电宝", attributes={"colour": "White"})))
    out = await processor.process_products(feed("products", delete("d1")))
    [update] = updates(out)
    assert update["deleted"] and update["tags"] == [] and "colour:White" in update["removed"]
    clicks = await processor.process_behaviour(feed("behavior", *[behaviour("d1", f"u{i}", T0 + i) for i in range(40)]))
    assert clicks.updates == []


async def test_bad_messages_become_dead_letters_and_the_rest_is_applied(processor: Processor) -> None:
    feed = Feed()
    msgs = feed("products", b"{not json", upsert("ok", "Levis Men Black Jeans"), {"schema_version": 1, "op": "x"})
    out = await processor.process_products(msgs)
    assert [orjson.loads(u)["product_id"] for _, u in out.updates] == ["ok"]
    dead = [orjson.loads(v) for _, v, _ in out.dead_letters]
    assert [d["source"]["offset"] for d in dead] == [0, 2]
    assert dead[0]["error_type"] == "EventDecodeError" and dead[1]["error_type"] == "SchemaValidationError"


@pytest.mark.parametrize("topic", ["products", "behavior"])
async def test_an_event_not_keyed_by_its_product_id_is_dead_lettered_and_changes_nothing(
    processor: Processor, topic: str
) -> None:
    event = upsert("p1", "Levis Men Black Jeans") if topic == "products" else behaviour("p1", "u1", T0)
    value = orjson.dumps(event)
    msgs = [InMessage(topic, 0, 0, None, value), InMessage(topic, 0, 1, b"p2", value)]
    process = processor.process_products if topic == "products" else processor.process_behaviour
    out = await process(msgs)
    dead = [orjson.loads(v) for _, v, _ in out.dead_letters]
    assert [d["error_type"] for d in dead] == ["EventKeyError", "EventKeyError"]
    assert "has no key" in dead[0]["reason"] and "keyed by its product_id ('p1'" in dead[0]["reason"]
    assert "key 'p2' is not its product_id" in dead[1]["reason"]
    assert [k for k, _, _ in out.dead_letters] == [None, b"p2"]  # the records are kept whole
    assert out.applied == 0 and not out.updates
    store = processor.store
    assert isinstance(store, MemoryStateStore)
    assert not any("p1" in key or "p2" in key for key in store.hashes)
    keyed = await process([InMessage(topic, 0, 2, b"p1", value)])  # the same event keyed right is applied
    assert keyed.applied == 1 and not keyed.dead_letters


async def test_a_key_that_differs_from_the_product_id_in_normal_form_only_is_named_so(processor: Processor) -> None:
    """`café` keyed in NFD, its product_id in NFC: the reason showed two strings that print alike."""
    value = orjson.dumps(upsert("caf\u00e9", "Levis Men Black Jeans"))
    out = await processor.process_products([InMessage("products", 0, 0, "cafe\u0301".encode(), value)])
    [(_, raw, _)] = out.dead_letters
    reason = orjson.loads(raw)["reason"]
    assert "they differ in Unicode normal form only: key 'cafe\\u0301', product_id 'caf\\xe9'" in reason


async def test_the_store_records_the_last_offset_applied_from_each_input_partition(processor: Processor) -> None:
    feed = Feed()
    await processor.process_products(feed("products", upsert("p1", "Levis Men Black Jeans"), upsert("p2", "Nike")))
    clicks = [behaviour("p1", f"u{i}", T0 + i * 3_600_000) for i in range(3)]
    await processor.process_behaviour(feed("behavior", *clicks, partition=3))
    store = processor.store
    assert isinstance(store, MemoryStateStore)
    assert store.hashes["t:offsets"] == {"products:0": "1:0", "behavior:3": "2:0"}  # offset:Kafka timestamp
    late = feed("behavior", behaviour("p1", "u9", T0), partition=3)
    late[0] = replace(late[0], offset=1, timestamp_ms=T0)  # a late batch of a worker that lost the partition
    await processor.process_behaviour(late)
    assert store.hashes["t:offsets"]["behavior:3"] == "2:0"  # the highest offset is kept


async def test_a_write_partly_covering_offsets_another_worker_applied_is_processed_again(model: BundleModel) -> None:
    store = MemoryStateStore("t")  # shared by an old owner finishing a batch and the partition's new owner
    old_owner, new_owner = (Processor(store, user_hash_key=b"k", model_provider=lambda: model) for _ in range(2))
    events = [behaviour("r1", f"u{i}", T0 + i, "view") for i in range(10)]
    views = [InMessage("behavior", 0, i, b"r1", orjson.dumps(e)) for i, e in enumerate(events)]
    read = store.read

    async def old_owner_writes_after_the_read(*args: Any, **kwargs: Any) -> Any:
        store.read = read  # type: ignore[method-assign]
        states = await read(*args, **kwargs)
        await old_owner.process_behaviour(views[:5])
        return states

    store.read = old_owner_writes_after_the_read  # type: ignore[method-assign]
    assert (await new_owner.process_behaviour(views)).applied == 5 and new_owner.conflicts == 1
    day = [v for k, v in store.hashes["t:{r1}:beh"].items() if k.startswith("d:") and k.endswith(":view")]
    assert day == ["10"]


def test_a_dead_letter_keeps_its_source_records_headers_and_kafka_timestamp() -> None:
    headers = [("traceparent", b"00-ab-cd-01"), ("origin", b"\xff binary"), ("origin", b"twice")]
    msg = InMessage("products", 3, 17, b"p-1", b"{not json", 1_764_316_800_123, headers)
    key, value, sent = dead_letter(msg, EventDecodeError("not JSON"))
    assert key == b"p-1" and orjson.loads(value)["source"] == {"topic": "products", "partition": 3, "offset": 17}
    assert sent == [*headers, ("tagstream-source-timestamp", b"1764316800123")]


def test_a_dead_letter_too_large_for_its_topic_leaves_out_headers_then_the_value_and_says_so() -> None:
    from schemas import DeadLetter
    from streams.topics import DEAD_LETTER_MAX_BYTES

    # compressed on the wire, an event can carry megabytes its topic accepted: the letter must still fit its topic
    big_headers = [(f"h{i}", b"\0" * 2**20) for i in range(5)]
    msg = InMessage("products", 1, 9, b"p-1", b"{not json", 1_764_316_800_123, big_headers)
    _, value, headers = dead_letter(msg, EventDecodeError("not JSON"))
    letter = DeadLetter.decode(value)
    assert headers == [("tagstream-source-timestamp", b"1764316800123"), ("tagstream-headers-dropped", b"5")]
    assert letter.value_b64 is not None and "its 5 headers (5242890 bytes) were left out: too large" in letter.reason
    huge = InMessage("products", 1, 10, b"p-1", b"x" * (4 * 2**20), 1, big_headers)
    _, value, headers = dead_letter(huge, EventDecodeError("not JSON"))
    letter = DeadLetter.decode(value)
    assert letter.value_b64 is None and len(value) + sum(len(v) for _, v in headers) < DEAD_LETTER_MAX_BYTES
    assert "its value (4194304 bytes) was left out" in letter.reason
    assert "it is at products:1@10 until retention removes it" in letter.reason


async def test_a_product_change_with_an_attribute_named_like_a_category_group_is_dead_lettered_by_name(
    processor: Processor,
) -> None:
    store = processor.store
    assert isinstance(store, MemoryStateStore)
    feed = Feed()
    msgs = feed(
        "products",
        upsert("bad", "Nike Women Red Running Shoes", attributes={"gender": "Women", "Category_L1": "Footwear"}),
        upsert("ok", "Levis Men Black Jeans", attributes={"gender": "Men"}),
    )
    out = await processor.process_products(msgs)
    assert [orjson.loads(u)["product_id"] for _, u in out.updates] == ["ok"]
    [letter] = [orjson.loads(v) for _, v, _ in out.dead_letters]
    assert letter["error_type"] == "SchemaValidationError" and "'Category_L1'" in letter["reason"]
    assert letter["source"]["offset"] == 0
    keys = (*store.hashes, *store.strings)
    assert any(key.startswith("t:{ok}") for key in keys) and not any(key.startswith("t:{bad}") for key in keys)


@pytest.mark.parametrize(
    "attributes",
    [{"gender": "Men", "Gender": "Women"}, {"gender": "Men", "GENDER": "Men"}, {"color": "Red", "colour": "Green"}],
)
async def test_a_product_change_naming_one_attribute_twice_is_dead_lettered_not_given_two_values(
    processor: Processor, attributes: dict[str, str]
) -> None:
    feed = Feed()
    out = await processor.process_products(
        feed("products", upsert("p", "Levis Men Black Jeans", attributes=attributes))
    )
    assert out.updates == [] and out.applied == 0
    [letter] = [orjson.loads(v) for _, v, _ in out.dead_letters]
    first, second = attributes
    assert (
        letter["error_type"] == "EventDecodeError"
        and f"{first!r} and {second!r} name one tag group" in letter["reason"]
    )


async def test_user_ids_never_reach_the_state_store_in_clear(processor: Processor) -> None:
    feed = Feed()
    await processor.process_behaviour(feed("behavior", behaviour("p", "alice@example.com", T0)))
    store = processor.store
    assert isinstance(store, MemoryStateStore)
    dumped = repr(store.hashes) + repr(store.strings) + repr(store.hlls)
    assert "alice" not in dumped
    assert any(members for members in store.hlls.values())


async def test_a_batch_needs_no_model_to_give_catalog_and_behaviour_tags(tmp_path: Path) -> None:
    processor = Processor(MemoryStateStore("t"), user_hash_key=b"k")
    out = await processor.process_products(Feed()("products", upsert("p", "x", attributes={"size": "M"})))
    [update] = updates(out)
    assert [t["tag"] for t in update["tags"]] == ["size:M", "new"] and update["model_version"] is None


class _FixedModel:
    """A scoring model giving every product one tag named after its version."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.scored = 0

    def score(self, products: Any) -> list[list[Tag]]:
        self.scored += len(products)
        return [[Tag(f"model:{self.version}", "model", 0.9, "model")] for _ in products]


class _PhoneModel:
    """A scoring model tagging every product as a phone, two category levels deep, with the tiny bundles' labels."""

    version = "phones"
    labels = LabelMap.from_json(DEFAULT_LABELS)

    def score(self, products: Any) -> list[list[Tag]]:
        path = [("category:手机通讯", "category_l1"), ("category:手机通讯/手机", "category_l2")]
        return [[Tag(tag, group, 0.9, "model") for tag, group in path] for _ in products]


async def test_a_shadow_model_leaves_the_merged_tags_as_the_active_model_gives_them() -> None:
    scoring = ShadowScoring(_PhoneModel(), _PhoneModel(), deque(), ShadowStats("phones", "phones-2"))  # type: ignore[arg-type]
    processor = Processor(MemoryStateStore("t"), user_hash_key=b"secret", model_provider=lambda: scoring)
    event = upsert("p", "华为 Mate 60 Pro 5G手机", attributes={"Colour": "Black"})
    [update] = updates(await processor.process_products(Feed()("products", event)))
    assert [t["tag"] for t in update["tags"]] == ["category:手机通讯", "category:手机通讯/手机", "colour:Black", "new"]


async def test_a_batch_prepared_before_a_swap_is_scored_again_by_the_new_model() -> None:
    old, new = _FixedModel("v1"), _FixedModel("v2")
    active: list[_FixedModel] = [old]
    processor = Processor(MemoryStateStore("t"), user_hash_key=b"k", model_provider=lambda: active[0])
    messages = Feed()("products", upsert("p1", "Red shoes"), upsert("p2", "Blue shirt"))
    prepared = await processor.prepare_products(messages)  # scored outside the lock, by v1
    assert old.scored == 2
    active[0] = new  # the swap lands while the batch waits for the lock
    out = await processor.process_products(messages, prepared)
    got = updates(out)
    assert [u["model_version"] for u in got] == ["v2", "v2"]
    assert all({t["tag"] for t in u["tags"]} == {"model:v2", "new"} for u in got)

    unchanged = Feed()
    unchanged.offsets["products"] = 2
    more = unchanged("products", upsert("p3", "Green hat"))
    prepared = await processor.prepare_products(more)
    out = await processor.process_products(more, prepared)  # no swap: the prepared scores are used as they are
    assert new.scored == 3 and {t["tag"] for t in updates(out)[0]["tags"]} == {"model:v2", "new"}


class _ShoeModel:
    """A scoring model tagging every product as shoes, whatever its version."""

    def __init__(self, version: str) -> None:
        self.version = version

    def score(self, products: Any) -> list[list[Tag]]:
        return [[Tag("category:Shoes", "category_l1", 0.9, "model")] for _ in products]


async def test_an_upsert_scored_by_another_model_with_the_same_tags_sends_an_update_naming_it() -> None:
    """Found by an upgrade review: a product changed after a swap, whose tags the new model left as they were, kept
    a last update naming the old model while its stored tags (and the lookup) named the new one; the swap's re-tag
    then skipped it as already at the active model, so no update ever named the model its tags came from."""
    active = [_ShoeModel("v1")]
    processor = Processor(MemoryStateStore("t"), user_hash_key=b"k", model_provider=lambda: active[0])
    feed = Feed()
    [first] = updates(await processor.process_products(feed("products", upsert("p1", "Red shoes", version=1))))
    assert first["model_version"] == "v1"
    active[0] = _ShoeModel("v2")
    [second] = updates(await processor.process_products(feed("products", upsert("p1", "Red shoes", version=2))))
    assert second["model_version"] == "v2" and second["tags"] == first["tags"]
    assert second["added"] == [] and second["removed"] == []
    stored = (await processor.store.read(["p1"]))["p1"].tags
    assert stored is not None and stored["model_version"] == "v2"
    # the same model again: nothing to say
    assert updates(await processor.process_products(feed("products", upsert("p1", "Red shoes", version=3)))) == []


async def test_a_large_upsert_batch_is_scored_in_steps_that_let_other_tasks_run(model: BundleModel) -> None:
    calls: list[tuple[int, int]] = []  # (rows scored, ticks of the other task so far)
    ticks = 0

    class Counting:
        version = model.version

        def score(self, products: Any) -> list[list[Tag]]:
            calls.append((len(products), ticks))
            return model.score(products)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    processor = Processor(MemoryStateStore("t"), user_hash_key=b"k", score_step=2, model_provider=Counting)
    feed = Feed()
    events = [upsert(f"p{i}", f"Red Running Shoes {i}") for i in range(5)]
    other = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    try:
        out = await processor.process_products(feed("products", *events))
    finally:
        other.cancel()
    assert [n for n, _ in calls] == [2, 2, 1]
    assert calls[0][1] < calls[1][1] < calls[2][1]  # the loop ran the other task between steps
    assert len(updates(out)) == 5 and all(u["tags"] for u in updates(out))


async def test_behaviour_lanes_end_in_the_state_and_updates_of_one_lane(model: BundleModel) -> None:
    def messages() -> list[InMessage]:
        feed, out = Feed(), []
        for i in range(600):  # 12 products over 4 partitions (a product's events all in its own partition)
            pid = f"p{i % 12}"
            out += feed("behavior", behaviour(pid, f"u{i % 17}", T0 + i * 4000), partition=(i % 12) % 4)
        return out

    results = []
    for lanes in (1, 3):
        store = MemoryStateStore("t", clock=lambda: T0)  # time kept with a watermark (no Kafka timestamps here)
        processor = Processor(
            store, user_hash_key=b"secret", model_provider=lambda: model, behaviour_lanes=lanes, lane_min_events=1
        )
        batch = messages()
        outs = [await processor.process_behaviour(batch[i : i + 200]) for i in range(0, len(batch), 200)]
        sent = sorted(orjson.dumps(orjson.loads(v) | {"emit_time": 0}) for o in outs for _, v in o.updates)
        hashes = {
            k: {f: (orjson.loads(v) | {"emit_time": 0} if f.startswith("emit:") else v) for f, v in h.items()}
            for k, h in store.hashes.items()
        }
        results.append((sent, hashes, dict(store.strings), sum(o.applied for o in outs)))
    (one_sent, *one_state), (lanes_sent, *lanes_state) = results
    assert lanes_sent == one_sent and any(b"trending" in u for u in one_sent)
    assert lanes_state == one_state and one_state[-1] == 600


async def test_an_error_in_one_lane_is_raised_as_it_is_after_every_lane_ran(model: BundleModel) -> None:
    class FailingStore(MemoryStateStore):
        async def read(
            self, product_ids: list[str], now: dict[str, int] | None = None, *, counters: bool = True
        ) -> dict[str, ProductState]:
            if "bad" in product_ids:
                raise StateError("redis went away")
            return await super().read(product_ids, now, counters=counters)

    store = FailingStore("t")
    processor = Processor(
        store, user_hash_key=b"secret", model_provider=lambda: model, behaviour_lanes=2, lane_min_events=1
    )
    feed = Feed()
    batch = feed("behavior", behaviour("bad", "u1", T0), partition=0) + feed(
        "behavior", behaviour("good", "u1", T0), partition=1
    )
    with pytest.raises(StateError, match="went away"):
        await processor.process_behaviour(batch)
    assert (await store.read(["good"]))["good"].applied_offset("behavior:1") == 1  # the other lane finished


async def test_a_small_behaviour_batch_runs_in_one_lane_and_one_read(model: BundleModel) -> None:
    class CountingStore(MemoryStateStore):
        reads = 0

        async def read(
            self, product_ids: list[str], now: dict[str, int] | None = None, *, counters: bool = True
        ) -> dict[str, ProductState]:
            self.reads += 1
            return await super().read(product_ids, now, counters=counters)

    def batch(n: int) -> list[InMessage]:
        feed, out = Feed(), []
        for i in range(n):  # 8 products over 4 partitions
            out += feed("behavior", behaviour(f"p{i % 8}", f"u{i}", T0 + i), partition=i % 4)
        return out

    for n, reads in ((100, 1), (256, 2), (1000, 2)):  # lanes: one per 128 events, at most behaviour_lanes
        store = CountingStore("t")
        processor = Processor(store, user_hash_key=b"secret", model_provider=lambda: model, behaviour_lanes=2)
        out = await processor.process_behaviour(batch(n))
        assert out.applied == n
        assert store.reads == reads, n


async def test_a_deleted_products_behaviour_tags_still_expire_after_it_is_upserted_again(processor: Processor) -> None:
    # A window-expiry pass over a deleted product used to decode its behaviour tags (still on) and drop it from the
    # active index; upserted again, it showed `trending` that no later pass ever took off.
    feed, minute, hour, day = Feed(), 60_000, 3_600_000, 86_400_000
    await processor.process_products(feed("products", upsert("p", "Levis Men Black Jeans", updated_at=T0 - day)))
    burst = [behaviour("p", f"u{i % 10}", T0 + i * 5000) for i in range(30)]
    assert "trending" in {
        t["tag"] for u in updates(await processor.process_behaviour(feed("behavior", *burst))) for t in u["tags"]
    }
    await processor.process_products(feed("products", delete("p", version=5, updated_at=T0 + 3 * minute)))
    await processor.process_behaviour(feed("behavior", behaviour("q", "x", T0 + 15 * minute)))  # sweeps p
    await processor.process_products(
        feed("products", upsert("p", "Levis Men Black Jeans", version=6, updated_at=T0 + 16 * minute))
    )
    await processor.process_behaviour(feed("behavior", behaviour("q", "x", T0 + 5 * hour)))  # p's windows are empty
    tags = (await processor.store.read(["p"]))["p"].tags or {}
    assert not {t["tag"] for t in tags.get("tags", [])} & {"trending", "hot", "high-conversion"}, tags.get("tags")


async def test_a_window_pass_over_a_deleted_product_turns_no_behaviour_tag_on(processor: Processor) -> None:
    # A pass over a product deleted while `trending` was indexed decoded its tags from the cleared state: `new`
    # came on again in the stored state of a deleted product (found by the crash soak, in its reference run).
    feed, minute, day = Feed(), 60_000, 86_400_000
    await processor.process_products(feed("products", upsert("p", "Levis Men Black Jeans", updated_at=T0 - day)))
    burst = [behaviour("p", f"u{i % 10}", T0 + i * 5000) for i in range(30)]
    await processor.process_behaviour(feed("behavior", *burst))
    await processor.process_products(feed("products", delete("p", version=5, updated_at=T0 + 3 * minute)))
    await processor.process_behaviour(feed("behavior", behaviour("q", "x", T0 + 2 * 3_600_000)))  # sweeps p
    tags = (await processor.store.read(["p"]))["p"].tags or {}
    assert (
        tags["deleted"]
        and tags["behaviour_tags"] == []
        and not any(entry.get("on") for entry in tags["behaviour"].values())
    ), tags
    back = await processor.process_products(
        feed("products", upsert("p", "Levis Men Black Jeans", version=6, updated_at=T0 + 3 * 3_600_000))
    )
    assert "new" in {t["tag"] for u in updates(back) for t in u["tags"]}  # still in its first week: new again


async def test_a_redelivered_update_is_not_sent_again_after_a_later_one_that_changed_only_scores(
    processor: Processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The burst's update carried the model's old scores; a catalog change then rescored the product (same tag names,
    # a score moved by more than score_delta) and was delivered. After a crash the burst comes back: its update
    # still "carried the current tags" by name and was sent again, last, with the stale scores.
    clock = iter(range(T0, T0 + 10**6))
    monkeypatch.setattr("streams.processor.now_ms", lambda: next(clock))  # emit times one ms apart
    feed = Feed()
    await processor.process_products(feed("products", upsert("p6", "Levis Men Blue Jeans")))
    burst = feed("behavior", *[behaviour("p6", f"u{i % 9}", T0 + i * 5000) for i in range(30)])
    assert any("trending" in u["added"] for u in updates(await processor.process_behaviour(burst)))
    change = feed("products", upsert("p6", "Levis Men Black Jeans", version=2))
    [rescored] = updates(await processor.process_products(change))
    assert rescored["added"] == [] and rescored["removed"] == []  # only scores changed

    again_burst = await processor.process_behaviour(burst)
    assert again_burst.redelivered == 1 and again_burst.updates == []
    assert updates(await processor.process_products(change)) == [rescored]


async def test_a_paused_worker_does_not_resend_an_update_another_worker_has_superseded(model: BundleModel) -> None:
    # A worker paused between its read and its write (SIGSTOP, a long GC) lost its partitions; the next owner applied
    # the same upsert and then a window expiry. The paused worker's write, finding the upsert applied, re-sent the
    # upsert's stored update unconditionally: its `trending` came last on the topic, after the expiry removed it.
    class Racing(MemoryStateStore):
        meanwhile: Any = None

        async def apply(self, writes: list[Write]) -> list[Any]:
            if self.meanwhile is not None:
                other, self.meanwhile = self.meanwhile, None
                await other()
            return await super().apply(writes)

    store = Racing("t")
    paused, owner = (Processor(store, user_hash_key=b"secret", model_provider=lambda: model) for _ in range(2))
    feed = Feed()
    await owner.process_products(feed("products", upsert("p7", "Levis Men Blue Jeans")))
    burst = feed("behavior", *[behaviour("p7", f"u{i % 9}", T0 + i * 5000) for i in range(30)])
    assert any("trending" in u["added"] for u in updates(await owner.process_behaviour(burst)))
    change = feed("products", upsert("p7", "Levis Men Black Jeans", version=2))
    sent: list[dict[str, Any]] = []

    async def the_owner_applies_it_and_then_an_expiry() -> None:
        sent.extend(updates(await owner.process_products(change)))
        sent.extend(updates(await owner.process_behaviour(feed("behavior", behaviour("q", "x", T0 + 2 * 3_600_000)))))

    store.meanwhile = the_owner_applies_it_and_then_an_expiry
    late = await paused.process_products(change)
    assert [u["reason"] for u in sent] == ["product-upsert", "window-expired"]
    assert late.applied == 0 and late.updates == []  # the expiry stays last on the topic


async def test_an_event_older_than_its_windows_writes_only_the_buckets_it_can_still_count_in(
    processor: Processor,
) -> None:
    store = processor.store
    assert isinstance(store, MemoryStateStore)
    feed, beh = Feed(), ProductKeys("t", "p").beh
    await processor.process_behaviour(feed("behavior", behaviour("p", "u1", T0 + 10 * 86_400_000)))
    before_fields, before_hlls = set(store.hashes[beh]), set(store.hlls)
    out = await processor.process_behaviour(feed("behavior", behaviour("p", "u2", T0)))  # 10 days late
    assert out.applied == 1 and out.dead_letters == []
    assert set(store.hashes[beh]) == before_fields and set(store.hlls) == before_hlls  # nothing left behind
    await processor.process_behaviour(feed("behavior", behaviour("p", "u3", T0 + 10 * 86_400_000 - 2 * 3_600_000)))
    written = set(store.hashes[beh]) - before_fields  # 2 hours late: its hour and day, not its 5 minutes
    assert "h" in {name.split(":")[0] for name in written} and not any(name.startswith("m:") for name in written)
    assert {key.split(":")[-2] for key in set(store.hlls) - before_hlls} == {"h"}  # its HLLs likewise
    stats = (await store.read(["p"]))["p"]
    assert sum(v for k, v in stats.beh.items() if k.startswith("h:")) == 2  # both events in the 24 h window


@pytest.mark.parametrize("topic", ["products", "behavior"])
@pytest.mark.parametrize(
    ("at", "said"),
    [
        (T0 * 1000, [str(T0 * 1000), "ahead of the worker's clock"]),  # microseconds: year 57,000
        # a producer's clock 23 h ahead (local time written as UTC): its partition's windows would follow it for a day
        (T0 + 23 * 3_600_000, [str(T0 + 23 * 3_600_000), "ahead of the worker's clock"]),
        # epoch seconds read as milliseconds are January 1970: counted in windows of 1970, and the product tagged new
        (T0 // 1000, ["before 2000-01-01", "seconds since the epoch, not milliseconds?"]),
    ],
    ids=["microseconds", "23-hours-ahead", "seconds"],
)
async def test_an_event_time_in_other_units_is_dead_lettered_and_changes_nothing(
    processor: Processor, topic: str, at: int, said: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("streams.processor.now_ms", lambda: T0)  # the worker's clock
    store = processor.store
    assert isinstance(store, MemoryStateStore)
    feed = Feed()
    if topic == "products":
        out = await processor.process_products(feed(topic, upsert("p", "Levis Men Black Jeans", updated_at=at)))
    else:
        out = await processor.process_behaviour(feed(topic, behaviour("p", "u1", at)))
    assert out.updates == [] and out.applied == 0
    [(_, raw, _)] = out.dead_letters
    letter = orjson.loads(raw)
    assert letter["error_type"] == "EventTimeError" and all(fragment in letter["reason"] for fragment in said)
    assert letter["source"] == {"topic": topic, "partition": 0, "offset": 0}
    assert not any(key.startswith("t:{p}") for key in (*store.hashes, *store.strings, *store.hlls))
    assert await store.get_watermark("behavior", 0) == 0


async def test_a_change_whose_tag_update_the_topic_could_not_take_is_dead_lettered_and_writes_nothing(
    processor: Processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a tag update over the topic's limit was refused by the broker at every redelivery and stopped the worker
    monkeypatch.setattr("streams.processor.TAG_UPDATE_MAX_BYTES", 2_000)
    store = processor.store
    assert isinstance(store, MemoryStateStore)
    feed = Feed()
    big = upsert("big", "Levis Men Black Jeans", attributes={f"a{i}": "x" * 40 for i in range(30)}, updated_at=T0)
    small = upsert("small", "Nike Women Red Shoes", updated_at=T0)
    messages = feed("products", big, small)
    with pytest.raises(OutputTooLargeError, match=r"the tag update of big would be \d+ bytes \(\d+ tags\), over"):
        await processor.process_products(messages)
    out = await processor.process_each(messages, processor.process_products)  # what the agent does next
    [(_, raw, _)] = out.dead_letters
    letter = orjson.loads(raw)
    assert letter["error_type"] == "OutputTooLargeError" and letter["source"]["offset"] == 0
    assert [u["product_id"] for u in updates(out)] == ["small"]
    assert not any(key.startswith("t:{big}") for key in (*store.hashes, *store.strings))


async def test_a_new_product_nobody_looked_at_is_new_for_its_first_week_then_not(processor: Processor) -> None:
    feed = Feed()
    out = await processor.process_products(feed("products", upsert("p", "Levis Men Black Jeans", updated_at=T0)))
    [created] = updates(out)
    assert "new" in created["added"] and "new" in {t["tag"] for t in created["tags"]}
    week = 7 * 86_400_000
    during = await processor.process_behaviour(feed("behavior", behaviour("q", "u1", T0 + week - 1)))
    assert [u for u in updates(during) if u["product_id"] == "p"] == []
    after = await processor.process_behaviour(feed("behavior", behaviour("q", "u2", T0 + week)))
    [expired] = [u for u in updates(after) if u["product_id"] == "p"]
    assert (
        expired["reason"] == "window-expired" and expired["removed"] == ["new"] and expired["event_time"] == T0 + week
    )
    changed = await processor.process_products(
        feed("products", upsert("p", "Levis Men Blue Jeans", version=2, updated_at=T0 + 1))
    )
    assert "new" not in {t["tag"] for u in updates(changed) for t in u["tags"]}  # a change older than its expiry


async def test_a_new_products_upsert_never_delays_an_earlier_look_of_its_window_pass(processor: Processor) -> None:
    store = processor.store
    assert isinstance(store, MemoryStateStore)
    feed = Feed()
    await processor.process_products(feed("products", upsert("hot", "Levis Men Black Jeans", updated_at=T0)))
    out = await processor.process_behaviour(
        feed("behavior", *[behaviour("hot", f"u{i % 9}", T0 + i * 5000) for i in range(30)])
    )
    assert any("trending" in u["added"] for u in updates(out))
    look = store.zsets["t:active:behavior:0"]["hot"]
    assert look < T0 + 86_400_000  # trending's window, well before new's week ends
    await processor.process_products(feed("products", upsert("hot", "Levis Men Blue Jeans", version=2, updated_at=T0)))
    assert store.zsets["t:active:behavior:0"]["hot"] == look


async def test_a_behaviour_update_carries_the_time_its_tags_were_decided(processor: Processor) -> None:
    """The product's clock (its newest event), not the time of a late event that happens to be its last message."""
    feed = Feed()
    views = [behaviour("p", f"u{i}", T0 + i * 1000) for i in range(25)]
    late = behaviour("p", "u99", T0 - 50 * 60_000)
    out = await processor.process_behaviour(feed("behavior", *views, late))
    [update] = [u for u in updates(out) if "trending" in u["added"]]
    assert update["event_time"] == T0 + 24_000 and update["source"]["offset"] == 25
