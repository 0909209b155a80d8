"""Re-tag fence fields (no services): a product's fence keeps the re-tag fields of the last versions only, not one
set per model version ever activated (SPEC.md §3); a re-tag sends every product it writes an update naming the new
model version, even when no score moved beyond the delta (SPEC.md §1)."""

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


def last_per_product(topic: Sequence[bytes]) -> dict[str, dict[str, Any]]:
    """Each product's last update on a topic of tag updates (in order): the truth a consumer keeps (SPEC.md §1)."""
    return {u["product_id"]: u for u in map(orjson.loads, topic)}


async def check_topic(store: StateStore, topic: Sequence[bytes], version: str) -> None:
    """Each product's last update on `topic` names `version` and carries the tags it stores, scores included."""
    last = last_per_product(topic)
    states = await store.read(PIDS, counters=False)
    for pid in PIDS:
        tags = states[pid].tags
        assert tags is not None and tags["model_version"] == version, pid
        assert last[pid]["model_version"] == version and last[pid]["tags"] == tags["tags"], pid


def sent_by(published: Sequence[BatchOutput]) -> list[bytes]:
    """The updates of a re-tag run's steps, in the order it published them."""
    return [raw for out in published for _, raw in out.updates]


async def a_version_that_moves_no_score_beyond_the_delta(store: StateStore) -> None:
    """v3 moves every score by less than the delta and changes no tag name: its write still changes each product's
    stored model version, so it sends each product one update naming v3 (empty `added` / `removed`), kept like any
    other, and the topic's last update per product is the stored tags; its fence keeps v3's fields only, and v3's
    kept update is the newest, so a redelivered upsert's older update is not sent again after it. v4, again within
    the delta, stopped before delivering, is resent whole by the run resumed; v5 changes the tags."""
    processor = await upsert_catalog(store, NamedModel("v0", ["x"], 0.9))
    topic: list[bytes] = []
    for offset, model in enumerate((NamedModel("v1", ["y"]), NamedModel("v2", ["x"], 0.5)), start=1):
        published: list[BatchOutput] = []
        stats = await retag(store, model, offset, published)
        assert stats.updates == len(PIDS)  # v2: the upserts' tag names, at another score
        topic += sent_by(published)

    v3 = NamedModel("v3", ["x"], 0.52)
    published = []
    stats = await retag(store, v3, 3, published)
    assert stats.written == stats.updates == len(PIDS)
    sent = sent_by(published)
    assert sorted(orjson.loads(raw)["product_id"] for raw in sent) == PIDS  # one update per product
    for update in map(TagUpdate.decode, sent):
        assert update.model_version == "v3" and update.reason == "retag" and update.source.offset == 3
        assert update.added == update.removed == ()
    await check_tags(store, v3, {orjson.loads(raw)["product_id"]: raw for raw in sent})
    topic += sent
    await check_topic(store, topic, "v3")
    assert stats.version_only == len(PIDS)  # no tag changed beyond the delta: sent to name v3 alone
    for pid in PIDS:
        fence = await fence_fields(store, pid)
        assert retag_fields(fence) == of("v3") and fence["sent:retag:v3"] == "3", pid  # v2's are gone

    redelivered = await processor.process_products(
        [InMessage("products", 0, 0, b"p0", orjson.dumps(upsert("p0", "title 0")))]
    )
    assert redelivered.redelivered == 1 and redelivered.updates == []  # v0's update would undo v3's

    # v4, within the delta of v3 too: the worker stops before delivering; the resumed run sends every kept update
    v4 = NamedModel("v4", ["x"], 0.54)
    with pytest.raises(Stopped):
        await retag(store, v4, 4, batch=len(PIDS))
    kept = await store.stored_emits([(pid, "retag:v4") for pid in PIDS])
    published = []
    stats = await retag(store, v4, 4, published)
    resent = {orjson.loads(raw)["product_id"]: raw for raw in sent_by(published)}
    assert stats.written == stats.updates == 0 and stats.resent == stats.skipped_current == len(PIDS)
    assert resent == {pid: kept[(pid, "retag:v4")] for pid in PIDS}  # byte for byte
    topic += sent_by(published)
    await check_topic(store, topic, "v4")
    for pid in PIDS:
        assert retag_fields(await fence_fields(store, pid)) == of("v4"), pid
    published = []
    stats = await retag(store, v4, 4, published)  # delivered now: nothing sent again
    assert stats.skipped_current == len(PIDS) and stats.resent == stats.updates == 0 and not published

    v5 = NamedModel("v5", ["z"])
    published = []
    stats = await retag(store, v5, 5, published)
    assert stats.updates == len(PIDS) and stats.version_only == 0
    await check_tags(store, v5, {orjson.loads(raw)["product_id"]: raw for raw in sent_by(published)})
    await check_topic(store, topic + sent_by(published), "v5")
    for pid in PIDS:
        assert retag_fields(await fence_fields(store, pid)) == of("v5"), pid


async def test_a_retag_within_the_delta_still_sends_every_product_the_new_model_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    later_clock(monkeypatch)
    await a_version_that_moves_no_score_beyond_the_delta(MemoryStateStore("t"))


class ScoreByProduct(NamedModel):
    """A model giving every product the free tag `x`, at the score `scores` names for it (else `score`)."""

    def __init__(self, version: str, scores: dict[str, float], score: float) -> None:
        super().__init__(version, ["x"], score)
        self.scores = scores

    def score(self, products: Sequence[Any]) -> list[list[Tag]]:
        return [[Tag("x", "tags", self.scores.get(p.product_id, self.tag_score), "model")] for p in products]


async def test_a_retag_counts_the_updates_that_only_name_the_new_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the catalog moves beyond the delta, half within it: every product gets an update naming the new model
    (`updates`), and `version_only` counts those the delta alone would have kept quiet."""
    later_clock(monkeypatch)
    store = MemoryStateStore("t")
    await upsert_catalog(store, NamedModel("v0", ["x"], 0.9))
    moved = {pid: 0.5 for pid in PIDS[:3]}
    published: list[BatchOutput] = []
    stats = await retag(store, ScoreByProduct("v1", moved, 0.88), 1, published, batch=2)
    updates = [TagUpdate.decode(raw) for raw in sent_by(published)]
    assert sorted(u.product_id for u in updates) == PIDS and {u.model_version for u in updates} == {"v1"}
    assert stats.scored == stats.written == stats.updates == len(PIDS) and stats.version_only == len(PIDS) - 3
    assert {u.product_id: u.tags[0].score for u in updates} == {pid: moved.get(pid, 0.88) for pid in PIDS}
