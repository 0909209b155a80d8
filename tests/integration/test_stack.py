"""The real local stack: the shared one (never stopped here) and a second, throwaway one on other ports."""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tagstream.stack import StackSettings, StackStatus, stack_down, stack_status, stack_up
from tests.kafka import fresh_topic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shared() -> StackSettings:
    """The shared stack (started by `tagstream stack up`; started here if it is not up, never stopped)."""
    settings = StackSettings()
    stack_up(settings)
    return settings


def pids(status: StackStatus) -> dict[str, int | None]:
    return {c.name: c.pid for c in status.components}


async def round_trip(bootstrap: str) -> None:
    """Create a fresh topic, produce three records and read them back."""
    async with fresh_topic(bootstrap, "stack-test") as topic:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(3):
                await producer.send_and_wait(topic, f"value-{i}".encode(), key=b"p-1")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=f"g-{topic}", auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            got: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(got) < 3 and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=1000)
                got += [record.value for records in batches.values() for record in records]
        finally:
            await consumer.stop()
        assert got == [b"value-0", b"value-1", b"value-2"]


async def commit_offset(bootstrap: str, topic: str, group: str) -> None:
    """Produce one record to a new one-partition `topic` and commit past it as consumer group `group`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"v", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): 1})
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): m.offset for tp, m in offsets.items()}


def redis_ping(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        return bool(client.ping())
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------ shared stack


def test_up_is_idempotent(shared: StackSettings) -> None:
    first = stack_up(shared)
    second = stack_up(shared)
    assert first.up and second.up
    assert second.started == ()
    assert pids(first) == pids(second)
    assert all(pid for pid in pids(second).values())


def test_status_reports_both_up_with_ports(shared: StackSettings) -> None:
    status = stack_status(shared)
    assert status.up
    assert (status.kafka.state, status.kafka.port) == ("up", shared.kafka_port)
    assert (status.redis.state, status.redis.port) == ("up", shared.redis_port)
    for component in status.components:
        assert component.pid and psutil.pid_exists(component.pid)
    assert status.kafka.log_file.is_file() and status.redis.log_file.is_file()


async def test_kafka_round_trip(shared: StackSettings) -> None:
    await round_trip(shared.kafka_bootstrap)


def test_redis_answers_ping(shared: StackSettings) -> None:
    assert redis_ping(shared.redis_port)


def test_auto_topic_creation_is_off(shared: StackSettings) -> None:
    config = (shared.state_dir / "kafka" / "server.properties").read_text()
    assert "auto.create.topics.enable=false" in config


# ------------------------------------------------------------------------------------------------ second stack


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


async def test_second_stack_up_down_and_restart(tmp_path: Path) -> None:
    kafka_port, controller_port, redis_port = free_ports(3)
    settings = StackSettings(
        kafka_port=kafka_port,
        kafka_controller_port=controller_port,
        redis_port=redis_port,
        state_dir=tmp_path / "stack",
    )
    assert not stack_status(settings).up
    try:
        started = stack_up(settings)
        assert started.up and set(started.started) == {"kafka", "redis"}
        first_pids = pids(started)
        assert stack_up(settings).started == ()
        await round_trip(settings.kafka_bootstrap)
        assert redis_ping(redis_port)
        await commit_offset(settings.kafka_bootstrap, "kept", "kept-group")
        client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5)
        client.hset("kept:meta", "state_format", "7")  # a worker's state and its group's offsets, written together
        client.close()

        assert sorted(stack_down(settings)) == ["kafka", "redis"]
        for pid in first_pids.values():
            assert pid is not None and not psutil.pid_exists(pid)
        status = stack_status(settings)
        assert [c.state for c in status.components] == ["down", "down"]
        assert all(port_free(p) for p in (kafka_port, controller_port, redis_port))
        assert not list(settings.state_dir.rglob("*.pid"))
        assert stack_down(settings) == []

        # Up again on the existing (already formatted) storage: the topic data and cluster id survive.
        cluster_id = (settings.state_dir / "kafka" / "cluster.id").read_text()
        again = stack_up(settings)
        assert again.up and set(again.started) == {"kafka", "redis"}
        assert (settings.state_dir / "kafka" / "cluster.id").read_text() == cluster_id
        await round_trip(settings.kafka_bootstrap)
        # Redis keeps its data (append-only file) as Kafka keeps the group's offsets: a worker resumes on its state
        client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5, decode_responses=True)
        assert client.hgetall("kept:meta") == {"state_format": "7"}
        client.close()
        assert await committed_offsets(settings.kafka_bootstrap, "kept-group") == {("kept", 0): 1}
    finally:
        stack_down(settings)
    assert not stack_status(settings).up
