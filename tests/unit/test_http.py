"""HTTP tag lookup over an in-memory stand-in for the Redis client (the HTTP layer only), and its settings."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from serving.cli import LookupSettings, load_settings, register
from serving.http import FeatureReader, create_app, tags_key
from tagstream.errors import ConfigError

STATE = {
    "tags": [
        {"tag": "category:手机通讯", "group": "category_l1", "score": 0.98, "origin": "model"},
        {"tag": "trending", "group": "behaviour", "score": 1.0, "origin": "behaviour"},
    ],
    "model_version": "20260102T030405Z-8122ca35",
    "behaviour": {"trending": {"on": True, "since": 1764316805123}},
    "updated_at": 1764316805131,
}


class MemoryStore:
    """Stand-in for redis.asyncio.Redis: `get` and `ping` over a dict; `down` makes both fail."""

    def __init__(self, data: dict[str, bytes] | None = None) -> None:
        self.data = data or {}
        self.down = False
        self.asked: list[str] = []

    async def get(self, name: str) -> bytes | None:
        self.asked.append(name)
        if self.down:
            raise ConnectionError("connection refused")
        return self.data.get(name)

    async def ping(self) -> bool:
        if self.down:
            raise ConnectionError("connection refused")
        return True


MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[TestClient] = []

    async def make(
        store: MemoryStore, prefix: str = "ts", features: FeatureReader | None = None, features_timeout: float = 5.0
    ) -> TestClient:
        client = TestClient(TestServer(create_app(store, prefix, features, features_timeout)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


async def test_returns_stored_tags(make_client: MakeClient) -> None:
    store = MemoryStore({"ts:{jd-100231}:tags": json.dumps(STATE).encode()})
    client = await make_client(store)
    resp = await client.get("/products/jd-100231/tags")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert body == {"product_id": "jd-100231", **STATE}


async def test_key_uses_prefix_and_hash_tag(make_client: MakeClient) -> None:
    store = MemoryStore({"other:{p1}:tags": b'{"tags": []}'})
    client = await make_client(store, prefix="other")
    assert (await client.get("/products/p1/tags")).status == 200
    assert store.asked == ["other:{p1}:tags"] == [tags_key("other", "p1")]


async def test_absent_product_is_404(make_client: MakeClient) -> None:
    client = await make_client(MemoryStore())
    resp = await client.get("/products/nope/tags")
    assert resp.status == 404
    assert (await resp.json())["product_id"] == "nope"


BAD_IDS = ["a%7Bb", "a%20b", "x" * 129, "p1%0A", "p1%0D%0A", "p1%0Ax"]  # %0A: a newline, also a final one


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_malformed_product_id_is_400(make_client: MakeClient, bad_id: str) -> None:
    store = MemoryStore()
    client = await make_client(store)
    assert (await client.get(f"/products/{bad_id}/tags")).status == 400
    assert store.asked == []  # never reaches Redis (no key injection across hash tags)


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_malformed_product_id_has_no_features(make_client: MakeClient, bad_id: str) -> None:
    asked: list[str] = []

    async def features(product_id: str) -> dict[str, Any] | None:
        asked.append(product_id)
        return {"product_id": product_id}

    client = await make_client(MemoryStore(), features=features)
    assert (await client.get("/products/p1/features")).status == 200
    assert (await client.get(f"/products/{bad_id}/features")).status == 400
    assert asked == ["p1"]


async def test_store_failure_is_503(make_client: MakeClient) -> None:
    store = MemoryStore({"ts:{p1}:tags": b"{}"})
    store.down = True
    client = await make_client(store)
    assert (await client.get("/products/p1/tags")).status == 503


async def test_a_features_read_that_never_ends_is_503(make_client: MakeClient) -> None:
    async def features(product_id: str) -> dict[str, Any] | None:  # a Redis that never answers
        await asyncio.sleep(3600)
        return None

    client = await make_client(MemoryStore(), features=features, features_timeout=0.2)
    resp = await client.get("/products/p1/features")
    assert resp.status == 503 and (await resp.json())["error"] == "state store unavailable"


async def test_corrupt_state_is_500(make_client: MakeClient) -> None:
    client = await make_client(MemoryStore({"ts:{p1}:tags": b"{not json", "ts:{p2}:tags": b"[1]"}))
    assert (await client.get("/products/p1/tags")).status == 500
    assert (await client.get("/products/p2/tags")).status == 500


async def test_healthz(make_client: MakeClient) -> None:
    store = MemoryStore()
    client = await make_client(store)
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"
    store.down = True
    assert (await client.get("/healthz")).status == 503


WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


async def test_a_key_of_another_type_is_corrupt_not_an_unavailable_store(make_client: MakeClient) -> None:
    from redis.exceptions import ResponseError

    class WrongTypeStore(MemoryStore):
        async def get(self, name: str) -> bytes | None:
            raise ResponseError(WRONGTYPE)

    async def features(product_id: str) -> dict[str, Any] | None:  # read.lua's GET of the tags key
        raise ResponseError(f"{WRONGTYPE} script: 5233, on @user_script:16.")

    client = await make_client(WrongTypeStore(), features=features)
    for route, what in [("tags", "corrupt tag state"), ("features", "corrupt product state")]:
        resp = await client.get(f"/products/p1/{route}")
        assert resp.status == 500 and resp.headers["Content-Type"].startswith("application/json")
        assert await resp.json() == {"error": what, "product_id": "p1"}
    assert (await client.get("/healthz")).status == 200  # Redis itself is fine


@pytest.mark.parametrize(
    "error",
    [ValueError("invalid literal for int() with base 10: 'soon'"), json.JSONDecodeError("Expecting value", "x", 0)],
)
async def test_corrupt_stored_features_are_a_json_500(make_client: MakeClient, error: ValueError) -> None:
    async def features(product_id: str) -> dict[str, Any] | None:  # what the state store raises on such data
        raise error

    client = await make_client(MemoryStore(), features=features)
    resp = await client.get("/products/p1/features")
    assert resp.status == 500 and resp.headers["Content-Type"].startswith("application/json")
    assert await resp.json() == {"error": "corrupt product state", "product_id": "p1"}


class MetaStore(MemoryStore):
    """A MemoryStore with `hget` over `hashes` (what /healthz reads the prefix's state format with)."""

    def __init__(self, hashes: dict[str, dict[str, bytes]]) -> None:
        super().__init__()
        self.hashes = hashes

    async def hget(self, name: str, key: str) -> bytes | None:
        if self.down:
            raise ConnectionError("connection refused")
        return self.hashes.get(name, {}).get(key)


async def test_healthz_says_whether_a_worker_wrote_state_under_the_prefix(make_client: MakeClient) -> None:
    store = MetaStore({"shop:meta": {"state_format": b"3"}})
    found = await (await make_client(store, prefix="shop")).get("/healthz")
    assert found.status == 200 and await found.json() == {"status": "ok", "state_format": 3}
    typo = await (await make_client(store, prefix="shpo")).get("/healthz")  # a mistyped prefix: nothing under it
    assert typo.status == 200 and await typo.json() == {"status": "ok", "state_format": None}
    store.down = True
    assert (await (await make_client(store, prefix="shop")).get("/healthz")).status == 503


async def test_healthz_names_a_meta_key_of_another_type_corrupt_since_redis_answers(make_client: MakeClient) -> None:
    from redis.exceptions import ResponseError

    class WrongMeta(MetaStore):
        async def hget(self, name: str, key: str) -> bytes | None:
            raise ResponseError(WRONGTYPE)

    store = WrongMeta({})
    store.data["ts:{p1}:tags"] = b'{"tags": []}'
    client = await make_client(store)
    resp = await client.get("/healthz")  # was 503 "unavailable", though every lookup works
    assert resp.status == 200 and await resp.json() == {"status": "ok", "state_format": "corrupt"}
    assert (await client.get("/products/p1/tags")).status == 200


class LosableStore(MetaStore):
    """A MetaStore with `exists` over its hashes and strings (what /healthz asks when `<prefix>:meta` is missing)."""

    async def exists(self, *names: str) -> int:
        return sum(name in self.hashes or name in self.data for name in names)


async def test_healthz_reports_the_state_lost_when_meta_vanishes_under_the_lookup(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis restarted without its data under a running system: /healthz said 200 {"state_format": null}, as for a
    # prefix no worker ever wrote, while every lookup answered 404.
    store = LosableStore({"ts:meta": {"state_format": b"3"}})
    client = await make_client(store)
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok", "state_format": 3}
    store.hashes.clear()  # the loss
    with caplog.at_level("ERROR", logger="serving.http"):
        for _ in range(2):
            resp = await client.get("/healthz")
            body = await resp.json()
            assert resp.status == 503 and (body["status"], body["state_format"]) == ("state lost", None)
            assert "ts:meta is missing though this lookup read state format 3 there" in body["reason"]
    assert caplog.text.count("state under prefix ts lost") == 1  # logged once, not at every probe
    store.hashes["ts:meta"] = {"state_format": b"3"}  # rebuilt by a worker
    assert (await client.get("/healthz")).status == 200


async def test_healthz_reports_the_state_lost_when_worker_keys_exist_without_meta(make_client: MakeClient) -> None:
    # A lookup started after the loss: the keys a worker writes after <prefix>:meta are there again (its batches).
    store = LosableStore({"shop:offsets": {"products:0": b"7:1764316805123"}})
    resp = await (await make_client(store, prefix="shop")).get("/healthz")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "state lost"
    assert "shop:meta is missing while keys a worker writes after it exist" in body["reason"]
    typo = await (await make_client(store, prefix="shpo")).get("/healthz")  # nothing under it: not lost
    assert typo.status == 200 and await typo.json() == {"status": "ok", "state_format": None}
    store.down = True
    resp = await (await make_client(store, prefix="shop")).get("/healthz")
    assert resp.status == 503 and (await resp.json())["status"] == "unavailable"


async def _raw_request(client: TestClient, request: bytes) -> tuple[int, str, bytes]:
    """Send `request` as it is; the answer's status, content type and body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()  # the server closes the connection after an error
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


async def test_a_request_line_or_header_over_aiohttps_limit_answers_json(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp answers a request it cannot parse itself, before the app's middlewares: that was a text/plain 400.
    from aiohttp import web_protocol

    monkeypatch.setattr(web_protocol.RequestHandler, "handle_error", web_protocol.RequestHandler.handle_error)
    _run_lookup(monkeypatch, "127.0.0.1")  # `tagstream lookup` installs the JSON answers
    client = await make_client(MemoryStore({"ts:{p1}:tags": b'{"tags": []}'}))
    long_path = b"/products/" + b"p" * 9000 + b"/tags"
    for request in (
        b"GET " + long_path + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /products/p1/tags HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
    ):
        status, content_type, body = await _raw_request(client, request)
        assert (status, content_type.split(";")[0]) == (400, "application/json"), request[:40]
        assert json.loads(body)["error"] == "bad request"
    assert (await client.get("/products/p1/tags")).status == 200


async def test_an_id_percent_encoded_from_bytes_that_are_not_utf8_is_400_not_another_product(
    make_client: MakeClient,
) -> None:
    asked: list[str] = []

    async def features(product_id: str) -> dict[str, Any] | None:
        asked.append(product_id)
        return {"product_id": product_id}

    store = MemoryStore({"ts:{%FF}:tags": b'{"tags": []}', "ts:{\u00e9}:tags": b'{"tags": []}'})
    client = await make_client(store, features=features)
    for route in ("tags", "features"):  # aiohttp leaves %FF as those three characters: the product "%FF"
        resp = await client.get(f"/products/%FF/{route}")
        body = await resp.json()
        assert resp.status == 400 and body == {"error": "invalid product id: not UTF-8", "product_id": "%FF"}
    assert store.asked == [] and asked == []
    assert (await client.get("/products/%25FF/tags")).status == 200  # the id "%FF", written as it should be
    assert (await client.get("/products/%C3%A9/tags")).status == 200  # é in UTF-8
    assert store.asked == ["ts:{%FF}:tags", "ts:{\u00e9}:tags"]


@pytest.mark.parametrize("raw_id", ["%zz", "p%", "p%4", "%%41"])
async def test_a_percent_sign_not_followed_by_two_hex_digits_is_400_not_a_literal_id(
    make_client: MakeClient, raw_id: str
) -> None:
    """`%zz` was taken as the id `%zz` as it is, so `/products/%zz` and `/products/%25zz` named one product."""
    client = await make_client(MemoryStore({"ts:{%zz}:tags": b'{"tags": []}'}))
    request = f"GET /products/{raw_id}/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, _, body = await _raw_request(client, request)
    assert status == 400 and json.loads(body)["error"] == "invalid product id: % not followed by two hex digits"
    assert (await client.get("/products/%25zz/tags")).status == 200  # the id `%zz`, written as it must be


async def test_unknown_routes_and_methods_answer_json(make_client: MakeClient) -> None:
    client = await make_client(MemoryStore({"ts:{p1}:tags": b'{"tags": []}'}))
    for path in ("/nope", "/products/p1/tags/", "/products/p1"):
        resp = await client.get(path)
        assert (resp.status, resp.headers["Content-Type"].split(";")[0]) == (404, "application/json"), path
        assert await resp.json() == {"error": "not found"}
    resp = await client.post("/products/p1/tags")
    assert resp.status == 405 and await resp.json() == {"error": "method not allowed"}
    assert "GET" in resp.headers["Allow"]


# ------------------------------------------------------------------------------------------------ settings, command


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGSTREAM_HTTP_PORT", "9001")
    monkeypatch.setenv("TAGSTREAM_REDIS_PREFIX", "shop")
    s = load_settings()
    assert (s.http_port, s.redis_prefix, s.http_host) == (9001, "shop", "127.0.0.1")
    assert load_settings(http_port=8081).http_port == 8081  # a flag beats the environment


def test_bad_settings_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGSTREAM_HTTP_PORT", "70000")
    with pytest.raises(ConfigError, match="http_port"):
        load_settings()


def test_the_redis_url_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGSTREAM_REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0")
    s = load_settings()
    assert "hunter2" not in repr(s) and s.redis_url.get_secret_value().endswith("@127.0.0.1:6379/0")


def test_the_redis_pool_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.redis_max_connections, s.redis_pool_timeout) == (100, 5.0)
    monkeypatch.setenv("TAGSTREAM_REDIS_MAX_CONNECTIONS", "0")
    with pytest.raises(ConfigError, match="redis_max_connections"):
        load_settings()


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        ("socket_timeout=-1", "socket_timeout must be more than 0"),  # every command failed: "Timeout writing"
        ("socket_timeout=0", "socket_timeout must be more than 0"),
        ("socket_connect_timeout=0", "socket_connect_timeout must be more than 0"),
        ("timeout=0", "timeout must be more than 0"),  # the pool's: it overrode TAGSTREAM_REDIS_POOL_TIMEOUT
        ("max_connections=0", "max_connections must be 1 or more"),
        ("health_check_interval=-1", "health_check_interval must be 0 or more"),
    ],
)
def test_a_redis_url_option_out_of_range_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, option: str, problem: str
) -> None:
    monkeypatch.setenv("TAGSTREAM_REDIS_URL", f"redis://:hunter2@127.0.0.1:6379/0?{option}")
    with pytest.raises(ConfigError, match=problem) as err:
        load_settings()
    assert "hunter2" not in str(err.value)
    monkeypatch.setenv("TAGSTREAM_REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=2.5&health_check_interval=0")
    assert load_settings().redis_url.get_secret_value().endswith("socket_timeout=2.5&health_check_interval=0")


def test_the_worker_refuses_the_empty_prefix_the_lookup_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.settings import WorkerSettings
    from tagstream.settings import load_settings as load_service_settings

    monkeypatch.setenv("TAGSTREAM_REDIS_PREFIX", "")
    with pytest.raises(ConfigError, match="redis_prefix"):
        load_settings()
    with pytest.raises(ConfigError, match="redis_prefix"):  # it wrote ":{p}:tags", which the lookup cannot serve
        load_service_settings(WorkerSettings, "worker")


def _run_lookup(monkeypatch: pytest.MonkeyPatch, host: str, fail: OSError | None = None) -> list[Any]:
    """`tagstream lookup --host HOST --port 8081` with aiohttp's run_app replaced: it reports listening (or raises
    `fail`) and returns; the apps it was given."""
    from aiohttp import web, web_protocol

    apps: list[Any] = []
    # run_lookup makes aiohttp's own error answers JSON, process-wide: undone after the test
    monkeypatch.setattr(web_protocol.RequestHandler, "handle_error", web_protocol.RequestHandler.handle_error)

    def run_app(app: web.Application, *, print: Callable[[str], None], **kwargs: Any) -> None:
        apps.append(app)
        if fail is not None:
            raise fail
        print("listening")

    monkeypatch.setattr(web, "run_app", run_app)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args: Any = parser.parse_args(["lookup", "--host", host, "--port", "8081"])
    assert args.func(args) == 0
    return apps


def test_an_ipv6_listen_address_is_in_brackets(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    with caplog.at_level("INFO", logger="serving.cli"):
        _run_lookup(monkeypatch, "::1")
    assert "tag lookup on http://[::1]:8081 (prefix ts)" in caplog.text
    with pytest.raises(ConfigError, match=r"cannot listen on \[::1\]:8081: "):
        _run_lookup(monkeypatch, "::1", OSError(errno.EADDRINUSE, "in use"))


def test_the_lookup_waits_for_a_redis_connection_instead_of_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.asyncio as aioredis

    from serving.http import REDIS

    monkeypatch.setenv("TAGSTREAM_REDIS_MAX_CONNECTIONS", "7")
    monkeypatch.setenv("TAGSTREAM_REDIS_POOL_TIMEOUT", "1.5")
    (app,) = _run_lookup(monkeypatch, "127.0.0.1")
    pool = app[REDIS].connection_pool  # redis-py's default pool raised "Too many connections" past 100
    assert isinstance(pool, aioredis.BlockingConnectionPool) and (pool.max_connections, pool.timeout) == (7, 1.5)


def test_lookup_command_registered() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args: Any = parser.parse_args(["lookup", "--port", "8081"])
    assert args.port == 8081 and callable(args.func)
    assert {"redis_url", "redis_prefix", "http_port"} <= set(LookupSettings.model_fields)
