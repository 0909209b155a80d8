"""Re-tag the stored catalog after a model swap, rate-limited, without starving live events.

SCAN `<prefix>:{*}:doc`, take small batches, re-score the products whose stored tags come from another model
version, and write the new model tags through the same offset-fenced Lua path as live events: fence field
`retag:<model_version>`, offset = the model-updates offset of the request that made the model active (monotonic;
a second run for the same activation — another worker, a restart — writes nothing a run before it wrote). Every
re-tag write changes the product's stored `model_version`, so every one emits a tag-update with reason `retag` naming
the new version, also where the merged tag set is the same and no score moved more than `score_delta` (its `added`
and `removed` are then empty): else the topic's last update of such a product would keep naming the retired model,
and disagree with the stored tags. It is kept with the write (`emit:retag:<model_version>`); once delivered, the
product's fence field `sent:retag:<model_version>` is set to the same offset. A run stopped between a write and its
update's delivery (SIGTERM, a crash) would leave the product's new tags unpublished: so a run that finds a product
written for the same activation but not marked sent re-sends the kept update, if no later kept update superseded it
and it still carries the product's current tags (`streams.processor`'s rule for redeliveries); a consumer drops a
repeat.

A re-tag write also removes, in the same fenced write, the product's re-tag fields of every other model version its
fence holds (`retag:<w>`, `sent:retag:<w>`, `emit:retag:<w>`), so they do not pile up with every version: the update it
keeps is the product's newest. So after a re-tag write a fence holds the re-tag fields of its own version only.

A product changed by a live event while its batch was being scored is skipped (its state is read again just before
the write, and the write applies only while the product is still at the revision read); products of partitions
another worker owns are skipped when `partitions` is given. With the worker's `locks`, a step holds its products from
that read until its updates are delivered, so a live update of a product never lands before an older re-tag one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.partitioner import DefaultPartitioner

from schemas import ProductChange, SourceRef, Tag, TagUpdate
from serving.decoding import diff_tags, merge_tags
from streams.locks import ProductLocks
from streams.processor import BatchOutput, ScoringModel, _latest, _still_current, score_in_steps, stored_updates
from streams.state import Ops, ProductKeys, ProductState, StateStore, Write

__all__ = ["RetagStats", "Retagger", "product_from_doc"]

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _tag_dicts(tags: Sequence[Tag]) -> list[dict[str, Any]]:
    return [{"tag": t.tag, "group": t.group, "score": round(float(t.score), 6), "origin": t.origin} for t in tags]


def _tags(dicts: Sequence[dict[str, Any]] | None) -> list[Tag]:
    return [Tag(**d) for d in dicts or ()]


def _retag_versions(fence: dict[str, str]) -> set[str]:
    """The model versions whose re-tag fields (`retag:<v>`, `sent:retag:<v>`) a product's fence holds."""
    return {f.removeprefix("sent:").removeprefix("retag:") for f in fence if f.startswith(("retag:", "sent:retag:"))}


def _retag_fields(version: str) -> list[str]:
    """Every fence field a re-tag run for `version` writes."""
    return [f"retag:{version}", f"sent:retag:{version}", f"emit:retag:{version}"]


def product_from_doc(pid: str, doc: dict[str, str]) -> ProductChange | None:
    """The product upsert a stored `doc` hash describes (None for deleted or never upserted products)."""
    if doc.get("deleted") == "1" or "title" not in doc:
        return None
    price = doc.get("price") or ""
    try:
        price_value = float(price) if price != "" else None
    except ValueError:
        price_value = None
    return ProductChange(
        "upsert",
        pid,
        int(doc.get("updated_at") or 0),
        int(doc.get("version") or 0),
        title=doc.get("title") or "",
        description=doc.get("description") or None,
        brand=doc.get("brand") or None,
        price=price_value,
        currency=doc.get("currency") or None,
        category_hints=tuple(orjson.loads(doc.get("category_hints") or "[]")),
        attributes=dict(orjson.loads(doc.get("attributes") or "{}")),
    )


@dataclass
class RetagStats:
    """What a re-tag run did."""

    model_version: str
    scanned: int = 0
    scored: int = 0
    written: int = 0
    updates: int = 0  # one per product written (its stored model_version changed): `version_only` + tag changes
    version_only: int = 0  # of `updates`, those whose tags stayed within `score_delta`: sent to name the new version
    skipped_current: int = 0
    resent: int = 0  # kept updates of products an earlier run for the same activation wrote, sent again
    skipped_raced: int = 0
    skipped_other_partition: int = 0
    started_at: int = 0
    finished_at: int | None = None
    partitions: list[int] | None = None  # the products partitions it covers (None: every one)
    error: str | None = None  # why it stopped before finishing

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return dict(self.__dict__)


class Retagger:
    """Re-scores a store's products with one model at `rate` products/s in batches of `batch`."""

    def __init__(
        self,
        store: StateStore,
        *,
        rate: float,
        batch: int,
        score_delta: float,
        publish: Callable[[BatchOutput], Awaitable[None]],
        topic: str,
        partitions: set[int] | None = None,
        partition_count: int = 1,
        on_written: Callable[[list[str]], None] | None = None,
        locks: ProductLocks | None = None,
    ) -> None:
        """`on_written(product_ids)` is told which products a step wrote (the worker forgets its kept states);
        `locks`: the worker's product holds, taken by each step's writes and updates."""
        self.store = store
        self.on_written = on_written
        self.locks = locks
        self.rate = rate
        self.batch = batch
        self.score_delta = score_delta
        self.publish = publish
        self.topic = topic
        self.partitions = partitions
        self.partition_count = partition_count
        self._partitioner = DefaultPartitioner()
        self.stats = RetagStats("-")

    def _owned(self, pid: str) -> bool:
        if self.partitions is None:
            return True
        all_parts = list(range(self.partition_count))
        return self._partitioner(pid.encode(), all_parts, all_parts) in self.partitions

    async def _product_ids(self) -> Any:
        """Every product id with a doc, in SCAN order (MemoryStateStore: its hash keys)."""
        prefix = self.store.prefix
        head, tail = f"{prefix}:{{", "}:doc"
        client = getattr(self.store, "client", None)
        if client is not None:
            async for key in client.scan_iter(match=f"{prefix}:{{*}}:doc", count=500):
                key = key.decode() if isinstance(key, bytes) else key
                yield key[len(head) : -len(tail)]
        else:
            for key in list(getattr(self.store, "hashes", {})):
                if key.startswith(head) and key.endswith(tail):
                    yield key[len(head) : -len(tail)]

    async def run(self, model: ScoringModel, run_offset: int) -> RetagStats:
        """Re-tag every stored product with `model`; `run_offset` fences the writes (see the module docstring)."""
        covered = None if self.partitions is None else sorted(self.partitions)
        self.stats = stats = RetagStats(model.version, started_at=_now_ms(), partitions=covered)
        started = time.monotonic()
        chunk: list[str] = []
        async for pid in self._product_ids():
            stats.scanned += 1
            if not self._owned(pid):
                stats.skipped_other_partition += 1
                continue
            chunk.append(pid)
            if len(chunk) >= self.batch:
                await self._step(model, chunk, run_offset)
                chunk = []
                await self._pace(started)
        if chunk:
            await self._step(model, chunk, run_offset)
        stats.finished_at = _now_ms()
        return stats

    async def _pace(self, started: float) -> None:
        """Sleep so that at most `rate` products/s are scored; always yield to the loop between batches."""
        due = started + self.stats.scored / self.rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def _step(self, model: ScoringModel, pids: list[str], run_offset: int) -> None:
        stats = self.stats
        fence = f"retag:{model.version}"
        states = await self.store.read(pids, counters=False)
        todo: list[tuple[ProductState, ProductChange]] = []
        written: list[str] = []
        for pid in pids:
            state = states[pid]
            tag_state = state.tags
            product = product_from_doc(pid, state.doc)
            if product is None or tag_state is None or tag_state.get("deleted"):
                continue
            if tag_state.get("model_version") == model.version:
                stats.skipped_current += 1
                if state.fence.get(fence) == str(run_offset) != state.fence.get(f"sent:{fence}"):
                    written.append(pid)  # written for this activation, its update maybe never delivered
                continue
            todo.append((state, product))
        if not todo and not written:
            return
        scored = await score_in_steps(model, [p for _, p in todo], self.batch) if todo else []
        stats.scored += len(todo)
        held = [s.product_id for s, _ in todo] + written
        async with self.locks.hold(held) if self.locks is not None else contextlib.nullcontext():
            fresh = await self.store.read(held, counters=False)
            out = BatchOutput()
            changed = await self._write(model, todo, scored, fresh, run_offset, out)
            await self._resend(written, fresh, fence, run_offset, out)
            if out.updates:
                await self.publish(out)
                changed += await self._mark_sent([pid.decode() for pid, _ in out.updates], fence, run_offset)
            if self.on_written is not None and changed:
                self.on_written(list(dict.fromkeys(changed)))

    async def _mark_sent(self, pids: list[str], fence: str, run_offset: int) -> list[str]:
        """Record that these products' updates from this run were delivered (fence field `sent:<fence>`, a fenced
        write of nothing else): a run resumed after a restart re-sends only the others. Returns those written."""
        writes = [Write(pid, f"sent:{fence}", run_offset, Ops(ProductKeys(self.store.prefix, pid))) for pid in pids]
        results = await self.store.apply(writes)
        return [w.product_id for w, r in zip(writes, results, strict=True) if r.applied]

    async def _write(
        self,
        model: ScoringModel,
        todo: list[tuple[ProductState, ProductChange]],
        scored: list[list[Tag]],
        fresh: dict[str, ProductState],
        run_offset: int,
        out: BatchOutput,
    ) -> list[str]:
        """Write the re-scored products' new tags (fenced, at the revision read), their updates into `out`; returns
        the products written."""
        stats = self.stats
        writes: list[Write] = []
        # per write: its update, and whether its tags stayed within `score_delta` (an update naming the version only)
        emitted: list[tuple[bytes, bool]] = []
        for (state, _product), model_tags in zip(todo, scored, strict=True):
            pid = state.product_id
            if fresh[pid].tags != state.tags or fresh[pid].doc != state.doc:
                stats.skipped_raced += 1  # a live event got there first, with the active model
                continue
            tag_state = dict(state.tags or {})
            old = _tags(tag_state.get("tags"))
            model_dicts = _tag_dicts(model_tags)
            catalog, behaviour = _tags(tag_state.get("catalog")), _tags(tag_state.get("behaviour_tags"))
            merged = merge_tags(_tags(model_dicts), catalog, behaviour, labels=model.labels)
            added, removed, changed = diff_tags(old, merged, self.score_delta)
            tag_state.update(model=model_dicts, model_version=model.version, tags=_tag_dicts(merged))
            # sent even when no tag changed beyond the delta: the stored model_version did (see the module docstring)
            now = _now_ms()
            update = TagUpdate(
                product_id=pid,
                tags=tuple(merged),
                added=tuple(added),
                removed=tuple(removed),
                model_version=model.version,
                reason="retag",
                source=SourceRef(self.topic, 0, run_offset),  # the request that made the model active
                event_time=now,
                emit_time=now,
                deleted=False,
            )
            payload = orjson.dumps(update.to_dict())
            keys = ProductKeys(self.store.prefix, pid)
            ops = Ops(keys)
            ops.set(keys.tags, orjson.dumps(tag_state))
            # applied only while the product is still at the revision just read: a live write in between wins
            writes.append(Write(pid, f"retag:{model.version}", run_offset, ops, payload, expect_rev=fresh[pid].rev))
            emitted.append((payload, not changed))
        if not writes:
            return []
        self._drop_other_versions(model.version, writes, fresh)
        results = await self.store.apply(writes)
        for write, (payload, version_only), result in zip(writes, emitted, results, strict=True):
            if result.conflict:
                stats.skipped_raced += 1
            elif result.applied:
                stats.written += 1
                out.updates.append((write.product_id.encode(), payload))
                stats.updates += 1
                stats.version_only += version_only
        return [w.product_id for w, r in zip(writes, results, strict=True) if r.applied]

    def _drop_other_versions(self, version: str, writes: list[Write], fresh: dict[str, ProductState]) -> None:
        """Add to each write the removal of its product's re-tag fields of other versions than `version` (the fence
        read at the revision the write expects, so exactly those it holds then). Every re-tag write keeps an update of
        its own, the product's newest, so no other version's kept update is needed to mark older ones superseded."""
        for w in writes:
            others = sorted(_retag_versions(fresh[w.product_id].fence) - {version})
            fields = [f for v in others for f in _retag_fields(v)]
            w.ops.hdel(ProductKeys(self.store.prefix, w.product_id).fence, fields)

    async def _resend(
        self, pids: list[str], fresh: dict[str, ProductState], fence: str, run_offset: int, out: BatchOutput
    ) -> None:
        """Into `out`: the update kept for these products by a run for this activation (`fence` at `run_offset`, not
        marked sent), where it is still the product's latest kept update and carries its current tags (else a later
        change superseded it, and re-sending it would leave stale tags last on the topic)."""
        pids = [
            pid
            for pid in pids
            if fresh[pid].tags is not None
            and fresh[pid].fence.get(fence) == str(run_offset) != fresh[pid].fence.get(f"sent:{fence}")
        ]
        if not pids:
            return
        stored = await stored_updates(self.store, pids, fresh)
        latest = _latest(stored)
        for pid in pids:
            raw = stored.get((pid, fence))
            if raw is None:
                continue  # written by a version of this module that kept no update where no tag changed
            update = orjson.loads(raw)
            if update["source"]["offset"] == run_offset and _still_current(update, fresh[pid].tags, latest[pid]):
                out.updates.append((pid.encode(), raw))
                self.stats.resent += 1
