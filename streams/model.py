"""The worker's models: the active one (swapped as one reference), the previous one (for rollback) and an optional
shadow candidate scored beside the active one on live events.

`ModelHolder.get()` is what the processor calls once per batch: it returns the active `BundleModel`, or — while a
shadow is set — a `ShadowScoring` that scores with the active model, also scores with the shadow and records how
their tags differ. Either way the batch is scored by the models captured at that call, so a swap between batches
never mixes versions inside one batch. Lifecycle requests (activate, shadow, promote, rollback) are applied by
`ModelHolder.handle`; the Kafka side (consuming model-updates, answering, publishing diffs) is `streams.models_agent`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import ModelUpdate, ShadowDiff, Tag
from serving.bundle import LabelMap, ModelBundle, load_bundle
from serving.decoding import TagDecoder
from serving.featurizer import Featurizer
from serving.scorer import OnnxScorer
from serving.validate import (
    ValidatedBundle,
    ValidationPolicy,
    child_init,
    open_validated,
    validate_bundle,
    validate_isolated,
    warm_up,
)
from streams.settings import WorkerSettings
from tagstream.errors import ModelRejectedError

if TYPE_CHECKING:
    from streams.app import Worker

__all__ = ["BundleModel", "ModelHolder", "ShadowDiff", "ShadowScoring", "ShadowStats", "diff_model_tags"]

log = logging.getLogger(__name__)

# Request names meaning "whatever this worker has" in promote / rollback requests.
ANY_SHADOW = "shadow"
ANY_PREVIOUS = "previous"


def settle_heap() -> None:
    """Move every object alive now (models, label maps, parsed bundles) out of the garbage collector's generations.

    A full collection walks every tracked object with the GIL held: with a model's objects in the heap that took
    18–24 ms here and stalled the event loop mid-stream. Long-lived objects frozen after a load or a swap are never
    walked again; batch garbage stays in the young generations. O(1) (`gc.freeze` splices lists).
    """
    gc.freeze()


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class BundleModel:
    """A loaded bundle ready to score product texts into model tags (load → score → unload)."""

    def __init__(self, bundle: ModelBundle, scorer: OnnxScorer) -> None:
        self.bundle = scorer.bundle or bundle  # the scorer's copy, without the ONNX bytes its session no longer needs
        self.version = bundle.model_version
        self.labels: LabelMap = bundle.labels
        self.featurizer: Featurizer = bundle.featurizer
        self.scorer = scorer
        self.decoder = TagDecoder.from_bundle(bundle)

    @classmethod
    def load(cls, path: Path, settings: WorkerSettings, verify_key: Any = None) -> BundleModel:
        """Validate the bundle at `path` and create its ONNX session (slow: call it off the event loop)."""
        bundle = load_bundle(path, verify_key=verify_key)
        scorer = OnnxScorer(
            intra_op_num_threads=settings.ort_intra_op_threads, inter_op_num_threads=settings.ort_inter_op_threads
        )
        scorer.load(bundle)
        return cls(bundle, scorer)

    @classmethod
    def from_validated(cls, validated: ValidatedBundle) -> BundleModel:
        """The model of a candidate that passed `serving.validate.validate_bundle` (its session is loaded)."""
        return cls(validated.bundle, validated.scorer)

    def score(self, products: Sequence[Any]) -> list[list[Tag]]:
        """Featurize and score a batch in one ONNX call, then decode each row's tags."""
        if not products:
            return []
        return self.decoder.decode(self.scorer.predict(self.featurizer.transform(products)))

    def unload(self) -> None:
        """Release the ONNX session."""
        self.scorer.unload()

    def __repr__(self) -> str:
        return f"BundleModel({self.version})"


# --------------------------------------------------------------------------------------------------- shadow scoring


def diff_model_tags(active: Sequence[Tag], shadow: Sequence[Tag]) -> tuple[list[str], list[str], float]:
    """(added, removed, agreement) of the shadow's tag names against the active's; agreement = Jaccard (1 if empty)."""
    a = {t.tag for t in active}
    s = {t.tag for t in shadow}
    union = a | s
    agreement = len(a & s) / len(union) if union else 1.0
    return sorted(s - a), sorted(a - s), agreement


class ShadowStats:
    """Running summary of one shadow candidate against the active model (updated where batches are scored)."""

    def __init__(self, active_version: str, shadow_version: str) -> None:
        self.active_version = active_version
        self.shadow_version = shadow_version
        self.started_at = now_ms()
        self._lock = threading.Lock()
        self.compared = 0
        self.identical = 0
        self.agreement_sum = 0.0
        self.added: Counter[str] = Counter()
        self.removed: Counter[str] = Counter()
        self.errors = 0
        self.dropped = 0

    def add(self, diff: ShadowDiff) -> None:
        """Count one product's diff."""
        with self._lock:
            self.compared += 1
            self.agreement_sum += diff.agreement
            self.identical += not diff.added and not diff.removed
            self.added.update(diff.added)
            self.removed.update(diff.removed)

    def error(self) -> None:
        """Count a batch the shadow could not score."""
        with self._lock:
            self.errors += 1

    def to_json(self, top: int = 20) -> dict[str, Any]:
        """The summary: agreement rate, identical share, most added/removed tags, errors."""
        with self._lock:
            n = self.compared
            return {
                "active_version": self.active_version,
                "shadow_version": self.shadow_version,
                "since": self.started_at,
                "compared": n,
                "agreement": self.agreement_sum / n if n else None,
                "identical": self.identical / n if n else None,
                "added": dict(self.added.most_common(top)),
                "removed": dict(self.removed.most_common(top)),
                "errors": self.errors,
                "dropped": self.dropped,
            }


class ShadowScoring:
    """What `ModelHolder.get()` returns while a shadow is set: scores with the active model (whose tags and version
    the batch gets) and also with the shadow, recording per-product tag differences. A failing shadow never fails
    the batch."""

    def __init__(
        self,
        active: BundleModel,
        shadow: BundleModel,
        sink: deque[ShadowDiff],
        stats: ShadowStats,
        worker_id: str | None = None,
    ) -> None:
        self.active = active
        self.shadow = shadow
        self.version = active.version
        self.labels = active.labels  # the batch's tags are the active model's: merged with its hierarchy
        self.sink = sink
        self.stats = stats
        self.worker_id = worker_id

    def score(self, products: Sequence[Any]) -> list[list[Tag]]:
        """The active model's tags of `products`; the shadow's differences go to the sink."""
        tags = self.active.score(products)
        try:
            shadow_tags = self.shadow.score(products)
        except Exception:
            log.exception(
                "shadow %s failed on a batch of %d; live scoring unaffected", self.shadow.version, len(products)
            )
            self.stats.error()
            return tags
        at = now_ms()
        for product, a, s in zip(products, tags, shadow_tags, strict=True):
            added, removed, agreement = diff_model_tags(a, s)
            diff = ShadowDiff(
                product_id=product.product_id,
                active_version=self.active.version,
                shadow_version=self.shadow.version,
                added=tuple(added),
                removed=tuple(removed),
                agreement=agreement,
                emitted_at=at,
                active_tags=tuple(t.tag for t in a),
                shadow_tags=tuple(t.tag for t in s),
                worker_id=self.worker_id,
            )
            if len(self.sink) == self.sink.maxlen:
                self.stats.dropped += 1
            self.sink.append(diff)  # deque.append is atomic
            self.stats.add(diff)
        return tags


# --------------------------------------------------------------------------------------------------- the holder


@dataclass(frozen=True, slots=True)
class Outcome:
    """What handling one model-update request did: the answer to publish (if any) and whether models changed."""

    answer: ModelUpdate | None
    changed: bool = False
    swapped_to: str | None = None  # the new active version when the active model changed


class ModelHolder:
    """Holds the active, previous and shadow models; a batch reads `get()` once, so it is scored by one version."""

    def __init__(
        self,
        settings: WorkerSettings,
        executor: Executor | None = None,
        *,
        policy: ValidationPolicy | None = None,
        isolated: bool | None = None,
    ) -> None:
        """`isolated` (default: the `model_isolated_validation` setting) validates candidates in a child process."""
        self.settings = settings
        self.isolated = settings.model_isolated_validation if isolated is None else isolated
        self._pool: ProcessPoolExecutor | None = None
        self.executor = executor
        self.worker_id = settings.worker_id
        self.active: BundleModel | None = None
        self.previous: BundleModel | None = None
        self.shadow: BundleModel | None = None
        self.shadow_stats: ShadowStats | None = None
        self.shadow_buffer: deque[ShadowDiff] = deque(maxlen=settings.shadow_buffer_max)
        self._policy = policy
        self._validator: ThreadPoolExecutor | None = None
        self._start_lock: asyncio.Lock | None = None
        self._initial_loaded = False
        self._initial_error: BaseException | None = None  # why the configured model could not be loaded
        self.caught_up = asyncio.Event()
        self.consuming = False  # set by attach() when a model-updates consumer will run
        self.swaps = 0
        self.rejections = 0
        self.last_rejection: ModelUpdate | None = None
        self.updated_at = now_ms()

    # ------------------------------------------------------------------------------------------ serving

    def get(self) -> BundleModel | ShadowScoring | None:
        """The model new batches score with (a ShadowScoring around the active model while a shadow is set)."""
        active, shadow, stats = self.active, self.shadow, self.shadow_stats
        if active is None or shadow is None or stats is None:
            return active
        return ShadowScoring(active, shadow, self.shadow_buffer, stats, self.worker_id)

    @property
    def policy(self) -> ValidationPolicy:
        """The validation policy (from the settings unless given; the golden set is read on first use)."""
        if self._policy is None:
            self._policy = ValidationPolicy.from_settings(self.settings)
        return self._policy

    # ------------------------------------------------------------------------------------------ lifecycle

    async def load_initial(self) -> None:
        """Load the bundle named in the settings, if any, once (off the event loop)."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._initial_error is not None:  # every caller: a worker never runs without the model it was given
                raise self._initial_error
            if self._initial_loaded:
                return
            if self.settings.model_path is not None and self.active is None:
                try:
                    self.active = await asyncio.get_running_loop().run_in_executor(
                        self.executor, self._load_initial, self.settings.model_path
                    )
                except Exception as exc:
                    self._initial_error = exc
                    raise
                self.updated_at = now_ms()
                log.info("model %s loaded from %s", self.active.version, self.settings.model_path)
            elif self.active is None:
                log.warning("no model configured (TAGSTREAM_MODEL_PATH): products get catalog and behaviour tags only")
            self._initial_loaded = True
            settle_heap()  # the worker's long-lived objects (imports, model) leave the collector's generations

    async def start(self) -> None:
        """Load the configured bundle, then wait (bounded) until the model-updates backlog has been applied, so a
        (re)started worker scores with the last activated model from its first batch."""
        await self.load_initial()
        if self.consuming and not self.caught_up.is_set():
            try:
                await asyncio.wait_for(self.caught_up.wait(), self.settings.model_catchup_timeout)
            except TimeoutError:
                log.warning(
                    "model-updates backlog not applied within %.0fs; scoring with %s meanwhile",
                    self.settings.model_catchup_timeout,
                    self.active.version if self.active else "no model",
                )

    def attach(self, worker: Worker) -> None:
        """Run the model-updates consumer, shadow-diff publisher and status writer with the worker's app."""
        from streams.models_agent import install

        install(worker, self)

    # ------------------------------------------------------------------------------------------ requests

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=child_init
            )
        return self._pool

    def warm_up(self) -> Future[bool] | None:
        """Start the validation child process now (imports take a second or two), not on the first request."""
        return self._process_pool().submit(warm_up) if self.isolated else None

    def _load_initial(self, path: Path) -> BundleModel:
        """The configured bundle. When isolated, it is validated in the child process like a model update (the ONNX
        checker and its copies of the model stay there) and its session reads the checked file itself, so the worker
        never holds the model's bytes beside the session being built (peak RSS: about two model sizes less)."""
        if not self.isolated:
            return BundleModel.load(path, self.settings, self.policy.verify_key)
        report = validate_isolated(self._process_pool(), path, policy=self.policy)
        return BundleModel.from_validated(open_validated(path, report, self.policy))

    def _validate(self, event: ModelUpdate, active: BundleModel | None) -> BundleModel:
        if not event.bundle_uri:
            raise ModelRejectedError(["request: no bundle_uri"])
        args = {
            "expected_sha256": event.sha256,
            "expected_version": event.model_version,
            "signature": event.signature,
            "policy": self.policy,
        }
        if self.isolated:
            report = validate_isolated(
                self._process_pool(), event.bundle_uri, active=active.bundle if active else None, **args
            )
            validated = open_validated(event.bundle_uri, report, self.policy)
        else:
            validated = validate_bundle(event.bundle_uri, active=active, **args)
        log.info(
            "model %s validated: canary max diff %.2g, median latency %s ms%s",
            validated.model_version,
            validated.canary_max_diff,
            {k: round(v.p50_ms, 3) for k, v in validated.latency.items()},
            f", micro-F1 {validated.quality.candidate_f1:.4f} (active {validated.quality.active_f1})"
            if validated.quality
            else "",
        )
        return BundleModel.from_validated(validated)

    async def validate(self, event: ModelUpdate) -> BundleModel:
        """Validate the request's bundle (child process, then a thread re-opens it); raise ModelRejectedError."""
        if self._validator is None:
            self._validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagstream-validate")
        active = self.active
        try:
            return await asyncio.get_running_loop().run_in_executor(self._validator, self._validate, event, active)
        except ModelRejectedError:
            raise
        except BrokenProcessPool as exc:
            self._pool = None  # a new child next time
            log.error("the validation process died while validating %s", event.model_version)
            raise ModelRejectedError([f"validation failed: the validation process died ({exc})"]) from None
        except Exception as exc:  # anything unexpected in validation is a refusal, never a crash
            log.exception("validating %s failed unexpectedly", event.model_version)
            raise ModelRejectedError([f"validation failed: {type(exc).__name__}: {exc}"]) from None

    def _answer(self, kind: str, version: str, request: ModelUpdate, reasons: Sequence[str] = ()) -> ModelUpdate:
        return ModelUpdate(
            kind=kind,  # type: ignore[arg-type]
            model_version=version,
            emitted_at=now_ms(),
            bundle_uri=request.bundle_uri,
            sha256=request.sha256,
            worker_id=self.worker_id,
            reasons=tuple(reasons),
        )

    def _reject(self, request: ModelUpdate, reasons: Sequence[str]) -> Outcome:
        self.rejections += 1
        answer = self._answer("model-rejected", request.model_version, request, reasons)
        self.last_rejection = answer
        log.warning(
            "model %s (%s) rejected by %s: %s", request.model_version, request.kind, self.worker_id, "; ".join(reasons)
        )
        return Outcome(answer)

    def _activated(self, request: ModelUpdate, model: BundleModel) -> Outcome:
        self.swaps += 1
        self.updated_at = now_ms()
        answer = ModelUpdate(
            kind="model-activated",
            model_version=model.version,
            emitted_at=now_ms(),
            bundle_uri=str(model.bundle.path),
            sha256=model.bundle.sha256,
            worker_id=self.worker_id,
        )
        log.info(
            "model %s active on %s (%s; previous %s)",
            model.version,
            self.worker_id,
            request.kind,
            self.previous.version if self.previous else None,
        )
        return Outcome(answer, changed=True, swapped_to=model.version)

    def swap_in(self, model: BundleModel) -> None:
        """Make `model` active; the active one becomes previous. One reference assignment: batches in flight keep
        the model they started with (sessions are never unloaded explicitly, only dropped)."""
        if self.active is not None and self.active is not model:
            self.previous = self.active
        self.active = model
        settle_heap()

    def set_shadow(self, model: BundleModel | None) -> None:
        """Start (or with None stop) scoring a shadow candidate beside the active model."""
        self.shadow = model
        self.shadow_stats = (
            ShadowStats(self.active.version if self.active else "-", model.version) if model is not None else None
        )
        self.shadow_buffer.clear()
        self.updated_at = now_ms()

    async def handle(self, event: ModelUpdate) -> Outcome:
        """Apply one model-update request (answers from workers are ignored); returns the answer to publish."""
        kind = event.kind
        if kind in ("model-activated", "model-rejected"):
            return Outcome(None)
        if kind == "activate":
            active = self.active
            if (
                active is not None
                and active.version == event.model_version
                and active.bundle.sha256 == event.sha256
                and event.bundle_uri is not None
                and Path(event.bundle_uri).resolve() == Path(active.bundle.path).resolve()
            ):
                return Outcome(self._answer("model-activated", active.version, event))  # already active
            try:
                model = await self.validate(event)
            except ModelRejectedError as exc:
                return self._reject(event, exc.reasons)
            self.swap_in(model)
            if self.shadow is not None and self.shadow.version == model.version:
                self.set_shadow(None)
            elif self.shadow_stats is not None:
                self.set_shadow(self.shadow)  # compare against the new active model from now on
            return self._activated(event, model)
        if kind == "shadow":
            if self.active is None:
                return self._reject(event, ["shadow: no active model to compare with"])
            try:
                model = await self.validate(event)
            except ModelRejectedError as exc:
                return self._reject(event, exc.reasons)
            self.set_shadow(model)
            log.info("model %s in shadow beside %s on %s", model.version, self.active.version, self.worker_id)
            return Outcome(None, changed=True)
        if kind == "promote":
            shadow = self.shadow
            if shadow is None:
                return self._reject(event, ["promote: no shadow model"])
            if event.model_version not in (ANY_SHADOW, shadow.version):
                return self._reject(
                    event, [f"promote: the shadow model is {shadow.version}, not {event.model_version}"]
                )
            self.swap_in(shadow)
            self.set_shadow(None)
            return self._activated(event, shadow)
        if kind == "rollback":
            previous = self.previous
            if previous is None:
                return self._reject(event, ["rollback: no previous model"])
            if event.model_version not in (ANY_PREVIOUS, previous.version):
                return self._reject(
                    event, [f"rollback: the previous model is {previous.version}, not {event.model_version}"]
                )
            self.swap_in(previous)
            if self.shadow is not None:
                self.set_shadow(self.shadow)
            return self._activated(event, previous)
        return Outcome(None)

    # ------------------------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """This worker's models as stored in Redis (`<prefix>:workers`) and shown by `tagstream model status`."""
        return {
            "active": self.active.version if self.active else None,
            "previous": self.previous.version if self.previous else None,
            "shadow": self.shadow.version if self.shadow else None,
            "at": self.updated_at,
            "swaps": self.swaps,
            "rejections": self.rejections,
            "last_rejected": (
                {"model_version": self.last_rejection.model_version, "reasons": list(self.last_rejection.reasons)}
                if self.last_rejection
                else None
            ),
            "shadow_stats": self.shadow_stats.to_json() if self.shadow_stats else None,
            "reported_at": now_ms(),
        }

    def close(self) -> None:
        """Stop the validation thread and process."""
        if self._validator is not None:
            self._validator.shutdown(wait=False, cancel_futures=True)
            self._validator = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
