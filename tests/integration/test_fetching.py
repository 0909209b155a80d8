"""Fetching on the real broker: an idle consumer long-polls instead of fetching every few milliseconds, and the next
record still arrives with the fetch that is waiting for it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams.transport import IdleLongPoll
from tagstream.stack import StackSettings
from tests.kafka import fresh_topic

pytestmark = pytest.mark.integration

BUSY_MIN_BYTES, BUSY_WAIT_MS, IDLE_WAIT_MS = 32_768, 4, 500


class _CountFetches:
    """Counts a fetcher's fetch responses (for the consumer without a long poll)."""

    def __init__(self, fetcher: Any) -> None:
        self.fetches = 0
        self._proc = fetcher._proc_fetch_request
        fetcher._proc_fetch_request = self._proc_fetch_request

    async def _proc_fetch_request(self, *args: Any) -> bool:
        got = await self._proc(*args)
        self.fetches += 1
        return bool(got)


async def _assigned_consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{topic}-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        fetch_min_bytes=BUSY_MIN_BYTES,
        fetch_max_wait_ms=BUSY_WAIT_MS,
    )
    await consumer.start()
    for _ in range(100):  # until the group coordinator assigned the partition
        if consumer.assignment():
            break
        await consumer.getmany(timeout_ms=100)
    assert consumer.assignment()
    return consumer


async def test_an_idle_consumer_long_polls_and_the_next_record_arrives_with_the_waiting_fetch(
    stack: StackSettings,
) -> None:
    bootstrap = stack.kafka_bootstrap
    async with fresh_topic(bootstrap, "fetch-test") as topic:
        plain = await _assigned_consumer(bootstrap, topic)
        polling = await _assigned_consumer(bootstrap, topic)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            counted = _CountFetches(plain._fetcher)
            poll = IdleLongPoll(polling._fetcher, BUSY_MIN_BYTES, BUSY_WAIT_MS, IDLE_WAIT_MS)
            await polling.getmany(timeout_ms=200)  # the first idle answer switches it to long polls
            plain_before, polling_before = counted.fetches, poll.fetches
            # both idle for 1.5 s, side by side
            await asyncio.gather(plain.getmany(timeout_ms=1500), polling.getmany(timeout_ms=1500))
            plain_idle, polling_idle = counted.fetches - plain_before, poll.fetches - polling_before
            assert plain_idle >= 20, plain_idle  # a fetch every BUSY_WAIT_MS (+ a round trip) without the long poll
            assert polling_idle <= 5, polling_idle  # one answer per IDLE_WAIT_MS at most
            assert (polling._fetcher._fetch_min_bytes, polling._fetcher._fetch_max_wait_ms) == (1, IDLE_WAIT_MS)

            # a record sent while the long poll waits is its answer (or the next fetch's), not left for later polls
            before = poll.fetches
            await producer.send_and_wait(topic, b"after-a-pause", key=b"p-1")
            got: list[bytes] = []
            for _ in range(20):
                batches = await polling.getmany(timeout_ms=500)
                got += [r.value for records in batches.values() for r in records]
                if got:
                    break
            assert got == [b"after-a-pause"]
            assert poll.fetches - before <= 2, poll.fetches - before
        finally:
            await producer.stop()
            await plain.stop()
            await polling.stop()
