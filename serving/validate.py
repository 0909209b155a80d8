"""Validation of a candidate model before a worker swaps it in (builds on `serving.bundle.load_bundle`).

Stages, in order; the first failing stage raises `ModelRejectedError` with every reason it found:

0. **place** — with `roots` set (`TAGSTREAM_MODEL_ROOTS`), the bundle directory, its symbolic links followed, must
   be inside one of them: a request on `model-updates` can then name no other directory of the worker's machine.
1. **integrity** — `load_bundle`: manifest sha256 against the request's, every file's sha256, the Ed25519 signature
   when a verification key is configured (unsigned or wrongly signed bundles are refused; a signature carried by the
   request must verify too), the ONNX graph (no external data, allowed opsets and operator domains, size and
   dimension limits, I/O names, dtypes and shapes against the featurizer's L/K and the label map's T), labels,
   thresholds, golden rows; the request's model_version must be the manifest's.
2. **session** — the featurizer loads and ONNX Runtime creates a session.
3. **canary** — the bundle's featurizer reproduces the golden rows' features from the products they were made of
   (bundles that keep them, golden.npz `inputs`): a featurizer.json or asset from another training run (another
   hashing seed, vocabulary or idf) would feed the model features it never learnt; the golden rows score within
   `canary_atol` of the recorded scores (NaN/inf refused); a few featurized products score end to end (featurizer →
   session → decoder).
4. **latency** — the median `predict` latency at batch 1 and 64 is within budget.
5. **quality** — with a labelled golden set, the candidate's micro-F1 may not drop more than `max_quality_drop`
   below the active model's. The active model's tags on the golden set come from the model as the worker holds it
   (`ActiveFigures`, scored where it is loaded), never from its bundle directory, which may be gone by then.

Everything here is CPU-bound and blocking. Parsing and checking an ONNX graph holds the GIL for tens of ms, which
would stall a worker's event loop even from another thread, so a worker runs the stages in a child process
(`validate_isolated`: spawn, one long-lived process) and then only re-opens the validated bytes in its own process
(`open_validated`: sha256 of every file again — hashing releases the GIL —, regular files only, read without blocking
on a FIFO or device; small JSON files; the featurizer, built from those checked bytes; the ONNX Runtime session, whose
creation releases the GIL; and one more canary run on the golden rows).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas.records import ProductChange, Tag
from serving.bundle import (
    DEFAULT_LIMITS,
    MANIFEST_FILE,
    MODEL_FILE,
    REQUIRED_FILES,
    BundleLimits,
    GoldenSet,
    LabelMap,
    ModelBundle,
    Thresholds,
    featurizer_assets,
    load_bundle,
    load_verify_key,
    read_regular_file,
)
from serving.decoding import TagDecoder
from serving.featurizer import Featurizer
from serving.scorer import LatencyStats, OnnxScorer
from tagstream.errors import (
    BundleError,
    ConfigError,
    FeaturizerError,
    ModelLoadError,
    ModelRejectedError,
    ScoringError,
    ValidationTimeoutError,
)
from tagstream.processes import background_child

__all__ = [
    "ActiveFigures",
    "LabelledProduct",
    "QualityReport",
    "TagScorer",
    "ValidatedBundle",
    "ValidationPolicy",
    "ValidationReport",
    "check_golden_features",
    "child_init",
    "load_golden_set",
    "micro_f1",
    "open_validated",
    "parse_verify_key",
    "validate_bundle",
    "validate_isolated",
    "warm_up",
]

# Products scored end to end when no labelled golden set is configured (catches featurizer/embedding mismatches).
_SMOKE_TITLES = (
    "华为 Mate 60 Pro 5G手机 黑色",
    "Turtle Check Men Navy Blue Shirt",
    "Nike Women Red Running Shoes 运动鞋",
    "",
)


class TagScorer(Protocol):
    """A model that turns products into model tags (streams.model.BundleModel)."""

    version: str

    def score(self, products: Sequence[Any]) -> list[list[Tag]]: ...


@dataclass(frozen=True, slots=True)
class LabelledProduct:
    """A product of the labelled golden set and its true tags."""

    product: ProductChange
    tags: frozenset[str]


@dataclass(frozen=True, slots=True)
class ActiveFigures:
    """The active model's tags on the labelled golden set (and the tags it can emit), scored where that model is
    loaded: a validation process compares a candidate with them and never re-reads the active model's bundle."""

    version: str
    tags: tuple[frozenset[str], ...]  # one per golden product, in the golden set's order
    vocab: frozenset[str]

    @classmethod
    def of(cls, active: TagScorer, golden_set: Sequence[LabelledProduct]) -> ActiveFigures:
        """Score the golden set's products with `active`."""
        rows = active.score([lp.product for lp in golden_set])
        decoder = getattr(active, "decoder", None)
        vocab = frozenset(x.tag for x in decoder.labels.labels) if decoder is not None else frozenset()
        return cls(active.version, tuple(frozenset(t.tag for t in row) for row in rows), vocab)


@dataclass(frozen=True, slots=True)
class QualityReport:
    """Micro-F1 of the candidate (and the active model) on the labelled golden set."""

    products: int
    candidate_f1: float
    active_f1: float | None
    active_version: str | None


@dataclass(frozen=True)
class ValidationPolicy:
    """What a candidate must pass (a worker builds it from its settings with `from_settings`)."""

    verify_key: Ed25519PublicKey | None = None
    limits: BundleLimits = DEFAULT_LIMITS
    canary_atol: float = 1e-4
    latency_budget_ms: Mapping[int, float] = field(default_factory=lambda: {1: 50.0, 64: 250.0})
    latency_runs: int = 10
    golden_set: Sequence[LabelledProduct] = ()
    max_quality_drop: float = 0.02
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    timeout_s: float | None = 600.0  # longest a validation in its child process may take (None: no limit)
    roots: tuple[Path, ...] = ()  # directories a bundle must be inside (symbolic links followed); () = anywhere

    @classmethod
    def from_settings(cls, settings: Any) -> ValidationPolicy:
        """The policy of a `streams.settings.WorkerSettings` (reads the golden set file once)."""
        key = settings.model_verify_key
        return cls(
            verify_key=parse_verify_key(key.get_secret_value()) if key is not None else None,
            canary_atol=settings.model_canary_atol,
            latency_budget_ms={1: settings.model_latency_budget_1_ms, 64: settings.model_latency_budget_64_ms},
            latency_runs=settings.model_latency_runs,
            golden_set=load_golden_set(settings.model_golden_set) if settings.model_golden_set else (),
            max_quality_drop=settings.model_max_quality_drop,
            intra_op_threads=settings.ort_intra_op_threads,
            inter_op_threads=settings.ort_inter_op_threads,
            timeout_s=settings.model_validation_timeout_s,
            roots=tuple(settings.model_roots),
        )


@dataclass
class ValidatedBundle:
    """A candidate that passed every stage: its bundle, a loaded scorer and the figures measured."""

    bundle: ModelBundle
    scorer: OnnxScorer
    canary_max_diff: float
    latency: dict[int, LatencyStats]
    quality: QualityReport | None = None

    @property
    def model_version(self) -> str:
        """The candidate's model version."""
        return self.bundle.model_version


@dataclass(frozen=True)
class ValidationReport:
    """The picklable outcome of validation in a child process: identity and figures, or the reasons of a refusal."""

    reasons: tuple[str, ...] = ()
    model_version: str | None = None
    sha256: str | None = None
    canary_max_diff: float = 0.0
    latency: dict[int, LatencyStats] = field(default_factory=dict)
    quality: QualityReport | None = None


def parse_verify_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes, PEM text, or the path of a file holding either."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        return load_verify_key(text.encode())
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return load_verify_key(raw)
    path = Path(text)
    if path.is_file():
        data = path.read_bytes().strip()
        if not data.startswith(b"-----BEGIN"):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"model verify key file {path}: neither PEM nor base64") from None
        return load_verify_key(data)
    raise ConfigError("model verify key: expected base64 of 32 raw Ed25519 bytes, PEM, or a key file path")


def load_golden_set(path: str | Path) -> list[LabelledProduct]:
    """Read a labelled golden set: catalog JSONL (`training.catalog.CatalogProduct` form), one product per line.

    True tags are `gold_tags` when a line has it, else the tags training derives: the category path's tags, the
    attribute tags and `tags`.
    """
    from training.labels import attribute_tag, category_tags  # numpy only; no TensorFlow

    p = Path(path)
    out: list[LabelledProduct] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"golden set {p}: cannot be read ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            pid, title = str(obj["product_id"]), str(obj["title"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"golden set {p}:{n}: not a catalog product ({exc})") from None
        if "gold_tags" in obj:
            gold = set(obj["gold_tags"])
        else:
            attrs = obj.get("attributes") or {}
            gold = {*category_tags(obj.get("category_path") or []), *(obj.get("tags") or [])}
            gold |= {attribute_tag(k, v) for k, v in attrs.items() if v}
        price = obj.get("price")
        product = ProductChange(
            "upsert",
            pid,
            0,
            0,
            title=title,
            description=obj.get("description"),
            brand=obj.get("brand"),
            price=float(price) if isinstance(price, int | float) else None,
            currency=obj.get("currency"),
        )
        out.append(LabelledProduct(product, frozenset(gold)))
    if not out:
        raise ConfigError(f"golden set {p}: no products")
    return out


def micro_f1(predicted: Sequence[set[str]], gold: Sequence[frozenset[str] | set[str]], vocab: set[str]) -> float:
    """Micro-F1 over (product, tag) pairs, both sides restricted to `vocab` (1.0 when both are empty)."""
    tp = fp = fn = 0
    for pred, true in zip(predicted, gold, strict=True):
        p, t = pred & vocab, set(true) & vocab
        tp += len(p & t)
        fp += len(p - t)
        fn += len(t - p)
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def _verify_request_signature(bundle: ModelBundle, signature: str, key: Ed25519PublicKey) -> list[str]:
    manifest_bytes = (bundle.path / MANIFEST_FILE).read_bytes()
    if hashlib.sha256(manifest_bytes).hexdigest() != bundle.sha256:
        return ["manifest.json: changed while it was being validated"]
    try:
        key.verify(base64.b64decode("".join(signature.split()), validate=True), manifest_bytes)
    except (binascii.Error, ValueError):
        return ["request signature: not base64"]
    except InvalidSignature:
        return ["request signature: does not verify with the configured key"]
    return []


def _tags_of(bundle: ModelBundle, scorer: OnnxScorer, products: Sequence[Any]) -> list[set[str]]:
    decoder = TagDecoder.from_bundle(bundle)
    rows = decoder.decode(scorer.predict(bundle.featurizer.transform(products)))
    return [{t.tag for t in row} for row in rows]


def _same_features(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two feature rows (ids, weights) hold the same features with close weights, in any order; in rows cut
    to L features, one that only one row kept must weigh what the cut weighs (within 1e-4): a near-tie at the top-L
    cut that another numpy build may break the other way."""
    (ids_a, w_a), (ids_b, w_b) = a, b
    kept_a, kept_b = ids_a != 0, ids_b != 0
    map_a = dict(zip(ids_a[kept_a].tolist(), w_a[kept_a].tolist(), strict=True))
    map_b = dict(zip(ids_b[kept_b].tolist(), w_b[kept_b].tolist(), strict=True))
    if len(map_a) != len(map_b):
        return False
    if any(not np.isclose(w, map_b[i], rtol=1e-5, atol=1e-6) for i, w in map_a.items() if i in map_b):
        return False
    if map_a.keys() == map_b.keys():
        return True
    if not (kept_a.all() and kept_b.all()):
        return False  # a row with room for every feature it has was not cut: a feature of one only is another feature
    for only, weights in ((map_a.keys() - map_b.keys(), map_a), (map_b.keys() - map_a.keys(), map_b)):
        cut = min(weights.values())
        if any(not np.isclose(weights[i], cut, rtol=1e-4, atol=0) for i in only):
            return False
    return True


def check_golden_features(bundle: ModelBundle, featurizer: Featurizer) -> None:
    """ModelRejectedError unless `featurizer` turns the golden rows' products (`GoldenSet.inputs`) into the features
    the rows hold: the same features and weights, in any order, and numeric features (float32 rounding aside; a tie
    at the top-L cut may keep either feature). Bundles written without the products are not checked."""
    golden = bundle.golden
    if golden.inputs is None:
        return
    try:
        got = featurizer.transform(golden.inputs)
    except (FeaturizerError, ValueError, TypeError) as exc:
        raise ModelRejectedError([f"featurizer: cannot featurize the golden products ({exc})"]) from None
    differ = ~(
        (got.ids == golden.ids).all(axis=1)
        & np.isclose(got.weights, golden.weights, rtol=1e-5, atol=1e-6).all(axis=1)
        & np.isclose(got.numeric, golden.numeric, rtol=1e-5, atol=1e-6).all(axis=1)
    )
    for row in np.flatnonzero(differ):  # rows that differ: the same features in another order, or a tie at the cut
        if np.isclose(got.numeric[row], golden.numeric[row], rtol=1e-5, atol=1e-6).all() and _same_features(
            (got.ids[row], got.weights[row]), (golden.ids[row], golden.weights[row])
        ):
            differ[row] = False
    if differ.any():
        raise ModelRejectedError(
            [
                f"featurizer: does not reproduce the features of {int(differ.sum())} of {len(differ)} golden rows "
                f"(first: row {int(np.flatnonzero(differ)[0])}): featurizer.json or its assets are not the ones the "
                "model was trained with"
            ]
        )


def check_place(path: str | Path, roots: Sequence[Path]) -> None:
    """Raise ModelRejectedError unless the directory `path` names, its symbolic links followed, is inside one of
    `roots` (their links followed too); nothing to check without roots."""
    if not roots:
        return
    try:
        where = Path(path).resolve()
        inside = any(where.is_relative_to(root.resolve()) for root in roots)
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a symbolic link loop
        raise ModelRejectedError([f"place: {str(path)!r} names no directory ({exc})"]) from None
    if not inside:
        shown = ", ".join(str(root) for root in roots)
        raise ModelRejectedError([f"place: {where} is outside TAGSTREAM_MODEL_ROOTS ({shown})"])


def validate_bundle(
    path: str | Path,
    *,
    expected_sha256: str | None = None,
    expected_version: str | None = None,
    signature: str | None = None,
    policy: ValidationPolicy | None = None,
    active: TagScorer | ActiveFigures | None = None,
) -> ValidatedBundle:
    """Run every stage on the bundle at `path`; return it with a loaded scorer or raise ModelRejectedError. The
    quality stage compares the candidate with `active` (the model it would replace, or its `ActiveFigures`)."""
    policy = policy or ValidationPolicy()
    check_place(path, policy.roots)
    # 1. integrity
    bundle = load_bundle(path, verify_key=policy.verify_key, expected_sha256=expected_sha256, limits=policy.limits)
    reasons: list[str] = []
    if expected_version is not None and bundle.model_version != expected_version:
        reasons.append(f"model_version: the request names {expected_version!r}, the manifest {bundle.model_version!r}")
    if signature and policy.verify_key is not None:
        reasons += _verify_request_signature(bundle, signature, policy.verify_key)
    if reasons:
        raise ModelRejectedError(reasons)

    # 2. session
    try:
        featurizer = bundle.featurizer
    except Exception as exc:  # FeaturizerError, OSError, ValueError from a bad spec or asset
        raise ModelRejectedError([f"featurizer: cannot be loaded ({exc})"]) from None
    if (featurizer.max_features, featurizer.n_numeric) != (bundle.L, bundle.K):
        raise ModelRejectedError(
            [f"featurizer: L={featurizer.max_features} K={featurizer.n_numeric}, bundle L={bundle.L} K={bundle.K}"]
        )
    scorer = OnnxScorer(intra_op_num_threads=policy.intra_op_threads, inter_op_num_threads=policy.inter_op_threads)
    try:
        scorer.load(bundle)
    except ModelLoadError as exc:
        raise ModelRejectedError([f"session: {exc}"]) from None

    # 3. canary: the featurizer against the golden rows, the golden rows, then products through the whole path
    check_golden_features(bundle, featurizer)
    canary = scorer.check_golden(bundle, atol=policy.canary_atol)
    products = [lp.product for lp in policy.golden_set] or [
        ProductChange("upsert", f"smoke-{i}", 0, 0, title=t, brand="brand", price=9.9)
        for i, t in enumerate(_SMOKE_TITLES)
    ]
    try:
        candidate_tags = _tags_of(bundle, scorer, products)
    except (ScoringError, BundleError, ValueError, IndexError) as exc:
        raise ModelRejectedError([f"canary: scoring featurized products failed ({exc})"]) from None

    # 4. latency
    latency = scorer.measure_latency(tuple(policy.latency_budget_ms), runs=policy.latency_runs)
    for size, budget in sorted(policy.latency_budget_ms.items()):
        got = latency[size].p50_ms
        if not got <= budget:
            reasons.append(f"latency: batch {size} median {got:.2f} ms exceeds the budget of {budget:g} ms")

    # 5. quality
    quality = None
    if policy.golden_set:
        gold = [lp.tags for lp in policy.golden_set]
        figures = active
        if figures is not None and not isinstance(figures, ActiveFigures):
            figures = ActiveFigures.of(figures, policy.golden_set)
        vocab = set(bundle.labels.by_tag) | (figures.vocab if figures is not None else set())
        cand_f1 = micro_f1(candidate_tags, gold, vocab)
        act_f1 = micro_f1([set(t) for t in figures.tags], gold, vocab) if figures is not None else None
        quality = QualityReport(len(products), cand_f1, act_f1, figures.version if figures is not None else None)
        if act_f1 is not None and act_f1 - cand_f1 > policy.max_quality_drop + 1e-12:
            reasons.append(
                f"quality: micro-F1 {cand_f1:.4f} vs the active model's {act_f1:.4f} on {len(products)} golden "
                f"products: a drop of {act_f1 - cand_f1:.4f} > {policy.max_quality_drop:g}"
            )
        if math.isnan(cand_f1):
            reasons.append("quality: micro-F1 is NaN")
    if reasons:
        raise ModelRejectedError(reasons)
    return ValidatedBundle(bundle, scorer, canary, latency, quality)


# --------------------------------------------------------------------------------------------------- isolated


def child_init(parent_pid: int, niceness: int = 10) -> None:
    """Initializer of the validation process: a lower CPU priority, so that on a busy machine the worker's own
    threads win the cores and validation takes the slack; and it ends itself once the worker `parent_pid` is gone (a
    SIGKILLed worker runs no exit handler to stop it)."""
    background_child(parent_pid, niceness)


def warm_up() -> bool:
    """Run in a fresh child process to import this module (and ONNX, ONNX Runtime) before the first request."""
    return True


def _child_validate(
    path: str,
    expected_sha256: str | None,
    expected_version: str | None,
    signature: str | None,
    policy: ValidationPolicy,
    verify_key_raw: bytes | None,
    active: ActiveFigures | None,
) -> ValidationReport:
    """Runs in the child process: every stage, the quality stage against the active model's figures."""
    if verify_key_raw is not None:
        policy = replace(policy, verify_key=load_verify_key(verify_key_raw))
    try:
        v = validate_bundle(
            path,
            expected_sha256=expected_sha256,
            expected_version=expected_version,
            signature=signature,
            policy=policy,
            active=active,
        )
    except ModelRejectedError as exc:
        return ValidationReport(reasons=tuple(exc.reasons))
    except Exception as exc:  # never let an unexpected error cross the process boundary as a crash
        return ValidationReport(reasons=(f"validation failed: {type(exc).__name__}: {exc}",))
    return ValidationReport(
        model_version=v.model_version,
        sha256=v.bundle.sha256,
        canary_max_diff=v.canary_max_diff,
        latency=v.latency,
        quality=v.quality,
    )


def validate_isolated(
    executor: Executor,
    path: str | Path,
    *,
    expected_sha256: str | None = None,
    expected_version: str | None = None,
    signature: str | None = None,
    policy: ValidationPolicy | None = None,
    active: ActiveFigures | None = None,
) -> ValidationReport:
    """`validate_bundle` in `executor` (a spawn ProcessPoolExecutor); blocks until the child answers, at most
    `policy.timeout_s`: then ValidationTimeoutError (the child is still busy: its owner must end it). `active`: the
    figures of the model the candidate would replace, for the quality stage."""
    policy = policy or ValidationPolicy()
    raw = (
        policy.verify_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if policy.verify_key is not None
        else None
    )
    future = executor.submit(
        _child_validate,
        str(path),
        expected_sha256,
        expected_version,
        signature,
        replace(policy, verify_key=None),
        raw,
        active,
    )
    try:
        return future.result(timeout=policy.timeout_s)
    except FutureTimeoutError:
        future.cancel()
        raise ValidationTimeoutError(
            [
                f"validation did not finish within {policy.timeout_s:g} s (TAGSTREAM_MODEL_VALIDATION_TIMEOUT_S): a "
                "bundle on an unresponsive file system, or a machine too busy?"
            ]
        ) from None


def _reread(path: Path, name: str, expected: str | None, limit: int) -> bytes:
    """A validated file again: a regular file of at most `limit` bytes (never blocking on a FIFO or device put in its
    place) with the sha256 `expected`."""
    try:
        data = read_regular_file(path / name, limit)
    except ModelRejectedError as exc:
        raise ModelRejectedError([f"{name}: unreadable after validation ({'; '.join(exc.reasons)})"]) from None
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise ModelRejectedError([f"{name}: changed after validation"])
    return data


def _featurizer_of(spec: Any, data: Mapping[str, bytes]) -> Featurizer:
    """The featurizer of a spec and its asset files' bytes (already checked: nothing is read again)."""
    assets = featurizer_assets(spec) if isinstance(spec, dict) else None
    if assets is None or "idf" not in assets:
        raise FeaturizerError("featurizer.json names no 'idf' asset")
    arrays = {}
    for role in ("idf", "known"):  # what `Featurizer.load` reads
        if role not in assets:
            continue
        if assets[role] not in data:
            raise FeaturizerError(f"asset {role!r} {assets[role]!r} is not a file of the bundle")
        try:
            arrays[role] = np.load(io.BytesIO(data[assets[role]]), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FeaturizerError(f"cannot read {assets[role]}: {exc}") from None
    return Featurizer.from_spec(spec, arrays["idf"], arrays.get("known"))


def open_validated(
    path: str | Path, report: ValidationReport, policy: ValidationPolicy | None = None
) -> ValidatedBundle:
    """Re-open a bundle a child process validated (`report`): the same bytes, checked by sha256, a session, and the
    canary once more. Raises ModelRejectedError when anything changed since, or is no regular file now. Every file is
    read once, checked, and used from those bytes (the featurizer too)."""
    policy = policy or ValidationPolicy()
    if report.reasons or report.sha256 is None:
        raise ModelRejectedError(list(report.reasons) or ["not validated"])
    check_place(path, policy.roots)  # again: a link in its path may have moved since the child's check
    root = Path(path)
    limit = policy.limits.max_file_bytes
    manifest_bytes = _reread(root, MANIFEST_FILE, report.sha256, limit)
    manifest = json.loads(manifest_bytes)
    files: dict[str, str] = manifest["files"]
    # every file but model.onnx, which the session reads and checks itself (`OnnxScorer.load_file`)
    data = {
        name: _reread(root, name, files.get(name), limit) for name in sorted({*files, *REQUIRED_FILES} - {MODEL_FILE})
    }
    onnx_sha256 = files.get(MODEL_FILE)
    if not isinstance(onnx_sha256, str):
        raise ModelRejectedError([f"{MODEL_FILE}: changed after validation"])
    thresholds = json.loads(data["thresholds.json"])
    with np.load(io.BytesIO(data["golden.npz"]), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in ("ids", "weights", "numeric", "scores")}
    for a in arrays.values():
        a.setflags(write=False)
    bundle = ModelBundle(
        path=root,
        manifest=manifest,
        labels=LabelMap.from_json(json.loads(data["labels.json"])),
        thresholds=Thresholds(default=float(thresholds["default"]), per_tag=dict(thresholds.get("per_tag") or {})),
        sha256=report.sha256,
        model_version=str(manifest["model_version"]),
        featurizer_spec=json.loads(data["featurizer.json"]),
        golden=GoldenSet(**arrays),
        metrics=json.loads(data["metrics.json"]),
        onnx_bytes=b"",  # the session reads the file itself, checked against `onnx_sha256` (ModelBundle docs)
        signed=policy.verify_key is not None,
    )
    if bundle.model_version != report.model_version:
        raise ModelRejectedError(["manifest.json: changed after validation"])
    try:  # built now, not on the first batch, from the bytes just checked
        bundle.use_featurizer(_featurizer_of(bundle.featurizer_spec, data))
    except Exception as exc:
        raise ModelRejectedError([f"featurizer: cannot be loaded ({exc})"]) from None
    scorer = OnnxScorer(intra_op_num_threads=policy.intra_op_threads, inter_op_num_threads=policy.inter_op_threads)
    try:
        scorer.load_file(bundle, onnx_sha256)  # no second copy of the model's bytes beside the session being built
    except ModelLoadError as exc:  # includes "model.onnx changed while its session was created"
        raise ModelRejectedError([f"session: {exc}"]) from None
    canary = scorer.check_golden(bundle, atol=policy.canary_atol)
    return ValidatedBundle(bundle, scorer, canary, report.latency, report.quality)
