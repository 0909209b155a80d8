"""`tagstream lookup`: serve the HTTP tag lookup (serving.http) over the Redis tag state."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tagstream.errors import ConfigError
from tagstream.settings import RedisUrl
from tagstream.settings import load_settings as load_tagstream_settings

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


def run_lookup(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import redis.asyncio as aioredis
    from aiohttp import web

    from serving.http import create_app

    settings = load_settings(
        http_port=args.port, http_host=args.host, redis_url=args.redis_url, redis_prefix=args.redis_prefix
    )
    from streams.features import product_features
    from streams.state import RedisStateStore

    redis_url = settings.redis_url.get_secret_value()
    client = aioredis.from_url(redis_url)
    store = RedisStateStore.from_url(redis_url, settings.redis_prefix)
    app = create_app(client, settings.redis_prefix, features=lambda pid: product_features(store, pid))

    async def close_client(_: web.Application) -> None:
        await client.aclose()
        await store.close()

    app.on_cleanup.append(close_client)
    address = f"{settings.http_host}:{settings.http_port}"
    try:  # run_app calls `print` once it listens
        web.run_app(
            app,
            host=settings.http_host,
            port=settings.http_port,
            print=lambda _: log.info("tag lookup on http://%s (prefix %s)", address, settings.redis_prefix),
        )
    except OSError as exc:  # only the bind (address in use, not permitted, unknown host) gets out of run_app
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
        raise ConfigError(
            f"cannot listen on {address}: {reason} (choose another --host/--port, TAGSTREAM_HTTP_HOST/_PORT)"
        ) from exc
    return 0
