"""The Kafka side of model hot swap: every worker reads ALL of `model-updates` and answers on it.

`install(worker, holder)` (called by `ModelHolder.attach`) registers one Faust app task that runs, per worker:

- a consumer of `model-updates` with **no consumer group** (aiokafka, its one partition assigned, read from the
  beginning; a topic with more partitions stops the worker, since Kafka orders records only within one): the
  backlog's requests emitted before this worker started are folded into the (active, previous, shadow) they lead to
  and applied at once, without answering (`ModelHolder.restore`: only the bundles that state needs are validated),
  so a (re)started worker converges to the last activated model; requests emitted after it
  started are answered even from the backlog. Then `holder.caught_up` is set and the worker announces its active
  model; live requests are validated off the event loop and answered with `model-activated` / `model-rejected`
  (worker_id, reasons); a malformed event goes to `dead-letter` (history written before this worker started is only
  logged: the workers running then dead-lettered it);
- a publisher of the shadow diffs buffered by `ShadowScoring` to `tag-shadow-diffs`;
- a status writer: Redis hash `<prefix>:workers`, field worker_id → JSON of `ModelHolder.status()`, written on
  every change and every `STATUS_EVERY_S`, deleted at a clean shutdown; after a write (at most every
  `STATUS_EVERY_S`) it removes the other workers' statuses not reported for `worker_status_retention_s` (a killed
  worker's), each checked and deleted atomically (`PRUNE_STATUS_LUA`);
- after a swap, when `retag_on_swap` is set, a rate-limited re-tag of the stored catalog (`streams.retag`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from schemas import ModelUpdate
from streams.model import BundleModel, ModelHolder
from streams.model_cli import ANSWER_KINDS, PRUNE_STATUS_LUA, STATUS_EVERY_S, stale_statuses, workers_key
from streams.processor import BatchOutput, InMessage, dead_letter
from streams.topics import MODEL_UPDATES, PRODUCTS, TAG_SHADOW_DIFFS, model_updates_partitions_error
from tagstream.errors import EventDecodeError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from streams.app import Worker
    from streams.retag import Retagger

__all__ = ["STATUS_EVERY_S", "ModelUpdatesAgent", "install", "workers_key"]

log = logging.getLogger(__name__)


def install(worker: Worker, holder: ModelHolder) -> ModelUpdatesAgent | None:
    """Register the model-updates task on the worker's app (not for the in-memory harness or when disabled)."""
    if not worker.settings.model_updates_enabled or worker.capture_output:
        return None
    agent = ModelUpdatesAgent(worker, holder)
    holder.consuming = True

    async def tagstream_models() -> None:
        await agent.run()

    worker.app.task(tagstream_models)

    @worker.app.on_partitions_assigned.connect
    async def retag_gained_partitions(app: Any, assigned: Any, **kwargs: Any) -> None:
        # products partitions taken over after a swap may never have been re-tagged with the active model
        agent.on_partitions_assigned()

    return agent


class ModelUpdatesAgent:
    """Consumes model-updates for one worker, applies requests through its ModelHolder and publishes the answers."""

    def __init__(self, worker: Worker, holder: ModelHolder) -> None:
        self.worker = worker
        self.holder = holder
        self.settings = worker.settings
        self.topic = self.settings.topic(MODEL_UPDATES.name)
        self.redis: aioredis.Redis | None = None
        self._prune_script: AsyncScript | None = None
        self.retag_task: asyncio.Task[Any] | None = None  # the newest re-tag run
        self._retag_tasks: set[asyncio.Task[Any]] = set()  # every re-tag run not ended (one per partitions gained)
        self.retagger: Retagger | None = None
        # the active model's re-tag: its version, the request offset fencing its writes, the products partitions it
        # covers (None: all); a rebalance that gives this worker others runs it again (`on_partitions_assigned`)
        self._retag: tuple[str, int, frozenset[int] | None] | None = None
        self.handled = 0
        self.started_ms = time.time_ns() // 1_000_000
        self._replayed_swap: int | None = None  # offset of the backlog's last request that swapped the model
        # the backlog's requests emitted before this worker started, applied at once (`ModelHolder.restore`)
        self._history: list[tuple[int, ModelUpdate]] | None = []
        self._status_dirty = True
        self._status_at = 0.0  # when the status was last written, or a write last failed
        self._status_failed = False  # the last write failed: the next waits for the interval, changed or not
        self._pruned_at = float("-inf")

    # ------------------------------------------------------------------------------------------ main

    async def run(self) -> None:
        """Load the configured model, then consume model-updates and publish diffs/status until cancelled."""
        self.redis = self._connect()
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self.holder.load_initial()
            self.holder.warm_up()
            tasks = [
                asyncio.create_task(self._consume(), name="tagstream-model-updates"),
                asyncio.create_task(self._publish_loop(), name="tagstream-shadow-diffs"),
            ]
            await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, *self._retag_tasks]:
                if task is not None:
                    task.cancel()
            for task in [*tasks, *self._retag_tasks]:
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await self._remove_status()
            with contextlib.suppress(Exception):
                await self.redis.aclose()
            self.holder.close()

    def _connect(self) -> aioredis.Redis:
        """The status writer's Redis client (replies not decoded: a field is pruned by its stored name, whatever its
        bytes) with the prune script registered."""
        client = aioredis.from_url(self.settings.redis_url.get_secret_value())
        self._prune_script = client.register_script(PRUNE_STATUS_LUA)
        return client

    async def _remove_status(self) -> None:
        """Delete this worker's field of `<prefix>:workers` at a clean shutdown (`--wait` stops expecting it)."""
        if self.redis is None:
            return
        try:
            await asyncio.wait_for(
                self.redis.hdel(workers_key(self.settings.redis_prefix), self.holder.worker_id), STATUS_EVERY_S
            )
        except Exception as exc:  # Redis down: `--wait` skips a status that is not reported any more
            log.warning("could not remove the worker status from Redis: %s", exc)

    async def _consume(self) -> None:
        # Subscribed with no group: aiokafka assigns every partition (and new ones) to this consumer alone, and with
        # no committed offsets it starts at the beginning.
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"tagstream-models-{self.holder.worker_id}",
        )
        await consumer.start()
        try:
            tps = await self._assignment(consumer)
            if len(tps) != 1:  # `tagstream topics` and `worker` refuse it too: it would misorder the history
                error = model_updates_partitions_error(self.topic, len(tps))
                log.error("%s", error)
                raise error
            begin = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            # Only partitions that still hold records are replayed: retention may have deleted every record of one
            # (log start == end > 0), and then no record at end - 1 will ever come.
            pending = {tp for tp in tps if end[tp] > begin[tp]}
            log.info("model-updates: replaying %d events of %s", sum(end[tp] - begin[tp] for tp in pending), self.topic)
            if not pending:
                await self._caught_up()
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=50)
                for tp, records in batches.items():
                    for record in records:
                        replay = tp in pending
                        await self._on_record(record, replay=replay)
                        if replay and record.offset >= end[tp] - 1:
                            pending.discard(tp)
                            if not pending:
                                await self._caught_up()
                if pending and await self._reached(consumer, pending, end):
                    await self._caught_up()
        finally:
            await consumer.stop()

    @staticmethod
    async def _reached(
        consumer: AIOKafkaConsumer, pending: set[TopicPartition], end: dict[TopicPartition, int]
    ) -> bool:
        """Drop from `pending` the partitions the consumer's position has reached the backlog's end of (records
        deleted by retention after the offsets were read, or no record at end - 1); True when none is left."""
        for tp in list(pending):
            if await consumer.position(tp) >= end[tp]:
                pending.discard(tp)
        return not pending

    async def _assignment(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        """The partitions of model-updates, once aiokafka has assigned them."""
        waited = 0.0
        while not consumer.assignment():
            await asyncio.sleep(0.1)
            waited += 0.1
            if waited > 30 and waited % 30 < 0.1:
                log.error("no partition of %s assigned after %.0fs; model updates are not received", self.topic, waited)
        return sorted(consumer.assignment())

    async def _end_history(self) -> None:
        """Apply the requests collected from the backlog (emitted before this worker started) as one change."""
        if self._history is None:
            return
        history, self._history = self._history, None
        swapped = await self.holder.restore(history)
        self.handled += len(history)
        self._status_dirty = True
        if swapped is not None:
            self._replayed_swap = swapped  # its re-tag may have been cut short: run again once caught up

    async def _caught_up(self) -> None:
        await self._end_history()
        if self.holder.caught_up.is_set():
            return
        self.holder.caught_up.set()
        active = self.holder.active
        log.info("model-updates backlog applied: active model %s", active.version if active else None)
        if active is not None:
            await self._send_answer(
                ModelUpdate(
                    kind="model-activated",
                    model_version=active.version,
                    emitted_at=time.time_ns() // 1_000_000,
                    bundle_uri=str(active.bundle.path),  # absolute: `tagstream worker` resolves --model at start
                    sha256=active.bundle.sha256,
                    worker_id=self.holder.worker_id,
                ),
                key=active.bundle.model_name.encode(),
            )
        await self._write_status(force=True)
        # A re-tag cut short by a restart is run again: it re-scores only products not at the active model yet,
        # and its writes are fenced by the same request offset, so what the earlier run wrote is not written twice;
        # their kept updates, which may not have been delivered, are sent again where still current.
        if self._replayed_swap is not None and self.settings.retag_on_swap and self.retag_task is None:
            self._start_retag(self._replayed_swap)

    async def _on_record(self, record: ConsumerRecord[bytes, bytes], *, replay: bool) -> None:
        key, offset = record.key, record.offset
        try:
            event = ModelUpdate.decode(record.value)
        except EventDecodeError as exc:
            await self._dead_letter(record, exc, replay=replay)
            return
        if event.kind in ANSWER_KINDS:
            return
        log.info(
            "model-updates offset %d: %s %s%s", offset, event.kind, event.model_version, " (replay)" if replay else ""
        )
        if replay and event.emitted_at < self.started_ms and self._history is not None:
            # answered before, by this worker's earlier run or by nobody it concerns: folded with the rest
            self._history.append((offset, event))
            return
        await self._end_history()  # the history is applied before any later request
        outcome = await self.holder.handle(event)
        self.handled += 1
        if outcome.changed or outcome.answer is not None:
            self._status_dirty = True
        if replay and event.emitted_at < self.started_ms:
            if outcome.swapped_to is not None:
                self._replayed_swap = offset  # its re-tag may have been cut short: run again once caught up
            return  # answered before, by this worker's earlier run or by nobody it concerns
        if outcome.answer is not None:
            await self._send_answer(outcome.answer, key=key)
        await self._write_status()
        if outcome.swapped_to is not None and self.settings.retag_on_swap:
            self._start_retag(offset)

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], exc: EventDecodeError, *, replay: bool) -> None:
        """Send a malformed model-update event to the dead-letter topic (like the other agents' bad events), unless
        it is history written before this worker started (dead-lettered then, by the workers running)."""
        if replay and record.timestamp < self.started_ms:
            log.warning("model-updates offset %d ignored: %s", record.offset, exc)
            return
        log.warning("model-updates offset %d dead-lettered: %s", record.offset, exc)
        msg = InMessage(
            record.topic, record.partition, record.offset, record.key, record.value, record.timestamp, record.headers
        )
        try:
            await self.worker.publish(BatchOutput(dead_letters=[dead_letter(msg, exc)]))
        except Exception:
            log.exception("could not dead-letter model-updates offset %d", record.offset)

    async def _send_answer(self, answer: ModelUpdate, *, key: bytes | None) -> None:
        value = orjson.dumps(answer.to_dict())
        try:
            fut = await self.worker.topics[MODEL_UPDATES.name].send(key=key, value=value)
            await fut
        except Exception:
            log.exception("could not publish the %s answer for %s", answer.kind, answer.model_version)

    # ------------------------------------------------------------------------------------------ diffs and status

    async def _publish_loop(self) -> None:
        # the status is written at least every STATUS_EVERY_S (the other workers' retention check and `--wait`
        # count on it), however long the shadow flush interval is
        flushed = time.monotonic()
        while True:
            await asyncio.sleep(min(self.settings.shadow_flush_interval, STATUS_EVERY_S / 2))
            try:
                if time.monotonic() - flushed >= self.settings.shadow_flush_interval:
                    flushed = time.monotonic()
                    await self.flush_diffs()
                await self._write_status()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("publishing shadow diffs / status failed; retrying")

    async def flush_diffs(self, limit: int = 5000) -> int:
        """Publish up to `limit` buffered shadow diffs to tag-shadow-diffs; returns how many."""
        buffer = self.holder.shadow_buffer
        topic = self.worker.topics[TAG_SHADOW_DIFFS.name]
        pending = []
        while buffer and len(pending) < limit:
            diff = buffer.popleft()
            pending.append(await topic.send(key=diff.product_id.encode(), value=orjson.dumps(diff.to_dict())))
            if len(pending) % 256 == 0:
                await asyncio.sleep(0)
        if pending:
            await asyncio.gather(*pending)
            self._status_dirty = True
        return len(pending)

    async def _write_status(self, *, force: bool = False) -> None:
        """Write this worker's status when `force`d, changed or due (every STATUS_EVERY_S). After a failed write
        (Redis down) a change waits for the next interval too: one retry, and one warning, per STATUS_EVERY_S."""
        now = time.monotonic()
        due = now - self._status_at >= STATUS_EVERY_S
        if not (force or due or (self._status_dirty and not self._status_failed)) or self.redis is None:
            return
        status = self.holder.status()
        if self.retagger is not None:
            status["retag"] = self.retagger.stats.to_json()
        try:
            await self.redis.hset(workers_key(self.settings.redis_prefix), self.holder.worker_id, orjson.dumps(status))
        except Exception as exc:  # Redis down: the answers on the topic still tell the story
            log.warning("could not write the worker status to Redis (tried again in %g s): %s", STATUS_EVERY_S, exc)
            self._status_at, self._status_failed = now, True
            return
        self._status_dirty = self._status_failed = False
        self._status_at = now
        if now - self._pruned_at >= STATUS_EVERY_S:
            self._pruned_at = now
            await self.prune_statuses()

    async def prune_statuses(self) -> list[str]:
        """Remove the other workers' statuses last reported more than `worker_status_retention_s` ago (a killed
        worker cannot remove its own), each only if still that old when deleted; returns the workers removed."""
        if self.redis is None or self._prune_script is None:
            return []
        key = workers_key(self.settings.redis_prefix)
        now_ms = time.time_ns() // 1_000_000
        cutoff = now_ms - int(self.settings.worker_status_retention_s * 1000)
        try:
            stale = stale_statuses(await self.redis.hgetall(key), cutoff, keep=self.holder.worker_id.encode())
            removed = await self._prune_script(keys=[key], args=[cutoff, *stale]) if stale else []
        except Exception as exc:  # Redis down: the next write tries again
            log.warning("could not remove stale worker statuses from Redis: %s", exc)
            return []
        names = [w.decode(errors="replace") for w in removed]
        for worker, name in zip(removed, names, strict=True):
            log.info("removed the status of worker %s: not reported for %.0f s", name, (now_ms - stale[worker]) / 1000)
        return names

    # ------------------------------------------------------------------------------------------ re-tag

    def on_partitions_assigned(self) -> None:
        """After a rebalance: re-tag, with the active model, the products partitions this worker now owns that its
        re-tag of that model did not cover. The worker that had them may have stopped before re-tagging them, or
        before it even applied the model (a restart re-tags only the partitions owned then), and nothing else would
        ever re-tag them: their products kept the replaced model's tags until their next upsert. The gained
        partitions get a run of their own beside any still going; products already at the active model are skipped
        (one read each), and writes are fenced by the same request offset, so none is written twice."""
        if self._retag is None or not self.settings.retag_on_swap or self.holder.active is None:
            return
        version, run_offset, covered = self._retag
        if version != self.holder.active.version or covered is None:
            return
        owned = self._assigned_partitions()
        gained = None if owned is None else owned - covered  # None: the assignment cannot be read, so every one
        if gained is None or gained:
            log.info(
                "re-tag with %s: products partitions %s gained since it started",
                version,
                "(unknown: every one)" if gained is None else sorted(gained),
            )
            self._start_retag(run_offset, gained=gained, extend=True)

    def _start_retag(self, run_offset: int, *, gained: set[int] | None = None, extend: bool = False) -> None:
        """Re-tag the stored products of the partitions this worker owns with the active model, fenced by the
        request at `run_offset` (a new activation: the runs of the one before are cancelled); with `extend`, only
        the `gained` partitions (None: every one), as one more run of the same activation."""
        model = self.holder.active
        if model is None:
            return
        if extend:
            partitions = gained
            before = self._retag[2] if self._retag is not None else frozenset()
            covered = None if partitions is None or before is None else set(before) | partitions
        else:
            for task in self._retag_tasks:
                task.cancel()
            partitions = covered = self._assigned_partitions()
        self._retag = (model.version, run_offset, None if covered is None else frozenset(covered))
        if partitions is not None and not partitions:
            return  # owns no products partition now: a rebalance that gives it some re-tags them
        task = asyncio.create_task(self._retag_run(model, run_offset, partitions), name="tagstream-retag")
        self.retag_task = task
        self._retag_tasks.add(task)
        task.add_done_callback(lambda done: self._retag_ended(done, model.version, run_offset, partitions))

    async def _retag_run(self, model: BundleModel, run_offset: int, partitions: set[int] | None) -> None:
        from streams.retag import Retagger

        processor = await self.worker.processor()
        self.retagger = retagger = Retagger(
            processor.store,
            rate=self.settings.retag_rate,
            batch=self.settings.retag_batch,
            score_delta=self.settings.score_delta,
            publish=self.worker.publish,
            topic=self.settings.topic(MODEL_UPDATES.name),
            partitions=partitions,
            partition_count=self.settings.partitions,
            on_written=processor.cache.discard if processor.cache is not None else None,
            locks=self.worker.locks,
        )
        try:
            stats = await retagger.run(model, run_offset)
        except Exception as exc:
            retagger.stats.error = repr(exc)
            raise
        finally:
            self._status_dirty = True
        log.info("re-tag with %s done: %s", model.version, stats.to_json())

    def _retag_ended(self, task: asyncio.Task[Any], version: str, run_offset: int, partitions: set[int] | None) -> None:
        """A re-tag run ended: one that failed no longer counts as covering its partitions (the next rebalance or
        restart re-tags them)."""
        self._retag_tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error(
            "re-tag with %s failed: %r; its partitions are re-tagged at the next rebalance or restart", version, exc
        )
        if self._retag is not None and self._retag[:2] == (version, run_offset):
            covered = self._retag[2]
            left = frozenset() if partitions is None or covered is None else covered - frozenset(partitions)
            self._retag = (version, run_offset, left)

    def _assigned_partitions(self) -> set[int] | None:
        """Partitions of `products` this worker owns, maybe none (None when the assignment cannot be read: then
        every product is re-tagged)."""
        products = self.settings.topic(PRODUCTS.name)
        try:
            assignment = self.worker.app.consumer.assignment()
        except Exception:
            return None
        return {tp.partition for tp in assignment if tp.topic == products}
