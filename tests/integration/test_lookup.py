"""`tagstream lookup` serves a product's current tags and behaviour features from the real Redis state."""

from __future__ import annotations

import asyncio
import json
import os
import socket
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
from tests.integration.conftest import REPO, StreamEnv
from tests.models import featurized_bundle

pytestmark = pytest.mark.integration
T0 = 1_764_316_800_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _start_lookup(stream_env: StreamEnv) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """`tagstream lookup` on a free port with the test's settings, once it answers; its URL and first /healthz."""
    port = _free_port()
    env = {**os.environ, **stream_env.env}
    server = subprocess.Popen([sys.executable, "-m", "tagstream.cli", "lookup", "--port", str(port)], env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            status, health = _get(f"{base}/healthz")
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                server.terminate()
                pytest.fail("lookup server did not start")
            time.sleep(0.2)
    assert status == 200 and health["status"] == "ok"
    return server, base, health


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
            status, features = _get(f"{base}/products/lk-1/features")
            if (status == 200 and features["windows"]["h1"]["purchases"] == 1) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        h1 = features["windows"]["h1"]
        assert (h1["views"], h1["clicks"], h1["purchases"]) == (20, 5, 1)
        assert h1["ctr"] == pytest.approx(5 / 20) and h1["conversion"] == pytest.approx(1 / 20)
        assert h1["unique_users"] == 6  # u0..u5 (HyperLogLog is exact at this size)

        status, tags = _get(f"{base}/products/lk-1/tags")
        assert status == 200 and tags["product_id"] == "lk-1"
        assert "size:32" in {t["tag"] for t in tags["tags"]}
        first = next(u for u in updates if u["product_id"] == "lk-1")
        assert {t["tag"] for t in first["tags"] if t["origin"] != "behaviour"} <= {t["tag"] for t in tags["tags"]}

        assert _get(f"{base}/products/nobody/tags")[0] == 404
        assert _get(f"{base}/products/nobody/features")[0] == 404
    finally:
        server.terminate()
        server.wait(timeout=10)


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
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_corrupt_state_is_a_json_500_naming_the_product(stream_env: StreamEnv) -> None:
    prefix = stream_env.settings.redis_prefix
    redis = stream_env.redis()
    redis.hset(f"{prefix}:{{soon}}:doc", mapping={"first_seen": "soon", "deleted": "0"})  # not a number
    redis.hset(f"{prefix}:{{count}}:beh", mapping={"last_ts": str(T0), "m:5881056:view": "x"})
    redis.hset(f"{prefix}:{{count}}:doc", mapping={"first_seen": "1", "deleted": "0"})
    redis.set(f"{prefix}:{{text}}:tags", "hello")  # not JSON
    redis.hset(f"{prefix}:{{hash}}:tags", "a", "b")  # a hash where the worker writes a string
    redis.set(f"{prefix}:{{string}}:beh", "x")  # a string where the worker writes a hash
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
        ]:
            status, body = _get(f"{base}/products/{product_id}/{route}")  # JSON, or _get raises
            assert (status, body["product_id"], body["error"].split()[0]) == (500, product_id, "corrupt"), route
        assert _get(f"{base}/healthz")[0] == 200
    finally:
        server.terminate()
        server.wait(timeout=10)
