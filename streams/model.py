"""The worker's models: the active one (swapped as one reference), the previous one (for rollback) and an optional
shadow candidate scored beside the active one on live events.

`ModelHolder.get()` is what the processor calls once per batch: it returns the active `BundleModel`, or — while a
shadow is set — a `ShadowScoring` that scores with the active model, also scores with the shadow and records how
their tags differ. Either way the batch is scored by the models captured at that call, so a swap between batches
never mixes versions inside one batch. Lifecycle requests (activate, shadow, promote, rollback; a shadow request
without a bundle stops the shadow) are applied by `ModelHolder.handle`, and the history a (re)started worker replays
by `ModelHolder.restore`, both by the same rules (`_Rules`); the Kafka side (consuming model-updates, answering,
publishing diffs) is `streams.models_agent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from schemas import ModelUpdate, ShadowDiff, Tag
from serving.bundle import LabelMap, ModelBundle, capped, load_bundle
from serving.decoding import TagDecoder
from serving.featurizer import Featurizer
from serving.scorer import OnnxScorer
from serving.validate import (
    ActiveFigures,
    ValidatedBundle,
    ValidationPolicy,
    ValidationReport,
    child_init,
    open_validated,
    validate_bundle,
    validate_isolated,
    warm_up,
)
from streams.model_cli import ANSWER_KINDS, rollback_unchanged_reason, shadow_stopped_reason
from streams.settings import WorkerSettings
from tagstream.errors import ModelRejectedError, ValidationTimeoutError

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
        """Featurize and score a batch in one ONNX call, then decode each row's tags. A product with no feature the
        model knows at all (a title of spaces, invisible characters or unknown symbols, and no known brand, hint or
        description word) gets none: its scores would be the model's priors, which training never learnt from (it
        skips empty titles)."""
        if not products:
            return []
        features = self.featurizer.transform(products)
        rows = self.decoder.decode(self.scorer.predict(features))
        blank = ~(features.ids != 0).any(axis=1)
        return [[] if no_text else row for row, no_text in zip(rows, blank.tolist(), strict=True)]

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


# --------------------------------------------------------------------------------------------------- lifecycle rules

# A slot of (active, previous, shadow): a loaded model, or in a start-up fold the offset of the request whose bundle
# it holds (not loaded yet).
_Slot = BundleModel | int


class _Models(NamedTuple):
    """A worker's (active, previous, shadow) slots."""

    active: _Slot | None
    previous: _Slot | None
    shadow: _Slot | None

    @property
    def slots(self) -> tuple[_Slot | None, _Slot | None, _Slot | None]:
        """(active, previous, shadow)."""
        return self.active, self.previous, self.shadow


def _resolved(uri: str | None) -> Path | None:
    """The absolute path a request's bundle_uri names; None when it names none (absent, a NUL byte, a symlink
    loop): such a request is refused by validation, like any bundle that cannot be read."""
    if uri is None:
        return None
    try:
        return Path(uri).resolve()
    except (ValueError, OSError, RuntimeError):
        return None


def _same_bundle(model: BundleModel | None, event: ModelUpdate) -> bool:
    """Whether `event` names the bundle `model` was loaded from (version, sha256 and path)."""
    if model is None or model.version != event.model_version or model.bundle.sha256 != event.sha256:
        return False
    path = _resolved(event.bundle_uri)
    return path is not None and path == _resolved(str(model.bundle.path))


def _same_content(model: BundleModel | None, event: ModelUpdate) -> bool:
    """Whether `event` names a bundle with `model`'s version and manifest sha256 (which covers every file), in any
    directory: once validated, a copy of the active bundle is answered as already active (swapped in, it filled
    both the active and the previous slot with one version and forgot the model to roll back to)."""
    return model is not None and model.version == event.model_version and model.bundle.sha256 == event.sha256


def _loaded(slot: _Slot | None) -> BundleModel | None:
    """A live request's slot (always a loaded model)."""
    assert not isinstance(slot, int)
    return slot


@dataclass(frozen=True, slots=True)
class _Step:
    """What one request does to (active, previous, shadow)."""

    before: _Models
    after: _Models
    offset: int = -1
    reasons: tuple[str, ...] | None = None  # refused, and why
    unchanged: tuple[str, ...] | None = None  # answered with the active model, nothing changed (and why)
    swapped: bool = False  # the active model changed
    entered: bool = False  # the request's bundle entered a slot (activate, shadow)
    stopped: _Slot | None = None  # the shadow a shadow request without a bundle stopped


class _Rules:
    """How each request changes (active, previous, shadow): one set of rules for live requests and for the
    history a (re)started worker folds. `requests` (offset → request) names the bundles of a fold's offset slots;
    requests naming the same bundle (version, sha256, path, signature) share the slot of the first of them."""

    def __init__(self, requests: dict[int, ModelUpdate] | None = None) -> None:
        self.requests = requests or {}
        self.slots: dict[int, int] = {}  # request offset -> its bundle's slot
        first: dict[tuple[str, str, Path, str | None], int] = {}
        for offset, event in self.requests.items():
            path = _resolved(event.bundle_uri)
            if event.sha256 is None or path is None:
                self.slots[offset] = offset
            else:
                key = (event.model_version, event.sha256, path, event.signature)
                self.slots[offset] = first.setdefault(key, offset)

    def version(self, slot: _Slot) -> str:
        """The model version of a slot (a request's bundle has the version it names, or it is refused)."""
        return self.requests[slot].model_version if isinstance(slot, int) else slot.version

    def same_bundle(self, slot: _Slot | None, event: ModelUpdate) -> bool:
        """Whether `event` names the bundle in `slot` (an activate of it is answered, not applied again)."""
        if not isinstance(slot, int):
            return _same_bundle(slot, event)
        if not self.same_content(slot, event):
            return False
        path = _resolved(event.bundle_uri)
        return path is not None and path == _resolved(self.requests[slot].bundle_uri)

    def same_content(self, slot: _Slot | None, event: ModelUpdate) -> bool:
        """Whether `event` names a bundle of the version and manifest sha256 of the one in `slot` (`_same_content`)."""
        if not isinstance(slot, int):
            return _same_content(slot, event)
        held = self.requests[slot]
        return held.model_version == event.model_version and held.sha256 is not None and held.sha256 == event.sha256

    def needs_bundle(self, models: _Models, event: ModelUpdate) -> bool:
        """Whether applying `event` to `models` needs its bundle validated."""
        if event.kind == "activate":
            return not self.same_bundle(models[0], event)
        return (
            event.kind == "shadow"
            and event.bundle_uri is not None
            and models[0] is not None
            and event.model_version != self.version(models[0])  # refused unread: the active model's own version
        )

    def apply(
        self, models: _Models, event: ModelUpdate, bundle: _Slot | None, refused: tuple[str, ...] | None
    ) -> _Step:
        """The step `event` makes from `models`; `bundle`: its validated bundle (when `needs_bundle`), unless
        `refused` gives why the bundle was refused."""
        active, previous, shadow = models

        def refuse(*reasons: str) -> _Step:
            return _Step(models, models, reasons=reasons)

        def swap(new: _Slot) -> tuple[_Slot, _Slot | None]:  # the active model becomes previous
            return new, active if active is not None and active != new else previous

        kind = event.kind
        if kind == "activate":
            if refused is not None:
                return refuse(*refused)
            copy = self.same_content(active, event) and _resolved(event.bundle_uri) is not None
            if bundle is None or copy:
                return _Step(models, models, unchanged=())  # already active (or a valid copy of it elsewhere)
            new, old = swap(bundle)
            if shadow is not None and self.version(shadow) == self.version(bundle):
                shadow = None  # the shadow is now active
            return _Step(models, _Models(new, old, shadow), swapped=True, entered=True)
        if kind == "shadow":
            if event.bundle_uri is None:  # no bundle: stop the shadow (`tagstream model shadow --off`)
                if shadow is None:
                    return refuse("shadow: no shadow model to stop")
                if event.model_version not in (ANY_SHADOW, self.version(shadow)):
                    return refuse(f"shadow: the shadow model is {self.version(shadow)}, not {event.model_version}")
                return _Step(models, models._replace(shadow=None), stopped=shadow)
            if active is None:
                return refuse("shadow: no active model to compare with")
            if event.model_version == self.version(active):  # promoted, it would fill both active and previous
                return refuse(f"shadow: {event.model_version} is the active model")
            if refused is not None:
                return refuse(*refused)
            assert bundle is not None
            return _Step(models, models._replace(shadow=bundle), entered=True)
        if kind == "promote":
            if shadow is None:
                return refuse("promote: no shadow model")
            if event.model_version not in (ANY_SHADOW, self.version(shadow)):
                return refuse(f"promote: the shadow model is {self.version(shadow)}, not {event.model_version}")
            return _Step(models, _Models(*swap(shadow), None), swapped=True)
        if kind == "rollback":
            # Back to the previous model (the one named, if named). Naming none, it swaps active and previous each
            # time, as it always has: the stored history of every worker is folded by this rule. `tagstream model
            # rollback` therefore names the previous model the workers report, and a rollback naming the model
            # already active changes nothing, so a retry does not return to the model it left.
            named = event.model_version != ANY_PREVIOUS
            if named and active is not None and self.version(active) == event.model_version:
                return _Step(models, models, unchanged=(rollback_unchanged_reason(self.version(active)),))
            if previous is None:
                return refuse("rollback: no previous model")
            if named and self.version(previous) != event.model_version:
                return refuse(f"rollback: the previous model is {self.version(previous)}, not {event.model_version}")
            if shadow is not None and self.version(shadow) == self.version(previous):
                shadow = None  # it would shadow itself
            return _Step(models, _Models(*swap(previous), shadow), swapped=True)
        return _Step(models, models)  # answers

    def _next(self, models: _Models, offset: int, invalid: dict[int, tuple[str, ...]]) -> _Step:
        """A fold's step: the request at `offset`, its bundle an offset slot, valid unless `invalid` has it."""
        event = self.requests[offset]
        if not self.needs_bundle(models, event):
            return self.apply(models, event, None, None)
        slot = self.slots[offset]
        return self.apply(models, event, slot, invalid.get(slot))

    def fold(self, models: _Models, invalid: dict[int, tuple[str, ...]]) -> list[_Step]:
        """Every step of the history (`requests`, in offset order) from `models`."""
        steps = []
        for offset in self.requests:
            step = replace(self._next(models, offset, invalid), offset=offset)
            steps.append(step)
            models = step.after
        return steps

    def needed(
        self, initial: _Models, steps: list[_Step], invalid: dict[int, tuple[str, ...]], valid: Collection[int]
    ) -> set[int]:
        """The requests whose bundles are to be validated next (none once the result is certain): first the bundles
        the fold ends with (it serves them, and they decide most of what came before); then, while the fold could
        end in more than one state depending on the bundles not checked yet, the newest of those it consults. The
        unchecked bundles are never judged one at a time: two refused ones can each leave the result as it is and
        change it together (`reachable_ends`)."""
        known = set(valid) | set(invalid)
        final = {slot for slot in steps[-1].after.slots if isinstance(slot, int)} if steps else set()
        if todo := final - known:
            return todo
        ends, newest = self.reachable_ends(initial, invalid, known)
        return set() if len(ends) == 1 or newest is None else {newest}

    def reachable_ends(
        self, initial: _Models, invalid: dict[int, tuple[str, ...]], known: set[int], most: int = 256
    ) -> tuple[set[_Models], int | None]:
        """The states the fold can end in, over every outcome of the bundles not in `known` (valid or refused), and
        the newest of those bundles it consults. Outcomes are branched on only where a bundle is consulted, branches
        ending in one state merge, and a bundle consulted more than once keeps its outcome along a branch. Past
        `most` branches the search stops (ends as found so far, and the newest bundle consulted by then)."""
        repeated = {slot for slot, n in Counter(self.slots.values()).items() if n > 1}
        branches: set[tuple[_Models, frozenset[tuple[int, bool]]]] = {(initial, frozenset())}
        newest: int | None = None
        newest_at = -1  # the offset where `newest` was last consulted
        for offset, event in self.requests.items():
            slot = self.slots[offset]
            after: set[tuple[_Models, frozenset[tuple[int, bool]]]] = set()
            for models, assumed in branches:
                if not self.needs_bundle(models, event) or slot in known:
                    after.add((self._next(models, offset, invalid).after, assumed))
                    continue
                if offset > newest_at:
                    newest, newest_at = slot, offset
                outcomes = [ok for ok in (True, False) if (slot, not ok) not in assumed]
                for ok in outcomes:
                    step = self.apply(models, event, slot if ok else None, None if ok else ("unchecked",))
                    after.add((step.after, assumed | {(slot, ok)} if slot in repeated else assumed))
            branches = after
            if len(branches) > most:
                break
        return {models for models, _ in branches}, newest

    def replaced(self, steps: list[_Step]) -> dict[int, _Slot | None]:
        """Each slot's bundle → the active model when it first entered a slot (a candidate's quality is compared
        with the model it would replace)."""
        out: dict[int, _Slot | None] = {}
        for step in steps:
            if step.entered:
                out.setdefault(self.slots[step.offset], step.before[0])
        return out


# --------------------------------------------------------------------------------------------------- the holder

_T = TypeVar("_T")


def _in_daemon_thread(fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    """`fn(*args)` in a new daemon thread, its outcome in an asyncio future: a call stuck on an unresponsive file
    system can be given up on (`asyncio.wait_for`) and never keeps the process from exiting, as an executor's
    thread would."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # given up on meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="tagstream-reopen", daemon=True).start()
    return future


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
        self._closed = False  # `close`d: a validation process that dies then is not replaced
        self.executor = executor
        self.worker_id = settings.worker_id
        self.active: BundleModel | None = None
        self.previous: BundleModel | None = None
        self.shadow: BundleModel | None = None
        self.shadow_stats: ShadowStats | None = None
        self.shadow_buffer: deque[ShadowDiff] = deque(maxlen=settings.shadow_buffer_max)
        self._policy = policy
        self._validator: ThreadPoolExecutor | None = None
        self._figures: tuple[weakref.ref[BundleModel], ActiveFigures] | None = None  # `_active_figures`' last
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
                log.warning(
                    "no model configured (TAGSTREAM_MODEL_PATH): products get catalog and behaviour tags only%s",
                    " until a model published on model-updates is applied (its history is read next)"
                    if self.settings.model_updates_enabled
                    else "",
                )
            self._initial_loaded = True
            settle_heap()  # the worker's long-lived objects (imports, model) leave the collector's generations

    def preload(self) -> None:
        """Load the bundle named in the settings before the worker's event loop runs (`tagstream worker`), so a
        bundle that cannot be loaded is one error line (its TagstreamError) instead of a crash inside the agents;
        `load_initial` then finds it loaded."""
        if self.settings.model_path is None or self._initial_loaded:
            return
        self.active = self._load_initial(self.settings.model_path)
        self.updated_at = now_ms()
        log.info("model %s loaded from %s", self.active.version, self.settings.model_path)
        self._initial_loaded = True
        settle_heap()

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
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=child_init,
                initargs=(os.getpid(),),
            )
        return self._pool

    def warm_up(self) -> Future[bool] | None:
        """Start the validation child process now (imports take a second or two), not on the first request."""
        return self._process_pool().submit(warm_up) if self.isolated else None

    def _load_initial(self, path: Path) -> BundleModel:
        """The configured bundle, validated like a model update. When isolated, in the child process (the ONNX
        checker and its copies of the model stay there) and its session reads the checked file itself, so the worker
        never holds the model's bytes beside the session being built (peak RSS: about two model sizes less). The
        operator named it: it may be outside TAGSTREAM_MODEL_ROOTS, which confine requests only."""
        policy = replace(self.policy, roots=())
        if not self.isolated:
            return BundleModel.from_validated(validate_bundle(path, policy=policy))
        try:
            report = validate_isolated(self._process_pool(), path, policy=policy)
        except ValidationTimeoutError:
            self._drop_pool(kill=True)  # else the stuck child keeps the worker from exiting
            raise
        return BundleModel.from_validated(open_validated(path, report, policy))

    def _active_figures(self, active: BundleModel | None) -> ActiveFigures | None:
        """The tags `active` gives the labelled golden set (None without one), scored here, where it is loaded, once
        per model: validation compares candidates with them and never reloads the active model from its bundle
        directory, which may be gone by then. A model that cannot score them is not compared with (logged)."""
        golden = self.policy.golden_set
        if active is None or not golden:
            return None
        if self._figures is not None and self._figures[0]() is active:
            return self._figures[1]
        try:
            figures = ActiveFigures.of(active, golden)
        except Exception as exc:
            log.warning(
                "the active model %s cannot score the golden set (%s): candidates are not compared with it",
                active.version,
                exc,
            )
            return None
        self._figures = (weakref.ref(active), figures)
        return figures

    def _validate(self, event: ModelUpdate, active: BundleModel | None) -> ValidationReport | ValidatedBundle:
        """Every stage: in the child process when isolated (its report; `_reopen` then opens the bundle here)."""
        if not event.bundle_uri:
            raise ModelRejectedError(["request: no bundle_uri"])
        args = {
            "expected_sha256": event.sha256,
            "expected_version": event.model_version,
            "signature": event.signature,
            "policy": self.policy,
            "active": self._active_figures(active),
        }
        if self.isolated:
            return validate_isolated(self._process_pool(), event.bundle_uri, **args)
        return validate_bundle(event.bundle_uri, **args)

    async def _reopen(self, event: ModelUpdate, report: ValidationReport) -> ValidatedBundle:
        """`open_validated` (the files again, the featurizer, the session) within the validation time limit, in a
        thread of its own: a file system that stops answering after the child's checks gets the bundle refused
        instead of stopping every later model update (the thread is left behind; a daemon, it never keeps the
        worker from exiting)."""
        if report.reasons:
            raise ModelRejectedError(list(report.reasons))
        assert event.bundle_uri is not None
        timeout = self.policy.timeout_s
        try:
            return await asyncio.wait_for(
                _in_daemon_thread(open_validated, event.bundle_uri, report, self.policy), timeout
            )
        except TimeoutError:
            log.error("re-opening %s did not finish in time: its thread is left behind", event.model_version)
            raise ValidationTimeoutError(
                [
                    f"re-opening the validated bundle did not finish within {timeout:g} s "
                    "(TAGSTREAM_MODEL_VALIDATION_TIMEOUT_S): a bundle on an unresponsive file system?"
                ]
            ) from None
        except ModelRejectedError:
            raise
        except Exception as exc:  # anything unexpected is a refusal, never a crash
            log.exception("re-opening %s failed unexpectedly", event.model_version)
            raise ModelRejectedError([f"validation failed: {type(exc).__name__}: {exc}"]) from None

    async def validate(self, event: ModelUpdate, active: BundleModel | None) -> BundleModel:
        """Validate the request's bundle (child process, then `_reopen` opens it here) against the model it would
        replace (`active`, for the quality stage); raise ModelRejectedError. A validation process found dead (killed,
        out of memory) is replaced and the bundle validated once more before it is refused."""
        validated = await self._run_stages(event, active)
        if isinstance(validated, ValidationReport):
            validated = await self._reopen(event, validated)
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

    async def _run_stages(self, event: ModelUpdate, active: BundleModel | None) -> ValidationReport | ValidatedBundle:
        """`_validate` in the validation thread, a dead validation process replaced once."""
        if self._validator is None:
            self._validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagstream-validate")
        retried = False
        while True:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._validator, self._validate, event, active)
            except ValidationTimeoutError:
                log.error("validating %s did not finish in time: its process is ended", event.model_version)
                self._drop_pool(kill=True)  # a new child next time
                raise
            except ModelRejectedError:
                raise
            except BrokenProcessPool as exc:
                self._drop_pool()  # a new child next time
                if not retried and not self._closed:
                    retried = True
                    log.warning("the validation process had died; validating %s in a new one", event.model_version)
                    continue
                log.error("the validation process died while validating %s", event.model_version)
                raise ModelRejectedError([f"validation failed: the validation process died ({exc})"]) from None
            except Exception as exc:  # anything unexpected in validation is a refusal, never a crash
                log.exception("validating %s failed unexpectedly", event.model_version)
                raise ModelRejectedError([f"validation failed: {type(exc).__name__}: {exc}"]) from None

    def _drop_pool(self, kill: bool = False) -> None:
        """Forget the validation process pool (a broken one: its child died; with `kill`, one whose child is stuck,
        which is killed); the next validation starts another."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:  # the executor has no public way to end a busy child
            for child in list(getattr(pool, "_processes", {}).values()):
                child.kill()
        pool.shutdown(wait=False, cancel_futures=True)

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

    def _activated_answer(self, model: BundleModel, reasons: Sequence[str] = ()) -> ModelUpdate:
        """A `model-activated` answer naming `model`'s bundle (the model this worker now scores with)."""
        return ModelUpdate(
            kind="model-activated",
            model_version=model.version,
            emitted_at=now_ms(),
            bundle_uri=str(model.bundle.path),
            sha256=model.bundle.sha256,
            worker_id=self.worker_id,
            reasons=tuple(reasons),
        )

    def _reject(self, request: ModelUpdate, reasons: Sequence[str]) -> Outcome:
        reasons = capped(reasons)  # the answer must fit a Kafka message, and the status stays small
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
        answer = self._activated_answer(model)
        log.info(
            "model %s active on %s (%s; previous %s)",
            model.version,
            self.worker_id,
            request.kind,
            self.previous.version if self.previous else None,
        )
        return Outcome(answer, changed=True, swapped_to=model.version)

    def set_shadow(self, model: BundleModel | None) -> None:
        """Start (or with None stop) scoring a shadow candidate beside the active model."""
        self.shadow = model
        self.shadow_stats = (
            ShadowStats(self.active.version if self.active else "-", model.version) if model is not None else None
        )
        self.shadow_buffer.clear()
        self.updated_at = now_ms()

    def _shadow_stopped(self, request: ModelUpdate, stopped: str) -> Outcome:
        """The answer to a shadow stop: the active model, now scoring alone, with the stopped shadow as its reason."""
        active = self.active
        assert active is not None  # a shadow runs only beside an active model
        answer = self._activated_answer(active, (shadow_stopped_reason(stopped),))
        log.info("shadow %s stopped on %s (%s active)", stopped, self.worker_id, active.version)
        return Outcome(answer, changed=True)

    async def handle(self, event: ModelUpdate) -> Outcome:
        """Apply one model-update request (answers from workers are ignored); returns the answer to publish."""
        rules = _Rules()
        models = _Models(self.active, self.previous, self.shadow)
        bundle: BundleModel | None = None
        refused: tuple[str, ...] | None = None
        if rules.needs_bundle(models, event):
            try:
                bundle = await self.validate(event, self.active)
            except ModelRejectedError as exc:
                refused = tuple(exc.reasons)
        step = rules.apply(models, event, bundle, refused)
        if step.reasons is not None:
            return self._reject(event, step.reasons)
        if step.unchanged is not None and self.active is not None:
            if event.kind == "activate":  # already active (maybe a copy elsewhere): the answer names the bundle loaded
                if bundle is not None:
                    bundle.unload()  # the copy, validated: never served
                return Outcome(self._activated_answer(self.active))
            log.info("%s on %s: %s", event.kind, self.worker_id, "; ".join(step.unchanged))
            return Outcome(self._activated_answer(self.active, step.unchanged))
        active, previous, shadow = (_loaded(slot) for slot in step.after.slots)
        if isinstance(step.stopped, BundleModel):
            self.set_shadow(None)
            return self._shadow_stopped(event, step.stopped.version)
        if step.swapped:
            assert active is not None
            # reference assignments: batches in flight keep the model they started with (sessions are never
            # unloaded explicitly, only dropped)
            self.active, self.previous = active, previous
            settle_heap()
            if shadow is not None or self.shadow is not None:
                self.set_shadow(shadow)  # cleared (it became active), or compared with the new active model
            return self._activated(event, active)
        if step.entered:
            assert shadow is not None and self.active is not None
            self.set_shadow(shadow)
            log.info("model %s in shadow beside %s on %s", shadow.version, self.active.version, self.worker_id)
            return Outcome(None, changed=True)
        return Outcome(None)

    async def restore(self, history: Sequence[tuple[int, ModelUpdate]]) -> int | None:
        """Apply the model-updates history (offset, request) a (re)started worker replays as one change: fold it into
        the (active, previous, shadow) it leads to, then validate and load only the bundles that state needs; the
        others are never loaded. A bundle that fails validation refuses its request, as it would have in the
        sequence, and the history is folded again without it: the result is the sequence's, since a bundle is taken
        as valid unchecked only where its refusal would not change the result (`_Rules.needed`), and no model the
        history retired ever scores. Refusals are logged and counted for the requests the fold refused. A
        candidate's quality is compared with the model it replaced in the history when that one is loaded here
        (the configured model, or one this fold validated), else with none. Returns the offset of the last request
        that changed the active model (None when none did)."""
        requests = {offset: event for offset, event in history if event.kind not in ANSWER_KINDS}
        rules = _Rules(requests)
        initial = _Models(self.active, self.previous, self.shadow)
        invalid: dict[int, tuple[str, ...]] = {}
        loaded: dict[int, BundleModel] = {}
        while True:
            steps = rules.fold(initial, invalid)
            todo = sorted(rules.needed(initial, steps, invalid, loaded) - set(loaded))
            if not todo:
                break
            replaced = rules.replaced(steps)
            for offset in todo:
                against = replaced.get(offset)
                if isinstance(against, int):
                    against = loaded.get(against)  # None: not loaded, no quality comparison
                try:
                    loaded[offset] = await self.validate(requests[offset], against)
                except ModelRejectedError as exc:
                    invalid[offset] = tuple(exc.reasons)
                    break  # folded again without it
        final = steps[-1].after if steps else initial
        for step in steps:
            if step.reasons is not None:
                self._reject(requests[step.offset], step.reasons)
        self.swaps += sum(step.swapped for step in steps)
        active, previous, shadow = (loaded[slot] if isinstance(slot, int) else slot for slot in final.slots)
        for offset, unused in loaded.items():
            if offset not in final.slots:  # validated only because the fold's result depended on it: never served
                unused.unload()
        if (active, previous, shadow) != initial.slots:
            self.active, self.previous = active, previous
            if shadow is not self.shadow:
                self.set_shadow(shadow)
            self.updated_at = now_ms()
            settle_heap()
        log.info(
            "model-updates history folded: %d requests, %d bundles validated, %d of them refused; active %s, "
            "previous %s, "
            "shadow %s",
            len(requests),
            len(loaded) + len(invalid),
            len(invalid),
            *(m.version if m is not None else None for m in (active, previous, shadow)),
        )
        return max((step.offset for step in steps if step.swapped), default=None)

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
            "caught_up": self.caught_up.is_set(),  # false while it replays the model-updates history
            "reported_at": now_ms(),
        }

    def close(self) -> None:
        """Stop the validation thread and process (killed: a validation stuck on an unresponsive file system would
        otherwise keep the worker from exiting, its pool's exit handler waiting for the child)."""
        self._closed = True
        if self._validator is not None:
            self._validator.shutdown(wait=False, cancel_futures=True)
            self._validator = None
        self._drop_pool(kill=True)
