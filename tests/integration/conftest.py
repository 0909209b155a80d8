"""Integration fixtures: the real local stack, a fresh topic set / consumer group / Redis prefix per test, and real
worker processes (`tagstream worker`) that can be killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis.backoff import NoBackoff
from redis.retry import Retry

from streams.settings import WorkerSettings
from streams.topics import ensure_topics
from tagstream.stack import StackSettings, stack_status

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stack() -> StackSettings:
    """The running local stack; fails with the command to run when it is down (integration tests never skip)."""
    settings = StackSettings()
    status = stack_status(settings)
    if not status.up:
        pytest.fail(f"the local stack is not up ({status.describe()}); run `tagstream stack up` first")
    return settings


@dataclass
class StreamEnv:
    """One test's private slice of the stack: its topics, consumer group and Redis prefix."""

    settings: WorkerSettings
    env: dict[str, str]
    tmp: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def redis(self) -> redis.Redis:
        """A synchronous Redis client (tests read state with it)."""
        return redis.Redis.from_url(self.settings.redis_url.get_secret_value(), decode_responses=True)

    def start_worker(self, **extra_env: str) -> WorkerProcess:
        """Start `tagstream worker` in a subprocess with this test's settings."""
        log_path = self.tmp / f"worker-{len(self.workers)}.log"
        proc = WorkerProcess.start({**self.env, **extra_env}, log_path)
        self.workers.append(proc)
        return proc

    def produce(
        self, topic: str, events: list[Any], headers: list[tuple[str, bytes]] | None = None
    ) -> list[tuple[int, int]]:
        """Send events (dicts are JSON-encoded, bytes sent raw) keyed by product_id, each with `headers`; returns
        (partition, offset)."""
        return asyncio.run(produce(self.settings, topic, events, headers))

    def consume(
        self, topic: str, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """Read `topic` from the start until `until(messages)` holds; fail with what was seen at the deadline."""
        return asyncio.run(consume(self.settings, topic, until, timeout))


def _cleanup(se: StreamEnv) -> None:
    for worker in se.workers:
        worker.stop()
    client = se.redis()
    keys = list(client.scan_iter(f"{se.settings.redis_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def make_stream_env(stack: StackSettings, tmp_path: Path) -> Iterator[Callable[..., StreamEnv]]:
    """Factory of private stack slices: fresh topics (created), consumer group and Redis prefix each."""
    made: list[StreamEnv] = []

    def make(partitions: int = 2, **extra: str) -> StreamEnv:
        tag = uuid.uuid4().hex[:10]
        env = {
            "TAGSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "TAGSTREAM_REDIS_URL": stack.redis_url,
            "TAGSTREAM_TOPIC_PREFIX": f"t{tag}-",
            "TAGSTREAM_APP_ID": f"tagstream-test-{tag}",
            "TAGSTREAM_REDIS_PREFIX": f"t{tag}",
            "TAGSTREAM_PARTITIONS": str(partitions),
            "TAGSTREAM_USER_HASH_KEY": "integration-test-key",
            "TAGSTREAM_DATA_DIR": str(tmp_path / tag / "faust"),
            **extra,
        }
        settings = WorkerSettings(**{k.removeprefix("TAGSTREAM_").lower(): v for k, v in env.items()})
        asyncio.run(ensure_topics(settings))
        work = tmp_path / tag
        work.mkdir(exist_ok=True)
        se = StreamEnv(settings, env, work)
        made.append(se)
        return se

    yield make
    for se in made:
        _cleanup(se)


@pytest.fixture
def stream_env(make_stream_env: Callable[..., StreamEnv]) -> StreamEnv:
    """One private stack slice with 2 partitions per product topic."""
    return make_stream_env()


class WorkerProcess:
    """A `tagstream worker` subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @classmethod
    def start(cls, env: dict[str, str], log_path: Path) -> WorkerProcess:
        """Spawn a worker and wait until Faust reports it ready."""
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tagstream.cli", "worker"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        worker = cls(proc, log_path)
        worker.wait_for_log("Ready", timeout=120)
        return worker

    def log(self) -> str:
        """The worker's output so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> None:
        """Wait until the log contains `needle`; fail with the log if the worker dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"worker did not log {needle!r} within {timeout}s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float) -> int | None:
        """Its exit status once it exits, waiting up to `timeout` (None: still running then)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.proc.wait(timeout=timeout)
        return None

    def kill9(self) -> None:
        """SIGKILL: no shutdown, no final commit."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill9()


def _encode(event: Any) -> tuple[bytes | None, bytes]:
    if isinstance(event, bytes):
        return None, event
    key = event.get("product_id") if isinstance(event, dict) else None
    return (key.encode() if isinstance(key, str) else None), orjson.dumps(event)


async def produce(
    settings: WorkerSettings, topic: str, events: list[Any], headers: list[tuple[str, bytes]] | None = None
) -> list[tuple[int, int]]:
    """Send events to a logical topic with an idempotent acks=all producer; return (partition, offset) of each."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        futures = []
        for event in events:
            key, value = _encode(event)
            futures.append(await producer.send(settings.topic(topic), value, key=key, headers=headers))
        metas = await asyncio.gather(*futures)
        return [(m.partition, m.offset) for m in metas]
    finally:
        await producer.stop()


def _loads(value: bytes | None) -> dict[str, Any]:
    """A consumed value as JSON; a value that is not JSON (what a test sent to be dead-lettered) as `_raw`."""
    try:
        return dict(orjson.loads(value or b"null") or {})
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return {"_raw": value}


async def consume(
    settings: WorkerSettings, topic: str, until: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    """Read a logical topic from its start until `until(messages)` holds; each message also carries its
    `_partition`, `_offset`, `_timestamp` and `_headers` (a list of [name, value as text])."""
    consumer = AIOKafkaConsumer(
        settings.topic(topic), bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                seen += [
                    _loads(r.value)
                    | {
                        "_partition": r.partition,
                        "_offset": r.offset,
                        "_timestamp": r.timestamp,
                        "_headers": [[name, value.decode(errors="replace")] for name, value in r.headers],
                    }
                    for r in records
                ]
            if until(seen):
                return seen
    finally:
        await consumer.stop()
    pytest.fail(f"condition not met on {settings.topic(topic)} within {timeout}s; saw {len(seen)}: {seen[-5:]}")


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10) -> tuple[int, Any]:
    """GET `url`: its status and JSON body, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class OwnRedis:
    """A redis-server on a free port with its append-only file in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.password: str | None = None  # the default user's, once `start` was given `--requirepass`
        data_dir.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{f':{self.password}@' if self.password else ''}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client that fails at once when the server is down (redis-py's default retries with backoff)."""
        return redis.Redis(port=self.port, password=self.password, decode_responses=True, retry=Retry(NoBackoff(), 0))

    def start(self, *args: str) -> None:
        """Start it (again), with `args` added to its command line (`--maxmemory-policy allkeys-lru`, say)."""
        if "--requirepass" in args:
            self.password = args[args.index("--requirepass") + 1]
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        persist = ["--appendonly", "yes", "--save", "", "--logfile", str(self.data_dir / "redis.log")]
        subprocess.run(["redis-server", *where, *persist, "--daemonize", "yes", *args], check=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Shut it down (its append-only file kept), once it no longer answers."""
        with contextlib.suppress(redis.ConnectionError):
            self.client().shutdown(nosave=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.client().ping()
            except redis.ConnectionError:
                return
            time.sleep(0.05)
        raise AssertionError("redis-server did not stop")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
