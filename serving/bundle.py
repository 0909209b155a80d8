"""Model bundles (SPEC §2, bundle format v1): write one atomically and immutably, load one only after validating it.

A bundle is a directory named by its model version inside a registry directory. `write_bundle` is what training
calls; `load_bundle` is what every worker calls before it lets a model near a session: it checks the manifest, the
sha256 of every file, the optional Ed25519 signature, the ONNX graph (checker, no external data, opset and operator
domains, sizes, input/output names, dtypes and shapes against the featurizer's L/K and the label map's T), the label
map, the thresholds, the featurizer's asset files (each listed in the manifest) and the golden rows, and raises
`ModelRejectedError` with the reasons it found (the first `MAX_REASONS` of them and a count of the others).

No TensorFlow here: only onnx, numpy and cryptography.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tagstream.errors import BundleError, ModelRejectedError

if TYPE_CHECKING:  # the featurizer is another module's; imported lazily by ModelBundle.featurizer
    from serving.featurizer import Featurizer

__all__ = [
    "MAX_REASONS",
    "MAX_REASON_CHARS",
    "BundleLimits",
    "GoldenSet",
    "Label",
    "LabelGroup",
    "LabelMap",
    "ModelBundle",
    "Thresholds",
    "capped",
    "featurizer_assets",
    "golden_inputs",
    "list_versions",
    "load_bundle",
    "load_signing_key",
    "load_verify_key",
    "read_manifest_bytes",
    "read_regular_file",
    "write_bundle",
]

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
REQUIRED_FILES = ("model.onnx", "labels.json", "thresholds.json", "featurizer.json", "metrics.json", "golden.npz")
MANIFEST_FIELDS = (
    "format_version",
    "model_name",
    "model_version",
    "created_at",
    "featurizer_version",
    "onnx_opset",
    "training_data_sha256",
    "inputs",
    "output",
    "files",
)
# Manifest fields write_bundle computes itself; `meta` may not set them.
_COMPUTED_FIELDS = frozenset(MANIFEST_FIELDS) - {"model_name", "featurizer_version", "training_data_sha256"}
INPUT_NAMES = ("ids", "weights", "numeric")
OUTPUT_NAME = "scores"
BATCH_DIM = "N"
# The token axis of `ids`/`weights` may be dynamic under this name: the scorer then cuts off the padding columns
# every row of a batch has (at most L columns are ever passed).
TOKEN_DIM = "L"
VERSION_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{8})$")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# A refusal keeps its first MAX_REASONS reasons, each cut at MAX_REASON_CHARS, and counts the others (`capped`): a
# bundle with 50,000 broken labels gave a 2.9 MB model-rejected answer, over Kafka's message limit.
MAX_REASONS = 20
MAX_REASON_CHARS = 500
_MORE_REASONS_RE = re.compile(r"… and (\d+) more reasons?")
# The featurizer's asset files when featurizer.json names none (what `serving.featurizer.Featurizer.load` reads).
_DEFAULT_ASSETS = {"idf": "idf.npy"}
# Operators whose constant shape-like argument decides how much memory they allocate.
_SHAPE_ARG_OPS = {"ConstantOfShape": 0, "Expand": 1, "Tile": 1, "Reshape": 1}


# --------------------------------------------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class BundleLimits:
    """What load_bundle accepts; anything larger or outside is refused with a reason."""

    max_onnx_bytes: int = 256 * 2**20  # size of model.onnx
    max_file_bytes: int = 64 * 2**20  # size of every other file (and unpacked golden.npz)
    min_opset: int = 13  # default-domain opset range
    max_opset: int = 21
    max_dim: int = 2**24  # any declared dimension or constant shape value
    max_labels: int = 100_000
    max_golden_rows: int = 4096
    allowed_domains: frozenset[str] = frozenset({"", "ai.onnx", "ai.onnx.ml"})


DEFAULT_LIMITS = BundleLimits()


@dataclass(frozen=True, slots=True)
class LabelGroup:
    """A group of labels: `exclusive` (one per product, softmax) or `multi` (independent sigmoids)."""

    name: str
    kind: Literal["exclusive", "multi"]
    parent_group: str | None = None


@dataclass(frozen=True, slots=True)
class Label:
    """One column of the scores matrix."""

    index: int
    tag: str
    group: str
    value: str
    parent: str | None = None


@dataclass(frozen=True)
class LabelMap:
    """The parsed `labels.json`: groups and labels, labels ordered by index (= score column)."""

    groups: tuple[LabelGroup, ...]
    labels: tuple[Label, ...]

    @property
    def T(self) -> int:
        """Number of labels (score columns)."""
        return len(self.labels)

    @cached_property
    def by_tag(self) -> dict[str, Label]:
        """Label by tag name."""
        return {lab.tag: lab for lab in self.labels}

    @cached_property
    def group_by_name(self) -> dict[str, LabelGroup]:
        """Group by name."""
        return {g.name: g for g in self.groups}

    @classmethod
    def from_json(cls, obj: Any) -> LabelMap:
        """Parse and check a `labels.json` object; raises ModelRejectedError with every problem found."""
        reasons: list[str] = []
        parsed = _parse_labels(obj, reasons, DEFAULT_LIMITS)
        if parsed is None or reasons:
            raise ModelRejectedError(capped(reasons) or ["labels.json: invalid"])
        return parsed

    def to_json(self) -> dict[str, Any]:
        """The `labels.json` object."""
        return {
            "format_version": FORMAT_VERSION,
            "groups": [{"name": g.name, "kind": g.kind, "parent_group": g.parent_group} for g in self.groups],
            "labels": [
                {"index": x.index, "tag": x.tag, "group": x.group, "value": x.value, "parent": x.parent}
                for x in self.labels
            ],
        }


@dataclass(frozen=True)
class Thresholds:
    """The parsed `thresholds.json`: a tag is a candidate when its score >= its threshold."""

    default: float = 0.5
    per_tag: Mapping[str, float] = field(default_factory=dict)

    def for_tag(self, tag: str) -> float:
        """The threshold of `tag` (its own, else the default)."""
        return self.per_tag.get(tag, self.default)

    def to_json(self) -> dict[str, Any]:
        """The `thresholds.json` object."""
        return {"format_version": FORMAT_VERSION, "default": self.default, "per_tag": dict(self.per_tag)}


@dataclass(frozen=True)
class GoldenSet:
    """The golden rows of a bundle (read-only arrays): inputs and the scores training produced for them."""

    ids: np.ndarray  # int64 [G, L]
    weights: np.ndarray  # float32 [G, L]
    numeric: np.ndarray  # float32 [G, K]
    scores: np.ndarray  # float32 [G, T]
    # the products the rows were featurized from (GOLDEN_INPUT_FIELDS), when the bundle has them (`inputs`)
    inputs: tuple[Mapping[str, Any], ...] | None = None


# What the featurizer reads of a product: a golden row's `inputs` entry keeps these (absent ones left out).
GOLDEN_INPUT_FIELDS = ("title", "description", "brand", "category_hints", "price")


def golden_inputs(products: Sequence[Any], description_chars: int | None = None) -> list[dict[str, Any]]:
    """The featurizer's fields of these products (objects or mappings), for a bundle's golden `inputs`; a
    description cut to `description_chars`, all the featurizer reads of it (`2 × max_description_chars`)."""
    out = []
    for p in products:
        get = p.get if isinstance(p, Mapping) else (lambda name, p=p: getattr(p, name, None))
        row = {}
        for name in GOLDEN_INPUT_FIELDS:
            value = get(name)
            if value is not None and value != "" and value != ():
                row[name] = list(value) if name == "category_hints" else value
        if description_chars is not None and isinstance(row.get("description"), str):
            row["description"] = row["description"][:description_chars]
        out.append(row)
    return out


@dataclass(frozen=True)
class ModelBundle:
    """A validated bundle. `onnx_bytes` are the exact bytes whose sha256 was checked (sessions use them); empty in a
    bundle re-opened by `serving.validate.open_validated`, whose session read `model.onnx` itself and checked its
    sha256 before and after (`OnnxScorer.load_file`)."""

    path: Path
    manifest: Mapping[str, Any]
    labels: LabelMap
    thresholds: Thresholds
    sha256: str  # of the manifest.json bytes: the bundle's identity
    model_version: str
    featurizer_spec: Mapping[str, Any]
    golden: GoldenSet = field(repr=False)
    metrics: Mapping[str, Any] = field(repr=False)
    onnx_bytes: bytes = field(repr=False)
    signed: bool = False  # True when a signature was verified with a configured key

    @property
    def model_name(self) -> str:
        """The manifest's model name."""
        return str(self.manifest["model_name"])

    @property
    def L(self) -> int:
        """Token slots per row (featurizer `max_features`)."""
        return int(self.golden.ids.shape[1])

    @property
    def K(self) -> int:
        """Numeric features per row."""
        return int(self.golden.numeric.shape[1])

    @property
    def T(self) -> int:
        """Score columns (labels)."""
        return self.labels.T

    @cached_property
    def featurizer(self) -> Featurizer:
        """The bundle's featurizer, loaded on first use with `serving.featurizer.Featurizer.load(path)`, each of its
        files checked against the manifest's sha256 as it is read (FeaturizerError if one changed since), unless
        `use_featurizer` gave it."""
        from serving.featurizer import Featurizer

        return Featurizer.load(self.path, sha256=self.manifest.get("files") or {})

    def use_featurizer(self, featurizer: Featurizer) -> None:
        """Make `featurizer` (built from bytes already checked against the manifest) this bundle's, so its files are
        not read again."""
        self.__dict__["featurizer"] = featurizer  # the cached_property's slot


# --------------------------------------------------------------------------------------------------- keys


def load_signing_key(data: Ed25519PrivateKey | bytes | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, PEM (PKCS#8) bytes, 32 raw bytes, or a file holding either."""
    if isinstance(data, Ed25519PrivateKey):
        return data
    raw = data.read_bytes() if isinstance(data, Path) else data
    try:
        if len(raw) == 32:
            return Ed25519PrivateKey.from_private_bytes(raw)
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"signing key: not an Ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("signing key: not an Ed25519 private key")
    return key


def load_verify_key(data: Ed25519PublicKey | bytes | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM (SubjectPublicKeyInfo) bytes, 32 raw bytes, or a file."""
    if isinstance(data, Ed25519PublicKey):
        return data
    raw = data.read_bytes() if isinstance(data, Path) else data
    try:
        if len(raw) == 32:
            return Ed25519PublicKey.from_public_bytes(raw)
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"verification key: not an Ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("verification key: not an Ed25519 public key")
    return key


# --------------------------------------------------------------------------------------------------- writing


def write_bundle(
    registry_dir: str | Path,
    *,
    onnx_bytes: bytes,
    labels: LabelMap | Mapping[str, Any],
    thresholds: Thresholds | Mapping[str, Any],
    featurizer_files: Mapping[str, bytes] | Callable[[Path], Iterable[str]],
    metrics: Mapping[str, Any],
    golden: GoldenSet | Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    signing_key: Ed25519PrivateKey | bytes | Path | None = None,
    created_at: datetime | None = None,
    validate: bool = True,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> Path:
    """Write a bundle into `registry_dir/<model_version>` atomically and return its path.

    - `featurizer_files`: `{file name: bytes}` (must include `featurizer.json`), or a callable given the bundle
      directory that writes them and returns their names (e.g. `Featurizer.save`).
    - `golden`: arrays `ids`, `weights`, `numeric`, `scores` (cast to int64/float32).
    - `meta`: must hold `model_name` and `training_data_sha256`; `featurizer_version` defaults to featurizer.json's
      `version`; other keys are copied into the manifest (the computed fields cannot be overridden).
    - `signing_key`: Ed25519 private key (object, PEM, or 32 raw bytes); writes `manifest.sig`.

    Files are written into a hidden temp directory of the registry, fsynced, validated with `load_bundle` (unless
    `validate=False`, for tests of broken bundles) and renamed into place, readable by all (directory 0755, files
    0444). An existing version is never overwritten. The writer holds an exclusive `flock` on its temp directory;
    temp directories that nobody holds and that have not changed for `stale_tmp_s` (a writer killed by SIGKILL or
    a power cut) are removed first.
    """
    import fcntl
    import time

    stale_tmp_s = 600.0
    registry = Path(registry_dir)
    registry.mkdir(parents=True, exist_ok=True)
    for old in registry.glob(".tmp-*"):
        try:
            if not old.is_dir() or old.is_symlink() or time.time() - old.stat().st_mtime < stale_tmp_s:
                continue
            fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer holds it: left alone
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)
    missing_meta = [k for k in ("model_name", "training_data_sha256") if k not in meta]
    if missing_meta:
        raise BundleError(f"write_bundle: meta lacks {', '.join(missing_meta)}")
    clashing = sorted(set(meta) & _COMPUTED_FIELDS)
    if clashing:
        raise BundleError(f"write_bundle: meta may not set computed manifest fields {', '.join(clashing)}")
    key = load_signing_key(signing_key) if signing_key is not None else None

    model = onnx.ModelProto()
    try:
        model.ParseFromString(onnx_bytes)
    except Exception as exc:  # protobuf DecodeError
        raise BundleError(f"write_bundle: onnx_bytes do not parse as an ONNX model: {exc}") from None
    onnx_sha = hashlib.sha256(onnx_bytes).hexdigest()
    when = (created_at or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    version = f"{when:%Y%m%dT%H%M%SZ}-{onnx_sha[:8]}"
    final = registry / version
    if final.exists():
        raise BundleError(f"bundle {version} already exists in {registry}; bundles are immutable")

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=registry))
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # until the end: another writer's clean-up never removes it
        _write_file(tmp / MODEL_FILE, onnx_bytes)
        labels_obj = labels.to_json() if isinstance(labels, LabelMap) else dict(labels)
        _write_file(tmp / "labels.json", _json_bytes(labels_obj))
        thresholds_obj = thresholds.to_json() if isinstance(thresholds, Thresholds) else dict(thresholds)
        _write_file(tmp / "thresholds.json", _json_bytes(thresholds_obj))
        if callable(featurizer_files):
            featurizer_files(tmp)
        else:
            for name, data in featurizer_files.items():
                reserved = name in REQUIRED_FILES and name != "featurizer.json"
                if not _is_safe_name(name) or reserved or name.startswith("manifest"):
                    raise BundleError(f"write_bundle: bad featurizer file name {name!r}")
                _write_file(tmp / name, data)
        if not (tmp / "featurizer.json").is_file():
            raise BundleError("write_bundle: the featurizer wrote no featurizer.json")
        _write_file(tmp / "metrics.json", _json_bytes(dict(metrics)))
        _write_file(tmp / "golden.npz", _golden_bytes(golden))

        files: dict[str, str] = {}
        for entry in sorted(tmp.iterdir()):
            if not entry.is_file() or entry.is_symlink():
                raise BundleError(f"write_bundle: unexpected non-file {entry.name!r} in the bundle")
            data = entry.read_bytes()
            _fsync_path(entry)
            files[entry.name] = hashlib.sha256(data).hexdigest()

        try:
            featurizer_spec = json.loads((tmp / "featurizer.json").read_bytes())
        except ValueError as exc:
            raise BundleError(f"write_bundle: featurizer.json is not JSON: {exc}") from None
        if not isinstance(featurizer_spec, dict):
            raise BundleError("write_bundle: featurizer.json is not a JSON object")
        manifest = {
            **{k: v for k, v in meta.items() if k not in MANIFEST_FIELDS},
            "format_version": FORMAT_VERSION,
            "model_name": meta["model_name"],
            "model_version": version,
            "created_at": f"{when:%Y-%m-%dT%H:%M:%SZ}",
            "featurizer_version": meta.get("featurizer_version", featurizer_spec.get("version")),
            "onnx_opset": _default_opset(model),
            "training_data_sha256": meta["training_data_sha256"],
            "inputs": {vi.name: [_dtype_name(vi), _norm_shape(_dims(vi))] for vi in _graph_inputs(model)},
            "output": {
                "name": model.graph.output[0].name if model.graph.output else None,
                "shape": _norm_shape(_dims(model.graph.output[0])) if model.graph.output else None,
            },
            "files": files,
        }
        manifest_bytes = _json_bytes(manifest)
        _write_file(tmp / MANIFEST_FILE, manifest_bytes)
        if key is not None:
            _write_file(tmp / SIGNATURE_FILE, base64.b64encode(key.sign(manifest_bytes)) + b"\n")
        _fsync_path(tmp)

        if validate:
            load_bundle(tmp, verify_key=key.public_key() if key else None, limits=limits)
        for entry in tmp.iterdir():
            entry.chmod(0o444)
        tmp.chmod(0o755)  # mkdtemp made it 0700: a worker or ops account must read the bundle too
        if final.exists():
            raise BundleError(f"bundle {version} already exists in {registry}; bundles are immutable")
        try:
            os.rename(tmp, final)  # fails if `final` appeared meanwhile (a non-empty directory)
        except OSError as exc:
            raise BundleError(f"bundle {version} could not be moved into place: {exc}") from None
        _fsync_path(registry)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def list_versions(registry_dir: str | Path) -> list[str]:
    """Model versions present in a registry, oldest first (temp directories and other names are skipped)."""
    registry = Path(registry_dir)
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _golden_bytes(golden: GoldenSet | Mapping[str, np.ndarray]) -> bytes:
    get = (lambda k: getattr(golden, k)) if isinstance(golden, GoldenSet) else golden.__getitem__
    try:
        arrays = {
            "ids": np.ascontiguousarray(get("ids"), dtype=np.int64),
            "weights": np.ascontiguousarray(get("weights"), dtype=np.float32),
            "numeric": np.ascontiguousarray(get("numeric"), dtype=np.float32),
            "scores": np.ascontiguousarray(get("scores"), dtype=np.float32),
        }
    except KeyError as exc:
        raise BundleError(f"write_bundle: golden lacks array {exc}") from None
    try:
        inputs = get("inputs")
    except (KeyError, AttributeError):
        inputs = None
    if inputs is not None:
        if len(inputs) != len(arrays["ids"]):
            raise BundleError(f"write_bundle: {len(inputs)} golden inputs for {len(arrays['ids'])} golden rows")
        # one UTF-8 JSON array (a numpy string array would be UTF-32, every row padded to the longest)
        text = json.dumps([dict(row) for row in inputs], ensure_ascii=False).encode()
        arrays["inputs"] = np.frombuffer(text, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _is_safe_name(name: str) -> bool:
    return bool(_SAFE_NAME_RE.match(name)) and name not in (".", "..")


# --------------------------------------------------------------------------------------------------- loading


def capped(reasons: Sequence[str], limit: int = MAX_REASONS, chars: int = MAX_REASON_CHARS) -> list[str]:
    """The first `limit` reasons, each cut at `chars` characters, and one more counting the others: what a refusal
    carries into an error line, a model-rejected answer or a worker's status. Capping a capped list again keeps its
    count of the others."""
    kept = list(reasons)
    more = 0
    counted = _MORE_REASONS_RE.fullmatch(kept[-1]) if kept else None
    if counted:
        more, kept = int(counted.group(1)), kept[:-1]
    more += max(0, len(kept) - limit)
    out = [r if len(r) <= chars else f"{r[: chars - 1]}…" for r in kept[:limit]]
    if more:
        out.append(f"… and {more} more reason{'s' if more != 1 else ''}")
    return out


def load_bundle(
    path: str | Path,
    *,
    verify_key: Ed25519PublicKey | bytes | Path | None = None,
    expected_sha256: str | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> ModelBundle:
    """Validate the bundle at `path` and return it; raise ModelRejectedError with its reasons otherwise (`capped`).

    With `verify_key`, an unsigned or wrongly signed bundle is refused (without one, `manifest.sig` is not
    looked at). With `expected_sha256` (from a model-update request), the manifest bytes must hash to it.
    """
    root = Path(path)
    reasons: list[str] = []
    key = load_verify_key(verify_key) if verify_key is not None else None
    manifest_bytes = read_manifest_bytes(root, limits)
    bundle_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if expected_sha256 is not None and expected_sha256.lower() != bundle_sha:
        reasons.append(f"manifest.json: sha256 {bundle_sha} differs from the expected {expected_sha256}")
    signed = _check_signature(root, manifest_bytes, key, reasons)
    manifest = _parse_json(manifest_bytes, MANIFEST_FILE, reasons)
    if not isinstance(manifest, dict):
        if manifest is not None:
            reasons.append("manifest.json: not a JSON object")
        raise ModelRejectedError(capped(reasons))
    for name in MANIFEST_FIELDS:
        if name not in manifest:
            reasons.append(f"manifest.json: missing field {name!r}")
    if "format_version" in manifest and manifest["format_version"] != FORMAT_VERSION:
        reasons.append(f"manifest.json: format_version {manifest['format_version']!r} is not {FORMAT_VERSION}")

    contents = _check_files(root, manifest["files"], limits, reasons) if "files" in manifest else {}

    labels_obj = _parse_json(contents.get("labels.json"), "labels.json", reasons)
    labels = _parse_labels(labels_obj, reasons, limits) if labels_obj is not None else None
    thresholds_obj = _parse_json(contents.get("thresholds.json"), "thresholds.json", reasons)
    thresholds = _parse_thresholds(thresholds_obj, labels, reasons) if thresholds_obj is not None else None
    featurizer_spec = _parse_json(contents.get("featurizer.json"), "featurizer.json", reasons)
    dims = _featurizer_dims(featurizer_spec, manifest, reasons) if featurizer_spec is not None else None
    if isinstance(featurizer_spec, dict):
        _check_featurizer_assets(featurizer_spec, manifest.get("files"), reasons)
    L, K = dims if dims else (None, None)
    T = labels.T if labels else None
    metrics = _parse_json(contents.get("metrics.json"), "metrics.json", reasons)
    if metrics is not None and not isinstance(metrics, dict):
        reasons.append("metrics.json: not a JSON object")
    golden = _check_golden(contents.get("golden.npz"), L, K, T, limits, reasons)

    onnx_bytes = contents.get(MODEL_FILE)
    if onnx_bytes is not None:
        _check_onnx(onnx_bytes, manifest, L, K, T, limits, reasons)

    if reasons:
        raise ModelRejectedError(capped(reasons))
    assert labels and thresholds and golden and onnx_bytes is not None and isinstance(featurizer_spec, dict)
    return ModelBundle(
        path=root,
        manifest=manifest,
        labels=labels,
        thresholds=thresholds,
        sha256=bundle_sha,
        model_version=str(manifest["model_version"]),
        featurizer_spec=featurizer_spec,
        golden=golden,
        metrics=metrics if isinstance(metrics, dict) else {},
        onnx_bytes=onnx_bytes,
        signed=signed,
    )


def read_manifest_bytes(path: str | Path, limits: BundleLimits = DEFAULT_LIMITS) -> bytes:
    """The manifest bytes of the bundle directory `path`: `load_bundle`'s first check, cheap enough for a command to
    run on a path before it starts anything slow. ModelRejectedError naming the directory otherwise, and for a
    registry (a directory of bundles) a bundle in it to pass instead."""
    root = Path(path)
    if not root.is_dir():
        raise ModelRejectedError(
            [f"{root}: not a bundle directory ({'not a directory' if root.exists() else 'no such directory'})"]
        )
    reasons: list[str] = []
    data = _read_limited(root / MANIFEST_FILE, limits.max_file_bytes, reasons)
    if data is not None:
        return data
    if not os.path.lexists(root / MANIFEST_FILE):
        versions = list_versions(root)
        hint = f"; pass a bundle directory such as {root / versions[-1]}" if versions else ""
        raise ModelRejectedError([f"{root}: not a model bundle ({MANIFEST_FILE} missing){hint}"])
    raise ModelRejectedError([f"{root}: {reason}" for reason in reasons])


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path` of at most `limit` bytes, read without blocking on a FIFO or device
    (`_read_limited`); ModelRejectedError naming the file otherwise."""
    reasons: list[str] = []
    data = _read_limited(path, limit, reasons)
    if data is None:
        raise ModelRejectedError(reasons)
    return data


def _read_limited(path: Path, limit: int, reasons: list[str]) -> bytes | None:
    """Read a regular file of at most `limit` bytes (size and kind checked on the open descriptor; opened
    non-blocking, so a FIFO or device in a bundle is refused instead of blocking the reader for good)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        reasons.append(f"{path.name}: missing")
        return None
    except OSError as exc:
        reasons.append(f"{path.name}: cannot be opened ({exc.strerror or exc})")
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            reasons.append(f"{path.name}: not a regular file")
            return None
        if st.st_size > limit:
            reasons.append(f"{path.name}: {st.st_size} bytes exceeds the limit of {limit}")
            return None
        data = fh.read(limit + 1)
    if len(data) > limit:
        reasons.append(f"{path.name}: exceeds the limit of {limit} bytes")
        return None
    return data


def _parse_json(data: bytes | None, name: str, reasons: list[str]) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python goes
        reasons.append(f"{name}: not UTF-8 JSON ({type(exc).__name__}: {exc})")
        return None


def _check_signature(root: Path, manifest_bytes: bytes, key: Ed25519PublicKey | None, reasons: list[str]) -> bool:
    if key is None:
        return False
    sig_path = root / SIGNATURE_FILE
    if not sig_path.exists():
        reasons.append("manifest.sig: bundle is unsigned but a verification key is configured")
        return False
    sig_text = _read_limited(sig_path, 4096, reasons)
    if sig_text is None:
        return False
    try:
        signature = base64.b64decode(b"".join(sig_text.split()), validate=True)
        key.verify(signature, manifest_bytes)
    except (binascii.Error, ValueError):
        reasons.append("manifest.sig: not base64")
        return False
    except InvalidSignature:
        reasons.append("manifest.sig: signature does not verify with the configured key")
        return False
    return True


def _check_files(root: Path, files: Any, limits: BundleLimits, reasons: list[str]) -> dict[str, bytes]:
    """Check that the manifest lists exactly the bundle's regular files with right sha256; return their bytes."""
    contents: dict[str, bytes] = {}
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        reasons.append("manifest.json: 'files' is not an object of file name to sha256")
        return contents
    present = {}
    for entry in root.iterdir():
        if entry.name in (MANIFEST_FILE, SIGNATURE_FILE):
            continue
        if entry.is_symlink() or not entry.is_file():
            reasons.append(f"{entry.name}: not a regular file (bundles hold regular files only)")
            continue
        present[entry.name] = entry
    for name in sorted(set(present) - set(files)):
        reasons.append(f"{name}: present but not listed in the manifest")
    for name in REQUIRED_FILES:
        if name not in files:
            reasons.append(f"manifest.json: required file {name} is not listed")
    for name, expected in sorted(files.items()):
        if not _is_safe_name(name) or name in (MANIFEST_FILE, SIGNATURE_FILE):
            reasons.append(f"manifest.json: bad file name {name!r}")
            continue
        if name not in present:
            reasons.append(f"{name}: listed in the manifest but missing")
            continue
        limit = limits.max_onnx_bytes if name == MODEL_FILE else limits.max_file_bytes
        data = _read_limited(present[name], limit, reasons)
        if data is None:
            continue
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected.lower():
            reasons.append(f"{name}: sha256 mismatch (manifest {expected}, file {actual})")
            continue
        contents[name] = data
    return contents


def _parse_labels(obj: Any, reasons: list[str], limits: BundleLimits) -> LabelMap | None:
    """Check a labels.json object; append reasons; return the LabelMap when usable."""
    before = len(reasons)
    if not isinstance(obj, dict):
        reasons.append("labels.json: not a JSON object")
        return None
    if obj.get("format_version") != FORMAT_VERSION:
        reasons.append(f"labels.json: format_version {obj.get('format_version')!r} is not {FORMAT_VERSION}")
    raw_groups, raw_labels = obj.get("groups"), obj.get("labels")
    if not isinstance(raw_groups, list) or not raw_groups:
        reasons.append("labels.json: 'groups' must be a non-empty list")
        return None
    if not isinstance(raw_labels, list) or not raw_labels:
        reasons.append("labels.json: 'labels' must be a non-empty list")
        return None
    if len(raw_labels) > limits.max_labels:
        reasons.append(f"labels.json: {len(raw_labels)} labels exceeds the limit of {limits.max_labels}")
        return None

    groups: dict[str, LabelGroup] = {}
    for i, g in enumerate(raw_groups):
        if not isinstance(g, dict):
            reasons.append(f"labels.json: group #{i} is not an object")
            continue
        name, kind, parent = g.get("name"), g.get("kind"), g.get("parent_group")
        if not isinstance(name, str) or not name:
            reasons.append(f"labels.json: group #{i} has no name")
            continue
        if name in groups:
            reasons.append(f"labels.json: group {name!r} defined twice")
        if kind not in ("exclusive", "multi"):
            reasons.append(f"labels.json: group {name!r} has unknown kind {kind!r}")
        if parent is not None and not isinstance(parent, str):
            reasons.append(f"labels.json: group {name!r} parent_group must be a name or null")
            parent = None
        groups[name] = LabelGroup(name, kind, parent)  # type: ignore[arg-type]
    for g in groups.values():
        if g.parent_group is not None and g.parent_group not in groups:
            reasons.append(f"labels.json: group {g.name!r} has unknown parent_group {g.parent_group!r}")
    for g in groups.values():  # no cycles among parent groups
        seen, cur = {g.name}, g.parent_group
        while cur is not None and cur in groups:
            if cur in seen:
                reasons.append(f"labels.json: group {g.name!r} is in a parent_group cycle")
                break
            seen.add(cur)
            cur = groups[cur].parent_group

    labels: list[Label] = []
    for i, x in enumerate(raw_labels):
        if not isinstance(x, dict):
            reasons.append(f"labels.json: label #{i} is not an object")
            continue
        index, tag, group, value, parent = (x.get(k) for k in ("index", "tag", "group", "value", "parent"))
        if not isinstance(index, int) or isinstance(index, bool):
            reasons.append(f"labels.json: label #{i} index {index!r} is not an integer")
            continue
        if not isinstance(tag, str) or not tag or tag != tag.strip():
            reasons.append(f"labels.json: label #{i} tag {tag!r} is not a non-empty trimmed string")
            continue
        if not isinstance(group, str) or not isinstance(value, str):
            reasons.append(f"labels.json: label {tag!r} needs string group and value")
            continue
        if parent is not None and not isinstance(parent, str):
            reasons.append(f"labels.json: label {tag!r} parent must be a tag or null")
            continue
        labels.append(Label(index, tag, group, value, parent))

    indices = sorted(x.index for x in labels)
    if indices != list(range(len(raw_labels))):
        reasons.append(f"labels.json: label indices must be exactly 0..{len(raw_labels) - 1}, each once")
    by_tag: dict[str, Label] = {}
    for x in labels:
        if x.tag in by_tag:
            reasons.append(f"labels.json: tag {x.tag!r} appears twice")
        by_tag[x.tag] = x
    for x in labels:
        g = groups.get(x.group)
        if g is None:
            reasons.append(f"labels.json: label {x.tag!r} has unknown group {x.group!r}")
            continue
        if x.parent is None:
            if g.parent_group is not None:
                reasons.append(f"labels.json: label {x.tag!r} needs a parent in group {g.parent_group!r}")
            continue
        p = by_tag.get(x.parent)
        if p is None:
            reasons.append(f"labels.json: label {x.tag!r} has unknown parent {x.parent!r}")
        elif p.group != g.parent_group:
            reasons.append(
                f"labels.json: label {x.tag!r} parent {x.parent!r} is in group {p.group!r}, "
                f"not in its group's parent_group {g.parent_group!r}"
            )
    if len(reasons) > before:
        return None
    return LabelMap(groups=tuple(groups.values()), labels=tuple(sorted(labels, key=lambda x: x.index)))


def _is_unit(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def _parse_thresholds(obj: Any, labels: LabelMap | None, reasons: list[str]) -> Thresholds | None:
    before = len(reasons)
    if not isinstance(obj, dict):
        reasons.append("thresholds.json: not a JSON object")
        return None
    if obj.get("format_version") != FORMAT_VERSION:
        reasons.append(f"thresholds.json: format_version {obj.get('format_version')!r} is not {FORMAT_VERSION}")
    default = obj.get("default")
    if not _is_unit(default):
        reasons.append(f"thresholds.json: default {default!r} is not a number in [0, 1]")
    per_tag = obj.get("per_tag", {})
    if not isinstance(per_tag, dict):
        reasons.append("thresholds.json: per_tag is not an object")
        return None
    for tag, value in per_tag.items():
        if not _is_unit(value):
            reasons.append(f"thresholds.json: threshold {value!r} of {tag!r} is not a number in [0, 1]")
        if labels is not None and tag not in labels.by_tag:
            reasons.append(f"thresholds.json: threshold for unknown tag {tag!r}")
    if len(reasons) > before:
        return None
    return Thresholds(default=float(default), per_tag={k: float(v) for k, v in per_tag.items()})


def _featurizer_dims(spec: Any, manifest: Mapping[str, Any], reasons: list[str]) -> tuple[int, int] | None:
    """L and K from the featurizer spec: `max_features` and the length of `numeric` (or `numeric_fields`)."""
    if not isinstance(spec, dict):
        reasons.append("featurizer.json: not a JSON object")
        return None
    dims_ok = True
    L = spec.get("max_features")
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        reasons.append(f"featurizer.json: max_features {L!r} is not a positive integer")
        dims_ok = False
    numeric = spec.get("numeric", spec.get("numeric_fields"))
    if not isinstance(numeric, list | dict):
        reasons.append("featurizer.json: no list of numeric fields ('numeric')")
        dims_ok = False
    if "featurizer_version" in manifest and spec.get("version") != manifest["featurizer_version"]:
        reasons.append(
            f"featurizer.json: version {spec.get('version')!r} differs from the manifest's "
            f"featurizer_version {manifest['featurizer_version']!r}"
        )
    if not dims_ok:
        return None
    return int(L), len(numeric)  # type: ignore[arg-type]


def featurizer_assets(spec: Mapping[str, Any]) -> dict[str, str] | None:
    """The asset files a featurizer spec names, role → file name, as `serving.featurizer.Featurizer.load` reads
    them (`idf.npy` when it names none); None when `assets` is not an object of file names (a list, say, which the
    featurizer cannot read: every worker would refuse the bundle)."""
    assets = spec.get("assets", _DEFAULT_ASSETS)
    if isinstance(assets, dict) and all(isinstance(v, str) for v in assets.values()):
        return {**_DEFAULT_ASSETS, **assets}
    return None


def _check_featurizer_assets(spec: Mapping[str, Any], files: Any, reasons: list[str]) -> None:
    """Every asset file featurizer.json names must be a file of the bundle (listed in the manifest): else the bundle
    loads here and every worker refuses it when its featurizer reads the file."""
    assets = featurizer_assets(spec)
    if assets is None:
        reasons.append(f"featurizer.json: assets {spec.get('assets')!r} is not an object of asset to file name")
        return
    listed = files if isinstance(files, dict) else {}
    for role, name in sorted(assets.items()):
        if name not in listed:
            reasons.append(f"featurizer.json: asset {role!r} is {name!r}, a file the manifest does not list")
    if spec.get("known_only") and spec.get("version") != "hashtfidf-1" and "known" not in assets:
        reasons.append("featurizer.json: known_only is set but no 'known' asset is named")


def _check_golden(
    data: bytes | None, L: int | None, K: int | None, T: int | None, limits: BundleLimits, reasons: list[str]
) -> GoldenSet | None:
    if data is None:
        return None
    before = len(reasons)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
        if unpacked > limits.max_file_bytes:
            reasons.append(f"golden.npz: unpacks to {unpacked} bytes, over the limit of {limits.max_file_bytes}")
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("ids", "weights", "numeric", "scores") if k in npz.files}
            raw_inputs = npz["inputs"] if "inputs" in npz.files else None
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError
        reasons.append(f"golden.npz: unreadable ({exc})")
        return None
    want = {
        "ids": (np.int64, L),
        "weights": (np.float32, L),
        "numeric": (np.float32, K),
        "scores": (np.float32, T),
    }
    rows = set()
    for name, (dtype, width) in want.items():
        a = arrays.get(name)
        if a is None:
            reasons.append(f"golden.npz: missing array {name!r}")
            continue
        if a.dtype != dtype or a.ndim != 2:
            reasons.append(f"golden.npz: {name} is {a.dtype}{list(a.shape)}, expected 2-D {np.dtype(dtype)}")
            continue
        if width is not None and a.shape[1] != width:
            reasons.append(f"golden.npz: {name} has {a.shape[1]} columns, expected {width}")
        rows.add(a.shape[0])
    if len(rows) > 1:
        reasons.append(f"golden.npz: arrays have different row counts {sorted(rows)}")
    elif rows and not 1 <= next(iter(rows)) <= limits.max_golden_rows:
        reasons.append(f"golden.npz: {next(iter(rows))} rows, expected 1..{limits.max_golden_rows}")
    if len(reasons) > before:
        return None
    if (arrays["ids"] < 0).any():
        reasons.append("golden.npz: negative ids")
    scores = arrays["scores"]
    if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        reasons.append("golden.npz: scores are not all finite probabilities in [0, 1]")
    if len(reasons) > before:
        return None
    inputs = None
    if raw_inputs is not None:
        inputs = _golden_inputs(raw_inputs, len(scores), reasons)
        if inputs is None:
            return None
    for a in arrays.values():
        a.setflags(write=False)
    return GoldenSet(**arrays, inputs=inputs)


def _golden_inputs(raw: np.ndarray, rows: int, reasons: list[str]) -> tuple[Mapping[str, Any], ...] | None:
    """golden.npz `inputs`: the UTF-8 bytes of a JSON array with one object of GOLDEN_INPUT_FIELDS per golden row
    (None, with a reason, if not)."""
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"{raw.dtype}{list(raw.shape)}, not bytes")
        listed = json.loads(raw.tobytes().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        reasons.append(f"golden.npz: inputs is no UTF-8 JSON array ({exc})")
        return None
    if not isinstance(listed, list) or len(listed) != rows:
        reasons.append(f"golden.npz: inputs holds {len(listed) if isinstance(listed, list) else 'no'} rows, not {rows}")
        return None
    out = []
    for i, row in enumerate(listed):
        if not isinstance(row, dict) or not set(row) <= set(GOLDEN_INPUT_FIELDS):
            reasons.append(f"golden.npz: inputs[{i}] is not a JSON object of {', '.join(GOLDEN_INPUT_FIELDS)}")
            return None
        out.append(MappingProxyType(row))
    return tuple(out)


# --------------------------------------------------------------------------------------------------- ONNX checks


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _norm_shape(dims: list[int | str | None]) -> list[int | str]:
    """Manifest form of a shape: the dynamic batch dimension as "N", fixed dims as ints."""
    return [BATCH_DIM if (i == 0 and not isinstance(d, int)) or d is None else d for i, d in enumerate(dims)]


def _dtype_name(vi: onnx.ValueInfoProto) -> str:
    elem = vi.type.tensor_type.elem_type
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name
    except Exception:
        return f"onnx-type-{elem}"


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    init_names = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in init_names]


def _default_opset(model: onnx.ModelProto) -> int | None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return None


def _walk_graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _walk_graphs(attr.g)
            for g in attr.graphs:
                yield from _walk_graphs(g)


def _all_tensors(model: onnx.ModelProto) -> Iterable[tuple[str, onnx.TensorProto]]:
    """Every tensor stored in the model: initializers, sparse initializers, constant attributes."""
    for graph in _walk_graphs(model.graph):
        for t in graph.initializer:
            yield t.name, t
        for s in graph.sparse_initializer:
            yield s.values.name, s.values
            yield s.indices.name, s.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield f"{node.name or node.op_type}.{attr.name}", attr.t
                for t in attr.tensors:
                    yield f"{node.name or node.op_type}.{attr.name}", t
                sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
                for st in [*sparse, *attr.sparse_tensors]:
                    yield f"{node.name or node.op_type}.{attr.name}", st.values
                    yield f"{node.name or node.op_type}.{attr.name}", st.indices


def _check_onnx(
    data: bytes,
    manifest: Mapping[str, Any],
    L: int | None,
    K: int | None,
    T: int | None,
    limits: BundleLimits,
    reasons: list[str],
) -> None:
    # The graph checks parse the model into a proto that is freed when they return; only then the ONNX checker runs,
    # on the bytes: check_model(proto) would serialise the proto once more, so bytes + proto + the checker's copies
    # coexisted (peak RSS of a 130 MB model: 770 MB; checker on the bytes alone: +266 MB instead of +525 MB).
    external = _check_onnx_graph(data, manifest, L, K, T, limits, reasons)
    if external is not False:  # unparsable (None) or external data (True), which the checker would look up on disk
        return
    try:
        onnx.checker.check_model(data, full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, onnx.shape_inference.InferenceError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reasons.append(f"model.onnx: the ONNX checker refuses it ({first[:300]})")


def _check_onnx_graph(
    data: bytes,
    manifest: Mapping[str, Any],
    L: int | None,
    K: int | None,
    T: int | None,
    limits: BundleLimits,
    reasons: list[str],
) -> bool | None:
    """Every check of the ONNX graph but the checker; returns whether it references external data (None when it
    does not parse or has no graph)."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError
        reasons.append(f"model.onnx: does not parse as an ONNX model ({exc})")
        return None
    if not model.HasField("graph") or not model.graph.node:
        reasons.append("model.onnx: has no graph")
        return None

    # Operator domains and opsets.
    opset = _default_opset(model)
    for op in model.opset_import:
        if op.domain not in limits.allowed_domains:
            reasons.append(f"model.onnx: operator domain {op.domain!r} is not allowed")
    if opset is None:
        reasons.append("model.onnx: imports no default-domain opset")
    elif not limits.min_opset <= opset <= limits.max_opset:
        reasons.append(f"model.onnx: opset {opset} outside the allowed {limits.min_opset}..{limits.max_opset}")
    if "onnx_opset" in manifest and manifest["onnx_opset"] != opset:
        reasons.append(f"manifest.json: onnx_opset {manifest['onnx_opset']!r} but the model imports opset {opset}")
    if model.functions:
        reasons.append("model.onnx: model-local functions are not allowed")
    bad_domains = sorted(
        {n.domain for g in _walk_graphs(model.graph) for n in g.node if n.domain not in limits.allowed_domains}
    )
    if bad_domains:
        reasons.append(f"model.onnx: nodes use unknown operator domains {bad_domains}")

    # Stored tensors: no external data, no huge dims; constant shape arguments bounded.
    consts: dict[str, onnx.TensorProto] = {}
    external = False
    for name, t in _all_tensors(model):
        consts[name] = t
        if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data:
            reasons.append(f"model.onnx: tensor {name!r} references external data")
            external = True
        if any(d > limits.max_dim or d < 0 for d in t.dims):
            reasons.append(f"model.onnx: tensor {name!r} has dims {list(t.dims)} beyond the limit {limits.max_dim}")
    for graph in _walk_graphs(model.graph):
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.HasField("t"):
                        consts[node.output[0]] = attr.t
        for node in graph.node:
            pos = _SHAPE_ARG_OPS.get(node.op_type)
            if pos is None or len(node.input) <= pos or node.input[pos] not in consts:
                continue
            t = consts[node.input[pos]]
            if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type != onnx.TensorProto.INT64:
                continue
            try:
                values = onnx.numpy_helper.to_array(t)
            except Exception:
                continue
            if values.size and int(np.max(values)) > limits.max_dim:
                reasons.append(f"model.onnx: {node.op_type} node asks for a dimension beyond {limits.max_dim}")

    # Declared dims of every value.
    for graph in _walk_graphs(model.graph):
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            big = [d for d in _dims(vi) if isinstance(d, int) and (d > limits.max_dim or d < 0)]
            if big:
                reasons.append(f"model.onnx: {vi.name!r} declares dims {big} beyond the limit {limits.max_dim}")

    # Inputs and output against the featurizer (L, K) and the labels (T).
    inputs = {vi.name: vi for vi in _graph_inputs(model)}
    if sorted(inputs) != sorted(INPUT_NAMES):
        reasons.append(f"model.onnx: inputs are {sorted(inputs)}, expected {sorted(INPUT_NAMES)}")
    want = {"ids": ("int64", L), "weights": ("float32", L), "numeric": ("float32", K)}
    for name, (dtype, width) in want.items():
        vi = inputs.get(name)
        if vi is not None:
            _check_io(vi, dtype, width, "featurizer", reasons, dynamic=TOKEN_DIM if name != "numeric" else None)
    outputs = list(model.graph.output)
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        reasons.append(f"model.onnx: outputs are {[o.name for o in outputs]}, expected ['{OUTPUT_NAME}']")
    else:
        _check_io(outputs[0], "float32", T, "labels.json", reasons)

    # The manifest describes this model.
    man_inputs = manifest.get("inputs")
    if "inputs" in manifest:
        expected = {vi.name: [_dtype_name(vi), _norm_shape(_dims(vi))] for vi in inputs.values()}
        if (
            not isinstance(man_inputs, dict)
            or {
                k: [v[0], _norm_shape(v[1])] if isinstance(v, list) and len(v) == 2 and isinstance(v[1], list) else v
                for k, v in man_inputs.items()
            }
            != expected
        ):
            reasons.append(f"manifest.json: inputs {man_inputs!r} do not describe the model's {expected!r}")
    man_output = manifest.get("output")
    if "output" in manifest and len(outputs) == 1:
        expected_out = {"name": outputs[0].name, "shape": _norm_shape(_dims(outputs[0]))}
        shape = man_output.get("shape") if isinstance(man_output, dict) else None
        got_out = {
            "name": man_output.get("name") if isinstance(man_output, dict) else None,
            "shape": _norm_shape(list(shape)) if isinstance(shape, list) else shape,
        }
        if got_out != expected_out:
            reasons.append(f"manifest.json: output {man_output!r} does not describe the model's {expected_out!r}")
    version = manifest.get("model_version")
    m = VERSION_RE.match(version) if isinstance(version, str) else None
    if "model_version" in manifest:
        if m is None:
            reasons.append(f"manifest.json: model_version {version!r} is not <yyyymmddTHHMMSSZ>-<8 hex>")
        elif m.group(2) != hashlib.sha256(data).hexdigest()[:8]:
            reasons.append(f"manifest.json: model_version {version!r} does not end with the ONNX sha256 prefix")

    return external


def _check_io(
    vi: onnx.ValueInfoProto,
    dtype: str,
    width: int | None,
    source: str,
    reasons: list[str],
    dynamic: str | None = None,
) -> None:
    """dtype and [N, width] shape of one input or output; `dynamic` names the symbol the width may be instead."""
    got_dtype = _dtype_name(vi)
    dims = _dims(vi)
    if got_dtype != dtype:
        reasons.append(f"model.onnx: {vi.name!r} is {got_dtype}, expected {dtype}")
    if len(dims) != 2:
        reasons.append(f"model.onnx: {vi.name!r} has shape {dims}, expected rank 2 [N, n]")
        return
    if isinstance(dims[0], int):
        reasons.append(f"model.onnx: {vi.name!r} has a fixed batch dimension {dims[0]}; it must be dynamic")
    if width is not None and dims[1] != width and (dynamic is None or dims[1] != dynamic):
        also = f" (or the dynamic {dynamic!r})" if dynamic else ""
        reasons.append(f"model.onnx: {vi.name!r} has width {dims[1]!r} but {source} says {width}{also}")
