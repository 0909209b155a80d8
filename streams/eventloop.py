"""The event loop a tagstream process runs on (`TAGSTREAM_EVENT_LOOP`): CPython's asyncio loop or uvloop."""

from __future__ import annotations

import asyncio
from typing import Literal, get_args

from tagstream.errors import ConfigError

__all__ = ["EVENT_LOOPS", "EventLoop", "use_event_loop"]

EventLoop = Literal["asyncio", "uvloop"]
EVENT_LOOPS: tuple[str, ...] = get_args(EventLoop)


def use_event_loop(kind: str) -> None:
    """Make the event loops this process creates from now on `kind` ones: "asyncio" (CPython's) or "uvloop".

    Call it before Faust (or `asyncio.run`) creates the loop."""
    if kind == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif kind == "asyncio":
        asyncio.set_event_loop_policy(None)
    else:
        raise ConfigError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, not {kind!r}")
