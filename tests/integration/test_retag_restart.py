"""A re-tag run stopped between writing products' new tags and delivering their updates, then resumed by a restarted
worker: every product's last tag update on the topic carries the tags Redis holds (SPEC.md §1)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from serving.validate import validate_bundle
from streams.model import BundleModel
from streams.model_cli import build_request, send_request, workers_key
from streams.processor import BatchOutput
from streams.retag import Retagger
from streams.settings import WorkerSettings
from streams.state import RedisStateStore, StateStore
from tagstream.stack import StackSettings
from tests.events import upsert
from tests.unit.test_retag_fields import (
    a_version_that_moves_no_score_beyond_the_delta,
    later_clock,
    three_versions_in_turn,
)
from tests.unit.test_validate import TITLES, real_bundle

pytestmark = pytest.mark.integration


class Stopped(Exception):
    """The worker stopping after a re-tag step's writes, before its updates were delivered."""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry")
    return {name: real_bundle(root / name, seed=seed) for seed, name in enumerate("ab")}


def _last_updates(messages: list[dict[str, Any]], pids: set[str]) -> dict[str, dict[str, Any]]:
    """Each product's last tag update (a product's updates are on one partition, in order)."""
    last: dict[str, dict[str, Any]] = {}
    for m in messages:
        if m["product_id"] in pids:
            last[m["product_id"]] = m
    return last


def test_a_resumed_retag_sends_the_updates_a_stopped_run_wrote_but_never_delivered(
    make_stream_env: Any, bundles: dict[str, Path]
) -> None:
    se = make_stream_env()
    a, b = bundles["a"].name, bundles["b"].name
    first = se.start_worker(TAGSTREAM_WORKER_ID="w-1", TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    events = [upsert(f"RR-{i}", TITLES[i % len(TITLES)]) for i in range(24)]
    pids = {e["product_id"] for e in events}
    se.produce("products", events)
    se.consume("tag-updates", lambda m: pids <= {u["product_id"] for u in m})
    first.stop()

    # b is activated while no worker runs; the re-tag run of the worker that applied it wrote every product's new
    # tags and stopped before a single update was delivered.
    event, key = build_request("activate", WorkerSettings(), model=bundles["b"])
    offset = asyncio.run(send_request(se.settings, event, key))
    model_b = BundleModel.from_validated(validate_bundle(bundles["b"]))

    async def stopped_run() -> dict[str, bytes | None]:
        store = RedisStateStore.from_url(se.settings.redis_url.get_secret_value(), se.settings.redis_prefix)
        try:

            async def stop(out: BatchOutput) -> None:
                raise Stopped

            retagger = Retagger(
                store, rate=10_000, batch=64, score_delta=se.settings.score_delta, publish=stop,
                topic=se.settings.topic("model-updates"),
            )  # fmt: skip
            with pytest.raises(Stopped):
                await retagger.run(model_b, offset)
            return await store.stored_emits([(pid, f"retag:{b}") for pid in sorted(pids)])
        finally:
            await store.close()

    kept = asyncio.run(stopped_run())
    changed = {pid for (pid, _), raw in kept.items() if raw is not None}
    assert changed == pids  # every product written keeps an update naming b: Redis has b's tags, the topic a's
    r = se.redis()

    def redis_tags(pid: str) -> dict[str, Any]:
        return orjson.loads(r.get(f"{se.settings.redis_prefix}:{{{pid}}}:tags"))

    assert all(redis_tags(pid)["model_version"] == b for pid in pids)
    before = _last_updates(se.consume("tag-updates", lambda m: len(m) >= len(events)), pids)
    assert {before[pid]["model_version"] for pid in changed} == {a}

    # A restarted worker resumes the re-tag of the activation it finds in the history.
    se.start_worker(TAGSTREAM_WORKER_ID="w-2", TAGSTREAM_MODEL_PATH=str(bundles["a"]), TAGSTREAM_RETAG_ON_SWAP="true")
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while not (status.get("retag") or {}).get("finished_at"):
        assert time.monotonic() < deadline, f"the resumed re-tag did not finish: {status}"
        raw = r.hget(workers_key(se.settings.redis_prefix), "w-2")
        status = orjson.loads(raw) if raw else {}
        time.sleep(0.2)
    seen = se.consume("tag-updates", lambda m: len(m) >= len(events) + len(changed))
    last = _last_updates(seen, pids)
    for pid in pids:
        current = redis_tags(pid)
        assert last[pid]["tags"] == current["tags"] and last[pid]["model_version"] == b, pid
    assert status["active"] == b and status["retag"]["resent"] == len(changed) and status["retag"]["written"] == 0
    resent = [m for m in seen if m["reason"] == "retag"]
    assert len(resent) == len(changed)  # each once
    for m in resent:
        assert m["model_version"] == b and m["source"]["offset"] == offset
        wire = {k: v for k, v in m.items() if not k.startswith("_")}
        assert wire == orjson.loads(kept[(m["product_id"], f"retag:{b}")] or b"{}")  # the kept update itself


@pytest.mark.parametrize("scenario", [three_versions_in_turn, a_version_that_moves_no_score_beyond_the_delta])
def test_a_redis_fence_keeps_the_retag_fields_of_the_last_versions_only(
    stack: StackSettings, monkeypatch: pytest.MonkeyPatch, scenario: Callable[[StateStore], Awaitable[None]]
) -> None:
    """The re-tag field scenarios of tests/unit/test_retag_fields.py through state.lua on the real Redis."""
    later_clock(monkeypatch)

    async def main() -> None:
        prefix = f"rf{uuid.uuid4().hex[:8]}"
        store = RedisStateStore.from_url(stack.redis_url, prefix)
        try:
            await scenario(store)
        finally:
            keys = [key async for key in store.client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await store.client.delete(*keys)
            await store.close()

    asyncio.run(main())


def test_the_partitions_of_a_worker_killed_mid_retag_are_re_tagged_by_the_one_taking_them_over(
    make_stream_env: Any, bundles: dict[str, Path]
) -> None:
    """Two workers re-tag their halves of the catalog after a swap; one is killed part way. The survivor takes its
    partitions over, and before, nothing re-tagged them: half the catalog kept the replaced model's tags (a review by
    use found 1,268 of 2,500 products so). Every product must end at the active model."""
    se = make_stream_env(partitions=4, TAGSTREAM_SESSION_TIMEOUT="6", TAGSTREAM_RETAG_ON_SWAP="true")
    a, b = bundles["a"].name, bundles["b"].name
    slow = {"TAGSTREAM_MODEL_PATH": str(bundles["a"]), "TAGSTREAM_RETAG_RATE": "8", "TAGSTREAM_RETAG_BATCH": "2"}
    first = se.start_worker(TAGSTREAM_WORKER_ID="w-1", **slow)
    events = [upsert(f"KR-{i}", TITLES[i % len(TITLES)]) for i in range(240)]
    pids = {e["product_id"] for e in events}
    se.produce("products", events)
    se.consume("tag-updates", lambda m: pids <= {u["product_id"] for u in m})
    second = se.start_worker(TAGSTREAM_WORKER_ID="w-2", **slow)
    r = se.redis()
    key = workers_key(se.settings.redis_prefix)

    def status(worker: str) -> dict[str, Any]:
        raw = r.hget(key, worker)
        return orjson.loads(raw) if raw else {}

    def at(version: str) -> int:
        raws = r.mget([f"{se.settings.redis_prefix}:{{{pid}}}:tags" for pid in sorted(pids)])
        return sum(orjson.loads(raw)["model_version"] == version for raw in raws if raw)

    deadline = time.monotonic() + 90
    while not all(status(w).get("active") == a for w in ("w-1", "w-2")) or "Resuming flow" not in second.log():
        assert time.monotonic() < deadline, "the second worker did not join"
        time.sleep(0.2)
    event, request_key = build_request("activate", WorkerSettings(), model=bundles["b"])
    asyncio.run(send_request(se.settings, event, request_key))

    def halves() -> list[set[int]]:
        return [set((status(w).get("retag") or {}).get("partitions") or ()) for w in ("w-1", "w-2")]

    while not (all(halves()) and not set.intersection(*halves()) and at(b) >= 20):  # both re-tags under way
        assert time.monotonic() < deadline, f"the two workers did not re-tag halves: {halves()}"
        time.sleep(0.05)
    assert at(b) < len(pids) * 3 // 4  # 8 products/s each: far from done
    second.kill9()  # mid-re-tag: its partitions move to the first worker once its session times out
    deadline = time.monotonic() + 90
    while (done := at(b)) < len(pids):
        assert time.monotonic() < deadline, f"{len(pids) - done} of {len(pids)} products kept {a}'s tags"
        time.sleep(0.5)
    assert first.proc.poll() is None
