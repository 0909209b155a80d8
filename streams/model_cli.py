"""`tagstream model status | activate | shadow | promote | rollback`: operate the models of running workers.

Requests go to `<prefix>model-updates`; workers answer there with `model-activated` / `model-rejected` and keep
their state in the Redis hash `<prefix>:workers` (worker_id → JSON). `status` shows both: per worker the latest
answer on the topic and the Redis state (active, previous, shadow, shadow summary). `--wait S` waits up to S seconds
for the answers of every known worker and exits 1 when any refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from schemas import ModelUpdate
from streams.settings import WorkerSettings
from tagstream.errors import ConfigError, EventDecodeError, TagstreamError

__all__ = ["build_request", "read_answers", "read_status", "register", "send_request", "workers_key"]

CONTROL_KEY = b"tagstream-control"


def workers_key(prefix: str) -> str:
    """Redis hash worker_id → JSON {active, previous, shadow, at, shadow_stats, ...} (SPEC §3)."""
    return f"{prefix}:workers"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def build_request(
    kind: str, settings: WorkerSettings, *, model: Path | None = None, version: str | None = None
) -> tuple[ModelUpdate, bytes]:
    """A schema-valid request and its message key. activate/shadow validate the bundle locally first."""
    if kind in ("activate", "shadow"):
        from serving.bundle import SIGNATURE_FILE, load_bundle
        from serving.validate import parse_verify_key

        if model is None:
            raise ConfigError(f"model {kind}: --model DIR is required")
        path = model.resolve()
        key = settings.model_verify_key
        bundle = load_bundle(path, verify_key=parse_verify_key(key.get_secret_value()) if key else None)
        sig = path / SIGNATURE_FILE
        event = ModelUpdate(
            kind=kind,  # type: ignore[arg-type]
            model_version=bundle.model_version,
            emitted_at=_now_ms(),
            bundle_uri=str(path),
            sha256=bundle.sha256,
            signature=sig.read_text().strip() if sig.is_file() else None,
        )
        event.to_dict()
        return event, bundle.model_name.encode()
    default = {"promote": "shadow", "rollback": "previous"}[kind]
    event = ModelUpdate(kind=kind, model_version=version or default, emitted_at=_now_ms())  # type: ignore[arg-type]
    event.to_dict()
    return event, CONTROL_KEY


async def send_request(settings: WorkerSettings, event: ModelUpdate, key: bytes) -> int:
    """Send a request (acks=all, idempotent); returns its offset."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(settings.topic("model-updates"), orjson.dumps(event.to_dict()), key=key)
        return meta.offset
    finally:
        await producer.stop()


async def read_answers(
    settings: WorkerSettings,
    *,
    after: int = -1,
    expect: set[str] | None = None,
    timeout: float = 0.0,
) -> list[ModelUpdate]:
    """Workers' answers on model-updates after offset `after` (partition 0): up to the current end, or — with
    `expect` (worker ids) and `timeout` — until every expected worker answered or the time ran out."""
    from aiokafka import AIOKafkaConsumer

    topic = settings.topic("model-updates")
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    answers: list[ModelUpdate] = []
    try:
        if topic not in await consumer.topics():
            raise ConfigError(f"topic {topic} does not exist (is a worker or `tagstream topics` run?)")
        consumer.subscribe([topic])  # no group: every partition, from the beginning
        waited = 0.0
        while not consumer.assignment() and waited < 10:
            await asyncio.sleep(0.05)
            waited += 0.05
        tps = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while True:
            batches = await consumer.getmany(timeout_ms=300)
            for records in batches.values():
                for r in records:
                    if r.offset <= after:
                        continue
                    try:
                        event = ModelUpdate.decode(r.value)
                    except EventDecodeError:
                        continue
                    if event.kind in ("model-activated", "model-rejected"):
                        answers.append(event)
            positions = {tp: await consumer.position(tp) for tp in tps}
            at_end = all(positions[tp] >= end[tp] for tp in tps)
            if expect is not None:
                if expect and expect <= {a.worker_id for a in answers}:
                    break
                if time.monotonic() >= deadline:
                    break
            elif at_end:
                break
    finally:
        await consumer.stop()
    return answers


def read_status(settings: WorkerSettings) -> dict[str, dict[str, Any]]:
    """The Redis hash `<prefix>:workers`: worker_id → status JSON."""
    import redis

    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    try:
        raw = client.hgetall(workers_key(settings.redis_prefix))
    finally:
        client.close()
    return {k: json.loads(v) for k, v in raw.items()}


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _status(args: argparse.Namespace) -> int:
    settings = WorkerSettings()
    workers = read_status(settings)
    answers = asyncio.run(read_answers(settings))
    latest: dict[str, ModelUpdate] = {}
    for a in answers:
        if a.worker_id:
            latest[a.worker_id] = a
    ids = sorted(set(workers) | set(latest))
    report = {
        w: {
            **workers.get(w, {}),
            "last_answer": (
                {
                    "kind": latest[w].kind,
                    "model_version": latest[w].model_version,
                    "reasons": list(latest[w].reasons),
                    "at": latest[w].emitted_at,
                }
                if w in latest
                else None
            ),
        }
        for w in ids
    }
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    if not report:
        print("no worker has reported on this topic prefix / Redis prefix yet")
        return 0
    for w, st in report.items():
        last = st["last_answer"]
        active = st.get("active") or (last["model_version"] if last and last["kind"] == "model-activated" else None)
        print(f"{w}")
        print(f"  active:   {active or '-'}")
        print(f"  previous: {st.get('previous') or '-'}")
        print(f"  shadow:   {st.get('shadow') or '-'}")
        print(f"  updated:  {_when(st.get('at'))} (reported {_when(st.get('reported_at'))})")
        if last:
            extra = f": {'; '.join(last['reasons'])}" if last["reasons"] else ""
            print(f"  last answer: {last['kind']} {last['model_version']} at {_when(last['at'])}{extra}")
        shadow = st.get("shadow_stats")
        if shadow:
            agreement = shadow["agreement"]
            print(
                f"  shadow {shadow['shadow_version']} vs {shadow['active_version']}: {shadow['compared']} products, "
                f"agreement {agreement:.3f}"
                if agreement is not None
                else "  shadow: no product compared yet"
            )
            if shadow["added"]:
                print(f"    added:   {shadow['added']}")
            if shadow["removed"]:
                print(f"    removed: {shadow['removed']}")
        retag = st.get("retag")
        if retag:
            print(f"  retag {retag['model_version']}: {retag['scored']} scored, {retag['updates']} updates")
    return 0


def _request(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = WorkerSettings()
        model = Path(args.model) if getattr(args, "model", None) else None
        event, key = build_request(kind, settings, model=model, version=getattr(args, "version", None))
        expect = set(read_status(settings)) if args.wait else None
        try:
            offset = asyncio.run(send_request(settings, event, key))
        except TagstreamError:
            raise
        except Exception as exc:
            raise TagstreamError(f"could not publish to {settings.topic('model-updates')}: {exc}") from exc
        print(f"sent {kind} {event.model_version} to {settings.topic('model-updates')} at offset {offset}")
        if not args.wait:
            return 0
        answers = asyncio.run(read_answers(settings, after=offset, expect=expect, timeout=args.wait))
        refused = False
        for a in answers:
            refused |= a.kind == "model-rejected"
            extra = f": {'; '.join(a.reasons)}" if a.reasons else ""
            print(f"{a.worker_id}: {a.kind} {a.model_version}{extra}")
        missing = (expect or set()) - {a.worker_id for a in answers}
        if missing:
            print(f"no answer within {args.wait:g}s from: {', '.join(sorted(missing))}")
        return 1 if refused or missing else 0

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `model` with status, activate, shadow, promote and rollback."""
    p = subparsers.add_parser("model", help="hot swap, shadow, promote and roll back models of running workers")
    sub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    s = sub.add_parser("status", help="each worker's active/previous/shadow model and last answer")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_status)

    for kind, text in (
        ("activate", "validate and activate a bundle on every worker"),
        ("shadow", "score a bundle beside the active model on live events (diffs to tag-shadow-diffs)"),
    ):
        s = sub.add_parser(kind, help=text)
        s.add_argument("--model", required=True, help="bundle directory (a path every worker can read)")
        s.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for answers")
        s.set_defaults(func=_request(kind))

    s = sub.add_parser("promote", help="make the shadow model active on every worker")
    s.add_argument("--version", help="only if the shadow is this version (default: whatever shadow is set)")
    s.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for answers")
    s.set_defaults(func=_request("promote"))

    s = sub.add_parser("rollback", help="return every worker to its previous model")
    s.add_argument("--version", help="only if the previous model is this version")
    s.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for answers")
    s.set_defaults(func=_request("rollback"))
