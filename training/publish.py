"""Announce a bundle on `<prefix>model-updates` (SPEC §1 model-update) and the periodic retrain-and-publish loop.

No TensorFlow here: the loop calls `training.train.train`, which imports it when it runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from schemas.records import ModelUpdate
from tagstream.errors import (
    BundleError,
    ConfigError,
    DataError,
    FeaturizerError,
    ModelLoadError,
    ModelRejectedError,
    TagstreamError,
)
from training.catalog import CatalogProduct
from training.settings import TrainerSettings

if TYPE_CHECKING:
    from serving.bundle import ModelBundle

__all__ = [
    "KEEP_REFUSED",
    "PUBLISHED_FILE",
    "Comparison",
    "bundle_labels",
    "check_keep_refused",
    "check_publishing",
    "check_republished",
    "compare_reports",
    "current_model",
    "eval_holdout",
    "model_update_event",
    "parse_duration",
    "periodic_retrain",
    "publish_bundle",
    "read_model_updates",
    "record_publication",
    "run_async",
    "send_model_update",
    "workers_active",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
PublishKind = Literal["activate", "shadow"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 366 * 86400  # longer sleeps overflow the platform's time_t (200000d did, after a whole cycle)
PUBLISHED_FILE = "published.jsonl"  # in the registry: one line per bundle published from it (record_publication)
KEEP_REFUSED = 3  # `train --every --keep-refused`: refused candidates of the run kept in the registry (~70-100 MB each)
UPDATES_READ_TIMEOUT_S = 30.0  # longest read of model-updates to its end (once per retrain cycle)


def parse_duration(text: str) -> float:
    """'6h' → 21600.0; units s, m, h, d (seconds when none). ConfigError on anything else, ≤ 0 or over 366 days."""
    m = _DURATION.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"bad duration {text!r} (expected e.g. 90s, 30m, 6h, 1d)")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"bad duration {text!r}: at most 366d")
    return seconds


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)`, where a SIGTERM cancels `coro` (its `finally` blocks run inside the loop: a Kafka consumer
    or producer stops cleanly) and is handed, once the loop has ended, to the SIGTERM handler installed before
    (`tagstream train` then exits 143 with one line). Raising from a signal handler inside the loop instead turned
    into a CancelledError traceback. Off the main thread, or with no Python handler installed, plain `asyncio.run`."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        return asyncio.run(coro)
    received: list[int] = []

    async def main() -> T:
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        assert task is not None

        def cancel(signum: int, frame: FrameType | None) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
            received.append(signum)
            task.cancel()
            loop.call_soon_threadsafe(lambda: None)  # wake the loop if it waits in select()

        signal.signal(signal.SIGTERM, cancel)
        try:
            return await coro
        finally:
            signal.signal(signal.SIGTERM, previous)

    try:
        result = asyncio.run(main())
    except BaseException:
        if received:
            previous(signal.SIGTERM, None)
        raise
    if received:
        previous(signal.SIGTERM, None)
    return result


# --------------------------------------------------------------------------------------------------- publishing


def verify_key() -> Any:
    """The Ed25519 public key of TAGSTREAM_MODEL_VERIFY_KEY (as `tagstream model activate` reads it), or None: a
    bundle the workers would refuse is not announced."""
    from tagstream.settings import load_settings

    return load_settings(TrainerSettings, "publish").verify_key()


def model_update_event(bundle_dir: str | Path, kind: PublishKind = "activate") -> tuple[ModelUpdate, str]:
    """Validate the bundle (load_bundle; with TAGSTREAM_MODEL_VERIFY_KEY set, its signature too, as the workers
    will; refused when changed since its registry recorded it published: `check_republished`) and build its
    schema-valid model-update event; returns (event, model name)."""
    from serving.bundle import SIGNATURE_FILE, load_bundle

    if kind not in ("activate", "shadow"):
        raise ConfigError(f"publish kind must be activate or shadow, got {kind!r}")
    path = Path(bundle_dir).resolve()
    bundle = load_bundle(path, verify_key=verify_key())
    check_republished(path, bundle.model_version, bundle.sha256)
    _check_featurizer(bundle)
    _check_golden_scores(bundle)
    signature = _signature(path / SIGNATURE_FILE)
    event = ModelUpdate(
        kind=kind,
        model_version=bundle.model_version,
        emitted_at=int(time.time() * 1000),
        bundle_uri=str(path),
        sha256=bundle.sha256,
        signature=signature,
    )
    event.to_dict()  # schema check now, not at send time
    return event, bundle.model_name


def _check_featurizer(bundle: ModelBundle) -> None:
    """BundleError (one line) when the bundle's featurizer does not make its golden rows again, as the workers'
    validation would refuse it (`serving.validate.check_golden_features`): said here, before it is announced."""
    from serving.validate import check_golden_features

    if bundle.golden.inputs is None:  # written before bundles kept them: not checked (nor is its featurizer loaded)
        return
    try:
        check_golden_features(bundle, bundle.featurizer)
    except (ModelRejectedError, FeaturizerError) as exc:
        raise BundleError(f"{bundle.path}: {exc}") from None


def _check_golden_scores(bundle: ModelBundle) -> None:
    """BundleError (one line) when the bundle's ONNX model does not give its golden rows' scores (within the workers'
    default `TAGSTREAM_MODEL_CANARY_ATOL`, 1e-4), as their validation would refuse it: a model.onnx changed and its
    manifest hashed again passes every checksum, not this."""
    from serving.scorer import OnnxScorer

    scorer = OnnxScorer(intra_op_num_threads=1, inter_op_num_threads=1)
    try:
        scorer.load(bundle)
        scorer.check_golden(bundle, atol=1e-4)
    except (ModelRejectedError, ModelLoadError) as exc:
        reasons = "; ".join(exc.reasons) if isinstance(exc, ModelRejectedError) else str(exc)
        raise BundleError(f"{bundle.path}: {reasons}") from None
    finally:
        scorer.unload()


def _signature(sig_file: Path) -> str | None:
    """The base64 text of a bundle's `manifest.sig` (SPEC §2: an Ed25519 signature, 64 bytes), None when there is
    none; BundleError (one line) when it is not a regular file of that form, so that no garbage is announced."""
    from serving.bundle import read_regular_file

    if not os.path.lexists(sig_file):
        return None
    try:
        data = read_regular_file(sig_file, 4096)
    except ModelRejectedError as exc:
        raise BundleError(f"{sig_file}: {'; '.join(exc.reasons)}") from None
    try:
        text = "".join(data.decode("ascii").split())
        raw = base64.b64decode(text, validate=True)
    except (UnicodeDecodeError, binascii.Error, ValueError):
        raise BundleError(f"{sig_file}: not a base64 Ed25519 signature (not base64 text)") from None
    if len(raw) != 64:
        raise BundleError(f"{sig_file}: not a base64 Ed25519 signature ({len(raw)} bytes, not 64)")
    return text


async def send_model_update(event: ModelUpdate, key: str, settings: TrainerSettings) -> None:
    """Send one model-update event (acks=all, idempotent producer) keyed by the model name."""
    from streams.model_cli import send_model_update as send

    await send(settings.kafka_bootstrap, f"{settings.topic_prefix}model-updates", event, key.encode("utf-8"))


def publish_bundle(bundle_dir: str | Path, kind: PublishKind, settings: TrainerSettings) -> ModelUpdate:
    """Validate and announce a bundle, and record it in its registry (`record_publication`); returns the event."""
    event, name = model_update_event(bundle_dir, kind)
    run_async(send_model_update(event, name, settings))
    log.info("published %s %s to %smodel-updates", kind, event.model_version, settings.topic_prefix)
    record_publication(bundle_dir, event)
    return event


def record_publication(bundle_dir: str | Path, event: ModelUpdate) -> None:
    """Append `{"model_version", "kind", "published_at", "sha256"}` to `published.jsonl` of the bundle's registry
    (its parent directory), which `current_model` reads when `train --every` starts. Best effort: the event is
    already sent, so a registry that cannot be written is a warning."""
    path = Path(bundle_dir).resolve().parent / PUBLISHED_FILE
    line = {"model_version": event.model_version, "kind": event.kind, "published_at": event.emitted_at}
    line["sha256"] = event.sha256
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
    except OSError as exc:
        log.warning("could not record the publication of %s in %s: %s", event.model_version, path, exc)


def _bundle_sha256(bundle_dir: Path) -> str | None:
    """The sha256 of a bundle that loads, else None (said in a log line)."""
    from serving.bundle import load_bundle

    try:
        return load_bundle(bundle_dir).sha256
    except (TagstreamError, OSError) as exc:
        log.info("skipping %s as the current model: %s", bundle_dir, exc)
        return None


def _publications(registry: Path) -> list[dict[str, Any]]:
    """The entries of the registry's `published.jsonl` (none when it does not exist; lines that are no JSON object
    are skipped). OSError / UnicodeDecodeError when it cannot be read."""
    try:
        lines = (registry / PUBLISHED_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def current_model(registry: str | Path, kind: PublishKind = "activate") -> Path | None:
    """The model `train --every` compares its first candidate with when it starts: the newest bundle still valid in
    the registry among those it records as published with `kind` (`published.jsonl`); when it records none, the
    newest valid bundle (said in a log line: it may be one that was never published); None in an empty registry. A
    bundle whose sha256 is not the one `published.jsonl` records for its version (changed in place after it was
    published) is never taken (a warning): the one published before it that is unchanged is. BundleError when every
    bundle recorded as published with `kind` that still loads was changed so (`train --every` refuses to publish
    then: neither no model nor a bundle never published stands in for the one published)."""
    path, _, changed = _current_model(Path(registry), kind)
    if changed is not None:
        raise BundleError(changed)
    return path


def _current_model(registry: Path, kind: PublishKind) -> tuple[Path | None, str | None, str | None]:
    """`current_model` and where it came from: "published.jsonl" or "newest in registry" (None with no model); the
    third is, instead of a model, why there is none to compare with although one was published (each bundle
    published was changed after it was published): the cycles refuse to publish, with it as their error."""
    from serving.bundle import VERSION_RE, list_versions

    try:
        entries = _publications(registry)
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s: %s", registry / PUBLISHED_FILE, exc)
        entries = []
    published = [
        e["model_version"]
        for e in entries
        if e.get("kind") == kind and isinstance(e.get("model_version"), str) and VERSION_RE.match(e["model_version"])
    ]
    recorded = _recorded_sha256(entries)
    changed: list[str] = []  # published versions changed in place since, newest first
    for version in dict.fromkeys(reversed(published)):
        if _unchanged_since_published(registry / version, recorded, changed):
            log.info(
                "current model: %s, the last bundle of %s published (%s) that is still valid%s",
                version,
                registry,
                kind,
                f" and unchanged (not {', '.join(changed)}: changed after it was published)" if changed else "",
            )
            return registry / version, PUBLISHED_FILE, None
    if changed:  # not a bundle never published (a refused candidate kept by --keep-refused), nor no model at all
        why = (
            f"the current model {changed[0]} was changed after it was published (its sha256 is not the one "
            f"{registry / PUBLISHED_FILE} records) and no other bundle published as {kind} is unchanged, so there is "
            "no model to compare candidates with: publish a candidate by hand (tagstream publish --model DIR)"
        )
        log.warning("%s", why)
        return None, None, why
    tried = set(published)  # each said once in the log
    for version in reversed(list_versions(registry)):
        if version not in tried and _unchanged_since_published(registry / version, recorded):
            log.info(
                "current model: %s, the newest valid bundle in %s (%s names no bundle published as %s that is still "
                "valid, so it may be one that was never published)",
                version,
                registry,
                PUBLISHED_FILE,
                kind,
            )
            return registry / version, "newest in registry", None
    return None, None, None


def _recorded_sha256(entries: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """model_version → the sha256s `published.jsonl` records it published with."""
    out: dict[str, set[str]] = {}
    for e in entries:
        if isinstance(version := e.get("model_version"), str) and isinstance(sha := e.get("sha256"), str):
            out.setdefault(version, set()).add(sha)
    return out


def _unchanged_since_published(
    bundle: Path, recorded: Mapping[str, set[str]], changed: list[str] | None = None
) -> bool:
    """Whether `bundle` loads and, when `published.jsonl` records its version, with the sha256 recorded (a bundle
    rewritten in place after it was published is skipped as the current model, said in the log, and its version
    added to `changed`)."""
    sha256 = _bundle_sha256(bundle)
    if sha256 is None:
        return False
    other = sorted(recorded.get(bundle.name, set()) - {sha256})
    if other:
        log.warning(
            "skipping %s as the current model: it was published with sha256 %s and has %s now (changed after it was "
            "published)",
            bundle,
            ", ".join(other),
            sha256,
        )
        if changed is not None:
            changed.append(bundle.name)
        return False
    return True


def check_republished(bundle_dir: Path, version: str, sha256: str) -> None:
    """BundleError (one line) when the registry's `published.jsonl` records `version` published with another sha256
    than the bundle has now: it was changed in place after it was published, and the workers would take it for the
    model they already know under that version. An unreadable record is a warning."""
    path = bundle_dir.parent / PUBLISHED_FILE
    try:
        recorded = _recorded_sha256(_publications(bundle_dir.parent)).get(version, set())
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s to check %s was not changed since it was published: %s", path, version, exc)
        return
    if other := sorted(recorded - {sha256}):
        raise BundleError(
            f"{bundle_dir}: {path} records {version} published with sha256 {', '.join(other)}, but it has sha256 "
            f"{sha256} now: the bundle was changed after it was published; train a new bundle instead"
        )


def check_publishing(settings: TrainerSettings) -> None:
    """What `train --every` needs to publish at the end of a cycle, checked before the first one: Kafka reachable
    and `<prefix>model-updates` existing, and the signing key verifying with TAGSTREAM_MODEL_VERIFY_KEY when both
    are set. TagstreamError (one line) otherwise."""
    from streams.model_cli import kafka_errors, no_topic

    key, signing = verify_key(), settings.signing_key()
    if key is not None and signing is not None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = (Encoding.Raw, PublicFormat.Raw)
        if signing.public_key().public_bytes(*raw) != key.public_bytes(*raw):
            raise ConfigError(
                "TAGSTREAM_SIGNING_KEY_PATH is not the private half of TAGSTREAM_MODEL_VERIFY_KEY: every bundle "
                "would be refused before it is published"
            )

    async def check() -> None:
        from aiokafka import AIOKafkaProducer

        topic, bootstrap = f"{settings.topic_prefix}model-updates", settings.kafka_bootstrap
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        with kafka_errors(f"reach {topic}", bootstrap):
            try:
                await producer.start()
                if topic not in (await producer.client.fetch_all_metadata()).topics():
                    raise no_topic(topic, bootstrap)
            finally:
                await producer.stop()

    run_async(check())


def read_model_updates(settings: TrainerSettings, timeout_s: float = UPDATES_READ_TIMEOUT_S) -> list[ModelUpdate]:
    """Every event of `<prefix>model-updates` (requests and the workers' answers; undecodable ones skipped) from its
    beginning to its end, in topic order (by record time across partitions), with the Kafka settings `publish`
    uses. TagstreamError (one line) when it cannot be read within `timeout_s`."""
    topic, bootstrap = f"{settings.topic_prefix}model-updates", settings.kafka_bootstrap

    async def read() -> list[ModelUpdate]:
        from aiokafka import AIOKafkaConsumer

        from streams.model_cli import kafka_errors, no_topic
        from tagstream.errors import EventDecodeError

        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        read: list[tuple[int, int, int, ModelUpdate]] = []
        with kafka_errors(f"read {topic}", bootstrap):
            try:
                await consumer.start()
                if topic not in await consumer.topics():
                    raise no_topic(topic, bootstrap)
                consumer.subscribe([topic])  # no group: every partition is assigned to this consumer
                while not consumer.assignment():  # bounded by timeout_s
                    await asyncio.sleep(0.05)
                tps = sorted(consumer.assignment())
                await consumer.seek_to_beginning(*tps)
                end = await consumer.end_offsets(tps)
                while any([await consumer.position(tp) < end[tp] for tp in tps]):
                    for tp, records in (await consumer.getmany(*tps, timeout_ms=300)).items():
                        for r in records:
                            try:
                                read.append((r.timestamp, tp.partition, r.offset, ModelUpdate.decode(r.value)))
                            except EventDecodeError:
                                continue
            finally:
                await consumer.stop()
        read.sort(key=(lambda e: e[:3]) if len(tps) > 1 else (lambda e: e[1:3]))
        return [event for *_, event in read]

    try:
        return run_async(asyncio.wait_for(read(), timeout_s))
    except TimeoutError:
        raise TagstreamError(f"could not read {topic} at {bootstrap} to its end within {timeout_s:g}s") from None


def workers_active(updates: Sequence[ModelUpdate], published: str | None = None) -> tuple[ModelUpdate | None, str]:
    """The model the workers run, from their answers on model-updates (`updates`, in topic order): the newest
    `model-activated` answer (a worker sends one for every model it makes active: activate, promote, rollback, at its
    start, and with a shadow stop; refusals leave the active model as it was). None and why when no worker answered,
    only refusals were answered, or no worker answered since the newest activate request of version `published` (the
    trainer's own current model: the workers are stopped or still validating it)."""
    from streams.model_cli import ANSWER_KINDS

    answered = [i for i, e in enumerate(updates) if e.kind in ANSWER_KINDS]
    if not answered:
        return None, "model-updates holds no answer from a worker"
    requested = [i for i, e in enumerate(updates) if e.kind == "activate" and e.model_version == published]
    if requested and answered[-1] < requested[-1]:
        return None, f"no worker has answered on model-updates since {published} was published there"
    activated = [e for e in updates if e.kind == "model-activated"]
    if not activated:
        return None, "the workers' answers on model-updates are all refusals"
    return activated[-1], f"model-activated by {activated[-1].worker_id or 'a worker'}"


def check_keep_refused(n: int) -> int:
    """`--keep-refused N`: N itself, ConfigError (one line) when negative."""
    if n < 0:
        raise ConfigError(f"--keep-refused must be 0 or more (the refused candidates kept), got {n}")
    return n


# ------------------------------------------------------------------------------------------- periodic retraining


def eval_holdout(products: Sequence[CatalogProduct], fraction: float = 0.1) -> list[bool]:
    """Stable membership of the fixed evaluation set (`training.splits.in_holdout`)."""
    from training.splits import in_holdout

    return in_holdout(products, fraction)


@dataclass(frozen=True, slots=True)
class Comparison:
    """Outcome of comparing a candidate's evaluation with the current model's."""

    publish: bool
    reasons: tuple[str, ...]


def _figure(group: Mapping[str, Any], metric: str) -> float | None:
    """A group's `metric` in a report; 0.0 when products carry labels of the group but the model knows none of them
    (`n_unknown` > 0 with nothing evaluated: every one of them is a miss); None when no product carries one."""
    value = group.get(metric)
    if value is None:
        return 0.0 if group.get("n_unknown") else None
    return float(value)


def compare_reports(
    candidate: Mapping[str, Any],
    current: Mapping[str, Any] | None,
    *,
    metric: str = "weighted_f1",
    tolerance: float = 0.005,
    max_labels_lost: float = 0.2,
) -> Comparison:
    """Publish only if the candidate is not worse than the current model. It is worse when:

    - it lacks a group the current model is evaluated in, or (with both reports' `labels`, the groups and tags of
      each bundle's labels.json: `bundle_labels`) a group the current model has, evaluated or not (a catalog that
      lost a column);
    - (with `labels`) in a group both have, it lacks more than `max_labels_lost` of the current model's labels (a
      catalog that lost rows: TAGSTREAM_GATE_MAX_LABELS_LOST);
    - in a group, its top-1 `metric` < current − tolerance, or the mean over the groups < the current mean;
    - in a group, what it serves at its thresholds (`served`: `metric`, and `coverage` in exclusive groups) <
      current − tolerance (a group it does not serve counts 0).

    In a group whose products all carry labels the current model does not know, the current model counts 0, and
    such a group the candidate lacks, or lacks labels of, is no loss. No current model → publish. A current model
    that knows none of the labels the evaluation products carry (evaluated in no group, or only in groups whose
    labels it does not know, and serving no free tag: another catalog's model) is not compared by its label set (the
    rules on `labels` are skipped); evaluated in no group, it is compared by the free tags both serve (a catalog of
    free tags only: the rules on labels apply), and with none served the candidate is judged on its own: published
    when one of its figures (top-1 groups, or the free tags it serves) is above 0. Reports are
    `{"groups": {name: {metric, n_unknown}}, "served": {"groups": ...}, "labels": {group: [tag, ...]}}`
    (evaluate_bundle, plus `labels` in `periodic_retrain`); a report without `labels` skips the rules on labels."""
    if current is None:
        return Comparison(True, ("no current model",))
    cand_g = candidate.get("groups", {})
    cur_g = current.get("groups", {})
    cur = {g: f for g, r in cur_g.items() if (f := _figure(r, metric)) is not None}
    evaluated = bool(cur)  # in some group of the evaluation set
    unknown_only = {g for g in cur if cur_g[g].get(metric) is None}  # the current model knows none of their labels
    # another catalog's model: it knows none of the labels the evaluation products carry (every group it is evaluated
    # in is one of those, or there is none, and it serves no free tag), so its label set says nothing of what this
    # catalog lost
    foreign = unknown_only == set(cur) and _served_tags(current, metric) is None
    notes = [
        f"{g}: the current model knows none of the labels of the {cur_g[g]['n_unknown']} products that carry one "
        f"({metric} counted 0)"
        for g in sorted(unknown_only)
    ]
    worse: list[str] = []
    lacking: set[str] = set()  # group keys the candidate lacks, already said
    for g in sorted(set(cur) - set(cand_g)):
        if g in unknown_only:  # neither model tags this group: no loss
            cur.pop(g)
            notes.append(f"{g}: neither model knows the labels its products carry (not compared)")
            continue
        lacking.add(_group_key(g))
        worse.append(f"{g}: the current model has this group ({metric} {cur[g]}), the candidate lacks it")
    skip = lacking | {_group_key(g) for g in unknown_only}
    if not foreign:
        worse += _labels_lost(candidate.get("labels"), current.get("labels"), max_labels_lost, skip, lacking)
    elif candidate.get("labels") and current.get("labels"):
        notes.append(
            "labels: the current model knows none of the labels the evaluation products carry (another catalog's "
            "model?): the label sets are not compared"
        )
    common = sorted(set(cur) & set(cand_g))
    new = {g: _figure(cand_g[g], metric) for g in common}
    for g in common:
        if new[g] is None or new[g] < cur[g] - tolerance:  # type: ignore[operator]
            worse.append(f"{g}: {metric} {new[g]} < {cur[g]} - {tolerance}")
    worse += _served_worse(candidate, current, (metric, "coverage"), tolerance, lacking | skip)
    ok: list[str] = []
    if common:
        new_mean = sum(new[g] or 0.0 for g in common) / len(common)
        old_mean = sum(cur[g] for g in common) / len(common)
        if new_mean < old_mean:
            worse.append(f"mean {metric} {new_mean:.4f} < current {old_mean:.4f}")
        else:
            ok.append(f"mean {metric} {new_mean:.4f} ≥ current {old_mean:.4f}")
    elif not evaluated:
        cur_served = _served_tags(current, metric)
        if cur_served is None:
            return _judged_alone(candidate, metric) if not worse else Comparison(False, (*worse, *notes))
        # a catalog of free tags only: the tags each model serves are what there is to compare (`_served_worse`)
        if not worse:
            ok.append(f"served tags: {metric} {_served_tags(candidate, metric)} ≥ {cur_served} - {tolerance}")
    if worse:
        return Comparison(False, (*notes, *worse))
    return Comparison(True, (*notes, *ok))


def _group_key(name: str) -> str:
    """What two reports' group names are compared by (`serving.decoding.group_key`: `Colour` and `colour` alike)."""
    from serving.decoding import group_key

    return group_key(name)


def _label_id(group: str, tag: str) -> str:
    """What a label is compared by across two bundles: the tag for categories and free tags, the value for an
    attribute (an older bundle may spell the group `Colour`, a newer one `colour`)."""
    from training.labels import CATEGORY_GROUPS, TAGS_GROUP

    return tag if group in (*CATEGORY_GROUPS, TAGS_GROUP) else tag[len(group) + 1 :]


def _labels_lost(
    candidate: Mapping[str, Sequence[str]] | None,
    current: Mapping[str, Sequence[str]] | None,
    max_lost: float,
    skip: set[str],
    lacking: set[str],
) -> list[str]:
    """The reasons a candidate is worse by its label set (`compare_reports`): a group of the current model it lacks
    (its key added to `lacking`), or more than `max_lost` of the current model's labels lost in a group. Groups whose
    key is in `skip` are not looked at; nothing without both label sets."""
    if not candidate or not current:
        return []
    cand = {_group_key(g): {_label_id(g, t) for t in tags} for g, tags in candidate.items()}
    reasons = []
    for g, tags in sorted(current.items()):
        key, have = _group_key(g), {_label_id(g, t) for t in tags}
        if key in skip or not have:
            continue
        if key not in cand:
            lacking.add(key)
            reasons.append(f"{g}: the current model has this group ({len(have)} labels), the candidate lacks it")
            continue
        lost = sorted(have - cand[key])
        if len(lost) > max_lost * len(have):
            reasons.append(
                f"{g}: the candidate lacks {len(lost)} of the current model's {len(have)} labels "
                f"({len(lost) / len(have):.0%}, more than TAGSTREAM_GATE_MAX_LABELS_LOST={max_lost:g}; e.g. "
                f"{', '.join(lost[:3])}): has the catalog lost rows or values?"
            )
    return reasons


def _served_worse(
    candidate: Mapping[str, Any],
    current: Mapping[str, Any],
    metrics: Sequence[str],
    tolerance: float,
    skip: set[str],
) -> list[str]:
    """The reasons a candidate serves worse than the current model (`compare_reports`): in a group where the current
    model has a served figure, the candidate's is lower by more than `tolerance` (missing counts 0); `coverage` in
    exclusive groups only (the multi-label group's, which keeps `per_tag`, counts products given any free tag, where
    none may be due). Groups whose key is in
    `skip` (a lacking group already said, one the current model knows none of the labels of) are not looked at."""
    cur_s = current.get("served", {}).get("groups", {})
    cand_s = {_group_key(g): r for g, r in candidate.get("served", {}).get("groups", {}).items()}
    reasons = []
    for g, r in sorted(cur_s.items()):
        key = _group_key(g)
        if key in skip:
            continue
        for m in metrics:
            if m == "coverage" and "per_tag" in r:  # free tags: serving fewer where none is due is no loss
                continue
            if (old := r.get(m)) is None:  # no product carries a label of it, or only ones the model does not know
                continue
            new = _figure(cand_s[key], m) if key in cand_s else None  # a group not served counts 0
            if (new or 0.0) < float(old) - tolerance:
                reasons.append(f"served {g}: {m} {new} < {old} - {tolerance}")
    return reasons


def _served_tags(report: Mapping[str, Any], metric: str) -> float | None:
    """A report's `metric` of the free tags it serves (`served.groups.tags`), None when it has none."""
    from training.labels import TAGS_GROUP

    value = (report.get("served", {}).get("groups", {}).get(TAGS_GROUP) or {}).get(metric)
    return None if value is None else float(value)


def _judged_alone(candidate: Mapping[str, Any], metric: str) -> Comparison:
    """`compare_reports` when the current model is evaluated in no group: the candidate's own figures decide."""
    from training.labels import TAGS_GROUP

    figures = {g: float(v) for g, r in candidate.get("groups", {}).items() if (v := r.get(metric)) is not None}
    if (served := _served_tags(candidate, metric)) is not None:
        figures[f"served {TAGS_GROUP}"] = served
    why = "no group in common with the current model (none of the evaluation products carries a label of its groups)"
    if not any(v > 0 for v in figures.values()):
        alone = ", ".join(f"{g} {v}" for g, v in sorted(figures.items())) or "no group"
        return Comparison(False, (f"{why}, and the candidate scores no better than 0 on its own ({metric}: {alone})",))
    alone = ", ".join(f"{g} {v}" for g, v in sorted(figures.items()))
    return Comparison(True, (f"{why}: the candidate is judged on its own ({metric}: {alone})",))


def bundle_labels(bundle: Path) -> dict[str, list[str]] | None:
    """A bundle's label groups and their tags (its labels.json: `{group: [tag, ...]}`, every group, the free tags
    too), what the gate compares label sets by; None when it cannot be read as such."""
    try:
        obj = json.loads((bundle / "labels.json").read_bytes())
        out: dict[str, list[str]] = {g["name"]: [] for g in obj["groups"]}
        for label in obj["labels"]:
            out[label["group"]].append(label["tag"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out


def _with_labels(report: Mapping[str, Any], bundle: Path) -> Mapping[str, Any]:
    """`report` with the bundle's label sets (`bundle_labels`) under `labels`, for `compare_reports`."""
    labels = bundle_labels(bundle)
    return report if labels is None else {**report, "labels": labels}


@dataclass(frozen=True, slots=True)
class GateSet:
    """The evaluation products a cycle compares the candidate and the current model on, and what the cycle's JSON
    line says of them (`info`: `evaluation_set`, `compared_on`, `current_trained_on`, `fair`, and `note` when not
    fair)."""

    products: list[CatalogProduct]
    info: dict[str, Any]


def bundle_trained_on(bundle: Path) -> frozenset[int] | None:
    """The keys (`training.splits.trained_on_key`) of the products `bundle` trained on, from its metrics.json
    (`trained_on`, covered by the manifest); None when it keeps no such record (a bundle written before tagstream kept
    one, or a file that cannot be read)."""
    from training.splits import read_trained_on

    try:
        metrics = json.loads((bundle / "metrics.json").read_bytes())
    except (OSError, ValueError):
        return None
    return read_trained_on(metrics.get("trained_on")) if isinstance(metrics, dict) else None


def gate_set(
    eval_set: Sequence[CatalogProduct], candidate: Path, current: Path | None, *, min_products: int
) -> GateSet:
    """The products of the fixed evaluation set neither the candidate nor the current model trained on (the
    candidate never trains on the evaluation set; a model from a single `tagstream train` run, or from another
    catalog, may have). The whole evaluation set instead, with a note, when the current bundle keeps no record of its
    training products, or when it trained on some of the set and fewer than `min_products` others remain: that
    comparison favours the current model, so a candidate published on it is still not worse."""
    from training.splits import trained_on_key

    products = list(eval_set)
    info: dict[str, Any] = {"evaluation_set": len(products), "compared_on": len(products)}
    if current is None:
        return GateSet(products, {**info, "current_trained_on": None, "fair": True})
    seen = bundle_trained_on(current)
    if seen is None:
        note = (
            f"the current model {current.name} keeps no record of the products it trained on (a bundle written "
            "before tagstream kept one): compared on the whole evaluation set, which it may have trained on"
        )
        return GateSet(products, {**info, "current_trained_on": None, "fair": False, "note": note})
    keys = [trained_on_key(p) for p in products]
    info["current_trained_on"] = sum(k in seen for k in keys)
    seen = seen | (bundle_trained_on(candidate) or frozenset())
    unseen = [p for p, k in zip(products, keys, strict=True) if k not in seen]
    if len(unseen) < len(products) and len(unseen) < min_products:
        note = (
            f"only {len(unseen)} of the {len(products)} evaluation products are unseen by both models (the current "
            f"model trained on {info['current_trained_on']}), fewer than TAGSTREAM_GATE_MIN_PRODUCTS={min_products}: "
            "compared on the whole evaluation set, which favours the current model"
        )
        return GateSet(products, {**info, "fair": False, "note": note})
    return GateSet(unseen, {**info, "compared_on": len(unseen), "fair": True})


def periodic_retrain(
    load_products: Callable[[], list[CatalogProduct]],
    settings: TrainerSettings,
    *,
    every_s: float,
    registry: Path,
    kind: PublishKind = "activate",
    max_cycles: int | None = None,
    keep_refused: int = KEEP_REFUSED,
    publish: Callable[[Path], Any] | None = None,
    train_fn: Callable[..., Path] | None = None,
    evaluate_fn: Callable[[Path, list[CatalogProduct]], Mapping[str, Any]] | None = None,
    model_updates: Callable[[], Sequence[ModelUpdate]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_decision: Callable[[dict[str, Any]], None] | None = None,
    on_cycle: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every `every_s`: reload the catalog, train on all but the fixed evaluation set, evaluate the new and the
    current bundle on the products of that set neither trained on (`gate_set`: a bundle records its training
    products in metrics.json `trained_on`), and publish the new one only when `compare_reports` says it is not worse.

    The current model at start is `current_model(registry, kind)` (a restart keeps the gate), then the last one
    published; when every bundle published was changed in place since, each cycle refuses to publish (its record has
    `error`) until the workers announce a model of the registry or a bundle is published by hand. With kind
    activate, each cycle first reads model-updates (`model_updates`) and compares with the model the workers
    announced active last (`workers_active`: an operator's activate or rollback counts) when its bundle
    is in the registry and loads; when the topic cannot be read, holds no such answer or names another bundle, with
    the trainer's own current model, as said in the log. When the current model cannot be evaluated any more
    (removed, edited), the cycle compares with its last evaluation, if one was made. A cycle that fails (bad data, a
    full disk, or an unexpected error, logged with its traceback) publishes nothing, and the next one runs. After
    each cycle, the candidates the gate refused in this run beyond the newest `keep_refused` are removed from the
    registry, except those published (`published.jsonl`), compared with or named on model-updates (an operator may
    run one); none in a cycle that could not read those. Returns one record per cycle (for logs and tests): `current`
    and where it came from (`current_from`: "model-updates", "published.jsonl", "newest in registry" or "published
    by this run"; in a failed cycle, the current model as known when it failed), `gate` (`GateSet.info`), `removed`.
    Each record is given to `on_decision` once the gate decided (before the removals) and to `on_cycle` as soon as
    its cycle ends. `publish`, `train_fn`, `evaluate_fn` default to the real ones (Kafka, training.train.train,
    training.train.evaluate_bundle), `model_updates` to `read_model_updates` when `publish` is the real one (with
    another `publish` and no `model_updates`, no topic is read).
    """
    from training.splits import holdout_split

    check_keep_refused(keep_refused)
    if train_fn is None or evaluate_fn is None:
        from training.train import evaluate_bundle, train

        train_fn = train_fn or train
        evaluate_fn = evaluate_fn or evaluate_bundle
    if model_updates is None and publish is None:  # the topic `publish` sends to
        model_updates = functools.partial(read_model_updates, settings)
    publish = publish or (lambda b: publish_bundle(b, kind, settings))
    every_s = min(every_s, MAX_DURATION_S)
    current, current_from, changed = _current_model(registry, kind)
    if kind != "activate":
        log.info("--kind %s: each candidate is compared with the last %s published, not the workers' model", kind, kind)
    current_report: Mapping[str, Any] | None = None
    refused: list[Path] = []  # this run's candidates the gate refused, oldest first (`_remove_refused`)
    records: list[dict[str, Any]] = []
    cycle = 0
    while max_cycles is None or cycle < max_cycles:
        started = time.monotonic()
        cycle += 1
        record: dict[str, Any] = {"cycle": cycle}
        record.update(current=None if current is None else str(current), current_from=current_from)
        named: set[str] | None = None if model_updates is not None else set()  # versions on model-updates
        loaded = False
        try:
            products = load_products()
            loaded = True
            # the fixed evaluation set is the test part, train/validation are stratified from the rest (as a plain
            # `train` splits, at the gate's fraction)
            split = holdout_split(products, validation=settings.validation_fraction, seed=settings.seed)
            eval_set = split.test
            bundle = train_fn(products, settings, registry=registry, split=split)
            record["bundle"] = str(bundle)
            updates = None if model_updates is None else _read_updates(model_updates, cycle, current)
            if updates is not None:
                named = {e.model_version for e in updates}
            if kind == "activate" and updates is not None:
                running = _workers_model(updates, registry, current, cycle)
                if running is not None:
                    current, current_from, changed = running, "model-updates", None
                    current_report = None  # its own evaluation, not the one of the model compared with before
            if changed is not None:  # the model published was changed in place: one published by hand since?
                current, current_from, changed = _current_model(registry, kind)
            record.update(current=None if current is None else str(current), current_from=current_from)
            if changed is not None:  # no model to compare with is not "no current model → publish"
                refused.append(bundle)  # kept (--keep-refused), for an operator to publish by hand
                raise BundleError(changed)
            gate = gate_set(eval_set, bundle, current, min_products=settings.gate_min_products)
            record["gate"] = gate.info
            if "note" in gate.info:
                log.warning("retrain cycle %d: %s", cycle, gate.info["note"])
            report = _with_labels(evaluate_fn(bundle, gate.products), bundle)
            if current is not None:  # re-evaluate: the evaluation set may have grown with the catalog
                try:
                    current_report = _with_labels(evaluate_fn(current, gate.products), current)
                except (TagstreamError, OSError) as exc:
                    held_report = "comparing with its last evaluation" if current_report is not None else None
                    log.warning(
                        "the current model %s cannot be evaluated (%s): %s",
                        current,
                        exc,
                        held_report or "no evaluation of it is held, so there is no current model to compare with",
                    )
                    if current_report is None:
                        current = current_from = None
            record.update(current=None if current is None else str(current), current_from=current_from)
            decision = compare_reports(report, current_report, max_labels_lost=settings.gate_max_labels_lost)
            record.update(publish=decision.publish, reasons=list(decision.reasons))
            if decision.publish:
                publish(bundle)
                current, current_report, current_from, changed = bundle, report, "published by this run", None
            else:
                refused.append(bundle)
            log.info(
                "retrain cycle %d: %s (%s)",
                cycle,
                "published" if decision.publish else "kept current",
                "; ".join(decision.reasons),
            )
        except (TagstreamError, OSError) as exc:  # one failed cycle (bad data, a full disk, a key) is logged, not fatal
            if cycle == 1 and not loaded and isinstance(exc, DataError):
                raise  # a catalog that does not load at the start (a wrong --format) would fail every cycle
            record.update(error=str(exc), publish=False)
            log.error("retrain cycle %d failed: %s", cycle, exc)
        except Exception as exc:  # a bug or a library's error: logged with its traceback, and the next cycle runs
            record.update(error=f"{type(exc).__name__}: {exc}", publish=False)
            log.exception("retrain cycle %d failed unexpectedly", cycle)
        if on_decision is not None:
            on_decision(record)
        compared = {Path(record["current"]).name} if record.get("current") else set()
        in_use = None if named is None else named | compared | ({current.name} if current is not None else set())
        record["removed"] = _remove_refused(refused, keep_refused, registry, in_use)
        records.append(record)
        if on_cycle is not None:
            on_cycle(record)
        if max_cycles is not None and cycle >= max_cycles:
            break
        sleep(max(0.0, every_s - (time.monotonic() - started)))
    return records


def _read_updates(
    model_updates: Callable[[], Sequence[ModelUpdate]], cycle: int, current: Path | None
) -> list[ModelUpdate] | None:
    """The events of model-updates; None, said in the log, when it cannot be read."""
    try:
        return list(model_updates())
    except (TagstreamError, OSError) as exc:
        log.warning(
            "retrain cycle %d: which model the workers run is not known (%s): comparing with %s, the trainer's own "
            "current model",
            cycle,
            exc,
            current.name if current is not None else "no model",
        )
        return None


def _workers_model(updates: Sequence[ModelUpdate], registry: Path, current: Path | None, cycle: int) -> Path | None:
    """The bundle of `registry` the workers run (`workers_active`), logged when it is not `current`; None, said in
    the log, when that is not known or not a bundle of this registry that loads: `current` stays."""
    keep = f"comparing with {current.name if current is not None else 'no model'}, the trainer's own current model"
    answer, why = workers_active(updates, current.name if current is not None else None)
    if answer is None:
        log.info("retrain cycle %d: which model the workers run is not known (%s): %s", cycle, why, keep)
        return None
    from serving.bundle import VERSION_RE

    version, path = answer.model_version, registry / answer.model_version
    if not VERSION_RE.match(version) or not path.is_dir():
        log.warning(
            "retrain cycle %d: the workers run %s (%s), not a bundle of %s: %s", cycle, version, why, registry, keep
        )
        return None
    sha256 = _bundle_sha256(path)
    if sha256 is None or (answer.sha256 is not None and sha256 != answer.sha256):
        log.warning(
            "retrain cycle %d: the workers run %s (%s), but %s %s: %s",
            cycle,
            version,
            why,
            path,
            "does not load" if sha256 is None else f"is another bundle (sha256 {sha256}, theirs {answer.sha256})",
            keep,
        )
        return None
    if current is None or path.resolve() != current.resolve():
        log.warning(
            "retrain cycle %d: the workers run %s (%s), not %s, the model this trainer published or found last: "
            "comparing with %s",
            cycle,
            version,
            why,
            current.name if current is not None else "none",
            version,
        )
    return path


def _remove_refused(refused: list[Path], keep: int, registry: Path, in_use: set[str] | None) -> list[str]:
    """Remove from the registry the refused candidates of `refused` (this run's, oldest first; updated) beyond the
    newest `keep`. One published (`published.jsonl`) or in `in_use` (the versions compared with, current or named on
    model-updates) is never removed and leaves `refused` for good; when model-updates (`in_use` None) or
    published.jsonl cannot be read, nothing is. A removal that fails is a warning (tried again after the next
    cycle). Returns the removed paths."""
    if len(refused) <= keep:
        return []
    if in_use is None:
        log.info("no refused candidate removed after this cycle: model-updates was not read (one may be in use)")
        return []
    try:
        published = {v for e in _publications(registry) if isinstance(v := e.get("model_version"), str)}
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("no refused candidate removed after this cycle: cannot read %s: %s", registry / PUBLISHED_FILE, exc)
        return []
    used = published | in_use
    refused[:] = [
        b
        for b in refused
        if b.name not in used and b.parent.resolve() == registry.resolve() and b.is_dir() and not b.is_symlink()
    ]
    removed = []
    for bundle in refused[: max(0, len(refused) - keep)]:
        if _remove_bundle(bundle):
            refused.remove(bundle)
            removed.append(str(bundle))
            log.info("removed %s, a candidate the gate refused (the newest %d refused are kept)", bundle, keep)
    return removed


def _remove_bundle(bundle: Path) -> bool:
    """Delete a bundle directory: first renamed to a hidden `.tmp-` one, so no reader sees half a bundle (one left by
    a failed deletion is removed by the next bundle written). False, with a warning, when it stays in the registry."""
    trash = bundle.with_name(f".tmp-{bundle.name}-removed-{time.time_ns()}")
    try:
        os.rename(bundle, trash)
    except OSError as exc:
        log.warning("could not remove the refused candidate %s: %s", bundle, exc)
        return False
    try:
        shutil.rmtree(trash)
    except OSError as exc:
        log.warning("%s left the registry, but deleting %s failed: %s", bundle, trash, exc)
    return True
