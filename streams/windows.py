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


def window_buckets(g: Granularity, now: int) -> range:
    """The buckets of granularity `g` its window covers at event time `now`."""
    return range(now // g.width_ms - g.keep + 1, now // g.width_ms + 1)


@lru_cache(maxsize=1 << 16)
def _parse(name: str) -> tuple[str, int, str] | None:
    parts = name.split(":")
    if len(parts) != 3 or parts[0] not in _BY_CODE:
        return None
    return parts[0], int(parts[1]), parts[2]


_BY_CODE = {g.code: g for g in GRANULARITIES}


def _oldest_kept(g: Granularity, now: int) -> int:
    return now // g.width_ms - g.keep + 1


def window_stats(beh: dict[str, int], now: int) -> dict[str, dict[str, int | None]]:
    """Per window ("h1", "h24", "d7"): each metric's sum over the buckets it covers at event time `now`, and
    `oldest`, the start (ms) of its oldest non-empty bucket (None when empty)."""
    out: dict[str, dict[str, int | None]] = {}
    # per granularity code: (first bucket in the window, newest bucket, bucket width, the window's sums)
    spans: dict[str, tuple[int, int, int, dict[str, int | None]]] = {}
    for g in GRANULARITIES:
        stats = out[g.window] = {**dict.fromkeys(METRICS, 0), "oldest": None}
        spans[g.code] = (_oldest_kept(g, now), now // g.width_ms, g.width_ms, stats)
    oldest: dict[str, int] = {}  # code -> oldest non-empty bucket in the window
    for name, value in beh.items():
        if not value or name[0] not in spans:  # last_ts, anything else
            continue
        parsed = _parse(name)
        if parsed is None:
            continue
        code, bucket, metric = parsed
        first, newest, _, stats = spans[code]
        if first <= bucket <= newest and metric in METRICS:
            stats[metric] += value  # type: ignore[operator]
            if bucket < oldest.get(code, newest + 1):
                oldest[code] = bucket
    for code, bucket in oldest.items():
        spans[code][3]["oldest"] = bucket * spans[code][2]
    return out


def stale_fields(beh: dict[str, int], now: int) -> tuple[list[str], list[tuple[str, int]]]:
    """The counter fields whose bucket has left its window at event time `now`, and those buckets (granularity,
    bucket): their unique-user HyperLogLogs go with them (a bucket's HLL exists exactly when a counter of it does,
    since every event writes both)."""
    stale, buckets = [], set()
    for name in beh:
        parsed = _parse(name)
        if parsed is None:
            continue
        code, bucket, _ = parsed
        if bucket < _oldest_kept(_BY_CODE[code], now):
            stale.append(name)
            buckets.add((code, bucket))
    return stale, sorted(buckets)
