"""Time-bucketed behaviour counters (SPEC.md §3, key `P:{pid}:beh`): which fields an event touches, window sums."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

METRICS = ("view", "click", "add_to_cart", "purchase")


@dataclass(frozen=True, slots=True)
class Granularity:
    """Buckets of `width_ms`; the window it feeds covers the newest `keep` buckets (the current one included)."""

    code: str
    width_ms: int
    keep: int
    window: str


GRANULARITIES = (
    Granularity("m", 300_000, 12, "h1"),
    Granularity("h", 3_600_000, 24, "h24"),
    Granularity("d", 86_400_000, 7, "d7"),
)
WINDOWS = tuple(g.window for g in GRANULARITIES)


# Every bucket width is a multiple of the finest, so an event's finest bucket names all its buckets.
FINEST_MS = GRANULARITIES[0].width_ms
assert all(g.width_ms % FINEST_MS == 0 for g in GRANULARITIES)


def event_fields(ts: int, metric: str) -> tuple[str, ...]:
    """The counter fields an event of `metric` at event time `ts` increments (one per granularity)."""
    return _fields(ts // FINEST_MS, metric)


def hll_buckets(ts: int) -> tuple[tuple[str, int], ...]:
    """(granularity, bucket) of the unique-user HyperLogLogs an event at `ts` adds to."""
    return _hll_buckets(ts // FINEST_MS)


@lru_cache(maxsize=4096)
def _fields(finest_bucket: int, metric: str) -> tuple[str, ...]:
    ts = finest_bucket * FINEST_MS
    return tuple(f"{g.code}:{ts // g.width_ms}:{metric}" for g in GRANULARITIES)


@lru_cache(maxsize=1024)
def _hll_buckets(finest_bucket: int) -> tuple[tuple[str, int], ...]:
    ts = finest_bucket * FINEST_MS
    return tuple((g.code, ts // g.width_ms) for g in GRANULARITIES)


def live_buckets(ts: int, now: int) -> tuple[bool, ...]:
    """Per granularity (GRANULARITIES order): whether the bucket holding event time `ts` is still in its window at
    `now` (an event older than its product's clock may have left some or all of them)."""
    return tuple(ts // g.width_ms >= window_buckets(g, now).start for g in GRANULARITIES)


def window_buckets(g: Granularity, now: int) -> range:
    """The buckets of granularity `g` its window covers at event time `now`."""
    return range(now // g.width_ms - g.keep + 1, now // g.width_ms + 1)


GRANULARITY_INDEX = {g.code: i for i, g in enumerate(GRANULARITIES)}
_METRIC_INDEX = {m: i for i, m in enumerate(METRICS)}
_PARSE_CACHE_SIZE = 1 << 16
_NOT_SEEN = object()
_parsed: dict[str, tuple[int, int, int] | None] = {}


def _parse(name: str) -> tuple[int, int, int] | None:
    """A counter field `code:bucket:metric` as (granularity index, bucket, metric index or -1 for another metric);
    None for any other field (`last_ts`). Callers look in `_parsed` first (one dict lookup per field on the hot
    path); this parses a name not seen yet and caches it (the cache is cleared when full)."""
    parts = name.split(":")
    parsed = None
    if len(parts) == 3 and parts[0] in GRANULARITY_INDEX:
        try:
            parsed = (GRANULARITY_INDEX[parts[0]], int(parts[1]), _METRIC_INDEX.get(parts[2], -1))
        except ValueError:  # not a bucket number
            parsed = None
    if len(_parsed) >= _PARSE_CACHE_SIZE:
        _parsed.clear()
    _parsed[name] = parsed
    return parsed


# one window's sums: views, clicks, add_to_carts, purchases, and the start (ms) of its oldest non-empty bucket
WindowSums = tuple[int, int, int, int, int | None]


def window_sums(beh: dict[str, int], now: int) -> tuple[WindowSums, ...]:
    """Per granularity (GRANULARITIES order, i.e. windows h1, h24, d7): each metric's sum over the buckets its
    window covers at event time `now` (METRICS order), and the start (ms) of the oldest non-empty one (None when
    the window is empty)."""
    spans = [window_buckets(g, now) for g in GRANULARITIES]
    sums = [0] * (4 * len(spans))
    oldest: list[int | None] = [None] * len(spans)
    for name, value in beh.items():
        parsed = _parsed.get(name, _NOT_SEEN)
        if parsed is _NOT_SEEN:
            parsed = _parse(name)
        if parsed is None or not value:
            continue
        g, bucket, m = parsed  # type: ignore[misc]
        if m >= 0 and bucket in spans[g]:
            sums[4 * g + m] += value
            low = oldest[g]
            if low is None or bucket < low:
                oldest[g] = bucket
    return tuple(
        (sums[4 * i], sums[4 * i + 1], sums[4 * i + 2], sums[4 * i + 3], None if low is None else low * g.width_ms)
        for i, (low, g) in enumerate(zip(oldest, GRANULARITIES, strict=True))
    )


def window_stats(beh: dict[str, int], now: int) -> dict[str, dict[str, int | None]]:
    """`window_sums` keyed by window ("h1", "h24", "d7") and by metric name, plus `oldest`."""
    return {
        g.window: {**dict(zip(METRICS, sums[:4], strict=True)), "oldest": sums[4]}
        for g, sums in zip(GRANULARITIES, window_sums(beh, now), strict=True)
    }


def stale_fields(beh: dict[str, int], now: int) -> tuple[list[str], list[tuple[str, int]]]:
    """The counter fields whose bucket has left its window at event time `now`, and those buckets (granularity,
    bucket): their unique-user HyperLogLogs go with them (a bucket's HLL exists exactly when a counter of it does,
    since every event writes both)."""
    stale, buckets = [], set()
    oldest_kept = [window_buckets(g, now).start for g in GRANULARITIES]
    for name in beh:
        parsed = _parsed.get(name, _NOT_SEEN)
        if parsed is _NOT_SEEN:
            parsed = _parse(name)
        if parsed is None:
            continue
        g, bucket, _ = parsed  # type: ignore[misc]
        if bucket < oldest_kept[g]:
            stale.append(name)
            buckets.add((GRANULARITIES[g].code, bucket))
    return stale, sorted(buckets)
