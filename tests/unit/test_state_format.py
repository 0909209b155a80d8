"""A worker refuses a Redis store of a state format it neither writes nor upgrades, naming the remedy (no services)."""

from __future__ import annotations

import pytest

from streams.state import STATE_FORMAT, RedisStateStore
from tagstream.errors import StateError


class MetaClient:
    """Stands in for redis.asyncio.Redis: a `<prefix>:meta` hash that already holds `state_format`."""

    def __init__(self, state_format: str) -> None:
        self.meta = {"state_format": state_format}

    def register_script(self, source: str) -> object:
        return object()

    async def hsetnx(self, key: str, field: str, value: object) -> int:
        return 0

    async def hget(self, key: str, field: str) -> str | None:
        return self.meta.get(field)

    async def hset(self, key: str, field: str, value: object) -> int:
        self.meta[field] = str(value)
        return 0

    async def script_load(self, source: str) -> str:
        return "sha"


async def refusal(state_format: str) -> str:
    store = RedisStateStore(MetaClient(state_format), "shop", max_backoff=0.01)  # type: ignore[arg-type]
    with pytest.raises(StateError) as refused:
        await store.check_format()
    return str(refused.value)


async def test_an_older_store_is_refused_with_the_remedy_spec_gives() -> None:
    """The refusal said only "Redis holds state format 1, this worker writes format 3": SPEC.md §3's remedy (drain
    it, or start on a new TAGSTREAM_REDIS_PREFIX) was left for the operator to find."""
    message = await refusal("1")
    assert message.startswith(f"Redis holds state format 1 (shop:meta), which this worker (format {STATE_FORMAT}) ")
    assert "drain it with the workers of format 1, or start on a new TAGSTREAM_REDIS_PREFIX" in message
    assert "with a new TAGSTREAM_APP_ID" in message  # else the new, empty store is refused as lost state
    assert "SPEC.md §3" in message and "\n" not in message


async def test_a_newer_store_is_refused_naming_the_version_that_wrote_it() -> None:
    message = await refusal(str(STATE_FORMAT + 1))
    assert f"newer than this worker's format {STATE_FORMAT}: run the tagstream version that wrote it" in message
    assert "a new TAGSTREAM_REDIS_PREFIX" in message and "\n" not in message


async def test_the_format_this_worker_writes_and_the_one_it_upgrades_are_accepted() -> None:
    for found in (str(STATE_FORMAT), "2"):
        client = MetaClient(found)
        await RedisStateStore(client, "shop").check_format()  # type: ignore[arg-type]
        assert client.meta["state_format"] == str(STATE_FORMAT)


class FullClient(MetaClient):
    """A Redis at its maxmemory with noeviction: every write is refused with OOM."""

    async def hsetnx(self, key: str, field: str, value: object) -> int:
        from redis.exceptions import OutOfMemoryError

        raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")


async def test_a_full_redis_is_named_full_not_another_programs_key() -> None:
    """The worker blamed "another program's key?" when Redis was simply full."""
    store = RedisStateStore(FullClient("3"), "shop", max_backoff=0.01)  # type: ignore[arg-type]
    with pytest.raises(StateError) as refused:
        await store.check_format()
    message = str(refused.value)
    assert message.startswith("Redis is full (command not allowed when used memory > 'maxmemory'.)")
    assert "raise its maxmemory or free memory" in message and "another program" not in message


class NoInfoClient(MetaClient):
    """A managed Redis that refuses INFO (an ACL user without it)."""

    async def info(self, section: str) -> dict[str, object]:
        from redis.exceptions import NoPermissionError

        raise NoPermissionError("this user has no permissions to run the 'info' command")


async def test_an_unreadable_eviction_policy_is_warned_of_once(caplog: pytest.LogCaptureFixture) -> None:
    """A running worker asks every 30 s: it logged the same warning ~2,900 times a day."""
    store = RedisStateStore(NoInfoClient("3"), "shop")  # type: ignore[arg-type]
    for _ in range(3):
        assert await store.eviction_problem() is None
    assert sum("cannot read Redis's eviction policy" in r.message for r in caplog.records) == 1
