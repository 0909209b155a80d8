"""The Redis state store (Lua, offset-fenced) and the in-memory one end in the same state for the same events."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streams.app import stores_of_the_group
from streams.processor import InMessage, Processor
from streams.state import (
    STATE_FORMAT,
    SWEPT_KEEP_OFFSETS,
    MemoryStateStore,
    Ops,
    ProductKeys,
    RedisStateStore,
    StateStore,
    Write,
)
from streams.windows import GRANULARITIES
from tagstream.errors import StateError
from tagstream.stack import StackSettings
from tests.events import behaviour, delete, upsert
from tests.integration.conftest import OwnRedis

pytestmark = pytest.mark.integration
T0 = 1_764_316_800_000


def _messages() -> tuple[list[InMessage], list[InMessage]]:
    products = [upsert(f"s{i}", f"title {i}", attributes={"colour": "Blue"}) for i in range(5)] + [delete("s3")]
    clicks = [behaviour(f"s{i % 5}", f"user{i % 11}", T0 + i * 40_000, "view") for i in range(300)]
    clicks += [behaviour("s1", f"burst{i}", T0 + 300 * 40_000 + i * 500) for i in range(40)]
    pm = [InMessage("products", 0, i, e["product_id"].encode(), orjson.dumps(e)) for i, e in enumerate(products)]
    bm = [InMessage("behavior", 0, i, e["product_id"].encode(), orjson.dumps(e)) for i, e in enumerate(clicks)]
    return pm, bm


async def _run(store: StateStore, batch: int, state_cache: int = 0) -> list[bytes]:
    processor = Processor(store, user_hash_key=b"k", state_cache=state_cache)
    pm, bm = _messages()
    emitted = [v for _, v in (await processor.process_products(pm)).updates]
    for i in range(0, len(bm), batch):
        emitted += [v for _, v in (await processor.process_behaviour(bm[i : i + batch])).updates]
    # Redelivering everything changes nothing; the last update of each redelivered offset is sent again.
    resent = (await processor.process_products(pm)).updates + (await processor.process_behaviour(bm)).updates
    assert resent and all(orjson.loads(v)["source"]["offset"] >= 0 for _, v in resent)
    return emitted + [v for _, v in resent]


async def _dump_redis(client: aioredis.Redis, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async for key in client.scan_iter(f"{prefix}:{{*", count=500):
        kind = await client.type(key)
        name = key.removeprefix(prefix)
        if kind == "hash":
            out[name] = await client.hgetall(key)
        elif kind == "string" and key.endswith(":tags"):
            out[name] = orjson.loads(await client.get(key))
        else:
            out[name] = await client.pfcount(key)
    return out


async def _clear(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)


def _dump_memory(store: MemoryStateStore) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, h in store.hashes.items():
        if h and "{" in key:
            out[key.removeprefix(store.prefix)] = h
    for key, s in store.strings.items():
        out[key.removeprefix(store.prefix)] = orjson.loads(s)
    for key, members in store.hlls.items():
        out[key.removeprefix(store.prefix)] = len(members)
    return out


def _strip_times(state: dict[str, Any]) -> dict[str, Any]:
    clean = {}
    for k, v in state.items():
        if k.endswith(":fence"):
            v = {f: (orjson.loads(x) | {"emit_time": 0} if f.startswith("emit:") else x) for f, x in v.items()}
        clean[k] = v
    return clean


def test_redis_and_memory_stores_agree_and_redelivery_is_a_no_op(stack: StackSettings) -> None:
    async def main() -> None:
        prefix = f"st{uuid.uuid4().hex[:8]}"
        client = aioredis.from_url(stack.redis_url, decode_responses=True)
        try:
            redis_store = RedisStateStore(client, prefix)
            await redis_store.check_format()
            memory = MemoryStateStore(prefix)
            from_redis = await _run(redis_store, batch=16, state_cache=3)  # kept states, dropped and read again
            from_memory = await _run(memory, batch=16)
            assert [orjson.loads(u) | {"emit_time": 0} for u in from_redis] == [
                orjson.loads(u) | {"emit_time": 0} for u in from_memory
            ]
            assert any("trending" in orjson.loads(u)["added"] for u in from_redis)
            in_redis, in_memory = _strip_times(await _dump_redis(client, prefix)), _strip_times(_dump_memory(memory))
            assert in_redis.keys() == in_memory.keys()
            # A bucket's HLL key exists exactly when one of its counters does (SPEC §3): stale ones went together.
            hlls = {k for k in in_redis if ":uu:" in k}
            counted_buckets = {
                f"{k.removesuffix(':beh')}:uu:{f.rsplit(':', 1)[0]}"
                for k, v in in_redis.items()
                if k.endswith(":beh")
                for f in v
                if f != "last_ts"
            }
            assert hlls == counted_buckets and any(":uu:m:" in k for k in hlls)
            first = T0 // 300_000  # s0's first 5-minute bucket left the hour long before its last click
            assert f":{{s0}}:uu:m:{first}" not in hlls and f"m:{first}:view" not in in_redis[":{s0}:beh"]
            exact = [k for k in in_redis if ":uu:" not in k]
            assert {k: in_redis[k] for k in exact} == {k: in_memory[k] for k in exact}
            for k in in_redis.keys() - set(exact):  # HyperLogLog estimates against exact counts: within 3%
                assert abs(in_redis[k] - in_memory[k]) <= max(1, 0.03 * in_memory[k]), k
            # A read returns the same state from both stores (the fence's offsets, not its kept updates), and the
            # kept updates are read apart.
            pids = [f"s{i}" for i in range(5)]
            read_redis, read_memory = await redis_store.read(pids), await memory.read(pids)
            assert read_redis == read_memory and read_redis["s1"].fence.keys() == {"products:0", "behavior:0", "rev"}
            assert (
                read_redis["s1"].applied_offset("products:0") == 1
                and read_redis["s1"].applied_offset("behavior:0") == 339
            )
            assert read_redis["s1"].rev > 1
            without = await redis_store.read(pids, counters=False)  # what product changes and re-tags read
            assert without == await memory.read(pids, counters=False) and read_redis["s1"].beh
            assert all(without[p].beh == {} and without[p].tags == read_redis[p].tags for p in pids)
            fences = [(pid, "behavior:0") for pid in pids] + [("s1", "products:0"), ("nobody", "behavior:0")]
            emits_redis, emits_memory = await redis_store.stored_emits(fences), await memory.stored_emits(fences)
            assert emits_redis.keys() == emits_memory.keys() and emits_redis[("nobody", "behavior:0")] is None

            def kept(emits: dict[tuple[str, str], bytes | None]) -> dict[tuple[str, str], Any]:
                return {f: v and orjson.loads(v) | {"emit_time": 0} for f, v in emits.items()}

            assert kept(emits_redis) == kept(emits_memory)
            assert emits_redis[("s1", "behavior:0")] and emits_redis[("s1", "products:0")]
            # Unique users per window, counted alone or with a read, agree with the exact in-memory counts.
            at = {f"s{i}": T0 + 300 * 40_000 + i * 3_600_000 for i in range(5)}
            counted, exact_users = await redis_store.count_users(at), await memory.count_users(at)
            read = await redis_store.read(sorted(at), now=at)
            assert counted == {pid: state.users for pid, state in read.items()}
            assert counted.keys() == exact_users.keys() and any(u["h24"] > 0 for u in exact_users.values())
            for pid, users in counted.items():
                for window, n in users.items():
                    assert abs(n - exact_users[pid][window]) <= max(1, 0.03 * exact_users[pid][window]), (pid, window)
            # With a batch's users not written yet: their union with the stored ones (users stored already count
            # once), and the temporary HyperLogLog is gone again.
            day = [k for k in memory.hlls if k.startswith(f"{prefix}:{{s4}}:uu:d:")]
            stored_users = sorted(set().union(*(memory.hlls[k] for k in day)))[:3]
            batch = {"s4": [{*stored_users, "new-a", "new-b"}] * 3}
            with_batch, exact_with = await redis_store.count_users(at, batch), await memory.count_users(at, batch)
            assert len(stored_users) == 3 and exact_with["s4"]["d7"] == exact_users["s4"]["d7"] + 2
            assert with_batch.keys() == {f"s{i}" for i in range(5)} and with_batch["s0"] == counted["s0"]
            for window, n in with_batch["s4"].items():
                assert abs(n - exact_with["s4"][window]) <= max(1, 0.03 * exact_with["s4"][window]), window
            assert await client.exists(f"{prefix}:{{s4}}:uu:batch") == 0
        finally:
            await _clear(client, prefix)
            await client.aclose()

    asyncio.run(main())


def test_a_worker_refuses_another_state_format(stack: StackSettings) -> None:
    async def main() -> None:
        prefix = f"sf{uuid.uuid4().hex[:8]}"
        client = aioredis.from_url(stack.redis_url, decode_responses=True)
        try:
            await client.hset(f"{prefix}:meta", "state_format", 99)
            with pytest.raises(StateError, match="format 99"):
                await RedisStateStore(client, prefix).check_format()
            await client.hset(f"{prefix}:meta", "state_format", 2)  # format 3 = format 2 + the fence's `rev`
            await RedisStateStore(client, prefix).check_format()
            assert await client.hget(f"{prefix}:meta", "state_format") == str(STATE_FORMAT) == "3"
        finally:
            await client.delete(f"{prefix}:meta")
            await client.aclose()

    asyncio.run(main())


def test_an_earlier_only_index_entry_never_delays_a_products_look(stack: StackSettings) -> None:
    async def main() -> None:
        prefix = f"ix{uuid.uuid4().hex[:8]}"
        client = aioredis.from_url(stack.redis_url, decode_responses=True)
        try:
            for store in (RedisStateStore(client, prefix), MemoryStateStore(prefix)):
                await store.apply_and_index([], {("behavior", 0): {"a": 100, "b": 300}})
                await store.apply_and_index([], {("behavior", 0): {"a": 200, "b": 200, "c": 50}}, earlier_only=True)
                assert await store.due_lists({("behavior", 0): 150}) == {("behavior", 0): ["c", "a"]}
                assert await store.due_lists({("behavior", 0): 250}) == {("behavior", 0): ["c", "a", "b"]}
        finally:
            await client.delete(f"{prefix}:active:behavior:0")
            await client.aclose()

    asyncio.run(main())


def test_a_write_computed_from_an_older_revision_is_refused_whole(stack: StackSettings) -> None:
    async def main() -> None:
        prefix = f"sr{uuid.uuid4().hex[:8]}"
        client = aioredis.from_url(stack.redis_url, decode_responses=True)
        store = RedisStateStore(client, prefix)
        keys = ProductKeys(prefix, "p1")

        def write(offset: int, title: str, expect_rev: int | None) -> Write:
            ops = Ops(keys)
            ops.hset(keys.doc, {"title": title})
            ops.counters(keys.beh)["d:1:view"] = 1
            return Write("p1", "products:0", offset, ops, expect_rev=expect_rev)

        try:
            [first] = await store.apply([write(0, "first", 0)])
            assert first.applied and first.rev == 1
            [second] = await store.apply([write(1, "second", None)])  # no revision asked: applied at any
            assert second.applied and second.rev == 2
            [stale] = await store.apply([write(2, "stale", 1)])
            assert stale.conflict and not stale.applied and stale.rev == 2
            state = (await store.read(["p1"]))["p1"]
            assert state.doc == {"title": "second"} and state.beh == {"d:1:view": 2} and state.rev == 2
            assert state.applied_offset("products:0") == 1  # the refused write left no trace, not even its offset
            # an applied offset computed from an older revision: refused (only a fresh read tells what is new)
            [stale_again] = await store.apply([write(1, "again", 0)])
            assert stale_again.conflict and not stale_again.applied
            [redelivered] = await store.apply([write(1, "again", 2)])  # at the current revision: a no-op
            assert not redelivered.applied and not redelivered.conflict
            [any_rev] = await store.apply([write(1, "again", None)])  # no revision asked: a no-op
            assert not any_rev.applied and not any_rev.conflict
        finally:
            await _clear(client, prefix)
            await store.close()

    asyncio.run(main())


def test_behaviour_keys_expire_and_a_kept_state_whose_counters_expired_is_read_again(stack: StackSettings) -> None:
    day_ms = 86_400_000

    async def main() -> None:
        prefix = f"st{uuid.uuid4().hex[:8]}"
        client = aioredis.from_url(stack.redis_url, decode_responses=True)
        store = RedisStateStore(client, prefix, behaviour_ttl_ms=8 * day_ms)
        processor = Processor(store, user_hash_key=b"k", state_cache=100)
        keys = ProductKeys(prefix, "e1")

        def views(offset: int, n: int, at: int = T0) -> list[InMessage]:
            events = [behaviour("e1", f"u{offset + i}", at + offset * 1000 + i, "view") for i in range(n)]
            return [InMessage("behavior", 0, offset + i, b"e1", orjson.dumps(e)) for i, e in enumerate(events)]

        try:
            await processor.process_products([InMessage("products", 0, 0, b"e1", orjson.dumps(upsert("e1", "t")))])
            await processor.process_behaviour(views(0, 3))
            hlls = [k async for k in client.scan_iter(f"{prefix}:{{e1}}:uu:*")]
            assert len(hlls) == len(GRANULARITIES)
            for key in [keys.beh, *hlls]:  # what behaviour writes expires 8 days after the product's last event
                assert 7 * day_ms < await client.pttl(key) <= 8 * day_ms, key
            for key in (keys.doc, keys.tags, keys.fence):  # the product's tags and fences never do
                assert await client.pttl(key) == -1, key
            # the counters' time to live starts again when the product's clock crosses a 5-minute edge, not at each
            # event (one Redis call per product and edge)
            await client.pexpire(keys.beh, 100_000)
            day_hll = keys.hll("d", T0 // day_ms)
            await client.persist(day_hll)  # as one made before the time to live was turned on
            await processor.process_behaviour(views(3, 1))
            assert 0 < await client.pttl(keys.beh) <= 100_000 and await client.pttl(day_hll) == -1
            await processor.process_behaviour(views(4, 1, at=T0 + 6 * 60_000))
            assert await client.pttl(keys.beh) > 7 * day_ms and await client.pttl(day_hll) > 7 * day_ms

            hlls = [k async for k in client.scan_iter(f"{prefix}:{{e1}}:uu:*")]
            await client.delete(keys.beh, *hlls)  # the product was idle past its time to live: Redis dropped them
            await processor.process_behaviour(views(10, 1, at=T0 + 6 * 60_000))
            stored = (await store.read(["e1"]))["e1"].beh
            assert sum(v for k, v in stored.items() if k.startswith("d:")) == 1  # counted afresh, not on top of 3
            assert processor.conflicts == 1  # the kept state (3 views) was refused and read again
            [kept] = processor.cache.take(["e1"]).values()  # type: ignore[union-attr]
            assert kept.beh == stored  # the worker's kept state is what Redis holds
        finally:
            await _clear(client, prefix)
            await store.close()

    asyncio.run(main())


def test_a_product_only_clicked_leaves_redis_with_its_counters_until_the_catalog_names_it(
    stack: StackSettings,
) -> None:
    day_ms = 86_400_000

    async def main() -> None:
        prefix = f"su{uuid.uuid4().hex[:8]}"
        client = aioredis.from_url(stack.redis_url, decode_responses=True)
        store = RedisStateStore(client, prefix, behaviour_ttl_ms=8 * day_ms)
        processor = Processor(store, user_hash_key=b"k", state_cache=100)
        keys = ProductKeys(prefix, "x1")
        offset = 0

        def clicks(n: int, at: int, spacing: int = 5000) -> list[InMessage]:
            nonlocal offset
            events = [behaviour("x1", f"u{i % 9}", at + i * spacing) for i in range(n)]
            out = [InMessage("behavior", 0, offset + i, b"x1", orjson.dumps(e)) for i, e in enumerate(events)]
            offset += n
            return out

        async def ttls() -> dict[str, int]:
            return {name: await client.pttl(getattr(keys, name)) for name in ("doc", "beh", "tags", "fence")}

        def expiring(found: dict[str, int], *names: str) -> bool:
            return all(7 * day_ms < found[n] <= 8 * day_ms for n in names)

        try:
            # clicks on an id the catalog never sent: its tags and fence expire with its counters
            await processor.process_behaviour(clicks(2, T0))
            found = await ttls()
            assert found["doc"] == -2 and expiring(found, "beh", "tags", "fence"), found
            # a burst turns trending on (the tags are written again: a SET drops a key's time to live)
            await client.pexpire(keys.tags, 100_000)
            await client.pexpire(keys.fence, 100_000)
            out = await processor.process_behaviour(clicks(30, T0 + 60_000))
            assert any("trending" in orjson.loads(v)["added"] for _, v in out.updates)
            assert expiring(await ttls(), "tags", "fence")
            # the window-expiry pass that turns it off two hours of event time later (another product's click): a
            # write that does not renew the counters' time to live; the tags and fence keep theirs, not a fresh one
            await client.pexpire(keys.tags, 100_000)
            await client.pexpire(keys.beh, 7 * day_ms + 3_600_000)  # as an hour after the product's last event
            other = behaviour("x2", "u1", T0 + 3 * 3_600_000)
            out = await processor.process_behaviour([InMessage("behavior", 0, offset, b"x2", orjson.dumps(other))])
            offset += 1
            assert [orjson.loads(v)["reason"] for k, v in out.updates if k == b"x1"] == ["window-expired"]
            found = await ttls()
            # before: tags and fence got a fresh 8 days at the pass and outlived the counters by up to a week
            assert found["beh"] - 1000 <= found["tags"] <= found["beh"], found
            assert found["beh"] - 1000 <= found["fence"] <= found["beh"], found
            # the catalog names it: its tags and fence stay from now on, its counters still expire
            upserted = InMessage("products", 0, 0, b"x1", orjson.dumps(upsert("x1", "Blue shoes")))
            await processor.process_products([upserted])
            found = await ttls()
            assert found["doc"] == found["tags"] == found["fence"] == -1 and expiring(found, "beh"), found
            await processor.process_behaviour(clicks(3, T0 + 4 * 3_600_000))
            found = await ttls()
            assert found["tags"] == found["fence"] == -1 and expiring(found, "beh"), found
            # without a time to live (TAGSTREAM_BEHAVIOUR_TTL_S=0) nothing expires
            forever = Processor(RedisStateStore(client, prefix), user_hash_key=b"k")
            event = behaviour("x3", "u1", T0 + 5 * 3_600_000)
            await forever.process_behaviour([InMessage("behavior", 0, offset, b"x3", orjson.dumps(event))])
            x3 = ProductKeys(prefix, "x3")
            assert [await client.pttl(k) for k in (x3.beh, x3.tags, x3.fence)] == [-1, -1, -1]
        finally:
            await _clear(client, prefix)
            await store.close()

    asyncio.run(main())


def test_the_store_reloads_its_scripts_after_redis_flushed_them(stack: StackSettings) -> None:
    async def main() -> None:
        prefix = f"sl{uuid.uuid4().hex[:8]}"
        store = RedisStateStore.from_url(stack.redis_url, prefix)  # hiredis-packed EVALSHA pipelines
        try:
            await store.check_format()
            processor = Processor(store, user_hash_key=b"k")
            pm, bm = _messages()
            await processor.process_products(pm[:2])
            await store.client.script_flush()  # as after a Redis restart: every EVALSHA now answers NOSCRIPT
            out = await processor.process_behaviour(bm[:40])
            assert out.applied == 40
            states = await store.read(["s0", "s1"])
            assert states["s0"].doc["title"] == "title 0"
            code = GRANULARITIES[0].code
            assert sum(v for k, v in states["s1"].beh.items() if k.startswith(f"{code}:") and k.endswith(":view")) == 8
            assert states["s1"].applied_offset("behavior:0") == 36  # the last of s1's events in the 40
            await store.client.script_flush()  # the unique-user script is reloaded too
            counted = await store.count_users({"s1": int(states["s1"].beh["last_ts"])})
            assert counted["s1"]["h1"] >= 1 and counted["s1"].keys() == {"h1", "h24", "d7"}
            # Redis drops the store's connection (a restart, a proxy timeout): the next batch reconnects.
            [pipeline_client] = await store._pipe.run([("CLIENT", "ID")])
            killer = aioredis.from_url(stack.redis_url)
            try:
                assert await killer.client_kill_filter(_id=pipeline_client) == 1
            finally:
                await killer.aclose()
            again = await processor.process_behaviour(bm[40:60])
            assert again.applied == 20 and (await store.read(["s1"]))["s1"].applied_offset("behavior:0") == 56
            # An error reply (an op the script does not know) raises and leaves the connection usable.
            fence = ProductKeys(prefix, "s1").fence
            reconnected = await store._pipe.run([("CLIENT", "ID")])
            with pytest.raises(ResponseError, match="unknown op"):
                await store._pipe.run([("EVALSHA", store._script.sha, 1, fence, "x:0", 1, "", '[["nope", 1]]', 1, "")])
            assert await store._pipe.run([("CLIENT", "ID")]) == reconnected != [pipeline_client]
            assert (await store.read(["s1"]))["s1"].applied_offset("behavior:0") == 56
        finally:
            await store.close()
            cleaner = aioredis.from_url(stack.redis_url)
            await _clear(cleaner, prefix)
            await cleaner.aclose()

    asyncio.run(main())


def test_concurrent_behaviour_lanes_on_redis_end_as_one_lane(stack: StackSettings) -> None:
    def messages() -> list[InMessage]:
        out = []
        for i in range(800):  # 16 products over 4 partitions; offsets count per partition
            pid, part = f"q{i % 16}", (i % 16) % 4
            out.append(
                InMessage(
                    "behavior", part, i // 4, pid.encode(), orjson.dumps(behaviour(pid, f"u{i % 13}", T0 + i * 3000))
                )
            )
        return out

    async def run(lanes: int, prefix: str, client: aioredis.Redis) -> tuple[list[Any], dict[str, Any]]:
        store = RedisStateStore.from_url(stack.redis_url, prefix)
        try:
            await store.check_format()
            processor = Processor(store, user_hash_key=b"k", behaviour_lanes=lanes, lane_min_events=1)
            batch, sent = messages(), []
            for i in range(0, len(batch), 256):
                out = await processor.process_behaviour(batch[i : i + 256])
                assert out.applied == len(batch[i : i + 256])
                sent += [orjson.loads(v) | {"emit_time": 0} for _, v in out.updates]
            return sorted(sent, key=orjson.dumps), _strip_times(await _dump_redis(client, prefix))
        finally:
            await store.close()

    async def main() -> None:
        client = aioredis.from_url(stack.redis_url, decode_responses=True)
        prefixes = [f"ln{uuid.uuid4().hex[:8]}" for _ in range(2)]
        try:
            one_sent, one_state = await run(1, prefixes[0], client)
            lanes_sent, lanes_state = await run(4, prefixes[1], client)
            assert lanes_sent == one_sent and any("trending" in u["added"] for u in one_sent)
            assert lanes_state == one_state and len(one_state) > 16
        finally:
            for prefix in prefixes:
                await _clear(client, prefix)
            await client.aclose()

    asyncio.run(main())


def test_a_restart_re_sends_the_window_expiries_a_redis_store_recorded(stack: StackSettings) -> None:
    async def main() -> None:
        prefix = f"sw{uuid.uuid4().hex[:8]}"
        store = RedisStateStore.from_url(stack.redis_url, prefix)
        burst = [
            InMessage("behavior", 0, i, b"a", orjson.dumps(behaviour("a", f"u{i % 9}", T0 + i * 5000)))
            for i in range(30)
        ]
        later = [InMessage("behavior", 0, 30, b"b", orjson.dumps(behaviour("b", "y", T0 + 2 * 3_600_000)))]
        try:
            worker = Processor(store, user_hash_key=b"k", state_cache=100)
            await worker.process_behaviour(burst)
            [expired] = [v for k, v in (await worker.process_behaviour(later)).updates if k == b"a"]
            assert orjson.loads(expired)["removed"] == ["trending"]
            assert await store.swept_since({("behavior", 0): 30}) == {("behavior", 0): ["a"]}
            successor = Processor(store, user_hash_key=b"k", state_cache=100)  # the update never reached Kafka
            assert [v for k, v in (await successor.process_behaviour(later)).updates if k == b"a"] == [expired]
            # a partition keeps its swept products for SWEPT_KEEP_OFFSETS offsets behind its newest sweep
            keys = ProductKeys(prefix, "c")
            ops = Ops(keys)
            ops.set(keys.tags, b"{}")
            far = 30 + SWEPT_KEEP_OFFSETS + 1
            await store.apply([Write("c", "sweep:behavior:0", T0, ops, swept_by=far)])
            assert await store.swept_since({("behavior", 0): 0}) == {("behavior", 0): ["c"]}
        finally:
            await _clear(store.client, prefix)
            await store.close()

    asyncio.run(main())


def _start_worker(stream_env: Any) -> subprocess.CompletedProcess[str]:
    """`tagstream worker` with the test's settings, run until it exits (these are refused at start)."""
    return subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "worker"],
        env={**os.environ, **stream_env.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("meta", "named"),
    [
        ({"state_format": "1"}, "state format 1"),
        ({"state_format": "abc"}, "holds state_format 'abc', not a format number (corrupt)"),
        ("a string", "is not tagstream's state hash (WRONGTYPE"),  # the lookup's healthz says "corrupt"
    ],
)
def test_a_worker_on_a_store_of_another_format_refuses_to_start_in_one_line(
    stream_env: Any, meta: dict[str, str] | str, named: str
) -> None:
    client = stream_env.redis()
    key = f"{stream_env.settings.redis_prefix}:meta"
    client.hset(key, mapping=meta) if isinstance(meta, dict) else client.set(key, meta)
    done = _start_worker(stream_env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "crash" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("tagstream worker: error: ") and named in line, line


@pytest.mark.parametrize(
    ("offsets", "named"),
    [
        ("a string", "is not tagstream's offsets hash (WRONGTYPE"),
        ({"x-products:0": "abc"}, "[x-products:0] is 'abc', not an offset and timestamp (corrupt)"),
    ],
)
def test_a_worker_on_a_store_with_corrupt_applied_offsets_refuses_to_start_in_one_line(
    stream_env: Any, offsets: dict[str, str] | str, named: str
) -> None:
    client = stream_env.redis()
    prefix = stream_env.settings.redis_prefix
    client.hset(f"{prefix}:meta", "state_format", 3)
    key = f"{prefix}:offsets"
    client.hset(key, mapping=offsets) if isinstance(offsets, dict) else client.set(key, offsets)
    done = _start_worker(stream_env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"tagstream worker: error: {key}") and named in line, line


def test_an_empty_store_stays_unwritten_when_kafka_does_not_answer_the_start_check(stream_env: Any) -> None:
    from streams.app import check_state_store

    down = stream_env.settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    asyncio.run(check_state_store(down, wait_s=3))
    # the format is not written, so the worker's own check (with Kafka) still finds an empty store and asks Kafka
    assert not stream_env.redis().exists(f"{stream_env.settings.redis_prefix}:meta")


def test_a_group_reset_to_the_earliest_after_retention_is_no_lost_state(stream_env: Any) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.records_to_delete import RecordsToDelete

    from streams.app import committed_input_offsets

    settings = stream_env.settings
    tp = TopicPartition(settings.topic("products"), 0)
    stream_env.produce("products", [upsert(f"k{i}", "t") for i in range(40)])

    async def main() -> tuple[dict[str, int], dict[str, int]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.app_id)
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await consumer.start()
        await admin.start()
        try:
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            await consumer.commit({tp: end})  # a worker applied everything
            consumed = await committed_input_offsets(settings)
            await admin.delete_records({tp: RecordsToDelete(end - 1)})  # retention removed all but the last
            await consumer.commit({tp: end - 1})  # `kafka-consumer-groups.sh --reset-offsets --to-earliest`
            return consumed, await committed_input_offsets(settings)
        finally:
            await admin.close()
            await consumer.stop()

    consumed, after_reset = asyncio.run(main())
    assert list(consumed) == [f"{tp.topic}:0"]  # a lost store would be refused
    assert after_reset == {}  # the remedy the refusal names: the worker replays what is left into the empty store


@pytest.mark.parametrize("kept", [0, 100])
def test_an_old_owners_batch_landing_between_the_new_owners_read_and_write_loses_no_event(
    stack: StackSettings, kept: int
) -> None:
    """After a rebalance the old owner of a partition may still finish its in-flight batch while the new owner
    processes the same offsets and more, from the committed offset: every event is counted once."""

    async def main() -> None:
        prefix = f"st{uuid.uuid4().hex[:8]}"
        old_store, new_store = (RedisStateStore.from_url(stack.redis_url, prefix) for _ in range(2))
        old_owner = Processor(old_store, user_hash_key=b"k", state_cache=kept)
        new_owner = Processor(new_store, user_hash_key=b"k", state_cache=kept)
        events = [behaviour("r1", f"u{i}", T0 + i * 1000, "view") for i in range(10)]
        views = [InMessage("behavior", 0, i, b"r1", orjson.dumps(e)) for i, e in enumerate(events)]
        try:
            await old_owner.process_products([InMessage("products", 0, 0, b"r1", orjson.dumps(upsert("r1", "t")))])
            write = new_store.apply_and_end_batch

            async def old_owner_lands_first(*args: Any, **kwargs: Any) -> Any:
                new_store.apply_and_end_batch = write  # type: ignore[method-assign]  # once
                assert (await old_owner.process_behaviour(views[:5])).applied == 5  # offsets 0..4
                return await write(*args, **kwargs)

            new_store.apply_and_end_batch = old_owner_lands_first  # type: ignore[method-assign]
            out = await new_owner.process_behaviour(views)  # read, then (after the old owner's write) write 0..9
            assert out.applied == 5 and new_owner.conflicts == 1  # offsets 5..9, after a second pass
            state = (await new_store.read(["r1"]))["r1"]
            assert state.applied_offset("behavior:0") == 9
            day_views = sum(v for k, v in state.beh.items() if k.startswith("d:") and k.endswith(":view"))
            assert day_views == 10  # before: 5, and offsets 5..9 were acknowledged, never counted
        finally:
            keys = [k async for k in new_store.client.scan_iter(f"{prefix}:*")]
            if keys:
                await new_store.client.delete(*keys)
            await old_store.close()
            await new_store.close()

    asyncio.run(main())


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_a_worker_refuses_a_redis_that_may_evict_its_keys(stream_env: Any, tmp_path: Path, policy: str) -> None:
    """With an evicting policy, clicks were lost (86 % with volatile-lru) or counted twice, without a warning."""
    server = OwnRedis(tmp_path / "redis")
    server.start("--maxmemory", "64mb", "--maxmemory-policy", policy)
    try:
        stream_env.env["TAGSTREAM_REDIS_URL"] = server.url
        done = _start_worker(stream_env)
    finally:
        server.stop()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert f"Redis may evict tagstream's state (maxmemory-policy is {policy} with maxmemory 67108864" in line
    assert "Set maxmemory-policy noeviction" in line


def test_a_worker_with_a_wrong_redis_password_refuses_to_start_in_one_line(stream_env: Any, tmp_path: Path) -> None:
    """A mistyped password was retried as a network error for ever, worded "Redis did not answer", while the worker
    joined the group and held its partitions' events back, with no ERROR line."""
    server = OwnRedis(tmp_path / "redis")
    server.start("--requirepass", "the-right-one")
    try:
        stream_env.env["TAGSTREAM_REDIS_URL"] = server.url.replace("the-right-one", "a-wrong-one")
        done = _start_worker(stream_env)
    finally:
        server.stop()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("tagstream worker: error: Redis refused tagstream's credentials (") and "wrong" not in line
    assert "set the user and password of TAGSTREAM_REDIS_URL" in line


def test_a_worker_whose_redis_fills_up_stops_naming_it_and_loses_nothing(stream_env: Any, own_redis: OwnRedis) -> None:
    """Redis full (noeviction): the OOM was buried in five tracebacks of "retrying one at a time"."""
    client = own_redis.client()
    env = {"TAGSTREAM_REDIS_URL": own_redis.url}
    worker = stream_env.start_worker(**env)
    client.config_set("maxmemory", 1)  # every write is refused from now on
    stream_env.produce("products", [upsert("full-1", "Levis Men Black Jeans")])
    code = worker.wait_exit(60)
    log = worker.log()
    assert code not in (None, 0), log[-3000:]
    assert "ERROR] Redis is full (command not allowed when used memory > 'maxmemory'." in log
    assert "the worker stops; its batch was not acknowledged" in log
    assert "retrying its messages one at a time" not in log
    client.config_set("maxmemory", 0)
    stream_env.start_worker(**env)  # the batch was not acknowledged: applied now
    deadline = time.monotonic() + 60
    while not client.exists(f"{stream_env.settings.redis_prefix}:{{full-1}}:doc") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.exists(f"{stream_env.settings.redis_prefix}:{{full-1}}:doc")
    stream_env.workers[-1].stop()


def _wait_for_commits(settings: Any, timeout: float = 60) -> dict[str, tuple[str, str]]:
    """The stores the group's commits name, once every input partition's commit names one."""
    deadline = time.monotonic() + timeout
    while True:
        stores = asyncio.run(stores_of_the_group(settings))
        if len(stores) == 2 * settings.partitions or time.monotonic() > deadline:
            return stores
        time.sleep(0.3)


def test_a_worker_given_another_redis_prefix_than_its_group_refuses_to_start_naming_the_groups(
    stream_env: Any,
) -> None:
    """Workers of one group on two prefixes split its state silently: each store got the events of the partitions
    its workers happened to own (a lookup on one answered 404 for 165 of 300 products)."""
    settings, client = stream_env.settings, stream_env.redis()
    stream_env.start_worker()
    pids = [f"split-{i}" for i in range(12)]  # on both partitions
    stream_env.produce("products", [upsert(pid, "Levis Men Black Jeans") for pid in pids])
    stream_env.produce("behavior", [behaviour(pid, "u1", int(time.time() * 1000)) for pid in pids])
    stores = _wait_for_commits(settings)
    store_id = client.hget(f"{settings.redis_prefix}:meta", "store_id")
    assert store_id and set(stores.values()) == {(store_id, settings.redis_prefix)}, stores

    other = f"{settings.redis_prefix}-typo"
    stream_env.env["TAGSTREAM_REDIS_PREFIX"] = other
    try:
        empty = _start_worker(stream_env)  # its prefix holds nothing: looks lost, but the group names its store
        client.hset(f"{other}:meta", "state_format", "3")  # a prefix another deployment wrote
        written = _start_worker(stream_env)
    finally:
        client.delete(*client.scan_iter(f"{other}:*"))
    for done in (empty, written):
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = empty.stderr.strip().splitlines()
    assert f"Redis holds no tagstream state under prefix {other!r}" in line
    assert f"for the store under prefix {settings.redis_prefix!r}: give this worker the TAGSTREAM_REDIS_URL" in line
    [line] = written.stderr.strip().splitlines()
    assert line.startswith(f"tagstream worker: error: consumer group {settings.app_id!r} has committed offsets for ")
    theirs = f"prefix {settings.redis_prefix!r}, store id {store_id}"
    assert f"another Redis store ({theirs}; {settings.topic('behavior')}:0" in line
    assert "start the group again from the earliest offsets" in line
    assert f"than this worker's (prefix {other!r}, store id " in line
    assert int(client.hget(f"{settings.redis_prefix}:{{split-0}}:beh", "last_ts") or 0) > 0  # the group's store ran on


def test_workers_of_one_group_started_together_on_two_redis_prefixes_never_split_it_silently(stream_env: Any) -> None:
    """Started together, neither start can tell: the first commits of the other store stop a worker, after a
    rebalance (before it writes anything of its new partitions) or at the running check every 30 s, so whichever
    runs on has the group's commits all naming its own store."""
    settings, client = stream_env.settings, stream_env.redis()
    other = f"{settings.redis_prefix}-typo"
    workers = [stream_env.start_worker(), stream_env.start_worker(TAGSTREAM_REDIS_PREFIX=other)]
    prefixes = [settings.redis_prefix, other]
    try:
        deadline, stopped_at, round_ = time.monotonic() + 120, None, 0
        # events until one stopped, then past one more running check of the survivor, if any
        while time.monotonic() < deadline and (stopped_at is None or time.monotonic() < stopped_at + 35):
            round_ += 1
            now = int(time.time() * 1000)
            stream_env.produce("behavior", [behaviour(f"both-{i}", f"u{round_}", now) for i in range(12)])
            if stopped_at is None and any(w.proc.poll() is not None for w in workers):
                stopped_at = time.monotonic()
            if all(w.proc.poll() is not None for w in workers):
                break
            time.sleep(1)
        running = [w.proc.poll() is None for w in workers]
        stores = asyncio.run(stores_of_the_group(settings))
        ids = [client.hget(f"{prefix}:meta", "store_id") for prefix in prefixes]
    finally:
        client.delete(*client.scan_iter(f"{other}:*"))
    assert not all(running), "both workers ran on, each on its own store"
    for worker, is_running, prefix, store_id, theirs in zip(
        workers, running, prefixes, ids, reversed(prefixes), strict=True
    ):
        if is_running:  # the group's commits, all of them, name the store it writes: nothing went elsewhere
            assert stores and {named for named, _ in stores.values()} == {store_id}, (prefix, stores)
        else:
            log = worker.log()
            assert f"has committed offsets for another Redis store (prefix {theirs!r}, store id " in log, log[-3000:]


@pytest.mark.parametrize(
    "rules",
    [
        ["~*", "+@all", "-@scripting"],  # may not run the Lua scripts every batch uses
        ["~someone-else:*", "+@all"],  # may not touch the prefix's keys
    ],
)
def test_a_redis_user_without_a_permission_tagstream_needs_refuses_the_worker_in_one_line(
    stream_env: Any, tmp_path: Path, rules: list[str]
) -> None:
    """A user without scripting started, then crashed at its first batch with six tracebacks (a crash loop under a
    supervisor); one whose key pattern missed the prefix crashed with a traceback at start."""
    server = OwnRedis(tmp_path / "redis")
    server.start()
    try:
        server.client().acl_setuser("tagstream", enabled=True, passwords=["+pw"], reset_keys=True, commands=[])
        server.client().execute_command("ACL", "SETUSER", "tagstream", *rules)
        stream_env.env["TAGSTREAM_REDIS_URL"] = f"redis://tagstream:pw@127.0.0.1:{server.port}/0"
        done = _start_worker(stream_env)
    finally:
        server.stop()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("tagstream worker: error: Redis refused a command to tagstream's user (")
    assert "has no permissions to" in line  # what Redis said
    assert "needs read, write and scripting commands" in line
