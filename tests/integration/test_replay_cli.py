"""`tagstream replay` and `tagstream tail` against the real broker: a file with a bad line is refused whole,
`--send-invalid` sends invalid events, `--rate` paces; `tail` prints tombstones and the latest messages."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas import TICK_KEY, WindowTick
from tests.events import behaviour, upsert
from tests.integration.conftest import REPO, StreamEnv

pytestmark = pytest.mark.integration

T0 = 1_764_316_800_000


def run_cli(se: StreamEnv, *args: str) -> tuple[int, str, str]:
    """Run `tagstream <args>` with this test's settings: (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", *args],
        env={**os.environ, **se.env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc.returncode, proc.stdout, proc.stderr


def error_line(stderr: str) -> str:
    """The one `tagstream ...: error:` line of a refused command (nothing else that looks like an error)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("tagstream "), stderr
    return lines[0]


async def _records(se: StreamEnv, topic: str) -> list[Any]:
    """Every record on a logical topic, from its beginning to its end offsets now (all partitions)."""
    consumer = AIOKafkaConsumer(
        se.settings.topic(topic), bootstrap_servers=se.settings.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = consumer.assignment()
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:  # offsets may have gaps
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                out += batch
        return sorted(out, key=lambda r: (r.timestamp, r.partition, r.offset))
    finally:
        await consumer.stop()


def records(se: StreamEnv, topic: str) -> list[Any]:
    """Every record now on a logical topic, oldest first."""
    return asyncio.run(_records(se, topic))


def write_lines(path: Path, lines: list[bytes]) -> Path:
    """A JSONL file of these lines."""
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_replay_refuses_a_file_with_an_oversize_or_invalid_line_and_sends_nothing(
    stream_env: StreamEnv, tmp_path: Path
) -> None:
    good = [orjson.dumps(upsert(f"rp-{i}", "Roadster Men Blue Jeans")) for i in range(3)]
    oversize = orjson.dumps(upsert("rp-big", "x" * 2_000_000))
    invalid = b'{"product_id": "rp-bad", "op": "upsert"}'
    mixed = write_lines(tmp_path / "mixed.jsonl", [good[0], oversize, invalid, good[1], good[2]])

    code, out, err = run_cli(stream_env, "replay", str(mixed), "--topic", "products")
    line = error_line(err)
    assert code == 2 and out == ""
    assert f"{mixed}:2: " in line and "bad lines: 1 over the size limit, 1 invalid, of 5; nothing sent" in line
    code, out, err = run_cli(stream_env, "replay", str(mixed), "--topic", "products", "--send-invalid")
    assert code == 2 and "a line over the size limit can never be sent" in error_line(err)
    only_invalid = write_lines(tmp_path / "invalid.jsonl", [good[0], invalid, good[1], good[2]])
    code, out, err = run_cli(stream_env, "replay", str(only_invalid), "--topic", "products")
    assert code == 2 and f"{only_invalid}:2: product-change: " in error_line(err)
    assert records(stream_env, "products") == []  # not even the good lines before the bad ones

    code, out, err = run_cli(stream_env, "replay", str(only_invalid), "--topic", "products", "--send-invalid")
    assert code == 0, err
    topic = stream_env.settings.topic("products")
    assert out.startswith(f"sent 4 events to {topic} (1 invalid, first {only_invalid}:2: product-change: ")
    sent = records(stream_env, "products")
    assert sorted(r.value for r in sent) == sorted([good[0], invalid, good[1], good[2]])
    assert {r.key for r in sent} == {b"rp-0", b"rp-1", b"rp-2", b"rp-bad"}


def test_replay_rate_paces_the_events(stream_env: StreamEnv, tmp_path: Path) -> None:
    n, rate = 30, 15.0
    events = [orjson.dumps(behaviour(f"rp-{i % 4}", f"u{i}", T0 + i * 1000, "view")) for i in range(n)]
    path = write_lines(tmp_path / "behavior.jsonl", events)
    code, out, err = run_cli(stream_env, "replay", str(path), "--topic", "behavior", "--rate", str(rate))
    assert code == 0, err
    assert out.strip() == f"sent {n} events to {stream_env.settings.topic('behavior')}"
    sent = records(stream_env, "behavior")
    assert [r.value for r in sent] == events  # in file order (timestamps apart)
    # event i goes out no earlier than i / rate after the first (the producer stamps each record when it is sent;
    # 1 ms for the stamps' rounding): at 15 events/s the 30 events span at least 1.93 s, at full speed a few ms
    stamps = [r.timestamp - sent[0].timestamp for r in sent]
    assert all(stamp >= i * 1000 / rate - 1 for i, stamp in enumerate(stamps)), stamps


async def _produce(se: StreamEnv, topic: str, messages: list[tuple[bytes, bytes | None, int]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=se.settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, ts in messages:
            await (await producer.send(se.settings.topic(topic), value, key=key, timestamp_ms=ts))
    finally:
        await producer.stop()


def test_tail_prints_null_for_a_tombstone_and_goes_on_past_window_ticks(make_stream_env: Any) -> None:
    se = make_stream_env(partitions=1)
    tick = orjson.dumps(WindowTick(T0, "w1").to_dict())
    messages = [(b"rp-a", None, T0), (TICK_KEY, tick, T0 + 1), (b"rp-b", b'{"after": 1}', T0 + 2)]
    asyncio.run(_produce(se, "behavior", messages))
    code, out, err = run_cli(se, "tail", "behavior", "-n", "2")
    assert code == 0 and "Traceback" not in err, err
    assert out.splitlines() == ["null", '{"after": 1}']  # a worker's tick is no event: not printed
    code, out, err = run_cli(se, "tail", "behavior", "-n", "2", "--latest")
    assert code == 0 and out.splitlines() == ["null", '{"after": 1}'], err
    # a dead letter keeps its message's key, a bad tick's too: on other topics nothing is skipped
    asyncio.run(_produce(se, "dead-letter", [(TICK_KEY, b'{"reason": "bad tick"}', T0)]))
    code, out, err = run_cli(se, "tail", "dead-letter", "-n", "1")
    assert code == 0 and out.splitlines() == ['{"reason": "bad tick"}'], err


def test_tail_latest_prints_the_last_messages_over_all_partitions(stream_env: StreamEnv) -> None:
    messages = [(f"rp-{i}".encode(), b'{"i": %d}' % i, T0 + i) for i in range(12)]
    asyncio.run(_produce(stream_env, "tag-updates", messages))
    assert len({r.partition for r in records(stream_env, "tag-updates")[-3:]}) == 2  # the last three: both partitions
    code, out, err = run_cli(stream_env, "tail", "tag-updates", "-n", "3", "--latest")
    assert code == 0, err
    assert out.splitlines() == ['{"i": 9}', '{"i": 10}', '{"i": 11}']


async def _compact_eagerly(se: StreamEnv, topic: str) -> None:
    """Small segments and an eager log cleaner on a (compacted) topic, so compaction runs within seconds."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    configs = {
        "cleanup.policy": "compact",
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.001",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": "100",
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=se.settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, se.settings.topic(topic), configs)])
    finally:
        await admin.close()


def test_tail_latest_prints_the_last_messages_of_a_compacted_topic(make_stream_env: Any) -> None:
    se = make_stream_env(partitions=1)
    asyncio.run(_compact_eagerly(se, "tag-updates"))
    keys = [f"rp-{i}" for i in range(10)] + ["rp-0"] * 5  # each message a segment of its own (timestamps 1 s apart)
    asyncio.run(
        _produce(se, "tag-updates", [(k.encode(), b'{"n": %d}' % n, T0 + 1000 * n) for n, k in enumerate(keys)])
    )
    deadline = time.monotonic() + 90  # the broker's log cleaner looks every 15 s
    while len(left := records(se, "tag-updates")) == len(keys) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(left) < len(keys), "compaction did not run"  # offsets now have gaps: the older rp-0 are gone
    while True:  # the cleaner may go on removing records: compare with the topic as it stood around the tail
        code, out, err = run_cli(se, "tail", "tag-updates", "-n", "5", "--latest")
        assert code == 0, err
        after = records(se, "tag-updates")
        if [r.offset for r in after] == [r.offset for r in left] or time.monotonic() > deadline:
            break
        left = after
    assert out.splitlines() == [r.value.decode() for r in left[-5:]]


async def _topic_names(bootstrap: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_replay_of_a_refused_file_makes_no_topic_and_a_good_file_makes_them(
    stream_env: StreamEnv, tmp_path: Path
) -> None:
    prefix = f"{stream_env.settings.topic_prefix}new-"  # topics no one has made yet
    fresh = StreamEnv(stream_env.settings, {**stream_env.env, "TAGSTREAM_TOPIC_PREFIX": prefix}, stream_env.tmp)
    bootstrap = stream_env.settings.kafka_bootstrap
    bad = write_lines(tmp_path / "bad.jsonl", [orjson.dumps(upsert("rn-0", "Roadster")), b'{"op": "upsert"}'])
    code, _, err = run_cli(fresh, "replay", str(bad), "--topic", "products")
    assert code == 2 and f"{bad}:2: " in error_line(err)
    assert not {t for t in asyncio.run(_topic_names(bootstrap)) if t.startswith(prefix)}  # before: all six made

    empty = write_lines(tmp_path / "empty.jsonl", [b"", b"  "])  # nothing to send: said, and no topic made
    code, out, err = run_cli(fresh, "replay", str(empty), "--topic", "products")
    assert code == 0 and out.startswith(f"sent 0 events to {prefix}products")
    assert f"warning: {empty} has no events" in err
    assert not {t for t in asyncio.run(_topic_names(bootstrap)) if t.startswith(prefix)}

    good = write_lines(tmp_path / "good.jsonl", [orjson.dumps(upsert("rn-0", "Roadster Men Blue Jeans"))])
    code, out, err = run_cli(fresh, "replay", str(good), "--topic", "products")
    assert code == 0 and out.startswith(f"sent 1 events to {prefix}products"), err
    assert f"{prefix}products" in asyncio.run(_topic_names(bootstrap))
