"""`tagstream model status | activate | shadow | promote | rollback`: operate the models of running workers.

Requests go to `<prefix>model-updates`; workers answer there with `model-activated` / `model-rejected` and keep
their state in the Redis hash `<prefix>:workers` (worker_id → JSON). `status` shows both: per worker the latest
answer on the topic and the Redis state (active, previous, shadow, shadow summary). `--wait S` waits up to S seconds
for an answer to this request from every live worker (one whose status was reported within `LIVE_WITHIN_S`) and exits
1 when any refused or did not answer. Answers carry no reference to their request, so an answer counts only when its
kind, model version and bundle fit the request (`answer_fits`); an accepted shadow is seen in the worker's status.
`shadow --off` sends a shadow request with no bundle, which stops the shadow; a worker answers it with
`model-activated` of its active model, the reason naming the shadow stopped (`shadow: <version> stopped`).
A status not reported for `worker_status_retention_s` (a killed worker's) is removed by the running workers
(`stale_statuses` + `PRUNE_STATUS_LUA`), or at once by `status --prune`; a status that is not a worker's JSON is shown
as unreadable and left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from schemas import ModelUpdate
from schemas.registry import json_type
from streams.settings import LIVE_WITHIN_S, STATUS_EVERY_S, WorkerSettings
from tagstream.errors import ConfigError, EventDecodeError, StateError, TagstreamError
from tagstream.settings import load_settings

if TYPE_CHECKING:
    import redis
    from aiokafka import AIOKafkaConsumer

__all__ = [
    "LIVE_WITHIN_S",
    "PRUNE_STATUS_LUA",
    "STATUS_EVERY_S",
    "UNREADABLE",
    "WaitResult",
    "answer_fits",
    "build_request",
    "kafka_errors",
    "live_workers",
    "no_topic",
    "parse_status",
    "prune_status",
    "read_answers",
    "read_status",
    "register",
    "rollback_target",
    "rollback_unchanged_reason",
    "send_model_update",
    "send_request",
    "shadow_started",
    "stale_statuses",
    "wait_answers",
    "workers_key",
]

CONTROL_KEY = b"tagstream-control"
ANSWER_KINDS = ("model-activated", "model-rejected")
# Request names meaning "whatever the worker has" (streams.model.ANY_SHADOW / ANY_PREVIOUS).
ANY_VERSION = {"promote": "shadow", "rollback": "previous"}
ANY_SHADOW = ANY_VERSION["promote"]  # also a shadow stop's: whatever shadow the worker runs
# STATUS_EVERY_S (a running worker rewrites its status at least this often) and LIVE_WITHIN_S (`--wait` expects answers
# only from workers that reported within this) are defined in streams.settings, which checks the retention with them.
UNREADABLE = "unreadable"  # the only key of what `parse_status` gives for a field that is not a worker's status JSON
# Deletes the fields ARGV[2..] of the workers hash KEYS[1] whose stored status still has a numeric `reported_at`
# before ARGV[1] (ms), checked and deleted in one atomic step: a status a worker re-wrote since it was read as stale
# (or one that does not parse) is kept. Returns the fields deleted.
PRUNE_STATUS_LUA = """
local cutoff = tonumber(ARGV[1])
local removed = {}
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local ok, status = pcall(cjson.decode, raw)
    if ok and type(status) == 'table' and type(status.reported_at) == 'number' and status.reported_at < cutoff then
      redis.call('HDEL', KEYS[1], ARGV[i])
      removed[#removed + 1] = ARGV[i]
    end
  end
end
return removed
"""
REDIS_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0  # longest read of model-updates to its end (`status`)
ASSIGN_TIMEOUT_S = 10.0


def workers_key(prefix: str) -> str:
    """Redis hash worker_id → JSON {active, previous, shadow, at, shadow_stats, ...} (SPEC §3)."""
    return f"{prefix}:workers"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def stops_shadow(request: ModelUpdate) -> bool:
    """Whether a request stops the shadow: a shadow request with no bundle (`tagstream model shadow --off`)."""
    return request.kind == "shadow" and request.bundle_uri is None


def shadow_stopped_reason(version: str) -> str:
    """The reason of a worker's answer to a shadow stop (a `model-activated` of its active model)."""
    return f"shadow: {version} stopped"


def rollback_unchanged_reason(active: str) -> str:
    """The reason of a worker's answer to a rollback naming the version it has active already (a `model-activated`
    of that model): nothing to do."""
    return f"rollback: {active} is already active"


NO_PREVIOUS_MODEL = "model rollback: no live worker reports a previous model to roll back to"


def rollback_target(live: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, str]:
    """The version `tagstream model rollback` without `--version` names: the previous model every live worker
    reports (`live`: `live_workers`' first part), so that sending it again changes nothing where it is active
    already. None, with why, when they report none (no live worker) or several, naming the workers that have none:
    the request then names none, and each worker swaps its active and previous models (sent twice, it swaps back).
    ConfigError (NO_PREVIOUS_MODEL) when live workers report their models and none has a previous one: every worker
    would refuse the request."""
    readable = {w: st for w, st in live.items() if UNREADABLE not in st}
    previous = {st.get("previous") for st in readable.values()}
    if len(previous) == 1 and (version := next(iter(previous))):
        return version, f"the previous model every live worker reports ({len(live)})"
    if not readable:
        return None, "no live worker reports its models"
    if previous == {None}:
        replaying = sorted(w for w, st in readable.items() if st.get("caught_up") is False)
        if replaying:  # a restarted worker reports its models once it has folded the history
            return None, f"no live worker reports a previous model yet; {', '.join(replaying)} still replaying"
        if len(readable) == len(live):
            raise ConfigError(NO_PREVIOUS_MODEL)
        unreadable = ", ".join(sorted(w for w in live if w not in readable))
        return None, f"no live worker reports a previous model, but the status of {unreadable} is unreadable"
    shown = ", ".join(sorted(v for v in previous if v))
    if none := sorted(w for w, st in readable.items() if not st.get("previous")):
        shown += f"; none on {', '.join(none)}"
    return None, f"the live workers report different previous models ({shown})"


def build_request(
    kind: str, settings: WorkerSettings, *, model: Path | None = None, version: str | None = None, off: bool = False
) -> tuple[ModelUpdate, bytes]:
    """A schema-valid request and its message key. activate/shadow validate the bundle locally first; a shadow
    request with `off` has no bundle: it stops the shadow (`version`: only if the shadow is that one)."""
    if kind == "shadow" and off:
        if model is not None:
            raise ConfigError("model shadow: --off takes no --model")
        event = ModelUpdate(kind="shadow", model_version=version or ANY_SHADOW, emitted_at=_now_ms())
        event.to_dict()
        return event, CONTROL_KEY
    if kind in ("activate", "shadow"):
        if version is not None:
            raise ConfigError(f"model {kind}: --version goes with --off, not --model")
        from serving.bundle import SIGNATURE_FILE, load_bundle
        from serving.validate import check_place, parse_verify_key

        if model is None:
            raise ConfigError(f"model {kind}: --model DIR is required")
        path = model.resolve()
        check_place(path, settings.model_roots)  # as the workers would refuse it
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
    event = ModelUpdate(kind=kind, model_version=version or ANY_VERSION[kind], emitted_at=_now_ms())  # type: ignore[arg-type]
    event.to_dict()
    return event, CONTROL_KEY


@contextmanager
def kafka_errors(action: str, bootstrap: str) -> Iterator[None]:
    """A Kafka error inside (broker unreachable, a request refused or timed out) becomes one TagstreamError line,
    `could not <action> at <bootstrap>: <error>`. Every command that talks to Kafka wraps its calls in it; around
    `asyncio.run(...)` or inside a coroutine alike."""
    from aiokafka.errors import KafkaConnectionError, KafkaError

    try:
        yield
    except KafkaError as exc:
        down = isinstance(exc, KafkaConnectionError)
        hint = " (is Kafka running there? see TAGSTREAM_KAFKA_BOOTSTRAP)" if down else ""
        raise TagstreamError(f"could not {action} at {bootstrap}: {exc}{hint}") from exc


def no_topic(topic: str, bootstrap: str) -> ConfigError:
    """The error for a topic the broker does not have (auto-creation is off: sends and reads would retry for long)."""
    return ConfigError(
        f"topic {topic} does not exist at {bootstrap}; `tagstream topics` creates it (with the same "
        "TAGSTREAM_TOPIC_PREFIX)"
    )


async def send_model_update(bootstrap: str, topic: str, event: ModelUpdate, key: bytes) -> int:
    """Send one model-update event (acks=all, idempotent producer); returns its offset. Raises TagstreamError when
    Kafka fails or the topic does not exist (checked first: a send to a missing topic retries for ~40 s), and
    ConfigError when it has more than one partition (workers refuse such a topic).
    `tagstream model` requests and `tagstream publish` both send through it."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    with kafka_errors(f"publish to {topic}", bootstrap):
        try:
            await producer.start()
            metadata = await producer.client.fetch_all_metadata()
            if topic not in metadata.topics():
                raise no_topic(topic, bootstrap)
            if len(partitions := metadata.partitions_for_topic(topic) or set()) != 1:
                from streams.topics import model_updates_partitions_error

                raise model_updates_partitions_error(topic, len(partitions))  # no worker would fold what it sent
            meta = await producer.send_and_wait(topic, orjson.dumps(event.to_dict()), key=key)
            return meta.offset
        finally:
            await producer.stop()


async def send_request(settings: WorkerSettings, event: ModelUpdate, key: bytes) -> int:
    """Send a request to the workers' model-updates topic; returns its offset (see `send_model_update`)."""
    return await send_model_update(settings.kafka_bootstrap, settings.topic("model-updates"), event, key)


@asynccontextmanager
async def _answers_consumer(settings: WorkerSettings, after: int) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of model-updates (no group) positioned after offset `after` of every partition; Kafka errors
    become TagstreamError."""
    from aiokafka import AIOKafkaConsumer

    topic = settings.topic("model-updates")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # records deleted under the seek: from the first one left
    )
    with kafka_errors(f"read {topic}", settings.kafka_bootstrap):
        try:
            await consumer.start()
            if topic not in await consumer.topics():
                raise no_topic(topic, settings.kafka_bootstrap)
            consumer.subscribe([topic])  # no group: every partition is assigned to this consumer
            deadline = time.monotonic() + ASSIGN_TIMEOUT_S
            while not consumer.assignment():
                if time.monotonic() > deadline:
                    raise TagstreamError(f"no partition of {topic} assigned within {ASSIGN_TIMEOUT_S:g}s")
                await asyncio.sleep(0.05)
            tps = sorted(consumer.assignment())
            begin = await consumer.beginning_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(after + 1, begin[tp]))
            yield consumer
        finally:
            await consumer.stop()


def _decode_answers(batches: Mapping[Any, list[Any]]) -> list[ModelUpdate]:
    out = []
    for records in batches.values():
        for r in records:
            try:
                event = ModelUpdate.decode(r.value)
            except EventDecodeError:
                continue
            if event.kind in ANSWER_KINDS:
                out.append(event)
    return out


async def last_request(settings: WorkerSettings, window: int = 256) -> tuple[int, ModelUpdate] | None:
    """The newest request on model-updates (not a worker's answer) and its offset; None when there is none. Read
    backwards from the end in widening windows (answers from many workers can follow a request)."""
    async with _answers_consumer(settings, -1) as consumer:
        [tp] = sorted(consumer.assignment())  # model-updates has one partition (streams.topics)
        first = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        start = end
        while start > first:
            start = max(first, start - window)
            consumer.seek(tp, start)
            found: tuple[int, ModelUpdate] | None = None
            deadline = time.monotonic() + READ_TIMEOUT_S
            while await consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    raise TagstreamError(f"could not read {settings.topic('model-updates')}")
                for r in (await consumer.getmany(tp, timeout_ms=300)).get(tp, []):
                    if r.offset >= end:
                        break
                    try:
                        event = ModelUpdate.decode(r.value)
                    except EventDecodeError:
                        continue
                    if event.kind not in ANSWER_KINDS:
                        found = (r.offset, event)
            if found is not None:
                return found
            end, window = start, window * 4
        return None


def refused_by_every_live_worker(
    kind: str, version: str | None, off: bool, live: Mapping[str, Mapping[str, Any]]
) -> str | None:
    """Why every live worker would refuse this promote, shadow stop or rollback to a named version, as they judge it
    (`streams.model.ModelRules.apply`), from their reported models (`live`); None when one might take it, or when
    that cannot be told: no live worker (they fold it at their start), an unreadable status, or a worker still
    replaying the history. A refused request stays in the model-updates history, refused again at every start."""
    statuses = list(live.values())
    if not statuses or any(UNREADABLE in st or st.get("caught_up") is False for st in statuses):
        return None
    shadows = {st.get("shadow") for st in statuses}
    if kind == "promote" or (kind == "shadow" and off):
        what = "model promote" if kind == "promote" else "model shadow --off"
        if shadows == {None}:
            return f"{what}: no live worker runs a shadow model ({len(statuses)} report none)"
        if version is not None and version != ANY_SHADOW and version not in shadows:
            shown = ", ".join(sorted(v for v in shadows if v))
            return f"{what}: no live worker runs {version} as its shadow model (they run {shown})"
        return None
    named = kind == "rollback" and version is not None and version != ANY_VERSION["rollback"]
    if named and not any(version in (st.get("previous"), st.get("active")) for st in statuses):
        shown = ", ".join(sorted({str(st.get("previous")) for st in statuses}))
        return f"model rollback: no live worker has {version} as its previous or active model (previous: {shown})"
    return None


def rollback_from_answers(answers: Sequence[ModelUpdate], topic: str) -> tuple[str, str]:
    """The version a plain `tagstream model rollback` names when no live worker reports its models (all stopped, or
    Redis down): the model the workers' `model-activated` answers on model-updates (`answers`, in topic order) named
    last before the one they name now, so that sending it twice returns there once. ConfigError when they name no
    such model: the request would be a blind swap, undone by a retry."""
    current = previous = None
    for answer in answers:
        if answer.kind == "model-activated" and answer.model_version != current:
            current, previous = answer.model_version, current
    if previous is None:
        raise ConfigError(
            f"model rollback: no live worker reports its models, and the workers' answers on {topic} name no model "
            "active before the current one: name it with --version V (or `model activate --model DIR`)"
        )
    return previous, (
        f"no live worker reports its models; the workers' answers on {topic} name {current} active now and {previous} "
        "before it"
    )


def retry_of_last_rollback(
    last: tuple[int, ModelUpdate] | None, topic: str, live: Mapping[str, Mapping[str, Any]] | None
) -> tuple[str, str] | None:
    """The version a plain `tagstream model rollback` names again, and why, when the newest request on model-updates
    (`last`) is a rollback naming one that a live worker has active (`live`; None: unknown, Redis down): a retry
    (after a `--wait` that timed out) must not undo it where it is done. None otherwise (the previous model the
    workers report is named)."""
    if last is None:
        return None
    offset, request = last
    if request.kind != "rollback" or request.model_version == ANY_VERSION["rollback"]:
        return None
    if live is not None and not any(st.get("active") == request.model_version for st in live.values()):
        return None  # refused everywhere, or not applied yet (the workers' previous model is then that version)
    return request.model_version, (
        f"the newest request on {topic} (offset {offset}) is a rollback to it; sent again it changes nothing where "
        "it is done (to go elsewhere: --version V or `model activate`)"
    )


async def read_answers(settings: WorkerSettings, *, after: int = -1) -> list[ModelUpdate]:
    """Workers' answers on model-updates after offset `after`, up to the current end."""
    answers: list[ModelUpdate] = []
    async with _answers_consumer(settings, after) as consumer:
        tps = sorted(consumer.assignment())
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + READ_TIMEOUT_S
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            if time.monotonic() > deadline:
                raise TagstreamError(f"could not read {settings.topic('model-updates')} to its end")
            answers += _decode_answers(await consumer.getmany(timeout_ms=300))
    return answers


def parse_status(raw: bytes | str) -> dict[str, Any]:
    """A worker's status as stored in `<prefix>:workers`, or `{UNREADABLE: reason}` when the value is not JSON, not
    an object, or has no `reported_at` or one that is not a number (`tagstream model status` shows it so; never
    pruned)."""
    try:
        status = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        return {UNREADABLE: f"not JSON: {exc}"}
    if not isinstance(status, dict):
        return {UNREADABLE: f"not a JSON object but {json_type(status)}"}
    if "reported_at" not in status:  # every worker writes it
        return {UNREADABLE: "no reported_at"}
    at = status["reported_at"]
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        return {UNREADABLE: f"reported_at is not a number: {at!r}"}
    return status


def stale_statuses(raw: Mapping[bytes, bytes], cutoff_ms: int, *, keep: bytes | None = None) -> dict[bytes, int]:
    """The fields of a `<prefix>:workers` hash (as HGETALL returns it) whose status was last reported before
    `cutoff_ms`, with their `reported_at`; never `keep`, a status with no `reported_at` or an unreadable one."""
    out = {}
    for worker, value in raw.items():
        at = parse_status(value).get("reported_at")
        if worker != keep and at is not None and at < cutoff_ms:
            out[worker] = int(at)
    return out


def _redis(settings: WorkerSettings) -> redis.Redis:
    import redis

    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
    )


def read_status(settings: WorkerSettings) -> dict[str, dict[str, Any]]:
    """The Redis hash `<prefix>:workers`: worker_id → status JSON (`parse_status`). Raises StateError when Redis
    fails."""
    import redis

    key = workers_key(settings.redis_prefix)
    client = _redis(settings)
    try:
        raw = client.hgetall(key)
    except redis.RedisError as exc:
        raise StateError(f"could not read the workers' status ({key}) from Redis: {exc}") from exc
    finally:
        client.close()
    return {k.decode(errors="replace"): parse_status(v) for k, v in raw.items()}


def prune_status(settings: WorkerSettings, older_than_s: float) -> tuple[dict[str, int], dict[str, str]]:
    """Remove the workers' statuses last reported more than `older_than_s` ago (`PRUNE_STATUS_LUA`); returns the
    removed ones (worker_id → reported_at) and the unreadable ones left (worker_id → reason). StateError when Redis
    fails."""
    import redis

    key = workers_key(settings.redis_prefix)
    cutoff = _now_ms() - int(older_than_s * 1000)
    client = _redis(settings)
    try:
        raw = client.hgetall(key)
        stale = stale_statuses(raw, cutoff)
        removed = set(client.register_script(PRUNE_STATUS_LUA)(keys=[key], args=[cutoff, *stale])) if stale else set()
    except redis.RedisError as exc:
        raise StateError(f"could not prune the workers' status ({key}) in Redis: {exc}") from exc
    finally:
        client.close()
    unreadable = {w: parse_status(v).get(UNREADABLE) for w, v in raw.items()}
    return (
        {w.decode(errors="replace"): at for w, at in stale.items() if w in removed},
        {w.decode(errors="replace"): reason for w, reason in unreadable.items() if reason is not None},
    )


def live_workers(
    status: Mapping[str, dict[str, Any]], now_ms: int | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(live, stale): workers whose status was reported within `LIVE_WITHIN_S`, and the others (stopped, killed or
    renamed workers leave their status behind)."""
    cutoff = (now_ms if now_ms is not None else _now_ms()) - int(LIVE_WITHIN_S * 1000)
    live = {w: st for w, st in status.items() if (st.get("reported_at") or 0) >= cutoff}
    return live, {w: st for w, st in status.items() if w not in live}


def _target(request: ModelUpdate, before: Mapping[str, Any] | None) -> str | None:
    """The version a promote / rollback request makes active on a worker whose status was `before`."""
    if request.model_version != ANY_VERSION[request.kind]:
        return request.model_version
    return (before or {}).get("shadow" if request.kind == "promote" else "previous")


def answer_fits(request: ModelUpdate, answer: ModelUpdate, before: Mapping[str, Any] | None = None) -> bool:
    """Whether a worker's `answer` can answer `request` (the worker's status before the request: `before`).

    A refusal repeats the request's model version, bundle and sha256 (promote and rollback refusals name their kind
    first); an activation names the version made active: the bundle's for activate, the worker's shadow for promote
    and its previous model for rollback (unless the request names one), or, for a rollback that changes nothing, its
    active model with the reason why (`rollback_unchanged_reason`). A shadow accepted gets no answer."""
    if request.kind not in ("activate", "shadow", "promote", "rollback"):
        return False
    if answer.kind == "model-rejected":
        same = (answer.model_version, answer.bundle_uri, answer.sha256) == (
            request.model_version,
            request.bundle_uri,
            request.sha256,
        )
        if request.kind in ANY_VERSION or stops_shadow(request):
            return same and bool(answer.reasons) and answer.reasons[0].startswith(f"{request.kind}:")
        return same
    if answer.kind != "model-activated":
        return False
    if stops_shadow(request):  # the active model, the reason naming the shadow stopped
        stopped = request.model_version if request.model_version != ANY_SHADOW else (before or {}).get("shadow")
        return stopped is not None and answer.reasons == (shadow_stopped_reason(stopped),)
    if request.kind == "rollback" and answer.reasons:  # nothing to roll back: the active model it named, or had
        target = request.model_version if request.model_version != ANY_VERSION["rollback"] else None
        active = target or (before or {}).get("active")
        return (
            active == answer.model_version
            and len(answer.reasons) == 1
            and answer.reasons[0].startswith(rollback_unchanged_reason(answer.model_version))
        )
    if request.kind == "shadow" or answer.reasons:
        return False
    if request.kind == "activate":
        return answer.model_version == request.model_version and answer.sha256 == request.sha256
    target = _target(request, before)
    return target is not None and answer.model_version == target


def shadow_started(request: ModelUpdate, before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> bool:
    """Whether a worker's status `now` shows it accepted a shadow request: it shadows the request's version and its
    models changed since `before` (read before the request was sent). Clock-free: `at` is the worker's own."""
    return now.get("shadow") == request.model_version and (before is None or now.get("at") != before.get("at"))


@dataclass
class WaitResult:
    """What `wait_answers` saw: the answers that fit the request, those that did not, and the workers whose status
    shows the shadow requested."""

    answers: list[ModelUpdate] = field(default_factory=list)
    ignored: list[ModelUpdate] = field(default_factory=list)
    shadowing: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def answered(self) -> set[str]:
        """Workers that answered the request (or, for shadow, show it running)."""
        return {a.worker_id for a in self.answers if a.worker_id} | set(self.shadowing)


async def wait_answers(
    settings: WorkerSettings,
    request: ModelUpdate,
    *,
    after: int,
    before: Mapping[str, dict[str, Any]],
    timeout: float,
    status: Callable[[WorkerSettings], dict[str, dict[str, Any]]] = read_status,
) -> WaitResult:
    """Read model-updates after the request's offset `after` until every worker of `before` (their status read before
    the request) answered it, or `timeout` seconds passed. For shadow requests the workers' status is polled."""
    result = WaitResult()
    deadline = time.monotonic() + timeout
    next_poll = 0.0
    async with _answers_consumer(settings, after) as consumer:
        while True:
            for answer in _decode_answers(await consumer.getmany(timeout_ms=200)):
                fits = answer_fits(request, answer, before.get(answer.worker_id or ""))
                (result.answers if fits else result.ignored).append(answer)
            if request.kind == "shadow" and not stops_shadow(request) and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.5
                for w, st in status(settings).items():
                    if w in before and w not in result.shadowing and shadow_started(request, before[w], st):
                        result.shadowing[w] = st
            if set(before) <= result.answered or time.monotonic() >= deadline:
                return result


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _print_last_answer(last: Mapping[str, Any] | None) -> None:
    if last:
        extra = f": {'; '.join(last['reasons'])}" if last["reasons"] else ""
        print(f"  last answer: {last['kind']} {last['model_version']} at {_when(last['at'])}{extra}")


def _print_rejections(status: Mapping[str, Any]) -> None:
    """How many requests a worker refused and why it refused the last (its status may come from an older worker that
    kept every reason: they are capped here too)."""
    from serving.bundle import capped

    count, last = status.get("rejections"), status.get("last_rejected")
    if not count:
        return
    line = f"  refused:  {count} request{'s' if count != 1 else ''}"
    if isinstance(last, dict):
        reasons = capped([str(r) for r in last.get("reasons") or []])
        line += f", the last {last.get('model_version')}" + (f": {'; '.join(reasons)}" if reasons else "")
    print(line)


def _prune(args: argparse.Namespace, settings: WorkerSettings) -> int:
    older_than = settings.worker_status_retention_s if args.older_than is None else args.older_than
    if not (math.isfinite(older_than) and older_than >= LIVE_WITHIN_S):
        raise ConfigError(
            f"model status: --older-than must be a number of seconds of at least {LIVE_WITHIN_S:g} (a worker that "
            f"reported within {LIVE_WITHIN_S:g}s is live), got {older_than:g}"
        )
    removed, unreadable = prune_status(settings, older_than)
    if args.json:
        print(json.dumps({"removed": removed, "unreadable": unreadable}, indent=2, ensure_ascii=False))
        return 0
    for w, at in sorted(removed.items()):
        print(f"removed {w}: last reported {_when(at)}")
    for w, reason in sorted(unreadable.items()):
        print(f"kept {w}: unreadable status ({reason})")
    if not removed:
        print(f"no worker status older than {older_than:g}s in {workers_key(settings.redis_prefix)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    settings = load_settings(WorkerSettings, "worker")
    if args.older_than is not None and not args.prune:
        raise ConfigError("model status: --older-than goes with --prune")
    if args.prune:
        return _prune(args, settings)
    workers = read_status(settings)
    answers = asyncio.run(read_answers(settings))
    latest: dict[str, ModelUpdate] = {}
    for a in answers:
        if a.worker_id:
            latest[a.worker_id] = a
    # A worker known only by its answers (stopped, or its status removed) is listed until they are as old as a status
    # the workers remove.
    expired = _now_ms() - int(settings.worker_status_retention_s * 1000)
    ids = sorted(set(workers) | {w for w, a in latest.items() if a.emitted_at >= expired})
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
    live, _ = live_workers(workers)
    for w, st in report.items():
        last = st["last_answer"]
        if UNREADABLE in st:  # left alone by the workers and --prune: `HDEL` it once its worker is known gone
            print(f"{w} (unreadable status: {st[UNREADABLE]})")
            _print_last_answer(last)
            continue
        if w not in workers:  # known by its answers only: stopped cleanly, or its status pruned
            print(f"{w} (stopped: no status; its last answer within TAGSTREAM_WORKER_STATUS_RETENTION_S)")
            _print_last_answer(last)
            continue
        active = st.get("active") or (last["model_version"] if last and last["kind"] == "model-activated" else None)
        print(w if w in live else f"{w} (not reporting: stopped?)")
        print(f"  active:   {active or '-'}")
        print(f"  previous: {st.get('previous') or '-'}")
        print(f"  shadow:   {st.get('shadow') or '-'}")
        print(f"  updated:  {_when(st.get('at'))} (reported {_when(st.get('reported_at'))})")
        _print_last_answer(last)
        _print_rejections(st)
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
            print(f"  retag {retag['model_version']}: {_retag_line(retag)}")
    return 0


def _retag_line(retag: dict[str, Any]) -> str:
    """A re-tag run's progress in `model status`: running or finished, the partitions it covers, its counts."""
    parts = retag.get("partitions")
    covers = "every products partition" if parts is None else f"products partitions {', '.join(map(str, parts))}"
    state = (
        "finished" if retag.get("finished_at") else f"failed ({retag['error']})" if retag.get("error") else "running"
    )
    return (
        f"{state}, {covers}: {retag.get('scored', 0)} scored, {retag.get('skipped_current', 0)} already at it, "
        f"{retag.get('updates', 0)} updates"
        + (f" ({retag['version_only']} naming the new model only)" if retag.get("version_only") else "")
    )


def _request(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = load_settings(WorkerSettings, "worker")
        model = Path(args.model) if getattr(args, "model", None) else None
        off = getattr(args, "off", False)
        version = getattr(args, "version", None)
        live, stale = live_workers(read_status(settings)) if args.wait else ({}, {})
        reported: Mapping[str, Mapping[str, Any]] | None = live  # the live workers' statuses; None: Redis down
        if kind in ("promote", "rollback") or (kind == "shadow" and off):
            try:
                reported = live if args.wait else live_workers(read_status(settings))[0]
            except StateError as exc:  # Redis down: the workers judge the request
                if kind == "rollback" and version is None:
                    print(
                        f"tagstream model: warning: {exc}; the model to roll back to is read from "
                        f"{settings.topic('model-updates')}",
                        file=sys.stderr,
                    )
                reported = None
            if (refusal := refused_by_every_live_worker(kind, version, off, reported or {})) is not None:
                raise ConfigError(f"{refusal}: not sent")
        if kind == "rollback" and version is None:
            last, topic = asyncio.run(last_request(settings)), settings.topic("model-updates")
            if reported is not None and any(UNREADABLE not in st for st in reported.values()):
                version, why = retry_of_last_rollback(last, topic, reported) or rollback_target(reported)
            else:  # every worker stopped, or Redis down: no blind swap, which a retry would undo
                version, why = retry_of_last_rollback(last, topic, None) or rollback_from_answers(
                    asyncio.run(read_answers(settings)), topic
                )
            if version is not None:
                print(f"rollback to {version}: {why}")
            else:
                print(f"rollback naming no version ({why}): each worker swaps its active and previous models")
        event, key = build_request(kind, settings, model=model, version=version, off=off)
        topic = settings.topic("model-updates")
        offset = asyncio.run(send_request(settings, event, key))
        print(f"sent {kind}{' --off' if off else ''} {event.model_version} to {topic} at offset {offset}")
        if not args.wait:
            return 0
        for w, st in sorted(stale.items()):
            if UNREADABLE in st:
                print(f"not waiting for {w}: its status is unreadable ({st[UNREADABLE]})")
            else:
                print(f"not waiting for {w}: no status reported since {_when(st.get('reported_at'))} (stopped?)")
        if not live:
            print(f"no worker reported its status in the last {LIVE_WITHIN_S:g}s: no answer to wait for")
            return 0
        result = asyncio.run(wait_answers(settings, event, after=offset, before=live, timeout=args.wait))
        for a in result.answers:
            extra = f": {'; '.join(a.reasons)}" if a.reasons else ""
            if (
                kind == "activate"
                and a.kind == "model-activated"
                and live.get(a.worker_id, {}).get("active") == a.model_version
            ):
                extra += " (it was active already: nothing swapped)"
            print(f"{a.worker_id}: {a.kind} {a.model_version}{extra}")
        for w, st in sorted(result.shadowing.items()):
            print(f"{w}: shadow {st['shadow']} running beside {st.get('active') or '-'} (worker status)")
        for a in result.ignored:
            print(
                f"{a.worker_id}: {a.kind} {a.model_version} not counted: it does not fit this {kind} (earlier request?)"
            )
        refused = any(a.kind == "model-rejected" for a in result.answers)
        missing = set(live) - result.answered
        if missing:
            print(f"no answer to this {kind} within {args.wait:g}s from: {', '.join(sorted(missing))}")
        return 1 if refused or missing else 0

    return run


def wait_seconds(text: str) -> float:
    """`--wait S`: a finite number of seconds, 0 or more (argparse turns the ValueError into a one-line usage error)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `model` with status, activate, shadow, promote and rollback."""
    p = subparsers.add_parser("model", help="hot swap, shadow, promote and roll back models of running workers")
    sub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    s = sub.add_parser("status", help="each worker's active/previous/shadow model and last answer")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument(
        "--prune",
        action="store_true",
        help="remove the statuses of workers that stopped reporting (killed ones leave theirs) and print them",
    )
    s.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="with --prune: remove statuses not reported for this long (default TAGSTREAM_WORKER_STATUS_RETENTION_S)",
    )
    s.set_defaults(func=_status)

    s = sub.add_parser("activate", help="validate and activate a bundle on every worker")
    s.add_argument("--model", required=True, help="bundle directory (a path every worker can read)")
    s.add_argument("--wait", type=wait_seconds, default=0.0, metavar="S", help="wait up to S seconds for answers")
    s.set_defaults(func=_request("activate"))

    s = sub.add_parser(
        "shadow", help="score a bundle beside the active model on live events (diffs to tag-shadow-diffs), or stop"
    )
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="bundle directory (a path every worker can read)")
    which.add_argument("--off", action="store_true", help="stop the shadow model on every worker")
    s.add_argument("--version", help="with --off: only if the shadow is this version (default: whatever it is)")
    s.add_argument("--wait", type=wait_seconds, default=0.0, metavar="S", help="wait up to S seconds for answers")
    s.set_defaults(func=_request("shadow"))

    s = sub.add_parser("promote", help="make the shadow model active on every worker")
    s.add_argument("--version", help="only if the shadow is this version (default: whatever shadow is set)")
    s.add_argument("--wait", type=wait_seconds, default=0.0, metavar="S", help="wait up to S seconds for answers")
    s.set_defaults(func=_request("promote"))

    s = sub.add_parser(
        "rollback",
        help="return every worker to its previous model: the one the live workers report, named, so that running it "
        "again changes nothing (a worker with that model active answers so); --version V returns to V",
    )
    s.add_argument(
        "--version",
        help="only to this version: the previous model (nothing to do where it is already active; default: the "
        "previous model every live worker reports)",
    )
    s.add_argument("--wait", type=wait_seconds, default=0.0, metavar="S", help="wait up to S seconds for answers")
    s.set_defaults(func=_request("rollback"))
