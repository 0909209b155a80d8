"""`train --every` against the real stack: a real worker is rolled back between two retrain cycles, and the second
cycle compares its candidate with the model the worker announced on model-updates, not the trainer's own."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from schemas import ModelUpdate
from streams.model_cli import send_request
from tests.integration.conftest import StreamEnv
from tests.models import featurized_bundle
from training.catalog import CatalogProduct
from training.publish import periodic_retrain
from training.settings import TrainerSettings

pytestmark = pytest.mark.integration


def _activated(se: StreamEnv, version: str, after: int = -1) -> int:
    """The offset of the worker's `model-activated` answer naming `version` after offset `after`."""

    def fits(e: dict[str, Any]) -> bool:
        return e["kind"] == "model-activated" and e["model_version"] == version and e["_offset"] > after

    return next(e["_offset"] for e in se.consume("model-updates", lambda m: any(map(fits, m))) if fits(e))


def test_a_rollback_between_cycles_is_what_the_next_candidate_is_compared_with(
    make_stream_env: Any, tmp_path: Path
) -> None:
    se = make_stream_env(partitions=1)
    registry = tmp_path / "registry"
    a = featurized_bundle(registry, seed=0)
    se.start_worker(TAGSTREAM_MODEL_PATH=str(a), TAGSTREAM_WORKER_ID="w-every")
    _activated(se, a.name)
    made: list[Path] = []
    quality = {a.name: 0.5}

    def train_fn(products: Any, settings: Any, *, registry: Path, split: Any) -> Path:
        made.append(featurized_bundle(registry, seed=len(made) + 1))
        quality[made[-1].name] = [0.9, 0.7][len(made) - 1]  # b, then c
        return made[-1]

    def between_cycles(seconds: float) -> None:
        # the worker activated the trainer's b; an operator rolls it back to a (`tagstream model rollback`)
        at_b = _activated(se, made[0].name)
        rollback = ModelUpdate(kind="rollback", model_version="previous", emitted_at=time.time_ns() // 10**6)
        asyncio.run(send_request(se.settings, rollback, b"tagstream-control"))
        _activated(se, a.name, after=at_b)

    products = [CatalogProduct(f"p{i}", f"title {i}", category_path=("A", f"B{i % 3}")) for i in range(60)]
    records = periodic_retrain(
        lambda: products,
        TrainerSettings(kafka_bootstrap=se.settings.kafka_bootstrap, topic_prefix=se.settings.topic_prefix),
        every_s=0.0,
        registry=registry,
        max_cycles=2,
        train_fn=train_fn,
        evaluate_fn=lambda bundle, _: {"groups": {"g": {"weighted_f1": quality[bundle.name]}}},
        sleep=between_cycles,
    )
    assert records[0]["current"] == str(a) and records[0]["publish"] is True, records[0]  # b, 0.9 over a, 0.5
    # before: c (0.7) was compared with b (0.9), which the worker no longer ran, and refused
    assert records[1]["current"] == str(a) and records[1]["current_from"] == "model-updates", records[1]
    assert records[1]["publish"] is True
    _activated(se, made[1].name)  # and the worker runs c
