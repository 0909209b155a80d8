"""Time buckets of the behaviour counters."""

from __future__ import annotations

import random

from streams.windows import (
    GRANULARITIES,
    METRICS,
    event_fields,
    stale_fields,
    window_buckets,
    window_stats,
)

MIN5 = 300_000
HOUR = 3_600_000
DAY = 86_400_000
T0 = 1_764_316_800_000


def _apply(beh: dict[str, int], ts: int, metric: str = "view") -> None:
    for name in event_fields(ts, metric):
        beh[name] = beh.get(name, 0) + 1


def test_an_event_counts_in_every_window_until_it_leaves_each() -> None:
    beh: dict[str, int] = {}
    t0 = 100 * DAY
    _apply(beh, t0, "click")
    at = window_stats(beh, t0)
    assert at["h1"]["click"] == at["h24"]["click"] == at["d7"]["click"] == 1
    later = window_stats(beh, t0 + HOUR + MIN5)  # left the hour
    assert later["h1"]["click"] == 0 and later["h24"]["click"] == 1 and later["d7"]["click"] == 1
    assert window_stats(beh, t0 + 25 * HOUR)["h24"]["click"] == 0
    assert window_stats(beh, t0 + 8 * DAY)["d7"]["click"] == 0


def test_oldest_is_the_start_of_the_oldest_non_empty_bucket() -> None:
    beh: dict[str, int] = {}
    t0 = 100 * DAY + 7 * MIN5 + 1234
    _apply(beh, t0)
    _apply(beh, t0 + 20 * 60_000)
    stats = window_stats(beh, t0 + 30 * 60_000)
    assert stats["h1"]["oldest"] == (t0 // MIN5) * MIN5
    assert stats["h1"]["view"] == 2


def test_stale_fields_are_exactly_the_buckets_that_left_their_window() -> None:
    beh: dict[str, int] = {}
    t0 = 100 * DAY
    _apply(beh, t0)
    _apply(beh, t0 + 2 * HOUR)
    stale, buckets = stale_fields(beh, t0 + 2 * HOUR)
    assert stale == [f"m:{t0 // MIN5}:view"] and buckets == [("m", t0 // MIN5)]  # with its unique-user HLL
    assert window_stats({k: v for k, v in beh.items() if k not in stale}, t0 + 2 * HOUR) == window_stats(
        beh, t0 + 2 * HOUR
    )


def test_window_sums_equal_a_direct_sum_over_each_windows_buckets_for_random_histories() -> None:
    rng = random.Random(7)
    for _ in range(200):
        beh: dict[str, int] = {"last_ts": T0}
        for _ in range(rng.randint(0, 300)):
            ts = T0 + rng.randint(0, 10 * 86_400_000)
            for name in event_fields(ts, rng.choice(METRICS)):
                beh[name] = beh.get(name, 0) + rng.randint(0, 2)
        now = T0 + rng.randint(0, 11 * 86_400_000)
        stats = window_stats(beh, now)
        for g in GRANULARITIES:
            buckets = window_buckets(g, now)
            for metric in METRICS:
                expected = sum(beh.get(f"{g.code}:{b}:{metric}", 0) for b in buckets)
                assert stats[g.window][metric] == expected
            used = [b for b in buckets if any(beh.get(f"{g.code}:{b}:{m}", 0) for m in METRICS)]
            assert stats[g.window]["oldest"] == (min(used) * g.width_ms if used else None)


def test_fields_that_are_not_counters_of_a_known_metric_add_nothing_but_old_ones_are_still_pruned() -> None:
    bucket = T0 // MIN5
    beh = {
        "last_ts": T0,
        "m:abc:view": 5,
        "m:²:view": 6,
        "m:--1:view": 7,
        "x:1:view": 3,
        f"m:{bucket}:scroll": 4,
        f"m:{bucket}:view": 1,
    }
    assert window_stats(beh, T0)["h1"] == {
        "view": 1,
        "click": 0,
        "add_to_cart": 0,
        "purchase": 0,
        "oldest": bucket * MIN5,
    }
    stale, buckets = stale_fields(beh, T0 + 2 * HOUR)
    assert sorted(stale) == [f"m:{bucket}:scroll", f"m:{bucket}:view"] and buckets == [("m", bucket)]
