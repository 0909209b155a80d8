"""Announce a bundle on `<prefix>model-updates` (SPEC §1 model-update) and the periodic retrain-and-publish loop.

No TensorFlow here: the loop calls `training.train.train`, which imports it when it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from schemas.records import ModelUpdate
from tagstream.errors import ConfigError, TagstreamError
from training.catalog import CatalogProduct
from training.settings import TrainerSettings

__all__ = [
    "PUBLISHED_FILE",
    "Comparison",
    "check_publishing",
    "compare_reports",
    "current_model",
    "eval_holdout",
    "model_update_event",
    "parse_duration",
    "periodic_retrain",
    "publish_bundle",
    "record_publication",
    "send_model_update",
]

log = logging.getLogger(__name__)

PublishKind = Literal["activate", "shadow"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 366 * 86400  # longer sleeps overflow the platform's time_t (200000d did, after a whole cycle)
PUBLISHED_FILE = "published.jsonl"  # in the registry: one line per bundle published from it (record_publication)


def parse_duration(text: str) -> float:
    """'6h' → 21600.0; units s, m, h, d (seconds when none). ConfigError on anything else, ≤ 0 or over 366 days."""
    m = _DURATION.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"bad duration {text!r} (expected e.g. 90s, 30m, 6h, 1d)")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"bad duration {text!r}: at most 366d")
    return seconds


# --------------------------------------------------------------------------------------------------- publishing


def verify_key() -> Any:
    """The Ed25519 public key of TAGSTREAM_MODEL_VERIFY_KEY (as `tagstream model activate` reads it), or None: a
    bundle the workers would refuse is not announced."""
    from tagstream.settings import load_settings

    return load_settings(TrainerSettings, "publish").verify_key()


def model_update_event(bundle_dir: str | Path, kind: PublishKind = "activate") -> tuple[ModelUpdate, str]:
    """Validate the bundle (load_bundle; with TAGSTREAM_MODEL_VERIFY_KEY set, its signature too, as the workers
    will) and build its schema-valid model-update event; returns (event, model name)."""
    from serving.bundle import SIGNATURE_FILE, load_bundle

    if kind not in ("activate", "shadow"):
        raise ConfigError(f"publish kind must be activate or shadow, got {kind!r}")
    path = Path(bundle_dir).resolve()
    bundle = load_bundle(path, verify_key=verify_key())
    sig_file = path / SIGNATURE_FILE
    signature = sig_file.read_text().strip() if sig_file.is_file() else None
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


async def send_model_update(event: ModelUpdate, key: str, settings: TrainerSettings) -> None:
    """Send one model-update event (acks=all, idempotent producer) keyed by the model name."""
    from streams.model_cli import send_model_update as send

    await send(settings.kafka_bootstrap, f"{settings.topic_prefix}model-updates", event, key.encode("utf-8"))


def publish_bundle(bundle_dir: str | Path, kind: PublishKind, settings: TrainerSettings) -> ModelUpdate:
    """Validate and announce a bundle, and record it in its registry (`record_publication`); returns the event."""
    event, name = model_update_event(bundle_dir, kind)
    asyncio.run(send_model_update(event, name, settings))
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


def _loads(bundle_dir: Path) -> bool:
    from serving.bundle import load_bundle

    try:
        load_bundle(bundle_dir)
    except (TagstreamError, OSError) as exc:
        log.info("skipping %s as the current model: %s", bundle_dir, exc)
        return False
    return True


def current_model(registry: str | Path, kind: PublishKind = "activate") -> Path | None:
    """The model `train --every` compares its first candidate with when it starts: the newest bundle still valid in
    the registry among those it records as published with `kind` (`published.jsonl`); when it records none, the
    newest valid bundle (said in a log line: it may be one that was never published); None in an empty registry."""
    from serving.bundle import VERSION_RE, list_versions

    registry = Path(registry)
    published: list[str] = []
    try:
        lines = (registry / PUBLISHED_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s: %s", registry / PUBLISHED_FILE, exc)
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("kind") != kind:
            continue
        version = entry.get("model_version")
        if isinstance(version, str) and VERSION_RE.match(version):
            published.append(version)
    for version in dict.fromkeys(reversed(published)):
        if _loads(registry / version):
            log.info(
                "current model: %s, the last bundle of %s published (%s) that is still valid", version, registry, kind
            )
            return registry / version
    for version in reversed(list_versions(registry)):
        if _loads(registry / version):
            log.info(
                "current model: %s, the newest valid bundle in %s (%s names no bundle published as %s that is still "
                "valid, so it may be one that was never published)",
                version,
                registry,
                PUBLISHED_FILE,
                kind,
            )
            return registry / version
    return None


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

    asyncio.run(check())


# ------------------------------------------------------------------------------------------- periodic retraining


def eval_holdout(products: Sequence[CatalogProduct], fraction: float = 0.1) -> list[bool]:
    """Stable membership of the fixed evaluation set: sha256 of the normalised title decides (the loaders' duplicate
    key, so each kept product has its own). Not the product id: cn-jd ids are line numbers (`jd-<line>`), and one
    row added or removed would move every later product in or out of the set, into the current model's training."""
    from training.cleaning import normalize_text

    cut = int(fraction * 2**32)
    return [
        int.from_bytes(hashlib.sha256(normalize_text(p.title).encode()).digest()[:4], "big") < cut for p in products
    ]


@dataclass(frozen=True, slots=True)
class Comparison:
    """Outcome of comparing a candidate's evaluation with the current model's."""

    publish: bool
    reasons: tuple[str, ...]


def compare_reports(
    candidate: Mapping[str, Any],
    current: Mapping[str, Any] | None,
    *,
    metric: str = "weighted_f1",
    tolerance: float = 0.005,
) -> Comparison:
    """Publish only if the candidate is not worse: it evaluates every group the current model evaluates (a group
    it lost counts as worse), on each of them metric ≥ current − tolerance, and the mean over them ≥ the current
    mean. No current model → publish. Reports are `{"groups": {name: {metric: value}}}` (evaluate_scores /
    `tagstream evaluate --json`)."""
    if current is None:
        return Comparison(True, ("no current model",))
    cand_g = candidate.get("groups", {})
    cur_g = current.get("groups", {})
    common = sorted(g for g in cur_g if g in cand_g and cur_g[g].get(metric) is not None)
    if not common:
        return Comparison(False, ("no group in common with the current model",))
    reasons = []
    worse = False
    for g in sorted(g for g in cur_g if g not in cand_g and cur_g[g].get(metric) is not None):
        worse = True
        reasons.append(f"{g}: the current model has this group ({metric} {cur_g[g][metric]}), the candidate lacks it")
    for g in common:
        new, old = cand_g[g].get(metric), cur_g[g][metric]
        if new is None or new < old - tolerance:
            worse = True
            reasons.append(f"{g}: {metric} {new} < {old} - {tolerance}")
    new_mean = sum(float(cand_g[g].get(metric) or 0.0) for g in common) / len(common)
    old_mean = sum(float(cur_g[g][metric]) for g in common) / len(common)
    if new_mean < old_mean:
        worse = True
        reasons.append(f"mean {metric} {new_mean:.4f} < current {old_mean:.4f}")
    if not worse:
        reasons.append(f"mean {metric} {new_mean:.4f} ≥ current {old_mean:.4f}")
    return Comparison(not worse, tuple(reasons))


def periodic_retrain(
    load_products: Callable[[], list[CatalogProduct]],
    settings: TrainerSettings,
    *,
    every_s: float,
    registry: Path,
    kind: PublishKind = "activate",
    max_cycles: int | None = None,
    publish: Callable[[Path], Any] | None = None,
    train_fn: Callable[..., Path] | None = None,
    evaluate_fn: Callable[[Path, list[CatalogProduct]], Mapping[str, Any]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_cycle: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every `every_s`: reload the catalog, train on all but the fixed evaluation set, evaluate the new and the
    current bundle on that set, and publish the new one only when `compare_reports` says it is not worse.

    The current model at start is `current_model(registry, kind)` (a restart keeps the gate); when it cannot be
    evaluated any more (removed, edited), the cycle compares with its last evaluation, if one was made.
    Returns one record per cycle (for logs and tests), each also given to `on_cycle` as soon as its cycle ends.
    `publish`, `train_fn`, `evaluate_fn` default to the real ones (Kafka, training.train.train,
    training.train.evaluate_bundle).
    """
    from training.splits import Split, stratified_split

    if train_fn is None or evaluate_fn is None:
        from training.train import evaluate_bundle, train

        train_fn = train_fn or train
        evaluate_fn = evaluate_fn or evaluate_bundle
    publish = publish or (lambda b: publish_bundle(b, kind, settings))
    every_s = min(every_s, MAX_DURATION_S)
    current: Path | None = current_model(registry, kind)
    current_report: Mapping[str, Any] | None = None
    records: list[dict[str, Any]] = []
    cycle = 0
    while max_cycles is None or cycle < max_cycles:
        started = time.monotonic()
        cycle += 1
        record: dict[str, Any] = {"cycle": cycle}
        try:
            products = load_products()
            held = eval_holdout(products)
            eval_set = [p for p, h in zip(products, held, strict=True) if h]
            rest = [p for p, h in zip(products, held, strict=True) if not h]
            inner = stratified_split(rest, validation=settings.validation_fraction, test=0.0, seed=settings.seed)
            # train/validation from the rest; the fixed evaluation set is the test part
            split = Split(
                train_idx=inner.train_idx,
                validation_idx=inner.validation_idx,
                test_idx=_append_idx(len(rest), len(eval_set)),
                products=rest + eval_set,
            )
            bundle = train_fn(rest + eval_set, settings, registry=registry, split=split)
            record["bundle"] = str(bundle)
            report = evaluate_fn(bundle, eval_set)
            if current is not None:  # re-evaluate: the evaluation set may have grown with the catalog
                try:
                    current_report = evaluate_fn(current, eval_set)
                except (TagstreamError, OSError) as exc:
                    held_report = "comparing with its last evaluation" if current_report is not None else None
                    log.warning(
                        "the current model %s cannot be evaluated (%s): %s",
                        current,
                        exc,
                        held_report or "no evaluation of it is held, so there is no current model to compare with",
                    )
                    if current_report is None:
                        current = None
            record["current"] = None if current is None else str(current)
            decision = compare_reports(report, current_report)
            record.update(publish=decision.publish, reasons=list(decision.reasons))
            if decision.publish:
                publish(bundle)
                current, current_report = bundle, report
            log.info(
                "retrain cycle %d: %s (%s)",
                cycle,
                "published" if decision.publish else "kept current",
                "; ".join(decision.reasons),
            )
        except (TagstreamError, OSError) as exc:  # one failed cycle (bad data, a full disk, a key) is logged, not fatal
            record.update(error=str(exc), publish=False)
            log.error("retrain cycle %d failed: %s", cycle, exc)
        records.append(record)
        if on_cycle is not None:
            on_cycle(record)
        if max_cycles is not None and cycle >= max_cycles:
            break
        sleep(max(0.0, every_s - (time.monotonic() - started)))
    return records


def _append_idx(n_rest: int, n_eval: int):
    import numpy as np

    return np.arange(n_rest, n_rest + n_eval, dtype=np.int64)
