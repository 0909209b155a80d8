"""Re-tag fence fields (no services): a product's fence keeps the re-tag fields of the last versions only, not one
set per model version ever activated (SPEC.md §3)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

import streams.retag
from schemas import Tag, TagUpdate
from streams.processor import BatchOutput, InMessage, Processor
from streams.retag import Retagger, RetagStats
from streams.state import MemoryStateStore, ProductKeys, StateStore
from tests.events import upsert

PIDS = [f"p{i}" for i in range(6)]


class Stopped(Exception):
    """The worker stopping between a re-tag step's writes and its updates' delivery."""


class NamedModel:
    """A scoring model giving every product the free tags `names`, each at `score`."""

    labels = None

    def __init__(self, version: str, names: Sequence[str], score: float = 0.9) -> None:
        self.version = version
        self.names = names
        self.tag_score = score

    def score(self, products: Sequence[Any]) -> list[list[Tag]]:
        return [[Tag(name, "tags", self.tag_score, "model") for name in self.names] for _ in products]


async def fence_fields(store: StateStore, pid: str) -> dict[str, str]:
    """Every field of a product's fence hash as stored, `emit:` fields included."""
    key = ProductKeys(store.prefix, pid).fence
    client = getattr(store, "client", None)
    if client is not None:
        return dict(await client.hgetall(key))
    assert isinstance(store, MemoryStateStore)
    return dict(store.hashes.get(key, {}))


def retag_fields(fence: dict[str, str]) -> set[str]:
    """The re-tag fields of a fence (`retag:`, `sent:retag:`, `emit:retag:`)."""
    return {f for f in fence if f.removeprefix("emit:").removeprefix("sent:").startswith("retag:")}


def of(version: str, *, sent: bool = True) -> set[str]:
    """The fields a re-tag run for `version` leaves (`sent:` once its update was delivered)."""
    return {f"retag:{version}", f"emit:retag:{version}"} | ({f"sent:retag:{version}"} if sent else set())


def later_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-tag updates are stamped strictly after the upserts' (emit times decide which kept update is the latest)."""
    clock = itertools.count(streams.retag._now_ms() + 60_000)
    monkeypatch.setattr(streams.retag, "_now_ms", lambda: next(clock))


async def upsert_catalog(store: StateStore, model: NamedModel) -> Processor:
    """Upsert PIDS (offsets 0..5 of products:0), scored by `model`; returns the processor."""
    processor = Processor(store, user_hash_key=b"k", model_provider=lambda: model)
    msgs = [
        InMessage("products", 0, i, pid.encode(), orjson.dumps(upsert(pid, f"title {i}"))) for i, pid in enumerate(PIDS)
    ]
    out = await processor.process_products(msgs)
    assert len(out.updates) == len(PIDS)
    return processor


async def retag(
    store: StateStore, model: NamedModel, offset: int, published: list[BatchOutput] | None = None, batch: int = 4
) -> RetagStats:
    """Run a re-tag with `model` for the activation at `offset`, `batch` products a step; its updates into `published`
    (None: the worker stops before delivering its first step's)."""

    async def publish(out: BatchOutput) -> None:
        if published is None:
            raise Stopped
        published.append(out)

    return await Retagger(
        store, rate=10_000, batch=batch, score_delta=0.05, publish=publish, topic="model-updates"
    ).run(model, offset)


async def check_tags(store: StateStore, model: NamedModel, sent: dict[str, bytes]) -> None:
    """Every product holds `model`'s tags, and its kept re-tag update is `sent[pid]`, carrying its current tags."""
    states = await store.read(PIDS, counters=False)
    kept = await store.stored_emits([(pid, f"retag:{model.version}") for pid in PIDS])
    for pid in PIDS:
        tags = states[pid].tags
        assert tags is not None and tags["model_version"] == model.version
        assert [t["tag"] for t in tags["model"]] == list(model.names)
        assert kept[(pid, f"retag:{model.version}")] == sent[pid]
        update = TagUpdate.decode(sent[pid])
        assert update.model_version == model.version
        assert [t.tag for t in update.tags] == [t["tag"] for t in tags["tags"]]


async def three_versions_in_turn(store: StateStore) -> None:
    """Re-tags for v1, v2, then v3 (stopped before delivering, resumed), then a rollback to v1: after each, every
    product's fence holds the re-tag fields of that run's version only."""
    await upsert_catalog(store, NamedModel("v0", ["a"]))
    base = {"products:0", "emit:products:0", "rev"}
    models = {v: NamedModel(v, [f"tag-{v}"]) for v in ("v1", "v2", "v3")}
    for offset, version in ((1, "v1"), (2, "v2")):
        published: list[BatchOutput] = []
        stats = await retag(store, models[version], offset, published)
        assert stats.written == stats.updates == len(PIDS)
        await check_tags(store, models[version], {pid.decode(): raw for out in published for pid, raw in out.updates})
        for pid in PIDS:
            fence = await fence_fields(store, pid)
            assert set(fence) == base | of(version), pid
            assert fence[f"retag:{version}"] == fence[f"sent:retag:{version}"] == str(offset)

    # v3's run writes every product, then the worker stops before delivering an update: v2's fields are gone already
    with pytest.raises(Stopped):
        await retag(store, models["v3"], 3, batch=len(PIDS))
    kept = await store.stored_emits([(pid, "retag:v3") for pid in PIDS])
    for pid in PIDS:
        assert set(await fence_fields(store, pid)) == base | of("v3", sent=False), pid
    # the restarted run finds its own fields and re-sends what it wrote, byte for byte, then marks it delivered
    published = []
    stats = await retag(store, models["v3"], 3, published)
    resent = {pid.decode(): raw for out in published for pid, raw in out.updates}
    assert stats.written == 0 and stats.resent == len(PIDS) and resent == {pid: kept[(pid, "retag:v3")] for pid in PIDS}
    await check_tags(store, models["v3"], resent)
    for pid in PIDS:
        assert set(await fence_fields(store, pid)) == base | of("v3"), pid

    # a rollback to v1 is a new activation (a later offset): not fenced out, and it leaves v1's fields only
    published = []
    stats = await retag(store, models["v1"], 4, published)
    assert stats.written == stats.updates == len(PIDS)
    await check_tags(store, models["v1"], {pid.decode(): raw for out in published for pid, raw in out.updates})
    for pid in PIDS:
        fence = await fence_fields(store, pid)
        assert set(fence) == base | of("v1") and fence["retag:v1"] == fence["sent:retag:v1"] == "4", pid


async def test_a_fence_keeps_the_retag_fields_of_the_last_version_only() -> None:
    await three_versions_in_turn(MemoryStateStore("t"))


async def a_version_that_changes_no_tag(store: StateStore) -> None:
    """v3 moves no score beyond the delta, so its write keeps no update: v2's kept update is still the product's
    newest, and it keeps a redelivered upsert's older update from being sent again after it; v4's write, which keeps
    one, leaves v4's fields only."""
    processor = await upsert_catalog(store, NamedModel("v0", ["x"], 0.9))
    for offset, model in enumerate((NamedModel("v1", ["y"]), NamedModel("v2", ["x"], 0.5)), start=1):
        stats = await retag(store, model, offset, [])
        assert stats.updates == len(PIDS)  # v2: the upserts' tag names, at another score
    stats = await retag(store, NamedModel("v3", ["x"], 0.52), 3, [])
    assert stats.written == len(PIDS) and stats.updates == 0
    for pid in PIDS:
        fence = await fence_fields(store, pid)
        assert retag_fields(fence) == of("v2") | {"retag:v3"}, pid  # v1's are gone

    redelivered = await processor.process_products(
        [InMessage("products", 0, 0, b"p0", orjson.dumps(upsert("p0", "title 0")))]
    )
    assert redelivered.redelivered == 1 and redelivered.updates == []  # v0's update would undo v2's scores

    published: list[BatchOutput] = []
    stats = await retag(store, NamedModel("v4", ["z"]), 4, published)
    assert stats.updates == len(PIDS)
    await check_tags(
        store, NamedModel("v4", ["z"]), {pid.decode(): raw for out in published for pid, raw in out.updates}
    )
    for pid in PIDS:
        assert retag_fields(await fence_fields(store, pid)) == of("v4"), pid


async def test_a_retag_that_changes_no_tag_keeps_the_newest_other_update(monkeypatch: pytest.MonkeyPatch) -> None:
    later_clock(monkeypatch)
    await a_version_that_changes_no_tag(MemoryStateStore("t"))
