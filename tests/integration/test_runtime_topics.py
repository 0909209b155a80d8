"""Topics deleted (and made again) under a running `tagstream worker`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streams.settings import WorkerSettings
from streams.state import RedisStateStore
from streams.topics import ensure_topics
from tests.events import behaviour, upsert
from tests.integration.conftest import StreamEnv
from tests.models import featurized_bundle

pytestmark = pytest.mark.integration

T0 = 1_764_316_800_000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return featurized_bundle(tmp_path_factory.mktemp("registry"))


async def _delete_topic(settings: WorkerSettings, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([name])
        deadline = time.monotonic() + 30
        while name in set(await admin.list_topics()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def _applied(settings: WorkerSettings) -> dict[str, tuple[int, int | None]]:
    store = RedisStateStore.from_url(settings.redis_url.get_secret_value(), settings.redis_prefix)
    try:
        return await store.applied_offsets()
    finally:
        await store.close()


def test_a_running_worker_whose_behaviour_topic_is_made_again_stops_before_applying_its_events(
    make_stream_env: Callable[..., StreamEnv], bundle: Path
) -> None:
    """The operator's case: `behavior` deleted and made again under a running worker, which took the new topic's
    events for redeliveries of the old ones (offsets at or below the fences they left) and applied none of 19,421.
    It now stops with the error a restarted worker refuses with, before applying or acknowledging any of them."""
    se = make_stream_env(TAGSTREAM_METADATA_MAX_AGE_S="2")  # sees the topic go and come back within seconds
    settings = se.settings
    topic = settings.topic("behavior")
    worker = se.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    pids = [f"old-{i}" for i in range(6)]
    se.produce("products", [upsert(pid, "Levis Men Black Jeans") for pid in pids])
    old = [behaviour(pid, f"u{i}", T0 + i * 1000) for i, pid in enumerate(pids)]
    se.produce("behavior", old)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        applied = asyncio.run(_applied(settings))
        if sum(o + 1 for w, (o, _) in applied.items() if w.startswith(f"{topic}:")) == len(old):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the old behaviour events were not applied: {applied}\n{worker.log()[-3000:]}")

    asyncio.run(_delete_topic(settings, topic))
    worker.wait_for_log(f"input topic {topic} was deleted under this running worker", timeout=60)
    assert worker.proc.poll() is None  # a deleted topic alone stops nothing
    asyncio.run(ensure_topics(settings))  # `tagstream topics`
    se.produce("behavior", old + old)  # as many records and more: offsets reach past the old fences

    code = worker.wait_exit(60)
    log = worker.log()
    assert code not in (None, 0), log[-4000:]
    refused = f"Redis holds tagstream state under prefix {settings.redis_prefix!r} applied from records Kafka"
    errors = [line for line in log.splitlines() if f"[ERROR] {refused}" in line]  # then Faust's crash report
    assert len(errors) == 1, log[-4000:]
    assert f"{topic}:" in errors[0] and "start on a new TAGSTREAM_REDIS_PREFIX" in errors[0]
    assert asyncio.run(_applied(settings)) == applied  # nothing of the new topic applied (nor skipped as applied)
    assert "TopicsRecreatedError" in log


def test_a_dead_letter_topic_deleted_under_a_running_worker_is_named_every_10_s_without_a_log_flood(
    stream_env: StreamEnv, bundle: Path
) -> None:
    """A bad event waits for its dead letter's delivery until the topic is made again (nothing lost), but aiokafka
    logged `Topic <name> not found in cluster metadata` ~1,600 times a second meanwhile (14 MB in 80 s)."""
    settings = stream_env.settings
    dead = settings.topic("dead-letter")
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    asyncio.run(_delete_topic(settings, dead))
    stream_env.produce("products", [b"not json at all"])
    time.sleep(12)
    log = worker.log()
    assert worker.proc.poll() is None, log[-3000:]
    named = [line for line in log.splitlines() if dead in line]
    assert 1 <= len(named) <= 3, f"{len(named)} lines: {named[:5]}"
    assert all("`tagstream topics` creates it" in line for line in named), named[:3]
    assert len(log.splitlines()) < 400, log[-3000:]

    asyncio.run(ensure_topics(settings))  # the remedy named: the waiting dead letter is delivered
    letters = stream_env.consume("dead-letter", lambda m: len(m) >= 1, timeout=90)
    assert letters[0]["error_type"] == "EventDecodeError"
