"""`tagstream lookup`: serve the HTTP tag lookup (serving.http) over the Redis tag state."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tagstream.errors import ConfigError
from tagstream.settings import RedisUrl
from tagstream.settings import load_settings as load_tagstream_settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["LookupSettings", "register"]

log = logging.getLogger(__name__)


class LookupSettings(BaseSettings):
    """Settings of `tagstream lookup`, from the environment (`TAGSTREAM_<FIELD>`) or command-line flags."""

    model_config = SettingsConfigDict(env_prefix="TAGSTREAM_", extra="ignore")

    redis_url: RedisUrl = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL of the tag state, which may hold a password (TAGSTREAM_REDIS_URL)",
    )
    redis_prefix: str = Field(
        default="ts", min_length=1, description="key prefix P of the state layout (TAGSTREAM_REDIS_PREFIX)"
    )
    http_host: str = Field(default="127.0.0.1", description="address to listen on (TAGSTREAM_HTTP_HOST)")
    http_port: int = Field(default=8080, ge=1, le=65535, description="port to listen on (TAGSTREAM_HTTP_PORT)")
    redis_max_connections: int = Field(
        default=100,
        ge=1,
        description="most Redis connections of each of the lookup's two clients (tags and /healthz; features); a "
        "request finding them all busy waits for one (TAGSTREAM_REDIS_MAX_CONNECTIONS)",
    )
    http_max_connections: int = Field(
        default=1000,
        ge=1,
        description="most client connections open at once; one more is answered 503 and closed at once (the limit "
        "is lowered to what the process's open-file limit leaves beside the Redis connections) "
        "(TAGSTREAM_HTTP_MAX_CONNECTIONS)",
    )
    http_idle_timeout: float = Field(
        default=15.0,
        gt=0,
        description="seconds a client connection may stay open without a whole request (idle, or sending its "
        "request slowly) before it is closed (TAGSTREAM_HTTP_IDLE_TIMEOUT)",
    )
    redis_pool_timeout: float = Field(
        default=5.0,
        gt=0,
        description="longest wait of a request for a free Redis connection before it answers 503, in seconds "
        "(TAGSTREAM_REDIS_POOL_TIMEOUT)",
    )


def load_settings(**overrides: Any) -> LookupSettings:
    """Settings from the environment, with non-None `overrides` (command-line flags) on top."""
    return load_tagstream_settings(LookupSettings, "lookup", **overrides)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `lookup` to the `tagstream` command."""
    p = subparsers.add_parser(
        "lookup",
        help="serve GET /products/{id}/tags, /products/{id}/features and /healthz over HTTP from Redis",
        description=__doc__,
    )
    p.add_argument("--port", type=int, default=None, help="port (default: TAGSTREAM_HTTP_PORT or 8080)")
    p.add_argument("--host", default=None, help="address (default: TAGSTREAM_HTTP_HOST or 127.0.0.1)")
    p.add_argument("--redis-url", default=None, help="Redis URL (default: TAGSTREAM_REDIS_URL)")
    p.add_argument("--redis-prefix", default=None, help="key prefix (default: TAGSTREAM_REDIS_PREFIX or ts)")
    p.set_defaults(func=run_lookup)


def _redis_client(settings: LookupSettings, **options: Any) -> aioredis.Redis:
    """A `redis.asyncio.Redis` on a pool of at most `redis_max_connections` where a request waits up to
    `redis_pool_timeout` for a free connection (redis-py's default pool fails at once past 100 connections, which
    turned a burst of requests into 503s); `options` as for `from_url` (options in the URL win).

    A pooled connection Redis closed (a restart) is replaced, not used: a command that fails on a connection error
    disconnects it and runs once more on a new one, and the pool checks a connection it hands out (EOF, unread data)
    and reconnects it. A pool built with `from_url` gets neither by itself: its connections have no retry (the
    client's default retry is given only to a pool the client builds), and redis-py skips the check while
    maintenance notifications are on (their default, "auto"; they are for Redis Enterprise / Cloud endpoints). So
    after a restart each pooled connection answered one request 503, up to `redis_max_connections` of them."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.maint_notifications import MaintNotificationsConfig

    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url.get_secret_value(),
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout,
        retry=Retry(NoBackoff(), 1),  # on ConnectionError and TimeoutError: Redis tried twice, at once
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **options,
    )
    return aioredis.Redis.from_pool(pool)


def _connection_limit(settings: LookupSettings) -> int:
    """`http_max_connections`, lowered to what the open-file limit leaves beside both Redis pools (and a margin for
    the process's other files), so that clients never exhaust the descriptors; the soft limit is raised first, as far
    as the hard limit allows (logged when the connections are still lowered)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.http_max_connections
    needed = settings.http_max_connections + 2 * settings.redis_max_connections + 64
    if soft < needed and (hard == resource.RLIM_INFINITY or soft < hard):  # a soft limit of 1024 is common
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-file limit to %d: %s", raised, exc)
    room = max(16, soft - 2 * settings.redis_max_connections - 64)
    if room < settings.http_max_connections:
        log.warning(
            "at most %d client connections (TAGSTREAM_HTTP_MAX_CONNECTIONS is %d, but the open-file limit is %d): "
            "raise the limit (ulimit -n) for more",
            room,
            settings.http_max_connections,
            soft,
        )
    return min(room, settings.http_max_connections)


def _url_address(host: str, port: int) -> str:
    """`host:port` as in a URL: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def run_lookup(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    from aiohttp import web
    from redis.exceptions import RedisError

    from serving.http import (
        FEATURES_TIMEOUT_S,
        PING_TIMEOUT_S,
        STATE_SEEN,
        create_app,
        install_connection_limit,
        install_json_protocol_errors,
        state_format,
    )

    settings = load_settings(
        http_port=args.port, http_host=args.host, redis_url=args.redis_url, redis_prefix=args.redis_prefix
    )
    from streams.features import product_features
    from streams.state import RedisStateStore

    prefix = settings.redis_prefix
    client = _redis_client(settings)
    # The store's options are those of RedisStateStore.from_url, on a bounded pool like the tags client's, which its
    # round trips take their connections from; a request tries Redis twice, not until it answers as a worker does.
    store = RedisStateStore(
        _redis_client(settings, decode_responses=True, health_check_interval=30), prefix, retries=1, pooled=True
    )
    app = create_app(
        client,
        prefix,
        features=lambda pid: product_features(store, pid),
        features_timeout=settings.redis_pool_timeout + FEATURES_TIMEOUT_S,
    )

    async def check_prefix(_: web.Application) -> None:
        try:
            found = await asyncio.wait_for(state_format(client.hget, prefix), PING_TIMEOUT_S)
        except (TimeoutError, OSError, RedisError) as exc:  # /healthz will say so, requests get 503
            if str(exc).startswith("WRONGTYPE"):
                log.error('%s:meta is not a hash (%s): /healthz answers state_format "corrupt"', prefix, exc)
                return
            log.warning("could not read %s:meta from Redis: %s", prefix, str(exc) or type(exc).__name__)
            return
        app[STATE_SEEN].state_format = found  # its loss is told apart from a prefix never written (/healthz)
        if found is None:
            log.warning(
                "no worker has written state under the prefix %s (no %s:meta): every product is 404 until one does; "
                "check TAGSTREAM_REDIS_PREFIX / --redis-prefix",
                prefix,
                prefix,
            )

    async def close_client(_: web.Application) -> None:
        await client.aclose()
        await store.close()

    app.on_startup.append(check_prefix)
    install_json_protocol_errors()  # a request aiohttp cannot parse (a line over 8190 bytes) answers JSON too
    install_connection_limit(_connection_limit(settings))
    app.on_cleanup.append(close_client)
    address = _url_address(settings.http_host, settings.http_port)
    try:  # run_app calls `print` once it listens
        web.run_app(
            app,
            host=settings.http_host,
            port=settings.http_port,
            keepalive_timeout=settings.http_idle_timeout,
            print=lambda _: log.info("tag lookup on http://%s (prefix %s)", address, prefix),
        )
    except OSError as exc:  # only the bind (address in use, not permitted, unknown host) gets out of run_app
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
        raise ConfigError(
            f"cannot listen on {address}: {reason} (choose another --host/--port, TAGSTREAM_HTTP_HOST/_PORT)"
        ) from exc
    return 0
