"""Time buckets of the behaviour counters."""

from __future__ import annotations

from streams.windows import event_fields, stale_fields, window_stats

MIN5 = 300_000
HOUR = 3_600_000
DAY = 86_400_000


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
    stale = set(stale_fields(beh, t0 + 2 * HOUR))
    assert stale == {f"m:{t0 // MIN5}:view"}
    assert window_stats({k: v for k, v in beh.items() if k not in stale}, t0 + 2 * HOUR) == window_stats(
        beh, t0 + 2 * HOUR
    )
