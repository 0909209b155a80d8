"""Test helper: schema-valid events."""

from __future__ import annotations

from typing import Any


def upsert(pid: str, title: str, *, version: int = 1, updated_at: int = 1_764_316_800_000, **fields: Any) -> dict:
    """A product upsert event."""
    return {
        "schema_version": 1,
        "op": "upsert",
        "product_id": pid,
        "title": title,
        "updated_at": updated_at,
        "version": version,
        **fields,
    }


def delete(pid: str, *, version: int = 2, updated_at: int = 1_764_316_900_000) -> dict:
    """A product delete event."""
    return {"schema_version": 1, "op": "delete", "product_id": pid, "updated_at": updated_at, "version": version}


def behaviour(pid: str, user: str, ts: int, event_type: str = "click", session: str | None = None) -> dict:
    """A behaviour event."""
    return {
        "schema_version": 1,
        "event_type": event_type,
        "product_id": pid,
        "user_id": user,
        "session_id": session,
        "ts": ts,
    }
