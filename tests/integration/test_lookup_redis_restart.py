"""`tagstream lookup` across restarts of its Redis: a Redis answering again serves every request, a Redis that is
down answers 503 at once, and a Redis that came back without its data is reported by /healthz as state lost. Each
test runs a redis-server of its own on a free port (the stack's Redis is never restarted)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class OwnRedis:
    """A redis-server on a free port with its append-only file in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.port = _free_port()
        self.data_dir = data_dir
        data_dir.mkdir()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client that fails at once when the server is down (redis-py's default retries with backoff)."""
        return redis.Redis(port=self.port, decode_responses=True, retry=Retry(NoBackoff(), 0))

    def start(self) -> None:
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        persist = ["--appendonly", "yes", "--save", "", "--logfile", str(self.data_dir / "redis.log")]
        subprocess.run(["redis-server", *where, *persist, "--daemonize", "yes"], check=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Shut it down (its append-only file kept), once it no longer answers."""
        with contextlib.suppress(redis.ConnectionError):
            self.client().shutdown(nosave=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.client().ping()
            except redis.ConnectionError:
                return
            time.sleep(0.05)
        raise AssertionError("redis-server did not stop")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def _start_lookup(own_redis: OwnRedis, tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`tagstream lookup` over `own_redis` (prefix `ts`) on a free port, once it answers; its URL and log."""
    port = _free_port()
    env = {**os.environ, "TAGSTREAM_REDIS_URL": own_redis.url, "TAGSTREAM_REDIS_PREFIX": "ts"}
    log_path = tmp / f"lookup-{port}.log"
    with log_path.open("wb") as log:  # a pipe would fill up and stall the server
        server = subprocess.Popen(
            [sys.executable, "-m", "tagstream.cli", "lookup", "--port", str(port)], env=env, cwd=REPO, stderr=log
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            _get(f"{base}/healthz")
            return server, base, log_path
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"lookup server did not start: {log_path.read_text(errors='replace')}")
            time.sleep(0.2)


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(timeout=10)


def _seed(client: redis.Redis) -> None:
    """The state a worker leaves: its format, a product's tags and record."""
    client.hset("ts:meta", "state_format", "3")
    client.set("ts:{r-1}:tags", json.dumps({"tags": [], "model_version": None, "updated_at": 1}))
    client.hset("ts:{r-1}:doc", mapping={"first_seen": "1", "deleted": "0"})


async def _burst(urls: list[str]) -> Counter[tuple[str, int]]:
    """GET every URL at once (one connection each); how many answered each status, per path's last part."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str) -> tuple[str, int]:
            async with session.get(url) as resp:
                await resp.read()
                return url.rsplit("/", 1)[-1], resp.status

        return Counter(await asyncio.gather(*(one(u) for u in urls)))


def _urls(base: str, n: int) -> list[str]:
    paths = ["/products/r-1/tags", "/products/r-1/features", "/products/nobody/tags", "/healthz"]
    return [f"{base}{path}" for path in paths for _ in range(n)]


def test_after_a_redis_restart_every_request_is_answered_and_a_redis_down_is_503_at_once(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    # Each pooled connection Redis had closed answered one request 503 "tag store unavailable" (up to
    # TAGSTREAM_REDIS_MAX_CONNECTIONS of them), and /healthz 503 "Connection closed by server.", with Redis back.
    _seed(own_redis.client())
    server, base, log_path = _start_lookup(own_redis, tmp_path)
    try:
        before = asyncio.run(_burst(_urls(base, 150)))  # fills the pools (100 connections each)
        assert before == Counter(
            {("tags", 200): 150, ("tags", 404): 150, ("features", 200): 150, ("healthz", 200): 150}
        )

        own_redis.stop()
        own_redis.start()  # the same data, from its append-only file
        status, health = _get(f"{base}/healthz")  # the first answer after the restart
        assert (status, health) == (200, {"status": "ok", "state_format": 3})
        after = asyncio.run(_burst(_urls(base, 150)))
        assert after == Counter({("tags", 200): 150, ("tags", 404): 150, ("features", 200): 150, ("healthz", 200): 150})

        own_redis.stop()  # really unreachable: 503 at once, not after a wait
        for path in ("/products/r-1/tags", "/products/r-1/features", "/healthz"):
            started = time.monotonic()
            status, body = _get(f"{base}{path}")
            assert status == 503 and time.monotonic() - started < 2.0, (path, body)
        assert _get(f"{base}/healthz")[1]["status"] == "unavailable"
        own_redis.start()
        assert asyncio.run(_burst(_urls(base, 50)))[("tags", 200)] == 50
    finally:
        _stop(server)
    assert "Traceback" not in log_path.read_text(errors="replace")


def test_healthz_reports_the_state_lost_when_redis_comes_back_without_its_data(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    # It answered 200 {"status": "ok", "state_format": null}, which says no worker ever wrote under the prefix.
    _seed(own_redis.client())
    server, base, _ = _start_lookup(own_redis, tmp_path)
    try:
        assert _get(f"{base}/healthz") == (200, {"status": "ok", "state_format": 3})
        own_redis.stop()
        for stored in own_redis.data_dir.glob("appendonlydir/*"):  # restarted without its append-only file
            stored.unlink()
        own_redis.start()
        status, body = _get(f"{base}/healthz")
        assert (status, body["status"], body["state_format"]) == (503, "state lost", None)
        assert "ts:meta is missing" in body["reason"]
        assert _get(f"{base}/products/r-1/tags")[0] == 404  # what the lost state makes lookups answer
    finally:
        _stop(server)

    # A lookup started after the loss knows it from the keys a worker's batches write after ts:meta.
    own_redis.client().hset("ts:offsets", "products:0", f"7:{int(time.time() * 1000)}")
    server, base, _ = _start_lookup(own_redis, tmp_path)
    try:
        status, body = _get(f"{base}/healthz")
        assert (status, body["status"]) == (503, "state lost") and "ts:offsets" in body["reason"]
    finally:
        _stop(server)


def test_a_request_line_over_the_servers_limit_answers_json(own_redis: OwnRedis, tmp_path: Path) -> None:
    # aiohttp answered a request line or header over 8190 bytes with a text/plain 400.
    server, base, _ = _start_lookup(own_redis, tmp_path)
    try:
        for url, headers in [
            (f"{base}/products/{'p' * 9000}/tags", {}),
            (f"{base}/products/p1/tags", {"X-Big": "v" * 9000}),
        ]:
            try:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
                raise AssertionError("not refused")
            except urllib.error.HTTPError as err:
                assert (err.code, err.headers.get_content_type()) == (400, "application/json")
                assert json.loads(err.read())["error"] == "bad request"
    finally:
        _stop(server)
