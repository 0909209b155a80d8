"""The worker's active model: a validated bundle, its featurizer, ONNX scorer and tag decoder, swapped as one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import Tag
from serving.bundle import ModelBundle, load_bundle
from serving.decoding import TagDecoder
from serving.featurizer import Featurizer
from serving.scorer import OnnxScorer
from streams.settings import WorkerSettings

if TYPE_CHECKING:
    from streams.app import Worker

log = logging.getLogger(__name__)


class BundleModel:
    """A loaded bundle ready to score product texts into model tags (load → score → unload)."""

    def __init__(self, bundle: ModelBundle, scorer: OnnxScorer) -> None:
        self.bundle = bundle
        self.version = bundle.model_version
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

    def score(self, products: Sequence[Any]) -> list[list[Tag]]:
        """Featurize and score a batch in one ONNX call, then decode each row's tags."""
        if not products:
            return []
        return self.decoder.decode(self.scorer.predict(self.featurizer.transform(products)))

    def unload(self) -> None:
        """Release the ONNX session."""
        self.scorer.unload()


class ModelHolder:
    """Holds the active model; a batch reads it once, so one batch is never scored by two versions."""

    def __init__(self, settings: WorkerSettings, executor: Executor | None = None) -> None:
        self.settings = settings
        self.executor = executor
        self.active: BundleModel | None = None
        self.previous: BundleModel | None = None

    def get(self) -> BundleModel | None:
        """The model new batches score with."""
        return self.active

    async def start(self) -> None:
        """Load the bundle named in the settings, if any (off the event loop)."""
        if self.settings.model_path is not None and self.active is None:
            self.active = await asyncio.get_running_loop().run_in_executor(
                self.executor, BundleModel.load, self.settings.model_path, self.settings
            )
            log.info("model %s loaded from %s", self.active.version, self.settings.model_path)
        elif self.active is None:
            log.warning("no model configured (TAGSTREAM_MODEL_PATH): products get catalog and behaviour tags only")

    def attach(self, worker: Worker) -> None:
        """Hook for model-update handling on the worker's app (hot swap lives in `streams.models_agent`)."""
