"""Worker statuses in `<prefix>:workers`: a killed worker's status is removed by the running workers once older than
the retention (checked and deleted atomically), `tagstream model status --prune` removes stale ones at once, and
statuses that are not a worker's JSON are shown as unreadable and left alone. The retention setting and the prune
options are checked first, without services (one file: a basename may not repeat across tests/unit and
tests/integration, which have no `__init__.py`)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer

from schemas import ModelUpdate
from streams.model import ModelHolder
from streams.model_cli import PRUNE_STATUS_LUA, UNREADABLE, parse_status, send_model_update, stale_statuses, workers_key
from streams.models_agent import ModelUpdatesAgent
from streams.settings import WorkerSettings
from tagstream.cli import main
from tagstream.errors import ConfigError
from tagstream.settings import load_settings
from tests.integration.conftest import StreamEnv

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def status(reported_at: int, active: str | None = None) -> bytes:
    """A worker's status as `ModelHolder.status()` writes it."""
    return orjson.dumps(
        {"active": active, "previous": None, "shadow": None, "at": reported_at, "reported_at": reported_at}
    )


def raw_redis(se: StreamEnv) -> redis.Redis:
    """A client that returns bytes (the hash may hold values that are not UTF-8)."""
    return redis.Redis.from_url(se.settings.redis_url.get_secret_value())


def workers(se: StreamEnv) -> set[str]:
    return set(se.redis().hkeys(workers_key(se.settings.redis_prefix)))


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], se: StreamEnv, *argv: str
) -> tuple[int, str]:
    """`tagstream <argv>` in this process with the test's settings: (exit code, stdout + stderr)."""
    for name, value in se.env.items():
        monkeypatch.setenv(name, value)
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


# --------------------------------------------------------------------------------------------------- no services


def test_the_status_retention_defaults_to_an_hour_and_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(WorkerSettings, "worker").worker_status_retention_s == 3600
    monkeypatch.setenv("TAGSTREAM_WORKER_STATUS_RETENTION_S", "15.5")
    assert load_settings(WorkerSettings, "worker").worker_status_retention_s == 15.5


@pytest.mark.parametrize("value", ["15", "10", "0", "-3600", "nan", "inf", "an hour"])
def test_a_status_retention_a_live_worker_could_miss_is_one_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """At most 3 status writes (15 s) may be missed by a live worker: a retention that short could remove its status."""
    monkeypatch.setenv("TAGSTREAM_WORKER_STATUS_RETENTION_S", value)
    with pytest.raises(ConfigError, match="worker_status_retention_s") as err:
        load_settings(WorkerSettings, "worker")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object but array"),
        (b"null", "not a JSON object but null"),
        (b'{"active": "m", "reported_at": "yesterday"}', "reported_at is not a number"),
        (b'{"active": "m", "reported_at": true}', "reported_at is not a number"),
        (b'{"active": "m"}', "no reported_at"),
    ],
)
def test_a_status_that_is_not_a_workers_json_is_unreadable_and_never_stale(raw: bytes, reason: str) -> None:
    assert parse_status(raw)[UNREADABLE].startswith(reason)
    assert stale_statuses({b"w": raw}, cutoff_ms=10**15) == {}


def test_stale_statuses_are_those_reported_before_the_cutoff_except_the_kept_one() -> None:
    raw = {
        b"dead": b'{"active": null, "reported_at": 1000}',
        b"me": b'{"active": null, "reported_at": 1000}',
        b"live": b'{"active": null, "reported_at": 5000}',
        b"never": b'{"active": null}',
    }
    assert stale_statuses(raw, cutoff_ms=5000, keep=b"me") == {b"dead": 1000}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model", "status", "--older-than", "60"], "--older-than goes with --prune"),
        (["model", "status", "--prune", "--older-than", "14"], "--older-than must be a number of seconds of at least"),
        (["model", "status", "--prune", "--older-than", "nan"], "--older-than must be a number of seconds of at least"),
    ],
)
def test_bad_prune_options_are_one_line_before_redis_is_touched(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    monkeypatch.setenv("TAGSTREAM_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing there: refused before any read
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tagstream model: error: ") and message in err and "\n" not in err


# --------------------------------------------------------------------------------------------------- on the stack


def test_a_status_write_removes_other_statuses_older_than_the_retention(stream_env: StreamEnv) -> None:
    se = stream_env
    key = workers_key(se.settings.redis_prefix)
    now = now_ms()
    se.redis().hset(
        key,
        mapping={
            "w-killed": status(now - 2 * HOUR_MS),  # killed an hour ago or more
            "w-quiet": status(now - 600_000),  # not reporting for 10 minutes: kept until the retention
            "w-bad": b"{not json",  # unreadable: left alone
            b"w-\xff": status(now - 2 * HOUR_MS),  # a field name that is not UTF-8 goes too
        },
    )
    settings = se.settings.model_copy(update={"worker_id": "w-live"})
    agent = ModelUpdatesAgent(SimpleNamespace(settings=settings, topics={}), ModelHolder(settings))  # type: ignore[arg-type]

    async def write() -> None:
        agent.redis = agent._connect()
        try:
            await agent._write_status(force=True)
        finally:
            await agent.redis.aclose()

    asyncio.run(write())
    assert workers(se) == {"w-live", "w-quiet", "w-bad"}
    assert json.loads(se.redis().hget(key, "w-live") or "")["reported_at"] >= now


def test_the_prune_script_keeps_a_status_rewritten_after_it_was_read_as_stale(stream_env: StreamEnv) -> None:
    se = stream_env
    key = workers_key(se.settings.redis_prefix)
    client = raw_redis(se)
    now = now_ms()
    old = now - 2 * HOUR_MS
    client.hset(key, mapping={"w-back": status(old), "w-gone": status(old), "w-garbled": status(old)})
    cutoff = now - HOUR_MS
    stale = stale_statuses(client.hgetall(key), cutoff)
    assert set(stale) == {b"w-back", b"w-gone", b"w-garbled"}
    # Between the check and the delete, one worker reports again and another status is overwritten with garbage.
    client.hset(key, mapping={"w-back": status(now), "w-garbled": b"{not json"})
    removed = client.register_script(PRUNE_STATUS_LUA)(keys=[key], args=[cutoff, *stale])
    assert removed == [b"w-gone"]
    assert client.hgetall(key) == {b"w-back": status(now), b"w-garbled": b"{not json"}


def test_status_prune_removes_stale_statuses_and_prints_them(
    stream_env: StreamEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    se = stream_env
    key = workers_key(se.settings.redis_prefix)
    now = now_ms()
    killed, quiet = now - 2 * HOUR_MS, now - 600_000
    se.redis().hset(
        key,
        mapping={"w-killed": status(killed), "w-quiet": status(quiet), "w-live": status(now), "w-bad": "[1, 2]"},
    )
    kept_bad = "kept w-bad: unreadable status (not a JSON object but array)"

    code, out = run(monkeypatch, capsys, se, "model", "status", "--prune")  # the retention: 3600 s
    assert (code, out.splitlines()) == (0, [f"removed w-killed: last reported {when(killed)}", kept_bad])
    assert workers(se) == {"w-quiet", "w-live", "w-bad"}

    code, out = run(monkeypatch, capsys, se, "model", "status", "--prune", "--older-than", "60", "--json")
    assert code == 0 and json.loads(out) == {
        "removed": {"w-quiet": quiet},
        "unreadable": {"w-bad": "not a JSON object but array"},
    }
    assert workers(se) == {"w-live", "w-bad"}  # a live worker's status is never removed

    code, out = run(monkeypatch, capsys, se, "model", "status", "--prune", "--older-than", "15")
    assert (code, out.splitlines()) == (0, [kept_bad, f"no worker status older than 15s in {key}"])


def test_status_shows_unreadable_statuses_and_not_workers_whose_last_answer_expired(
    stream_env: StreamEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    se = stream_env
    key = workers_key(se.settings.redis_prefix)
    now = now_ms()
    client = raw_redis(se)
    client.hset(key, mapping={"w-bad": b"{not json", "w-list": b"[1, 2]", "w-bytes": b"\xff\xfe"})
    topic = se.settings.topic("model-updates")
    poll(lambda: asyncio.run(broker_has(se, topic)), f"{topic} in the broker's metadata")  # just created
    # A request with --wait does not wait for them, and says why.
    code, out = run(monkeypatch, capsys, se, "model", "rollback", "--version", "m-0", "--wait", "30")
    assert code == 0, out
    assert "not waiting for w-list: its status is unreadable (not a JSON object but array)" in out.splitlines()
    assert "no worker reported its status in the last 15s: no answer to wait for" in out

    client.hset(key, "w-live", status(now, active="m-1"))
    for worker, at in [("w-long-gone", now - 2 * HOUR_MS), ("w-stopped", now - 60_000)]:  # no status left in Redis
        answer = ModelUpdate(kind="model-activated", model_version="m-1", emitted_at=at, worker_id=worker)
        asyncio.run(send_model_update(se.settings.kafka_bootstrap, topic, answer, b"tiny"))

    code, out = run(monkeypatch, capsys, se, "model", "status")
    assert code == 0, out
    lines = out.splitlines()
    assert any(line.startswith("w-bad (unreadable status: not JSON: ") for line in lines), out
    assert any(line.startswith("w-bytes (unreadable status: not JSON: ") for line in lines), out
    assert "w-list (unreadable status: not a JSON object but array)" in lines
    assert "w-live" in lines  # and a worker known by its answer only, with that answer (no model shown as running)
    stopped = lines.index("w-stopped (stopped: no status; its last answer within TAGSTREAM_WORKER_STATUS_RETENTION_S)")
    assert lines[stopped + 1].startswith("  last answer: model-activated m-1")
    assert "w-long-gone" not in out  # its last answer is older than the status retention

    code, out = run(monkeypatch, capsys, se, "model", "status", "--json")
    report: dict[str, Any] = json.loads(out)
    assert code == 0 and set(report) == {"w-bad", "w-list", "w-bytes", "w-live", "w-stopped"}
    assert report["w-list"] == {"unreadable": "not a JSON object but array", "last_answer": None}
    assert report["w-live"]["active"] == "m-1"


def test_a_running_worker_removes_the_status_a_killed_worker_left(stream_env: StreamEnv) -> None:
    se = stream_env
    key = workers_key(se.settings.redis_prefix)
    client = se.redis()
    killed = se.start_worker(TAGSTREAM_WORKER_ID="w-killed")
    poll(lambda: client.hexists(key, "w-killed"), "the first worker's status")
    killed.kill9()
    # An hour and more passes: the status it left is that old now.
    left = json.loads(client.hget(key, "w-killed") or "")
    client.hset(key, "w-killed", json.dumps({**left, "reported_at": now_ms() - 2 * HOUR_MS}))
    client.hset(key, "w-quiet", status(now_ms() - 600_000))
    se.start_worker(TAGSTREAM_WORKER_ID="w-running")
    poll(lambda: workers(se) == {"w-running", "w-quiet"}, "w-killed's status removed by w-running, w-quiet's kept")


async def broker_has(se: StreamEnv, topic: str) -> bool:
    consumer = AIOKafkaConsumer(bootstrap_servers=se.settings.kafka_bootstrap)
    await consumer.start()
    try:
        return topic in await consumer.topics()
    finally:
        await consumer.stop()


def poll(check: Any, what: str, timeout: float = 60) -> None:
    """Wait (bounded) until `check()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"not seen within {timeout:g}s: {what}")


def test_a_worker_reports_its_status_every_few_seconds_whatever_its_shadow_flush_interval(
    stream_env: StreamEnv,
) -> None:
    # Other workers remove a status not reported for the retention, and `model ... --wait` reads it: a worker whose
    # shadow diffs are flushed once a minute still writes its status every STATUS_EVERY_S (5 s).
    se = stream_env
    key = workers_key(se.settings.redis_prefix)
    client = se.redis()
    se.start_worker(TAGSTREAM_WORKER_ID="w-slow-flush", TAGSTREAM_SHADOW_FLUSH_INTERVAL="60")
    poll(lambda: client.hexists(key, "w-slow-flush"), "the worker's first status")
    first = json.loads(client.hget(key, "w-slow-flush") or "")["reported_at"]
    poll(
        lambda: json.loads(client.hget(key, "w-slow-flush") or "{}").get("reported_at", first) >= first + 8_000,
        "two more status writes within 30 s",
        timeout=30,
    )
