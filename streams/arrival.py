"""How old records are when the worker starts processing them: the part of event→tag latency spent before the worker.

A record's age when its batch starts is the time from its Kafka timestamp (the producer's create time) to the moment
the agent takes it: the producer's send, the broker, the fetch (which waits up to `fetch_max_wait_ms`), Faust's
consumer and the agent's buffer. The rest of the event→tag latency is the worker's own processing. The bench
reads these figures from the worker's log next to the latency it measures end to end, so a latency figure can be
split into "arrived late" and "processed slowly" (bench/RESULTS.md, thirteenth session).

The same histogram is also kept for the age at fetch (Kafka timestamp → the worker's consumer hands the fetched records
to Faust; records of fetched batches only, `streams.transport.RecordBatchMessage.fetched_ms`): between the two, the
time a record waited in the worker's buffers while earlier batches were processed. A live latency that is old already
at fetch is upstream (the producer, the broker, a busy machine delaying the fetch); one that grows after it is the
worker's own backlog.

Ages are counted in 1 ms bins from 0 to `MAX_MS` (older ones in the last bin), for the worker's whole run, so
percentiles cost nothing per record but one list increment. A record with no timestamp is not counted; a timestamp
from the future (a producer's clock ahead of this machine's) counts as age 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["AT_BATCH_START", "AT_FETCH", "ArrivalAges", "last_summary"]

MAX_MS = 5_000
PERCENTILES = (50, 99)


AT_BATCH_START = "batch start"
AT_FETCH = "fetch"


class ArrivalAges:
    """Per input topic: a histogram of record ages (ms) at one point of their way (`at`: the start of their batch, or
    their fetch)."""

    def __init__(self, at: str = AT_BATCH_START) -> None:
        self.at = at
        self._bins: dict[str, list[int]] = {}

    def count(self, topic: str, now_ms: int, timestamps_ms: Iterable[int]) -> None:
        """Count the ages at `now_ms` of records of `topic` with these timestamps (0 = none)."""
        bins = self._bins.get(topic)
        if bins is None:
            bins = self._bins[topic] = [0] * (MAX_MS + 1)
        for ts in timestamps_ms:
            if ts > 0:
                age = now_ms - ts
                bins[age if 0 <= age < MAX_MS else (0 if age < 0 else MAX_MS)] += 1

    def counted(self, topic: str) -> int:
        """How many records of `topic` were counted."""
        return sum(self._bins.get(topic, ()))

    def percentile(self, topic: str, q: float) -> int | None:
        """The `q`-th percentile age of `topic`'s records in whole ms (the bin it falls in; None if none counted)."""
        bins = self._bins.get(topic)
        total = sum(bins) if bins else 0
        if not bins or not total:
            return None
        rank = q / 100 * total
        seen = 0
        for age, n in enumerate(bins):
            seen += n
            if seen >= rank and n:
                return age
        return MAX_MS

    def summary(self) -> str:
        """One line for the stats log (`last_summary` reads it back)."""
        parts = []
        for topic in sorted(self._bins):
            p50, p99 = (self.percentile(topic, q) for q in PERCENTILES)
            parts.append(f"{topic} p50 {p50} ms p99 {p99} ms n {self.counted(topic)}")
        return f"record age at {self.at}: " + ("; ".join(parts) if parts else "none yet")


_PART = re.compile(r"(\S+) p50 (\d+) ms p99 (\d+) ms n (\d+)")


def last_summary(log_text: str, at: str = AT_BATCH_START) -> dict[str, dict[str, int]] | None:
    """The figures of the last `ArrivalAges.summary` line for `at` in a worker's log, per topic (None if it logged
    none)."""
    found = re.findall(rf"record age at {re.escape(at)}: (.*)", log_text)
    if not found:
        return None
    return {topic: {"p50": int(p50), "p99": int(p99), "n": int(n)} for topic, p50, p99, n in _PART.findall(found[-1])}
