"""The README's first command works: `tagstream demo` on a generated catalog, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tagstream.stack import StackSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_trains_replays_and_reports_its_summary(stack: StackSettings, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tagstream.cli", "demo", "--products", "400", "--events", "4000"]
    cmd += ["--rate", "2000", "--epochs", "4", "--no-live", "--workdir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["products_in"] == 400 and summary["bad_events_in"] == 3
    assert summary["behaviour_in"] >= 4000
    assert summary["dead_lettered"] == 3
    # Every product gets its first tags, behaviour adds more; each update's latency was measured.
    assert summary["reasons"]["product-upsert"] == 400
    assert summary["reasons"].get("behaviour", 0) > 0
    assert summary["latency_ms"]["n"] >= 400 and summary["latency_ms"]["p50"] > 0
    assert "demo summary" in run.stdout and "p99" in run.stdout
    assert (tmp_path / "models" / summary["model_version"] / "model.onnx").is_file()
