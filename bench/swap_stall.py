"""Event-loop stall during model hot swaps under load; writes JSON and prints the figures.

    python bench/swap_stall.py [--out /tmp/tagstream-swap-stall.json] [--swaps 10] [--hash-bits 16] [--dim 64]

In one process and one event loop, as in a worker: a load task feeds micro-batches of product upserts through the
real `Processor` into the real Redis (a fresh key prefix, deleted afterwards), scoring with `ModelHolder.get()`;
meanwhile the holder handles `activate` requests alternating between two bundles (full validation: integrity,
session, canary, latency, ONNX checker — in its validation thread; the swap itself is one reference assignment on
the loop). A ticker task sleeps 1 ms at a time and records how late it wakes up: its worst lateness while a swap is
in progress is the stall a swap causes (target ≤ 20 ms); the same figure without swaps is the baseline (on a
machine whose cores are busy with other processes the baseline itself has OS-scheduling stalls: compare the two).

Checks: every event produces exactly one tag update (unique product ids), none is dead-lettered, no batch mixes
versions, every swap is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas import ModelUpdate, ProductChange  # noqa: E402
from serving.featurizer import Featurizer, FeaturizerConfig  # noqa: E402
from serving.validate import ValidationPolicy  # noqa: E402
from streams.model import ModelHolder  # noqa: E402
from streams.processor import InMessage, Processor  # noqa: E402
from streams.settings import WorkerSettings  # noqa: E402
from streams.state import RedisStateStore  # noqa: E402
from tests.tinymodel import make_bundle, make_model  # noqa: E402

TITLES = [
    "华为 Mate 60 Pro 5G手机 黑色 全网通 曲面屏",
    "Turtle Check Men Navy Blue Shirt slim fit cotton",
    "苹果 iPhone 15 128GB 蓝色 双卡双待",
    "Nike Women Red Running Shoes lightweight mesh",
    "小米 充电宝 20000mAh 快充 双向",
    "Levis Men Black Jeans 511 slim stretch denim",
]
TARGET_MS = 20.0


def build_bundles(root: Path, hash_bits: int, dim: int) -> tuple[Path, Path, Featurizer]:
    """Two bundles over one real featurizer with a (buckets × dim) embedding each."""
    products = [
        ProductChange("upsert", f"fit-{i}", 0, 0, title=t, brand="b", price=1.0 + i) for i, t in enumerate(TITLES * 4)
    ]
    fz = Featurizer.fit(products, FeaturizerConfig(hash_bits=hash_bits, max_features=64, min_df=1))
    L, K, B = fz.max_features, fz.n_numeric, fz.n_buckets
    paths = []
    for seed in (0, 1):
        model = make_model(L=L, K=K, buckets=B, dim=dim, seed=seed)
        paths.append(
            # the featurizer's own files: its spec names known.npy (known_only), which a spec alone would lack
            make_bundle(root / f"m{seed}", model=model, L=L, K=K, buckets=B, featurizer_files=fz.save, seed=seed)
        )
    return paths[0], paths[1], fz


def request(path: Path) -> ModelUpdate:
    """An activate request for the bundle at `path`."""
    sha = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    return ModelUpdate(
        kind="activate", model_version=path.name, emitted_at=time.time_ns() // 10**6, bundle_uri=str(path), sha256=sha
    )


class Ticker:
    """Sleeps `interval` at a time and records each wake-up's lateness (ms) with its time."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (woke at, lateness ms)
        self.running = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while self.running:
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.samples.append((now, (now - last - self.interval) * 1000.0))
            last = now

    def lateness(self, windows: list[tuple[float, float]] | None = None) -> np.ndarray:
        """Lateness of the wake-ups inside `windows` (all when None); a wake-up late into a window counts."""
        if windows is None:
            return np.array([x for _, x in self.samples])
        out = []
        for at, late in self.samples:
            began = at - late / 1000.0 - self.interval
            if any(began <= end and at >= start for start, end in windows):
                out.append(late)
        return np.array(out)


def summary(values: np.ndarray) -> dict[str, float | int]:
    """max / p99 / p50 / count of lateness figures (ms)."""
    if values.size == 0:
        return {"count": 0, "max_ms": 0.0, "p99_ms": 0.0, "p50_ms": 0.0, "over_target_share": 0.0}
    return {
        "count": int(values.size),
        "max_ms": round(float(values.max()), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "over_target_share": round(float((values > TARGET_MS).mean()), 4),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurement over two bundles in a temporary directory (deleted afterwards); returns the result."""
    tmp = Path(tempfile.mkdtemp(prefix="tagstream-swap-"))
    try:
        return await _bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    a, b, fz = build_bundles(tmp, args.hash_bits, args.dim)
    onnx_mb = (a / "model.onnx").stat().st_size / 2**20
    prefix = f"bench-swap-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(model_path=a, worker_id="bench", redis_prefix=prefix)
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tagstream-model")
    policy = ValidationPolicy(latency_budget_ms={1: 1000.0, 64: 1000.0}, latency_runs=args.latency_runs)
    holder = ModelHolder(settings, executor, policy=policy, isolated=not args.in_thread)
    await holder.start()
    warming = holder.warm_up()
    if warming is not None:
        await asyncio.wrap_future(warming)  # the validation process is up before measuring
    store = RedisStateStore.from_url(settings.redis_url.get_secret_value(), prefix)
    await store.check_format()
    processor = Processor(store, user_hash_key=b"bench", model_provider=holder.get)

    ticker = Ticker()
    stats: dict[str, Any] = {"events": 0, "updates": 0, "dead_letters": 0, "mixed_batches": 0, "errors": 0}
    versions_seen: set[str] = set()
    stop = asyncio.Event()

    async def load() -> None:
        offset = 0
        while not stop.is_set():
            msgs = []
            for _ in range(args.batch):
                ev = {
                    "schema_version": 1,
                    "op": "upsert",
                    "product_id": f"p{offset}",
                    "title": TITLES[offset % len(TITLES)] + f" {offset % 97}",
                    "updated_at": 1_764_316_800_000,
                    "version": 1,
                }
                msgs.append(InMessage("products", 0, offset, ev["product_id"].encode(), orjson.dumps(ev)))
                offset += 1
            try:
                out = await processor.process_products(msgs)
            except Exception:
                stats["errors"] += 1
                continue
            stats["events"] += len(msgs)
            stats["updates"] += len(out.updates)
            stats["dead_letters"] += len(out.dead_letters)
            versions = {orjson.loads(v)["model_version"] for _, v in out.updates}
            stats["mixed_batches"] += len(versions) > 1
            versions_seen.update(versions)
            if args.pause:
                await asyncio.sleep(args.pause)

    tick_task = asyncio.create_task(ticker.run())
    load_task = asyncio.create_task(load())
    await asyncio.sleep(args.warmup)
    base_start = asyncio.get_running_loop().time()
    await asyncio.sleep(args.baseline)
    base_end = asyncio.get_running_loop().time()

    windows: list[tuple[float, float]] = []
    swap_ms: list[float] = []
    accepted = 0
    for i in range(args.swaps):
        path = b if i % 2 == 0 else a
        t0 = asyncio.get_running_loop().time()
        outcome = await holder.handle(request(path))
        t1 = asyncio.get_running_loop().time()
        windows.append((t0, t1))
        swap_ms.append((t1 - t0) * 1000.0)
        accepted += outcome.answer is not None and outcome.answer.kind == "model-activated"
        await asyncio.sleep(args.gap)
    stop.set()
    await load_task
    ticker.running = False
    await tick_task

    keys = [k async for k in store.client.scan_iter(f"{prefix}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await store.client.delete(*keys[i : i + 500])
    await store.close()
    executor.shutdown()
    holder.close()

    during = ticker.lateness(windows)
    result = {
        "benchmark": "swap_stall",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "validation": "child process" if holder.isolated else "thread",
        "redis_prefix": prefix,
        "model": {"onnx_mb": round(onnx_mb, 2), "hash_bits": args.hash_bits, "dim": args.dim, "L": fz.max_features},
        "load": {"batch": args.batch, "events": stats["events"], "events_per_s": None},
        "swaps": {
            "requested": args.swaps,
            "accepted": accepted,
            "duration_ms": summary(np.array(swap_ms)),
        },
        "stall_during_swaps": summary(during),
        "stall_baseline": summary(np.array([x for at, x in ticker.samples if base_start <= at <= base_end])),
        "target_ms": TARGET_MS,
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "events": stats["events"],
        "updates": stats["updates"],
        "lost": stats["events"] - stats["updates"],
        "dead_letters": stats["dead_letters"],
        "failed_batches": stats["errors"],
        "mixed_version_batches": stats["mixed_batches"],
        "versions_seen": sorted(versions_seen),
    }
    total_s = ticker.samples[-1][0] - ticker.samples[0][0] if ticker.samples else 0
    result["load"]["events_per_s"] = round(stats["events"] / total_s, 1) if total_s else None
    result["ok"] = bool(
        result["stall_during_swaps"]["max_ms"] <= TARGET_MS
        and result["lost"] == 0
        and result["dead_letters"] == 0
        and result["failed_batches"] == 0
        and result["mixed_version_batches"] == 0
        and accepted == args.swaps
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/tagstream-swap-stall.json", help="JSON result file")
    parser.add_argument("--swaps", type=int, default=10, help="activate requests (alternating two bundles)")
    parser.add_argument("--hash-bits", type=int, default=16, help="featurizer buckets = 2**hash_bits (embedding rows)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width (model size = buckets × dim × 4 bytes)")
    parser.add_argument("--batch", type=int, default=64, help="events per micro-batch")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between batches (0: as fast as it goes)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds of load without swaps (baseline)")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between swaps")
    parser.add_argument("--in-thread", action="store_true", help="validate in a thread instead of a child process")
    parser.add_argument("--latency-runs", type=int, default=10, help="timed runs per batch size when validating")
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"\nworst loop stall during a swap: {result['stall_during_swaps']['max_ms']:.2f} ms "
        f"(p99 {result['stall_during_swaps']['p99_ms']:.2f}; baseline max {result['stall_baseline']['max_ms']:.2f}) "
        f"target ≤ {TARGET_MS:g} ms; events {result['events']}, lost {result['lost']}, "
        f"dead letters {result['dead_letters']}, failed batches {result['failed_batches']} → "
        f"{'OK' if result['ok'] else 'NOT OK'}; written to {args.out}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
