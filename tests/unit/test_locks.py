"""Per-product locks: batches without a common product run at once; others keep their arrival order per product."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from streams.locks import ProductLocks
from streams.processor import InMessage, Processor
from streams.state import MemoryStateStore
from tests.events import behaviour, upsert

T0 = 1_764_316_800_000


async def _spin(rounds: int = 20) -> None:
    """Let the other tasks run as far as they can (to show one of them did not get somewhere)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def _held(locks: ProductLocks, products: set[str], release: asyncio.Event) -> asyncio.Task[None]:
    """A batch that holds `products` until `release` is set."""

    async def holder() -> None:
        async with locks.hold(products):
            await release.wait()

    return asyncio.create_task(holder())


async def test_batches_without_a_common_product_hold_them_at_once() -> None:
    locks = ProductLocks()
    async with locks.hold({"p1", "p2"}):
        async with asyncio.timeout(1):
            async with locks.hold({"p3"}) as other:
                assert "p3" in other and "p1" not in other
    assert len(locks) == 0


async def test_a_batch_waits_for_every_earlier_batch_sharing_a_product_in_arrival_order() -> None:
    locks = ProductLocks()
    entered: list[str] = []
    first_may_end = asyncio.Event()

    async def batch(name: str, products: set[str], until: asyncio.Event | None = None) -> None:
        async with locks.hold(products):
            entered.append(name)
            if until is not None:
                await until.wait()

    first = asyncio.create_task(batch("A", {"p1"}, first_may_end))
    await _spin()
    second = asyncio.create_task(batch("B", {"p1", "p2"}))  # waits for A (p1)
    await _spin()
    third = asyncio.create_task(batch("C", {"p2"}))  # p2 is free, but B queued for it first
    fourth = asyncio.create_task(batch("D", {"p9"}))  # shares nothing: goes at once
    await _spin()
    assert entered == ["A", "D"]
    first_may_end.set()
    await asyncio.gather(first, second, third, fourth)
    assert entered == ["A", "D", "B", "C"]
    assert len(locks) == 0


async def test_take_free_adds_only_products_no_other_batch_holds_or_awaits() -> None:
    locks = ProductLocks()
    release = asyncio.Event()
    task = _held(locks, {"p2"}, release)
    await _spin()
    async with locks.hold({"p1"}) as mine:
        assert mine.take_free(["p1", "p2", "p3"]) == ["p1", "p3"]  # p2 is someone else's: left out, no waiting
        assert "p3" in mine and "p2" not in mine
    release.set()
    await task
    assert len(locks) == 0


async def test_a_cancelled_waiter_lets_the_batches_behind_it_go_on() -> None:
    locks = ProductLocks()
    release = asyncio.Event()
    first = _held(locks, {"p1"}, release)
    await _spin()
    waiter = asyncio.create_task(locks.hold({"p1"}).__aenter__())
    await _spin()
    waiter.cancel()
    await _spin()
    release.set()
    await first
    async with asyncio.timeout(1):
        async with locks.hold({"p1"}):
            pass
    assert len(locks) == 0


async def test_a_nested_hold_must_stay_inside_the_callers_products() -> None:
    locks = ProductLocks()
    async with locks.hold({"p1"}) as outer:
        async with locks.hold({"p1"}, within=outer) as inner:
            assert inner is outer
        with pytest.raises(RuntimeError, match="not in the caller's hold"):
            async with locks.hold({"p2"}, within=outer):
                pass
    assert len(locks) == 0


class _GatedStore(MemoryStateStore):
    """Memory state whose writes of events from one topic wait at a gate, like a slow Redis round trip."""

    def __init__(self, topic: str) -> None:
        super().__init__("g")
        self.topic = topic
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def apply(self, writes: Any) -> Any:  # behaviour batches' apply_and_end_batch writes through it too
        if any(w.fence_field.startswith(f"{self.topic}:") for w in writes):
            self.waiting.set()
            await self.gate.wait()
        return await super().apply(writes)


def _msg(topic: str, offset: int, event: dict[str, Any]) -> InMessage:
    return InMessage(topic, 0, offset, event["product_id"].encode(), orjson.dumps(event))


async def test_a_product_change_does_not_wait_for_a_behaviour_batch_on_other_products() -> None:
    store = _GatedStore("behavior")
    processor = Processor(store, user_hash_key=b"k")
    clicks = [_msg("behavior", i, behaviour("b1", f"u{i}", T0 + i)) for i in range(3)]
    busy = asyncio.create_task(processor.process_behaviour(clicks))
    await asyncio.wait_for(store.waiting.wait(), 1)  # the behaviour batch holds b1 and waits for its write

    async with asyncio.timeout(1):  # another product's change goes through meanwhile
        [update] = (await processor.process_products([_msg("products", 0, upsert("p1", "Nike Red Shoes"))])).updates
    assert orjson.loads(update[1])["product_id"] == "p1"

    same = asyncio.create_task(processor.process_products([_msg("products", 1, upsert("b1", "Titan Men Watch"))]))
    await _spin()
    assert not same.done()  # b1's change waits for the batch that holds b1, so neither overwrites the other
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(busy, same), 1)
    state = (await store.read(["b1"]))["b1"]
    assert state.doc["title"] == "Titan Men Watch"
    assert sum(v for k, v in state.beh.items() if k.startswith("m:")) == 3
    assert len(processor.locks) == 0


async def test_a_due_product_another_batch_holds_expires_with_a_later_batch() -> None:
    store = _GatedStore("products")
    processor = Processor(store, user_hash_key=b"k")

    def clicks(pid: str, first: int, ts: list[int]) -> list[InMessage]:
        return [_msg("behavior", first + i, behaviour(pid, f"u{i % 9}", t)) for i, t in enumerate(ts)]

    burst = await asyncio.wait_for(processor.process_behaviour(clicks("hot", 0, [T0 + i * 5000 for i in range(30)])), 1)
    assert any("trending" in orjson.loads(v)["added"] for _, v in burst.updates)
    change = asyncio.create_task(processor.process_products([_msg("products", 0, upsert("hot", "Nike Red Shoes"))]))
    await asyncio.wait_for(store.waiting.wait(), 1)  # a product batch holds "hot" now

    later = await asyncio.wait_for(processor.process_behaviour(clicks("other", 30, [T0 + 3 * 3_600_000])), 1)
    assert [orjson.loads(v)["product_id"] for _, v in later.updates if b'"window-expired"' in v] == []
    store.gate.set()
    await change
    again = await processor.process_behaviour(clicks("other", 31, [T0 + 3 * 3_600_000 + 1]))
    expired = [orjson.loads(v) for _, v in again.updates if orjson.loads(v)["product_id"] == "hot"]
    assert expired and expired[0]["reason"] == "window-expired" and "trending" in expired[0]["removed"]
