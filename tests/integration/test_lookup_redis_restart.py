"""`tagstream lookup` across restarts of its Redis: a Redis answering again serves every request, a Redis that is
down answers 503 at once, and a Redis that came back without its data is reported by /healthz as state lost. Each
test runs a redis-server of its own on a free port (the stack's Redis is never restarted)."""

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

import aiohttp
import pytest
import redis

from tests.integration.conftest import REPO, OwnRedis, free_port, http_get

pytestmark = pytest.mark.integration


def _start_lookup(own_redis: OwnRedis, tmp: Path, **extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`tagstream lookup` over `own_redis` (prefix `ts`) on a free port, once it answers; its URL and log."""
    port = free_port()
    env = {**os.environ, "TAGSTREAM_REDIS_URL": own_redis.url, "TAGSTREAM_REDIS_PREFIX": "ts", **extra}
    log_path = tmp / f"lookup-{port}.log"
    with log_path.open("wb") as log:  # a pipe would fill up and stall the server
        server = subprocess.Popen(
            [sys.executable, "-m", "tagstream.cli", "lookup", "--port", str(port)], env=env, cwd=REPO, stderr=log
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            http_get(f"{base}/healthz")
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
        status, health = http_get(f"{base}/healthz")  # the first answer after the restart
        assert (status, health) == (200, {"status": "ok", "state_format": 3})
        after = asyncio.run(_burst(_urls(base, 150)))
        assert after == Counter({("tags", 200): 150, ("tags", 404): 150, ("features", 200): 150, ("healthz", 200): 150})

        own_redis.stop()  # really unreachable: 503 at once, not after a wait
        for path in ("/products/r-1/tags", "/products/r-1/features", "/healthz"):
            started = time.monotonic()
            status, body = http_get(f"{base}{path}")
            assert status == 503 and time.monotonic() - started < 2.0, (path, body)
        assert http_get(f"{base}/healthz")[1]["status"] == "unavailable"
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
        assert http_get(f"{base}/healthz") == (200, {"status": "ok", "state_format": 3})
        own_redis.stop()
        for stored in own_redis.data_dir.glob("appendonlydir/*"):  # restarted without its append-only file
            stored.unlink()
        own_redis.start()
        status, body = http_get(f"{base}/healthz")
        assert (status, body["status"], body["state_format"]) == (503, "state lost", None)
        assert "ts:meta is missing" in body["reason"]
        assert http_get(f"{base}/products/r-1/tags")[0] == 404  # what the lost state makes lookups answer
    finally:
        _stop(server)

    # A lookup started after the loss knows it from the keys a worker's batches write after ts:meta.
    own_redis.client().hset("ts:offsets", "products:0", f"7:{int(time.time() * 1000)}")
    server, base, _ = _start_lookup(own_redis, tmp_path)
    try:
        status, body = http_get(f"{base}/healthz")
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


def test_connections_beyond_the_limit_get_503_at_once_and_idle_ones_are_closed(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    """Idle or slow clients were held for 75 s each with no bound: 400 of them took every file descriptor (real
    requests timed out) and aiohttp logged 50 MB of failed accepts in 40 s."""
    import socket

    _seed(own_redis.client())
    server, base, log_path = _start_lookup(
        own_redis, tmp_path, TAGSTREAM_HTTP_MAX_CONNECTIONS="4", TAGSTREAM_HTTP_IDLE_TIMEOUT="2"
    )
    port = int(base.rsplit(":", 1)[1])
    idle: list[socket.socket] = []
    try:
        for _ in range(4):  # half a request each, as a slow client sends it
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(b"GET /products/r-1/tags HTTP/1.1\r\nHost: x\r\n")
            idle.append(conn)
        time.sleep(0.3)
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        answer = busy.recv(4096)  # at once: no request needed
        busy.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"application/json" in head, answer
        assert json.loads(body) == {"error": "too many connections; try again"}
        started = time.monotonic()
        for conn in idle:  # closed by the server after the idle timeout, without an answer
            assert conn.recv(4096) == b""
        assert time.monotonic() - started < 10
        assert http_get(f"{base}/products/r-1/tags")[0] == 200  # room again
    finally:
        for conn in idle:
            conn.close()
        _stop(server)
    log = log_path.read_text()
    assert "4 connections open, the most TAGSTREAM_HTTP_MAX_CONNECTIONS allows: 1 refused with 503 so far" in log
