"""Transient Redis errors are retried with bounded backoff; nothing is reported done before it is stored."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.exceptions import ConnectionError

from streams.state import RedisStateStore


class FlakyClient:
    """Stands in for redis.asyncio.Redis: fails `failures` times, then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def register_script(self, source: str) -> Any:
        return object()

    async def hget(self, key: str, field: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("connection refused")
        return "1700000000000"


async def test_transient_errors_are_retried_until_the_call_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    client = FlakyClient(failures=4)
    store = RedisStateStore(client, "t", max_backoff=0.1)  # type: ignore[arg-type]
    started = time.monotonic()
    assert await store.get_watermark("behavior", 0) == 1_700_000_000_000
    assert client.calls == 5
    # 0.05 + 0.1 + 0.1 + 0.1: exponential, capped at max_backoff
    assert 0.3 <= time.monotonic() - started < 2.0
    assert sum("retrying" in r.message for r in caplog.records) == 4
    # and the outage's end is logged once (an operator saw only the retries, then silence)
    [back] = [r.message for r in caplog.records if "succeeded again" in r.message]
    assert back.startswith("redis watermark succeeded again after 4 failed attempts (")
