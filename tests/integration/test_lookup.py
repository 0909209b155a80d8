"""`tagstream lookup` serves a product's current tags and behaviour features from the real Redis state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.events import behaviour, upsert
from tests.integration.conftest import REPO, StreamEnv, free_port, http_get
from tests.models import featurized_bundle

pytestmark = pytest.mark.integration
T0 = 1_764_316_800_000


def _start_lookup(
    stream_env: StreamEnv, healthy: bool = True, **extra_env: str
) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """`tagstream lookup` on a free port with the test's settings (and `extra_env`; its log piped), once it answers;
    its URL and first /healthz (asserted healthy unless `healthy` is False)."""
    port = free_port()
    env = {**os.environ, **stream_env.env, **extra_env}
    with (stream_env.tmp / f"lookup-{port}.log").open("wb") as log:  # a pipe would fill up and stall the server
        server = subprocess.Popen(
            [sys.executable, "-m", "tagstream.cli", "lookup", "--port", str(port)], env=env, cwd=REPO, stderr=log
        )
    server.log_path = log.name  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            status, health = http_get(f"{base}/healthz", timeout=5)
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                server.terminate()
                pytest.fail("lookup server did not start")
            time.sleep(0.2)
    if healthy:
        assert status == 200 and health["status"] == "ok"
    return server, base, health


def _stop(server: subprocess.Popen[bytes]) -> str:
    """Stop the lookup; its log."""
    server.terminate()
    server.wait(timeout=10)
    return Path(server.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def test_lookup_serves_current_tags_and_features(stream_env: StreamEnv, tmp_path: Path) -> None:
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(featurized_bundle(tmp_path / "reg")))
    stream_env.produce("products", [upsert("lk-1", "Levis Men Black Jeans", attributes={"size": "32"})])
    views = [behaviour("lk-1", f"u{i % 6}", T0 + i * 1000, "view") for i in range(20)]
    clicks = [behaviour("lk-1", f"u{i}", T0 + 30_000 + i, "click") for i in range(5)]
    stream_env.produce("behavior", [*views, *clicks, behaviour("lk-1", "u1", T0 + 40_000, "purchase")])
    updates = stream_env.consume("tag-updates", lambda m: any(u["product_id"] == "lk-1" for u in m))

    server, base, health = _start_lookup(stream_env)
    try:
        assert health["state_format"] == 3  # the worker's store is under this prefix

        # The features reflect every event once the worker has applied them.
        deadline = time.monotonic() + 30
        while True:
            status, features = http_get(f"{base}/products/lk-1/features", timeout=5)
            if (status == 200 and features["windows"]["h1"]["purchases"] == 1) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        h1 = features["windows"]["h1"]
        assert (h1["views"], h1["clicks"], h1["purchases"]) == (20, 5, 1)
        assert h1["ctr"] == pytest.approx(5 / 20) and h1["conversion"] == pytest.approx(1 / 20)
        assert h1["unique_users"] == 6  # u0..u5 (HyperLogLog is exact at this size)

        status, tags = http_get(f"{base}/products/lk-1/tags", timeout=5)
        assert status == 200 and tags["product_id"] == "lk-1"
        assert "size:32" in {t["tag"] for t in tags["tags"]}
        first = next(u for u in updates if u["product_id"] == "lk-1")
        assert {t["tag"] for t in first["tags"] if t["origin"] != "behaviour"} <= {t["tag"] for t in tags["tags"]}

        assert http_get(f"{base}/products/nobody/tags", timeout=5)[0] == 404
        assert http_get(f"{base}/products/nobody/features", timeout=5)[0] == 404
    finally:
        _stop(server)


async def _burst(urls: list[str]) -> Counter[tuple[str, int]]:
    """GET every URL at once (one connection each); how many answered each status, per path."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str) -> tuple[str, int]:
            async with session.get(url) as resp:
                await resp.read()
                return url.rsplit("/", 1)[-1], resp.status

        return Counter(await asyncio.gather(*(one(u) for u in urls)))


def test_a_burst_of_concurrent_requests_is_answered_not_refused(stream_env: StreamEnv) -> None:
    # redis-py's default pool failed at once past 100 connections: 503 "tag store unavailable" and a /healthz saying
    # Redis was down under a burst, with Redis fine.
    prefix = stream_env.settings.redis_prefix
    redis = stream_env.redis()
    redis.set(f"{prefix}:{{burst-1}}:tags", json.dumps({"tags": [], "model_version": None, "updated_at": 1}))
    redis.hset(f"{prefix}:{{burst-1}}:doc", mapping={"first_seen": "1", "deleted": "0"})
    server, base, health = _start_lookup(stream_env)
    try:
        assert health["state_format"] is None  # no worker has run under this prefix
        paths = ["/products/burst-1/tags", "/healthz", "/products/burst-1/features"]
        answers = asyncio.run(_burst([f"{base}{path}" for path in paths for _ in range(200)]))
        assert answers == Counter({("tags", 200): 200, ("healthz", 200): 200, ("features", 200): 200})
        status, features = http_get(f"{base}/products/burst-1/features", timeout=5)
        assert status == 200 and features["as_of"] is None  # no behaviour event yet: no clock (was 0, 1970)
    finally:
        _stop(server)


def test_corrupt_state_is_a_json_500_naming_the_product(stream_env: StreamEnv) -> None:
    prefix = stream_env.settings.redis_prefix
    redis = stream_env.redis()
    redis.hset(f"{prefix}:{{soon}}:doc", mapping={"first_seen": "soon", "deleted": "0"})  # not a number
    redis.hset(f"{prefix}:{{count}}:beh", mapping={"last_ts": str(T0), "m:5881056:view": "x"})
    redis.hset(f"{prefix}:{{count}}:doc", mapping={"first_seen": "1", "deleted": "0"})
    redis.set(f"{prefix}:{{text}}:tags", "hello")  # not JSON
    redis.hset(f"{prefix}:{{hash}}:tags", "a", "b")  # a hash where the worker writes a string
    redis.set(f"{prefix}:{{string}}:beh", "x")  # a string where the worker writes a hash
    for product_id, tags in [("list", "[1]"), ("swept", '{"swept_at": {}}')]:  # JSON, but not what a worker writes
        redis.set(f"{prefix}:{{{product_id}}}:tags", tags)
        redis.hset(f"{prefix}:{{{product_id}}}:doc", mapping={"first_seen": "1", "deleted": "0"})
    server, base, _ = _start_lookup(stream_env)
    try:
        for product_id, route in [
            ("soon", "features"),
            ("count", "features"),
            ("text", "features"),
            ("text", "tags"),
            ("hash", "features"),
            ("hash", "tags"),
            ("string", "features"),
            ("list", "features"),  # these two were a text/plain 500 with a traceback in the log
            ("swept", "features"),
        ]:
            status, body = http_get(f"{base}/products/{product_id}/{route}", timeout=5)  # JSON, or _get raises
            assert (status, body["product_id"], body["error"].split()[0]) == (500, product_id, "corrupt"), route
        assert http_get(f"{base}/healthz", timeout=5)[0] == 200
    finally:
        _stop(server)


def test_features_keep_within_the_connection_limit_and_wait_for_a_connection(stream_env: StreamEnv) -> None:
    # /features used 4 pipeline connections of its own, whatever TAGSTREAM_REDIS_MAX_CONNECTIONS said, and answered
    # 503 once its own wait ran out while Redis was fine.
    prefix = stream_env.settings.redis_prefix
    redis = stream_env.redis()
    redis.hset(f"{prefix}:{{pool-1}}:doc", mapping={"first_seen": "1", "deleted": "0"})
    redis.hset(f"{prefix}:{{pool-1}}:beh", mapping={"last_ts": str(T0), "m:5881056:view": "3"})
    redis.set(f"{prefix}:{{pool-1}}:tags", json.dumps({"tags": [], "model_version": None, "updated_at": 1}))
    name = f"lookup-{prefix}"  # every connection the lookup opens carries it
    url = stream_env.settings.redis_url.get_secret_value()
    server, base, _ = _start_lookup(
        stream_env,
        TAGSTREAM_REDIS_URL=f"{url}{'&' if '?' in url else '?'}client_name={name}",
        TAGSTREAM_REDIS_MAX_CONNECTIONS="2",
        TAGSTREAM_REDIS_POOL_TIMEOUT="30",
    )
    try:
        paths = ["/products/pool-1/features", "/products/pool-1/tags"]
        answers = asyncio.run(_burst([f"{base}{path}" for path in paths for _ in range(150)]))
        assert answers == Counter({("features", 200): 150, ("tags", 200): 150})
        opened = [c for c in redis.client_list() if c.get("name") == name]
        assert 1 <= len(opened) <= 4  # two clients of at most 2 connections each
    finally:
        _stop(server)


def test_with_redis_down_features_answer_503_at_once_naming_the_cause(stream_env: StreamEnv) -> None:
    # The features read retried Redis for 5 s per request, logged 7 warnings, and then said only "TimeoutError".
    server, base, health = _start_lookup(
        stream_env, healthy=False, TAGSTREAM_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"
    )
    try:
        assert health["status"] == "unavailable"
        status, body = http_get(f"{base}/products/p1/features", timeout=5)
        assert status == 503 and body == {"error": "state store unavailable"}
    finally:
        log = _stop(server)
    assert log.count("retrying") <= 1  # one retry at most per request
    failed = [line for line in log.splitlines() if "feature lookup of p1 failed" in line]
    assert len(failed) == 1 and "connecting to 127.0.0.1" in failed[0], log
