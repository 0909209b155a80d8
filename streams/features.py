"""A product's behaviour features as stored (windows, unique users, CTR, conversion), for the HTTP lookup."""

from __future__ import annotations

from typing import Any

from serving.behaviour import WindowStats
from streams.state import StateStore
from streams.windows import window_stats


async def product_features(store: StateStore, product_id: str, now: int | None = None) -> dict[str, Any] | None:
    """The 1 h / 24 h / 7 d windows of a product at event time `now` (default: the product's own clock, or the
    stream's clock a window pass moved its windows to, `swept_at`, when that is later), with approximate unique
    users, CTR and conversion; None when nothing is known of the product. Raises ValueError on stored state the
    worker would not have written."""
    state = (await store.read([product_id]))[product_id]
    if not state.doc and not state.beh:
        return None
    if state.tags is not None and not isinstance(state.tags, dict):
        raise ValueError("its tag state is not a JSON object")
    swept_at = (state.tags or {}).get("swept_at")
    if swept_at is not None and (type(swept_at) is not int):
        raise ValueError(f"its swept_at is not an integer: {swept_at!r}"[:200])
    at = now if now is not None else max(int(state.beh.get("last_ts", 0)), swept_at or 0)
    if at:
        state.users = (await store.count_users({product_id: at})).get(product_id, {})
    windows = {
        window: WindowStats.from_metrics(metrics, users=state.users.get(window, 0)).to_json()
        for window, metrics in window_stats(state.beh, at).items()
    }
    return {
        "product_id": product_id,
        "as_of": at or None,  # no clock before its first behaviour event
        "first_seen": int(state.doc["first_seen"]) if "first_seen" in state.doc else None,
        "deleted": state.doc.get("deleted") == "1",
        "windows": windows,
    }
