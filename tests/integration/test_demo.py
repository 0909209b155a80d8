"""The README's first command works: `tagstream demo` on a generated catalog, end to end, and it leaves nothing
of its run on the stack (topics, Redis keys, consumer group, Faust directory) unless `--keep`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from kafka.admin import KafkaAdminClient

from streams.settings import WorkerSettings
from streams.topics import TOPICS, ensure_topics
from tagstream.demo import cleanup_run
from tagstream.stack import StackSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _topics(bootstrap: str, prefix: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.startswith(prefix))
    finally:
        await admin.close()


def _groups(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {g["group_id"] if isinstance(g, dict) else g[0] for g in admin.list_groups()}
    finally:
        admin.close()


def _assert_gone(stack: StackSettings, run: dict[str, str]) -> None:
    """The run's topics (deleted asynchronously by the broker), keys, group and Faust directory are gone."""
    deadline = time.monotonic() + 30
    while (left := asyncio.run(_topics(stack.kafka_bootstrap, run["topic_prefix"]))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
    client = redis.Redis.from_url(stack.redis_url)
    assert list(client.scan_iter(match=f"{run['redis_prefix']}:*", count=1000)) == []
    client.close()
    assert run["consumer_group"] not in _groups(stack.kafka_bootstrap)
    assert not Path(run["faust_dir"]).exists()


def test_demo_trains_replays_reports_its_summary_and_cleans_up(stack: StackSettings, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tagstream.cli", "demo", "--products", "400", "--events", "4000"]
    cmd += ["--rate", "2000", "--epochs", "4", "--no-live", "--workdir", str(tmp_path)]
    env = {**os.environ, "TAGSTREAM_DATA_DIR": str(tmp_path / "faust")}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["products_in"] == 400 and summary["bad_events_in"] == 3
    assert summary["behaviour_in"] == 4000 + 3 * 120  # --events counts the background; the bursts come on top
    assert summary["dead_lettered"] == 3
    # Every product gets its first tags, behaviour adds more; each update's latency was measured.
    assert summary["reasons"]["product-upsert"] == 400
    assert summary["reasons"].get("behaviour", 0) > 0
    assert summary["latency_ms"]["n"] >= 400 and summary["latency_ms"]["p50"] > 0
    assert "demo summary" in run.stdout and "p99" in run.stdout
    assert (tmp_path / "models" / summary["model_version"] / "model.onnx").is_file()
    # The run is gone from the stack; the workdir (model, worker log, summary) stays.
    assert summary["run"]["kept"] is False and "could not delete" not in run.stdout
    assert summary["run"]["faust_dir"] == str(tmp_path / "faust" / summary["run"]["consumer_group"])
    _assert_gone(stack, summary["run"])
    assert (tmp_path / "worker.log").is_file()


def test_cleanup_deletes_only_its_own_run(stack: StackSettings, tmp_path: Path) -> None:
    """What a demo run made (made here by hand, as the worker makes it) is deleted; a neighbour's names stay."""
    tag = uuid.uuid4().hex[:6]
    settings = WorkerSettings(
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        topic_prefix=f"demo-{tag}-",
        redis_prefix=f"demo-{tag}",
        app_id=f"tagstream-demo-{tag}",
        data_dir=tmp_path,
    )
    asyncio.run(ensure_topics(settings))

    async def commit_offsets() -> None:  # a consumer group with committed offsets, as the worker leaves it
        consumer = AIOKafkaConsumer(
            settings.topic("products"), bootstrap_servers=stack.kafka_bootstrap, group_id=settings.app_id
        )
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=500)
            await consumer.commit({tp: 0 for tp in consumer.assignment()})
        finally:
            await consumer.stop()

    asyncio.run(commit_offsets())
    client = redis.Redis.from_url(stack.redis_url)
    client.set(f"demo-{tag}:{{p-1}}:doc", "x")
    client.hset(f"demo-{tag}:meta", "state_format", 3)
    client.set(f"demo-{tag}x:{{p-1}}:doc", "a neighbour's key")
    (tmp_path / settings.app_id / "tables").mkdir(parents=True)
    (tmp_path / f"{settings.app_id}x").mkdir()
    try:
        assert settings.app_id in _groups(stack.kafka_bootstrap)
        assert len(asyncio.run(_topics(stack.kafka_bootstrap, settings.topic_prefix))) == len(TOPICS)

        assert cleanup_run(settings) == []

        run = {
            "topic_prefix": settings.topic_prefix,
            "redis_prefix": settings.redis_prefix,
            "consumer_group": settings.app_id,
            "faust_dir": str(tmp_path / settings.app_id),
        }
        _assert_gone(stack, run)
        assert client.get(f"demo-{tag}x:{{p-1}}:doc") == b"a neighbour's key"
        assert (tmp_path / f"{settings.app_id}x").is_dir()
        assert cleanup_run(settings) == []  # twice is fine: nothing left to delete
    finally:
        client.delete(f"demo-{tag}x:{{p-1}}:doc")
        client.close()
