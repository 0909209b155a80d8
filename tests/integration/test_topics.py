"""`ensure_topics` (the worker at start, `tagstream topics`) against the real broker: topics keep what SPEC.md §1 says
they keep, topics made before that are brought to it, and a topic the broker refuses is one error line."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.settings import WorkerSettings
from streams.topics import (
    DEAD_LETTER_MAX_BYTES,
    DYNAMIC_TOPIC_CONFIG,
    TAG_UPDATES_MAX_MESSAGE_BYTES,
    TOPICS,
    ensure_topics,
    partitions_of,
)
from tagstream.errors import ConfigError
from tagstream.stack import StackSettings
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

WEEK_MS = str(7 * 24 * 3600 * 1000)  # the broker's retention (log.retention.hours=168)
KEPT = ("cleanup.policy", "retention.ms", "retention.bytes", "max.message.bytes", "segment.ms")


@pytest.fixture
def settings(stack: StackSettings) -> Iterator[WorkerSettings]:
    """Settings with a fresh topic prefix; its topics are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}-"
    yield WorkerSettings(
        kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url, topic_prefix=prefix, partitions=2
    )

    async def delete() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        await admin.start()
        try:
            mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
            if mine:
                await admin.delete_topics(mine)
        finally:
            await admin.close()

    asyncio.run(delete())


async def describe(settings: WorkerSettings) -> dict[str, dict[str, tuple[str, bool]]]:
    """Logical topic → config → (value, set on the topic itself), for the configs of KEPT. A topic just created can be
    unknown to the broker for a moment: asked again for up to 30 s."""
    names = {settings.topic(spec.name): spec.name for spec in TOPICS}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
            if all(r[0] == 0 for r in response.resources) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    out = {}
    for code, message, _type, name, entries in response.resources:
        assert code == 0, (name, code, message)
        out[names[name]] = {e[0]: (e[1], e[3] == DYNAMIC_TOPIC_CONFIG) for e in entries if e[0] in KEPT}
    return out


async def create_and_list(settings: WorkerSettings, new: list[NewTopic]) -> list[str]:
    """Create `new` as an operator would (every creation must succeed); return the topics of this test's prefix."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        if new:
            response = await admin.create_topics(new)
            assert all(code == 0 for _name, code, *_ in response.topic_errors), response
        return sorted(t for t in await admin.list_topics() if t.startswith(settings.topic_prefix))
    finally:
        await admin.close()


def every_topic(settings: WorkerSettings, own: dict[str, dict[str, str]]) -> list[NewTopic]:
    """Every topic with its partition count and only the configs `own` gives it (logical name → configs)."""
    return [
        NewTopic(settings.topic(s.name), partitions_of(s, settings), 1, topic_configs=own.get(s.name)) for s in TOPICS
    ]


def kept(configs: dict[str, tuple[str, bool]]) -> dict[str, str]:
    """What a topic keeps: its cleanup policy and retention."""
    return {k: configs[k][0] for k in ("cleanup.policy", "retention.ms", "retention.bytes")}


def test_new_topics_keep_what_spec_says(settings: WorkerSettings) -> None:
    """model-updates and dead-letter keep every record, tag-updates is compacted, the others keep the broker's week."""
    created = asyncio.run(ensure_topics(settings))
    assert sorted(created) == sorted(settings.topic(spec.name) for spec in TOPICS)
    configs = asyncio.run(describe(settings))
    forever = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
    week = {"cleanup.policy": "delete", "retention.ms": WEEK_MS, "retention.bytes": "-1"}
    assert kept(configs["model-updates"]) == forever
    assert kept(configs["dead-letter"]) == forever
    assert configs["dead-letter"]["max.message.bytes"] == (str(DEAD_LETTER_MAX_BYTES), True)
    assert configs["tag-updates"]["cleanup.policy"] == ("compact", True)
    for name in ("products", "behavior", "tag-shadow-diffs"):  # the broker's defaults, not set on the topic
        assert kept(configs[name]) == week and not any(own for _v, own in configs[name].values()), name
    assert asyncio.run(ensure_topics(settings)) == []  # a second run: nothing to create
    assert asyncio.run(describe(settings)) == configs


def test_two_workers_starting_at_once_each_report_only_the_topics_they_created(settings: WorkerSettings) -> None:
    """Concurrent `ensure_topics` calls (workers started together) both succeed; each topic is created once, with
    its configs."""

    async def both() -> tuple[list[str], list[str]]:
        return await asyncio.gather(ensure_topics(settings), ensure_topics(settings))

    first, second = asyncio.run(both())
    assert sorted(first + second) == sorted(settings.topic(spec.name) for spec in TOPICS)
    configs = asyncio.run(describe(settings))
    assert kept(configs["model-updates"])["retention.ms"] == "-1"
    assert configs["tag-updates"]["cleanup.policy"] == ("compact", True)


def test_topics_made_with_the_old_defaults_are_fixed_and_keep_their_own_configs(
    settings: WorkerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Topics created as before (the broker's defaults; dead-letter with its max.message.bytes, model-updates with an
    operator's segment.ms) get the declared configs and keep their own, one log line per topic changed."""

    own = {
        "dead-letter": {"max.message.bytes": str(DEAD_LETTER_MAX_BYTES)},
        "model-updates": {"segment.ms": "3600000"},
    }
    asyncio.run(create_and_list(settings, every_topic(settings, own)))
    before = asyncio.run(describe(settings))
    assert kept(before["model-updates"])["retention.ms"] == WEEK_MS  # the finding: a restart 7 days on lost the model
    assert before["tag-updates"]["cleanup.policy"][0] == "delete"

    with caplog.at_level(logging.INFO, logger="streams.topics"):
        assert asyncio.run(ensure_topics(settings)) == []
    changed = [r.getMessage() for r in caplog.records if r.name == "streams.topics"]
    assert sorted(line.split(":")[0] for line in changed) == sorted(
        f"changed the configs of topic {settings.topic(name)}"
        for name in ("tag-updates", "model-updates", "dead-letter")
    ), changed
    assert any("retention.ms=-1 (was 604800000)" in line for line in changed), changed

    after = asyncio.run(describe(settings))
    forever = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
    assert kept(after["model-updates"]) == forever
    assert after["model-updates"]["segment.ms"] == ("3600000", True)  # an operator's own config stays
    assert kept(after["dead-letter"]) == forever
    assert after["dead-letter"]["max.message.bytes"] == (str(DEAD_LETTER_MAX_BYTES), True)
    assert after["tag-updates"]["cleanup.policy"] == ("compact", True)
    for name in ("products", "behavior", "tag-shadow-diffs"):
        assert after[name] == before[name], name

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streams.topics"):
        asyncio.run(ensure_topics(settings))  # the next worker start: nothing left to change
    assert [r.getMessage() for r in caplog.records if r.name == "streams.topics"] == []


def test_topics_an_operator_made_compacted_or_with_a_low_limit_get_what_tagstream_needs(
    settings: WorkerSettings,
) -> None:
    """A compacted model-updates loses the activate requests (their answers share the key): restarted workers came up
    with no model. A compacted dead-letter refuses the letter of an event without a key (the worker crash-looped) and
    keeps one letter per key. A tag-updates topic whose limit is below a valid product's update refused it."""

    own = {
        "model-updates": {"cleanup.policy": "compact"},
        "dead-letter": {"cleanup.policy": "compact"},
        "tag-updates": {"cleanup.policy": "compact", "max.message.bytes": "20000"},
    }
    asyncio.run(create_and_list(settings, every_topic(settings, own)))
    assert asyncio.run(ensure_topics(settings)) == []
    after = asyncio.run(describe(settings))
    forever = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
    assert kept(after["model-updates"]) == forever
    assert kept(after["dead-letter"]) == forever
    assert after["tag-updates"]["cleanup.policy"] == ("compact", True)
    assert after["tag-updates"]["max.message.bytes"] == (str(TAG_UPDATES_MAX_MESSAGE_BYTES), True)


def test_a_topic_the_broker_refuses_is_one_error_line_and_nothing_is_reported_created(stack: StackSettings) -> None:
    """`tagstream topics` with a prefix Kafka cannot name a topic with fails in one line naming the topic."""
    env = {**os.environ, "TAGSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "TAGSTREAM_TOPIC_PREFIX": "no spaces-"}
    proc = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "topics"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "created" not in proc.stdout, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert line.startswith("tagstream topics: error: could not create topics") and "no spaces-" in line, line


def test_a_model_updates_topic_with_more_than_one_partition_is_refused_in_one_line(
    settings: WorkerSettings, stack: StackSettings
) -> None:
    """Kafka orders records only within a partition, and requests are keyed by model name or `tagstream-control`: on
    three partitions a restarted worker folded `activate B, activate C, rollback` into C active. `tagstream topics`
    accepted such a topic without a word, and workers started on it."""
    name = settings.topic("model-updates")

    asyncio.run(create_and_list(settings, [NewTopic(name, 3, 1)]))
    expected = (
        f"topic {name} has 3 partitions, but model-updates must have exactly 1 (workers apply its requests in their "
        "order, which Kafka keeps only within a partition): recreate it with 1 partition"
    )
    with pytest.raises(ConfigError) as info:
        asyncio.run(ensure_topics(settings))
    assert str(info.value) == expected
    env = {
        **os.environ,
        "TAGSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "TAGSTREAM_REDIS_URL": stack.redis_url,
        "TAGSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "TAGSTREAM_REDIS_PREFIX": settings.topic_prefix.rstrip("-"),
        "TAGSTREAM_PARTITIONS": "2",
    }
    for command in ("topics", "worker"):
        proc = subprocess.run(
            [sys.executable, "-m", "tagstream.cli", command],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (proc.stdout, proc.stderr)
        [line] = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert line == f"tagstream {command}: error: {expected}"


def test_a_refused_model_updates_topic_leaves_no_other_topic_made(
    settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a 2-partition model-updates already there, `tagstream topics` created the other five topics first and
    only then refused: the error line left a half-made topic set behind."""
    from tagstream.cli import main

    name = settings.topic("model-updates")

    assert asyncio.run(create_and_list(settings, [NewTopic(name, 2, 1)])) == [name]
    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("TAGSTREAM_TOPIC_PREFIX", settings.topic_prefix)
    assert main(["topics"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        f"tagstream topics: error: topic {name} has 2 partitions, but model-updates must have exactly 1 (workers "
        "apply its requests in their order, which Kafka keeps only within a partition): recreate it with 1 partition"
    ]
    assert asyncio.run(create_and_list(settings, [])) == [name]  # nothing else made


def test_input_topics_with_another_partition_count_are_refused_before_anything_is_made(
    settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator's products topic with more partitions than behavior: its products on the extra partitions were
    indexed for window passes on behavior partitions that do not exist, so their `new` tag never expired."""
    from tagstream.cli import main

    products = settings.topic("products")

    assert asyncio.run(create_and_list(settings, [NewTopic(products, 3, 1)])) == [products]
    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("TAGSTREAM_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("TAGSTREAM_PARTITIONS", "2")
    assert main(["topics"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        f"tagstream topics: error: {products} has 3 partitions, but TAGSTREAM_PARTITIONS is 2: the products and "
        "behavior topics must both have TAGSTREAM_PARTITIONS partitions (a product's changes and clicks on partitions "
        "of one number); add partitions to the other topic too (kafka-topics.sh --alter --partitions N) and set "
        "TAGSTREAM_PARTITIONS=N"
    ]
    assert asyncio.run(create_and_list(settings, [])) == [products]  # nothing else made
    monkeypatch.setenv("TAGSTREAM_PARTITIONS", "3")
    assert main(["topics"]) == 0  # the setting the topic has: accepted


def test_topics_are_made_with_the_replication_factor_asked_for(
    settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every topic was made with one replica whatever the cluster's default: on a production cluster tag-updates,
    model-updates and the keep-forever dead letters would each have one copy. The default (-1) takes the cluster's
    `default.replication.factor`; a factor the cluster cannot give is one error line."""
    from tagstream.cli import main

    monkeypatch.setenv("TAGSTREAM_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("TAGSTREAM_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("TAGSTREAM_REPLICATION_FACTOR", "2")  # the local stack has one broker
    assert main(["topics"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("tagstream topics: error: could not create topics") and "replication factor of 2" in line
    monkeypatch.delenv("TAGSTREAM_REPLICATION_FACTOR")
    assert main(["topics"]) == 0
