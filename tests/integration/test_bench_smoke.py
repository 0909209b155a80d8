"""`tagstream bench --smoke` on the real local stack: every section is there with numbers (speed is never checked)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_smoke_writes_every_section(stack: object, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()

    for key in ("machine", "command", "date", "model", "backlog", "passthrough", "tagstream", "latency", "naive"):
        assert key in result, key
    for key in ("memory", "scoring", "featurizer", "targets"):
        assert key in result, key
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]

    assert _number(result["passthrough"]["events_per_s"]["median"])
    assert _number(result["faust_ceiling"]["events_per_s"]["median"])
    assert _number(result["tagstream"]["events_per_s"]["median"])
    assert _number(result["tagstream"]["vs_passthrough"]["median"])
    assert all(r["timed"] for r in result["tagstream"]["runs"])
    for q in ("p50", "p99", "p99.9"):
        assert _number(result["latency"]["emit_ms"][q]["median"]), q
    assert result["latency"]["runs"][0]["matched_updates"] > 0
    # the load generator's own delay (broker ack − send time) beside the latencies: did it keep up?
    assert _number(result["latency"]["runs"][0]["producer_acked_ms"]["p99"]) and "producer acked p99" in md
    for proc in ("worker", "redis", "kafka", "bench_producer"):  # who used the CPU while the producer was pacing
        assert _number(result["latency"]["runs"][0]["cores_busy"][proc]), proc
    # the worker counts its garbage-collector pauses (collections stall the loop) and logs them when it stops
    pauses = result["latency"]["runs"][0]["gc"]
    assert pauses is not None and all(_number(pauses[k]) for k in ("full", "longest_full_ms", "young", "young_ms"))
    assert "Worker garbage collection" in md
    # how old records were when the worker took them (the latency spent before it), per input topic
    ages = result["latency"]["runs"][0]["arrival"]
    assert set(ages) == {"products", "behavior"}, ages
    assert all(0 <= a["p50"] <= a["p99"] and a["n"] > 0 for a in ages.values()), ages
    assert "Record age when the worker's batch starts" in md
    # and how old they were when fetched: no record is older at its fetch than when its batch starts
    fetched = result["latency"]["runs"][0]["arrival_fetch"]
    assert {t: a["n"] for t, a in fetched.items()} == {t: a["n"] for t, a in ages.items()}, (fetched, ages)
    assert all(fetched[t][q] <= ages[t][q] for t in ages for q in ("p50", "p99")), (fetched, ages)
    assert "Record age when fetched" in md
    # the Faust loop alone paced at the same rate: what consuming costs there, and how late records arrive anyway
    ceiling = result["latency"]["faust_ceiling"]
    assert _number(ceiling["cores_busy"]["worker"]) and ceiling["arrival"]["behavior"]["n"] > 0
    assert "The worker's Faust loop alone" in md
    # latency against load: the half-maximum point (median of its runs) and one run at 0.25 × the maximum
    points = result["latency"]["by_load"]
    assert [p["fraction_of_max"] for p in points] == [0.25, 0.5] and [p["runs"] for p in points] == [1, 1]
    assert points[0]["rate"] < points[1]["rate"] and all(p["matched_updates"] > 0 for p in points)
    assert all(_number(p["emit_ms"][q]) for p in points for q in ("p50", "p99", "p99.9"))
    assert all(isinstance(p["meets_latency_targets"], bool) for p in points)
    # and where each point's latency was spent: its records' ages at fetch and when their batch started
    for p in points:
        ages_p50 = p["record_age_p50_ms"]
        assert set(ages_p50) == {"products", "behavior"}, p
        assert all(0 <= a["at_fetch"] <= a["at_batch_start"] for a in ages_p50.values()), p
    assert "Latency against load" in md
    assert _number(result["naive"]["events_per_s_at_mix"]["median"])
    assert _number(result["naive"]["product_event_us"]["median"])
    assert _number(result["naive"]["behaviour_event_us"]["median"])

    assert _number(result["memory"]["worker_peak_rss_mb_max"])
    assert result["memory"]["tensorflow_loaded_in_worker"] is False  # a fact, not a speed figure

    for bs in ("1", "8", "64", "512"):
        row = result["scoring"]["batches"][bs]
        for engine in ("onnx", "keras_call", "keras_predict", "pipeline_onnx", "featurize", "decode"):
            assert _number(row[engine]["ms_per_call"]["median"]), (bs, engine)
            assert _number(row[engine]["rows_per_s"]), (bs, engine)
        assert _number(row["speedup_vs_keras_call"])
    ops = result["scoring"]["operators"]  # where an ONNX call's time goes, by operator, at the target's batch
    assert ops["rows"] == 64 and ops["by_op"] and sum(o["share"] for o in ops["by_op"]) == pytest.approx(1.0)
    assert {"Gather", "Gemm"} <= {o["op"] for o in ops["by_op"]}  # the bag's lookups and the dense layers
    q = result["scoring"]["int8_dense"]
    assert q["int8_matmuls"] >= 1 and _number(q["int8_rows_per_s"]["median"]) and _number(q["max_abs_diff"])
    assert "kernel time per call of 64 rows" in md and "the export parity gate" in md
    assert "its featurize / decode ms" in md  # where the worker's scoring step goes beside ONNX Runtime
    for lang in ("zh", "en"):
        assert _number(result["featurizer"][lang]["us_per_title_batch1"]["median"]), lang
        assert _number(result["featurizer"][lang]["us_per_title_batch64"]["median"]), lang

    for name, t in result["targets"].items():  # every target was measured; whether it is met is only reported
        assert t["value"] is not None, name
    assert "| measure | value | target |" in md and result["machine"]["cpu"] in md and "tagstream bench" in md
