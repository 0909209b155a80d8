"""Where a worker's time goes: the processor alone (no Kafka) on the bench mix, profiled with pyinstrument.

    python -m bench.profile_worker --bundle DIR [--events 40000] [--batch 512] [--out DIR]

Builds the bench mix, cuts it into per-topic micro-batches of `--batch` messages (what the agents hand the processor
under a backlog), and runs `Processor.process_products` / `process_behaviour` on the real local Redis with the
worker's ONNX model, exactly as the worker calls them but without Faust and Kafka. Prints the processor-only
events/s and writes pyinstrument's text and HTML profiles (`pip install pyinstrument`; a cProfile table otherwise).
Comparing that rate with the end-to-end one tells how much of the worker's time is Kafka/Faust versus its own work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import BENCH_USER_HASH_KEY, SHARED_DATA, clear_redis, event_stream, load_products
from streams.settings import WorkerSettings


def batches_of(items: list[Any], prefix: str, batch: int, partitions: int) -> list[tuple[str, list[Any]]]:
    """Per-topic micro-batches of InMessage, in stream order (partition = key hash, offsets increasing)."""
    import zlib

    from streams.processor import InMessage

    offsets: dict[tuple[str, int], int] = {}
    pending: dict[str, list[Any]] = {"products": [], "behavior": []}
    out: list[tuple[str, list[Any]]] = []
    ts = time.time_ns() // 1_000_000
    for topic, key, value in items:
        part = zlib.crc32(key) % partitions
        off = offsets.get((topic, part), 0)
        offsets[(topic, part)] = off + 1
        pending[topic].append(InMessage(f"{prefix}{topic}", part, off, key, value, ts))
        if len(pending[topic]) >= batch:
            out.append((topic, pending[topic]))
            pending[topic] = []
    out += [(t, msgs) for t, msgs in pending.items() if msgs]
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Process the batches (profiled); return the rates."""
    from serving.bundle import load_bundle
    from serving.scorer import OnnxScorer
    from streams.model import BundleModel
    from streams.processor import Processor
    from streams.state import RedisStateStore

    bundle = load_bundle(args.bundle)
    scorer = OnnxScorer(intra_op_num_threads=1, inter_op_num_threads=1)
    scorer.load(bundle)
    model = BundleModel(bundle, scorer)
    products, _ = load_products(args.products, 7, None if args.synthetic else SHARED_DATA)
    items = event_stream(products, args.events, args.product_share, 7)
    redis_prefix = f"bench-prof-{uuid.uuid4().hex[:6]}"
    batches = batches_of(items, "bench-prof-", args.batch, 4)
    store = RedisStateStore.from_url(args.redis_url, redis_prefix, behaviour_ttl_ms=int(args.behaviour_ttl_s * 1000))
    await store.check_format()
    processor = Processor(
        store,
        user_hash_key=BENCH_USER_HASH_KEY.encode(),
        model_provider=lambda: model,
        behaviour_lanes=args.lanes,
        lane_min_events=args.lane_min_events,
        state_cache=args.state_cache,
    )
    spent: dict[str, float] = {"products": 0.0, "behavior": 0.0}
    counts: dict[str, int] = {"products": 0, "behavior": 0}
    profiler: Any = None
    if args.no_profile:
        profiler = _NoProfiler()
    else:
        try:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005, async_mode="disabled")
        except ImportError:
            import cProfile

            profiler = cProfile.Profile()
    t_all = time.perf_counter()
    cpu_all = time.process_time()
    profiler.start() if hasattr(profiler, "start") else profiler.enable()
    try:
        for topic, msgs in batches:
            t0 = time.perf_counter()
            if topic == "products":
                await processor.process_products(msgs)
            else:
                await processor.process_behaviour(msgs)
            spent[topic] += time.perf_counter() - t0
            counts[topic] += len(msgs)
    finally:
        profiler.stop() if hasattr(profiler, "stop") else profiler.disable()
        await store.close()
        clear_redis(args.redis_url, redis_prefix)
    total_s = time.perf_counter() - t_all
    cpu_s = time.process_time() - cpu_all
    cache = processor.cache
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.no_profile:
        pass
    elif hasattr(profiler, "output_text"):
        (out / "profile.txt").write_text(profiler.output_text(unicode=True, color=False, show_all=False))
        (out / "profile.html").write_text(profiler.output_html())
    else:
        import pstats

        with (out / "profile.txt").open("w") as fh:
            pstats.Stats(profiler, stream=fh).sort_stats("cumulative").print_stats(60)
            pstats.Stats(profiler, stream=fh).sort_stats("tottime").print_stats(40)
    return {
        "events": sum(counts.values()),
        "seconds": round(total_s, 3),
        "events_per_s": sum(counts.values()) / total_s,
        # this process's CPU (all threads, ONNX included; not Redis's): steadier than wall time on a busy machine
        "cpu_us_per_event": round(cpu_s / max(sum(counts.values()), 1) * 1e6, 1),
        "by_topic": {
            t: {"n": counts[t], "us_per_event": round(spent[t] / counts[t] * 1e6, 1) if counts[t] else None}
            for t in counts
        },
        "batch": args.batch,
        "state_cache": None if cache is None else {"size": cache.size, **kept_states(cache)},
        "conflicts": processor.conflicts,  # batches processed again: another writer, or counters that expired
        "profile": None if args.no_profile else str(out / "profile.txt"),
        "note": "no profiler" if args.no_profile else "profiler overhead included",
    }


def deep_size(root: object) -> int:
    """The bytes of every object reachable from `root` through dicts, lists, tuples, sets and slots, each once
    (a deep copy measured with tracemalloc missed the strings, which a copy shares: 3 KB per state instead of 7.5)."""
    seen: set[int] = set()
    total, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set)):
            stack += list(obj)
        elif hasattr(obj, "__slots__"):
            stack += [getattr(obj, name) for name in obj.__slots__ if hasattr(obj, name)]
    return total


def kept_states(cache: Any) -> dict[str, Any]:
    """How many states the cache holds, its hit rate, and the memory they take (every object they reach)."""
    states = list(cache._states.values())
    size = deep_size(states)
    looked = cache.hits + cache.misses
    return {
        "kept": len(states),
        "hit_rate": round(cache.hits / looked, 3) if looked else None,
        "bytes_per_state": round(size / len(states)) if states else None,
        "mb_at_size": round(size / len(states) * cache.size / 2**20, 1) if states else None,
    }


class _NoProfiler:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", required=True)
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--products", type=int, default=6000)
    p.add_argument("--product-share", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--out", default="runs/profile")
    p.add_argument("--no-profile", action="store_true", help="only the processor-alone rate, no profiler")
    p.add_argument("--lanes", type=int, default=2, help="concurrent lanes of partitions per behaviour batch")
    p.add_argument("--lane-min-events", type=int, default=128, help="events per behaviour lane at least")
    p.add_argument("--state-cache", type=int, default=10_000, help="product states kept between batches (0 = none)")
    p.add_argument(
        "--behaviour-ttl-s",
        type=int,
        default=WorkerSettings().behaviour_ttl_s,
        help="time to live of the behaviour keys (s; 0 = none), as TAGSTREAM_BEHAVIOUR_TTL_S",
    )
    args = p.parse_args(argv)
    sys.stdout.write("RESULT " + json.dumps(asyncio.run(run(args))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
