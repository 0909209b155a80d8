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


async def _set_config(env: StreamEnv, topic: str, configs: dict[str, str]) -> None:
    """Give a topic these configs (its only topic-level ones), as an operator would."""
    admin = AIOKafkaAdminClient(bootstrap_servers=env.settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, env.settings.topic(topic), configs)])
    finally:
        await admin.close()


async def _set_compression(env: StreamEnv, topic: str, codec: str) -> None:
    """Set a topic's `compression.type`: the broker then stores (and serves) its records in that codec, whatever
    the producer sent."""
    await _set_config(env, topic, {"compression.type": codec})


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
            if not events:
                continue
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


def test_a_tag_update_kafka_refuses_stops_the_worker_at_once_and_its_next_start_delivers_it(
    stream_env: StreamEnv, bundle: Path
) -> None:
    # an operator lowers tag-updates' max.message.bytes under a running worker; a valid product's update is larger
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    stream_env.produce("products", [upsert("small-1", "Levis Men Black Jeans")])
    stream_env.consume("tag-updates", _has_update("small-1"))
    asyncio.run(_set_config(stream_env, "tag-updates", {"cleanup.policy": "compact", "max.message.bytes": "20000"}))
    big = upsert("big-1", "Nike Women Red Shoes", attributes={f"attr{i:03d}": "v" * 150 for i in range(100)})
    stream_env.produce("products", [big])

    # it stops on its own, with no further event to wake its agent, and says why in one line
    assert worker.wait_exit(60) is not None, "the worker kept running with a batch Kafka refused"
    log = worker.log()
    assert "Kafka refused a record of a batch's tag updates or dead letters (MessageSizeTooLargeError" in log
    assert "aiokafka.errors.MessageSizeTooLargeError" not in log  # said once, not again as a traceback under it

    # its next start sets the limit the topic needs and delivers the update it had applied
    again = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    [update] = [m for m in stream_env.consume("tag-updates", _has_update("big-1")) if m["product_id"] == "big-1"]
    assert {"tag": "attr007:" + "v" * 150, "group": "attr007", "score": 1.0, "origin": "catalog"} in update["tags"]
    assert f"changed the configs of topic {stream_env.settings.topic('tag-updates')}" in again.log()


def test_partitions_added_to_an_input_topic_under_a_running_worker_stop_it_in_one_line(
    stream_env: StreamEnv, bundle: Path
) -> None:
    # the worker rebalances onto the new partitions at its next metadata refresh
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_METADATA_MAX_AGE_S="1")

    async def add_partitions() -> None:
        from aiokafka.admin import NewPartitions

        admin = AIOKafkaAdminClient(bootstrap_servers=stream_env.settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_partitions({stream_env.settings.topic("products"): NewPartitions(total_count=4)})
        finally:
            await admin.close()

    asyncio.run(add_partitions())
    assert worker.wait_exit(90) is not None, "the worker ran on with products on 4 partitions and behavior on 2"
    products = stream_env.settings.topic("products")
    assert f"{products} has 4 partitions, but TAGSTREAM_PARTITIONS is 2" in worker.log()


async def _committed(env: StreamEnv) -> dict[tuple[str, int], int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(env.settings.app_id)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


def test_offsets_are_committed_past_an_aborted_transaction_after_a_partitions_first_record(
    stream_env: StreamEnv, bundle: Path
) -> None:
    # A review found the partition's commits stuck at 1 for good: offset 0 read, then a gap (its commit marker, the
    # aborted record, the abort marker) that Faust's gap handling skipped because offset 0 is false.
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    asyncio.run(_transactions(stream_env, [upsert("gap-first", "Adidas Bag")], []))  # offset 0, marker at 1
    asyncio.run(_transactions(stream_env, [], [upsert("gap-aborted", "Levis Jeans")]))  # 2 aborted, marker at 3
    plain = [upsert(f"gap-{i}", "Puma Men Blue Tshirt") for i in range(2)]

    async def send_plain() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=stream_env.settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            import orjson

            for ev in plain:
                meta = await producer.send_and_wait(
                    stream_env.settings.topic("products"), orjson.dumps(ev), key=ev["product_id"].encode(), partition=0
                )
            return meta.offset
        finally:
            await producer.stop()

    last = asyncio.run(send_plain())
    stream_env.consume("tag-updates", _has_update("gap-1"))
    topic = stream_env.settings.topic("products")
    deadline = time.monotonic() + 30
    while asyncio.run(_committed(stream_env)).get((topic, 0)) != last + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert asyncio.run(_committed(stream_env)).get((topic, 0)) == last + 1
