"""The worker's check of its consumer group's commits, every 30 s, against a Kafka that accepts connections but never
answers: each check fails at its own request timeout and leaves no connection open in the running loop (a review
counted the server's own ends of the connections as a leak; this measures the client's side alone)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys

from aiokafka.errors import KafkaError

from streams.app import stores_of_the_group
from streams.settings import WorkerSettings


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


_MUTE_KAFKA = """
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
print(server.getsockname()[1], flush=True)
held = []
while True:
    held.append(server.accept()[0])
"""


def test_a_check_cut_short_by_its_timeout_closes_its_kafka_connections() -> None:
    mute = subprocess.Popen([sys.executable, "-c", _MUTE_KAFKA], stdout=subprocess.PIPE, text=True)
    try:
        assert mute.stdout is not None
        port = int(mute.stdout.readline())
        settings = WorkerSettings(kafka_bootstrap=f"127.0.0.1:{port}", app_id="mute-kafka")

        async def checks() -> tuple[int, int]:
            """Descriptors open after 2 checks and after 8 more, in one running loop, the cyclic collector off (as
            in a worker: no loop closes the transports a check leaves behind, and collections are rare)."""
            counts = []
            for n in (2, 8):
                for _ in range(n):
                    with contextlib.suppress(KafkaError, TimeoutError):
                        await asyncio.wait_for(stores_of_the_group(settings, timeout_s=0.3), 10)
                counts.append(_open_descriptors())
            return counts[0], counts[1]

        gc.disable()
        before, after = asyncio.run(checks())
    finally:
        gc.enable()
        mute.kill()
        mute.wait()
    assert after - before <= 1, (before, after)
