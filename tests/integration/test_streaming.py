"""The core loop against real Kafka and Redis, with real `tagstream worker` processes."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from schemas import ProductChange, validate
from streams.model import BundleModel
from streams.settings import WorkerSettings
from streams.topics import ensure_topics
from tests.events import behaviour, delete, upsert
from tests.integration.conftest import REPO, StreamEnv
from tests.models import featurized_bundle

pytestmark = pytest.mark.integration

T0 = 1_764_316_800_000  # event time of the scenarios (ms)
MINUTE = 60_000
HOUR = 60 * MINUTE


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model bundle over the real featurizer."""
    return featurized_bundle(tmp_path_factory.mktemp("registry"))


def updates_for(messages: list[dict[str, Any]], pid: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["product_id"] == pid]


def tag_names(update: dict[str, Any]) -> set[str]:
    return {t["tag"] for t in update["tags"]}


def partition_of(pid: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2 of the key) puts a product on."""
    return DefaultPartitioner()(pid.encode(), list(range(partitions)), list(range(partitions)))


def test_product_upsert_emits_the_models_tags(stream_env: StreamEnv, bundle: Path) -> None:
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    event = upsert("p-1", "Turtle Check Men Navy Blue Shirt", brand="Turtle", price=1299, attributes={"colour": "Red"})
    [(partition, offset)] = stream_env.produce("products", [event])

    [update] = updates_for(stream_env.consume("tag-updates", lambda m: bool(updates_for(m, "p-1"))), "p-1")

    model = BundleModel.load(bundle, WorkerSettings())
    # The catalog's own colour replaces the model's colour guess; every other model tag is emitted as scored.
    expected = {t.tag: t.score for t in model.score([ProductChange.from_dict(event)])[0] if t.group != "colour"}
    got = {t["tag"]: t["score"] for t in update["tags"] if t["origin"] == "model"}
    assert got.keys() == expected.keys() and expected
    assert all(abs(got[k] - expected[k]) < 1e-5 for k in got)
    assert {"tag": "colour:Red", "group": "colour", "score": 1.0, "origin": "catalog"} in update["tags"]
    assert update["model_version"] == model.version
    assert update["reason"] == "product-upsert"
    assert update["source"] == {
        "topic": stream_env.settings.topic("products"),
        "partition": partition,
        "offset": offset,
    }
    assert sorted(update["added"]) == sorted(tag_names(update))
    validate("tag-update", {k: v for k, v in update.items() if not k.startswith("_")})  # schema-valid on the wire
    # The current tags are kept in Redis too.
    stored = orjson.loads(stream_env.redis().get(f"{stream_env.settings.redis_prefix}:{{p-1}}:tags"))
    assert {t["tag"] for t in stored["tags"]} == tag_names(update)
    # Faust's data directory goes under TAGSTREAM_DATA_DIR, not into the worker's current directory.
    app_id = stream_env.settings.app_id
    assert (stream_env.settings.data_dir / app_id).is_dir()
    assert not (REPO / f"{app_id}-data").exists()


def test_click_burst_adds_trending_and_the_window_passing_removes_it(stream_env: StreamEnv, bundle: Path) -> None:
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    hot, other = (
        "burst-1",
        next(f"other-{i}" for i in range(100) if partition_of(f"other-{i}", 2) == partition_of("burst-1", 2)),
    )
    stream_env.produce(
        "products", [upsert(hot, "Nike Women Red Running Shoes"), upsert(other, "Levis Men Black Jeans")]
    )
    burst = [behaviour(hot, f"user-{i % 12}", T0 + i * 5_000) for i in range(40)]  # 40 clicks, 12 users, 200 s
    stream_env.produce("behavior", burst)

    messages = stream_env.consume("tag-updates", lambda m: any("trending" in u["added"] for u in updates_for(m, hot)))
    first = next(u for u in updates_for(messages, hot) if "trending" in u["added"])
    assert first["reason"] == "behaviour" and "trending" in tag_names(first)

    # Two hours later (event time) on the same partition: the burst has left the 1 h window.
    [(partition, offset)] = stream_env.produce("behavior", [behaviour(other, "user-x", T0 + 2 * HOUR)])
    messages = stream_env.consume("tag-updates", lambda m: any("trending" in u["removed"] for u in updates_for(m, hot)))
    gone = next(u for u in updates_for(messages, hot) if "trending" in u["removed"])
    assert gone["reason"] == "window-expired"
    assert "trending" not in tag_names(gone)
    # its source is the batch that swept it (a batch of one message here): each expiry has its own identity
    assert gone["source"] == {"topic": stream_env.settings.topic("behavior"), "partition": partition, "offset": offset}


def test_a_quiet_partition_gets_a_tick_that_expires_its_trending_tag(stream_env: StreamEnv, bundle: Path) -> None:
    # before: with no further event on its partition, the product stayed trending for good
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_TICK_IDLE_S="2")
    hot = "quiet-1"
    start = time.time_ns() // 1_000_000 - 2 * HOUR  # a live stream two hours ago, then nothing
    stream_env.produce("products", [upsert(hot, "Nike Women Red Running Shoes")])
    burst = [behaviour(hot, f"user-{i % 12}", start + i * 5_000) for i in range(40)]
    produced_from = time.time_ns() // 1_000_000
    [(partition, _), *_] = stream_env.produce("behavior", burst)
    produced_to = time.time_ns() // 1_000_000
    stream_env.consume("tag-updates", lambda m: any("trending" in u["added"] for u in updates_for(m, hot)))
    # beside the watermark: the watermark it belongs to and the Kafka timestamp of the record that raised it
    topic = stream_env.settings.topic("behavior")
    key, field = f"{stream_env.settings.redis_prefix}:watermark", f"{topic}:{partition}"
    clock = int(stream_env.redis().hget(key, field) or 0)
    assert clock == start + 39 * 5_000
    kept, produced = map(int, stream_env.redis().hget(key, f"{field}:raised").split(":"))
    assert kept == clock and produced_from <= produced <= produced_to
    # as if the burst had been produced live, two hours ago: its newest event two seconds before its record
    stream_env.redis().hset(key, f"{field}:raised", f"{clock}:{clock + 2_000}")
    set_at = time.time_ns() // 1_000_000
    messages = stream_env.consume("tag-updates", lambda m: any("trending" in u["removed"] for u in updates_for(m, hot)))
    gone = next(u for u in updates_for(messages, hot) if "trending" in u["removed"])
    assert gone["reason"] == "window-expired" and "trending" not in tag_names(gone)
    # its source is the tick the worker wrote into the quiet partition after the burst's 40 clicks
    source = gone["source"]
    assert (source["topic"], source["partition"]) == (topic, partition)
    records = stream_env.consume("behavior", lambda m: any(r["_offset"] == source["offset"] for r in m))
    [tick] = [r for r in records if r["_partition"] == partition and r["_offset"] == source["offset"]]
    assert source["offset"] >= 40 and tick["worker_id"] and gone["event_time"] == tick["ts"]
    # the partition's event time went on from its newest event at the wall clock's pace: by the time since it rose
    assert set_at - 2_000 <= tick["ts"] <= time.time_ns() // 1_000_000 - 2_000


def test_delete_emits_the_removal(stream_env: StreamEnv, bundle: Path) -> None:
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    stream_env.produce("products", [upsert("gone-1", "小米 充电宝 20000mAh", attributes={"colour": "White"})])
    first = stream_env.consume("tag-updates", lambda m: bool(updates_for(m, "gone-1")))
    before = tag_names(updates_for(first, "gone-1")[0])
    stream_env.produce("products", [delete("gone-1")])

    messages = stream_env.consume("tag-updates", lambda m: any(u["deleted"] for u in updates_for(m, "gone-1")))
    last = updates_for(messages, "gone-1")[-1]
    assert last["deleted"] is True and last["reason"] == "product-delete"
    assert last["tags"] == [] and set(last["removed"]) == before and "colour:White" in before
    doc = stream_env.redis().hgetall(f"{stream_env.settings.redis_prefix}:{{gone-1}}:doc")
    assert doc["deleted"] == "1" and doc["version"] == "2"


def test_bad_events_go_to_the_dead_letter_topic_and_good_ones_still_flow(stream_env: StreamEnv, bundle: Path) -> None:
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    missing_title = {"schema_version": 1, "op": "upsert", "product_id": "bad-2", "updated_at": 1, "version": 1}
    trace = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("origin", b"catalog")]
    product_sent = stream_env.produce(
        "products", [b"\xff\xfe not json", missing_title, upsert("good-1", "Levis Men Black Jeans")], headers=trace
    )
    bad_click = behaviour("good-1", "u1", -5)
    stream_env.produce("behavior", [bad_click, behaviour("good-1", "u1", T0)])

    dead = stream_env.consume("dead-letter", lambda m: len(m) >= 3)
    assert len(dead) == 3
    by_type = {d["source"]["topic"].removeprefix(stream_env.settings.topic_prefix): d for d in dead}
    raw = [d for d in dead if d["error_type"] == "EventDecodeError"]
    assert len(raw) == 1 and base64.b64decode(raw[0]["value_b64"]) == b"\xff\xfe not json"
    assert raw[0]["source"]["offset"] == product_sent[0][1]
    sources = stream_env.consume("products", lambda m: len(m) >= 3)
    [source] = [m for m in sources if m.get("_raw") == b"\xff\xfe not json"]
    # the source record's headers, in order, then its Kafka timestamp: nothing of the record is lost
    assert raw[0]["_headers"] == [[k, v.decode()] for k, v in trace] + [
        ["tagstream-source-timestamp", str(source["_timestamp"])]
    ]
    schema = [d for d in dead if d["error_type"] == "SchemaValidationError"]
    assert len(schema) == 2
    assert any("title" in d["reason"] for d in schema)
    assert orjson.loads(base64.b64decode(by_type["behavior"]["value_b64"])) == bad_click
    assert any(u["product_id"] == "good-1" for u in stream_env.consume("tag-updates", lambda m: len(m) >= 1))


def _replay_events(n_products: int = 30, n_behaviour: int = 2500, seed: int = 7) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    titles = ["华为 Mate 60 Pro 5G手机", "Turtle Men Navy Blue Shirt", "苹果 iPhone 15", "Nike Women Red Shoes"]
    products = [upsert(f"r-{i}", f"{rng.choice(titles)} {i}", attributes={"colour": "Blue"}) for i in range(n_products)]
    products += [upsert(f"r-{i}", f"{titles[i % 4]} v2", version=2) for i in range(0, n_products, 3)]
    products += [delete(f"r-{i}", version=3) for i in range(0, n_products, 10)]
    kinds = ["view"] * 8 + ["click"] * 3 + ["add_to_cart", "purchase"]
    events = []
    for i in range(n_behaviour):
        pid = f"r-{rng.choice([1, 2, 2, 5, 5, 5]) if i % 3 == 0 else rng.randrange(n_products)}"
        events.append(behaviour(pid, f"user-{rng.randrange(200)}", T0 + i * 2_000, rng.choice(kinds)))
    return products, events


def _state(se: StreamEnv) -> dict[str, Any]:
    """Everything Redis holds for a slice, with the slice's prefixes taken out so two slices compare."""
    client = se.redis()
    prefix, topics = se.settings.redis_prefix, se.settings.topic_prefix
    out: dict[str, Any] = {}
    for key in client.scan_iter(f"{prefix}:{{*", count=1000):
        name = key.removeprefix(prefix)
        kind = client.type(key)
        if kind == "hash":
            value: Any = {k.replace(topics, ""): v for k, v in client.hgetall(key).items()}
            value = {k: (_strip_emit(v, topics) if k.startswith("emit:") else v) for k, v in value.items()}
        elif kind == "string" and key.endswith(":tags"):
            value = orjson.loads(client.get(key))
        else:
            value = client.pfcount(key)
        out[name] = value
    return out


def _strip_emit(payload: str, topic_prefix: str) -> dict[str, Any]:
    update = orjson.loads(payload)
    update["source"]["topic"] = update["source"]["topic"].replace(topic_prefix, "")
    update.pop("emit_time")
    return update


def _caught_up(se: StreamEnv, expected: dict[str, int]) -> bool:
    """True when the fences in Redis cover the last offset of every input partition."""
    client = se.redis()
    applied: dict[str, int] = {}
    for key in client.scan_iter(f"{se.settings.redis_prefix}:{{*}}:fence", count=1000):
        for field, value in client.hgetall(key).items():
            if not field.startswith("emit:"):
                applied[field] = max(applied.get(field, -1), int(value))
    return all(applied.get(f, -1) >= last for f, last in expected.items())


def _applied(se: StreamEnv) -> int:
    """How many input messages the fences in Redis say were applied."""
    client = se.redis()
    applied: dict[str, int] = {}
    for key in client.scan_iter(f"{se.settings.redis_prefix}:{{*}}:fence", count=1000):
        for field, value in client.hgetall(key).items():
            if not field.startswith(("emit:", "sweep:")):
                applied[field] = max(applied.get(field, -1), int(value))
    return sum(v + 1 for v in applied.values())


def _wait_applied(se: StreamEnv, at_least: int, timeout: float = 90) -> None:
    import time

    deadline = time.monotonic() + timeout
    while _applied(se) < at_least:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {at_least} messages applied in {timeout}s")
        time.sleep(0.02)


def _wait_caught_up(se: StreamEnv, sent: dict[str, list[tuple[int, int]]], timeout: float = 120) -> None:
    import time

    expected: dict[str, int] = {}
    for topic, metas in sent.items():
        for partition, offset in metas:
            field = f"{se.settings.topic(topic)}:{partition}"
            expected[field] = max(expected.get(field, -1), offset)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _caught_up(se, expected):
            return
        time.sleep(0.3)
    pytest.fail(f"worker did not catch up within {timeout}s; logs:\n" + "\n".join(w.log()[-2000:] for w in se.workers))


def _assert_same_state(after: dict[str, Any], reference: dict[str, Any]) -> dict[str, list[str]]:
    """Assert a slice's Redis state equals a clean replay's: behaviour counters (none lost or doubled), product
    docs, tag names and the key set. Returns the reference's tag names per tags key."""
    counters = {k: v for k, v in reference.items() if k.endswith(":beh")}
    assert {k: after.get(k) for k in counters} == counters, "behaviour counters differ (lost or doubled)"
    docs = {k: v for k, v in reference.items() if k.endswith(":doc")}
    assert {k: after.get(k) for k in docs} == docs
    tags = {k: sorted(t["tag"] for t in v["tags"]) for k, v in reference.items() if k.endswith(":tags")}
    assert {k: sorted(t["tag"] for t in after[k]["tags"]) for k in tags} == tags
    assert after.keys() == reference.keys()
    return tags


def test_kill9_mid_replay_then_restart_equals_a_clean_replay(make_stream_env: Any, bundle: Path) -> None:
    products, events = _replay_events()
    crashed, clean = make_stream_env(), make_stream_env()
    for se in (crashed, clean):
        se.sent = {"products": se.produce("products", products), "behavior": se.produce("behavior", events)}

    # Crash run: small batches so the kill lands mid-replay, SIGKILL once a part is applied, restart to the end.
    first = crashed.start_worker(TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_BATCH_MAX="8")
    _wait_applied(crashed, at_least=300)
    first.kill9()
    partial = _state(crashed)
    crashed.start_worker(TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_BATCH_MAX="16")
    _wait_caught_up(crashed, crashed.sent)

    # the reference consumes in Faust's own consumer thread on CPython's asyncio loop; the crashed run's workers on
    # their uvloop event loop (the defaults)
    reference_worker = clean.start_worker(
        TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_CONSUMER_THREAD="true", TAGSTREAM_EVENT_LOOP="asyncio"
    )
    _wait_caught_up(clean, clean.sent)
    assert "event loop: uvloop" in first.log() and "event loop: asyncio" in reference_worker.log()

    after_crash, reference = _state(crashed), _state(clean)
    assert len(partial) > 0 and partial != after_crash, "the kill did not land mid-replay"
    tags = _assert_same_state(after_crash, reference)

    # Nothing lost downstream either: each product's last tag update carries its final tags.
    updates = crashed.consume("tag-updates", lambda m: True, timeout=10)
    last: dict[str, dict[str, Any]] = {}
    for u in updates:
        last[u["product_id"]] = u
    for key, names in tags.items():
        pid = key.split("{")[1].split("}")[0]
        if pid in last:
            assert sorted(tag_names(last[pid])) == names, pid


def test_a_worker_joining_mid_replay_then_the_first_crashing_equals_a_clean_replay(
    make_stream_env: Any, bundle: Path
) -> None:
    """Two rebalances mid-replay: a second worker joins, then the first is killed (its partitions move after the
    session timeout). The replay is produced in three parts, after each step, so each rebalance has work after it
    however fast the workers are."""
    products, events = _replay_events(n_behaviour=6_000, seed=11)
    parts = [events[:2_000], events[2_000:4_000], events[4_000:]]
    shared, clean = make_stream_env(), make_stream_env()
    clean.sent = {"products": clean.produce("products", products), "behavior": clean.produce("behavior", events)}
    shared.sent = {"products": shared.produce("products", products), "behavior": shared.produce("behavior", parts[0])}

    slow = {"TAGSTREAM_MODEL_PATH": str(bundle), "TAGSTREAM_BATCH_MAX": "8", "TAGSTREAM_SESSION_TIMEOUT": "6"}
    first = shared.start_worker(**slow)
    _wait_applied(shared, at_least=300)
    shared.start_worker(**slow)
    shared.sent["behavior"] += shared.produce("behavior", parts[1])
    _wait_applied(shared, at_least=len(products) + len(parts[0]) + 500)
    first.kill9()
    shared.sent["behavior"] += shared.produce("behavior", parts[2])
    _wait_caught_up(shared, shared.sent, timeout=180)
    assert first.log().count("Setting newly assigned partitions") >= 2, "the first worker saw no rebalance"

    clean.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    _wait_caught_up(clean, clean.sent)

    after, reference = _state(shared), _state(clean)
    _assert_same_state(after, reference)


def test_a_backlog_is_fetched_only_as_far_as_the_buffer_bound(stream_env: StreamEnv, bundle: Path) -> None:
    # 3,000 clicks wait before the worker starts; its agents may buffer at most 100 records before fetching more,
    # from the start (the model is still loading then), so a fetch finds at most the bound plus one fetch buffered.
    clicks = [behaviour(f"bp-{i % 300}", f"u{i % 37}", T0 + i * 1000) for i in range(3000)]
    sent = {"behavior": stream_env.produce("behavior", clicks)}
    worker = stream_env.start_worker(
        TAGSTREAM_MODEL_PATH=str(bundle),
        TAGSTREAM_MAX_BUFFERED_RECORDS="100",
        TAGSTREAM_FETCH_MAX_PARTITION_BYTES="1024",
        TAGSTREAM_BATCH_MAX="50",
        TAGSTREAM_MODEL_LATENCY_RUNS="60000",  # a model load slower than joining the group (60,000 timed predicts)
    )
    _wait_caught_up(stream_env, sent)
    worker.stop()
    line = [x for x in worker.log().splitlines() if "agents' buffers held at most" in x][-1]  # at shutdown
    high_water = int(line.split("at most ")[1].split()[0])
    # a fetch returns at least one whole producer batch (aiokafka's 16 KiB) per partition, whatever its byte limit
    one_fetch = 16 * 1024 // min(len(orjson.dumps(c)) for c in clicks) * stream_env.settings.partitions
    assert 100 <= high_water < 100 + one_fetch < len(clicks), line


def test_a_bad_event_of_almost_a_megabyte_is_dead_lettered_whole(stream_env: StreamEnv, bundle: Path) -> None:
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    big = b"{" + b"x" * 800_000  # not JSON; the broker takes it, and its dead letter is 4/3 of it in base64
    sent = stream_env.produce(
        "products", [upsert("good-0", "Nike Women Red Shoes"), big, upsert("good-1", "Levis Jeans")]
    )
    [dead] = stream_env.consume("dead-letter", lambda m: len(m) >= 1)
    assert base64.b64decode(dead["value_b64"]) == big and dead["source"]["offset"] == sent[1][1]
    done = stream_env.consume("tag-updates", lambda m: {"good-0", "good-1"} <= {u["product_id"] for u in m})
    assert {u["product_id"] for u in done} == {"good-0", "good-1"}


def test_an_invalid_event_whose_error_would_quote_a_megabyte_is_dead_lettered_and_the_worker_goes_on(
    stream_env: StreamEnv, bundle: Path
) -> None:
    # The reason used to quote every unknown key (escaped: ~6x the event): a 4.4 MB dead letter, over the producer's
    # limit, crashed the worker at the same offset at every restart.
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    keys = {"\x7f" * 40 + f"{i:06d}": 1 for i in range(19_000)}  # DEL: one byte raw, "\\x7f" quoted
    bad = orjson.dumps({**behaviour("p-big", "u1", T0), **keys})
    assert 900_000 < len(bad) < 1_000_000
    sent = stream_env.produce("behavior", [bad, behaviour("p-ok", "u1", T0 + 1)])
    [dead] = stream_env.consume("dead-letter", lambda m: len(m) >= 1)
    assert base64.b64decode(dead["value_b64"]) == bad and dead["source"]["offset"] == sent[0][1]
    assert "unknown keys" in dead["reason"] and "and 18997 more" in dead["reason"] and len(dead["reason"]) < 1100
    stream_env.produce("products", [upsert("p-ok", "Nike Women Red Shoes")])
    after = stream_env.consume("tag-updates", lambda m: any(u["product_id"] == "p-ok" for u in m))
    assert any(u["product_id"] == "p-ok" for u in after) and worker.proc.poll() is None
    deadline, key = time.monotonic() + 30, f"{stream_env.settings.redis_prefix}:{{p-ok}}:beh"
    while (last := stream_env.redis().hget(key, "last_ts")) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last == str(T0 + 1)  # the event after the bad one was applied


def test_a_worker_whose_agent_fails_stops_and_commits_nothing_past_the_failure(
    stream_env: StreamEnv, bundle: Path
) -> None:
    products = stream_env.settings.topic("products")

    async def send_to_partition(key: bytes, value: bytes) -> int:
        producer = AIOKafkaProducer(bootstrap_servers=stream_env.settings.kafka_bootstrap)
        await producer.start()
        try:
            meta = await (await producer.send(products, value, key=key, partition=partition))
            return meta.offset
        finally:
            await producer.stop()

    async def committed() -> int | None:
        consumer = AIOKafkaConsumer(bootstrap_servers=stream_env.settings.kafka_bootstrap, group_id=app_id)
        await consumer.start()
        try:
            return await consumer.committed(TopicPartition(products, partition))
        finally:
            await consumer.stop()

    app_id = stream_env.settings.app_id
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    [(partition, good)] = stream_env.produce("products", [upsert("ok-0", "Nike Women Red Shoes")])
    stream_env.consume("tag-updates", lambda m: any(u["product_id"] == "ok-0" for u in m))
    deadline = time.monotonic() + 30
    while asyncio.run(committed()) != good + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    # an event whose product's state Redis refuses to read (a key of the wrong type: no fault of the event, so it is
    # not dead-lettered): the agent fails, and the worker stops instead of restarting the agent in place with a hole
    # in its acknowledged offsets
    stream_env.redis().hset(f"{stream_env.settings.redis_prefix}:{{bad-0}}:tags", "not", "a string")
    bad = asyncio.run(send_to_partition(b"bad-0", orjson.dumps(upsert("bad-0", "Levis Men Black Jeans"))))
    assert worker.proc.wait(timeout=60) != 0
    assert "Crashed" in worker.log()
    assert asyncio.run(committed()) == good + 1 == bad  # the bad event is neither skipped nor acknowledged


def test_replay_sends_an_event_with_a_non_string_id_for_the_worker_to_dead_letter(
    stream_env: StreamEnv, bundle: Path, tmp_path: Path
) -> None:
    odd = {"schema_version": 1, "op": "upsert", "product_id": 12345, "updated_at": 1, "version": 1, "title": "x"}
    events = tmp_path / "events.jsonl"
    events.write_bytes(orjson.dumps(odd) + b"\n" + orjson.dumps(upsert("after-it", "Levis Men Black Jeans")) + b"\n")
    env = {**os.environ, **stream_env.env}
    done = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "replay", str(events), "--topic", "products", "--send-invalid"],
        env=env,
        cwd=REPO,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    [dead] = stream_env.consume("dead-letter", lambda m: len(m) >= 1)
    assert orjson.loads(base64.b64decode(dead["value_b64"])) == odd
    assert any(u["product_id"] == "after-it" for u in stream_env.consume("tag-updates", lambda m: len(m) >= 1))


def test_tail_prints_a_topics_records_and_refuses_one_that_does_not_exist(stream_env: StreamEnv) -> None:
    stream_env.produce("behavior", [behaviour("p-tail", "u1", T0)])
    env = {**os.environ, **stream_env.env}
    tail = [sys.executable, "-m", "tagstream.cli", "tail", "-n", "1"]
    done = subprocess.run([*tail, "behavior"], env=env, cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == 0 and orjson.loads(done.stdout)["product_id"] == "p-tail"
    assert b"INFO aiokafka" not in done.stderr  # `tail ... 2>&1` shows records, not the client's chatter
    wrong = subprocess.run([*tail, "behaviour"], env=env, cwd=REPO, capture_output=True, timeout=60)
    assert wrong.returncode == 2 and b"no topic" in wrong.stderr and b"Traceback" not in wrong.stderr


def test_a_worker_given_a_bundle_that_fails_validation_refuses_to_start_in_one_line(
    stream_env: StreamEnv, bundle: Path, tmp_path: Path
) -> None:
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    with (tampered / "thresholds.json").open("a") as f:
        f.write(" ")
    env = {**os.environ, **stream_env.env, "TAGSTREAM_MODEL_PATH": str(tampered)}
    done = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "worker"], env=env, cwd=REPO, capture_output=True, timeout=120
    )
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err and "crash" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if "error" in x.lower()]
    assert line.startswith("tagstream worker: error: ") and "thresholds.json: sha256 mismatch" in line, line


def test_tail_into_a_pipe_its_reader_closes_stops_quietly(stream_env: StreamEnv) -> None:
    # ~250 KB of output: more than a pipe holds, so tail is still writing when head has gone
    stream_env.produce("behavior", [behaviour(f"p-{i}", "u1", T0 + i) for i in range(2000)])
    env = {**os.environ, **stream_env.env}
    done = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m tagstream.cli tail -n 2000 behavior | head -1; exit ${{PIPESTATUS[0]}}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert len(done.stdout.splitlines()) == 1 and b"Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 141  # as `yes | head` ends: what a shell script with pipefail expects


@pytest.mark.parametrize("command", [["publish"], ["model", "activate"]])
def test_sending_a_model_update_to_a_prefix_without_topics_fails_at_once_in_one_line(
    stack: Any, bundle: Path, command: list[str]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}-"  # no topic created under it (the broker does not auto-create topics)
    env = {
        **os.environ,
        "TAGSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "TAGSTREAM_REDIS_URL": stack.redis_url,
        "TAGSTREAM_TOPIC_PREFIX": prefix,
        "TAGSTREAM_REDIS_PREFIX": prefix.rstrip("-"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", *command, "--model", str(bundle)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("tagstream ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "not found in cluster metadata" not in done.stderr, f"{done.stderr.count(chr(10))} lines"
    assert len(errors) == 1 and f"topic {prefix}model-updates does not exist" in errors[0], done.stderr[-2000:]
    assert "`tagstream topics` creates it" in errors[0]


@pytest.mark.parametrize("command", [["publish"], ["model", "activate"]])
def test_sending_a_model_update_to_a_topic_with_two_partitions_is_refused_in_one_line(
    stack: Any, bundle: Path, command: list[str]
) -> None:
    from aiokafka.admin import NewTopic

    prefix = f"t{uuid.uuid4().hex[:10]}-"
    topic = f"{prefix}model-updates"

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 2, 1)])
        finally:
            await admin.close()

    asyncio.run(create())
    published = bundle.parent / "published.jsonl"
    before = published.read_text() if published.exists() else ""
    env = {**os.environ, "TAGSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "TAGSTREAM_TOPIC_PREFIX": prefix}
    done = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", *command, "--model", str(bundle)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("tagstream ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and f"topic {topic} has 2 partitions, but model-updates must have exactly 1" in errors[0]
    assert (published.read_text() if published.exists() else "") == before  # nothing recorded as published


def test_a_worker_refuses_to_resume_on_a_redis_that_lost_its_state_and_a_new_group_rebuilds_it(
    stream_env: StreamEnv, bundle: Path
) -> None:
    from streams.app import committed_input_offsets

    settings = stream_env.settings
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    stream_env.produce("products", [upsert("kept-1", "Levis Men Black Jeans", attributes={"colour": "Black"})])
    stream_env.consume("tag-updates", lambda m: any(u["product_id"] == "kept-1" for u in m))
    deadline = time.monotonic() + 30
    while not asyncio.run(committed_input_offsets(settings)) and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.stop()
    client = stream_env.redis()
    client.delete(*client.scan_iter(f"{settings.redis_prefix}:*"))  # a Redis restarted without persistence

    env = {**os.environ, **stream_env.env, "TAGSTREAM_MODEL_PATH": str(bundle)}
    refused = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "worker"], env=env, cwd=REPO, capture_output=True, timeout=120
    )
    err = refused.stderr.decode()
    assert refused.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert f"Redis holds no tagstream state under prefix {settings.redis_prefix!r}" in err
    assert f"consumer group {settings.app_id!r} has committed offsets ({settings.topic('products')}:" in err
    assert list(client.scan_iter(f"{settings.redis_prefix}:*")) == []  # nothing written: the next start refuses too

    # the remedy the error names: a new consumer group replays the topics into the empty store
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_APP_ID=f"{settings.app_id}-rebuilt")
    deadline = time.monotonic() + 60
    while not client.exists(f"{settings.redis_prefix}:{{kept-1}}:doc") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.hget(f"{settings.redis_prefix}:{{kept-1}}:doc", "version") == "1"


def test_a_running_worker_whose_redis_loses_its_state_stops_instead_of_writing_on(
    stream_env: StreamEnv, bundle: Path
) -> None:
    """Redis restarted without its data under a running worker: it wrote on into the empty store (counters ~26 %
    low, category tags gone from updates) without a word. It now stops within seconds, and its next start refuses."""
    settings = stream_env.settings
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    stream_env.produce("products", [upsert("kept-1", "Levis Men Black Jeans")])
    stream_env.consume("tag-updates", lambda m: any(u["product_id"] == "kept-1" for u in m))
    client = stream_env.redis()
    client.delete(*client.scan_iter(f"{settings.redis_prefix}:*"))  # flushed, or restarted without its AOF
    stream_env.produce("products", [upsert("after-1", "Nike Running Shoes")])
    code = worker.wait_exit(30)
    assert code not in (None, 0), worker.log()[-3000:]
    assert f"Redis lost tagstream's state under prefix {settings.redis_prefix!r} while this worker ran" in worker.log()

    env = {**os.environ, **stream_env.env, "TAGSTREAM_MODEL_PATH": str(bundle)}
    again = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "worker"], env=env, cwd=REPO, capture_output=True, timeout=120
    )
    err = again.stderr.decode()
    assert again.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "Redis holds no tagstream state" in err and "a new TAGSTREAM_REDIS_PREFIX" in err


async def _delete_input_topics(settings: WorkerSettings) -> None:
    """Delete the products and behavior topics and wait until the broker no longer lists them."""
    names = [settings.topic("products"), settings.topic("behavior")]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
        deadline = time.monotonic() + 30
        while set(names) & set(await admin.list_topics()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def test_a_worker_refuses_a_redis_state_applied_from_topics_that_were_deleted_and_made_again(
    stream_env: StreamEnv, bundle: Path
) -> None:
    from streams.app import reused_input_offsets
    from streams.state import RedisStateStore

    settings = stream_env.settings
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    first = [upsert(f"old-{i}", "Levis Men Black Jeans") for i in range(4)]
    stream_env.produce("products", first)
    stream_env.produce("behavior", [behaviour("old-0", "u1", T0)])
    stream_env.consume("tag-updates", lambda m: {u["product_id"] for u in m} >= {e["product_id"] for e in first})
    worker.stop()

    async def applied() -> dict[str, int]:
        store = RedisStateStore.from_url(settings.redis_url.get_secret_value(), settings.redis_prefix)
        try:
            return await store.applied_offsets()
        finally:
            await store.close()

    offsets = asyncio.run(applied())
    assert {w.rpartition(":")[0] for w in offsets} == {settings.topic("products"), settings.topic("behavior")}
    assert all(ts is not None for _, ts in offsets.values())  # each with its record's Kafka timestamp
    assert asyncio.run(reused_input_offsets(offsets, settings)) == {}  # the same topics: a restart is fine
    products = settings.topic("products")
    beyond = {f"{products}:{settings.partitions}": (0, None), f"other-{products}:0": (10**9, None)}  # other's: no
    assert asyncio.run(reused_input_offsets(beyond, settings)) == {
        f"{products}:{settings.partitions}": "applied up to 0, which does not exist"
    }

    asyncio.run(_delete_input_topics(settings))  # the topics are made again, Redis kept
    asyncio.run(ensure_topics(settings))
    assert any("which ends at 0" in why for why in asyncio.run(reused_input_offsets(offsets, settings)).values())
    stream_env.produce("products", first)  # the catalog sent again before a worker starts: the same offsets reached
    stream_env.produce("behavior", [behaviour("old-0", "u1", T0)])
    env = {**os.environ, **stream_env.env, "TAGSTREAM_MODEL_PATH": str(bundle)}
    refused = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "worker"], env=env, cwd=REPO, capture_output=True, timeout=120
    )
    err = refused.stderr.decode()
    assert refused.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert f"Redis holds tagstream state under prefix {settings.redis_prefix!r} applied from records Kafka" in err
    assert f"{products}:" in err and "was produced at" in err and "not at" in err
    assert "start on a new TAGSTREAM_REDIS_PREFIX" in err

    # the remedy the error names: a new prefix takes the new topics' events from their first offset
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_REDIS_PREFIX=f"{settings.redis_prefix}-new")
    stream_env.produce("products", [upsert("new-0", "Nike Women Red Running Shoes")])
    client = stream_env.redis()
    deadline = time.monotonic() + 60
    while not client.exists(f"{settings.redis_prefix}-new:{{new-0}}:doc") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.hget(f"{settings.redis_prefix}-new:{{new-0}}:doc", "version") == "1"
    client.delete(*client.scan_iter(f"{settings.redis_prefix}-new:*"))


def test_an_invalid_event_with_megabytes_of_compressed_headers_is_dead_lettered_and_the_worker_goes_on(
    stream_env: StreamEnv, bundle: Path
) -> None:
    async def send_compressed() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=stream_env.settings.kafka_bootstrap, compression_type="gzip", max_request_size=64 * 2**20
        )
        await producer.start()
        try:  # ~5 KB on the wire, 5 MiB of headers once read: over the dead-letter topic's 4 MiB
            headers = [(f"h{i}", b"\0" * 2**20) for i in range(5)]
            topic = stream_env.settings.topic("products")
            await producer.send_and_wait(topic, b'{"not": "a product"}', key=b"p-big", headers=headers)
        finally:
            await producer.stop()

    asyncio.run(send_compressed())
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle))
    stream_env.produce("products", [upsert("after-big", "Levis Men Black Jeans")])
    [letter] = stream_env.consume("dead-letter", lambda m: len(m) >= 1)
    assert letter["value_b64"] and "its 5 headers (5242890 bytes) were left out: too large" in letter["reason"]
    assert ["tagstream-headers-dropped", "5"] in letter["_headers"]
    assert any(u["product_id"] == "after-big" for u in stream_env.consume("tag-updates", lambda m: len(m) >= 1))
    assert worker.proc.poll() is None  # before: refused at every redelivery, the worker stopped for good


def test_redrive_sends_the_selected_dead_letters_back_once_their_cause_is_fixed(
    stream_env: StreamEnv, bundle: Path
) -> None:
    ahead = int(time.time() * 1000) + 3_600_000  # an hour ahead: refused while the time check allows 1 s
    worker = stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_MAX_EVENT_AHEAD_MS="1000")
    trace = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    early = upsert("early-1", "Levis Men Black Jeans", updated_at=ahead)
    stream_env.produce("products", [early, {"schema_version": 1, "op": "upsert", "product_id": "x"}], headers=trace)
    dead = stream_env.consume("dead-letter", lambda m: len(m) >= 2)
    assert sorted(d["error_type"] for d in dead) == ["EventTimeError", "SchemaValidationError"]
    worker.stop()
    # the cause fixed (the producer's clock, say; here the check is turned off), the letters are sent back
    stream_env.start_worker(TAGSTREAM_MODEL_PATH=str(bundle), TAGSTREAM_MAX_EVENT_AHEAD_MS="0")
    env = {**os.environ, **stream_env.env}
    cmd = [sys.executable, "-m", "tagstream.cli", "redrive", "--error-type", "EventTimeError"]

    def run(*extra: str) -> dict[str, Any]:
        done = subprocess.run([*cmd, *extra], env=env, cwd=REPO, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return orjson.loads(done.stdout)

    planned = run("--dry-run")
    assert planned == {
        "first_offset": 0,
        "next_offset": 2,
        "dry_run": True,
        "would_send": {"products": 1},
        "skipped": {"error type not selected": 1},
    }
    sent = run()
    assert sent["sent"] == {"products": 1} and sent["next_offset"] == 2
    # the same command again sends nothing: the event was sent back (recorded in Redis), and would count twice
    assert run() == {
        "first_offset": 0,
        "next_offset": 2,
        "dry_run": False,
        "sent": {},
        "skipped": {"error type not selected": 1, "event already sent back": 1},
    }
    assert run("--dry-run", "--again")["would_send"] == {"products": 1}  # unless asked to
    typo = subprocess.run([*cmd, "--error-type", "EventTimeErorr", "--dry-run"], env=env, cwd=REPO, capture_output=True)
    assert typo.returncode == 0 and orjson.loads(typo.stdout)["would_send"] == {}
    assert typo.stderr.decode().strip() == (
        "tagstream redrive: warning: no letter in [0, 2) has error type EventTimeErorr; the error types of the "
        "input topics' letters there: EventTimeError (1), SchemaValidationError (1)"
    )
    [update] = [u for u in stream_env.consume("tag-updates", lambda m: len(m) >= 1) if u["product_id"] == "early-1"]
    assert update["event_time"] == ahead
    [again] = [m for m in stream_env.consume("products", lambda m: len(m) >= 3) if m.get("updated_at") == ahead][1:]
    dl_topic = stream_env.settings.topic("dead-letter")
    [letter] = [d["_offset"] for d in dead if d["error_type"] == "EventTimeError"]
    assert again["_headers"] == [[k, v.decode()] for k, v in trace] + [
        ["tagstream-redriven-from", f"{dl_topic}:{letter}"]
    ]
    assert run("--from-offset", str(sent["next_offset"]))["sent"] == {}  # the next run starts after them


def letter(settings: WorkerSettings, topic: str, partition: int, offset: int, value: bytes) -> bytes:
    """A dead letter (EventTimeError) of the event `value`, keyed p1, from `topic` partition/offset."""
    return orjson.dumps(
        {
            "schema_version": 1, "reason": "x", "error_type": "EventTimeError",
            "source": {"topic": settings.topic(topic), "partition": partition, "offset": offset},
            "key_b64": base64.b64encode(b"p1").decode(), "value_b64": base64.b64encode(value).decode(),
            "failed_at": T0,
        }
    )  # fmt: skip


def write_letters(settings: WorkerSettings, letters: list[bytes]) -> None:
    """Write these dead letters, in order, to the dead-letter topic."""

    async def write() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=8 * 2**20)
        await producer.start()
        try:
            for value in letters:
                await producer.send_and_wait(settings.topic("dead-letter"), value)
        finally:
            await producer.stop()

    asyncio.run(write())


def test_redrive_stops_at_a_letter_the_broker_refuses_and_says_where_to_go_on(stream_env: StreamEnv) -> None:
    settings = stream_env.settings
    click = orjson.dumps(behaviour("p1", "u1", T0))
    compressible = orjson.dumps(upsert("p1", "a" * 1_500_000))  # over the products topic's 1 MiB unless compressed
    incompressible = base64.b64encode(os.urandom(1_200_000))  # over it however it is sent
    events = [("behavior", click), ("products", compressible), ("products", incompressible), ("behavior", click)]
    write_letters(settings, [letter(settings, topic, 0, source, value) for source, (topic, value) in enumerate(events)])
    env = {**os.environ, **stream_env.env}
    cmd = [sys.executable, "-m", "tagstream.cli", "redrive"]
    types = ["--error-type", "EventTimeError", "--error-type", "EventKeyError"]
    done = subprocess.run([*cmd, *types], env=env, cwd=REPO, capture_output=True, timeout=120)
    line = orjson.loads(done.stdout)
    assert done.returncode == 2 and b"Traceback" not in done.stderr, done.stderr[-2000:]
    # the compressible 1.5 MB event went back (compressed, as its producer may have sent it); the run stopped at the
    # refused one, all before it sent and nothing after it, and says where the next run starts
    assert line["sent"] == {"behavior": 1, "products": 1} and line["next_offset"] == 2
    assert line["error"].startswith(f"dead letter 2 to {settings.topic('products')}: ")
    warning, error = done.stderr.decode().splitlines()
    assert error.startswith("tagstream redrive: error: stopped at dead letter 2")
    # the letters counted are those before next_offset only (the whole batch was: EventTimeError (4))
    assert warning.endswith("no letter in [0, 2) has error type EventKeyError; the error types of the input topics' "
                            "letters there: EventTimeError (2)")  # fmt: skip
    # the refused event was not taken: its claim is released, so a run from next_offset tries it again
    recorded = stream_env.redis().hgetall(f"{settings.redis_prefix}:redriven")
    dl_topic = settings.topic("dead-letter")
    assert recorded == {
        f"{settings.topic('behavior')}:0:0": f"{dl_topic}:0",
        f"{settings.topic('products')}:0:1": f"{dl_topic}:1",
    }
    again = subprocess.run([*cmd, "--from-offset", "2"], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert again.returncode == 2 and orjson.loads(again.stdout)["next_offset"] == 2  # refused again, not skipped
    skip_it = subprocess.run([*cmd, "--from-offset", "3"], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert orjson.loads(skip_it.stdout)["sent"] == {"behavior": 1}
    past_end = subprocess.run([*cmd, "--from-offset", "50"], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert orjson.loads(past_end.stdout)["next_offset"] == 4  # where the topic ends: no letter is skipped later


def test_redrive_sends_an_event_dead_lettered_twice_once(stream_env: StreamEnv) -> None:
    """A worker that restarts before committing dead-letters the same events again: each is sent back once."""
    settings = stream_env.settings
    clicks = {offset: orjson.dumps(behaviour("p1", f"u{offset}", T0 + offset)) for offset in (7, 8)}
    # the third: offset 7 dead-lettered again after a restart
    write_letters(settings, [letter(settings, "behavior", 1, offset, clicks[offset]) for offset in (7, 8, 7)])
    env = {**os.environ, **stream_env.env}
    done = subprocess.run([sys.executable, "-m", "tagstream.cli", "redrive"], env=env, cwd=REPO, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    line = orjson.loads(done.stdout)
    assert line["sent"] == {"behavior": 2} and line["skipped"] == {"event already sent back": 1}
    sent = stream_env.consume("behavior", lambda m: len(m) >= 2)
    assert sorted(orjson.dumps({k: v for k, v in m.items() if not k.startswith("_")}) for m in sent) == sorted(
        clicks.values()
    )
    recorded = stream_env.redis().hgetall(f"{settings.redis_prefix}:redriven")
    dl_topic, events = settings.topic("dead-letter"), settings.topic("behavior")
    assert recorded == {f"{events}:1:7": f"{dl_topic}:0", f"{events}:1:8": f"{dl_topic}:1"}


def test_redrive_skips_an_event_another_run_claimed_until_sent_again_with_again(stream_env: StreamEnv) -> None:
    """Two runs at once both sent every event (each read the records before either wrote one); an event claimed by
    another run, still sending it or stopped before recording it, is skipped as in doubt, and `--again` sends it."""
    settings = stream_env.settings
    clicks = {offset: orjson.dumps(behaviour("p1", f"u{offset}", T0 + offset)) for offset in (3, 4)}
    write_letters(settings, [letter(settings, "behavior", 0, offset, clicks[offset]) for offset in (3, 4)])
    key, events, dl_topic = (
        f"{settings.redis_prefix}:redriven",
        settings.topic("behavior"),
        settings.topic("dead-letter"),
    )
    store = stream_env.redis()
    store.hset(key, f"{events}:0:3", "pending:x")  # claimed by another run (going on, or stopped before its record)
    env = {**os.environ, **stream_env.env}
    cmd = [sys.executable, "-m", "tagstream.cli", "redrive"]

    def run(*extra: str) -> dict[str, Any]:
        done = subprocess.run([*cmd, *extra], env=env, cwd=REPO, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return orjson.loads(done.stdout)

    in_doubt = {"claimed by another run, send in doubt": 1}
    assert run("--dry-run") == {
        "first_offset": 0, "next_offset": 2, "dry_run": True, "would_send": {"behavior": 1}, "skipped": in_doubt,
    }  # fmt: skip
    assert store.hgetall(key) == {f"{events}:0:3": "pending:x"}  # a dry run writes nothing
    first = run()
    assert first["sent"] == {"behavior": 1} and first["skipped"] == in_doubt
    assert store.hgetall(key) == {f"{events}:0:3": "pending:x", f"{events}:0:4": f"{dl_topic}:1"}
    assert run() == {
        "first_offset": 0,
        "next_offset": 2,
        "dry_run": False,
        "sent": {},
        "skipped": {**in_doubt, "event already sent back": 1},
    }
    assert run("--again", "--from-offset", "0", "--to-offset", "1")["sent"] == {"behavior": 1}  # resent, overwritten
    assert store.hgetall(key) == {f"{events}:0:3": f"{dl_topic}:0", f"{events}:0:4": f"{dl_topic}:1"}
    assert run()["skipped"] == {"event already sent back": 2}
    sent = stream_env.consume("behavior", lambda m: len(m) >= 2)
    assert sorted(m["user_id"] for m in sent) == ["u3", "u4"]  # each once


def test_redrive_refuses_a_dead_letter_topic_of_several_partitions_in_one_line(stack: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}-"

    async def create() -> None:
        from aiokafka.admin import NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(f"{prefix}dead-letter", 3, 1)])
        finally:
            await admin.close()

    asyncio.run(create())
    env = {**os.environ, "TAGSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "TAGSTREAM_TOPIC_PREFIX": prefix}
    cmd = [sys.executable, "-m", "tagstream.cli", "redrive"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip() == (
        f"tagstream redrive: error: topic {prefix}dead-letter has 3 partitions; redrive reads a one-partition "
        "dead-letter topic, as `tagstream topics` creates it"
    )
