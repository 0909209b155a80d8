"""Shared pieces of the benchmarks: the event mix, machine facts, statistics, Kafka helpers, worker processes.

No TensorFlow here: the orchestrator and the worker-side measurements import this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tagstream.synth import product_change_event

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
JD_FILE = "cn-products-jd/products.csv"
MYNTRA_FILE = "fashion-myntra-styles/styles.csv.zip"
START_MS = 1_764_316_800_000  # event time of the first generated behaviour event
BENCH_USER_HASH_KEY = "tagstream-bench-key"


# --------------------------------------------------------------------------------------------------- catalog + events


def load_products(n: int, seed: int, data_dir: Path | None = SHARED_DATA) -> tuple[list[Any], str]:
    """`n` products: half Chinese (JD) and half English (Myntra) real titles when the data exists, else synthetic
    bilingual ones (tagstream.synth). Returns (products, description)."""
    if data_dir is not None and (data_dir / JD_FILE).is_file() and (data_dir / MYNTRA_FILE).is_file():
        from training.loaders import load_catalog

        rng = np.random.default_rng(seed)
        jd = load_catalog(data_dir / JD_FILE, "cn-jd").products
        my = load_catalog(data_dir / MYNTRA_FILE, "myntra").products
        n_jd = min(len(jd), n // 2)
        n_my = min(len(my), n - n_jd)
        picked = [jd[int(i)] for i in rng.choice(len(jd), n_jd, replace=False)]
        picked += [my[int(i)] for i in rng.choice(len(my), n_my, replace=False)]
        order = rng.permutation(len(picked))
        desc = f"real titles: {n_jd} JD (Chinese) + {n_my} Myntra (English) from {data_dir}"
        return [picked[int(i)] for i in order], desc
    from tagstream.synth import generate_catalog

    return generate_catalog(n, seed=seed), f"synthetic bilingual catalog (tagstream.synth), {n} products"


def is_chinese(title: str) -> bool:
    """True when a title holds CJK characters."""
    return any("\u4e00" <= ch <= "\u9fff" for ch in title)


def product_event(p: Any, version: int, product_id: str | None = None, updated_at: int = START_MS) -> bytes:
    """A product-change upsert (schema v1) of catalog product `p`, encoded."""
    return orjson.dumps(product_change_event(p, version, product_id, updated_at))


Item = tuple[str, bytes, bytes]  # (logical topic, key, value)


def behaviour_values(products: Sequence[Any], n: int, seed: int, start_ms: int = START_MS) -> list[tuple[bytes, bytes]]:
    """`n` click events (Zipf popularity, sessions, view ≫ click > cart > purchase) as (key, value).

    tagstream.synth.generate_behaviour is called on chunks of ≤ 25,000 events (it is O(n) Python per event);
    chunks are laid end to end in event time, with a different seed each.
    """
    from tagstream.synth import generate_behaviour

    out: list[tuple[bytes, bytes]] = []
    chunk, k, t0 = 25_000, 0, start_ms
    while len(out) < n:
        m = min(chunk, n - len(out))
        evs = generate_behaviour(products, m, t0, seed=seed + k, duration_ms=3_600_000)
        out += [(e["product_id"].encode(), orjson.dumps(e)) for e in evs]
        t0 += 3_600_000
        k += 1
    return out[:n]


def event_stream(
    products: Sequence[Any], n_events: int, product_share: float, seed: int, *, id_suffix: str = ""
) -> list[Item]:
    """The bench mix: `n_events` events, a `product_share` of them product upserts spread evenly between behaviour
    events. Upserts walk the catalog; a product's later passes get a new id (`<id>~<pass>`) so that every upsert is
    a first sight of its product (it is scored and always emits a tag update). `id_suffix` makes every product id of
    the stream unique to one run."""
    n_prod = round(n_events * product_share)
    n_beh = n_events - n_prod
    beh = behaviour_values(products, n_beh, seed)
    prods = []
    for i in range(n_prod):
        p = products[i % len(products)]
        k = i // len(products)
        pid = f"{p.product_id}{id_suffix}" + (f"~{k}" if k else "")
        prods.append((pid.encode(), product_event(p, 1, pid)))
    items: list[Item] = []
    bi = 0
    for i, (key, value) in enumerate(prods):
        upto = round((i + 1) * n_beh / max(n_prod, 1))
        items += [("behavior", k, v) for k, v in beh[bi:upto]]
        bi = upto
        items.append(("products", key, value))
    items += [("behavior", k, v) for k, v in beh[bi:]]
    return items


def stream_facts(items: Sequence[Item]) -> dict[str, Any]:
    """Counts and message sizes of a stream."""
    by_topic: dict[str, list[int]] = {}
    for topic, _, value in items:
        by_topic.setdefault(topic, []).append(len(value))
    return {
        "events": len(items),
        "by_topic": {t: {"n": len(s), "mean_bytes": round(float(np.mean(s)), 1)} for t, s in by_topic.items()},
        "product_share": round(len(by_topic.get("products", [])) / max(len(items), 1), 4),
    }


# --------------------------------------------------------------------------------------------------- facts + stats


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and the versions of the libraries measured."""
    import psutil

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in (
        "faust-streaming",
        "aiokafka",
        "redis",
        "hiredis",
        "uvloop",
        "onnxruntime",
        "numpy",
        "tensorflow",
        "keras",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
    }


def machine_load(sample_s: float = 1.0) -> dict[str, Any]:
    """Load average and the processes outside this bench using ≥ 20% of a core right now (a shared machine skews
    absolute figures; the report shows what else was running)."""
    import psutil

    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in mine]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(sample_s)
    busy = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            pct = p.cpu_percent(None)
            if pct >= 20:
                argv = p.info.get("cmdline") or []
                what = p.info.get("name") or "?"
                if len(argv) > 1:  # the program and its script's base name (or `-m module`), no more
                    what += " " + (f"-m {argv[2]}" if argv[1] == "-m" and len(argv) > 2 else Path(argv[1]).name)
                busy.append({"pid": p.pid, "cpu_percent": round(pct), "cmd": what[:60]})
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_processes": busy}


def spread(values: Iterable[float | None]) -> dict[str, Any]:
    """Median, min, max and every run's value (None values dropped)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {
        "median": float(np.median(vals)),
        "min": float(min(vals)),
        "max": float(max(vals)),
        "runs": [round(v, 4) for v in vals],
    }


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99, 99.9)) -> dict[str, Any]:
    """`p50`, `p99`, `p99.9`, `max`, `n` of a sample (None when empty)."""
    if not len(values):
        return {**{f"p{q:g}": None for q in qs}, "max": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        **{f"p{q:g}": float(np.percentile(arr, q)) for q in qs},
        "max": float(arr.max()),
        "n": len(arr),
    }


def timed_repeat(fn: Any, min_seconds: float, min_calls: int = 3, max_calls: int = 100_000) -> float:
    """Seconds per call of `fn()`: calls it until `min_seconds` passed (at least `min_calls` times)."""
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if (el >= min_seconds and n >= min_calls) or n >= max_calls:
            return el / n


# --------------------------------------------------------------------------------------------------- Kafka helpers


def topic_names(prefix: str, names: Sequence[str] = ("products", "behavior")) -> list[str]:
    """Full names of logical topics under a prefix."""
    return [f"{prefix}{n}" for n in names]


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Create topics (each with `partitions` partitions) that do not exist yet."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="tagstream-bench")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()


async def delete_topics_with_prefix(bootstrap: str, prefix: str) -> list[str]:
    """Delete every topic whose name starts with `prefix` (the bench's own, never anything else)."""
    from aiokafka.admin import AIOKafkaAdminClient

    if not prefix.startswith("bench-"):
        raise ValueError(f"refusing to delete topics of prefix {prefix!r}")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="tagstream-bench")
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            with contextlib.suppress(Exception):
                await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


def make_producer(bootstrap: str, **kw: Any) -> Any:
    """The producer every bench side uses: acks=all, idempotent (what the worker and `tagstream replay` use)."""
    from aiokafka import AIOKafkaProducer

    opts = {"acks": "all", "enable_idempotence": True, "linger_ms": 5, "max_batch_size": 256 * 1024}
    opts.update(kw)
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)


async def produce_backlog(bootstrap: str, prefix: str, items: Sequence[Item]) -> float:
    """Send a whole stream as fast as possible (keyed, so a product stays on one partition); returns seconds."""
    producer = make_producer(bootstrap, linger_ms=20)
    await producer.start()
    t0 = time.perf_counter()
    try:
        pending = []
        for topic, key, value in items:
            pending.append(await producer.send(f"{prefix}{topic}", value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


async def end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[Any, int]:
    """End offset of every partition of `topics`."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        if not parts:
            await consumer._client.force_metadata_update()
            parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


@dataclass
class CommitTrace:
    """Committed offsets of one consumer group over time, until it committed everything."""

    total: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic s, committed messages)
    done_at: float | None = None
    windowed: bool = False  # stopped after a time window, before the whole backlog was committed

    def rate(self) -> dict[str, Any]:
        """Events/s from the first commit to the last (catch-up): (total − first committed) / elapsed."""
        first = next(((t, c) for t, c in self.samples if c > 0), None)
        if first is None or self.done_at is None:
            return {"events_per_s": None, "seconds": None, "events": 0}
        t_first, c_first = first
        elapsed = self.done_at - t_first
        events = self.total - c_first
        if events <= 0 or elapsed <= 0:  # everything committed at once: the backlog is too small to time this way
            return {"events_per_s": None, "seconds": None, "events": 0, "first_commit_covered": c_first}
        return {
            "events_per_s": events / elapsed if elapsed > 0 else None,
            "seconds": elapsed,
            "events": events,
            "first_commit_covered": c_first,
            "windowed": self.windowed,
        }


async def watch_commits(
    bootstrap: str,
    group: str,
    ends: dict[Any, int],
    *,
    timeout: float,
    interval: float = 0.1,
    alive: Any = None,
    window: float | None = None,
) -> CommitTrace:
    """Poll `group`'s committed offsets every `interval` s until it committed up to `ends`, or `window` s passed
    since its first commit (the rate is then taken over that window of steady state), or `timeout`."""
    from aiokafka.admin import AIOKafkaAdminClient

    trace = CommitTrace(total=sum(ends.values()))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="tagstream-bench-watch")
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            committed = await admin.list_consumer_group_offsets(group)
            now = time.monotonic()
            total = sum(min(committed[tp].offset, end) if tp in committed else 0 for tp, end in ends.items())
            trace.samples.append((now, total))
            if total >= trace.total:
                trace.done_at = now
                break
            first = next((t for t, c in trace.samples if c > 0), None)
            if window is not None and first is not None and now - first >= window:
                trace.done_at = now
                trace.total = total  # rate over the window: events committed from the first sample to this one
                trace.windowed = True
                break
            if alive is not None and not alive():
                break
            await asyncio.sleep(interval)
    finally:
        await admin.close()
    return trace


# --------------------------------------------------------------------------------------------------- processes


def tensorflow_mapped(pid: int) -> list[str]:
    """Shared objects of TensorFlow mapped into process `pid` (empty = TensorFlow is not loaded)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    found = {
        line.split()[-1]
        for line in maps.splitlines()
        if "tensorflow" in line.rsplit("/", 1)[-1].lower() or "/tensorflow/" in line
    }
    return sorted(found)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the kernel's peak resident set) of a live process, MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_between(samples: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """CPU seconds between two monotonic times, from (time, cumulative CPU seconds) samples: the last sample at or
    before `start` to the first at or after `end` (None without samples around both)."""
    before = [cpu for t, cpu in samples if t <= start]
    after = [cpu for t, cpu in samples if t >= end]
    if not before or not after:
        return None
    return after[0] - before[-1]


class CpuWatch:
    """Samples the cumulative CPU time of the local stack's Kafka broker and Redis server every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self.procs: dict[str, Any] = {}
        for proc in psutil.process_iter(["cmdline", "name"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if "kafka.Kafka" in cmd and "kafka" not in self.procs:
                self.procs["kafka"] = proc
            elif (proc.info.get("name") or "").startswith("redis-server") and "redis" not in self.procs:
                self.procs["redis"] = proc
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in self.procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                with contextlib.suppress(Exception):
                    cpu = proc.cpu_times()
                    self.samples[name].append((time.monotonic(), cpu.user + cpu.system))
            self._stop.wait(0.2)

    def between(self, start: float, end: float) -> dict[str, float | None]:
        """CPU seconds of each stack process between two monotonic times."""
        return {name: cpu_between(samples, start, end) for name, samples in self.samples.items()}

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(timeout=2)


class ProcessWatch:
    """A subprocess with a psutil RSS sampler (peak = max(VmHWM, sampled RSS)) and its log file."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        import psutil

        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            list(cmd), env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd
        )
        self._ps = psutil.Process(self.proc.pid)
        self.rss_samples_mb: list[float] = []
        self.cpu_samples: list[tuple[float, float]] = []  # (monotonic time, user + system CPU seconds so far)
        self.peak_mb = 0.0
        self.tf_libs: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        """Process id."""
        return self.proc.pid

    def _sample(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                rss = self._ps.memory_info().rss / 2**20
                self.rss_samples_mb.append(rss)
                self.peak_mb = max(self.peak_mb, rss)
                cpu = self._ps.cpu_times()
                self.cpu_samples.append((time.monotonic(), cpu.user + cpu.system))
            self._stop.wait(0.2)

    def cpu_between(self, start: float, end: float) -> float | None:
        """CPU seconds the process used between two monotonic times (to the nearest 0.2 s samples)."""
        return cpu_between(self.cpu_samples, start, end)

    def alive(self) -> bool:
        """Still running."""
        return self.proc.poll() is None

    def log(self) -> str:
        """The output so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> None:
        """Wait until the log holds `needle`; raise with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if not self.alive():
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{needle!r} not logged within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def snapshot(self) -> None:
        """Record the kernel's peak RSS and TensorFlow's mapped libraries while the process is alive."""
        hwm = peak_rss_mb(self.pid)
        if hwm is not None:
            self.peak_mb = max(self.peak_mb, hwm)
        self.tf_libs = tensorflow_mapped(self.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Snapshot, SIGTERM, then SIGKILL if it does not exit."""
        if self.alive():
            self.snapshot()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stop.set()
        self._thread.join(timeout=2)
        self._log.close()
        return self.proc.returncode


def worker_env(
    *, bootstrap: str, redis_url: str, topic_prefix: str, app_id: str, redis_prefix: str, model: Path, partitions: int
) -> dict[str, str]:
    """Environment of a `tagstream worker` subprocess on one private slice of the stack."""
    return {
        "TAGSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "TAGSTREAM_REDIS_URL": redis_url,
        "TAGSTREAM_TOPIC_PREFIX": topic_prefix,
        "TAGSTREAM_APP_ID": app_id,
        "TAGSTREAM_REDIS_PREFIX": redis_prefix,
        "TAGSTREAM_MODEL_PATH": str(model),
        "TAGSTREAM_MODEL_REGISTRY": str(model.parent),
        "TAGSTREAM_PARTITIONS": str(partitions),
        "TAGSTREAM_USER_HASH_KEY": BENCH_USER_HASH_KEY,
        "TAGSTREAM_DATA_DIR": str(Path(tempfile.gettempdir()) / "tagstream-bench-faust"),
        "PYTHONPATH": str(ROOT),
    }


def start_worker(env: dict[str, str], log_path: Path, profile: Path | None = None) -> ProcessWatch:
    """A real `tagstream worker` subprocess (exactly what `tagstream worker` runs); with `profile`, run under
    pyinstrument, which writes its text report there when the worker stops."""
    cmd = [sys.executable, "-m", "tagstream.cli", "worker", "--loglevel", "info"]
    if profile is not None:
        cmd[1:1] = ["-m", "pyinstrument", "-i", "0.001", "-r", "text", "--show-all", "-o", str(profile)]
    return ProcessWatch(cmd, env, log_path)


def clear_redis(url: str, prefix: str) -> int:
    """Delete the keys of one bench Redis prefix."""
    from tagstream.stack import delete_keys

    if not prefix.startswith("bench-"):
        raise ValueError(f"refusing to clear Redis prefix {prefix!r}")
    return delete_keys(url, prefix)


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON."""
    path.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
