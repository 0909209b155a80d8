"""`tagstream demo`: the whole loop on this machine in a few minutes, with no data files needed.

Brings the local stack up, takes a catalog (generated, or `--catalog PATH`), trains a small model, starts a worker,
replays product events and a behaviour stream (with a few bad events), shows tag updates live, and ends with a
summary: events in, tag updates out, dead-lettered, p50/p99 event-to-tag latency.

It runs on the local stack (`tagstream stack`'s ports, not TAGSTREAM_KAFKA_BOOTSTRAP / TAGSTREAM_REDIS_URL) under a
fresh tag per run: topics `demo-<tag>-*`, Redis keys `demo-<tag>:*`, consumer group and Faust directory
`tagstream-demo-<tag>`. It deletes them at the end unless `--keep`; the workdir (model, worker log, summary) stays.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from serving.decoding import tag_prefix
from streams.cli import positive_rate
from tagstream.cli import int_at_least
from tagstream.errors import ConfigError, StackError
from tagstream.synth import product_change_event

if TYPE_CHECKING:
    from training.catalog import CatalogProduct
    from training.settings import TrainerSettings

DEMO_START_MS = 1_764_316_800_000  # event time the replayed behaviour starts at
MIN_PRODUCTS = 50  # the demo trains on its catalog: fewer products are refused
WORKER_START_S = 90.0  # longest wait for the worker to be ready, on top of its bounded model-updates catch-up

# Worker log lines (streams/app.py, streams/model.py, streams/models_agent.py) that say its agents can score.
FAUST_READY = b"[^Worker]: Ready"  # Faust: the worker is started, its partitions assigned
# the configured model loaded (in Faust's log format, or tagstream's before Faust starts), or none configured
MODEL_LOADED = re.compile(rb"[\]:] model \S+ loaded from |[\]:] no model configured \(TAGSTREAM_MODEL_PATH\)")
# `ModelHolder.start`'s bounded wait for the model-updates backlog is over (applied, or scoring without it)
BACKLOG_DONE = (b"model-updates backlog applied", b"model-updates backlog not applied within")


@dataclass
class DemoSummary:
    """What the demo measured."""

    products_in: int = 0
    behaviour_in: int = 0
    bad_in: int = 0
    updates_out: int = 0
    dead_lettered: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    tags: Counter[str] = field(default_factory=Counter)
    model_version: str | None = None
    train_seconds: float = 0.0
    model_metrics: dict[str, Any] = field(default_factory=dict)

    def percentile(self, q: float) -> float | None:
        """Latency percentile in ms (None when nothing was measured)."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON object."""
        return {
            "events_in": self.products_in + self.behaviour_in + self.bad_in,
            "products_in": self.products_in,
            "behaviour_in": self.behaviour_in,
            "bad_events_in": self.bad_in,
            "tag_updates_out": self.updates_out,
            "dead_lettered": self.dead_lettered,
            "latency_ms": {"p50": self.percentile(50), "p99": self.percentile(99), "n": len(self.latencies_ms)},
            "reasons": dict(self.reasons),
            "model_version": self.model_version,
            "train_seconds": round(self.train_seconds, 1),
            "model_metrics": self.model_metrics,
        }


DEFAULT_FORMAT = "jsonl"
DEFAULT_LIMIT = 3000
DEFAULT_PRODUCTS = 1500


def _check_catalog_options(args: argparse.Namespace) -> None:
    """`--format` and `--limit` go with `--catalog`, `--products` without it (ConfigError); fill the defaults."""
    if args.catalog:
        if args.products is not None:
            raise ConfigError("--products sizes the generated catalog: it does not go with --catalog (--limit does)")
        args.format = args.format or DEFAULT_FORMAT
        args.limit = DEFAULT_LIMIT if args.limit is None else args.limit
        return
    given = [flag for flag, value in (("--format", args.format), ("--limit", args.limit)) if value is not None]
    if given:
        raise ConfigError(f"{' and '.join(given)} go with --catalog FILE (without it the demo generates its catalog)")
    args.products = DEFAULT_PRODUCTS if args.products is None else args.products


def _load_catalog(args: argparse.Namespace) -> list[Any]:
    if args.catalog:
        from training.loaders import load_catalog

        return load_catalog(Path(args.catalog), args.format).products[: args.limit]
    from tagstream.synth import generate_catalog

    return generate_catalog(args.products, seed=args.seed)


def _trainer_settings(args: argparse.Namespace) -> TrainerSettings:
    """The demo's small model: `tagstream train`'s settings path (TAGSTREAM_* + validation → ConfigError)."""
    from training.settings import load_trainer_settings

    return load_trainer_settings(
        epochs=args.epochs, hash_bits=16, embed_dim=64, hidden=(128,), batch_size=128, min_support=3, baseline=False
    )


def _train(products: list[Any], registry: Path, settings: TrainerSettings) -> tuple[Path, dict[str, Any]]:
    from training.train import train

    bundle = train(products, settings, registry=registry, progress=False)
    metrics = orjson.loads((bundle / "metrics.json").read_bytes())
    groups = metrics.get("top1", {}).get("groups", {})
    summary = {g: round(v.get("weighted_f1", 0.0), 3) for g, v in groups.items()}
    return bundle, summary


def _bad_events() -> list[bytes]:
    return [
        b"{this is not json",
        orjson.dumps({"schema_version": 1, "op": "upsert", "product_id": "no-title", "updated_at": 1, "version": 1}),
        orjson.dumps({"schema_version": 1, "event_type": "stare", "product_id": "x", "user_id": "u", "ts": 1}),
    ]


class LiveView:
    """A terminal table of the latest tag updates (rich), refreshed as they arrive."""

    def __init__(self, titles: dict[str, str], enabled: bool) -> None:
        self.titles = titles
        self.rows: deque[dict[str, Any]] = deque(maxlen=14)
        self.enabled = enabled
        self.live: Any = None

    def __enter__(self) -> LiveView:
        if self.enabled:
            from rich.live import Live

            self.live = Live(self.render(), refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)

    def add(self, update: dict[str, Any], latency: float | None) -> None:
        self.rows.appendleft({**update, "_latency": latency})
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> Any:
        from rich.table import Table

        table = Table(title="tag-updates (live)", expand=True)
        for col in ("product", "title", "reason", "added", "removed", "tags", "ms"):
            table.add_column(col, overflow="fold")
        for u in self.rows:
            tags = ", ".join(t["tag"] for t in u["tags"])
            latency = u["_latency"]
            table.add_row(
                u["product_id"],
                self.titles.get(u["product_id"], "")[:40],
                u["reason"],
                ", ".join(u["added"]),
                ", ".join(u["removed"]),
                tags,
                f"{latency:.1f}" if latency is not None else "",
            )
        return table


def worker_ready(log: bytes, *, model_updates: bool) -> bool:
    """Whether the worker's log says it can score: Faust is ready, the configured model is loaded and (when it
    consumes model-updates) the backlog applied or its bounded wait over. Faust's "Ready" alone comes before the
    model may be loaded: a replay started then measures the worker's start, not the stream."""
    if FAUST_READY not in log or not MODEL_LOADED.search(log):
        return False
    return not model_updates or any(line in log for line in BACKLOG_DONE)


def wait_for_worker(
    log_path: Path,
    worker: subprocess.Popen[bytes],
    *,
    model_updates: bool,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once `worker_ready` says so of the worker's log; StackError when the worker exits first or is not
    ready within `timeout` seconds."""
    deadline = clock() + timeout
    while not worker_ready(log_path.read_bytes(), model_updates=model_updates):
        if (code := worker.poll()) is not None:
            raise StackError(f"the worker exited (status {code}) before it was ready; see {log_path}")
        if clock() > deadline:
            awaited = "its model-updates backlog applied" if model_updates else "its model loaded"
            raise StackError(f"the worker was not ready ({awaited}) within {timeout:.0f} s; see {log_path}")
        sleep(0.2)


async def group_lag(settings: Any) -> int:
    """Messages of the input topics the worker's consumer group has not committed yet."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings.app_id)
        topics = [settings.topic(t) for t in ("products", "behavior")]
        parts = [
            TopicPartition(d["topic"], p["partition"])
            for d in await admin.describe_topics(topics)
            for p in d["partitions"]
        ]
        ends = await consumer.end_offsets(parts)
        return sum(max(0, end - (committed[tp].offset if tp in committed else 0)) for tp, end in ends.items())
    finally:
        await consumer.stop()
        await admin.close()


async def _replay_and_watch(
    settings: Any,
    products: list[Any],
    behaviour: list[dict[str, Any]],
    rate: float,
    view: LiveView,
    s: DemoSummary,
    timeout: float = 300.0,
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    produced_at: dict[tuple[str, int, int], int] = {}
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=1
    )
    consumer = AIOKafkaConsumer(
        settings.topic("tag-updates"),
        settings.topic("dead-letter"),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    last_seen = time.monotonic()

    async def watch() -> None:
        nonlocal last_seen
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for r in records:
                    last_seen = time.monotonic()
                    if tp.topic == settings.topic("dead-letter"):
                        s.dead_lettered += 1
                        continue
                    update = orjson.loads(r.value)
                    s.updates_out += 1
                    s.reasons[update["reason"]] += 1
                    src = update["source"]  # an expiry's or a re-tag's is no single event: no latency
                    sent = (
                        produced_at.get((src["topic"], src["partition"], src["offset"]))
                        if update["reason"] not in ("window-expired", "retag")
                        else None
                    )
                    latency = update["emit_time"] - sent if sent is not None else None
                    if latency is not None:
                        s.latencies_ms.append(latency)
                    view.add(update, latency)

    async def send(topic: str, value: bytes, key: bytes | None) -> None:
        fut = await producer.send(settings.topic(topic), value, key=key)

        def record(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                meta = done.result()
                produced_at[(settings.topic(topic), meta.partition, meta.offset)] = meta.timestamp

        fut.add_done_callback(record)

    watcher = asyncio.create_task(watch())
    try:
        interval = 1.0 / rate
        t_next = time.monotonic()
        stream: list[tuple[str, bytes, bytes | None]] = [
            ("products", orjson.dumps(product_change_event(p, updated_at=DEMO_START_MS)), p.product_id.encode())
            for p in products
        ]
        bad = _bad_events()
        stream += [("products", bad[0], None), ("products", bad[1], b"no-title")]
        stream += [("behavior", orjson.dumps(e), e["product_id"].encode()) for e in behaviour]
        stream.insert(len(stream) // 2, ("behavior", bad[2], b"x"))
        for topic, value, key in stream:
            await send(topic, value, key)
            t_next += interval
            delay = t_next - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await producer.flush()
        s.products_in = len(products)
        s.behaviour_in = len(behaviour)
        s.bad_in = len(bad)
        # Wait until the worker has committed every input message, then for the last updates to arrive.
        deadline = time.monotonic() + timeout
        while await group_lag(settings) > 0:
            if time.monotonic() > deadline:
                raise StackError(f"the worker did not catch up within {timeout:.0f} s")
            await asyncio.sleep(0.5)
        while time.monotonic() - last_seen < 1.0:
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await watcher
        await consumer.stop()
        await producer.stop()


def cleanup_run(settings: Any) -> list[str]:
    """Delete what one demo run made on the stack: its topics, its Redis keys, its consumer group and its Faust
    directory (only names of this run's fresh tag, never anything else). Returns what could not be deleted."""
    import logging
    import shutil

    from kafka.admin import KafkaAdminClient

    from streams.topics import TOPICS
    from tagstream.stack import delete_keys

    if not settings.app_id.startswith("tagstream-demo-") or not settings.redis_prefix.startswith("demo-"):
        raise ValueError(f"not a demo run: {settings.app_id!r}, {settings.redis_prefix!r}")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its connection chatter would end the demo's output
    left: list[str] = []
    try:
        asyncio.run(_delete_topics(settings.kafka_bootstrap, [settings.topic(t.name) for t in TOPICS]))
    except Exception as exc:  # the stack went away meanwhile: say so, the summary still gets written
        left.append(f"topics {settings.topic_prefix}* ({exc})")
    try:
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="tagstream-demo")
        try:
            outcome = admin.delete_groups([settings.app_id]).get(settings.app_id)
        finally:
            admin.close()
        if outcome not in ("OK", "GroupIdNotFoundError"):
            left.append(f"consumer group {settings.app_id} ({outcome})")
    except Exception as exc:
        left.append(f"consumer group {settings.app_id} ({exc})")
    try:
        delete_keys(settings.redis_url.get_secret_value(), settings.redis_prefix)
    except Exception as exc:
        left.append(f"Redis keys {settings.redis_prefix}:* ({exc})")
    faust_dir = settings.data_dir.expanduser() / settings.app_id
    shutil.rmtree(faust_dir, ignore_errors=True)
    if faust_dir.exists():
        left.append(f"Faust directory {faust_dir}")
    return left


async def _delete_topics(bootstrap: str, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="tagstream-demo")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        mine = [n for n in names if n in existing]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


def _sendable(products: list[CatalogProduct], console: Any) -> list[CatalogProduct]:
    """The catalog without the attributes whose names product-change events cannot carry (the schema refuses them:
    a change with one is dead-lettered whole), said in one line; the model still predicts those groups."""
    from training.cleaning import unsendable_attributes

    unsendable = unsendable_attributes(products)
    if not unsendable:
        return products
    names = ", ".join(f"{name!r} ({n} products)" for name, n in sorted(unsendable.items()))
    console.print(
        f"not sent as catalog attributes (product-change events cannot carry these names; the model predicts them): "
        f"{names}",
        style="yellow",
        markup=False,
    )
    return [
        replace(p, attributes={k: v for k, v in p.attributes.items() if tag_prefix(k) not in unsendable})
        for p in products
    ]


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo end to end; prints the summary and writes it to WORKDIR/summary.json."""
    from rich.console import Console

    from streams.settings import WorkerSettings
    from streams.topics import ensure_topics
    from tagstream.stack import StackSettings, stack_up
    from tagstream.synth import Burst, generate_behaviour
    from training.settings import writable_dir

    # A bad setting or catalog fails first, before the workdir is made or the stack started.
    _check_catalog_options(args)
    trainer_settings = _trainer_settings(args)
    products = _load_catalog(args)
    if len(products) < MIN_PRODUCTS:
        raise ConfigError(f"the catalog has {len(products)} products; the demo needs at least {MIN_PRODUCTS}")
    stack = StackSettings()  # a bad stack setting too
    work = writable_dir(args.workdir or Path.cwd() / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}", "--workdir")
    console = Console()
    console.rule("tagstream demo")
    status = stack_up(stack)
    console.print(f"stack: {status.describe() if hasattr(status, 'describe') else status}")
    console.print(f"catalog: {len(products)} products ({'generated' if not args.catalog else args.catalog})")

    summary = DemoSummary()
    console.print("training a model (Keras → tf2onnx → parity gate → bundle) ...")
    t0 = time.perf_counter()
    bundle, metrics = _train(products, work / "models", trainer_settings)
    summary.train_seconds = time.perf_counter() - t0
    summary.model_metrics = metrics
    summary.model_version = bundle.name
    console.print(f"model {bundle.name} in {summary.train_seconds:.0f} s; test weighted F1 (top-1): {metrics}")

    tag = uuid.uuid4().hex[:6]
    env = {
        "TAGSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "TAGSTREAM_REDIS_URL": stack.redis_url,
        "TAGSTREAM_TOPIC_PREFIX": f"demo-{tag}-",
        "TAGSTREAM_APP_ID": f"tagstream-demo-{tag}",
        "TAGSTREAM_REDIS_PREFIX": f"demo-{tag}",
        "TAGSTREAM_MODEL_PATH": str(bundle),
    }
    settings = WorkerSettings(**{k.removeprefix("TAGSTREAM_").lower(): v for k, v in env.items()})
    run_objects = {
        "topic_prefix": settings.topic_prefix,
        "redis_prefix": settings.redis_prefix,
        "consumer_group": settings.app_id,
        "faust_dir": str(settings.data_dir.expanduser() / settings.app_id),
        "kept": bool(args.keep),
    }
    worker: subprocess.Popen[bytes] | None = None
    try:
        asyncio.run(ensure_topics(settings))
        log_path = work / "worker.log"
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "tagstream.cli", "worker"],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # the worker's model-updates catch-up is bounded by TAGSTREAM_MODEL_CATCHUP_TIMEOUT: the wait is longer
        catchup = settings.model_catchup_timeout if settings.model_updates_enabled else 0.0
        wait_for_worker(
            log_path, worker, model_updates=settings.model_updates_enabled, timeout=WORKER_START_S + catchup
        )
        console.print(f"worker ready (log: {log_path}); replaying at {args.rate:.0f} events/s ...")

        rng = np.random.default_rng(args.seed)
        hot = [products[int(i)].product_id for i in rng.choice(len(products), size=3, replace=False)]
        bursts = [Burst(pid, DEMO_START_MS + (20 + 10 * i) * 60_000, 8 * 60_000, 120) for i, pid in enumerate(hot)]
        behaviour = generate_behaviour(
            products, args.events, DEMO_START_MS, seed=args.seed, duration_ms=3 * 3_600_000, bursts=bursts
        )
        titles = {p.product_id: p.title for p in products}
        sendable = _sendable(products, console)
        # a live table redrawn into a file or pipe would be dumped there whole: only on a terminal
        with LiveView(titles, enabled=not args.no_live and sys.stdout.isatty()) as view:
            asyncio.run(_replay_and_watch(settings, sendable, behaviour, args.rate, view, summary))
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if args.keep:
            console.print(
                f"kept for inspection: topics {settings.topic_prefix}*, Redis keys {settings.redis_prefix}:* "
                f"(db of {stack.redis_url}), consumer group and Faust directory {run_objects['faust_dir']}"
            )
        else:
            left = cleanup_run(settings)
            if left:
                console.print(f"could not delete: {'; '.join(left)}", style="yellow", markup=False)

    result = {**summary.to_json(), "run": run_objects}
    (work / "summary.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    _print_summary(console, result, work)
    return 0


def _print_summary(console: Any, result: dict[str, Any], work: Path) -> None:
    from rich.table import Table

    table = Table(title="demo summary")
    table.add_column("measure")
    table.add_column("value", justify="right")
    lat = result["latency_ms"]
    for name, value in [
        ("events in", result["events_in"]),
        ("  product events", result["products_in"]),
        ("  behaviour events", result["behaviour_in"]),
        ("  bad events", result["bad_events_in"]),
        ("tag updates out", result["tag_updates_out"]),
        ("dead-lettered", result["dead_lettered"]),
        ("event→tag latency p50 (ms)", f"{lat['p50']:.1f}" if lat["p50"] is not None else "-"),
        ("event→tag latency p99 (ms)", f"{lat['p99']:.1f}" if lat["p99"] is not None else "-"),
        ("model", result["model_version"]),
        ("training time (s)", result["train_seconds"]),
    ]:
        table.add_row(name, str(value))
    console.print(table)
    console.print(f"updates by reason: {result['reasons']}")
    console.print(f"summary written to {work / 'summary.json'}; stop the stack with `tagstream stack down`")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `demo`."""
    p = subparsers.add_parser("demo", help="run the whole loop locally: stack, training, worker, replay, summary")
    p.add_argument("--catalog", help="catalog file to train on and replay (default: a generated one)")
    p.add_argument(
        "--format",
        choices=["cn-jd", "myntra", "bigbasket", "jsonl"],
        help=f"the --catalog file's format (default {DEFAULT_FORMAT})",
    )
    at_least_products = int_at_least(MIN_PRODUCTS, " (the demo trains a model on the catalog)")
    p.add_argument(
        "--limit",
        type=at_least_products,
        help=f"at most this many products of the --catalog file (≥ {MIN_PRODUCTS}; default {DEFAULT_LIMIT})",
    )
    p.add_argument(
        "--products",
        type=at_least_products,
        help=f"size of the generated catalog, without --catalog (≥ {MIN_PRODUCTS}; default {DEFAULT_PRODUCTS})",
    )
    p.add_argument(
        "--events",
        type=int_at_least(0),
        default=12000,
        help="background behaviour events to replay (three bursts of 120 events each come on top)",
    )
    p.add_argument("--rate", type=positive_rate, default=1500.0, help="replay rate (events/s, > 0)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", help="where the model, logs and summary go (default: runs/demo-<time>)")
    p.add_argument(
        "--no-live", action="store_true", help="no live table (for logs and CI; off too when stdout is not a terminal)"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the run's topics (demo-<tag>-*), Redis keys (demo-<tag>:*), consumer group and Faust directory "
        "on the stack for inspection (default: deleted at the end)",
    )
    p.set_defaults(func=run_demo)
