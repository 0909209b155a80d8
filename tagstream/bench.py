"""`tagstream bench`: end-to-end throughput and latency against the raw Kafka client, scoring against Keras, memory.

One run on this machine, against the real local stack, measures side by side (details: bench/RESULTS.md):

1. transport ceiling: a raw aiokafka consumer → producer passthrough of the bench backlog (`bench/passthrough.py`);
2. tagstream end to end: a real `tagstream worker` subprocess on the same pre-loaded backlog (events/s from its first
   commit to caught up), then event-to-tag-update latency at half that rate (paced producer, matched by source
   topic/partition/offset) and, one run each, at `--latency-fractions` of it (latency against load), its peak RSS
   and whether TensorFlow is mapped into it;
3. a naive per-event implementation (Keras `model(x)` per product, per-event Redis round trips) (`bench/naive.py`);
4. scoring alone: ONNX Runtime vs Keras `model(x)` / `predict` at batch 1, 8, 64, 512 (`bench/scoring.py`), with
   ONNX Runtime's kernel time by operator at batch 64 and the same model with int8 dense layers beside the float
   one, with the parity gate's two measures (`bench/onnx_time.py`);
5. featurizer µs per title, Chinese and English (`bench/featurizer_cost.py`).

Each stream measurement is repeated `--runs` times (median and spread; passthrough and tagstream runs alternate so
each pair shares the machine's state). Figures are reported against the targets, never asserted. `--smoke` is the
CI variant (tiny sizes, one run, a generated catalog; about 1.5 minutes on 2 cores, ~25 s of it training its model
when the cache is cold). The bench model is trained once with `training.train` and cached under `--cache` (default
OUT/model-cache, OUT/model-cache-smoke with `--smoke`).

This module is imported by `tagstream.cli` for every subcommand (the worker's too): it imports nothing heavy at
module level, and never TensorFlow (the model training, Keras and naive sides run in their own processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tagstream.cli import int_at_least
from tagstream.errors import StackError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one bench run."""

    runs: int = 3
    products: int = 6000  # catalog size: model training and product upserts
    backlog_events: int = 300_000  # pre-loaded backlog of the throughput runs
    throughput_window: float = 30.0  # a throughput run ends when caught up or this long after its first commit
    product_share: float = 0.05  # share of product upserts in the mix (the rest: behaviour events)
    partitions: int = 4
    latency_seconds: float = 20.0  # paced phase of each latency run
    latency_rate: float | None = None  # paced rate (events/s) of the latency runs; None = half the measured maximum
    # further load points, as fractions of the measured maximum: one latency run each (where do the targets hold?)
    latency_fractions: tuple[float, ...] = (0.1, 0.25)
    naive_seconds: float = 12.0
    scoring_min_seconds: float = 0.3
    featurizer_min_seconds: float = 0.3
    smoke_model: bool = False
    synthetic: bool = False
    seed: int = 7


FULL = BenchConfig()
SMOKE = BenchConfig(
    runs=1,
    products=300,
    backlog_events=3000,
    latency_seconds=3.0,
    latency_fractions=(0.25,),
    naive_seconds=2.0,
    scoring_min_seconds=0.02,
    featurizer_min_seconds=0.02,
    smoke_model=True,
    synthetic=True,
)

TARGETS = {
    "tagstream_vs_passthrough": (">=", 0.5),
    "tagstream_events_per_s": (">=", 15_000),
    "latency_p50_ms": ("<=", 10.0),
    "latency_p99_ms": ("<=", 50.0),
    "onnx_speedup_batch1": (">=", 20.0),
    "onnx_rows_per_s_batch64_per_core": (">=", 100_000),
    "worker_peak_rss_mb": ("<=", 400.0),
    "tensorflow_in_worker": ("==", False),
}


def _log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def _subprocess_json(cmd: list[str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run a bench helper (`python -m bench.x`), keep its output in `log_path`, return its `RESULT {json}` line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=timeout, check=False)
    log_path.write_bytes(proc.stdout + b"\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}); see {log_path}")
    for line in reversed(proc.stdout.decode().splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(cmd[:3])} printed no result; see {log_path}")


# --------------------------------------------------------------------------------------------------- stream phases


def _catch_up_rate(trace: Any, started: float, total: int) -> dict[str, Any]:
    """The commit trace's steady rate; for a tiny (smoke) backlog, caught up in one commit: total / (start → done)."""
    rate = trace.rate()
    if rate["events_per_s"] is None and trace.done_at is not None:
        elapsed = trace.done_at - started
        rate.update(events_per_s=total / elapsed, seconds=elapsed, method="process start → caught up")
    return rate


class StreamBench:
    """The Kafka-side measurements: passthrough, tagstream throughput, latency, naive."""

    def __init__(self, cfg: BenchConfig, stack: Any, model: dict[str, Any], products: list[Any], out: Path) -> None:
        self.cfg = cfg
        self.bootstrap = stack.kafka_bootstrap
        self.redis_url = stack.redis_url
        self.model = model
        self.bundle = Path(model["bundle"])
        self.products = products
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex[:6]
        self.prefix = f"bench-{self.tag}-"  # every topic, group and Redis prefix of this run starts with it
        self.backlog_prefix = f"{self.prefix}bl-"
        self.ends: dict[Any, int] = {}
        self.profile_worker = False  # run the throughput workers under pyinstrument (skews their figures)

    def _settings(self, topic_prefix: str) -> Any:
        from streams.settings import WorkerSettings

        return WorkerSettings(kafka_bootstrap=self.bootstrap, topic_prefix=topic_prefix, partitions=self.cfg.partitions)

    def _worker_env(self, topic_prefix: str, name: str) -> dict[str, str]:
        from bench.common import worker_env

        return worker_env(
            bootstrap=self.bootstrap,
            redis_url=self.redis_url,
            topic_prefix=topic_prefix,
            app_id=f"{self.prefix}{name}",
            redis_prefix=f"{self.prefix}{name}",
            model=self.bundle,
            partitions=self.cfg.partitions,
        )

    # -- backlog ---------------------------------------------------------------------------------------------------
    def load_backlog(self) -> dict[str, Any]:
        """Create the backlog topics and pre-load the bench mix."""
        from bench.common import end_offsets, event_stream, produce_backlog, stream_facts, topic_names
        from streams.topics import ensure_topics

        t0 = time.perf_counter()
        items = event_stream(self.products, self.cfg.backlog_events, self.cfg.product_share, self.cfg.seed)
        gen_s = time.perf_counter() - t0
        asyncio.run(ensure_topics(self._settings(self.backlog_prefix)))
        produce_s = asyncio.run(produce_backlog(self.bootstrap, self.backlog_prefix, items))
        self.ends = asyncio.run(end_offsets(self.bootstrap, topic_names(self.backlog_prefix)))
        facts = stream_facts(items)
        facts.update(
            generate_s=round(gen_s, 1),
            produce_s=round(produce_s, 1),
            partitions=self.cfg.partitions,
            in_topics=sum(self.ends.values()),
        )
        return facts

    def _watch(self, group: str, alive: Any, timeout: float, interval: float = 0.1) -> Any:
        from bench.common import watch_commits

        return asyncio.run(
            watch_commits(
                self.bootstrap,
                group,
                self.ends,
                timeout=timeout,
                alive=alive,
                interval=interval,
                window=self.cfg.throughput_window,
            )
        )

    def _tag_update_count(self, topic_prefix: str) -> int:
        from bench.common import end_offsets

        return sum(asyncio.run(end_offsets(self.bootstrap, [f"{topic_prefix}tag-updates"])).values())

    # -- 1. passthrough ---------------------------------------------------------------------------------------------
    def passthrough_run(self, i: int) -> dict[str, Any]:
        """One raw aiokafka passthrough of the whole backlog."""
        from bench.common import ProcessWatch

        group = f"{self.prefix}pt{i}"
        total = sum(self.ends.values())
        cmd = [
            sys.executable, "-m", "bench.passthrough", "--bootstrap", self.bootstrap, "--prefix", self.backlog_prefix,
            "--group", group, "--total", str(total), "--loop", _worker_event_loop(),
        ]  # fmt: skip
        proc = ProcessWatch(cmd, {"PYTHONPATH": str(ROOT)}, self.logs / f"passthrough-{i}.log")
        try:
            trace = self._watch(group, proc.alive, timeout=60 + total / 2000, interval=0.05)
            proc.proc.wait(timeout=60)
        finally:
            proc.stop()
        internal = _result_line(proc.log()) or {}
        rate = trace.rate()
        if rate["events_per_s"] is None and internal.get("events_per_s"):  # tiny (smoke) backlog: one commit
            rate.update(events_per_s=internal["events_per_s"], seconds=internal["seconds"], method="internal")
        return {**rate, "internal": internal, "peak_rss_mb": round(proc.peak_mb, 1)}

    # -- 1b. Faust ceiling -----------------------------------------------------------------------------------------
    def faust_ceiling_run(self, i: int) -> dict[str, Any]:
        """The worker's Faust app and batch loop forwarding the whole backlog, with no processing."""
        env = self._worker_env(self.backlog_prefix, f"fc{i}")
        proc = _faust_ceiling(env, self.logs / f"faust-ceiling-{i}.log")
        try:
            total = sum(self.ends.values())
            t0 = time.monotonic()
            trace = self._watch(env["TAGSTREAM_APP_ID"], proc.alive, timeout=120 + self.cfg.throughput_window)
        finally:
            proc.stop()
        return {**_catch_up_rate(trace, t0, total), "peak_rss_mb": round(proc.peak_mb, 1)}

    # -- 2a. tagstream throughput -----------------------------------------------------------------------------------
    def tagstream_run(self, i: int) -> dict[str, Any]:
        """One real worker subprocess catching up on the whole backlog."""
        from bench.common import CpuWatch, clear_redis, start_worker

        name = f"ts{i}"
        env = self._worker_env(self.backlog_prefix, name)
        before = self._tag_update_count(self.backlog_prefix)
        t0 = time.monotonic()
        profile = self.logs / f"worker-throughput-{i}.pyinstrument.txt" if self.profile_worker else None
        worker = start_worker(env, self.logs / f"worker-throughput-{i}.log", profile=profile)
        stack_cpu = CpuWatch()
        try:
            total = sum(self.ends.values())
            trace = self._watch(env["TAGSTREAM_APP_ID"], worker.alive, timeout=120 + self.cfg.throughput_window)
            time.sleep(0.25)  # one more CPU sample after the last commit
            worker.snapshot()
        finally:
            code = worker.stop()
            stack_cpu.stop()
        rate = _catch_up_rate(trace, t0, total)
        cpu_per_event: dict[str, float | None] = {}
        first_commit = next((t for t, c in trace.samples if c > 0), None)
        if rate.get("events") and first_commit is not None and trace.done_at is not None:
            spans = {"worker": worker.cpu_between(first_commit, trace.done_at)}
            spans.update(stack_cpu.between(first_commit, trace.done_at))
            cpu_per_event = {
                k: (round(v / rate["events"] * 1e6, 1) if v is not None else None) for k, v in spans.items()
            }
        if trace.done_at is None:
            _log(f"worker run {i} did not commit within the time limit (exit {code}); see {worker.log_path}")
        updates = self._tag_update_count(self.backlog_prefix) - before
        first = next((t for t, c in trace.samples if c > 0), None)
        clear_redis(self.redis_url, env["TAGSTREAM_REDIS_PREFIX"])
        return {
            **rate,
            "startup_to_first_commit_s": round(first - t0, 1) if first else None,
            "tag_updates": updates,
            "peak_rss_mb": round(worker.peak_mb, 1),
            "tensorflow_libs": worker.tf_libs,
            "caught_up": trace.done_at is not None and not trace.windowed,
            "timed": trace.done_at is not None,
            "cpu_us_per_event": cpu_per_event,
        }

    # -- 2b. latency at half the maximum rate -----------------------------------------------------------------------
    def latency_run(self, i: int, rate: float, items: list[Any], *, ceiling: bool = False) -> dict[str, Any]:
        """A fresh topic set, a worker, a warm-up, then `latency_seconds` of events paced at `rate` events/s. With
        `ceiling`, the worker is the Faust ceiling (bench/faust_ceiling.py: the same Faust loop, no processing, no
        updates): what consuming alone costs at this rate."""
        from bench.common import CpuWatch, clear_redis, start_worker
        from streams.arrival import AT_FETCH
        from streams.arrival import last_summary as arrival_summary
        from streams.gcwatch import last_summary
        from streams.topics import ensure_topics

        topic_prefix = f"{self.prefix}{'latfc' if ceiling else 'lat'}{i}-"
        asyncio.run(ensure_topics(self._settings(topic_prefix)))
        name = f"latfc{i}" if ceiling else f"lat{i}"
        env = self._worker_env(topic_prefix, name)
        log_path = self.logs / f"{'faust-ceiling' if ceiling else 'worker'}-latency-{i}.log"
        worker = _faust_ceiling(env, log_path) if ceiling else start_worker(env, log_path)
        stack_cpu = CpuWatch()
        try:
            worker.wait_for_log("Ready", timeout=120)
            result = asyncio.run(
                _paced_latency(
                    self.bootstrap, topic_prefix, env["TAGSTREAM_APP_ID"], items, rate, self.products,
                    expect_updates=not ceiling,
                )
            )  # fmt: skip
            time.sleep(0.25)  # one more CPU sample after the paced phase
            worker.snapshot()
        finally:
            worker.stop()
            stack_cpu.stop()
        start, end = result.pop("paced_from"), result.pop("paced_to")
        spans = {"worker": worker.cpu_between(start, end), **stack_cpu.between(start, end)}
        spans["bench_producer"] = result.pop("bench_cpu_s")
        # CPU per paced event of each process, and cores busy while pacing: is the machine saturated at this rate?
        result["cpu_us_per_event"] = {
            k: None if v is None else round(v / len(items) * 1e6, 1) for k, v in spans.items()
        }
        result["cores_busy"] = {k: None if v is None else round(v / (end - start), 2) for k, v in spans.items()}
        clear_redis(self.redis_url, env["TAGSTREAM_REDIS_PREFIX"])
        log_text = worker.log()
        gc_pauses = last_summary(log_text)  # the worker's last `gc:` line, logged at shutdown
        arrival = arrival_summary(log_text)  # its record ages at batch start, logged at shutdown
        result.update(
            peak_rss_mb=round(worker.peak_mb, 1),
            tensorflow_libs=worker.tf_libs,
            gc=gc_pauses,
            arrival=arrival,
            arrival_fetch=arrival_summary(log_text, AT_FETCH),  # and at fetch
        )
        return result

    # -- 3. naive ---------------------------------------------------------------------------------------------------
    def naive_run(self, i: int) -> dict[str, Any]:
        """The per-event Keras + Redis loop on the backlog for `naive_seconds`."""
        from bench.common import clear_redis

        redis_prefix = f"{self.prefix}nv{i}"
        cmd = [
            sys.executable, "-m", "bench.naive", "--bootstrap", self.bootstrap, "--prefix", self.backlog_prefix,
            "--group", f"{self.prefix}nv{i}", "--redis-url", self.redis_url, "--redis-prefix", redis_prefix,
            "--bundle", str(self.bundle), "--keras", self.model["keras"],
            "--product-share", str(self.cfg.product_share), "--max-seconds", str(self.cfg.naive_seconds),
        ]  # fmt: skip
        try:
            return _subprocess_json(cmd, self.logs / f"naive-{i}.log", timeout=300)
        finally:
            clear_redis(self.redis_url, redis_prefix)

    def cleanup(self) -> list[str]:
        """Delete this run's topics."""
        from bench.common import delete_topics_with_prefix

        return asyncio.run(delete_topics_with_prefix(self.bootstrap, self.prefix))


def _worker_event_loop() -> str:
    """The event loop the bench's workers run on (`TAGSTREAM_EVENT_LOOP` of this environment)."""
    from streams.settings import WorkerSettings

    return WorkerSettings().event_loop


def _faust_ceiling(env: dict[str, str], log_path: Path) -> Any:
    """A `bench/faust_ceiling.py` subprocess (the worker's Faust loop, no processing), watched like a worker."""
    from bench.common import ProcessWatch

    return ProcessWatch([sys.executable, "-m", "bench.faust_ceiling"], {**env, "PYTHONPATH": str(ROOT)}, log_path)


def _result_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    return None


async def _paced_latency(
    bootstrap: str,
    topic_prefix: str,
    group: str,
    items: list[Any],
    rate: float,
    products: list[Any],
    *,
    expect_updates: bool = True,
) -> dict[str, Any]:
    """Warm up, send `items` paced at `rate`/s, match tag updates to their source events, return the latencies
    (without `expect_updates`, for a worker that emits none, the warm-up waits for its commits instead)."""
    import orjson
    from aiokafka import AIOKafkaConsumer

    from bench.common import end_offsets, make_producer, percentiles, product_event, topic_names, watch_commits

    produced: dict[tuple[str, int, int], int] = {}
    measured: set[tuple[str, int, int]] = set()
    lat: dict[str, list[float]] = {"emit": [], "published": [], "received": [], "acked": []}
    by_reason: dict[str, list[float]] = {}
    producer = make_producer(bootstrap, linger_ms=0)
    consumer = AIOKafkaConsumer(f"{topic_prefix}tag-updates", bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    seen = {"updates": 0, "warm": 0, "last": time.monotonic()}

    async def watch() -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            now_ms = time.time_ns() // 1_000_000
            for records in batches.values():
                for r in records:
                    seen["last"] = time.monotonic()
                    u = orjson.loads(r.value)
                    if u["reason"] in ("window-expired", "retag"):  # caused by a batch or a request, not one event
                        continue
                    src = u["source"]
                    key = (src["topic"], src["partition"], src["offset"])
                    if key not in measured:
                        seen["warm"] += 1
                        continue
                    sent = produced.get(key)
                    if sent is None:
                        continue
                    seen["updates"] += 1
                    lat["emit"].append(u["emit_time"] - sent)
                    lat["published"].append(r.timestamp - sent)
                    lat["received"].append(now_ms - sent)
                    by_reason.setdefault(u["reason"], []).append(u["emit_time"] - sent)

    def record(topic: str, measure: bool) -> Any:
        def done(fut: asyncio.Future) -> None:
            if not fut.cancelled() and fut.exception() is None:
                meta = fut.result()
                key = (topic, meta.partition, meta.offset)
                produced[key] = meta.timestamp
                if measure:
                    measured.add(key)
                    lat["acked"].append(time.time_ns() // 1_000_000 - meta.timestamp)

        return done

    watcher = asyncio.create_task(watch())
    try:
        # warm-up: first product upserts (ONNX session warm-up, assignment done) and wait for their updates
        warm = [p for p in products[:20]]
        for j, p in enumerate(warm):
            fut = await producer.send(
                f"{topic_prefix}products", product_event(p, 1, f"warmup-{j}"), key=f"warmup-{j}".encode()
            )
            fut.add_done_callback(record(f"{topic_prefix}products", False))
        await producer.flush()
        if expect_updates:
            deadline = time.monotonic() + 60
            while seen["warm"] < len(warm) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        else:
            warm_ends = await end_offsets(bootstrap, topic_names(topic_prefix))
            await watch_commits(bootstrap, group, warm_ends, timeout=60, interval=0.1)

        # paced phase
        n = len(items)
        sent = 0
        t0 = time.monotonic()
        cpu0 = time.process_time()  # this process: the paced producer and the tag-update watcher
        while sent < n:
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            while sent < due:
                topic, key, value = items[sent]
                full = f"{topic_prefix}{topic}"
                fut = await producer.send(full, value, key=key, timestamp_ms=time.time_ns() // 1_000_000)
                fut.add_done_callback(record(full, True))
                sent += 1
            await asyncio.sleep(0.001)
        produce_s = time.monotonic() - t0
        await producer.flush()
        paced = (t0, time.monotonic(), time.process_time() - cpu0)

        # wait until the worker committed everything, then for the last updates
        ends = await end_offsets(bootstrap, topic_names(topic_prefix))
        trace = await watch_commits(bootstrap, group, ends, timeout=120, interval=0.2)
        quiet_deadline = time.monotonic() + 10
        while expect_updates and time.monotonic() - seen["last"] < 1.0 and time.monotonic() < quiet_deadline:
            await asyncio.sleep(0.1)
        drained_s = (trace.done_at - t0) if trace.done_at else None
    finally:
        stop.set()
        await watcher
        await consumer.stop()
        await producer.stop()
    return {
        "paced_from": paced[0],
        "paced_to": paced[1],
        "bench_cpu_s": paced[2],
        "target_rate": round(rate, 1),
        "achieved_send_rate": round(n / produce_s, 1) if produce_s > 0 else None,
        "events": n,
        "seconds": round(produce_s, 2),
        "caught_up_s": round(drained_s, 2) if drained_s is not None else None,
        "matched_updates": seen["updates"],
        "emit_ms": percentiles(lat["emit"]),
        "published_ms": percentiles(lat["published"]),
        "received_ms": percentiles(lat["received"]),
        "producer_acked_ms": percentiles(lat["acked"]),
        "emit_ms_by_reason": {k: percentiles(v) for k, v in sorted(by_reason.items())},
    }


# --------------------------------------------------------------------------------------------------- orchestration


def _train_model(cfg: BenchConfig, cache: Path, sets: list[str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.model_cache", "--cache", str(cache), "--products", str(cfg.products)]
    cmd += ["--seed", str(cfg.seed)]
    if cfg.smoke_model:
        cmd.append("--smoke")
    if cfg.synthetic:
        cmd.append("--synthetic")
    for s in sets:
        cmd += ["--set", s]
    return _subprocess_json(cmd, out / "logs" / "model.log", timeout=1800)


def run_bench(args: argparse.Namespace) -> int:
    """Run every measurement; write bench.json and bench.md into --out and print the table."""
    if str(ROOT) not in sys.path:  # `bench/` sits next to the installed packages in the repository
        sys.path.insert(0, str(ROOT))
    from bench import report
    from bench.common import SHARED_DATA, event_stream, load_products, machine, machine_load, spread, write_json
    from bench.featurizer_cost import featurizer_cost
    from streams.settings import WorkerSettings
    from tagstream.settings import load_settings
    from tagstream.stack import StackSettings, stack_status

    load_settings(WorkerSettings, "worker")  # the workers it starts read TAGSTREAM_*: a bad one is one line, now
    cfg = SMOKE if args.smoke else FULL
    overrides = {
        k: v
        for k, v in {
            "runs": args.runs,
            "backlog_events": args.backlog,
            "latency_seconds": args.latency_seconds,
            "latency_rate": args.latency_rate,
            "latency_fractions": args.latency_fractions,
            "naive_seconds": args.naive_seconds,
            "products": args.products,
            "product_share": args.product_share,
            "partitions": args.partitions,
            "throughput_window": args.window,
        }.items()
        if v is not None
    }
    if args.synthetic:
        overrides["synthetic"] = True
    cfg = replace(cfg, **overrides)
    out = Path(args.out or ROOT / "runs" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cache = (
        Path(args.cache).resolve() if args.cache else out / ("model-cache-smoke" if cfg.smoke_model else "model-cache")
    )
    only = set(args.only) if args.only else None

    def want(section: str) -> bool:
        return only is None or section in only

    stack = StackSettings()
    status = stack_status(stack)
    if not status.up:
        raise StackError(f"the local stack is not up ({status.describe()}); run `tagstream stack up` first")

    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "command": "tagstream " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if Path(sys.argv[0]).name in ("tagstream", "cli.py", "__main__.py")
        else " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine(),
        "config": asdict(cfg),
        "event_loop": _worker_event_loop(),  # the worker's, the Faust ceiling's and the passthrough's
        "smoke": bool(args.smoke),
    }
    _log(f"output: {out}")
    result["load_at_start"] = machine_load()

    _log("model: training (or reusing the cache) ...")
    model = _train_model(cfg, cache, args.set, out)
    result["model"] = {k: v for k, v in model.items() if k != "settings"} | {
        "settings": {k: model["settings"][k] for k in ("hash_bits", "max_features", "embed_dim", "hidden", "epochs")}
    }
    _log(f"model {Path(model['bundle']).name}: {model['onnx_bytes'] / 2**20:.0f} MiB ONNX, {model['labels']} tags")

    data_dir = None if cfg.synthetic else SHARED_DATA
    products, catalog = load_products(cfg.products, cfg.seed, data_dir)
    result["catalog"] = catalog
    sb = StreamBench(cfg, stack, model, products, out)
    sb.profile_worker = bool(args.profile_worker)
    try:
        if want("stream") or want("naive"):
            _log(f"backlog: {cfg.backlog_events} events into {sb.backlog_prefix}* ...")
            result["backlog"] = sb.load_backlog()
            _log(f"backlog loaded: {result['backlog']}")
        if want("stream"):
            pt_runs, fc_runs, ts_runs = [], [], []
            for i in range(cfg.runs):
                _log(f"run {i + 1}/{cfg.runs}: passthrough ...")
                pt_runs.append(sb.passthrough_run(i))
                _log(f"  passthrough: {_fmt_rate(pt_runs[-1])}")
                _log(f"run {i + 1}/{cfg.runs}: Faust ceiling (the worker's Faust loop, no processing) ...")
                fc_runs.append(sb.faust_ceiling_run(i))
                _log(f"  Faust ceiling: {_fmt_rate(fc_runs[-1])}")
                _log(f"run {i + 1}/{cfg.runs}: tagstream worker ...")
                ts_runs.append(sb.tagstream_run(i))
                _log(f"  tagstream: {_fmt_rate(ts_runs[-1])}, peak RSS {ts_runs[-1]['peak_rss_mb']} MB")
            ratios = [
                t["events_per_s"] / p["events_per_s"]
                for p, t in zip(pt_runs, ts_runs, strict=True)
                if t.get("events_per_s") and p.get("events_per_s")
            ]
            result["passthrough"] = {
                "events_per_s": spread(r.get("events_per_s") for r in pt_runs),
                "runs": pt_runs,
            }
            result["faust_ceiling"] = {
                "events_per_s": spread(r.get("events_per_s") for r in fc_runs),
                "vs_passthrough": spread(
                    f["events_per_s"] / p["events_per_s"]
                    for p, f in zip(pt_runs, fc_runs, strict=True)
                    if f.get("events_per_s") and p.get("events_per_s")
                ),
                "runs": fc_runs,
            }
            ts_rate = spread(r.get("events_per_s") for r in ts_runs)
            result["tagstream"] = {
                "events_per_s": ts_rate,
                "vs_passthrough": spread(ratios),
                "vs_faust_ceiling": spread(
                    t["events_per_s"] / f["events_per_s"]
                    for f, t in zip(fc_runs, ts_runs, strict=True)
                    if t.get("events_per_s") and f.get("events_per_s")
                ),
                "runs": ts_runs,
            }
            max_rate = ts_rate["median"] or 1000.0
            rate = cfg.latency_rate or 0.5 * max_rate
            n_lat = max(200, int(rate * cfg.latency_seconds))
            _log(f"latency: {n_lat} events at {rate:.0f}/s per run ...")
            lat_items = event_stream(products, n_lat, cfg.product_share, cfg.seed + 1)
            lat_runs = []
            for i in range(cfg.runs):
                lat_runs.append(sb.latency_run(i, rate, lat_items))
                e = lat_runs[-1]["emit_ms"]
                _log(f"  latency run {i + 1}: p50 {e['p50']} p99 {e['p99']} p99.9 {e['p99.9']} ms (n={e['n']})")
            _log(f"latency: the Faust ceiling paced at {rate:.0f}/s (what consuming alone costs at this rate) ...")
            fc_paced = sb.latency_run(0, rate, lat_items, ceiling=True)
            for key in ("emit_ms", "published_ms", "received_ms", "emit_ms_by_reason", "matched_updates", "gc"):
                fc_paced.pop(key, None)
            _log(f"  Faust ceiling at {rate:.0f}/s: {fc_paced['cores_busy'].get('worker')} cores busy")
            load_runs = []
            for j, fraction in enumerate(cfg.latency_fractions):
                load_rate = fraction * max_rate
                _log(f"latency against load: {fraction:g} × the maximum, {load_rate:.0f}/s ...")
                items = event_stream(products, max(200, int(load_rate * cfg.latency_seconds)), cfg.product_share,
                                     cfg.seed + 2 + j)  # fmt: skip
                load_runs.append(sb.latency_run(len(lat_runs) + j, load_rate, items))
                e = load_runs[-1]["emit_ms"]
                _log(f"  at {load_rate:.0f}/s: p50 {e['p50']} p99 {e['p99']} p99.9 {e['p99.9']} ms (n={e['n']})")
            result["latency"] = {
                "rate": round(rate, 1),
                "fraction_of_max": round(rate / max_rate, 3),
                "emit_ms": {q: spread(r["emit_ms"][q] for r in lat_runs) for q in ("p50", "p99", "p99.9", "max")},
                "published_ms": {q: spread(r["published_ms"][q] for r in lat_runs) for q in ("p50", "p99", "p99.9")},
                "received_ms": {q: spread(r["received_ms"][q] for r in lat_runs) for q in ("p50", "p99", "p99.9")},
                "runs": lat_runs,
                "faust_ceiling": fc_paced,
                "by_load": sorted(
                    [_load_point(max_rate, rate, lat_runs)]
                    + [_load_point(max_rate, r["target_rate"], [r]) for r in load_runs],
                    key=lambda point: point["rate"],
                ),
            }
            all_runs = ts_runs + lat_runs + load_runs
            result["memory"] = {
                "worker_peak_rss_mb": spread(r["peak_rss_mb"] for r in all_runs),
                "worker_peak_rss_mb_max": max(r["peak_rss_mb"] for r in all_runs),
                "tensorflow_loaded_in_worker": any(r["tensorflow_libs"] for r in all_runs),
                "tensorflow_libs_found": sorted({lib for r in all_runs for lib in r["tensorflow_libs"]}),
                "method": "VmHWM of /proc/<pid>/status and psutil RSS every 0.2 s; /proc/<pid>/maps scanned for "
                "TensorFlow shared objects before the worker is stopped",
                "checked_processes": len(all_runs),
            }
        if want("naive"):
            nv_runs = []
            for i in range(cfg.runs):
                _log(f"naive run {i + 1}/{cfg.runs} ...")
                nv_runs.append(sb.naive_run(i))
                _log(f"  naive: {nv_runs[-1]['events_per_s_at_mix']} events/s at the bench mix")
            result["naive"] = {
                "events_per_s_at_mix": spread(r.get("events_per_s_at_mix") for r in nv_runs),
                "events_per_s_raw": spread(r.get("events_per_s") for r in nv_runs),
                "product_event_us": spread(r["by_topic"]["products"]["mean_us"] for r in nv_runs),
                "behaviour_event_us": spread(r["by_topic"]["behavior"]["mean_us"] for r in nv_runs),
                "runs": nv_runs,
            }
            if result.get("tagstream", {}).get("events_per_s", {}).get("median"):
                naive_rate = result["naive"]["events_per_s_at_mix"]["median"]
                result["naive"]["tagstream_speedup"] = (
                    result["tagstream"]["events_per_s"]["median"] / naive_rate if naive_rate else None
                )
    finally:
        if not args.keep_topics:
            sb.cleanup()

    if want("scoring"):
        _log("scoring: ONNX Runtime vs Keras ...")
        cmd = [
            sys.executable, "-m", "bench.scoring", "--bundle", model["bundle"], "--keras", model["keras"],
            "--runs", str(cfg.runs), "--min-seconds", str(cfg.scoring_min_seconds),
        ]  # fmt: skip
        if cfg.synthetic:
            cmd.append("--synthetic")
        result["scoring"] = _subprocess_json(cmd, out / "logs" / "scoring.log", timeout=900)
    if want("featurizer"):
        _log("featurizer ...")
        result["featurizer"] = featurizer_cost(
            Path(model["bundle"]), runs=cfg.runs, min_seconds=cfg.featurizer_min_seconds, data_dir=data_dir
        )

    result["load_at_end"] = machine_load()
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    result["targets"] = report.evaluate_targets(result, TARGETS)
    write_json(out / "bench.json", result)
    md = report.markdown(result)
    (out / "bench.md").write_text(md)
    sys.stdout.write(md + "\n")
    _log(f"wrote {out / 'bench.json'} and {out / 'bench.md'} in {result['elapsed_s']:.0f} s")
    return 0


def _load_point(max_rate: float, rate: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of latency against load: the paced rate, its fraction of the maximum, the median over `runs` of the
    emit latency quantiles, of the worker's cores busy and of its records' p50 ages at fetch and at batch start per
    input topic (where the latency was spent), and whether the medians meet both latency TARGETS."""
    from bench.common import spread

    def age_p50(at: str, topic: str) -> float | None:
        return spread(((r.get(at) or {}).get(topic) or {}).get("p50") for r in runs)["median"]

    emit = {q: spread(r["emit_ms"][q] for r in runs)["median"] for q in ("p50", "p99", "p99.9")}
    topics = sorted({t for r in runs for t in (r.get("arrival") or {})})
    return {
        "rate": round(rate, 1),
        "fraction_of_max": round(rate / max_rate, 3),
        "runs": len(runs),
        "emit_ms": emit,
        "meets_latency_targets": None
        if emit["p50"] is None or emit["p99"] is None
        else emit["p50"] <= TARGETS["latency_p50_ms"][1] and emit["p99"] <= TARGETS["latency_p99_ms"][1],
        "matched_updates": sum(r["matched_updates"] for r in runs),
        "worker_cores_busy": spread((r.get("cores_busy") or {}).get("worker") for r in runs)["median"],
        "record_age_p50_ms": {
            t: {"at_fetch": age_p50("arrival_fetch", t), "at_batch_start": age_p50("arrival", t)} for t in topics
        },
    }


def _fmt_rate(run: dict[str, Any]) -> str:
    r = run.get("events_per_s")
    return f"{r:,.0f} events/s over {run.get('seconds', 0) or 0:.1f} s" if r else "no rate (did not finish)"


def _fractions(text: str) -> tuple[float, ...]:
    """`--latency-fractions`: comma-separated fractions of the maximum rate, each in (0, 1]."""
    try:
        fractions = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if any(not 0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"fractions of the maximum rate must be in (0, 1]: {text!r}")
    return fractions


SECTIONS = ("stream", "naive", "scoring", "featurizer")  # what `--only` can name


def _sections(text: str) -> frozenset[str]:
    """`--only`: comma-separated names out of SECTIONS (at least one)."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(SECTIONS))
    if unknown or not names:
        plural = "s" if len(unknown) > 1 else ""
        what = f"unknown section{plural} {', '.join(map(repr, unknown))}" if unknown else "no section named"
        raise argparse.ArgumentTypeError(f"{what}; the sections are {','.join(SECTIONS)}")
    return frozenset(names)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench`."""
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: throughput vs raw Kafka, latency, naive Keras loop, ONNX vs Keras, memory, featurizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", help="directory for bench.json, bench.md, logs and the model cache (default runs/bench-*)")
    p.add_argument(
        "--smoke", action="store_true", help="CI variant: tiny sizes, one run, generated catalog (~1.5 min on 2 cores)"
    )
    p.add_argument(
        "--runs", type=int_at_least(1), help="runs of each measurement (default 3; median and spread reported)"
    )
    p.add_argument(
        "--cache", help="model cache directory (default OUT/model-cache; OUT/model-cache-smoke with --smoke)"
    )
    p.add_argument("--backlog", type=int, help="events pre-loaded for the throughput runs (default 300000)")
    p.add_argument("--window", type=float, help="longest throughput run after its first commit, s (default 30)")
    p.add_argument("--latency-seconds", type=float, help="paced phase of each latency run (default 20)")
    p.add_argument(
        "--latency-rate", type=float, help="paced rate of the latency runs, events/s (default: half the maximum)"
    )
    p.add_argument(
        "--latency-fractions",
        type=_fractions,
        help="further load points as fractions of the maximum, one latency run each (default 0.1,0.25; '' for none)",
    )
    p.add_argument("--naive-seconds", type=float, help="duration of each naive run (default 12)")
    p.add_argument("--products", type=int, help="catalog size (default 6000)")
    p.add_argument("--product-share", type=float, help="share of product upserts in the mix (default 0.05)")
    p.add_argument("--partitions", type=int, help="partitions of the product topics (default 4)")
    p.add_argument("--synthetic", action="store_true", help="generated catalog even when ../shared/data exists")
    p.add_argument("--only", type=_sections, help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="bench model training setting")
    p.add_argument("--keep-topics", action="store_true", help="do not delete the bench topics at the end")
    p.add_argument(
        "--profile-worker",
        action="store_true",
        help="run the throughput workers under pyinstrument (pip install pyinstrument); reports in OUT/logs",
    )
    p.set_defaults(func=run_bench)
