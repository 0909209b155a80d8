"""Behaviour tags (`trending`, `hot`, `high-conversion`, `new`) from windowed counts, with hysteresis.

Pure functions: the caller reads the windows from Redis (SPEC §3: 5-minute buckets for 1 h, hour buckets for 24 h,
day buckets for 7 d) and stores the returned state under `behaviour` in the tag state.

Windows: a window of length W with bucket width w holds, at time `now`, the buckets b with
now // w - W / w < b <= now // w; a bucket starting at time t therefore leaves the window at t + W.
`interactions` = views + clicks + add_to_carts + purchases.

Rules (every tag is on/off with hysteresis: it turns on when its *enter* condition holds and off only when its
*exit* condition holds and it has been on for at least `min_dwell_ms`; values in between keep the current state):

- **trending**: ratio r = I_1h / max(I_7d / 168, trending_baseline_floor), the last hour against the 7-day hourly
  average. Enter: r >= trending_enter_ratio (3) and I_1h >= trending_min_interactions and U_1h >=
  trending_min_users. Exit: r < trending_exit_ratio (1.5) or I_1h < trending_keep_interactions.
- **hot**: Enter: I_24h >= hot_enter_interactions and U_24h >= hot_enter_users. Exit: I_24h <
  hot_exit_interactions or U_24h < hot_exit_users.
- **high-conversion**: rate = purchases_7d / views_7d. Enter: views_7d >= hc_min_views and rate >= hc_enter_rate.
  Exit: views_7d < hc_keep_views or rate < hc_exit_rate.
- **new**: on exactly while first_seen <= now < first_seen + new_days (time alone decides it, no hysteresis), never
  decided at a time before its last switch (an event older than that leaves it as it is).

State per tag: {"on": bool, "since": ms of the last change}. Behaviour tags have score 1.0 and group `behaviour`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from schemas.records import Tag
from tagstream.errors import ConfigError

__all__ = [
    "BEHAVIOUR_TAGS",
    "BehaviourConfig",
    "WindowCounts",
    "WindowStats",
    "decode_behaviour",
    "decode_behaviour_between",
    "decode_new",
    "next_check_at",
]

BEHAVIOUR_GROUP = "behaviour"
BEHAVIOUR_TAGS = ("trending", "hot", "high-conversion", "new")
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
HOURS_PER_WEEK = 168
# Window length and bucket width (SPEC §3) of each window.
WINDOWS = {"h1": (HOUR_MS, 5 * MINUTE_MS), "h24": (DAY_MS, HOUR_MS), "d7": (7 * DAY_MS, DAY_MS)}

State = dict[str, dict[str, Any]]


class WindowStats(NamedTuple):
    """Event counts and approximate unique users of one window (a named tuple: built for every product a batch
    touches, ~3x cheaper than a frozen dataclass)."""

    views: int = 0
    clicks: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    users: int = 0
    oldest: int | None = None  # start (ms) of the oldest non-empty bucket still in the window, if known

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, int | None], users: int = 0) -> WindowStats:
        """From per-metric sums keyed `view`/`click`/`add_to_cart`/`purchase` and `oldest` (as
        `streams.windows.window_stats` returns them per window) and a unique-user count."""
        oldest = metrics.get("oldest")
        return cls(
            views=int(metrics.get("view") or 0),
            clicks=int(metrics.get("click") or 0),
            add_to_carts=int(metrics.get("add_to_cart") or 0),
            purchases=int(metrics.get("purchase") or 0),
            users=int(users),
            oldest=int(oldest) if oldest is not None else None,
        )

    @property
    def interactions(self) -> int:
        """views + clicks + add_to_carts + purchases."""
        return self.views + self.clicks + self.add_to_carts + self.purchases

    @property
    def ctr(self) -> float:
        """Click-through rate: clicks / views (0 without views)."""
        return self.clicks / self.views if self.views else 0.0

    @property
    def conversion(self) -> float:
        """Conversion rate: purchases / views (0 without views)."""
        return self.purchases / self.views if self.views else 0.0

    def to_json(self) -> dict[str, float | int]:
        """Counts, unique users and the derived rates."""
        return {
            "views": self.views,
            "clicks": self.clicks,
            "add_to_carts": self.add_to_carts,
            "purchases": self.purchases,
            "unique_users": self.users,
            "ctr": round(self.ctr, 6),
            "conversion": round(self.conversion, 6),
        }


class WindowCounts(NamedTuple):
    """One product's windows at event time `now` (ms), and when it was first seen (ms, if known)."""

    now: int
    h1: WindowStats = WindowStats()
    h24: WindowStats = WindowStats()
    d7: WindowStats = WindowStats()
    first_seen: int | None = None


@dataclass(frozen=True, slots=True)
class BehaviourConfig:
    """Enter/exit levels of the behaviour tags (see the module docstring for the formulas)."""

    trending_enter_ratio: float = 3.0
    trending_exit_ratio: float = 1.5
    trending_min_interactions: int = 20  # in the last hour, to enter
    trending_keep_interactions: int = 10  # in the last hour, to stay
    trending_min_users: int = 5  # unique users in the last hour, to enter
    trending_baseline_floor: float = 1.0  # interactions per hour: floor of the 7-day hourly average
    hot_enter_interactions: int = 200  # in 24 h
    hot_exit_interactions: int = 100
    hot_enter_users: int = 50  # unique users in 24 h
    hot_exit_users: int = 25
    hc_enter_rate: float = 0.05  # purchases / views over 7 d
    hc_exit_rate: float = 0.03
    hc_min_views: int = 100  # views in 7 d, to enter
    hc_keep_views: int = 50  # views in 7 d, to stay
    new_days: float = 7.0
    min_dwell_ms: int = 10 * MINUTE_MS  # a tag that turned on stays on at least this long

    def __post_init__(self) -> None:
        pairs = [
            ("trending_exit_ratio", "trending_enter_ratio"),
            ("trending_keep_interactions", "trending_min_interactions"),
            ("hot_exit_interactions", "hot_enter_interactions"),
            ("hot_exit_users", "hot_enter_users"),
            ("hc_exit_rate", "hc_enter_rate"),
            ("hc_keep_views", "hc_min_views"),
        ]
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ConfigError(f"behaviour: {low} must not exceed {high}")
        if self.trending_baseline_floor <= 0 or self.new_days < 0 or self.min_dwell_ms < 0:
            raise ConfigError("behaviour: trending_baseline_floor must be > 0, new_days and min_dwell_ms >= 0")

    @property
    def new_ms(self) -> int:
        """How long a product counts as new, in ms."""
        return int(self.new_days * DAY_MS)


DEFAULT_CONFIG = BehaviourConfig()


def trending_ratio(counts: WindowCounts, config: BehaviourConfig = DEFAULT_CONFIG) -> float:
    """I_1h / max(I_7d / 168, trending_baseline_floor)."""
    baseline = max(counts.d7.interactions / HOURS_PER_WEEK, config.trending_baseline_floor)
    return counts.h1.interactions / baseline


def _conditions(counts: WindowCounts, config: BehaviourConfig) -> dict[str, tuple[bool, bool]]:
    """(enter, exit) condition of each hysteresis tag."""
    h1, h24, d7 = counts.h1, counts.h24, counts.d7
    r = trending_ratio(counts, config)
    rate = d7.purchases / d7.views if d7.views > 0 else 0.0
    return {
        "trending": (
            r >= config.trending_enter_ratio
            and h1.interactions >= config.trending_min_interactions
            and h1.users >= config.trending_min_users,
            r < config.trending_exit_ratio or h1.interactions < config.trending_keep_interactions,
        ),
        "hot": (
            h24.interactions >= config.hot_enter_interactions and h24.users >= config.hot_enter_users,
            h24.interactions < config.hot_exit_interactions or h24.users < config.hot_exit_users,
        ),
        "high-conversion": (
            d7.views >= config.hc_min_views and rate >= config.hc_enter_rate,
            d7.views < config.hc_keep_views or rate < config.hc_exit_rate,
        ),
    }


def _prev(state: Mapping[str, Any] | None, tag: str) -> tuple[bool, int | None]:
    entry = state.get(tag) if state else None
    if type(entry) is not dict:  # the stored state is JSON; anything else is no entry (an ABC check costs ~10x)
        return False, None
    since = entry.get("since")
    return bool(entry.get("on")), since if isinstance(since, int) and not isinstance(since, bool) else None


def _new_entry(
    first_seen: int | None, now: int, previous_state: Mapping[str, Any] | None, config: BehaviourConfig
) -> tuple[bool, dict[str, Any] | None]:
    """Whether the product is new at `now` (first_seen <= now < first_seen + new_days: an event older than the
    product is no sign of it being new), and its state entry (None when it has none and needs none). Never decided
    at a time before its last switch: an event older than that (a click before the product's first catalog change,
    replayed late) leaves it as it is, as a later look would set it back."""
    was_new, since = _prev(previous_state, "new")
    if since is not None and now < since:
        return was_new, {"on": was_new, "since": since}
    is_new = first_seen is not None and first_seen <= now < first_seen + config.new_ms
    if is_new != was_new:
        return is_new, {"on": is_new, "since": now}
    if was_new or (previous_state and "new" in previous_state):
        return is_new, {"on": is_new, "since": since if since is not None else now}
    return is_new, None


def decode_new(
    first_seen: int | None, now: int, previous_state: Mapping[str, Any] | None, config: BehaviourConfig = DEFAULT_CONFIG
) -> tuple[list[Tag], State]:
    """`decode_behaviour` of `new` alone, which time alone decides (no counts needed): the tags that are on and the
    state, the other tags' entries as they were."""
    state: State = dict(previous_state or {})
    entry = _new_entry(first_seen, now, previous_state, config)[1]
    if entry is not None:
        state["new"] = entry
    return [_BEHAVIOUR_TAG[t] for t in BEHAVIOUR_TAGS if _prev(state, t)[0]], state


def decode_behaviour(
    counts: WindowCounts, previous_state: Mapping[str, Any] | None, config: BehaviourConfig = DEFAULT_CONFIG
) -> tuple[list[Tag], State]:
    """The behaviour tags that are on and the new per-tag state, given the previous state (None: all off).

    The state keeps an entry for every tag that is on or had an entry before; `since` changes only on a change.
    """
    return _decode(counts, _conditions(counts, config), previous_state, config)


def decode_behaviour_between(
    low: WindowCounts,
    high: WindowCounts,
    previous_state: Mapping[str, Any] | None,
    config: BehaviourConfig = DEFAULT_CONFIG,
) -> tuple[list[Tag], State] | None:
    """`decode_behaviour` of counts whose unique users are only known to lie between `low`'s and `high`'s (every
    other count equal): the result when it is the same at both ends — each tag is monotone in the user counts, so
    then it is the same for every count between — else None (the users decide)."""
    at_low = _conditions(low, config)
    at_high = _conditions(high, config)
    decoded = _decode(low, at_low, previous_state, config)
    if at_high == at_low or _decode(high, at_high, previous_state, config) == decoded:
        return decoded
    return None


_BEHAVIOUR_TAG = {t: Tag(tag=t, group=BEHAVIOUR_GROUP, score=1.0, origin="behaviour") for t in BEHAVIOUR_TAGS}


def _decode(
    counts: WindowCounts,
    conditions: dict[str, tuple[bool, bool]],
    previous_state: Mapping[str, Any] | None,
    config: BehaviourConfig,
) -> tuple[list[Tag], State]:
    now = counts.now
    on: dict[str, bool] = {}
    new_state: State = {}
    for tag, (enter, leave) in conditions.items():
        was_on, since = _prev(previous_state, tag)
        is_on = was_on
        if not was_on and enter:
            is_on = True
        elif was_on and leave and (since is None or now - since >= config.min_dwell_ms):
            is_on = False
        on[tag] = is_on
        if is_on != was_on:
            new_state[tag] = {"on": is_on, "since": now}
        elif was_on or (previous_state and tag in previous_state):
            new_state[tag] = {"on": is_on, "since": since if since is not None else now}
    on["new"], entry = _new_entry(counts.first_seen, now, previous_state, config)
    if entry is not None:
        new_state["new"] = entry
    return [_BEHAVIOUR_TAG[t] for t in BEHAVIOUR_TAGS if on[t]], new_state


def _leaves_at(stats: WindowStats, window: str, now: int) -> int:
    """When the window's count next drops: its oldest bucket's exit time, else the next bucket boundary."""
    length, width = WINDOWS[window]
    if stats.oldest is not None:
        return stats.oldest + length
    return (now // width + 1) * width


def next_check_at(
    counts: WindowCounts, state: Mapping[str, Any] | None, config: BehaviourConfig = DEFAULT_CONFIG
) -> int | None:
    """The event time (ms) at which a tag could change with no new event, or None if none can.

    trending looks again when the 1 h window next loses a bucket, hot the 24 h window, high-conversion the 7 d
    window, new at first_seen + new_days; a tag still within its minimum dwell also looks at since + min_dwell.
    Other tags turn *on* only on events, but time alone turns new on: at first_seen when that is still ahead of
    `now`. The result is always later than `now`.
    """
    now = counts.now
    times: list[int] = []
    window_of = {"trending": ("h1", counts.h1), "hot": ("h24", counts.h24), "high-conversion": ("d7", counts.d7)}
    for tag, (window, stats) in window_of.items():
        is_on, since = _prev(state, tag)
        if not is_on:
            continue
        times.append(_leaves_at(stats, window, now))
        if since is not None and since + config.min_dwell_ms > now:
            times.append(since + config.min_dwell_ms)
    is_new, since = _prev(state, "new")
    fs = counts.first_seen
    if fs is not None and is_new:  # a look before its switch on leaves it on; one on before first_seen goes off now
        times.append(fs + config.new_ms if fs <= now or (since is not None and now < since) else now)
    elif fs is not None and now < fs and config.new_ms > 0:
        times.append(fs)
    if not times:
        return None
    return max(min(times), now + 1)
