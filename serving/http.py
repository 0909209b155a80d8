"""HTTP tag lookup: `GET /products/{product_id}/tags` returns a product's current tag state from Redis, and
`GET /products/{product_id}/features` its behaviour windows (counts, unique users, CTR, conversion).

The state is the JSON string at `<prefix>:{<product_id>}:tags` (SPEC §3) written by the worker; the response is that
object with `product_id` added. Stored state the worker would not have written (a value that does not parse, a key
of another type) answers 500 "corrupt ...". `GET /healthz` answers 200 when Redis answers, 503 otherwise; its
`state_format` is the state format the workers wrote under the prefix (`<prefix>:meta`), null when none did,
"corrupt" when that key is not a hash. When `<prefix>:meta` is missing although the workers' state was there (this
lookup read it before, or keys a worker writes after it exist) the state was lost (Redis restarted without its data,
flushed): 503 "state lost". Every answer, errors included, is JSON (`install_json_protocol_errors` makes
aiohttp's own answers to requests it cannot parse JSON too).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import orjson
from aiohttp import web, web_protocol

from schemas.registry import product_id_pattern

__all__ = ["create_app", "install_connection_limit", "install_json_protocol_errors", "state_format", "tags_key"]

log = logging.getLogger(__name__)

PRODUCT_ID_RE = product_id_pattern()  # the event schemas' rule: "p1\n" is no product id
PING_TIMEOUT_S = 2.0
# The longest a features read may take (waiting for a pooled connection, then its round trips) before the answer
# is 503; the lookup adds its pool wait to it.
FEATURES_TIMEOUT_S = 5.0


class TagStore(Protocol):
    """The part of a `redis.asyncio.Redis` client the app uses (`ping` and `hget` are optional)."""

    async def get(self, name: str) -> bytes | str | None: ...


FeatureReader = Callable[[str], Awaitable[dict[str, Any] | None]]
HGet = Callable[[str, str], Awaitable[bytes | str | None]]  # a client's `hget(name, key)`
REDIS = web.AppKey("redis", TagStore)
FEATURES = web.AppKey("features", FeatureReader)
PREFIX = web.AppKey("prefix", str)
FEATURES_TIMEOUT = web.AppKey("features_timeout", float)


@dataclass
class StateSeen:
    """What this lookup knows of the workers' state under its prefix: the state format it last read from
    `<prefix>:meta` (None until it read one), and whether it logged that the state is lost."""

    state_format: int | str | None = None
    lost_logged: bool = False


STATE_SEEN = web.AppKey("state_seen", StateSeen)
_REDIS_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
try:  # redis is a dependency, but the HTTP layer only needs `get`
    from redis.exceptions import RedisError

    _REDIS_ERRORS = (*_REDIS_ERRORS, RedisError)
except ImportError:  # pragma: no cover
    pass


def tags_key(prefix: str, product_id: str) -> str:
    """The Redis key of a product's tag state: `<prefix>:{<product_id>}:tags`."""
    return f"{prefix}:{{{product_id}}}:tags"


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


def _wrong_type(exc: BaseException) -> bool:
    """Redis refused a command because the key holds another type: corrupt data, not a store that is down."""
    return str(exc).startswith("WRONGTYPE")


_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _product_id(request: web.Request) -> str | web.Response:
    """The product id of the path, or the 400 answer for a malformed one (an id percent-encoded from bytes that
    are not UTF-8 included: aiohttp would leave `%FF` as those three characters, naming another product)."""
    raw = request.rel_url.raw_parts[2] if len(request.rel_url.raw_parts) > 2 else ""
    if _BAD_ESCAPE_RE.search(raw):  # `unquote` keeps `%zz` as it is: `/products/%zz` and `/products/%25zz` were one
        return _json({"error": "invalid product id: % not followed by two hex digits", "product_id": raw}, status=400)
    try:
        product_id = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return _json({"error": "invalid product id: not UTF-8", "product_id": raw}, status=400)
    if not PRODUCT_ID_RE.fullmatch(product_id):
        return _json({"error": "invalid product id", "product_id": product_id}, status=400)
    return product_id


def _corrupt(what: str, product_id: str, reason: object) -> web.Response:
    """500 {"error": "corrupt <what>", "product_id": ...}, logged with `reason`."""
    log.error("%s of %s is corrupt: %s", what, product_id, reason)
    return _json({"error": f"corrupt {what}", "product_id": product_id}, status=500)


async def get_tags(request: web.Request) -> web.Response:
    """The product's tag state, 404 when there is none, 400 for a malformed id, 500 when it is corrupt, 503 when Redis
    fails."""
    product_id = _product_id(request)
    if isinstance(product_id, web.Response):
        return product_id
    try:
        raw = await request.app[REDIS].get(tags_key(request.app[PREFIX], product_id))
    except _REDIS_ERRORS as exc:
        if _wrong_type(exc):
            return _corrupt("tag state", product_id, exc)
        log.warning("tag lookup of %s failed: %s", product_id, exc)
        return _json({"error": "tag store unavailable"}, status=503)
    if raw is None:
        return _json({"error": "no tags for this product", "product_id": product_id}, status=404)
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _corrupt("tag state", product_id, "not JSON")
    if not isinstance(state, dict):
        return _corrupt("tag state", product_id, "not a JSON object")
    return _json({"product_id": product_id, **state})


async def get_features(request: web.Request) -> web.Response:
    """The product's behaviour windows, 404 when nothing is known of it, 400 for a malformed id, 500 when its state is
    corrupt, 503 on Redis failure."""
    product_id = _product_id(request)
    if isinstance(product_id, web.Response):
        return product_id
    try:
        features = await asyncio.wait_for(request.app[FEATURES](product_id), request.app[FEATURES_TIMEOUT])
    except ValueError as exc:  # a stored number or JSON value that does not parse
        return _corrupt("product state", product_id, exc)
    except (TimeoutError, *_REDIS_ERRORS) as exc:
        if _wrong_type(exc):
            return _corrupt("product state", product_id, exc)
        log.warning("feature lookup of %s failed: %s", product_id, str(exc) or type(exc).__name__)
        return _json({"error": "state store unavailable"}, status=503)
    if features is None:
        return _json({"error": "nothing known of this product", "product_id": product_id}, status=404)
    return _json(features)


async def state_format(hget: HGet, prefix: str) -> int | str | None:
    """The state format the workers wrote under `prefix` (`<prefix>:meta`, SPEC §3) read with a client's `hget`, None
    when none did (no worker has run with this prefix: a mistyped prefix?). Raises what `hget` raises."""
    found = await hget(f"{prefix}:meta", "state_format")
    text = found.decode(errors="replace") if isinstance(found, bytes) else found
    return int(text) if text is not None and text.isdecimal() else text


async def state_lost(store: Any, prefix: str, seen: StateSeen) -> str | None:
    """Why the workers' state under `prefix` was lost, given that `<prefix>:meta` is missing; None when nothing says
    any was there (no worker has written state under the prefix: a new or mistyped one). Lost: this lookup read a
    state format there before (no round trip), or a key only a worker's batches write, after `<prefix>:meta`, exists
    (`<prefix>:offsets`, `<prefix>:watermark`: one EXISTS, O(1); a store without `exists` is not asked). Product keys
    are not looked for: finding one would take a SCAN of the keyspace. Raises what the store raises."""
    meta = f"{prefix}:meta"
    if seen.state_format is not None:
        return f"{meta} is missing though this lookup read state format {seen.state_format} there"
    exists = getattr(store, "exists", None)
    if exists is not None:
        names = (f"{prefix}:offsets", f"{prefix}:watermark")
        if await exists(*names):
            return f"{meta} is missing while keys a worker writes after it exist ({' or '.join(names)})"
    return None


async def healthz(request: web.Request) -> web.Response:
    """200 {"status": "ok", "state_format": F} when Redis answers the read of F (a store without `hget`: a PING, and
    no F); 503 {"status": "state lost", …} when F is missing though the workers' state was there (`state_lost`);
    else 503 {"status": "unavailable", …}."""
    store, prefix, seen = request.app[REDIS], request.app[PREFIX], request.app[STATE_SEEN]
    hget, ping = getattr(store, "hget", None), getattr(store, "ping", None)
    body: dict[str, Any] = {"status": "ok"}
    lost = None
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            if hget is not None:
                found = body["state_format"] = await state_format(hget, prefix)
                if found is None:
                    lost = await state_lost(store, prefix, seen)
                else:
                    seen.state_format, seen.lost_logged = found, False
            elif ping is not None:
                await ping()
    except (TimeoutError, *_REDIS_ERRORS) as exc:
        if not _wrong_type(exc):
            return _json({"status": "unavailable", "redis": str(exc) or type(exc).__name__}, status=503)
        # Redis answers and lookups work: the meta key is what is wrong (the lookup logs it at start too)
        log.error("%s:meta is not a hash: %s", prefix, exc)
        body["state_format"] = "corrupt"
    if lost is not None:
        reason = (
            f"{lost}: Redis lost the workers' state (restarted without its data, or flushed), and lookups answer "
            "404 for products it held; restore Redis, or rebuild the state (SPEC.md §3)"
        )
        if not seen.lost_logged:
            log.error("tagstream state under prefix %s lost: %s", prefix, reason)
            seen.lost_logged = True
        return _json({"status": "state lost", "state_format": None, "reason": reason}, status=503)
    return _json(body)


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """aiohttp's own answers (no such route, a method not allowed) as JSON like every other answer."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json({"error": exc.reason.lower()}, status=exc.status)
        if allow := exc.headers.get("Allow"):
            response.headers["Allow"] = allow
        return response


def create_app(
    redis_client: TagStore,
    prefix: str = "ts",
    features: FeatureReader | None = None,
    features_timeout: float = FEATURES_TIMEOUT_S,
) -> web.Application:
    """The lookup application over a `redis.asyncio` client (or anything with an async `get`); `features` reads a
    product's behaviour windows (the features route exists only with it), answering 503 past `features_timeout`
    seconds."""
    app = web.Application(middlewares=[json_errors])
    app[REDIS] = redis_client
    app[PREFIX] = prefix
    app[FEATURES_TIMEOUT] = features_timeout
    app[STATE_SEEN] = StateSeen()
    app.router.add_get("/products/{product_id:[^/]+}/tags", get_tags)
    if features is not None:
        app[FEATURES] = features
        app.router.add_get("/products/{product_id:[^/]+}/features", get_features)
    app.router.add_get("/healthz", healthz)
    return app


_plain_handle_error = web_protocol.RequestHandler.handle_error


def _json_handle_error(
    self: web_protocol.RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """aiohttp's answer to a request it could not parse (a request line or header over its 8190-byte limit, a
    malformed request: 400) or to an exception of a handler (500), as JSON: it logs as before and closes the
    connection."""
    _plain_handle_error(self, request, status, exc, message)  # logs; raises when a response was sent already
    try:
        error = HTTPStatus(status).phrase.lower()
    except ValueError:
        error = "error"
    body: dict[str, Any] = {"error": error}
    if status == 400 and message:
        body["reason"] = message[:200]
    response = _json(body, status=status)
    response.force_close()
    return response


def install_json_protocol_errors() -> None:
    """Make aiohttp's answers to requests it cannot parse, and to exceptions of handlers, JSON (they are built by its
    protocol handler, before and outside the application's middlewares). Process-wide: for `tagstream lookup`."""
    web_protocol.RequestHandler.handle_error = _json_handle_error  # type: ignore[method-assign]


_BUSY_BODY = orjson.dumps({"error": "too many connections; try again"})
_BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Cache-Control: no-store\r\nRetry-After: 1\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\n\r\n".encode()
    + _BUSY_BODY
)
_BUSY_LOG_EVERY_S = 10.0


@dataclass
class _ConnectionLimit:
    most: int
    refused: int = 0
    logged_at: float = float("-inf")


def install_connection_limit(most: int) -> None:
    """Answer 503 and close every connection beyond `most` open ones at once, instead of holding it (idle or slow
    clients held one file descriptor each until the process ran out, then aiohttp logged each failed accept; a
    refusal is logged once per 10 s with a count). Process-wide, like `install_json_protocol_errors`."""
    limit = _ConnectionLimit(most)
    made = web_protocol.RequestHandler.connection_made
    accept = getattr(made, "__wrapped__", made)  # installed twice (tests): the limit wraps aiohttp's own

    def connection_made(self: web_protocol.RequestHandler, transport: Any) -> None:
        manager = self._manager
        if manager is not None and len(manager.connections) >= limit.most:
            self._manager = None  # never registered: connection_lost does nothing
            self._force_close = True  # data_received ignores anything the client sends
            transport.write(_BUSY_ANSWER)
            transport.close()
            limit.refused += 1
            if time.monotonic() - limit.logged_at >= _BUSY_LOG_EVERY_S:
                limit.logged_at = time.monotonic()
                log.warning(
                    "%d connections open, the most TAGSTREAM_HTTP_MAX_CONNECTIONS allows: %d refused with 503 so far",
                    limit.most,
                    limit.refused,
                )
            return
        accept(self, transport)

    connection_made.__wrapped__ = accept  # type: ignore[attr-defined]
    web_protocol.RequestHandler.connection_made = connection_made  # type: ignore[method-assign]
