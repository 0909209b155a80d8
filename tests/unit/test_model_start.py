"""A worker's configured model (TAGSTREAM_MODEL_PATH) at start-up: no services."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving.validate import ValidationPolicy
from streams.model import ModelHolder
from streams.settings import WorkerSettings
from tagstream.errors import ModelRejectedError
from tests.unit.test_validate import real_bundle

POLICY = ValidationPolicy(latency_budget_ms={1: 1000.0, 64: 1000.0}, latency_runs=2)


async def test_a_worker_never_runs_without_the_model_it_was_given(tmp_path: Path) -> None:
    good = real_bundle(tmp_path / "reg", seed=0)
    bad = shutil.copytree(good, tmp_path / "bad")
    (bad / "thresholds.json").write_bytes(b'{"format_version": 1, "default": 0.3, "per_tag": {}}')  # not its sha256
    holder = ModelHolder(WorkerSettings(model_path=bad, worker_id="w"), policy=POLICY)
    # every agent that asks for the model is refused, not only the first: none scores products without it
    for _ in range(3):
        with pytest.raises(ModelRejectedError, match=r"thresholds\.json"):
            await holder.start()
    assert holder.get() is None
