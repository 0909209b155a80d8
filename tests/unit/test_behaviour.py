"""Behaviour tags: enter/exit levels, hysteresis, minimum dwell, no flapping, and when to look again."""

from __future__ import annotations

import random
from typing import Any

import pytest

from serving.behaviour import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    BehaviourConfig,
    WindowCounts,
    WindowStats,
    decode_behaviour,
    decode_behaviour_between,
    next_check_at,
)
from streams.windows import window_stats
from tagstream.errors import ConfigError

T0 = 1_764_000_000_000  # some event time
CFG = BehaviourConfig()
# A steady 7 hourly interactions over the week: baseline 7/h, so I_1h = 21 is ratio 3.0.
WEEK = 7 * 168


def counts(now: int, h1: int = 0, *, users_1h: int = 10, d7: int = WEEK, **kw: Any) -> WindowCounts:
    return WindowCounts(
        now=now,
        h1=WindowStats(views=h1, users=users_1h, oldest=kw.pop("h1_oldest", None)),
        d7=WindowStats(views=d7, oldest=kw.pop("d7_oldest", None), purchases=kw.pop("purchases", 0)),
        **kw,
    )


def on(tags: list[Any]) -> set[str]:
    return {t.tag for t in tags}


def step(state: dict[str, Any] | None, c: WindowCounts) -> tuple[set[str], dict[str, Any]]:
    tags, new_state = decode_behaviour(c, state, CFG)
    assert all(t.group == "behaviour" and t.origin == "behaviour" and t.score == 1.0 for t in tags)
    return on(tags), new_state


# ------------------------------------------------------------------------------------------------ trending


def test_trending_enters_at_ratio_three() -> None:
    tags, state = step(None, counts(T0, 21))  # ratio 21 / 7 = 3.0
    assert "trending" in tags
    assert state["trending"] == {"on": True, "since": T0}
    tags, _ = step(None, counts(T0, 20))  # ratio 2.86
    assert "trending" not in tags


def test_trending_needs_minimum_count_and_users() -> None:
    quiet = counts(T0, 6, d7=6)  # ratio 6 / max(6/168, 1) = 6, but only 6 interactions
    assert "trending" not in step(None, quiet)[0]
    bots = counts(T0, 50, users_1h=2)  # enough interactions, two users
    assert "trending" not in step(None, bots)[0]


def test_trending_stays_on_between_exit_and_enter() -> None:
    _, state = step(None, counts(T0, 21))
    tags, state = step(state, counts(T0 + HOUR_MS, 14))  # ratio 2.0: below enter, above exit
    assert "trending" in tags and state["trending"]["since"] == T0


def test_trending_turns_off_below_exit_after_dwell() -> None:
    _, state = step(None, counts(T0, 21))
    # ratio 10/7 = 1.43 < 1.5, but the tag has been on only 5 minutes
    tags, state = step(state, counts(T0 + 5 * MINUTE_MS, 10))
    assert "trending" in tags
    tags, state = step(state, counts(T0 + CFG.min_dwell_ms, 10))
    assert "trending" not in tags
    assert state["trending"] == {"on": False, "since": T0 + CFG.min_dwell_ms}


def test_trending_turns_off_when_hour_gets_quiet() -> None:
    _, state = step(None, counts(T0, 40, d7=40))  # new product, everything in the last hour
    tags, _ = step(state, counts(T0 + HOUR_MS, 9, d7=40))  # ratio still high but below the keep count
    assert "trending" not in tags


def test_no_flapping_over_noisy_sequence() -> None:
    rng = random.Random(7)
    state: dict[str, Any] | None = None
    flips = naive_flips = 0
    prev = naive_prev = False
    # one reading a minute for 6 hours; ratio noise between 1.6 and 4.0 around the enter level 3.0
    for minute in range(360):
        ratio = rng.uniform(1.6, 4.0)
        tags, state = step(state, counts(T0 + minute * MINUTE_MS, round(ratio * 7)))
        now_on = "trending" in tags
        flips += now_on != prev
        prev = now_on
        naive = round(ratio * 7) / 7 >= 3.0
        naive_flips += naive != naive_prev
        naive_prev = naive
    assert naive_flips > 50  # the sequence really does cross the enter level all the time
    assert flips == 1 and prev  # hysteresis: on once, stays on


def test_noise_around_exit_level_dwell_limits_flips() -> None:
    # Readings alternate 1.4 / 3.1: each on period lasts at least min_dwell.
    state: dict[str, Any] | None = None
    changes: list[int] = []
    prev = False
    for minute in range(120):
        ratio = 3.1 if minute % 2 else 1.4
        now = T0 + minute * MINUTE_MS
        tags, state = step(state, counts(now, round(ratio * 7)))
        if ("trending" in tags) != prev:
            changes.append(now)
            prev = not prev
    on_periods = [b - a for a, b in zip(changes[::2], changes[1::2], strict=False)]
    assert on_periods and min(on_periods) >= CFG.min_dwell_ms


# ------------------------------------------------------------------------------------------------ hot, conversion, new


def test_hot_hysteresis() -> None:
    def hot(n: int, users: int) -> WindowCounts:
        return WindowCounts(now=T0, h24=WindowStats(views=n, users=users))

    assert "hot" not in step(None, hot(199, 80))[0]
    assert "hot" not in step(None, hot(400, 49))[0]
    tags, state = step(None, hot(200, 50))
    assert "hot" in tags
    state["hot"]["since"] -= CFG.min_dwell_ms  # dwell done
    assert "hot" in step(state, hot(120, 30))[0]  # between exit and enter
    assert "hot" not in step(state, hot(99, 30))[0]
    assert "hot" not in step(state, hot(150, 24))[0]


def test_high_conversion() -> None:
    def conv(views: int, purchases: int) -> WindowCounts:
        return WindowCounts(now=T0, d7=WindowStats(views=views, purchases=purchases))

    assert "high-conversion" not in step(None, conv(99, 10))[0]  # too few views
    tags, state = step(None, conv(100, 5))  # 5 %
    assert "high-conversion" in tags
    state["high-conversion"]["since"] -= CFG.min_dwell_ms
    assert "high-conversion" in step(state, conv(100, 4))[0]  # 4 %: between exit and enter
    assert "high-conversion" not in step(state, conv(100, 2))[0]  # 2 % < 3 %
    assert "high-conversion" not in step(state, conv(40, 10))[0]  # below the keep count of views


def test_new() -> None:
    assert "new" in step(None, WindowCounts(now=T0, first_seen=T0 - DAY_MS))[0]
    assert "new" not in step(None, WindowCounts(now=T0, first_seen=T0 - 7 * DAY_MS))[0]
    assert "new" not in step(None, WindowCounts(now=T0))[0]
    _, state = step(None, WindowCounts(now=T0, first_seen=T0))
    tags, state = step(state, WindowCounts(now=T0 + 7 * DAY_MS, first_seen=T0))
    assert "new" not in tags and state["new"] == {"on": False, "since": T0 + 7 * DAY_MS}


def test_new_is_off_for_an_event_older_than_the_product() -> None:
    first_seen = T0 + 2 * HOUR_MS
    tags, state = step(None, WindowCounts(now=T0, first_seen=first_seen))
    assert "new" not in tags and "new" not in state
    assert "new" not in step(None, WindowCounts(now=first_seen - 1, first_seen=first_seen))[0]
    tags, state = step(state, WindowCounts(now=first_seen, first_seen=first_seen))
    assert "new" in tags and state["new"] == {"on": True, "since": first_seen}
    # a late event from before its switch on (before first_seen) leaves it on: never decided at an earlier time
    tags, state = step(state, WindowCounts(now=T0, first_seen=first_seen))
    assert "new" in tags and state["new"] == {"on": True, "since": first_seen}
    assert next_check_at(WindowCounts(now=T0, first_seen=first_seen), state) == first_seen + 7 * DAY_MS
    # nor one older than its switch off
    off_at = first_seen + 7 * DAY_MS
    tags, state = step(state, WindowCounts(now=off_at, first_seen=first_seen))
    assert "new" not in tags and state["new"] == {"on": False, "since": off_at}
    tags, state = step(state, WindowCounts(now=off_at - HOUR_MS, first_seen=first_seen))
    assert "new" not in tags and state["new"] == {"on": False, "since": off_at}


def test_state_tolerates_garbage() -> None:
    tags, state = step({"trending": "yes", "hot": {"on": True, "since": "x"}}, WindowCounts(now=T0))
    # a malformed entry counts as off; an on entry without a usable `since` may turn off at once
    assert tags == set() and state["hot"] == {"on": False, "since": T0}


def test_config_rejects_inverted_levels() -> None:
    with pytest.raises(ConfigError):
        BehaviourConfig(trending_enter_ratio=1.0, trending_exit_ratio=2.0)


def test_from_metrics_reads_window_stats() -> None:
    now = T0
    beh = {f"m:{now // 300_000}:view": 3, f"m:{now // 300_000 - 1}:purchase": 1, f"d:{now // DAY_MS}:view": 9}
    h1 = WindowStats.from_metrics(window_stats(beh, now)["h1"], users=2)
    assert (h1.views, h1.purchases, h1.users, h1.interactions) == (3, 1, 2, 4)
    assert h1.oldest == (now // 300_000 - 1) * 300_000


# ------------------------------------------------------------------------------------------------ next check


def test_next_check_none_when_nothing_is_on() -> None:
    assert next_check_at(WindowCounts(now=T0), None) is None
    assert next_check_at(WindowCounts(now=T0), {"hot": {"on": False, "since": 1}}) is None


def test_next_check_when_oldest_bucket_leaves() -> None:
    oldest = T0 - 40 * MINUTE_MS
    c = counts(T0, 21, h1_oldest=oldest)
    state = {"trending": {"on": True, "since": T0 - HOUR_MS}}
    assert next_check_at(c, state) == oldest + HOUR_MS


def test_next_check_respects_dwell_and_new() -> None:
    c = counts(T0, 21, h1_oldest=T0 - 2 * MINUTE_MS, first_seen=T0 - 6 * DAY_MS)
    state = {"trending": {"on": True, "since": T0 - MINUTE_MS}, "new": {"on": True, "since": T0 - 6 * DAY_MS}}
    assert next_check_at(c, state) == T0 - MINUTE_MS + CFG.min_dwell_ms  # dwell ends before the bucket leaves
    only_new = {"new": {"on": True, "since": T0 - 6 * DAY_MS}}
    assert next_check_at(c, only_new) == T0 + DAY_MS


def test_next_check_when_new_is_still_ahead() -> None:
    ahead = WindowCounts(now=T0, first_seen=T0 + 2 * HOUR_MS)
    _, state = step(None, ahead)
    assert next_check_at(ahead, state) == T0 + 2 * HOUR_MS  # time alone turns it on then
    assert "new" in step(state, WindowCounts(now=T0 + 2 * HOUR_MS, first_seen=T0 + 2 * HOUR_MS))[0]
    # marked on although first_seen is ahead (a state written before first_seen counted): off at the next look
    assert next_check_at(ahead, {"new": {"on": True, "since": T0 - HOUR_MS}}) == T0 + 1
    assert next_check_at(ahead, {}, BehaviourConfig(new_days=0)) is None


def test_next_check_without_bucket_info_uses_next_boundary() -> None:
    c = WindowCounts(now=T0 + 1, h24=WindowStats(views=300, users=60))
    got = next_check_at(c, {"hot": {"on": True, "since": T0 - DAY_MS}})
    assert got == ((T0 + 1) // HOUR_MS + 1) * HOUR_MS and got > T0 + 1


# ---------------------------------------------------------------------------------- unknown unique users


def _with_users(c: WindowCounts, h1: int, h24: int) -> WindowCounts:
    return WindowCounts(
        now=c.now,
        first_seen=c.first_seen,
        h1=_replace(c.h1, h1),
        h24=_replace(c.h24, h24),
        d7=c.d7,
    )


def _replace(stats: WindowStats, users: int) -> WindowStats:
    return WindowStats(stats.views, stats.clicks, stats.add_to_carts, stats.purchases, users, stats.oldest)


def test_a_decode_between_two_user_counts_holds_for_every_count_between_or_is_refused() -> None:
    rng = random.Random(3)
    refused = decided = 0
    for _ in range(3000):
        h1_views, h24_views = rng.randint(0, 40), rng.randint(0, 400)
        base = WindowCounts(
            now=T0,
            h1=WindowStats(views=h1_views),
            h24=WindowStats(views=max(h1_views, h24_views)),
            d7=WindowStats(views=rng.choice([10, WEEK]) + h24_views),
        )
        low_1h, low_24h = rng.randint(0, h1_views), rng.randint(0, max(h1_views, h24_views))
        high_1h, high_24h = rng.randint(low_1h, h1_views), rng.randint(low_24h, max(h1_views, h24_views))
        previous = rng.choice(
            [None, {"trending": {"on": True, "since": T0 - DAY_MS}}, {"hot": {"on": True, "since": 0}}]
        )
        low, high = _with_users(base, low_1h, low_24h), _with_users(base, high_1h, high_24h)
        got = decode_behaviour_between(low, high, previous, CFG)
        between = {
            (frozenset(on(t)), str(st))
            for u1 in range(low_1h, high_1h + 1)
            for u24 in (low_24h, (low_24h + high_24h) // 2, high_24h)
            for t, st in [decode_behaviour(_with_users(base, u1, u24), previous, CFG)]
        }
        if got is None:
            refused += 1
            assert len(between) > 1  # refused only when the users decide
        else:
            decided += 1
            assert between == {(frozenset(on(got[0])), str(got[1]))}
    assert refused > 20 and decided > 2000
