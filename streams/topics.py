"""The topics of tagstream, declared once with their schemas and configs, and their creation on the broker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import for_code

from streams.settings import WorkerSettings
from tagstream.errors import ConfigError

log = logging.getLogger(__name__)

KEEP_FOREVER = -1  # `retention.ms` / `retention.bytes`: no limit
UNKNOWN_TOPIC_OR_PARTITION = 3  # Kafka error code: the broker does not know the topic (yet)
TOPIC_ALREADY_EXISTS = 36  # Kafka error code: another process created the topic meanwhile
DESCRIBE_WAIT_S = 10.0  # how long a topic another process just created may stay unknown to the broker
DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs `config_source` of a config set on the topic itself


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A logical topic: its name (before the prefix), the schema of its values, whether it is keyed by product, and
    the configs tagstream sets on it (None: the broker's default)."""

    name: str
    schema: str
    by_product: bool
    max_message_bytes: int | None = None  # `max.message.bytes`
    cleanup_policy: str | None = None  # `cleanup.policy` ("compact": each key's latest record stays)
    retention_ms: int | None = None  # `retention.ms` (KEEP_FOREVER: no time limit)
    retention_bytes: int | None = None  # `retention.bytes` (KEEP_FOREVER: no size limit)

    @property
    def configs(self) -> dict[str, str]:
        """The topic configs tagstream declares for this topic, as the broker names and spells them."""
        values = {
            "max.message.bytes": self.max_message_bytes,
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": self.retention_ms,
            "retention.bytes": self.retention_bytes,
        }
        return {name: str(value) for name, value in values.items() if value is not None}


# Inputs keep the broker's retention (deleted after `log.retention.hours`).
PRODUCTS = TopicSpec("products", "product-change", by_product=True)
BEHAVIOR = TopicSpec("behavior", "click", by_product=True)
# The record of every product's tags that subscribers bootstrap from: compacted, so each product's latest update
# stays however old it is (every update is keyed by its product id: a record without a key would be refused).
# Its max.message.bytes is declared too (Kafka's default), so that a limit an operator set lower (a valid product's
# update can take hundreds of KB) is raised at the next start instead of refusing updates the worker has applied.
TAG_UPDATES_MAX_MESSAGE_BYTES = 1_048_588
TAG_UPDATES = TopicSpec(
    "tag-updates",
    "tag-update",
    by_product=True,
    cleanup_policy="compact",
    max_message_bytes=TAG_UPDATES_MAX_MESSAGE_BYTES,
)
# The largest tag update a worker sends: the topic's max.message.bytes less room for the record's key and headers.
# A larger one would be refused at every redelivery and stop the worker; its event is dead-lettered.
TAG_UPDATE_MAX_BYTES = 1_000_000
# A worker folds the whole request history at start: every record is kept, in order (not compacted: requests share
# keys, and the fold needs all of them). One partition: Kafka orders records only within a partition, and requests
# are keyed by model name or `tagstream-control`, so with more they would be folded out of order
# (`_check_one_partition`). Declared `delete` (never compacted, whatever the broker's default or an operator's topic).
MODEL_UPDATES = TopicSpec(
    "model-updates",
    "model-update",
    by_product=False,
    cleanup_policy="delete",
    retention_ms=KEEP_FOREVER,
    retention_bytes=KEEP_FOREVER,
)
# A dead letter carries the bad event's key and value as base64 (4/3 of their size) and must fit whatever an input
# topic accepted (the broker's default message.max.bytes, ~1 MB): so its topic takes records up to 4 MiB. Dead
# letters are kept until an operator deletes them: never compacted (letters share keys, and a compacted topic refuses
# the letter of an event that had no key).
DEAD_LETTER_MAX_BYTES = 4 * 2**20
DEAD_LETTER = TopicSpec(
    "dead-letter",
    "dead-letter",
    by_product=False,
    max_message_bytes=DEAD_LETTER_MAX_BYTES,
    cleanup_policy="delete",
    retention_ms=KEEP_FOREVER,
    retention_bytes=KEEP_FOREVER,
)
# Best-effort diagnostics for operators: the broker's retention.
TAG_SHADOW_DIFFS = TopicSpec("tag-shadow-diffs", "shadow-diff", by_product=True)

TOPICS: tuple[TopicSpec, ...] = (PRODUCTS, BEHAVIOR, TAG_UPDATES, MODEL_UPDATES, DEAD_LETTER, TAG_SHADOW_DIFFS)


def partitions_of(spec: TopicSpec, settings: WorkerSettings) -> int:
    """Partition count of a topic: product-keyed topics share one count so a product lands on one partition."""
    return settings.partitions if spec.by_product else 1


def model_updates_partitions_error(topic: str, partitions: int) -> ConfigError:
    """The error for a model-updates topic with other than one partition (a worker refuses to start on it)."""
    return ConfigError(
        f"topic {topic} has {partitions} partitions, but model-updates must have exactly 1 (workers apply its "
        "requests in their order, which Kafka keeps only within a partition): recreate it with 1 partition"
    )


def input_partitions_error(settings: WorkerSettings, counts: Mapping[str, int]) -> ConfigError | None:
    """The error when an existing input topic (its full name → partition count; 0: not made yet) does not have
    `TAGSTREAM_PARTITIONS` partitions, else None. A product's changes and clicks must land on the partitions of one
    number, which one worker owns: its window-expiry passes run on the behavior partition of its products partition,
    and re-tags pick a product's worker by that count (products on partitions behavior lacked kept `new` for ever)."""
    wrong = {name: n for name, n in counts.items() if n and n != settings.partitions}
    if not wrong:
        return None
    have = ", ".join(f"{name} has {n}" for name, n in sorted(wrong.items()))
    return ConfigError(
        f"{have} partitions, but TAGSTREAM_PARTITIONS is {settings.partitions}: the products and behavior topics "
        "must both have TAGSTREAM_PARTITIONS partitions (a product's changes and clicks on partitions of one number); "
        "add partitions to the other topic too (kafka-topics.sh --alter --partitions N) and set "
        "TAGSTREAM_PARTITIONS=N"
    )


async def refuse_if_input_partitions_differ(settings: WorkerSettings, client_id: str = "tagstream-admin") -> None:
    """Raise `input_partitions_error` when the input topics' partition counts differ from TAGSTREAM_PARTITIONS."""
    names = [settings.topic(PRODUCTS.name), settings.topic(BEHAVIOR.name)]
    error = input_partitions_error(settings, await partition_counts(settings.kafka_bootstrap, names, client_id))
    if error is not None:
        raise error


def configs_to_set(declared: Mapping[str, str], entries: Iterable[Sequence[Any]]) -> dict[str, str] | None:
    """The configs to give an existing topic whose DescribeConfigs entries (name, value, read_only, source, …) are
    `entries`: None when it has every declared config set on itself; else its other topic-level configs with the
    declared ones over them (AlterConfigs replaces all of a topic's configs, so those are sent too). A
    `max.message.bytes` set higher than declared is kept."""
    own = {str(e[0]): str(e[1]) for e in entries if e[3] == DYNAMIC_TOPIC_CONFIG}
    wanted = {name: value for name, value in declared.items() if not _higher_limit(name, own.get(name), value)}
    if all(own.get(name) == value for name, value in wanted.items()):
        return None
    return {**own, **wanted}


def _higher_limit(name: str, own: str | None, declared: str) -> bool:
    """A `max.message.bytes` an operator set higher than the declared one: kept (tagstream needs at least its own)."""
    return name == "max.message.bytes" and own is not None and own.isdigit() and int(own) > int(declared)


async def ensure_topics(settings: WorkerSettings) -> list[str]:
    """Create every missing topic with its partition count and configs, set the declared configs on existing topics
    whose values differ (one log line per topic changed); return the names created. A refusal raises its KafkaError;
    an existing model-updates topic with other than one partition, or an existing products or behavior topic with
    other than TAGSTREAM_PARTITIONS, ConfigError, before any topic is created or changed (a model-updates another
    process creates meanwhile is checked once it exists)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="tagstream-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        model_updates = settings.topic(MODEL_UPDATES.name)
        checked = model_updates in existing
        if checked:
            await _check_one_partition(admin, model_updates)
        inputs = [settings.topic(spec.name) for spec in (PRODUCTS, BEHAVIOR) if settings.topic(spec.name) in existing]
        error = input_partitions_error(settings, {name: await partition_count(admin, name) for name in inputs})
        if error is not None:
            raise error
        wanted = [
            _new_topic(settings.topic(spec.name), partitions_of(spec, settings), settings.replication_factor, spec)
            for spec in TOPICS
            if settings.topic(spec.name) not in existing
        ]
        created: list[str] = []
        if wanted:
            response = await admin.create_topics(wanted)
            refused: list[Exception] = []
            for name, code, message, *_ in response.topic_errors:
                if code == TOPIC_ALREADY_EXISTS:
                    existing.add(name)  # created meanwhile by another process: checked below like the others
                elif code:
                    refused.append(for_code(code)(f"creating topic {name}: {message}"))
                else:
                    created.append(name)
            if created:
                log.info("created topics: %s", ", ".join(created))
            if refused:
                raise refused[0]
        if model_updates in existing and not checked:  # created meanwhile by another process
            await _check_one_partition(admin, model_updates)
        await _align_configs(admin, {settings.topic(s.name): s.configs for s in TOPICS if s.configs}, existing)
        return created
    finally:
        await admin.close()


def _new_topic(name: str, partitions: int, replication_factor: int, spec: TopicSpec) -> NewTopic:
    """A CreateTopics entry; replication factor -1 asks for the cluster's `default.replication.factor` (Kafka 2.4+),
    which aiokafka's NewTopic does not accept in its constructor."""
    topic = NewTopic(name, partitions, max(replication_factor, 1), topic_configs=spec.configs or None)
    topic.replication_factor = replication_factor
    return topic


async def _check_one_partition(admin: AIOKafkaAdminClient, name: str) -> None:
    """Raise ConfigError when the existing topic `name` does not have exactly one partition."""
    if (partitions := await partition_count(admin, name)) != 1:
        raise model_updates_partitions_error(name, partitions)


async def partition_count(admin: AIOKafkaAdminClient, name: str) -> int:
    """How many partitions the existing topic `name` has. One another process just created can be unknown to the
    broker for a moment: it is asked again for up to DESCRIBE_WAIT_S."""
    deadline = time.monotonic() + DESCRIBE_WAIT_S
    while True:
        [topic] = await admin.describe_topics([name])
        code = topic["error_code"]
        if code == UNKNOWN_TOPIC_OR_PARTITION and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            continue
        if code:
            raise for_code(code)(f"reading the partitions of topic {name}")
        return len(topic["partitions"])


async def partition_counts(bootstrap: str, names: Iterable[str], client_id: str) -> dict[str, int]:
    """How many partitions each topic has (0 for one the broker does not have), asked by one admin client."""
    from aiokafka.errors import UnknownTopicOrPartitionError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id)
    await admin.start()
    counts = {}
    try:
        for name in sorted(set(names)):
            try:
                counts[name] = await partition_count(admin, name)
            except UnknownTopicOrPartitionError:
                counts[name] = 0
    finally:
        await admin.close()
    return counts


async def _describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, list[Sequence[Any]]]:
    """The DescribeConfigs entries of each topic. One another process just created can be unknown to the broker for
    a moment: it is asked again for up to DESCRIBE_WAIT_S."""
    deadline = time.monotonic() + DESCRIBE_WAIT_S
    entries: dict[str, list[Sequence[Any]]] = {}
    todo = names
    while todo:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in todo])
        todo = []
        for response in responses:
            for code, message, _type, name, found in response.resources:
                if code == UNKNOWN_TOPIC_OR_PARTITION and time.monotonic() < deadline:
                    todo.append(name)
                elif code:
                    raise for_code(code)(f"reading the configs of topic {name}: {message}")
                else:
                    entries[name] = found
        if todo:
            await asyncio.sleep(0.1)
    return entries


async def _align_configs(admin: AIOKafkaAdminClient, declared: dict[str, dict[str, str]], existing: set[str]) -> None:
    """Give each existing topic of `declared` (full name → configs) the declared configs it does not have."""
    names = [name for name in declared if name in existing]
    if not names:
        return
    changes: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for name, entries in (await _describe(admin, names)).items():
        configs = configs_to_set(declared[name], entries)
        if configs is not None:
            changes[name] = (configs, {str(e[0]): str(e[1]) for e in entries})
    if not changes:
        return
    [response] = await admin.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name, configs) for name, (configs, _) in changes.items()]
    )
    for code, message, _type, name in response.resources:
        if code:
            raise for_code(code)(f"changing the configs of topic {name}: {message}")
        configs, before = changes[name]
        shown = (f"{k}={v}" + (f" (was {before.get(k)})" if before.get(k) != v else "") for k, v in configs.items())
        log.warning("changed the configs of topic %s: %s", name, ", ".join(shown))
