"""Subcommands of the streaming side: `worker`, `topics`, `replay`, `tail`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import orjson

from streams.model_cli import kafka_errors
from streams.settings import WorkerSettings
from streams.topics import ensure_topics
from tagstream.errors import ConfigError
from tagstream.settings import load_settings

log = logging.getLogger(__name__)


def _ensure_topics(settings: WorkerSettings) -> list[str]:
    with kafka_errors("create topics", settings.kafka_bootstrap):
        return asyncio.run(ensure_topics(settings))


def _worker(args: argparse.Namespace) -> int:
    from serving.bundle import read_manifest_bytes

    overrides = {}
    if args.model:
        overrides["model_path"] = Path(args.model)
    settings = load_settings(WorkerSettings, "worker", **overrides)
    if settings.model_path is not None:  # the worker validates it fully at start; a wrong path fails here, in a line
        read_manifest_bytes(settings.model_path)
    from streams.app import Worker
    from streams.eventloop import use_event_loop

    use_event_loop(settings.event_loop)  # before Faust creates the app's loop
    _ensure_topics(settings)
    worker = Worker(settings)
    worker.gc.install()
    import faust

    faust.Worker(worker.app, loglevel=args.loglevel.upper(), quiet=True).execute_from_commandline()
    return 0


def _topics(args: argparse.Namespace) -> int:
    created = _ensure_topics(load_settings(WorkerSettings, "worker"))
    print("created: " + (", ".join(created) if created else "nothing (all topics exist)"))
    return 0


async def _replay(path: Path, topic: str, settings: WorkerSettings) -> int:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    sent = 0
    try:
        await producer.start()
        with path.open("rb") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    key = orjson.loads(line).get("product_id")
                except (orjson.JSONDecodeError, AttributeError):
                    key = None  # sent as is: the worker dead-letters it with the reason
                    log.warning("%s:%d is not a JSON object; sent anyway", path, line_no)
                key = key if isinstance(key, str) else None  # not a string: the worker dead-letters the event
                await producer.send(settings.topic(topic), line.rstrip(b"\n"), key=key.encode() if key else None)
                sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def _replay_cmd(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    settings = load_settings(WorkerSettings, "worker")
    _ensure_topics(settings)
    with kafka_errors(f"send to {settings.topic(args.topic)}", settings.kafka_bootstrap):
        sent = asyncio.run(_replay(path, args.topic, settings))
    print(f"sent {sent} events to {settings.topic(args.topic)}")
    return 0


async def _tail(settings: WorkerSettings, topic: str, limit: int | None) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest")
    seen = 0
    try:
        await consumer.start()
        name = settings.topic(topic)
        if name not in await consumer.topics():  # else aiokafka logs "not found" ten times a second, forever
            raise ConfigError(
                f"no topic {name} (TAGSTREAM_TOPIC_PREFIX={settings.topic_prefix!r}; see `tagstream topics`)"
            )
        consumer.subscribe([name])
        async for msg in consumer:
            sys.stdout.write(msg.value.decode("utf-8", "replace") + "\n")
            sys.stdout.flush()
            seen += 1
            if limit is not None and seen >= limit:
                break
    finally:
        await consumer.stop()


def _tail_cmd(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"-n/--limit must be at least 1, got {args.limit} (leave it out to print until interrupted)")
    settings = load_settings(WorkerSettings, "worker")
    with kafka_errors(f"read {settings.topic(args.topic)}", settings.kafka_bootstrap):
        asyncio.run(_tail(settings, args.topic, args.limit))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `worker`, `topics`, `replay` and `tail`."""
    p = subparsers.add_parser("worker", help="run a streaming worker (settings from TAGSTREAM_* variables)")
    p.add_argument("--model", help="model bundle directory (overrides TAGSTREAM_MODEL_PATH)")
    p.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_worker)

    p = subparsers.add_parser("topics", help="create tagstream's topics that do not exist yet")
    p.set_defaults(func=_topics)

    p = subparsers.add_parser("replay", help="send a JSONL file of events to a topic (keyed by product_id)")
    p.add_argument("file", help="JSONL file, one event per line")
    p.add_argument("--topic", required=True, choices=["products", "behavior"])
    p.set_defaults(func=_replay_cmd)

    p = subparsers.add_parser("tail", help="print a topic's messages (e.g. tag-updates, dead-letter)")
    p.add_argument("topic", help="logical topic name: tag-updates, dead-letter, model-updates, ...")
    p.add_argument("-n", "--limit", type=int, default=None, help="stop after N messages (N ≥ 1; default: never)")
    p.set_defaults(func=_tail_cmd)
