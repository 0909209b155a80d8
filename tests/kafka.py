"""Test helper: a fresh Kafka topic on the real broker, deleted afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka.admin import AIOKafkaAdminClient, NewTopic


@asynccontextmanager
async def fresh_topic(bootstrap: str, prefix: str, partitions: int = 1) -> AsyncIterator[str]:
    """Create a topic named `<prefix>-<random>` and yield its name; delete it on the way out."""
    topic = f"{prefix}-{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        yield topic
    finally:
        await admin.delete_topics([topic])
        await admin.close()
