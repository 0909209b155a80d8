"""`tagstream train` end to end: a bundle, the same-run baseline, and the HTML report with its plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tagstream.synth import generate_catalog, write_jsonl

pytestmark = pytest.mark.slow


def test_train_writes_a_bundle_a_baseline_and_a_report(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.jsonl"
    write_jsonl(generate_catalog(600, seed=3), catalog)
    out = tmp_path / "models"
    cmd = [sys.executable, "-m", "tagstream.cli", "train", "--catalog", str(catalog), "--format", "jsonl"]
    run = subprocess.run([*cmd, "--out", str(out), "--epochs", "3"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = Path(run.stdout.strip().splitlines()[-1])
    assert (bundle / "model.onnx").is_file() and bundle.parent == out
    metrics = json.loads((bundle / "metrics.json").read_text())
    for group in ("category_l1", "category_l2", "category_leaf"):
        assert {"accuracy", "micro_f1", "macro_f1", "weighted_f1", "per_tag"} <= set(metrics["top1"]["groups"][group])
        assert 0 <= metrics["baseline"]["groups"][group]["weighted_f1"] <= 1
    assert metrics["parity"]["max_abs_diff"] <= 1e-4
    report = out / "reports" / bundle.name
    html = (report / "report.html").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs and all(name in html for name in pngs)
    assert "baseline" in html.lower() and "category_leaf" in html
    assert "baseline weighted_f1" in run.stderr
