"""ModelHolder (no services): activate / refuse / rollback / shadow / promote, batches never mixed, re-tag."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from schemas import ModelUpdate, ProductChange, TagUpdate
from serving.validate import ValidationPolicy
from streams.model import BundleModel, ModelHolder, ShadowDiff, ShadowScoring, diff_model_tags
from streams.model_cli import answer_fits, build_request, rollback_target, shadow_started
from streams.processor import BatchOutput, InMessage, Processor
from streams.retag import Retagger, product_from_doc
from streams.settings import WorkerSettings
from streams.state import MemoryStateStore, Write, WriteResult
from tagstream.errors import ConfigError
from tests.events import upsert
from tests.unit.test_validate import TITLES, real_bundle

POLICY = ValidationPolicy(latency_budget_ms={1: 1000.0, 64: 1000.0}, latency_runs=2)


def request(kind: str, path: Path | None = None, version: str | None = None) -> ModelUpdate:
    """A model-update request for the bundle at `path` (sha256 and version from its manifest)."""
    if path is None:
        return ModelUpdate(kind=kind, model_version=version or "previous", emitted_at=1)  # type: ignore[arg-type]
    sha = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    return ModelUpdate(kind=kind, model_version=version or path.name, emitted_at=1, bundle_uri=str(path), sha256=sha)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "a": real_bundle(root / "a", seed=0),
        "b": real_bundle(root / "b", seed=1),
        "c": real_bundle(root / "c", seed=2),
    }


def products(n: int = 8, prefix: str = "p") -> list[ProductChange]:
    return [ProductChange("upsert", f"{prefix}-{i}", 1000, 1, title=t) for i, t in enumerate((TITLES * 4)[:n])]


async def holder_with(bundles: dict[str, Path], isolated: bool = False, **settings: object) -> ModelHolder:
    holder = ModelHolder(
        WorkerSettings(model_path=bundles["a"], worker_id="w-1", **settings), policy=POLICY, isolated=isolated
    )
    await holder.start()
    return holder


async def test_no_model_configured_gives_none() -> None:
    holder = ModelHolder(WorkerSettings(worker_id="w"), policy=POLICY)
    await holder.start()
    assert holder.get() is None


@pytest.mark.parametrize("isolated", [False, True], ids=["in-process", "child-process"])
async def test_the_configured_model_is_validated_like_an_update(tmp_path: Path, isolated: bool) -> None:
    """With isolated validation off, the worker started on a bundle whose model no longer gives its golden scores
    (its files re-hashed into the manifest): it tagged with it. Both ways it now refuses to start, saying why."""
    import numpy as np

    from tagstream.errors import ModelRejectedError

    good = real_bundle(tmp_path / "good", seed=0)
    clean = np.load(good / "golden.npz")["scores"]
    bad = real_bundle(tmp_path / "bad", seed=0, golden_scores=np.clip(clean + 0.05, 0.0, 1.0))
    holder = ModelHolder(WorkerSettings(model_path=bad, worker_id="w-1"), policy=POLICY, isolated=isolated)
    try:
        with pytest.raises(ModelRejectedError, match=r"golden: max \|score - golden\|"):
            await holder.start()
        assert holder.get() is None
    finally:
        holder.close()


async def test_activate_swaps_and_keeps_the_previous(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    old = holder.get()
    assert isinstance(old, BundleModel) and old.version == bundles["a"].name
    outcome = await holder.handle(request("activate", bundles["b"]))
    assert outcome.answer is not None and outcome.answer.kind == "model-activated"
    assert outcome.answer.model_version == bundles["b"].name and outcome.answer.worker_id == "w-1"
    assert outcome.swapped_to == bundles["b"].name
    outcome.answer.to_dict()  # schema-valid
    assert holder.get().version == bundles["b"].name  # type: ignore[union-attr]
    assert holder.previous is old
    # A batch that took the old model before the swap still scores with it, whole.
    assert len(old.score(products())) == 8
    # The same request again is answered without a second swap.
    again = await holder.handle(request("activate", bundles["b"]))
    assert again.answer is not None and again.answer.kind == "model-activated" and not again.changed
    assert holder.swaps == 1


async def test_validation_in_a_child_process(bundles: dict[str, Path], tmp_path: Path) -> None:
    """The worker's default: stages in a spawned process, then the same bytes re-opened here."""
    holder = await holder_with(bundles, isolated=True)
    try:
        ok = await holder.handle(request("activate", bundles["b"]))
        assert ok.answer is not None and ok.answer.kind == "model-activated"
        assert holder.get().version == bundles["b"].name  # type: ignore[union-attr]
        assert len(holder.get().score(products(4))) == 4  # type: ignore[union-attr]
        bad = await holder.handle(ModelUpdate(**_replace(request("activate", bundles["c"]), sha256="1" * 64)))  # type: ignore[arg-type]
        assert bad.answer is not None and bad.answer.kind == "model-rejected"
        assert any("differs from the expected" in r for r in bad.answer.reasons)
        assert holder.get().version == bundles["b"].name  # type: ignore[union-attr]
    finally:
        holder.close()


async def test_a_refused_model_keeps_the_active_one(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    bad = request("activate", bundles["b"])
    bad = ModelUpdate(**_replace(bad, sha256="0" * 64))  # type: ignore[arg-type]
    outcome = await holder.handle(bad)
    assert outcome.answer is not None and outcome.answer.kind == "model-rejected"
    assert any("differs from the expected" in r for r in outcome.answer.reasons)
    outcome.answer.to_dict()
    assert holder.get().version == bundles["a"].name  # type: ignore[union-attr]
    assert holder.rejections == 1 and holder.status()["last_rejected"]["model_version"] == bundles["b"].name


def _replace(event: ModelUpdate, **changes: object) -> dict[str, object]:
    from dataclasses import asdict

    return {**asdict(event), **changes}


async def test_a_missing_bundle_uri_is_refused(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    outcome = await holder.handle(ModelUpdate(kind="activate", model_version="x", emitted_at=1))
    assert outcome.answer is not None and outcome.answer.reasons == ("request: no bundle_uri",)


@pytest.mark.parametrize("isolated", [False, True], ids=["in-process", "child-process"])
async def test_model_roots_confine_the_bundles_requests_may_name(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: bool
) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    inside = Path(shutil.copytree(bundles["b"], registry / bundles["b"].name))
    (registry / "elsewhere").symlink_to(bundles["c"], target_is_directory=True)  # a link out of the registry
    monkeypatch.setenv("TAGSTREAM_MODEL_ROOTS", f'["{registry}"]')
    settings = WorkerSettings(model_path=bundles["a"], worker_id="w-1")
    assert settings.model_roots == (registry,)
    policy = ValidationPolicy.from_settings(settings)
    assert policy.roots == (registry,)
    # the operator's own start-up bundle (outside the registry) loads; requests are confined
    holder = ModelHolder(settings, policy=replace(POLICY, roots=policy.roots), isolated=isolated)
    await holder.start()
    try:
        assert holder.get().version == bundles["a"].name  # type: ignore[union-attr]
        for outside in (bundles["c"], registry / "elsewhere", registry / os.path.relpath(bundles["c"], registry)):
            event = ModelUpdate(**_replace(request("activate", bundles["c"]), bundle_uri=str(outside)))  # type: ignore[arg-type]
            refused = await holder.handle(event)
            assert refused.answer is not None and refused.answer.kind == "model-rejected", outside
            assert refused.answer.reasons == (
                f"place: {bundles['c'].resolve()} is outside TAGSTREAM_MODEL_ROOTS ({registry})",
            )
        shadow = await holder.handle(request("shadow", bundles["c"]))  # every kind that loads a bundle
        assert shadow.answer is not None and shadow.answer.kind == "model-rejected"
        assert holder.get().version == bundles["a"].name and holder.rejections == 4  # type: ignore[union-attr]
        done = await holder.handle(request("activate", inside))
        assert done.answer is not None and done.answer.kind == "model-activated"
        assert holder.get().version == inside.name  # type: ignore[union-attr]
        back = await holder.handle(request("rollback", version=bundles["a"].name))  # to the start-up model, held
        assert back.answer is not None and back.answer.kind == "model-activated"
    finally:
        holder.close()


async def test_rollback_returns_to_the_previous_model(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    no_previous = await holder.handle(request("rollback"))
    assert no_previous.answer is not None and no_previous.answer.kind == "model-rejected"
    assert no_previous.answer.reasons == ("rollback: no previous model",)
    await holder.handle(request("activate", bundles["b"]))
    wrong = await holder.handle(request("rollback", version="nope"))
    assert wrong.answer is not None and wrong.answer.kind == "model-rejected"
    done = await holder.handle(request("rollback", version=bundles["a"].name))
    assert done.answer is not None and done.answer.kind == "model-activated"
    assert done.answer.model_version == bundles["a"].name
    assert holder.get().version == bundles["a"].name  # type: ignore[union-attr]
    assert holder.previous is not None and holder.previous.version == bundles["b"].name


async def test_shadow_scores_beside_the_active_model_and_promote(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    shadow = await holder.handle(request("shadow", bundles["b"]))
    assert shadow.answer is None and shadow.changed
    view = holder.get()
    assert isinstance(view, ShadowScoring) and view.version == bundles["a"].name
    batch = products(12)
    tags = view.score(batch)
    active, candidate = holder.active, holder.shadow
    assert active is not None and candidate is not None
    assert tags == active.score(batch)  # the batch gets the active model's tags
    diffs = list(holder.shadow_buffer)
    assert [d.product_id for d in diffs] == [p.product_id for p in batch]
    for diff, a, s in zip(diffs, active.score(batch), candidate.score(batch), strict=True):
        added, removed, agreement = diff_model_tags(a, s)
        assert (list(diff.added), list(diff.removed), diff.agreement) == (added, removed, agreement)
        assert ShadowDiff.decode(orjson.dumps(diff.to_dict())) == diff
    stats = holder.status()["shadow_stats"]
    assert stats["compared"] == 12 and stats["shadow_version"] == bundles["b"].name
    assert stats["agreement"] == pytest.approx(sum(d.agreement for d in diffs) / 12)

    wrong = await holder.handle(request("promote", version="nope"))
    assert wrong.answer is not None and wrong.answer.kind == "model-rejected"
    promoted = await holder.handle(request("promote", version="shadow"))
    assert promoted.answer is not None and promoted.answer.kind == "model-activated"
    assert promoted.answer.model_version == bundles["b"].name
    assert isinstance(holder.get(), BundleModel) and holder.shadow is None
    assert holder.previous is not None and holder.previous.version == bundles["a"].name
    none_left = await holder.handle(request("promote", version="shadow"))
    assert none_left.answer is not None and none_left.answer.reasons == ("promote: no shadow model",)


async def test_a_failing_shadow_never_fails_the_batch(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    await holder.handle(request("shadow", bundles["b"]))
    assert holder.shadow is not None
    holder.shadow.scorer.unload()  # the shadow now raises on every batch
    view = holder.get()
    assert view is not None and len(view.score(products(3))) == 3
    assert holder.status()["shadow_stats"]["errors"] == 1


async def test_answers_on_the_topic_are_ignored(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    answer = ModelUpdate(kind="model-activated", model_version="x", emitted_at=1, worker_id="w-2")
    assert (await holder.handle(answer)).answer is None
    assert holder.get().version == bundles["a"].name  # type: ignore[union-attr]


async def test_swaps_between_batches_never_mix_versions(bundles: dict[str, Path]) -> None:
    """Batches score in the executor while swaps happen on the loop: each batch's tags come from one version."""
    holder = await holder_with(bundles)
    store = MemoryStateStore("t")
    processor = Processor(store, user_hash_key=b"k", model_provider=holder.get)
    versions: list[set[str]] = []
    offset = 0

    async def feed() -> None:
        nonlocal offset
        for _ in range(30):
            msgs = []
            for _ in range(16):
                ev = upsert(f"p{offset}", TITLES[offset % len(TITLES)])
                msgs.append(InMessage("products", 0, offset, ev["product_id"].encode(), orjson.dumps(ev)))
                offset += 1
            out = await processor.process_products(msgs)
            versions.append({orjson.loads(v)["model_version"] for _, v in out.updates})
            assert len(out.updates) == 16 and not out.dead_letters
            await asyncio.sleep(0)

    async def swap() -> None:
        for path in (bundles["b"], bundles["c"], bundles["a"]):
            await asyncio.sleep(0.005)
            await holder.handle(request("activate", path))

    await asyncio.gather(feed(), swap())
    assert all(len(v) == 1 for v in versions)
    assert len({next(iter(v)) for v in versions}) >= 2


async def test_retag_rescores_changed_products_once(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    store = MemoryStateStore("t")
    processor = Processor(store, user_hash_key=b"k", model_provider=holder.get)
    msgs = []
    for i in range(20):
        ev = upsert(f"p{i}", TITLES[i % len(TITLES)], attributes={"colour": "Red"} if i % 2 else {})
        msgs.append(InMessage("products", 0, i, ev["product_id"].encode(), orjson.dumps(ev)))
    await processor.process_products(msgs)
    await processor.process_products([InMessage("products", 0, 20, b"p0", orjson.dumps({"bad": 1}))])
    await holder.handle(request("activate", bundles["b"]))
    new = holder.active
    assert new is not None

    published: list[BatchOutput] = []

    async def publish(out: BatchOutput) -> None:
        published.append(out)

    retagger = Retagger(store, rate=1000, batch=6, score_delta=0.05, publish=publish, topic="model-updates")
    stats = await retagger.run(new, run_offset=7)
    assert stats.scanned == 20 and stats.scored == 20 and stats.written == 20
    updates = [TagUpdate.decode(v) for out in published for _, v in out.updates]
    assert stats.updates == len(updates) > 0
    states = await store.read([f"p{i}" for i in range(20)])
    for u in updates:
        assert u.reason == "retag" and u.model_version == new.version
        assert (u.source.topic, u.source.partition, u.source.offset) == ("model-updates", 0, 7)  # the request
        assert [t.tag for t in u.tags] == [t["tag"] for t in states[u.product_id].tags["tags"]]  # type: ignore[index]
    for pid, st in states.items():
        assert st.tags is not None and st.tags["model_version"] == new.version
        expected = new.score([product_from_doc(pid, st.doc)])[0]
        assert [t["tag"] for t in st.tags["model"]] == [t.tag for t in expected]
    # Run again: everything is already on the new version, nothing written or emitted.
    published.clear()
    again = await Retagger(store, rate=1000, batch=6, score_delta=0.05, publish=publish, topic="m").run(new, 7)
    assert again.skipped_current == 20 and again.written == 0 and not published


async def test_a_live_write_between_the_retag_read_and_its_write_wins(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    live = upsert("p1", TITLES[0], version=2)  # p1 was TITLES[1]

    class LiveWriteFirst(MemoryStateStore):
        """p1 gets a live upsert after the re-tag's last read of it, just before the re-tag's writes land."""

        raced = False

        async def apply(self, writes: list[Write]) -> list[WriteResult]:
            if not self.raced and any(w.fence_field.startswith("retag:") for w in writes):
                self.raced = True
                await processor.process_products([InMessage("products", 0, 4, b"p1", orjson.dumps(live))])
            return await super().apply(writes)

    store = LiveWriteFirst("t")
    processor = Processor(store, user_hash_key=b"k", model_provider=holder.get, state_cache=100)
    feed = [InMessage("products", 0, i, f"p{i}".encode(), orjson.dumps(upsert(f"p{i}", TITLES[i]))) for i in range(4)]
    await processor.process_products(feed)
    await holder.handle(request("activate", bundles["b"]))
    new = holder.active
    assert new is not None
    written: list[str] = []

    async def publish(out: BatchOutput) -> None:
        return None

    retagger = Retagger(
        store, rate=1000, batch=8, score_delta=0.05, publish=publish, topic="m", on_written=written.extend
    )
    stats = await retagger.run(new, 5)
    assert stats.skipped_raced == 1 and stats.written == 3 and sorted(written) == ["p0", "p2", "p3"]
    p1 = (await store.read(["p1"]))["p1"]
    live_tags = [t.tag for t in new.score([ProductChange.from_dict(live)])[0]]
    before = product_from_doc("p1", {"title": TITLES[1], "version": "1"})
    assert before is not None
    old_tags = [t.tag for t in new.score([before])[0]]
    assert live_tags != old_tags  # what the re-tag would have written over the live change
    assert p1.tags is not None and [t["tag"] for t in p1.tags["model"]] == live_tags
    assert p1.doc["title"] == live["title"] and p1.tags["model_version"] == new.version


async def test_retag_only_touches_owned_partitions(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    store = MemoryStateStore("t")
    processor = Processor(store, user_hash_key=b"k", model_provider=holder.get)
    msgs = [
        InMessage("products", 0, i, f"p{i}".encode(), orjson.dumps(upsert(f"p{i}", TITLES[i % len(TITLES)])))
        for i in range(20)
    ]
    await processor.process_products(msgs)
    await holder.handle(request("activate", bundles["b"]))

    async def publish(out: BatchOutput) -> None:
        return None

    retagger = Retagger(
        store, rate=1000, batch=4, score_delta=0.05, publish=publish, topic="m", partitions={0}, partition_count=2
    )
    stats = await retagger.run(holder.active, 3)  # type: ignore[arg-type]
    assert stats.skipped_other_partition > 0 and stats.scored + stats.skipped_other_partition == 20


def test_cli_requests(bundles: dict[str, Path]) -> None:
    settings = WorkerSettings()
    event, key = build_request("activate", settings, model=bundles["a"])
    assert event.kind == "activate" and event.model_version == bundles["a"].name and key == b"tiny"
    assert event.sha256 is not None and len(event.sha256) == 64
    event, _ = build_request("rollback", settings)
    assert (event.kind, event.model_version) == ("rollback", "previous")
    event, _ = build_request("promote", settings, version="v1")
    assert (event.kind, event.model_version) == ("promote", "v1")


@pytest.mark.parametrize("kind", ["activate", "shadow"])
def test_a_model_request_for_a_bundle_outside_the_roots_is_refused_before_it_is_sent(
    bundles: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    from tagstream.cli import main

    monkeypatch.setenv("TAGSTREAM_MODEL_ROOTS", f'["{tmp_path}"]')
    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9")  # refused before any broker is asked
    assert main(["model", kind, "--model", str(bundles["b"])]) == 2
    err = capsys.readouterr().err.strip()
    assert f"place: {bundles['b'].resolve()} is outside TAGSTREAM_MODEL_ROOTS ({tmp_path})" in err
    assert "\n" not in err and "Traceback" not in err


def test_worker_installs_the_model_updates_task_unless_in_memory() -> None:
    from streams.app import Worker

    def model_tasks(worker: Worker) -> list[str]:
        return [t.__name__ for t in worker.app._app_tasks if "model" in t.__name__]

    live = Worker(WorkerSettings(worker_id="w"))
    assert live.models.consuming and len(model_tasks(live)) == 1
    harness = Worker(WorkerSettings(worker_id="w"), capture_output=True)
    assert not harness.models.consuming and not model_tasks(harness)


async def test_wait_counts_only_the_answers_that_fit_its_request(bundles: dict[str, Path]) -> None:
    """`model ... --wait`: an answer to an earlier request (still being validated when this one was sent) does not
    answer this one; promote / rollback answers name the shadow / previous model the worker had at the request."""
    settings = WorkerSettings()
    holder = await holder_with(bundles)
    a, b, c = (bundles[x].name for x in "abc")
    activate_b, _ = build_request("activate", settings, model=bundles["b"])
    bad_rollback, _ = build_request("rollback", settings, version="no-such-version")
    before = holder.status()  # what the CLI read before sending bad_rollback: activate b not applied yet
    activated_b = (await holder.handle(activate_b)).answer
    refused = (await holder.handle(bad_rollback)).answer
    assert activated_b is not None and activated_b.model_version == b
    assert refused is not None and refused.kind == "model-rejected"
    assert answer_fits(activate_b, activated_b, before) and not answer_fits(bad_rollback, activated_b, before)
    assert answer_fits(bad_rollback, refused, before) and not answer_fits(activate_b, refused, before)

    rollback, _ = build_request("rollback", settings)
    before = holder.status()
    rolled = (await holder.handle(rollback)).answer
    assert rolled is not None and rolled.model_version == a
    assert answer_fits(rollback, rolled, before) and not answer_fits(rollback, activated_b, before)
    assert not answer_fits(rollback, refused, before) and not answer_fits(activate_b, rolled, before)

    shadow_c, _ = build_request("shadow", settings, model=bundles["c"])
    promote, _ = build_request("promote", settings)
    before = holder.status()
    assert (await holder.handle(shadow_c)).answer is None  # an accepted shadow gets no answer on the topic
    after = holder.status()
    assert shadow_started(shadow_c, before, after) and not shadow_started(shadow_c, after, holder.status())
    promoted = (await holder.handle(promote)).answer
    assert promoted is not None and promoted.model_version == c
    assert answer_fits(promote, promoted, after) and not answer_fits(promote, rolled, after)
    assert not answer_fits(shadow_c, promoted, after) and not answer_fits(rollback, promoted, after)
    nothing = (await holder.handle(promote)).answer
    assert nothing is not None and nothing.reasons == ("promote: no shadow model",)
    assert answer_fits(promote, nothing, holder.status()) and not answer_fits(rollback, nothing, holder.status())


async def test_a_refused_shadow_is_its_answer(bundles: dict[str, Path]) -> None:
    holder = ModelHolder(WorkerSettings(worker_id="w-1"), policy=POLICY)  # no active model: shadow is refused
    await holder.start()
    shadow_b, _ = build_request("shadow", WorkerSettings(), model=bundles["b"])
    before = holder.status()
    refused = (await holder.handle(shadow_b)).answer
    assert refused is not None and refused.kind == "model-rejected"
    assert answer_fits(shadow_b, refused, before) and not shadow_started(shadow_b, before, holder.status())


class FakeConsumer:
    """The aiokafka consumer as the model-updates agent uses it: one partition whose log runs from `begin` to `end`,
    of which only `records` (offset, value, and optionally the Kafka timestamp: 1 by default, long before any
    worker's start) are fetched; once they are, the position is at `end` (the fetch skipped what is gone)."""

    def __init__(self, begin: int, end: int, records: list[tuple[int, bytes] | tuple[int, bytes, int]]) -> None:
        self.tp = TopicPartition("model-updates", 0)
        self.begin, self.end, self.records = begin, end, [(*r, 1)[:3] for r in records]
        self.next = begin

    def __call__(self, *args: Any, **kwargs: Any) -> FakeConsumer:
        return self

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {self.tp: self.begin}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {self.tp: self.end}

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        await asyncio.sleep(0.01)
        if not self.records:
            self.next = self.end
            return {}
        batch = [
            SimpleNamespace(topic=self.tp.topic, partition=0, key=b"k", value=v, offset=o, timestamp=ts, headers=[])
            for o, v, ts in self.records
        ]
        self.records.clear()
        self.next = batch[-1].offset + 1
        return {self.tp: batch}

    async def position(self, tp: TopicPartition) -> int:
        return self.next


@pytest.mark.parametrize(
    ("begin", "end", "offsets"),
    [
        (5, 5, []),  # retention deleted every record: log start == end > 0
        (0, 4, [0, 1]),  # records 2 and 3 gone (deleted after the offsets were read, or control records)
    ],
)
async def test_model_updates_backlog_is_caught_up_when_its_last_records_are_gone(
    monkeypatch: pytest.MonkeyPatch, begin: int, end: int, offsets: list[int]
) -> None:
    """A worker whose model-updates backlog ends in deleted records still starts scoring: no catch-up timeout."""
    import streams.models_agent as models_agent

    old = orjson.dumps(ModelUpdate(kind="rollback", model_version="previous", emitted_at=1).to_dict())
    monkeypatch.setattr(models_agent, "AIOKafkaConsumer", FakeConsumer(begin, end, [(o, old) for o in offsets]))
    settings = WorkerSettings(worker_id="w-1", model_catchup_timeout=600)
    holder = ModelHolder(settings, policy=POLICY)
    agent = models_agent.ModelUpdatesAgent(SimpleNamespace(settings=settings, topics={}), holder)  # type: ignore[arg-type]
    task = asyncio.create_task(agent._consume())
    try:
        await asyncio.wait_for(holder.caught_up.wait(), 10)
        assert agent.handled == len(offsets)  # the records left were replayed (unanswered: emitted before start)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------------------------------- re-tag restarts


class Stopped(Exception):
    """The worker stopping between a re-tag step's write and its updates' delivery."""


async def test_a_retag_stopped_before_delivering_its_updates_sends_them_when_run_again(
    bundles: dict[str, Path],
) -> None:
    holder = await holder_with(bundles)
    store = MemoryStateStore("t")
    processor = Processor(store, user_hash_key=b"k", model_provider=holder.get)
    feed = [InMessage("products", 0, i, f"p{i}".encode(), orjson.dumps(upsert(f"p{i}", TITLES[i]))) for i in range(8)]
    await processor.process_products(feed)
    await holder.handle(request("activate", bundles["b"]))
    new = holder.active
    assert new is not None

    async def stop(out: BatchOutput) -> None:
        raise Stopped

    # The first run writes every product's new tags, then the worker stops: no update reaches the topic.
    with pytest.raises(Stopped):
        await Retagger(store, rate=1000, batch=8, score_delta=0.05, publish=stop, topic="model-updates").run(new, 7)
    states = await store.read([f"p{i}" for i in range(8)])
    assert all(st.tags is not None and st.tags["model_version"] == new.version for st in states.values())
    kept = await store.stored_emits([(f"p{i}", f"retag:{new.version}") for i in range(8)])
    changed = sorted(pid for (pid, _), raw in kept.items() if raw is not None)
    assert len(changed) >= 2  # products whose tags the new model changed: their updates were never delivered
    # A live upsert of one of them after the stop: its own update is the latest, the re-tag one must not follow it.
    live = changed[0]
    await processor.process_products([InMessage("products", 0, 8, live.encode(), orjson.dumps(upsert(live, "x")))])

    published: list[BatchOutput] = []

    async def publish(out: BatchOutput) -> None:
        published.append(out)

    again = Retagger(store, rate=1000, batch=8, score_delta=0.05, publish=publish, topic="model-updates")
    stats = await again.run(new, 7)
    sent = {pid.decode(): raw for out in published for pid, raw in out.updates}
    assert sent == {pid: kept[(pid, f"retag:{new.version}")] for pid in changed[1:]}  # byte for byte the kept ones
    assert stats.written == 0 and stats.resent == len(changed) - 1
    now = await store.read(changed[1:])
    for pid, raw in sent.items():
        update = TagUpdate.decode(raw)
        assert update.reason == "retag" and update.source.offset == 7
        assert [t.tag for t in update.tags] == [t["tag"] for t in now[pid].tags["tags"]]  # type: ignore[index]
    # Delivered now: a third run sends nothing.
    published.clear()
    third = await Retagger(store, rate=1000, batch=8, score_delta=0.05, publish=publish, topic="model-updates").run(
        new, 7
    )
    assert third.resent == 0 and not published


# --------------------------------------------------------------------------------------------------- restarts


def _bad(event: ModelUpdate) -> ModelUpdate:
    """The same request with a sha256 its bundle does not have (refused by validation)."""
    return ModelUpdate(**_replace(event, sha256="0" * 64))  # type: ignore[arg-type]


HISTORIES = (
    "alternating",
    "refused last",
    "gone",
    "only refused",
    "shadow then promote",
    "refused shadow version",
    "rollback onto the shadow",
    "shadow stopped",
    "promote and roll back",
    "rollback twice",
    "rollback twice, then back by name",
    "activate between rollbacks",
    "NUL byte in a bundle_uri",
    "two refused activations, then back by name twice",
)


# histories whose end does not depend on some refused bundle, which a restart therefore never checks: the refusals it
# counts are those of the fold, which takes such a bundle as valid
COUNTS_AS_FOLDED = {"two refused activations, then back by name twice"}


def _history(bundles: dict[str, Path], name: str) -> list[ModelUpdate]:
    """Model-updates histories (requests in offset order), bundle a being the worker's configured model."""
    a, b, c = (request("activate", bundles[x]) for x in "abc")
    shadow_b, shadow_c = request("shadow", bundles["b"]), request("shadow", bundles["c"])
    stop = ModelUpdate(kind="shadow", model_version="shadow", emitted_at=1)
    missing = ModelUpdate(**_replace(b, bundle_uri=str(bundles["b"].parent / "gone")))  # type: ignore[arg-type]
    rollback, promote = request("rollback"), request("promote", version="shadow")
    back_to = {x: request("rollback", version=bundles[x].name) for x in "abc"}
    nul = ModelUpdate(**_replace(b, bundle_uri=f"{bundles['b']}\x00x"))  # type: ignore[arg-type]
    return {
        "alternating": [b, c, b, c, b, c, rollback],
        "refused last": [b, c, _bad(a)],
        "gone": [b, c, missing],
        "only refused": [_bad(b)],
        "shadow then promote": [b, _bad(c), shadow_c, promote],
        # a refused activate of the shadow's version must not clear the shadow, even once it left every slot
        "refused shadow version": [shadow_c, _bad(c), b, a],
        "rollback onto the shadow": [b, rollback, request("rollback", version="nope"), shadow_b, back_to["b"]],
        "shadow stopped": [shadow_b, stop, c, stop],
        "promote and roll back": [shadow_b, promote, c, rollback, rollback],
        "rollback twice": [b, rollback, rollback],
        "rollback twice, then back by name": [b, c, rollback, rollback, back_to["c"], rollback, _bad(a), rollback],
        "activate between rollbacks": [b, rollback, c, rollback],
        "NUL byte in a bundle_uri": [nul, b, nul, rollback],
        # either refused activation alone changes nothing the fold ends with, both together decide it (a review found
        # the restarted worker back on c, the model rolled back from)
        "two refused activations, then back by name twice": [
            _bad(b),
            _bad(c),
            shadow_b,
            promote,
            back_to["a"],
            c,
            back_to["a"],
        ],
    }[name]


def _models(holder: ModelHolder) -> tuple[str | None, ...]:
    return tuple(m.version if m is not None else None for m in (holder.active, holder.previous, holder.shadow))


def _count_validations(holder: ModelHolder) -> list[str]:
    """The model versions `holder` validates from now on, in order."""
    seen: list[str] = []
    original = holder.validate

    async def counting(event: ModelUpdate, *args: Any) -> BundleModel:
        seen.append(event.model_version)
        return await original(event, *args)

    holder.validate = counting  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("name", HISTORIES)
async def test_a_restart_folds_the_history_into_the_state_the_sequence_reaches(
    bundles: dict[str, Path], name: str
) -> None:
    """`restore` ends where applying the history one request at a time ends (models, refusals, swaps), validating
    at most what the sequence validated."""
    history = list(enumerate(_history(bundles, name)))
    sequential, folded = await holder_with(bundles), await holder_with(bundles)
    one_by_one, at_once = _count_validations(sequential), _count_validations(folded)
    last_swap = None
    for offset, event in history:
        if (await sequential.handle(event)).swapped_to is not None:
            last_swap = offset
    assert await folded.restore(history) == last_swap
    assert _models(folded) == _models(sequential)
    assert len(at_once) <= len(one_by_one)
    if len(at_once) < len(one_by_one) and name in COUNTS_AS_FOLDED:
        return  # a bundle the result does not depend on is not checked: its requests count as the fold judged them
    assert (folded.rejections, folded.swaps) == (sequential.rejections, sequential.swaps)
    assert (folded.last_rejection and folded.last_rejection.reasons) == (
        sequential.last_rejection and sequential.last_rejection.reasons
    )
    if folded.active is not None:
        assert len(folded.active.score(products(2))) == 2  # loaded, scoring


async def test_a_restarted_worker_validates_only_the_models_its_history_ends_with(
    monkeypatch: pytest.MonkeyPatch, bundles: dict[str, Path]
) -> None:
    """A long history of activations is not validated again request by request: the worker validates the final
    active and previous bundles once each, and never scores with a model the history retired."""
    import streams.models_agent as models_agent

    history = _history(bundles, "alternating")  # b, c three times, then rollback: active b, previous c
    records = [(o, orjson.dumps(e.to_dict())) for o, e in enumerate(history)]
    monkeypatch.setattr(models_agent, "AIOKafkaConsumer", FakeConsumer(0, len(records), records))
    settings = WorkerSettings(worker_id="w-1", model_path=bundles["a"], model_catchup_timeout=600)
    holder = ModelHolder(settings, policy=POLICY, isolated=False)
    await holder.load_initial()
    validated = _count_validations(holder)
    serving: list[str | None] = []

    async def batches_meanwhile() -> None:  # what batches would score with meanwhile (past the catch-up timeout)
        while not holder.caught_up.is_set():
            serving.append(_models(holder)[0])
            await asyncio.sleep(0.001)

    agent = models_agent.ModelUpdatesAgent(FakeWorker(settings), holder)  # type: ignore[arg-type]
    task = asyncio.create_task(agent._consume())
    try:
        await asyncio.wait_for(batches_meanwhile(), 60)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    a, b, c = (bundles[x].name for x in "abc")
    assert sorted(validated) == sorted([b, c])  # not six validations
    assert set(serving) == {a}  # no model the history retired ever scored
    assert _models(holder) == (b, c, None)
    assert agent.handled == len(history) and agent._replayed_swap == len(history) - 1  # the rollback's re-tag


class FakeTopic:
    """A Faust topic's `send` (the answers it was given)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []

    async def send(self, key: bytes | None = None, value: bytes = b"") -> asyncio.Future[None]:
        self.sent.append((key, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class FakeWorker:
    """What the model-updates agent uses of a Worker: settings, topics and `publish` (recorded)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.topics = {"model-updates": FakeTopic()}
        self.published: list[BatchOutput] = []

    async def publish(self, out: BatchOutput) -> None:
        self.published.append(out)


async def _consume_until_caught_up(agent: Any, holder: ModelHolder) -> None:
    """Run the model-updates agent's consumer until its holder caught up with the history, then stop it."""
    task = asyncio.create_task(agent._consume())
    try:
        await asyncio.wait_for(holder.caught_up.wait(), 10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_malformed_model_updates_go_to_the_dead_letter_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    import streams.models_agent as models_agent
    from schemas import DeadLetter

    now = time.time_ns() // 1_000_000
    records: list[tuple[int, bytes, int]] = [
        (0, b"{not json", 1),  # history from before this worker started: dead-lettered by the workers of then
        (1, b"{not json", now + 60_000),
        (2, orjson.dumps({**request("rollback").to_dict(), "extra": 1}), now + 60_000),
    ]
    monkeypatch.setattr(models_agent, "AIOKafkaConsumer", FakeConsumer(0, 3, records))
    settings = WorkerSettings(worker_id="w-1", model_catchup_timeout=600)
    holder = ModelHolder(settings, policy=POLICY)
    worker = FakeWorker(settings)
    agent = models_agent.ModelUpdatesAgent(worker, holder)  # type: ignore[arg-type]
    await _consume_until_caught_up(agent, holder)
    dead = [DeadLetter.decode(v) for out in worker.published for _, v, _ in out.dead_letters]
    assert [(d.source.topic, d.source.offset) for d in dead] == [("model-updates", 1), ("model-updates", 2)]
    assert base64.b64decode(dead[1].value_b64 or "") == records[2][1]  # the raw bytes, kept whole
    assert "extra" in dead[1].reason and dead[0].error_type == "EventDecodeError"


async def test_the_start_time_answer_names_the_bundle_by_its_absolute_path(
    monkeypatch: pytest.MonkeyPatch, bundles: dict[str, Path]
) -> None:
    """`tagstream worker --model models/<version>` announced `"bundle_uri": "models/<version>"`, as typed: a path
    that names nothing for a reader elsewhere, and unlike the absolute ones `publish` and `model activate` send."""
    import streams.models_agent as models_agent

    monkeypatch.chdir(bundles["a"].parent.parent)
    typed = Path(bundles["a"].parent.name, bundles["a"].name)  # relative, as typed
    monkeypatch.setattr(models_agent, "AIOKafkaConsumer", FakeConsumer(0, 0, []))
    settings = WorkerSettings(worker_id="w-1", model_path=typed, model_catchup_timeout=600)
    holder = ModelHolder(settings, policy=POLICY)
    await holder.load_initial()
    worker = FakeWorker(settings)
    agent = models_agent.ModelUpdatesAgent(worker, holder)  # type: ignore[arg-type]
    await _consume_until_caught_up(agent, holder)
    [(_key, value)] = worker.topics["model-updates"].sent
    answer = ModelUpdate.decode(value)
    assert (answer.kind, answer.model_version) == ("model-activated", bundles["a"].name)
    assert answer.bundle_uri == str(bundles["a"].resolve())


class DownRedis:
    """A Redis client whose every status write fails (Redis unreachable); counts the writes tried."""

    def __init__(self) -> None:
        self.tried = 0
        self.up = False

    async def hset(self, key: str, field: str, value: bytes) -> int:
        self.tried += 1
        if not self.up:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        return 1


async def test_a_status_write_redis_refuses_is_retried_and_logged_once_per_status_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down, the worker warned "could not write the worker status to Redis" twice a second (at every
    turn of its publish loop), not once per status interval."""
    import streams.models_agent as models_agent

    clock = [1000.0]
    monkeypatch.setattr(models_agent, "time", SimpleNamespace(monotonic=lambda: clock[0], time_ns=time.time_ns))
    settings = WorkerSettings(worker_id="w-1")
    agent = models_agent.ModelUpdatesAgent(FakeWorker(settings), ModelHolder(settings, policy=POLICY))  # type: ignore[arg-type]
    redis = DownRedis()
    agent.redis = redis  # type: ignore[assignment]
    monkeypatch.setattr(agent, "prune_statuses", lambda: asyncio.sleep(0))
    for _ in range(25):  # 12 s of the publish loop's turns, every 0.5 s, the status changed meanwhile
        agent._status_dirty = True
        await agent._write_status()
        clock[0] += 0.5
    warned = [r for r in caplog.records if "could not write the worker status" in r.message]
    assert redis.tried == len(warned) == 3  # at 0, 5 and 10 s
    assert "tried again in 5 s" in warned[0].message
    redis.up = True
    await agent._write_status()  # 12.5 s: not due yet
    clock[0] += 2.5
    await agent._write_status()  # 15 s: written
    assert redis.tried == 4 and not agent._status_dirty
    agent._status_dirty = True  # Redis up: a change is written at once again
    await agent._write_status()
    assert redis.tried == 5


# --------------------------------------------------------------------------------------------------- lifecycle fixes


async def test_a_dead_validation_process_is_replaced_before_a_bundle_is_judged(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles, isolated=True)
    try:
        pool = holder._pool
        assert pool is not None
        for child in list(pool._processes.values()):  # type: ignore[attr-defined]
            child.kill()  # the OOM killer, an operator
            child.join()
        outcome = await holder.handle(request("activate", bundles["b"]))
        assert outcome.answer is not None and outcome.answer.kind == "model-activated", outcome.answer
        assert holder.get().version == bundles["b"].name  # type: ignore[union-attr]
    finally:
        holder.close()


async def test_a_shadow_can_be_stopped_and_stays_stopped_after_a_restart(bundles: dict[str, Path]) -> None:
    a, b = bundles["a"].name, bundles["b"].name
    settings = WorkerSettings()
    holder = await holder_with(bundles)
    shadow_b, _ = build_request("shadow", settings, model=bundles["b"])
    stop, key = build_request("shadow", settings, off=True)
    assert (stop.kind, stop.model_version, stop.bundle_uri, key) == ("shadow", "shadow", None, b"tagstream-control")
    wrong, _ = build_request("shadow", settings, off=True, version="nope")
    nothing = (await holder.handle(stop)).answer
    assert nothing is not None and nothing.reasons == ("shadow: no shadow model to stop",)
    assert answer_fits(stop, nothing, holder.status())
    await holder.handle(shadow_b)
    before = holder.status()
    refused = (await holder.handle(wrong)).answer
    assert refused is not None and refused.kind == "model-rejected" and holder.shadow is not None
    assert refused.reasons == (f"shadow: the shadow model is {b}, not nope",) and answer_fits(wrong, refused, before)
    stopped = await holder.handle(stop)
    assert stopped.changed and stopped.answer is not None
    assert (stopped.answer.kind, stopped.answer.model_version) == ("model-activated", a)
    assert stopped.answer.reasons == (f"shadow: {b} stopped",)
    stopped.answer.to_dict()  # schema-valid
    assert holder.shadow is None and holder.status()["shadow"] is None and holder.get() is holder.active
    assert answer_fits(stop, stopped.answer, before) and not answer_fits(wrong, stopped.answer, before)
    assert not answer_fits(request("activate", bundles["a"]), stopped.answer, before)
    # A restart replays the history: the shadow stays off.
    restarted = await holder_with(bundles)
    await restarted.restore([(0, shadow_b), (1, stop)])
    assert restarted.shadow is None and restarted.active is not None and restarted.active.version == a


async def test_rolling_back_to_the_shadows_model_stops_the_shadow(bundles: dict[str, Path]) -> None:
    holder = await holder_with(bundles)
    await holder.handle(request("activate", bundles["b"]))  # a is previous
    await holder.handle(request("shadow", bundles["a"]))  # a again, in shadow beside b
    assert holder.shadow is not None and holder.shadow.version == bundles["a"].name
    done = await holder.handle(request("rollback"))
    assert done.answer is not None and done.answer.model_version == bundles["a"].name
    assert holder.shadow is None and isinstance(holder.get(), BundleModel)  # not shadowing itself


def test_two_worker_processes_on_one_host_have_different_default_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAGSTREAM_WORKER_ID", raising=False)
    env = {k: v for k, v in os.environ.items() if k != "TAGSTREAM_WORKER_ID"}
    other = subprocess.run(
        [sys.executable, "-c", "from streams.settings import WorkerSettings; print(WorkerSettings().worker_id)"],
        env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    mine = WorkerSettings().worker_id
    assert mine != other and mine.startswith(f"worker@{socket.gethostname()}")
    assert other.startswith(f"worker@{socket.gethostname()}")


def _ended(pid: int | None, timeout: float = 60) -> bool:
    """Whether process `pid` has ended within `timeout` (bounded poll). Not `Process.is_alive()`: the process pool's
    own thread may reap the child first, after which `is_alive()` cannot tell and answers True."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


async def test_a_validation_that_does_not_finish_in_time_is_refused_and_its_process_ended(
    bundles: dict[str, Path],
) -> None:
    from dataclasses import replace

    holder = await holder_with(bundles, isolated=True)
    try:
        pool = holder._pool
        assert pool is not None
        stuck = list(pool._processes.values())  # type: ignore[attr-defined]
        # a validation that would run for hours (a bundle on a hung network mount blocks the same way)
        holder._policy = replace(POLICY, latency_runs=10**9, timeout_s=2.0)
        outcome = await holder.handle(request("activate", bundles["b"]))
        assert outcome.answer is not None and outcome.answer.kind == "model-rejected"
        assert "did not finish within 2 s" in " ".join(outcome.answer.reasons)
        assert holder.get().version == bundles["a"].name  # type: ignore[union-attr]
        assert all(_ended(child.pid) for child in stuck)  # killed, not left validating
        holder._policy = POLICY
        again = await holder.handle(request("activate", bundles["b"]))
        assert again.answer is not None and again.answer.kind == "model-activated", again.answer
        assert holder.get().version == bundles["b"].name  # type: ignore[union-attr]
    finally:
        holder.close()


async def test_closing_the_holder_during_a_stuck_validation_ends_its_process(bundles: dict[str, Path]) -> None:
    from dataclasses import replace

    holder = await holder_with(bundles, isolated=True)
    holder._policy = replace(POLICY, latency_runs=10**9, timeout_s=600.0)  # a validation that would not end
    pending = asyncio.create_task(holder.handle(request("activate", bundles["b"])))
    for _ in range(6000):  # until the validation is in the child process (bounded: 60 s)
        pool = holder._pool
        if pool is not None and pool._pending_work_items:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert pool is not None and pool._pending_work_items  # type: ignore[attr-defined]
    children = list(pool._processes.values())  # type: ignore[attr-defined]
    holder.close()  # the worker stops (SIGTERM): before, its exit waited for the child forever
    assert all(_ended(child.pid) for child in children)
    outcome = await asyncio.wait_for(pending, 60)
    assert outcome.answer is not None and outcome.answer.kind == "model-rejected"
    assert holder._pool is None and holder.get().version == bundles["a"].name  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------- review fixes


async def test_a_model_updates_topic_with_more_than_one_partition_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests are keyed by model name or `tagstream-control`, so on several partitions a restarted worker folded
    them out of order (and records sharing an offset overwrote each other)."""
    import streams.models_agent as models_agent
    from tagstream.errors import ConfigError

    class TwoPartitions(FakeConsumer):
        def assignment(self) -> set[TopicPartition]:
            return {TopicPartition("model-updates", 0), TopicPartition("model-updates", 1)}

    monkeypatch.setattr(models_agent, "AIOKafkaConsumer", TwoPartitions(0, 0, []))
    settings = WorkerSettings(worker_id="w-1", model_catchup_timeout=600)
    holder = ModelHolder(settings, policy=POLICY)
    agent = models_agent.ModelUpdatesAgent(FakeWorker(settings), holder)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^topic model-updates has 2 partitions, but model-updates must have "):
        await asyncio.wait_for(agent._consume(), 30)
    assert not holder.caught_up.is_set()


async def test_a_bundle_uri_with_a_nul_byte_is_refused_live_and_in_the_history_of_a_restart(
    bundles: dict[str, Path],
) -> None:
    """A schema-valid request whose bundle_uri holds a NUL byte was refused by a running worker but made every later
    start crash (ValueError out of `restore`): the topic keeps it forever."""
    a, b = bundles["a"].name, bundles["b"].name
    raw = {**request("activate", bundles["b"]).to_dict(), "bundle_uri": f"{bundles['b']}\x00x"}
    nul = ModelUpdate.decode(orjson.dumps(raw))  # not dead-lettered: the schema accepts it
    holder = await holder_with(bundles)
    live = (await holder.handle(nul)).answer
    assert live is not None and live.kind == "model-rejected" and "not a bundle directory" in live.reasons[0]
    active = holder.active
    assert active is not None  # the same, naming the active model's version and sha256: compared with its path first
    same = ModelUpdate(**_replace(nul, model_version=a, sha256=active.bundle.sha256))  # type: ignore[arg-type]
    assert (await holder.handle(same)).answer.kind == "model-rejected"  # type: ignore[union-attr]

    restarted = await holder_with(bundles)
    history = [nul, same, request("activate", bundles["b"])]
    assert await restarted.restore(list(enumerate(history))) == 2
    assert _models(restarted) == (b, a, None) and restarted.rejections == 2


async def test_a_rollback_sent_twice_does_not_return_to_the_model_it_left(bundles: dict[str, Path]) -> None:
    """`rollback --wait` exits 1 when a worker is slow, the operator runs it again: every worker that had rolled
    back went back to the bad model. The command now names the previous model the workers report, and a rollback
    naming the model already active changes nothing (its --wait counts the answer). One naming none still swaps, as
    the stored history of every worker has always been folded."""
    settings = WorkerSettings()
    a, b = bundles["a"].name, bundles["b"].name
    holder = await holder_with(bundles)
    activate_b = request("activate", bundles["b"])
    await holder.handle(activate_b)  # the bad model
    version, why = rollback_target({"w1": holder.status()})
    assert version == a and why == "the previous model every live worker reports (1)"
    rollback, _ = build_request("rollback", settings, version=version)
    before = holder.status()
    first = (await holder.handle(rollback)).answer
    assert first is not None and (first.kind, first.model_version) == ("model-activated", a)
    assert answer_fits(rollback, first, before) and _models(holder) == (a, b, None)

    before = holder.status()
    again = await holder.handle(rollback)  # the retry: the same request
    assert not again.changed and again.swapped_to is None and _models(holder) == (a, b, None)
    answer = again.answer
    assert answer is not None and (answer.kind, answer.model_version) == ("model-activated", a)
    assert answer.reasons == (f"rollback: {a} is already active",)
    answer.to_dict()  # schema-valid
    assert answer_fits(rollback, answer, before)  # the retry's --wait counts it: exit 0
    assert not answer_fits(request("activate", bundles["a"]), answer, before)
    back, _ = build_request("rollback", settings, version=b)  # asked for by name: back to the model left
    assert (await holder.handle(back)).swapped_to == b and _models(holder) == (b, a, None)

    plain, _ = build_request("rollback", settings)  # naming none: a swap each time, as before
    assert (await holder.handle(plain)).swapped_to == a and (await holder.handle(plain)).swapped_to == b
    assert holder.swaps == 5
    history = [activate_b, rollback, rollback, back, plain, plain]
    restarted = await holder_with(bundles)  # a restart folds the same history to the same models
    await restarted.restore(list(enumerate(history)))
    assert _models(restarted) == _models(holder) == (b, a, None)


def test_the_rollback_command_names_the_previous_model_only_when_every_live_worker_reports_the_same() -> None:
    assert rollback_target({"w1": {"previous": "v1"}, "w2": {"previous": "v1"}})[0] == "v1"
    version, why = rollback_target({"w1": {"previous": "v1"}, "w2": {"previous": "v2"}})
    assert version is None and why == "the live workers report different previous models (v1, v2)"
    version, why = rollback_target({"w1": {"previous": "v1"}, "w2": {"previous": None}, "w3": {"previous": None}})
    assert version is None and why == "the live workers report different previous models (v1; none on w2, w3)"
    with pytest.raises(ConfigError) as refused:
        rollback_target({"w1": {"previous": None}, "w2": {"previous": None}})
    assert str(refused.value) == "model rollback: no live worker reports a previous model to roll back to"
    assert rollback_target({}) == (None, "no live worker reports its models")


def test_a_rollback_no_live_worker_can_do_is_refused_in_one_line_and_not_sent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With one live worker that had no previous model, `model rollback` said "the live workers report different
    previous models (None)", sent the request, which the worker refused, and exited 1."""
    import streams.model_cli as model_cli
    from tagstream.cli import main

    now = time.time_ns() // 1_000_000
    status = {"w-1": {"active": "m-1", "previous": None, "shadow": None, "at": now, "reported_at": now}}
    sent: list[ModelUpdate] = []

    async def no_request(settings: WorkerSettings) -> None:
        return None

    async def send(settings: WorkerSettings, event: ModelUpdate, key: bytes) -> int:
        sent.append(event)
        return 0

    monkeypatch.setattr(model_cli, "read_status", lambda settings: status)
    monkeypatch.setattr(model_cli, "last_request", no_request)
    monkeypatch.setattr(model_cli, "send_request", send)
    for argv in (["model", "rollback"], ["model", "rollback", "--wait", "5"]):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.splitlines() == [
            "tagstream model: error: model rollback: no live worker reports a previous model to roll back to"
        ]
    assert sent == []


def test_a_rollback_with_every_worker_stopped_names_the_model_their_answers_had_before_and_a_retry_the_same(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no live worker, `model rollback` sent a rollback naming no version: each worker swapped at its next
    start, and a retry ("did it work?") swapped back."""
    import streams.model_cli as model_cli
    from tagstream.cli import main

    def answer(version: str, worker: str = "w-1") -> ModelUpdate:
        return ModelUpdate(kind="model-activated", model_version=version, emitted_at=1, worker_id=worker)

    refused = ModelUpdate(kind="model-rejected", model_version="v9", emitted_at=1, worker_id="w-1", reasons=("x",))
    history = [answer("v1"), answer("v1", "w-2"), answer("v2"), refused, answer("v2", "w-2"), answer("v2", "w-3")]
    sent: list[ModelUpdate] = []

    async def answers(settings: WorkerSettings, *, after: int = -1) -> list[ModelUpdate]:
        return list(history)

    async def last(settings: WorkerSettings) -> tuple[int, ModelUpdate] | None:
        return (len(sent), sent[-1]) if sent else None

    async def send(settings: WorkerSettings, event: ModelUpdate, key: bytes) -> int:
        sent.append(event)
        return len(sent)

    monkeypatch.setattr(model_cli, "read_status", lambda settings: {})  # every worker stopped
    monkeypatch.setattr(model_cli, "read_answers", answers)
    monkeypatch.setattr(model_cli, "last_request", last)
    monkeypatch.setattr(model_cli, "send_request", send)
    for _ in range(2):  # the retry names the same model: at their next start the workers end on v1 either way
        assert main(["model", "rollback"]) == 0
        assert "rollback to v1: " in capsys.readouterr().out
    assert [(e.kind, e.model_version) for e in sent] == [("rollback", "v1"), ("rollback", "v1")]
    history[:] = [answer("v2")]  # no model before the current one: refused in one line, nothing sent
    sent.clear()
    assert main(["model", "rollback"]) == 2
    err = capsys.readouterr().err.strip()
    assert "name no model active before the current one: name it with --version V" in err and "\n" not in err
    assert sent == []


def test_activating_the_active_model_says_nothing_was_swapped(
    bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import streams.model_cli as model_cli
    from tagstream.cli import main

    version = bundles["a"].name
    now = time.time_ns() // 1_000_000
    status = {
        "w-1": {"active": version, "previous": None, "shadow": None, "at": now, "reported_at": now},
        "w-2": {"active": "older", "previous": None, "shadow": None, "at": now, "reported_at": now},
    }

    async def send(settings: WorkerSettings, event: ModelUpdate, key: bytes) -> int:
        return 7

    async def wait(settings: WorkerSettings, event: ModelUpdate, **kwargs: object) -> model_cli.WaitResult:
        answers = [
            ModelUpdate(kind="model-activated", model_version=version, emitted_at=1, worker_id=w, sha256=event.sha256)
            for w in ("w-1", "w-2")
        ]
        return model_cli.WaitResult(answers=answers)

    monkeypatch.setattr(model_cli, "read_status", lambda settings: status)
    monkeypatch.setattr(model_cli, "send_request", send)
    monkeypatch.setattr(model_cli, "wait_answers", wait)
    assert main(["model", "activate", "--model", str(bundles["a"]), "--wait", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # before: both lines read as a swap
    assert f"w-1: model-activated {version} (it was active already: nothing swapped)" in lines
    assert f"w-2: model-activated {version}" in lines


def test_requests_every_live_worker_would_refuse_are_not_sent() -> None:
    from streams.model_cli import UNREADABLE
    from streams.model_cli import refused_by_every_live_worker as refused

    plain = {"active": "v2", "previous": "v1", "shadow": None}
    shadowing = {"active": "v2", "previous": "v1", "shadow": "v3"}
    # before: sent, refused by every worker, and kept in the history (refused again at every start)
    assert refused("promote", None, False, {"w1": plain, "w2": plain}) == (
        "model promote: no live worker runs a shadow model (2 report none)"
    )
    assert (
        refused("shadow", None, True, {"w1": plain})
        == "model shadow --off: no live worker runs a shadow model (1 report none)"
    )
    assert "no live worker runs v9 as its shadow model (they run v3)" in str(
        refused("promote", "v9", False, {"w": shadowing})
    )
    assert refused("rollback", "v9", False, {"w1": plain}) == (
        "model rollback: no live worker has v9 as its previous or active model (previous: v1)"
    )
    # one worker may take it, or they cannot be judged: sent, as before
    assert refused("promote", None, False, {"w1": plain, "w2": shadowing}) is None
    assert refused("rollback", "v1", False, {"w1": plain}) is None
    assert refused("rollback", "v2", False, {"w1": plain}) is None  # already active: answered, nothing changes
    assert refused("rollback", None, False, {"w1": plain}) is None  # plain rollbacks: `rollback_target`
    assert refused("promote", None, False, {}) is None  # no live worker: they fold it at their start
    assert refused("promote", None, False, {"w1": {**plain, "caught_up": False}}) is None  # still replaying
    assert refused("promote", None, False, {"w1": plain, "w2": {UNREADABLE: "not JSON"}}) is None
    assert refused("shadow", None, False, {"w1": plain}) is None  # a shadow with a bundle: validated by the workers


def test_a_rollback_is_not_refused_while_a_restarted_worker_still_replays_the_history() -> None:
    """Right after a fleet-wide restart every worker reported no previous model until it had folded the history, and
    `model rollback` was refused though each would have one a moment later."""
    from streams.model_cli import NO_PREVIOUS_MODEL

    now = time.time_ns() // 1_000_000
    replaying = {"w-1": {"active": "m-1", "previous": None, "caught_up": False, "reported_at": now}}
    version, why = rollback_target(replaying)
    assert version is None and why.endswith("w-1 still replaying")
    with pytest.raises(ConfigError, match=NO_PREVIOUS_MODEL):
        rollback_target({"w-1": {**replaying["w-1"], "caught_up": True}})
    assert ModelHolder(WorkerSettings(worker_id="w"), policy=POLICY).status()["caught_up"] is False


def test_a_plain_rollback_names_again_the_version_the_newest_rollback_named_while_a_worker_has_it_active() -> None:
    from schemas import ModelUpdate
    from streams.model_cli import retry_of_last_rollback

    def req(kind: str, version: str) -> tuple[int, ModelUpdate]:
        return 7, ModelUpdate(kind=kind, model_version=version, emitted_at=1)  # type: ignore[arg-type]

    done, slow = {"active": "v1", "previous": "v2"}, {"active": "v2", "previous": "v1"}
    version, why = retry_of_last_rollback(req("rollback", "v1"), "mu", {"w1": done, "w2": slow}) or (None, "")
    assert version == "v1" and why.startswith("the newest request on mu (offset 7) is a rollback to it")
    assert retry_of_last_rollback(req("rollback", "v1"), "mu", None) is not None  # Redis down: a retry all the same
    assert retry_of_last_rollback(req("rollback", "v9"), "mu", {"w1": done}) is None  # refused: not active anywhere
    assert retry_of_last_rollback(req("rollback", "previous"), "mu", {"w1": done}) is None  # it named no version
    assert retry_of_last_rollback(req("activate", "v1"), "mu", {"w1": done}) is None
    assert retry_of_last_rollback(None, "mu", {"w1": done}) is None


BROKEN_LABELS = {
    "format_version": 1,
    "groups": [{"name": "g", "kind": "multi", "parent_group": None}],
    "labels": [{"index": i, "tag": f"t{i}", "group": "nogroup", "value": "v", "parent": None} for i in range(50_000)],
}


async def test_a_refusal_of_a_bundle_with_thousands_of_problems_fits_a_kafka_message(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """50,000 broken labels gave a 2.9 MB model-rejected answer (never published: over Kafka's 1 MB) and a status of
    the same size rewritten to Redis every 5 s."""
    from serving.bundle import MAX_REASONS
    from tests.tinymodel import tamper

    bad = shutil.copytree(bundles["b"], tmp_path / bundles["b"].name)
    tamper(bad, "labels.json", orjson.dumps(BROKEN_LABELS))
    holder = await holder_with(bundles)
    answer = (await holder.handle(request("activate", bad))).answer
    assert answer is not None and answer.kind == "model-rejected"
    assert len(answer.reasons) == MAX_REASONS + 1 and answer.reasons[-1] == f"… and {50_000 - MAX_REASONS} more reasons"
    assert len(orjson.dumps(answer.to_dict())) < 50_000
    assert len(orjson.dumps(holder.status())) < 50_000
    assert holder.status()["last_rejected"]["reasons"] == list(answer.reasons)


def test_model_status_shows_how_many_requests_a_worker_refused_and_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal whose answer never reached the topic left `model status` silent: it showed no sign of it."""
    import streams.model_cli as model_cli
    from tagstream.cli import main

    now = time.time_ns() // 1_000_000
    reasons = [f"labels.json: label 't{i}' has unknown group 'nogroup'" for i in range(30)]  # an older worker's
    status = {
        "w-1": {"active": "m-1", "previous": None, "shadow": None, "at": now, "swaps": 0, "rejections": 2,
                "last_rejected": {"model_version": "m-bad", "reasons": reasons}, "shadow_stats": None,
                "reported_at": now},
        "w-2": {"active": "m-1", "previous": None, "shadow": None, "at": now, "swaps": 0, "rejections": 0,
                "last_rejected": None, "shadow_stats": None, "reported_at": now},
    }  # fmt: skip

    async def no_answers(settings: WorkerSettings, *, after: int = -1) -> list[ModelUpdate]:
        return []

    monkeypatch.setattr(model_cli, "read_status", lambda settings: status)
    monkeypatch.setattr(model_cli, "read_answers", no_answers)
    assert main(["model", "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    refused = [line for line in lines if line.startswith("  refused:")]
    assert refused == [f"  refused:  2 requests, the last m-bad: {'; '.join(reasons[:20])}; … and 10 more reasons"]
    assert lines.index(refused[0]) < lines.index("w-2")  # w-1's; w-2 refused nothing


async def test_candidates_are_compared_with_the_active_model_after_its_bundle_directory_is_gone(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """With a golden set, the validation process reloaded the active model from its bundle directory: once that was
    removed (a registry clean-up), every candidate was refused with the active bundle's reasons."""
    from dataclasses import replace

    from tests.unit.test_validate import golden_set_of

    gone = shutil.copytree(bundles["a"], tmp_path / bundles["a"].name)
    reference = await holder_with(bundles)
    assert reference.active is not None
    golden = tuple(golden_set_of(reference.active))  # a scores micro-F1 1.0 on it, b lower
    settings = WorkerSettings(model_path=gone, worker_id="w-1")
    holder = ModelHolder(settings, policy=replace(POLICY, golden_set=golden), isolated=True)
    try:
        await holder.start()
        shutil.rmtree(gone)  # the worker keeps serving its model from memory
        refused = (await holder.handle(request("activate", bundles["b"]))).answer
        assert refused is not None and refused.kind == "model-rejected"
        assert len(refused.reasons) == 1 and refused.reasons[0].startswith("quality: micro-F1 "), refused.reasons
        holder._policy = replace(holder.policy, max_quality_drop=1.0)
        accepted = (await holder.handle(request("activate", bundles["b"]))).answer
        assert accepted is not None and accepted.kind == "model-activated", accepted.reasons
    finally:
        holder.close()


def _unblock(fifo: Path) -> None:
    """Let a reader blocked opening `fifo` go (it then reads nothing)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("name", ["labels.json", "model.onnx"])
async def test_a_file_made_a_fifo_after_the_validation_process_checked_it_is_refused_without_blocking(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The worker re-reads a bundle after its validation process answered: a file that blocks then (a FIFO here, a
    hung network mount alike) stopped the model-updates consumer for good."""
    import streams.model as model_module

    candidate = shutil.copytree(bundles["b"], tmp_path / bundles["b"].name)
    real = model_module.validate_isolated

    def validate_then_swap(*args: Any, **kwargs: Any) -> Any:
        report = real(*args, **kwargs)  # the child read regular files
        (candidate / name).chmod(0o644)
        (candidate / name).unlink()
        os.mkfifo(candidate / name)  # nobody writes it
        return report

    holder = await holder_with(bundles, isolated=True)
    monkeypatch.setattr(model_module, "validate_isolated", validate_then_swap)
    try:
        outcome = await asyncio.wait_for(holder.handle(request("activate", candidate)), 60)
        assert outcome.answer is not None and outcome.answer.kind == "model-rejected"
        assert name in outcome.answer.reasons[0] and "not a regular file" in outcome.answer.reasons[0]
        assert holder.get().version == bundles["a"].name  # type: ignore[union-attr]
    finally:
        _unblock(candidate / name)
        holder.close()


async def test_reopening_a_validated_bundle_is_bounded_by_the_validation_time_limit(
    bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TAGSTREAM_MODEL_VALIDATION_TIMEOUT_S bounded only the validation process: a re-read hanging after it left
    every later model update waiting."""
    from dataclasses import replace

    import streams.model as model_module

    release = threading.Event()
    real = model_module.open_validated

    def hang_until_released(*args: Any) -> Any:
        release.wait(120)  # a read stuck on a hung network mount
        return real(*args)

    holder = await holder_with(bundles, isolated=True)
    monkeypatch.setattr(model_module, "open_validated", hang_until_released)
    holder._policy = replace(POLICY, timeout_s=5.0)
    try:
        outcome = await asyncio.wait_for(holder.handle(request("activate", bundles["b"])), 60)
        assert outcome.answer is not None and outcome.answer.kind == "model-rejected"
        assert outcome.answer.reasons[0].startswith("re-opening the validated bundle did not finish within 5 s")
        assert holder.get().version == bundles["a"].name  # type: ignore[union-attr]
        release.set()  # the file system answers again: the next request is applied
        again = await asyncio.wait_for(holder.handle(request("activate", bundles["b"])), 60)
        assert again.answer is not None and again.answer.kind == "model-activated", again.answer.reasons
    finally:
        release.set()
        holder.close()


async def test_a_shadow_of_the_active_model_is_refused_so_one_version_never_fills_two_slots(
    bundles: dict[str, Path],
) -> None:
    a = bundles["a"].name
    holder = await holder_with(bundles)  # a active
    shadow_a = request("shadow", bundles["a"])
    refused = (await holder.handle(shadow_a)).answer
    assert refused is not None and refused.kind == "model-rejected"
    assert refused.reasons == (f"shadow: {a} is the active model",) and holder.shadow is None
    promote = request("promote")
    nothing = (await holder.handle(promote)).answer
    assert nothing is not None and nothing.reasons == ("promote: no shadow model",)
    assert holder.status()["active"] == a and holder.status()["previous"] is None  # before: a and a
    restarted = await holder_with(bundles)  # a restart folds the same history to the same slots
    await restarted.restore([(0, shadow_a), (1, promote)])
    assert restarted.status()["active"] == a and restarted.status()["previous"] is None


async def test_a_copy_of_the_active_bundle_in_another_directory_is_the_active_model(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Activating the active bundle copied elsewhere (a registry moved or mirrored) swapped it in as new: active and
    previous became one version and the model to roll back to was forgotten. Live and after a restart's fold."""
    copy = shutil.copytree(bundles["b"], tmp_path / "mirror" / bundles["b"].name)
    history = [request("activate", bundles["b"]), request("activate", copy), request("rollback")]
    live = await holder_with(bundles)
    outcomes = [await live.handle(event) for event in history[:2]]
    assert outcomes[1].answer is not None and outcomes[1].answer.kind == "model-activated"
    assert outcomes[1].answer.bundle_uri == str(bundles["b"])  # the bundle it scores with, not the copy
    assert outcomes[1].swapped_to is None  # answered, not swapped in again
    a, b = bundles["a"].name, bundles["b"].name
    assert _models(live) == (b, a, None)
    await live.handle(history[2])
    assert _models(live) == (a, b, None)  # the rollback still goes back to a
    folded = await holder_with(bundles)
    await folded.restore(list(enumerate(history)))
    assert _models(folded) == (a, b, None)
    # a copy whose files no longer match its manifest is validated first: refused with why, not taken as the active one
    broken = shutil.copytree(bundles["a"], tmp_path / "broken" / bundles["a"].name)
    labels = broken / "labels.json"
    labels.chmod(0o644)
    labels.write_bytes(labels.read_bytes() + b" ")
    refused = (await live.handle(request("activate", broken))).answer
    assert refused is not None and refused.kind == "model-rejected" and "labels.json" in " ".join(refused.reasons)
    assert _models(live) == (a, b, None)


async def test_a_worker_that_takes_over_products_partitions_after_a_swap_re_tags_them(
    monkeypatch: pytest.MonkeyPatch, bundles: dict[str, Path]
) -> None:
    """A re-tag covers the partitions owned when it starts: a worker that stopped before re-tagging its partitions
    (or before applying the model) left their products on the replaced model for good, since the one taking them over
    never looked at them. Now a rebalance that gives a worker partitions its re-tag did not cover re-tags those; a
    worker left with none re-tags nothing; a run that failed no longer counts as covering its partitions."""
    import streams.models_agent as models_agent
    import streams.retag

    runs: list[tuple[str, int, frozenset[int] | None]] = []
    failing: set[int] = set()

    class RecordingRetagger:
        def __init__(self, store: Any, *, partitions: set[int] | None, **kwargs: Any) -> None:
            self.partitions = partitions
            self.stats = SimpleNamespace(to_json=dict, error=None)

        async def run(self, model: BundleModel, run_offset: int) -> Any:
            runs.append((model.version, run_offset, None if self.partitions is None else frozenset(self.partitions)))
            if self.partitions and self.partitions & failing:
                raise ConnectionError("Redis went away")
            return self.stats

    monkeypatch.setattr(streams.retag, "Retagger", RecordingRetagger)
    settings = WorkerSettings(worker_id="w-1", model_path=bundles["a"], retag_on_swap=True, partitions=4)
    worker = FakeWorker(settings)
    owned: set[int] = {0, 1}
    topic = settings.topic("products")

    async def processor() -> Any:
        return SimpleNamespace(store=None, cache=None)

    worker.processor = processor  # type: ignore[attr-defined]
    worker.locks = None  # type: ignore[attr-defined]
    assignment = SimpleNamespace(assignment=lambda: {TopicPartition(topic, p) for p in owned})
    worker.app = SimpleNamespace(consumer=assignment)  # type: ignore[attr-defined]
    holder = await holder_with(bundles)
    agent = models_agent.ModelUpdatesAgent(worker, holder)  # type: ignore[arg-type]

    async def settled() -> None:
        while agent._retag_tasks:
            await asyncio.gather(*agent._retag_tasks, return_exceptions=True)
            await asyncio.sleep(0)

    async def rebalance(to: set[int]) -> None:
        owned.clear()
        owned.update(to)
        agent.on_partitions_assigned()
        await settled()

    await rebalance({0, 1})  # no re-tag yet: nothing to run again
    assert runs == []
    agent._start_retag(7)  # the swap at model-updates offset 7
    await settled()
    a = bundles["a"].name
    assert runs == [(a, 7, frozenset({0, 1}))]
    await rebalance({0, 1})
    await rebalance({1})  # only lost one: the rest was covered
    assert len(runs) == 1
    failing.add(2)
    await rebalance({1, 2, 3})  # took over 2 and 3 (their worker stopped): the same re-tag, for those; it fails
    assert runs[1:] == [(a, 7, frozenset({2, 3}))]
    failing.clear()
    await rebalance({1, 2, 3})  # nothing gained, but 2 and 3 were never re-tagged: they are now
    assert runs[2:] == [(a, 7, frozenset({2, 3}))]
    await rebalance({1, 2, 3})
    await rebalance(set())  # more workers than partitions: none left, nothing re-tagged
    assert len(runs) == 3
    holder.active = await holder.validate(request("activate", bundles["b"]), None)  # another model, not re-tagged
    await rebalance({0, 1, 2, 3})
    assert len(runs) == 3


def test_model_status_says_whether_a_re_tag_finished_and_which_partitions_it_covers() -> None:
    from streams.model_cli import _retag_line

    running = {"model_version": "v2", "scored": 3, "skipped_current": 2, "updates": 1, "partitions": [1, 2]}
    assert _retag_line(running) == "running, products partitions 1, 2: 3 scored, 2 already at it, 1 updates"
    done = {**running, "partitions": None, "finished_at": 1_764_316_800_000}
    assert _retag_line(done) == "finished, every products partition: 3 scored, 2 already at it, 1 updates"
    quiet = {**done, "updates": 3, "version_only": 2}  # updates sent only to name the new model
    assert _retag_line(quiet).endswith("3 updates (2 naming the new model only)")


async def test_a_restart_validates_only_the_last_two_of_many_different_bundles(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Every `train --every` cycle publishes a new bundle: a restart after N of them validates the two it ends with,
    not N (each a 100 MB model loaded at once)."""
    published = [real_bundle(tmp_path / str(i), seed=10 + i) for i in range(24)]
    history = list(enumerate(request("activate", path) for path in published))
    holder = await holder_with(bundles)
    validated = _count_validations(holder)
    await holder.restore(history)
    assert _models(holder) == (published[-1].name, published[-2].name, None)
    assert sorted(validated) == sorted([published[-1].name, published[-2].name])
