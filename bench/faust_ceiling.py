"""Faust ceiling: the worker's own Faust consumption loop with no work — what tagstream could reach if its
processing were free.

    python -m bench.faust_ceiling        (configured like `tagstream worker`: TAGSTREAM_* environment)

Runs `streams.app.Worker` — its Faust app and transport, agents at concurrency 1, micro-batches, manual
acknowledgements and offset commits — with agents that do nothing with their batches (no Redis, no model, no output).
Between the raw aiokafka passthrough and tagstream, this separates what Faust costs per consumed message from what
tagstream's own work costs. (Forwarding every message through Faust's `Topic.send` as well cost ~94 µs per message
more here, which is why the worker hands its updates to the aiokafka producer directly.)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from types import SimpleNamespace

import faust

from streams.app import BatchSteps, Worker
from streams.eventloop import use_event_loop
from streams.processor import BatchOutput, InMessage
from streams.settings import WorkerSettings
from streams.topics import BEHAVIOR, PRODUCTS, ensure_topics


class CeilingWorker(Worker):
    """A Worker whose agents acknowledge their batches without processing them (no state store, no model)."""

    def _define_agents(self) -> None:
        app, topics = self.app, self.topics

        async def no_products(messages: Sequence[InMessage]) -> SimpleNamespace:
            return SimpleNamespace(product_ids=())  # decodes nothing, holds nothing

        async def nothing(messages: Sequence[InMessage], prepared: object, hold: object) -> BatchOutput:
            return BatchOutput()

        async def steps() -> BatchSteps:
            return nothing, no_products

        @app.agent(topics[PRODUCTS.name], name="ceiling.products", concurrency=1)
        async def products(stream: faust.StreamT) -> None:
            await self._run_batches(stream, steps)

        @app.agent(topics[BEHAVIOR.name], name="ceiling.behavior", concurrency=1)
        async def behavior(stream: faust.StreamT) -> None:
            await self._run_batches(stream, steps)

        self.products_agent = products
        self.behavior_agent = behavior


def main() -> int:
    """Start the ceiling worker (until stopped)."""
    settings = WorkerSettings()
    use_event_loop(settings.event_loop)  # the worker's loop, as `tagstream worker` picks it
    asyncio.run(ensure_topics(settings))
    worker = CeilingWorker(settings)
    faust.Worker(worker.app, loglevel="INFO", quiet=True).execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
