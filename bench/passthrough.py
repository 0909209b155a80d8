"""Transport ceiling: a raw aiokafka consumer → producer passthrough of the bench topics (no decoding, no state).

    python -m bench.passthrough --bootstrap HOST:PORT --prefix P --group G --total N [--max-seconds S]
                                [--loop {asyncio,uvloop}]

Consumes `<P>products` and `<P>behavior` in consumer group G from the earliest offset, sends every message's key and
value to `<P>passthrough-out` (same partition number; the producer the worker uses: acks=all, idempotent, linger
5 ms), waits for the batch's delivery and commits every 0.5 s (the worker's commit interval) and at the end. This is
what the tagstream worker does minus its work, so it bounds what a Python Kafka worker can do on this machine.
`--loop` picks the event loop (`tagstream bench` passes the worker's `TAGSTREAM_EVENT_LOOP`, so both run on the same).
Prints one JSON line: consumed, seconds from the first message to the last commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from bench.common import create_topics, make_producer
from streams.eventloop import EVENT_LOOPS, use_event_loop


async def passthrough(bootstrap: str, prefix: str, group: str, total: int, max_seconds: float) -> dict:
    """Run until `total` messages went through (or `max_seconds`)."""
    from aiokafka import AIOKafkaConsumer

    out_topic = f"{prefix}passthrough-out"
    await create_topics(bootstrap, [out_topic], partitions=4)
    consumer = AIOKafkaConsumer(
        f"{prefix}products",
        f"{prefix}behavior",
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = make_producer(bootstrap)
    await producer.start()
    await consumer.start()
    n_parts = len(await producer.partitions_for(out_topic))
    consumed = 0
    t_first = None
    last_commit = time.monotonic()
    deadline = time.monotonic() + max_seconds
    try:
        while consumed < total and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            pending = []
            for records in batches.values():
                for r in records:
                    pending.append(await producer.send(out_topic, r.value, key=r.key, partition=r.partition % n_parts))
            if not pending:
                continue
            if t_first is None:
                t_first = time.monotonic()
            await asyncio.gather(*pending)
            consumed += len(pending)
            if time.monotonic() - last_commit >= 0.5:
                await consumer.commit()
                last_commit = time.monotonic()
        await consumer.commit()
        t_last = time.monotonic()
    finally:
        await consumer.stop()
        await producer.stop()
    seconds = t_last - t_first if t_first is not None else None
    return {
        "consumed": consumed,
        "seconds": seconds,
        "events_per_s": consumed / seconds if seconds else None,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.add_argument("--loop", choices=EVENT_LOOPS, default="asyncio", help="event loop (default asyncio)")
    args = p.parse_args(argv)
    use_event_loop(args.loop)
    result = asyncio.run(passthrough(args.bootstrap, args.prefix, args.group, args.total, args.max_seconds))
    sys.stdout.write("RESULT " + json.dumps({**result, "event_loop": args.loop}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
