"""Faust's aiokafka transport with two changes: an idempotent acks=all producer, and a cheaper message hand-off.

faust-streaming 0.15.3 hands every fetched message to the agents through
`await self.wait_first(callback(message), self.suspend_flow.wait())`: two tasks and an `asyncio.wait` per message,
so that a callback blocked on a full stream buffer can be abandoned when a rebalance suspends the flow. Almost every
callback finishes without blocking, so `FastConsumer` first runs the callback's coroutine one step inline; only a
callback that really blocks is finished under `wait_first`, as Faust does. On this machine that took a no-op agent
from ~13k to ~16.5k messages/s and cut its CPU per message by about 40% (`bench/RESULTS.md`).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import Service

__all__ = ["TagstreamTransport", "run_inline_first"]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Drive `coro` on from where it yielded `pending` (a future it waits for), forwarding sends and throws."""
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation and errors go to the coroutine, as with `await`
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], pending: Any) -> Any:
    return await _resume(coro, pending)


def run_inline_first(coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any] | None:
    """Run `coro` until it first blocks: None if it finished (its result is dropped, its exception raised), else a
    coroutine that finishes it from there (to be awaited or wrapped in a task)."""
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return _finish(coro, pending)


class FastConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer whose fetch loop runs each message's callback inline until it blocks."""

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by the worker tests
        """`faust.transport.consumer.Consumer._drain_messages` (0.15.3), with `wait_first` only for callbacks that
        block (see the module docstring); gaps, commits and read offsets are handled exactly as there."""
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        yield_every = 100
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = cast(AsyncIterator, getmany(timeout=1.0))
                await self.sleep(0)  # getmany can be called in a loop without ever releasing the event loop
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await asyncio.sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            rest = run_inline_first(callback(message))
                            if rest is not None:
                                await self.wait_first(rest, self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's aiokafka producer with acks=all and idempotence (Faust enables them only in exactly-once mode)."""

    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


class TagstreamTransport(faust_aiokafka.Transport):
    """The aiokafka transport with FastConsumer and IdempotentProducer."""

    Consumer = FastConsumer
    Producer = IdempotentProducer
