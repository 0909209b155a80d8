"""Product states kept between batches: the same tags and state as reading every batch, and never a lost write."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from bench.profile_worker import deep_size
from streams.model import BundleModel
from streams.processor import CONFLICT_ATTEMPTS, InMessage, Processor
from streams.settings import WorkerSettings
from streams.state import MemoryStateStore, Write, WriteResult
from tagstream.errors import StateConflictError
from tests.events import behaviour, delete, upsert
from tests.models import featurized_bundle

T0 = 1_764_316_800_000
TITLES = ["Nike Women Red Running Shoes", "Levis Men Black Jeans", "Puma Unisex Blue Cap", "Titan Men Watch"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BundleModel:
    return BundleModel.load(featurized_bundle(tmp_path_factory.mktemp("reg")), WorkerSettings())


def _batches(seed: int) -> list[tuple[str, list[InMessage]]]:
    """Interleaved product and behaviour batches of random sizes: 20 products over 4 partitions, bursts that turn
    behaviour tags on, hours of event time that let them expire, upserts and deletes in between."""
    rng = random.Random(seed)
    offsets: dict[tuple[str, int], int] = {}

    def message(topic: str, event: dict[str, Any]) -> InMessage:
        partition = int(event["product_id"][1:]) % 4
        offset = offsets.get((topic, partition), 0)
        offsets[(topic, partition)] = offset + 1
        return InMessage(topic, partition, offset, event["product_id"].encode(), orjson.dumps(event))

    out: list[tuple[str, list[InMessage]]] = []
    ts, version = T0, 1
    for _ in range(60):
        if rng.random() < 0.25:
            version += 1
            events = [
                delete(f"p{rng.randrange(20)}", version=version)
                if rng.random() < 0.1
                else upsert(f"p{rng.randrange(20)}", rng.choice(TITLES), version=version, updated_at=ts)
                for _ in range(rng.randrange(1, 6))
            ]
            out.append(("products", [message("products", e) for e in events]))
            continue
        hot = f"p{rng.randrange(5)}"  # a few products get bursts from many users
        events = []
        for _ in range(rng.randrange(1, 80)):
            ts += rng.choice((200, 1_000, 20_000, 600_000 if rng.random() < 0.03 else 500))
            pid = hot if rng.random() < 0.6 else f"p{rng.randrange(20)}"
            events.append(behaviour(pid, f"u{rng.randrange(60)}", ts, rng.choice(("view", "click", "add_to_cart"))))
        out.append(("behavior", [message("behavior", e) for e in events]))
    return out


async def _run(model: BundleModel, state_cache: int, seed: int) -> tuple[list[Any], dict[str, Any], Processor]:
    store = MemoryStateStore("t", clock=lambda: T0)  # time kept with a watermark (no Kafka timestamps here)
    processor = Processor(store, user_hash_key=b"k", model_provider=lambda: model, state_cache=state_cache)
    sent = []
    for topic, batch in _batches(seed):
        process = processor.process_products if topic == "products" else processor.process_behaviour
        out = await process(batch)
        sent += [orjson.loads(v) | {"emit_time": 0} for _, v in out.updates]
    state = {
        "hashes": {k: {f: v for f, v in h.items() if not f.startswith("emit:")} for k, h in store.hashes.items()},
        "strings": dict(store.strings),
        "hlls": dict(store.hlls),
        "zsets": dict(store.zsets),
    }
    return sent, state, processor


@pytest.mark.parametrize("seed", [0, 1])
async def test_kept_states_give_the_updates_and_state_of_reading_every_batch(model: BundleModel, seed: int) -> None:
    read_sent, read_state, _ = await _run(model, 0, seed)
    for size in (7, 1000):  # 7 < the 20 products: states are dropped and read again all the time
        kept_sent, kept_state, processor = await _run(model, size, seed)
        assert processor.cache is not None and processor.cache.hits > 0 and len(processor.cache) <= size
        assert kept_sent == read_sent, size
        assert kept_state == read_state, size
    reasons = {u["reason"] for u in read_sent}
    assert {"product-upsert", "behaviour", "window-expired"} <= reasons  # every path that writes was exercised


async def test_a_write_by_another_worker_is_not_lost_to_a_kept_state(model: BundleModel) -> None:
    store = MemoryStateStore("t")
    mine = Processor(store, user_hash_key=b"k", model_provider=lambda: model, state_cache=100)
    other = Processor(store, user_hash_key=b"k", model_provider=lambda: model)  # e.g. after a rebalance
    clicks = [InMessage("behavior", 0, i, b"p1", orjson.dumps(behaviour("p1", f"u{i}", T0 + i))) for i in range(6)]
    await mine.process_behaviour(clicks[:3])  # p1's state is kept now
    title = "Levis Men Black Jeans"
    change = upsert("p1", title, attributes={"colour": "Black"})
    [update] = (await other.process_products([InMessage("products", 0, 0, b"p1", orjson.dumps(change))])).updates
    await mine.process_behaviour(clicks[3:])  # its kept state predates the upsert: the write must not undo it
    state = (await store.read(["p1"]))["p1"]
    assert state.doc["title"] == title and mine.conflicts == 1
    assert state.tags is not None and "colour:Black" in {t["tag"] for t in state.tags["tags"]}
    assert sum(v for k, v in state.beh.items() if k.startswith("d:")) == 6  # every click counted once
    assert state.tags["model_version"] == model.version == orjson.loads(update[1])["model_version"]


async def test_a_product_that_keeps_changing_under_a_batch_fails_it_with_a_state_conflict(
    model: BundleModel,
) -> None:
    class Contended(MemoryStateStore):
        """Another writer changes every product just before each of this worker's writes."""

        async def apply(self, writes: list[Write]) -> list[WriteResult]:
            for w in writes:
                fence = self.hashes[w.ops.keys[0]]
                fence["rev"] = str(int(fence.get("rev", 0)) + 1)
            return await super().apply(writes)

    store = Contended("t")
    processor = Processor(store, user_hash_key=b"k", model_provider=lambda: model, state_cache=100)
    clicks = [InMessage("behavior", 0, i, b"p1", orjson.dumps(behaviour("p1", f"u{i}", T0 + i))) for i in range(3)]
    with pytest.raises(StateConflictError, match="changed by another writer"):
        await processor.process_behaviour(clicks)
    assert processor.conflicts == CONFLICT_ATTEMPTS
    state = (await store.read(["p1"]))["p1"]
    assert state.beh == {} and state.applied_offset("behavior:0") == -1  # nothing of the batch was written


async def test_a_worker_forgets_its_kept_states_when_partitions_are_revoked(tmp_path: Any) -> None:
    from streams.app import Worker
    from streams.state import ProductState

    settings = WorkerSettings(data_dir=tmp_path, app_id="cache-revoke", model_path=featurized_bundle(tmp_path / "r"))
    worker = Worker(settings, store_factory=lambda: MemoryStateStore("t"), capture_output=True)
    processor = await worker.processor()
    assert processor.cache is not None and processor.cache.size == settings.state_cache > 0
    processor.cache.put(ProductState("p1"))
    await worker.app.on_partitions_revoked.send(set())  # what Faust sends when a rebalance takes partitions away
    assert len(processor.cache) == 0
    worker.models.close()


class _CountingStore(MemoryStateStore):
    """Memory state that counts the separate expiry passes' write round trips."""

    def __init__(self) -> None:
        super().__init__("c")
        self.expiry_passes = 0

    async def apply_and_index(self, writes: list[Write], index: Any) -> list[WriteResult]:
        self.expiry_passes += 1
        return await super().apply_and_index(writes, index)


@pytest.mark.parametrize("kept", [100, 0])
async def test_a_product_already_due_expires_with_the_next_batchs_own_write(kept: int) -> None:
    store = _CountingStore()
    processor = Processor(store, user_hash_key=b"k", state_cache=kept)
    burst = [
        InMessage("behavior", 0, i, b"hot", orjson.dumps(behaviour("hot", f"u{i % 9}", T0 + i * 5000)))
        for i in range(30)
    ]
    assert any("trending" in orjson.loads(v)["added"] for _, v in (await processor.process_behaviour(burst)).updates)
    later = [InMessage("behavior", 0, 30, b"other", orjson.dumps(behaviour("other", "u1", T0 + 3 * 3_600_000)))]
    out = await processor.process_behaviour(later)
    expired = [orjson.loads(v) for _, v in out.updates if orjson.loads(v)["product_id"] == "hot"]
    assert expired and expired[0]["reason"] == "window-expired" and "trending" in expired[0]["removed"]
    # with its state kept, "hot" is swept in the batch's own write; without, in a pass of its own after it
    assert store.expiry_passes == (0 if kept else 1)


async def test_kept_states_stay_within_their_memory_budget_however_large_the_products(model: BundleModel) -> None:
    """The cache was bounded by count only: 4,000 products with 19,000-character descriptions and 100 attributes
    took the worker from 247 MB to 1,042 MB (10,000 allowed: ~2 GB), against "about 3 KB per product"."""
    from streams.state import approx_state_bytes

    budget = 2 * 2**20
    processor = Processor(
        MemoryStateStore("m"), user_hash_key=b"k", model_provider=lambda: model, state_cache=10_000,
        state_cache_bytes=budget,
    )  # fmt: skip
    attributes = {f"a{k}": f"value {k} " * 10 for k in range(100)}
    big = [upsert(f"big-{i}", "Levis Men Black Jeans", description="long words " * 1700, attributes=attributes)
           for i in range(100)]  # fmt: skip
    small = [upsert(f"small-{i}", TITLES[i % 4]) for i in range(300)]
    for i, chunk in enumerate([big[:50], small, big[50:]]):
        messages = [InMessage("products", 0, 1000 * i + k, e["product_id"].encode(), orjson.dumps(e))
                    for k, e in enumerate(chunk)]  # fmt: skip
        await processor.process_products(messages)
    cache = processor.cache
    assert cache is not None
    kept = list(cache._states.values())
    assert 0 < cache.bytes <= budget and cache.bytes == sum(approx_state_bytes(s) for s in kept)
    assert deep_size(kept) < 1.5 * budget  # what they really take
    assert "big-99" in cache._states and "big-0" not in cache._states  # least recently used dropped first
    heavy = deep_size(cache._states["big-99"])
    assert 50_000 < heavy < 2 * approx_state_bytes(cache._states["big-99"]) < 4 * heavy  # the estimate is near
    cache.take_kept(["big-99"])
    assert cache.bytes == sum(approx_state_bytes(s) for s in cache._states.values())
    cache.clear()
    assert cache.bytes == 0
