"""ONNX Runtime scoring of feature batches with a validated bundle: load, predict, canary, latency, unload.

The scorer holds at most one session. `load` builds the new session first and then swaps it in with one
attribute assignment, so a `predict` running in another thread keeps the session it started with. Session creation
and `run` are CPU-bound: the async variants run them in an executor so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import onnxruntime as ort

from serving.bundle import INPUT_NAMES, MODEL_FILE, OUTPUT_NAME, ModelBundle
from tagstream.errors import ConfigError, ModelLoadError, ModelNotLoadedError, ModelRejectedError, ScoringError

__all__ = ["FeatureArrays", "LatencyStats", "OnnxScorer", "trim_padding"]

# Scores may leave [0, 1] by float rounding only.
_RANGE_SLACK = 1e-5


class FeatureArrays(Protocol):
    """What predict takes: the featurizer's FeatureBatch, a bundle's GoldenSet, or any object with these arrays."""

    ids: np.ndarray  # int64 [N, L]
    weights: np.ndarray  # float32 [N, L]
    numeric: np.ndarray  # float32 [N, K]


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Wall-clock latency of `predict` for one batch size, over `runs` timed runs."""

    batch_size: int
    runs: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    rows_per_s: float


class _Loaded(NamedTuple):
    bundle: ModelBundle
    session: ort.InferenceSession
    L: int
    K: int
    T: int
    trim: bool  # the token axis is dynamic: pass only the columns some row of the batch uses


def trim_padding(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the trailing token columns no row uses (weight 0 adds nothing to the bag): featurized rows are packed
    left, and rows of the bench mix use ~90 columns on average, a 64-row batch ~120 of L=128. For models whose
    token axis is dynamic."""
    used = np.flatnonzero(weights.any(axis=0))
    width = int(used[-1]) + 1 if used.size else 1
    if width < ids.shape[1]:
        return np.ascontiguousarray(ids[:, :width]), np.ascontiguousarray(weights[:, :width])
    return ids, weights


class OnnxScorer:
    """One ONNX Runtime session over a validated ModelBundle.

    `intra_op_num_threads` / `inter_op_num_threads` are passed to ONNX Runtime as given (no spinning threads);
    `max_rows_per_run` bounds the rows of one `session.run` (larger batches are scored in chunks): the embedding
    bag gathers an [N, L, D] float32 temporary (512 rows: 100 MB) and ONNX Runtime's arena keeps its high-water mark,
    so unbounded runs grew a worker by ~350 MB; 64-row runs were also faster per row here (cache-sized temporaries).
    """

    def __init__(
        self, *, intra_op_num_threads: int = 1, inter_op_num_threads: int = 1, max_rows_per_run: int = 64
    ) -> None:
        if intra_op_num_threads < 1 or inter_op_num_threads < 1 or max_rows_per_run < 1:
            raise ConfigError("scorer: thread counts and max_rows_per_run must be >= 1")
        self.intra_op_num_threads = intra_op_num_threads
        self.inter_op_num_threads = inter_op_num_threads
        self.max_rows_per_run = max_rows_per_run
        self._state: _Loaded | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def loaded(self) -> bool:
        """Whether a model is loaded."""
        return self._state is not None

    @property
    def bundle(self) -> ModelBundle | None:
        """The loaded bundle, if any."""
        state = self._state
        return state.bundle if state else None

    @property
    def trims_padding(self) -> bool:
        """Whether calls drop the token columns no row uses (`trim_padding`): the loaded model's token axis is
        dynamic. False when no model is loaded."""
        state = self._state
        return bool(state and state.trim)

    @property
    def model_version(self) -> str | None:
        """The loaded model's version, if any."""
        state = self._state
        return state.bundle.model_version if state else None

    def session_options(self) -> ort.SessionOptions:
        """The options every session of this scorer is created with."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_num_threads
        so.inter_op_num_threads = self.inter_op_num_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        # Memory patterns are planned per input shape; with the dynamic token axis every width got its own plan in
        # the arena (+23 MB RSS over 4,000 rows here). Off: the same RSS as a fixed width, no slower at 64 rows.
        so.enable_mem_pattern = False
        return so

    def load(self, bundle: ModelBundle) -> None:
        """Create a session from the bundle's checked ONNX bytes, check its I/O, and make it the current one.

        `bundle` must come from `serving.bundle.load_bundle` (which validated it). Raises ModelLoadError; on error
        the previously loaded model stays loaded.
        """
        self._install(bundle, self._session(bundle.onnx_bytes, bundle.model_version))

    def load_file(self, bundle: ModelBundle, expected_sha256: str) -> None:
        """Like `load`, but ONNX Runtime reads `model.onnx` from the bundle directory itself, so no copy of the
        model's bytes is held beside the session being built (one model size less at peak). The file is opened
        once and hashed again through the same descriptor after the session exists: ModelLoadError unless it still
        has `expected_sha256` (the hash the validation checked) or is no regular file (opened without blocking, so a
        FIFO or device put in its place is refused instead of blocking the reader for good)."""
        path = bundle.path / MODEL_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise ModelLoadError(f"{bundle.model_version}: cannot open {path}: {exc}") from None
        fh = os.fdopen(fd, "rb")  # kept open across session creation and the re-hash
        with fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ModelLoadError(f"{bundle.model_version}: {path} is not a regular file")
            # hashed before (nothing unvalidated reaches ONNX Runtime) and after (nothing changed meanwhile)
            if _sha256_of(fh) != expected_sha256:
                raise ModelLoadError(f"{bundle.model_version}: {MODEL_FILE} changed while its session was created")
            proc_path = Path(f"/proc/self/fd/{fh.fileno()}")
            session = self._session(str(proc_path) if proc_path.exists() else str(path), bundle.model_version)
            if _sha256_of(fh) != expected_sha256:
                raise ModelLoadError(f"{bundle.model_version}: {MODEL_FILE} changed while its session was created")
        self._install(bundle, session)

    def _session(self, source: bytes | str, version: str) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(
                source, sess_options=self.session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelLoadError(f"{version}: ONNX Runtime cannot create a session: {exc}") from None
        # The session holds its own copy of the weights: drop the ONNX bytes (one model size of RSS). ORT's Python
        # session keeps them only to re-create itself on an execution-provider fallback (CPU only here).
        if hasattr(session, "_model_bytes"):
            session._model_bytes = None
        return session

    def _install(self, bundle: ModelBundle, session: ort.InferenceSession) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if sorted(inputs) != sorted(INPUT_NAMES) or outputs != [OUTPUT_NAME]:
            raise ModelLoadError(
                f"{bundle.model_version}: session has inputs {sorted(inputs)} and outputs {outputs}, "
                f"expected {sorted(INPUT_NAMES)} and ['{OUTPUT_NAME}']"
            )
        trim = not isinstance(inputs["ids"].shape[1], int) and not isinstance(inputs["weights"].shape[1], int)
        self._state = _Loaded(replace(bundle, onnx_bytes=b""), session, bundle.L, bundle.K, bundle.T, trim)

    async def aload(self, bundle: ModelBundle, executor: Executor | None = None) -> None:
        """`load` in `executor` (session creation holds the GIL and takes a while)."""
        await asyncio.get_running_loop().run_in_executor(executor, self.load, bundle)

    def unload(self) -> None:
        """Drop the session; predict raises ModelNotLoadedError afterwards."""
        self._state = None

    # ------------------------------------------------------------------------------------------ scoring

    def predict(self, batch: FeatureArrays | Mapping[str, Any]) -> np.ndarray:
        """Scores float32 [N, T] in [0, 1] for a batch of N rows (any N, N=0 included).

        Raises ModelNotLoadedError when nothing is loaded and ScoringError for wrong input shapes, an ONNX Runtime
        failure, or outputs that are not finite probabilities of shape [N, T].
        """
        state = self._state
        if state is None:
            raise ModelNotLoadedError("no model is loaded")
        ids, weights, numeric = _arrays(batch)
        n = ids.shape[0] if ids.ndim == 2 else -1
        if ids.shape != (n, state.L) or weights.shape != (n, state.L) or numeric.shape != (n, state.K):
            raise ScoringError(
                f"batch shapes ids{list(ids.shape)} weights{list(weights.shape)} numeric{list(numeric.shape)} "
                f"do not match [N, {state.L}], [N, {state.L}], [N, {state.K}]"
            )
        if n == 0:
            return np.empty((0, state.T), dtype=np.float32)
        if not weights.min() >= 0:  # the exported bag writes weights as unsigned digits (training.export.chunk_bags)
            raise ScoringError("batch weights must be >= 0 (the featurizer's TF-IDF weights are)")
        step = self.max_rows_per_run
        if n <= step:
            return self._run(state, ids, weights, numeric)
        return np.concatenate(
            [
                self._run(state, ids[i : i + step], weights[i : i + step], numeric[i : i + step])
                for i in range(0, n, step)
            ]
        )

    async def apredict(self, batch: FeatureArrays | Mapping[str, Any], executor: Executor | None = None) -> np.ndarray:
        """`predict` in `executor`, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(executor, self.predict, batch)

    def _run(self, state: _Loaded, ids: np.ndarray, weights: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        if state.trim:
            ids, weights = trim_padding(ids, weights)
        feeds = {"ids": ids, "weights": weights, "numeric": numeric}
        try:
            out = state.session.run([OUTPUT_NAME], feeds)[0]
        except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
            raise ScoringError(f"{state.bundle.model_version}: ONNX Runtime failed: {exc}") from None
        scores = np.asarray(out)
        if scores.shape != (ids.shape[0], state.T):
            raise ScoringError(
                f"{state.bundle.model_version}: scores shape {list(scores.shape)}, expected [{ids.shape[0]}, {state.T}]"
            )
        if scores.dtype != np.float32:
            scores = scores.astype(np.float32)
        lo, hi = float(scores.min()), float(scores.max())  # NaN in any score makes both NaN
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int((~np.isfinite(scores)).any(axis=1).sum())
            raise ScoringError(f"{state.bundle.model_version}: {bad} of {ids.shape[0]} rows have NaN or inf scores")
        if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
            raise ScoringError(f"{state.bundle.model_version}: scores in [{lo:g}, {hi:g}], not probabilities")
        if lo < 0.0 or hi > 1.0:
            np.clip(scores, 0.0, 1.0, out=scores)
        return scores

    # ------------------------------------------------------------------------------------------ checks

    def check_golden(self, bundle: ModelBundle | None = None, *, atol: float = 1e-4) -> float:
        """Canary: score the golden rows of `bundle` (default: the loaded one) with the loaded session.

        Returns the largest absolute difference from the golden scores; raises ModelRejectedError when it exceeds
        `atol` or when scoring fails (ModelNotLoadedError when nothing is loaded).
        """
        state = self._state
        if state is None:
            raise ModelNotLoadedError("no model is loaded")
        golden = (bundle or state.bundle).golden
        try:
            scores = self.predict(golden)
        except ScoringError as exc:
            raise ModelRejectedError([f"golden: scoring the golden rows failed: {exc}"]) from None
        if scores.shape != golden.scores.shape:
            raise ModelRejectedError([f"golden: scores {list(scores.shape)} vs golden {list(golden.scores.shape)}"])
        diff = np.abs(scores.astype(np.float64) - golden.scores.astype(np.float64))
        worst = float(diff.max())
        if not worst <= atol:
            row, col = np.unravel_index(int(diff.argmax()), diff.shape)
            tag = state.bundle.labels.labels[col].tag if col < state.bundle.labels.T else str(col)
            raise ModelRejectedError(
                [f"golden: max |score - golden| = {worst:.3g} > {atol:g} (row {row}, tag {tag!r})"]
            )
        return worst

    def measure_latency(
        self, batch_sizes: Sequence[int] = (1, 64), *, runs: int = 20, warmup: int = 2
    ) -> dict[int, LatencyStats]:
        """Time `predict` on the loaded bundle's golden rows (repeated to each batch size)."""
        state = self._state
        if state is None:
            raise ModelNotLoadedError("no model is loaded")
        golden = state.bundle.golden
        g = golden.ids.shape[0]
        result: dict[int, LatencyStats] = {}
        for size in batch_sizes:
            if size < 1:
                raise ConfigError(f"measure_latency: batch size {size} < 1")
            rows = np.arange(size) % g
            batch = {"ids": golden.ids[rows], "weights": golden.weights[rows], "numeric": golden.numeric[rows]}
            for _ in range(warmup):
                self.predict(batch)
            times = np.empty(runs, dtype=np.float64)
            for i in range(runs):
                t0 = time.perf_counter()
                self.predict(batch)
                times[i] = (time.perf_counter() - t0) * 1000.0
            result[size] = LatencyStats(
                batch_size=size,
                runs=runs,
                p50_ms=float(np.percentile(times, 50)),
                p99_ms=float(np.percentile(times, 99)),
                max_ms=float(times.max()),
                rows_per_s=float(size * runs / (times.sum() / 1000.0)) if times.sum() > 0 else float("inf"),
            )
        return result


def _sha256_of(fh: Any) -> str:
    """sha256 of an open binary file, read from its start in 1 MiB chunks."""
    fh.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _arrays(batch: FeatureArrays | Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three input arrays, C-contiguous with the model's dtypes (no copy when they already are)."""
    try:
        if isinstance(batch, Mapping):
            raw = (batch["ids"], batch["weights"], batch["numeric"])
        else:
            raw = (batch.ids, batch.weights, batch.numeric)
        return (
            np.ascontiguousarray(raw[0], dtype=np.int64),
            np.ascontiguousarray(raw[1], dtype=np.float32),
            np.ascontiguousarray(raw[2], dtype=np.float32),
        )
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise ScoringError(f"batch is not ids/weights/numeric arrays: {exc}") from None
