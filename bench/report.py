"""bench.json → targets and the Markdown report (bench.md, bench/RESULTS.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _get(obj: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return None
        obj = obj[p]
    return obj


def target_values(result: dict[str, Any]) -> dict[str, Any]:
    """The measured value of each target (None when its section did not run)."""
    onnx64 = _get(result, "scoring", "batches", "64", "onnx", "rows_per_s")
    return {
        "tagstream_vs_passthrough": _get(result, "tagstream", "vs_passthrough", "median"),
        "tagstream_events_per_s": _get(result, "tagstream", "events_per_s", "median"),
        "latency_p50_ms": _get(result, "latency", "emit_ms", "p50", "median"),
        "latency_p99_ms": _get(result, "latency", "emit_ms", "p99", "median"),
        "onnx_speedup_batch1": _get(result, "scoring", "batches", "1", "speedup_vs_keras_call"),
        "onnx_rows_per_s_batch64_per_core": onnx64,
        "worker_peak_rss_mb": _get(result, "memory", "worker_peak_rss_mb_max"),
        "tensorflow_in_worker": _get(result, "memory", "tensorflow_loaded_in_worker"),
    }


def evaluate_targets(result: dict[str, Any], targets: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """{name: {"value", "target", "met"}}; met is None when not measured. Reported, never asserted."""
    values = target_values(result)
    out = {}
    for name, (op, bound) in targets.items():
        v = values.get(name)
        if v is None:
            met = None
        elif op == ">=":
            met = v >= bound
        elif op == "<=":
            met = v <= bound
        else:
            met = v == bound
        out[name] = {"value": v, "target": f"{op} {bound}", "met": met}
    return out


def _n(v: Any, digits: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float):
        if digits == 0:
            return f"{v:,.0f}"
        return f"{v:,.{digits}f}"
    return str(v)


def _s(spread: dict[str, Any] | None, digits: int = 0) -> str:
    """`median (min–max)` of a spread."""
    if not spread or spread.get("median") is None:
        return "–"
    if len(spread.get("runs", [])) <= 1:
        return _n(spread["median"], digits)
    return f"{_n(spread['median'], digits)} ({_n(spread['min'], digits)}–{_n(spread['max'], digits)})"


def _met(t: dict[str, Any] | None) -> str:
    if not t or t["met"] is None:
        return "not measured"
    return "met" if t["met"] else "**missed**"


def _per_run(figures: list[Any], text: Callable[[Any], str]) -> str:
    """`run 1: …; run 2: …` of one figure a worker logged per run ("not logged" where it did not)."""
    return "; ".join(f"run {i}: {text(f) if f else 'not logged'}" for i, f in enumerate(figures, 1))


def _ages(ages: dict[str, dict[str, int]]) -> str:
    """Record ages per topic: `behavior 36 / 165, products 17 / 65` (p50 / p99 ms)."""
    return ", ".join(f"{t} {a['p50']} / {a['p99']}" for t, a in sorted(ages.items()))


def markdown(result: dict[str, Any]) -> str:
    """The report: machine, command, date, the headline table, then each section's detail."""
    m = result["machine"]
    cfg = result["config"]
    t = result.get("targets", {})
    model = result.get("model", {})
    lines = [
        "# tagstream bench" + (" (smoke run: tiny sizes, figures meaningless)" if result.get("smoke") else ""),
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}, Python {m['python']} "
        f"(Kafka broker and Redis on the same machine)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"- event loop of the worker, the Faust ceiling and the passthrough: {result.get('event_loop', 'asyncio')}",
        f"- runs per measurement: {cfg['runs']} (median, with min–max across runs); total time "
        f"{_n(result.get('elapsed_s'))} s",
        f"- catalog: {result.get('catalog')}; model: {model.get('labels')} tags, ONNX "
        f"{_n((model.get('onnx_bytes') or 0) / 2**20, 1)} MiB, settings {model.get('settings')}",
    ]
    for when in ("load_at_start", "load_at_end"):
        load = result.get(when)
        if load:
            busy = "; ".join(f"{b['cpu_percent']}% `{b['cmd']}`" for b in load["busy_processes"]) or "none"
            lines.append(f"- {when.replace('_', ' ')}: loadavg {load['loadavg']}, other busy processes: {busy}")
    bl = result.get("backlog")
    if bl:
        bt = bl["by_topic"]
        lines.append(
            f"- event mix: {_n(bl['events'])} events, {bl['product_share'] * 100:.1f}% product upserts "
            f"(mean {_n(bt.get('products', {}).get('mean_bytes'))} B), behaviour "
            f"(mean {_n(bt.get('behavior', {}).get('mean_bytes'))} B); {bl['partitions']} partitions per topic"
        )
    lines += ["", "## Headline", "", "| measure | value | target | |", "|---|---|---|---|"]
    ts = result.get("tagstream", {})
    pt = result.get("passthrough", {})
    fc = result.get("faust_ceiling", {})
    lat = result.get("latency", {})
    sc = result.get("scoring", {}).get("batches", {})
    mem = result.get("memory", {})
    nv = result.get("naive", {})
    rows = [
        ("transport ceiling: raw aiokafka passthrough (events/s)", _s(pt.get("events_per_s")), "", ""),
        ("Faust ceiling: the worker's Faust consumption loop, no work (events/s)", _s(fc.get("events_per_s")), "", ""),
        ("tagstream worker, end to end (events/s, 1 process)", _s(ts.get("events_per_s")), "≥ 15,000",
         _met(t.get("tagstream_events_per_s"))),
        ("tagstream / passthrough (paired runs)", _s(ts.get("vs_passthrough"), 2), "≥ 0.5",
         _met(t.get("tagstream_vs_passthrough"))),
        ("tagstream / Faust ceiling (paired runs)", _s(ts.get("vs_faust_ceiling"), 2), "", ""),
        ("naive per-event loop, Keras model(x) (events/s at the mix)", _s(nv.get("events_per_s_at_mix")), "", ""),
        ("tagstream / naive", _n(nv.get("tagstream_speedup"), 1), "", ""),
        (f"event→tag p50 at {_n(lat.get('rate'))} ev/s = {_n(lat.get('fraction_of_max'), 2)} × max (ms)",
         _s(_get(lat, "emit_ms", "p50"), 1), "≤ 10",
         _met(t.get("latency_p50_ms"))),
        ("event→tag p99 (ms)", _s(_get(lat, "emit_ms", "p99"), 1), "≤ 50", _met(t.get("latency_p99_ms"))),
        ("event→tag p99.9 (ms)", _s(_get(lat, "emit_ms", "p99.9"), 1), "", ""),
        ("ONNX vs Keras model(x), batch 1 (× faster)", _n(_get(sc, "1", "speedup_vs_keras_call"), 1), "≥ 20",
         _met(t.get("onnx_speedup_batch1"))),
        ("ONNX rows/s per core, batch 64", _s(_rows_spread(sc, "64", "onnx")), "≥ 100,000",
         _met(t.get("onnx_rows_per_s_batch64_per_core"))),
        ("worker peak RSS (MB, max over runs)", _n(mem.get("worker_peak_rss_mb_max")), "≤ 400",
         _met(t.get("worker_peak_rss_mb"))),
        ("TensorFlow mapped in the worker", _n(mem.get("tensorflow_loaded_in_worker")), "no",
         _met(t.get("tensorflow_in_worker"))),
    ]  # fmt: skip
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]

    if ts:
        lines += [
            "",
            "## Throughput (pre-loaded backlog; events/s from the first offset commit to fully committed, or over "
            f"{result['config'].get('throughput_window')} s of steady state when the backlog lasts longer)",
            "",
            "| run | passthrough ev/s | Faust ceiling ev/s | tagstream ev/s | ratio to passthrough | "
            "worker startup→first commit (s) | tag updates | worker peak RSS (MB) | CPU µs per event: worker / "
            "Redis / Kafka broker |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        fc_runs = fc.get("runs", [])
        for i, (p, w) in enumerate(zip(pt.get("runs", []), ts.get("runs", []), strict=False)):
            ratio = w["events_per_s"] / p["events_per_s"] if w.get("events_per_s") and p.get("events_per_s") else None
            ceiling = fc_runs[i].get("events_per_s") if i < len(fc_runs) else None
            lines.append(
                f"| {i + 1} | {_n(p.get('events_per_s'))} | {_n(ceiling)} | {_n(w.get('events_per_s'))} | "
                f"{_n(ratio, 2)} | "
                f"{_n(w.get('startup_to_first_commit_s'), 1)} | {_n(w.get('tag_updates'))} | "
                f"{_n(w.get('peak_rss_mb'))} | "
                + " / ".join(_n((w.get("cpu_us_per_event") or {}).get(k), 1) for k in ("worker", "redis", "kafka"))
                + " |"
            )
    if lat:
        lines += [
            "",
            f"## Latency at {_n(lat['rate'])} events/s ({_n(lat.get('fraction_of_max'), 2)} × the median maximum), "
            "paced producer",
            "",
            "emit = tag-update `emit_time` − source message produce timestamp (the spec's measure); published = the "
            "tag-update record's timestamp (after the Redis write) − source timestamp; received = when the bench's "
            "consumer got it; producer acked = when the broker acknowledged the source event to the bench's producer "
            "(the load generator kept up while it stays small). Matched by source topic/partition/offset; only events "
            "that changed tags emit.",
            "",
            "| run | sent ev/s | matched updates | emit p50 | p99 | p99.9 | max | published p99 | received p99 | "
            "producer acked p99 | cores busy while pacing: worker / Redis / Kafka broker / bench producer |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(lat["runs"]):
            e = r["emit_ms"]
            busy = r.get("cores_busy") or {}
            lines.append(
                f"| {i + 1} | {_n(r['achieved_send_rate'])} | {_n(r['matched_updates'])} | {_n(e['p50'], 1)} | "
                f"{_n(e['p99'], 1)} | {_n(e['p99.9'], 1)} | {_n(e['max'], 1)} | "
                f"{_n(r['published_ms']['p99'], 1)} | {_n(r['received_ms']['p99'], 1)} | "
                f"{_n((r.get('producer_acked_ms') or {}).get('p99'), 1)} | "
                + " / ".join(_n(busy.get(k), 2) for k in ("worker", "redis", "kafka", "bench_producer"))
                + " |"
            )
        by_reason = lat["runs"][0].get("emit_ms_by_reason", {}) if lat["runs"] else {}
        if by_reason:
            lines.append("")
            lines.append(
                "By reason (run 1): "
                + "; ".join(
                    f"{k}: n={v['n']}, p50 {_n(v['p50'], 1)}, p99 {_n(v['p99'], 1)} ms" for k, v in by_reason.items()
                )
            )
        for key, caption in (
            (
                "arrival",
                "Record age when the worker's batch starts (Kafka timestamp → the agent takes it: the bench producer, "
                "the broker, the fetch and Faust's consumer; the rest of the emit latency is the worker's own "
                "processing; warm-up included)",
            ),
            (
                "arrival_fetch",
                "Record age when fetched (Kafka timestamp → the worker's consumer hands the fetch to Faust: the bench "
                "producer, the broker and the fetch; from there to the batch start above, the record waits in the "
                "worker's buffers)",
            ),
        ):
            ages_by_run = [run.get(key) for run in lat["runs"]]
            if any(ages_by_run):
                lines += ["", f"{caption}, p50 / p99 ms: " + _per_run(ages_by_run, _ages)]
        fc_paced = lat.get("faust_ceiling")
        if fc_paced:
            busy = fc_paced.get("cores_busy") or {}
            ages = fc_paced.get("arrival") or {}
            ages_fetched = fc_paced.get("arrival_fetch") or {}
            lines.append("")
            lines.append(
                f"The worker's Faust loop alone (bench/faust_ceiling.py: the same consumer, agents and commits, no "
                f"processing) paced at the same rate: {_n(busy.get('worker'), 2)} cores busy, "
                f"{_n((fc_paced.get('cpu_us_per_event') or {}).get('worker'), 1)} µs of CPU per event; record age at "
                "batch start p50 / p99 ms: "
                + (_ages(ages) or "not logged")
                + "; when fetched: "
                + (_ages(ages_fetched) or "not logged")
            )
        pauses = [run.get("gc") for run in lat["runs"]]
        if any(pauses):
            lines.append("")
            lines.append(
                "Worker garbage collection over each latency run (warm-up included; each collection stalls the event "
                "loop): "
                + _per_run(
                    pauses,
                    lambda g: (
                        f"{g['full']} full (longest {g['longest_full_ms']:.1f} ms), {g['young']} young "
                        f"({g['young_ms']:.0f} ms in all)"
                    ),
                )
            )
    if lat.get("by_load"):
        lines += [
            "",
            "## Latency against load (one run at each further fraction of the maximum; the latency rate's row is the "
            "median of its runs)",
            "",
            "| paced ev/s | × max | runs | matched updates | emit p50 | p99 | p99.9 | p50 ≤ 10 and p99 ≤ 50 ms | "
            "worker cores busy | record age p50 at fetch / at batch start (ms) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for point in lat["by_load"]:
            e = point["emit_ms"]
            ages = ", ".join(
                f"{t} {_n(a['at_fetch'])} / {_n(a['at_batch_start'])}"
                for t, a in (point.get("record_age_p50_ms") or {}).items()
            )
            lines.append(
                f"| {_n(point['rate'])} | {_n(point['fraction_of_max'], 2)} | {point['runs']} | "
                f"{_n(point['matched_updates'])} | {_n(e['p50'], 1)} | {_n(e['p99'], 1)} | {_n(e['p99.9'], 1)} | "
                f"{_n(point['meets_latency_targets'])} | {_n(point['worker_cores_busy'], 2)} | {ages or '–'} |"
            )
    if nv:
        lines += [
            "",
            "## Naive per-event implementation (Keras model(x) per upsert, one Redis round trip per step)",
            "",
            f"- events/s at the bench mix: {_s(nv.get('events_per_s_at_mix'))}; raw (the mix it happened to read): "
            f"{_s(nv.get('events_per_s_raw'))}",
            f"- µs per product upsert: {_s(nv.get('product_event_us'))}; per behaviour event: "
            f"{_s(nv.get('behaviour_event_us'))}",
        ]
    if sc:
        lines += [
            "",
            "## Scoring alone (same model and inputs; 1 intra-op thread each; ms per call, median of runs)",
            "",
            "| batch | ONNX ms | Keras model(x) ms | Keras predict ms | ONNX rows/s | × vs model(x) | × vs predict | "
            "worker scoring step (featurize+ONNX+decode) rows/s | its featurize / decode ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for bs, r in sc.items():
            parts = " / ".join(_n(r[k]["ms_per_call"]["median"], 3) if k in r else "–" for k in ("featurize", "decode"))
            lines.append(
                f"| {bs} | {_s(r['onnx']['ms_per_call'], 3)} | {_s(r['keras_call']['ms_per_call'], 2)} | "
                f"{_s(r['keras_predict']['ms_per_call'], 1)} | {_n(r['onnx']['rows_per_s'])} | "
                f"{_n(r['speedup_vs_keras_call'], 1)} | {_n(r['speedup_vs_keras_predict'], 1)} | "
                f"{_n(r['pipeline_onnx']['rows_per_s'])} | {parts} |"
            )
        lines.append("")
        lines.append(f"max |ONNX − Keras| on these inputs: {result['scoring'].get('max_abs_diff_onnx_vs_keras'):.2e}")
        lines += _onnx_time_lines(result["scoring"])
    fz = result.get("featurizer")
    if fz:
        lines += [
            "",
            "## Featurizer (µs per title)",
            "",
            "| titles | mean chars | batch 1 | batch 64 |",
            "|---|---|---|---|",
        ]
        for lang, name in (("zh", "Chinese"), ("en", "English")):
            r = fz.get(lang)
            if r:
                lines.append(
                    f"| {name} | {r['mean_title_chars']} | {_s(r['us_per_title_batch1'], 1)} | "
                    f"{_s(r['us_per_title_batch64'], 1)} |"
                )
    if mem:
        lines += [
            "",
            f"Memory: worker peak RSS {_s(mem.get('worker_peak_rss_mb'))} MB over {mem.get('checked_processes')} "
            f"worker processes; TensorFlow libraries mapped: {mem.get('tensorflow_libs_found') or 'none'} "
            f"({mem.get('method')}).",
        ]
    return "\n".join(lines) + "\n"


def _rows_spread(sc: dict[str, Any], bs: str, engine: str) -> dict[str, Any] | None:
    r = _get(sc, bs, engine, "ms_per_call")
    if not r or r.get("median") is None:
        return None
    b = int(bs)
    return {
        "median": b / (r["median"] / 1000),
        "min": b / (r["max"] / 1000),
        "max": b / (r["min"] / 1000),
        "runs": r["runs"],
    }


def _onnx_time_lines(scoring: dict[str, Any], ops_shown: int = 8, nodes_shown: int = 5) -> list[str]:
    """Where an ONNX call's time goes by operator, and the int8-dense variant's speed and parity (bench.onnx_time)."""
    lines: list[str] = []
    ops = scoring.get("operators")
    if ops:
        lines += [
            "",
            f"### ONNX Runtime kernel time per call of {ops['rows']} rows, by operator "
            f"(its profiler, {ops['calls']} calls, 1 thread; {ops['nodes']} nodes, "
            f"{_n(ops['kernel_us_per_call'])} µs per call)",
            "",
            "| operator | nodes | µs per call | share |",
            "|---|---|---|---|",
        ]
        for op in ops["by_op"][:ops_shown]:
            lines.append(f"| {op['op']} | {op['nodes']} | {_n(op['us_per_call'])} | {op['share']:.0%} |")
        rest = ops["by_op"][ops_shown:]
        if rest:
            lines.append(
                f"| {len(rest)} others | {sum(o['nodes'] for o in rest)} | "
                f"{_n(sum(o['us_per_call'] for o in rest))} | {sum(o['share'] for o in rest):.0%} |"
            )
        slowest = "; ".join(f"{x['node']} ({x['op']}) {x['share']:.0%}" for x in ops["top_nodes"][:nodes_shown])
        lines += ["", f"Slowest nodes: {slowest}."]
    q = scoring.get("int8_dense")
    if q and "error" in q:
        lines += ["", f"int8 dense layers: not measured ({q['error']})."]
    elif q:
        verdict = "passes" if q["passes_parity_gate"] else "fails"
        lines += [
            "",
            f"int8 dense layers (ONNX Runtime's `quantize_dynamic` of {q['int8_matmuls']} matrix products; not "
            f"shipped): {_n(q['int8_rows_per_s']['median'])} rows/s against {_n(q['float_rows_per_s']['median'])} "
            f"for the float model in the same calls ({q['speedup']:.2f}×); on {_n(q['checked_rows'])} other titles "
            f"max |Δ| {q['max_abs_diff']:.2g} and {q['decision_flips']} decision flips: {verdict} the export parity "
            "gate (max |Δ| ≤ 1e-4, no flips).",
        ]
    return lines
