"""The naive implementation of the same logic, for contrast: one event at a time, Keras `model(x)` per product.

    python -m bench.naive --bootstrap H:P --prefix P --group G --redis-url URL --redis-prefix R --bundle DIR
                          --keras FILE --product-share 0.05 [--max-events N] [--max-seconds S]

What a straightforward Python consumer would do: one message at a time, and per message: decode, read the
product's state from Redis, compute its effect, write it (offset-fenced Lua), update the partition watermark and the
active-window index (tagstream's own `Processor`, called with a batch of one, so each step is its own round trip),
score an upsert with the Keras model in eager mode (`model(x, training=False)` on one row), and send each tag update
waiting for its acknowledgement (`send_and_wait`). Offsets are auto-committed. It imports TensorFlow (it is a
separate process; the worker never does).

It runs for `--max-seconds` on the bench backlog, taking the next message from the products or the behavior topic
as the bench mix says (`--product-share`), and prints one JSON line with the rate it reached and its per-event cost
per topic (`events_per_s_at_mix` recomputes the rate from those costs at exactly the bench mix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import numpy as np

from bench.common import BENCH_USER_HASH_KEY, make_producer


class KerasModel:
    """The bundle's featurizer and tag decoding around the Keras scoring model (what the processor calls)."""

    def __init__(self, bundle: Any, keras_model: Any) -> None:
        from serving.decoding import TagDecoder

        self.version = bundle.model_version
        self.featurizer = bundle.featurizer
        self.decoder = TagDecoder.from_bundle(bundle)
        self.model = keras_model

    def score(self, products: Any) -> Any:
        """Featurize and score with Keras `model(x)`, then decode."""
        x = self.featurizer.transform(products)
        scores = np.asarray(self.model(x.as_inputs(), training=False), dtype=np.float32)
        return self.decoder.decode(scores)


def load_keras(path: str, threads: int) -> Any:
    """The saved Keras scoring model (TensorFlow pinned to `threads` threads)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.train import configure_tensorflow

    configure_tensorflow(threads)
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import training.model  # noqa: F401 - registers the custom layers

    return keras.models.load_model(path, compile=False)


async def naive(args: argparse.Namespace) -> dict[str, Any]:
    """Run the per-event loop; return its figures."""
    from aiokafka import AIOKafkaConsumer

    from serving.bundle import load_bundle
    from streams.processor import InMessage, Processor
    from streams.state import RedisStateStore

    t_load = time.perf_counter()
    model = KerasModel(load_bundle(args.bundle), load_keras(args.keras, args.threads))
    model.score([{"title": "warm up 预热", "description": None, "brand": None, "price": None}])
    load_s = time.perf_counter() - t_load
    store = RedisStateStore.from_url(args.redis_url, args.redis_prefix)
    await store.check_format()
    processor = Processor(store, user_hash_key=BENCH_USER_HASH_KEY.encode(), model_provider=lambda: model)
    products_topic, behaviour_topic = f"{args.prefix}products", f"{args.prefix}behavior"
    consumer = AIOKafkaConsumer(
        products_topic,
        behaviour_topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest",
        enable_auto_commit=True,
    )
    producer = make_producer(args.bootstrap, linger_ms=0)
    await producer.start()
    await consumer.start()
    cost: dict[str, list[float]] = {products_topic: [], behaviour_topic: []}
    updates = 0
    t_first = t_last = None
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100, max_records=1)  # joins the group (nothing is processed yet)
            await asyncio.sleep(0)
        # whatever the join fetched is dropped: start every partition from the group's position
        for tp in consumer.assignment():
            consumer.seek(tp, (await consumer.committed(tp)) or 0)
        parts = {t: [tp for tp in consumer.assignment() if tp.topic == t] for t in cost}
        deadline = None
        n = 0
        while True:
            # one message at a time, from the topic the bench mix says is next (products every 1/share events)
            want = products_topic if len(cost[products_topic]) < args.product_share * (n + 1) else behaviour_topic
            batch = await consumer.getmany(*parts[want], timeout_ms=1000, max_records=1)
            msgs = [r for records in batch.values() for r in records]
            if not msgs:
                break  # that topic is exhausted
            msg = msgs[0]
            now = time.monotonic()
            if t_first is None:
                t_first = now
                deadline = now + args.max_seconds
            t0 = time.perf_counter()
            m = InMessage(msg.topic, msg.partition, msg.offset, msg.key, msg.value, msg.timestamp)
            if msg.topic == products_topic:
                out = await processor.process_products([m])
            else:
                out = await processor.process_behaviour([m])
            for key, value in out.updates:
                await producer.send_and_wait(f"{args.prefix}tag-updates", value, key=key)
            updates += len(out.updates)
            cost[msg.topic].append(time.perf_counter() - t0)
            n += 1
            t_last = time.monotonic()
            if n >= args.max_events or t_last >= deadline:
                break
    finally:
        await consumer.stop()
        await producer.stop()
        await store.close()
    n = sum(len(c) for c in cost.values())
    elapsed = (t_last - t_first) if t_first is not None and t_last is not None else None
    mean = {t: float(np.mean(c)) if c else None for t, c in cost.items()}
    overhead = (elapsed - sum(sum(c) for c in cost.values())) / n if elapsed and n else 0.0
    at_mix = None
    if mean[products_topic] is not None and mean[behaviour_topic] is not None:
        share = args.product_share
        per_event = share * mean[products_topic] + (1 - share) * mean[behaviour_topic] + max(overhead, 0.0)
        at_mix = 1.0 / per_event
    return {
        "events": n,
        "updates": updates,
        "seconds": elapsed,
        "events_per_s": n / elapsed if elapsed else None,
        "events_per_s_at_mix": at_mix,
        "by_topic": {
            "products": {"n": len(cost[products_topic]), "mean_us": _us(mean[products_topic])},
            "behavior": {"n": len(cost[behaviour_topic]), "mean_us": _us(mean[behaviour_topic])},
        },
        "loop_overhead_us": _us(overhead),
        "model_load_s": round(load_s, 2),
        "tf_threads": args.threads,
    }


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--redis-prefix", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--keras", required=True)
    p.add_argument("--product-share", type=float, default=0.05)
    p.add_argument("--max-events", type=int, default=1_000_000)
    p.add_argument("--max-seconds", type=float, default=15.0)
    p.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads (ONNX Runtime uses 1)")
    args = p.parse_args(argv)
    result = asyncio.run(naive(args))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
