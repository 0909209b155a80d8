"""The topics of tagstream, declared once with their schemas, and their creation on the broker."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A logical topic: its name (before the prefix), the schema of its values and whether it is keyed by product."""

    name: str
    schema: str
    by_product: bool
    max_message_bytes: int | None = None  # the topic's `max.message.bytes` (None: the broker's default)


PRODUCTS = TopicSpec("products", "product-change", by_product=True)
BEHAVIOR = TopicSpec("behavior", "click", by_product=True)
TAG_UPDATES = TopicSpec("tag-updates", "tag-update", by_product=True)
MODEL_UPDATES = TopicSpec("model-updates", "model-update", by_product=False)
# A dead letter carries the bad event's key and value as base64 (4/3 of their size) and must fit whatever an input
# topic accepted (the broker's default message.max.bytes, ~1 MB): so its topic takes records up to 4 MiB.
DEAD_LETTER_MAX_BYTES = 4 * 2**20
DEAD_LETTER = TopicSpec("dead-letter", "dead-letter", by_product=False, max_message_bytes=DEAD_LETTER_MAX_BYTES)
TAG_SHADOW_DIFFS = TopicSpec("tag-shadow-diffs", "shadow-diff", by_product=True)

TOPICS: tuple[TopicSpec, ...] = (PRODUCTS, BEHAVIOR, TAG_UPDATES, MODEL_UPDATES, DEAD_LETTER, TAG_SHADOW_DIFFS)


def partitions_of(spec: TopicSpec, settings: WorkerSettings) -> int:
    """Partition count of a topic: product-keyed topics share one count so a product lands on one partition."""
    return settings.partitions if spec.by_product else 1


async def ensure_topics(settings: WorkerSettings) -> list[str]:
    """Create every missing topic with its partition count; return the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="tagstream-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                settings.topic(spec.name),
                partitions_of(spec, settings),
                1,
                topic_configs={"max.message.bytes": str(spec.max_message_bytes)} if spec.max_message_bytes else None,
            )
            for spec in TOPICS
            if settings.topic(spec.name) not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
            log.info("created topics: %s", ", ".join(t.name for t in wanted))
        return [t.name for t in wanted]
    finally:
        await admin.close()
