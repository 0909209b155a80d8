"""Input written the ways other Kafka producers and clusters write it: every compression codec Kafka has, and
transactions (a catalog service's exactly-once producer, Kafka Connect, Kafka Streams)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.events import behaviour, upsert
from tests.integration.conftest import StreamEnv
from tests.models import featurized_bundle

pytestmark = pytest.mark.integration

T0 = 1_764_316_800_000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model bundle over the real featurizer."""
    return featurized_bundle(tmp_path_factory.mktemp("registry"))


def _has_update(pid: str) -> Any:
    return lambda messages: any(m.get("product_id") == pid for m in messages)


async def _set_compression(env: StreamEnv, topic: str, codec: str) -> None:
    """Set a topic's `compression.type`: the broker then stores (and serves) its records in that codec, whatever
    the producer sent."""
    admin = AIOKafkaAdminClient(bootstrap_servers=env.settings.kafka_bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, env.settings.topic(topic), {"compression.type": codec})
        await admin.alter_configs([resource])
    finally:
        await admin.close()


async def _send_compressed(env: StreamEnv, topic: str, events: list[dict[str, Any]], codec: str) -> None:
    """Send events in batches the producer compresses with `codec`."""
    import orjson

    producer = AIOKafkaProducer(
        bootstrap_servers=env.settings.kafka_bootstrap, compression_type=codec, acks="all", linger_ms=20
    )
    await producer.start()
    try:
        futures = [
            await producer.send(env.settings.topic(topic), orjson.dumps(ev), key=ev["product_id"].encode())
            for ev in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def test_input_in_every_compression_codec_kafka_has_is_read(stream_env: StreamEnv, bundle: Path) -> None:
    # A producer's own codec (snappy, gzip here), and topics whose broker recompresses to zstd / lz4: Java clients
    # and clusters commonly use any of them, and a worker that cannot read one stalls on its partition.
    asyncio.run(_send_compressed(stream_env, "products", [upsert("snappy-1", "Levis Men Black Jeans")], "snappy"))
    asyncio.run(_send_compressed(stream_env, "products", [upsert("gzip-1", "Nike Women Red Shoes")], "gzip"))
    asyncio.run(_set_compression(stream_env, "products", "zstd"))
    stream_env.produce("products", [upsert("zstd-1", "Puma Men Blue Tshirt")])
    asyncio.run(_set_compression(stream_env, "behavior", "lz4"))
    stream_env.produce("behavior", [behaviour("lz4-1", f"user-{i}", T0 + i * 1_000) for i in range(3)])

    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    for pid in ("snappy-1", "gzip-1", "zstd-1"):
        stream_env.consume("tag-updates", _has_update(pid), timeout=60)
    counters = f"{stream_env.settings.redis_prefix}:{{lz4-1}}:beh"
    deadline = time.monotonic() + 60
    while not stream_env.redis().exists(counters) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stream_env.redis().exists(counters), f"the lz4-compressed clicks were not counted:\n{worker.log()[-3000:]}"
    assert "codec" not in worker.log().lower()


async def _transactions(env: StreamEnv, committed: list[dict[str, Any]], aborted: list[dict[str, Any]]) -> None:
    """`aborted` in a transaction that is aborted, then `committed` in one that commits, all on partition 0."""
    import orjson

    producer = AIOKafkaProducer(
        bootstrap_servers=env.settings.kafka_bootstrap, transactional_id=f"{env.settings.app_id}-catalog"
    )
    await producer.start()
    try:
        for events, commit in ((aborted, False), (committed, True)):
            await producer.begin_transaction()
            for ev in events:
                await producer.send_and_wait(
                    env.settings.topic("products"), orjson.dumps(ev), key=ev["product_id"].encode(), partition=0
                )
            if commit:
                await producer.commit_transaction()
            else:  # what a producer does when the rest of its unit of work failed
                await producer.abort_transaction()
    finally:
        await producer.stop()


def test_events_of_an_aborted_transaction_are_never_applied(stream_env: StreamEnv, bundle: Path) -> None:
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    aborted = [upsert("txn-aborted", "Levis Men Black Jeans"), upsert("txn-both", "Nike Women Red Shoes", version=2)]
    committed = [upsert("txn-both", "Puma Men Blue Tshirt", version=1), upsert("txn-committed", "Adidas Bag")]
    asyncio.run(_transactions(stream_env, committed, aborted))

    messages = stream_env.consume("tag-updates", _has_update("txn-committed"), timeout=60)
    assert not [m for m in messages if m["product_id"] == "txn-aborted"]
    assert [m["reason"] for m in messages if m["product_id"] == "txn-both"] == ["product-upsert"]
    client = stream_env.redis()
    prefix = stream_env.settings.redis_prefix
    # the committed version 1 applies: the aborted version 2 never happened, so it is neither applied nor a reason
    # to skip version 1 as stale
    assert client.hmget(f"{prefix}:{{txn-both}}:doc", "title", "version") == ["Puma Men Blue Tshirt", "1"]
    assert client.exists(f"{prefix}:{{txn-aborted}}:tags") == 0
    assert client.exists(f"{prefix}:{{txn-aborted}}:doc") == 0
