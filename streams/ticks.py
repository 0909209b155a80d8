"""Window ticks: event time for behaviour partitions that get no events (SPEC.md §1, schemas/tick.v1.json).

A behaviour partition's clock is the newest event time it carried, so on a partition with no traffic the behaviour
tags would stay on until its next event. The worker that owns such a partition writes a tick into it: a record with
an event time that the behaviour agent reads like any other record of the partition. Its batch moves the
partition's clock and expires what is due with the usual offset-fenced writes, and a restart that gets the tick again
sends those updates again.

A partition gets a tick when this worker has had no record of it for `idle_ms`, it was live when its event time last
rose (the batch that raised it had a record produced, by its Kafka timestamp, at most `live_ms` after its event time;
kept beside the watermark in Redis: not a replay of older events) and a product there is due by the tick's time.
That time is the partition's event time plus the time since then: event time goes on at the wall clock's pace from
where the stream left it. Both are production times, so a quiet spell, a late read or an outage does not make a live
partition look like a replay (a tick read late carries its own production time); a batch of late-produced records
alone (an offline client's upload) does, until the next live one. The elapsed time compares this worker's clock with
the producers' (or the broker's, on a topic with LogAppendTime): clocks must agree.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import orjson

from schemas import TICK_KEY, WindowTick
from streams.state import StateStore

log = logging.getLogger(__name__)

__all__ = ["Ticker"]


class Ticker:
    """Decides which owned behaviour partitions get a tick, and sends it (`check`, called periodically)."""

    def __init__(
        self,
        topic: str,
        *,
        idle_ms: int,
        live_ms: int,
        worker_id: str,
        store: Callable[[], Awaitable[StateStore]],
        send: Callable[[str, int, bytes, bytes], Awaitable[None]],
    ) -> None:
        """`topic`: the behaviour topic's name; `store()`: the state store (awaited: the worker creates it on first
        use); `send(topic, partition, key, value)`: produce one record and wait until Kafka has it."""
        self.topic = topic
        self.idle_ms = idle_ms
        self.live_ms = live_ms
        self.worker_id = worker_id
        self._store = store
        self._send = send
        self._seen: dict[int, int] = {}  # partition -> wall time (ms) of its last record, or of its assignment
        self.sent = 0

    def saw(self, partitions: Iterable[int], now: int) -> None:
        """Records of these partitions arrived at wall time `now` (ms)."""
        for partition in partitions:
            self._seen[partition] = now

    async def check(self, owned: Iterable[int], now: int) -> list[int]:
        """At wall time `now`, send a tick to every owned partition that needs one; returns those partitions. A
        partition seen the first time counts as active now (a worker that just got it waits `idle_ms` first)."""
        owned = sorted(set(owned))
        for partition in set(self._seen) - set(owned):
            del self._seen[partition]  # revoked: another worker owns it
        quiet = [p for p in owned if now - self._seen.setdefault(p, now) >= self.idle_ms]
        if not quiet:
            return []
        store = await self._store()
        ticked = []
        for partition in quiet:
            clock, produced_at = await store.watermark_raised(self.topic, partition)
            if clock <= 0 or produced_at is None or produced_at - clock > self.live_ms:
                continue  # no event yet (or none read by a worker that keeps its time), or a replay of older events
            at = clock + now - produced_at
            if at <= clock:
                continue  # no time has passed since it was produced (or this host's clock is behind the producer's)
            due = await store.due_lists({(self.topic, partition): at})
            if not due.get((self.topic, partition)):
                continue  # nothing would change: no record needed
            value = orjson.dumps(WindowTick(at, self.worker_id).to_dict())
            await self._send(self.topic, partition, TICK_KEY, value)
            self._seen[partition] = now
            self.sent += 1
            ticked.append(partition)
            log.info("tick at %d sent to quiet partition %s/%d (event time %d)", at, self.topic, partition, clock)
        return ticked
