"""Subcommands of the streaming side: `worker`, `topics`, `replay`, `tail`, `redrive`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from schemas import TICK_KEY
from streams.model_cli import kafka_errors
from streams.settings import WorkerSettings
from streams.topics import ensure_topics
from tagstream.cli import int_at_least
from tagstream.errors import ConfigError, EventDecodeError, TagstreamError
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
    if settings.model_path is not None:  # a wrong path fails here, in a line, before Kafka and Redis are asked
        read_manifest_bytes(settings.model_path)
        # absolute, as `publish` and `model activate` name bundles: the worker's answers name it so
        settings = settings.model_copy(update={"model_path": settings.model_path.resolve()})
    from streams.app import Worker, check_state_store
    from streams.eventloop import use_event_loop

    use_event_loop(settings.event_loop)  # before Faust creates the app's loop
    _ensure_topics(settings)
    # a store of another format, lost or from other topics: one line here, not a crash in the agents
    worker = Worker(settings, store_checked=asyncio.run(check_state_store(settings)))
    worker.models.preload()  # a bundle that fails validation: one line here, not a crash in the agents
    worker.gc.install()
    import faust

    faust.Worker(worker.app, loglevel=args.loglevel.upper(), quiet=True).execute_from_commandline()
    return 0


def _topics(args: argparse.Namespace) -> int:
    created = _ensure_topics(load_settings(WorkerSettings, "worker"))
    print("created: " + (", ".join(created) if created else "nothing (all topics exist)"))
    return 0


# The replay producer's max_request_size (aiokafka's default, below the broker's default message.max.bytes): every
# line is checked against it (and against the topic's own max.message.bytes) before anything is sent.
REPLAY_MAX_REQUEST_BYTES = 1_048_576
OVERSIZE = "oversize"
INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class ReplayLine:
    """One non-blank line of a replay file: the message it makes and what is wrong with it, if anything."""

    line_no: int
    key: bytes | None
    value: bytes
    problem: str | None = None  # OVERSIZE (never sent) or INVALID (the worker would dead-letter it)
    reason: str = ""


@dataclass
class ReplayCheck:
    """A replay file read through before anything is sent: its events and its bad lines."""

    path: Path
    events: int = 0
    oversize: int = 0
    invalid: int = 0
    first_oversize: ReplayLine | None = None
    first_invalid: ReplayLine | None = None

    def add(self, line: ReplayLine) -> None:
        """Count one line."""
        self.events += 1
        if line.problem == OVERSIZE:
            self.oversize += 1
            self.first_oversize = self.first_oversize or line
        elif line.problem == INVALID:
            self.invalid += 1
            self.first_invalid = self.first_invalid or line

    def refusal(self, send_invalid: bool) -> str | None:
        """The one-line reason to send nothing (None: the file may be sent)."""
        bad = [ln for ln in (self.first_oversize, None if send_invalid else self.first_invalid) if ln is not None]
        if not bad:
            return None
        first = min(bad, key=lambda ln: ln.line_no)
        counts = f"bad lines: {self.oversize} over the size limit, {self.invalid} invalid, of {self.events}"
        hint = (
            "a line over the size limit can never be sent"
            if send_invalid or not self.invalid
            else "--send-invalid sends invalid events anyway, for the worker to dead-letter"
        )
        return f"{self.path}:{first.line_no}: {first.reason}; {counts}; nothing sent ({hint})"


def _loose_key(value: bytes) -> bytes | None:
    """An invalid event's key: its product_id if it is a string (else none: the worker dead-letters it anyway)."""
    try:
        key = orjson.loads(value).get("product_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return key.encode() if isinstance(key, str) else None


def replay_lines(path: Path, topic: str, limit: int, ahead_ms: int = 0) -> Iterator[ReplayLine]:
    """The non-blank lines of `path` as messages for logical `topic`, each checked as the worker will decode it (with
    its TAGSTREAM_MAX_EVENT_AHEAD_MS, `ahead_ms`; 0: no time check) and against `limit`, the most bytes a record may
    take (aiokafka's estimate of a one-record batch)."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    from streams.processor import INPUT_DECODERS, now_ms

    decoder, now = INPUT_DECODERS[topic], now_ms()
    with path.open("rb") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            value = line.rstrip(b"\r\n")  # the line end, CRLF too, is no part of the event
            try:
                key: bytes | None = decoder.decode(value, now, ahead_ms).product_id.encode()
                problem, reason = None, ""
            except EventDecodeError as exc:
                key, problem, reason = _loose_key(value), INVALID, str(exc)
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])
            if size > limit:
                problem, reason = OVERSIZE, f"{size} bytes as a Kafka record, over the {limit}-byte limit"
            yield ReplayLine(line_no, key, value, problem, reason)


def check_replay_file(path: Path, topic: str, limit: int, ahead_ms: int = 0) -> ReplayCheck:
    """Read the whole file once and count its events and bad lines."""
    check = ReplayCheck(path)
    for line in replay_lines(path, topic, limit, ahead_ms):
        check.add(line)
    return check


async def _message_limit(settings: WorkerSettings, topic: str) -> int:
    """The most bytes one replayed record may take: the producer's max request size, or the topic's
    `max.message.bytes` (a one-record batch) if it is lower. A topic that does not exist yet has no entry: the
    products and behavior topics a worker makes keep the broker's `message.max.bytes`, read instead."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="tagstream-replay")
    await admin.start()
    try:
        name = settings.topic(topic)
        wanted = ConfigResource(ConfigResourceType.TOPIC, name, {"max.message.bytes": None})
        limits = _config_values(await admin.describe_configs([wanted]), "max.message.bytes")
        if not limits:  # not made yet: it will have the broker's limit
            broker = str((await admin.describe_cluster())["brokers"][0]["node_id"])
            wanted = ConfigResource(ConfigResourceType.BROKER, broker, {"message.max.bytes": None})
            limits = _config_values(await admin.describe_configs([wanted]), "message.max.bytes")
    finally:
        await admin.close()
    return min([REPLAY_MAX_REQUEST_BYTES, *limits])


def _config_values(responses: list[Any], name: str) -> list[int]:
    """The integer values of config `name` in DescribeConfigs responses."""
    return [
        int(entry[1])
        for response in responses
        for resource in response.resources
        for entry in resource[4]
        if entry[0] == name and str(entry[1]).isdigit()
    ]


@dataclass
class ReplayProgress:
    """How far a replay got: what a user needs to know before running it again."""

    sent: int = 0
    invalid: int = 0
    last_line: int = 0

    def describe(self, path: Path) -> str:
        """`N events already sent (through FILE:LINE)`, for errors and interruptions."""
        if not self.sent:
            return "nothing was sent"
        return f"{self.sent} events already sent (through {path}:{self.last_line}); running it again resends them"


async def _check_replay(
    path: Path, topic: str, settings: WorkerSettings, send_invalid: bool
) -> tuple[ReplayCheck, int]:
    """Check every line of `path` (ConfigError naming the first bad line when one is refused); returns the check and
    the size limit it was checked against."""
    limit = await _message_limit(settings, topic)
    check = check_replay_file(path, topic, limit, settings.max_event_ahead_ms)
    refusal = check.refusal(send_invalid)
    if refusal is not None:
        raise ConfigError(refusal)
    return check, limit


async def _replay(
    path: Path,
    topic: str,
    settings: WorkerSettings,
    progress: ReplayProgress,
    limit: int,
    rate: float | None = None,
    send_invalid: bool = False,
) -> None:
    """Send the lines of `path` (checked by `_check_replay` against `limit`), at `rate` events/s if given (as fast
    as the producer allows otherwise), counting them in `progress`."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=REPLAY_MAX_REQUEST_BYTES,
    )
    failures: list[BaseException] = []

    def delivered(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            failures.append(fut.exception())  # type: ignore[arg-type]

    interval = 1.0 / rate if rate else 0.0
    t_next: float | None = None  # when the next event is due: paced from the first send (which waits for metadata)
    try:
        await producer.start()
        for line in replay_lines(path, topic, limit, settings.max_event_ahead_ms):
            if line.problem == OVERSIZE or (line.problem == INVALID and not send_invalid):
                raise ConfigError(f"{path}:{line.line_no}: {line.reason} (the file changed during the replay)")
            fut = await producer.send(settings.topic(topic), line.value, key=line.key)
            fut.add_done_callback(delivered)
            progress.sent += 1
            progress.invalid += int(line.problem == INVALID)
            progress.last_line = line.line_no
            if interval:
                now = time.monotonic()
                t_next = (now if t_next is None else t_next) + interval
                if t_next > now:
                    await asyncio.sleep(t_next - now)
        await producer.flush()
    finally:
        await producer.stop()
    if failures:
        raise failures[0]


def _replay_cmd(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"not a regular file: {path}" if path.exists() else f"no such file: {path}")
    settings = load_settings(WorkerSettings, "worker")
    name = settings.topic(args.topic)
    with kafka_errors(f"read the message size limit of {name}", settings.kafka_bootstrap):
        check, limit = asyncio.run(_check_replay(path, args.topic, settings, args.send_invalid))
    if not check.events:  # nothing to send: no topic made either
        print(f"tagstream replay: warning: {path} has no events (empty, or blank lines only)", file=sys.stderr)
        print(f"sent 0 events to {name}")
        return 0
    _ensure_topics(settings)  # only for a file that is sent: a refused one leaves no topic behind
    progress = ReplayProgress()
    try:
        with kafka_errors(f"send to {name}", settings.kafka_bootstrap):
            asyncio.run(
                _replay(path, args.topic, settings, progress, limit, rate=args.rate, send_invalid=args.send_invalid)
            )
    except KeyboardInterrupt:
        print(f"tagstream replay: interrupted: {progress.describe(path)}", file=sys.stderr)
        raise
    except TagstreamError as exc:
        if progress.sent:
            raise TagstreamError(f"{exc}; {progress.describe(path)}") from exc
        raise
    line = f"sent {progress.sent} events to {name}"
    if args.send_invalid:
        first = check.first_invalid
        where = f", first {path}:{first.line_no}: {first.reason}; the worker dead-letters them" if first else ""
        line += f" ({progress.invalid} invalid{where})"
    print(line)
    return 0


# What `tail` never writes to a terminal as is: C0 controls (ESC, BEL, line breaks, tab), DEL, C1 controls (CSI
# U+009B, ...), the Unicode line and paragraph separators and the bidirectional controls (they reorder what follows).
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    """The visible escape of one control character: `\\n`, `\\r`, `\\t`, else `\\u00HH` or `\\uHHHH` (JSON's own
    escapes, so that a JSON value stays valid JSON)."""
    char = match.group()
    return _NAMED_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _show(value: bytes | None) -> str:
    """A message value as one line that is safe to print to a terminal: a record with no value (a tombstone) prints
    as `null`; a JSON value with control characters (pretty-printed JSON from another producer, a tab between its
    tokens, ESC in a string) prints as compact JSON, still valid (`| jq` reads it); control characters left
    (`_UNSHOWN`: DEL, C1 such as CSI, line separators, bidi controls, or anything in a value that is no JSON) print
    escaped, as `\\u001b`, `\\n`, `\\u202e`, so a producer cannot retitle, clear or recolour the operator's terminal."""
    if value is None:
        return "null"
    text = value.decode("utf-8", "replace")
    if not _UNSHOWN.search(text):
        return text
    with contextlib.suppress(orjson.JSONDecodeError):  # orjson escapes C0 controls in strings, and adds no whitespace
        text = orjson.dumps(orjson.loads(value)).decode()
    return _UNSHOWN.sub(_escape, text)


async def _latest(settings: WorkerSettings, name: str, limit: int, skip_ticks: bool = False) -> list[bytes | None]:
    """The last `limit` messages already on topic `name`, over all its partitions (by timestamp, then partition and
    offset): the last `limit` of each partition. A compacted topic (`tag-updates`) has gaps in its offsets, so a
    partition's window is widened from its end until it holds `limit` messages or reaches the partition's start."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(name, bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    records = []
    try:
        await consumer.start()
        tps = sorted(consumer.assignment())
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        for tp in tps:
            back = limit
            while ends[tp] > starts[tp]:
                first = max(starts[tp], ends[tp] - back)
                got = await _read_range(consumer, tp, first, ends[tp], skip_ticks)
                if len(got) >= limit or first == starts[tp]:
                    records += got[-limit:]
                    break
                back *= 4
    finally:
        await consumer.stop()
    records.sort(key=lambda r: r[:3])
    return [r[3] for r in records[-limit:]]


async def _read_range(
    consumer: Any, tp: Any, first: int, end: int, skip_ticks: bool = False
) -> list[tuple[int, int, int, bytes | None]]:
    """(timestamp, partition, offset, value) of partition `tp`'s messages from offset `first` up to `end` (without
    the workers' window ticks, with `skip_ticks`)."""
    consumer.seek(tp, first)
    out: list[tuple[int, int, int, bytes | None]] = []
    while await consumer.position(tp) < end:
        batch = (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
        out += [
            (r.timestamp, r.partition, r.offset, r.value)
            for r in batch
            if r.offset < end and not (skip_ticks and r.key == TICK_KEY)
        ]
    return out


async def _tail(settings: WorkerSettings, topic: str, limit: int | None, latest: bool = False) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest")
    seen = 0
    try:
        await consumer.start()
        name = settings.topic(topic)
        skip_ticks = topic == "behavior"  # the workers' window ticks: control records, not events
        if name not in await consumer.topics():  # else aiokafka logs "not found" ten times a second, forever
            raise ConfigError(
                f"no topic {name} (TAGSTREAM_TOPIC_PREFIX={settings.topic_prefix!r}; see `tagstream topics`)"
            )
        if latest and limit is not None:
            for value in await _latest(settings, name, limit, skip_ticks):
                sys.stdout.write(_show(value) + "\n")
            sys.stdout.flush()
            return
        consumer.subscribe([name])
        async for msg in consumer:
            if skip_ticks and msg.key == TICK_KEY:
                continue
            sys.stdout.write(_show(msg.value) + "\n")
            sys.stdout.flush()
            seen += 1
            if limit is not None and seen >= limit:
                break
    finally:
        await consumer.stop()


def _tail_cmd(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"-n/--limit must be at least 1, got {args.limit} (leave it out to print until interrupted)")
    if args.latest and args.limit is None:
        raise ConfigError("--latest needs -n N (the last N messages already on the topic)")
    settings = load_settings(WorkerSettings, "worker")
    with kafka_errors(f"read {settings.topic(args.topic)}", settings.kafka_bootstrap):
        asyncio.run(_tail(settings, args.topic, args.limit, latest=args.latest))
    return 0


def _redrive_cmd(args: argparse.Namespace) -> int:
    from streams.redrive import redrive

    if args.from_offset is not None and args.to_offset is not None and args.to_offset < args.from_offset:
        raise ConfigError(f"--to-offset {args.to_offset} is before --from-offset {args.from_offset}")
    settings = load_settings(WorkerSettings, "worker")
    with kafka_errors("redrive dead letters", settings.kafka_bootstrap):
        result = asyncio.run(
            redrive(
                settings,
                from_offset=args.from_offset,
                to_offset=args.to_offset,
                sources=args.source or ("products", "behavior"),
                error_types=args.error_type or (),
                dry_run=args.dry_run,
                again=args.again,
            )
        )
    sys.stdout.write(orjson.dumps(result.to_dict()).decode() + "\n")
    if missing := sorted(set(args.error_type or ()) - set(result.error_types)):
        seen = ", ".join(f"{name} ({n})" for name, n in sorted(result.error_types.items())) or "none"
        print(
            f"tagstream redrive: warning: no letter in [{result.first_offset}, {result.next_offset}) has error type "
            f"{', '.join(missing)}; the error types of the input topics' letters there: {seen}",
            file=sys.stderr,
        )
    if result.error is not None:
        print(f"tagstream redrive: error: stopped at {result.error}", file=sys.stderr)
        return 2
    return 0


def positive_rate(text: str) -> float:
    """argparse type of a `--rate`: a finite number of events per second above 0."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < rate < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 events/s, got {text!r}")
    return rate


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `worker`, `topics`, `replay`, `tail` and `redrive`."""
    p = subparsers.add_parser("worker", help="run a streaming worker (settings from TAGSTREAM_* variables)")
    p.add_argument("--model", help="model bundle directory (overrides TAGSTREAM_MODEL_PATH)")
    p.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_worker)

    p = subparsers.add_parser("topics", help="create tagstream's topics that do not exist yet")
    p.set_defaults(func=_topics)

    p = subparsers.add_parser(
        "replay",
        help="send a JSONL file of events to a topic (keyed by product_id); every line is checked first and a file "
        "with a bad line is refused whole",
    )
    p.add_argument("file", help="JSONL file, one event per line")
    p.add_argument("--topic", required=True, choices=["products", "behavior"])
    p.add_argument(
        "--rate",
        type=positive_rate,
        metavar="N",
        default=None,
        help="send at most N events per second (> 0), e.g. to replay a real log at a realistic pace "
        "(default: as fast as possible)",
    )
    p.add_argument(
        "--send-invalid",
        action="store_true",
        help="send events that fail the topic's schema anyway (the worker dead-letters them); a line over the "
        "message size limit is never sent",
    )
    p.set_defaults(func=_replay_cmd)

    p = subparsers.add_parser(
        "tail",
        help="print a topic's messages (e.g. tag-updates, dead-letter); the workers' window ticks on behavior (key "
        "{tick}) are not printed",
    )
    p.add_argument("topic", help="logical topic name: tag-updates, dead-letter, model-updates, ...")
    p.add_argument(
        "-n",
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="stop after N messages read from the beginning of the topic: its oldest, in offset order within a "
        "partition, partitions interleaved (N ≥ 1; default: all of them, then new ones until interrupted)",
    )
    p.add_argument(
        "--latest",
        action="store_true",
        help="with -n N: the last N messages already on the topic (all partitions, by timestamp), then stop",
    )
    p.set_defaults(func=_tail_cmd)

    p = subparsers.add_parser(
        "redrive",
        help="send dead-lettered events back to the topic they came from (once their cause is fixed), each event "
        "once; prints one JSON line with what was sent and skipped, and next_offset, where the run stopped",
    )
    p.add_argument("--source", action="append", choices=["products", "behavior"], help="only letters from this topic")
    p.add_argument(
        "--error-type",
        action="append",
        metavar="NAME",
        help="only letters of this error type (e.g. EventTimeError; repeatable; default: every type)",
    )
    p.add_argument(
        "--from-offset", type=int_at_least(0), metavar="N", help="first dead-letter offset (default: the first)"
    )
    p.add_argument(
        "--to-offset",
        type=int_at_least(0),
        metavar="N",
        help="stop before this dead-letter offset (default: the end now)",
    )
    p.add_argument("--dry-run", action="store_true", help="only count what would be sent")
    p.add_argument(
        "--again",
        action="store_true",
        help="also send letters whose event an earlier run sent back or claimed (recorded in Redis; by default "
        "skipped), overwriting that record; within this run each event is still sent once",
    )
    p.set_defaults(func=_redrive_cmd)
