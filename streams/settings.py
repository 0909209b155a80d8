"""Settings of the worker service (env prefix `TAGSTREAM_`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.eventloop import EventLoop
from tagstream.settings import RedisUrl

DEV_USER_HASH_KEY = "tagstream-dev-key-change-me"
STATUS_EVERY_S = 5.0  # a running worker rewrites its status in Redis at least this often (streams.models_agent)
LIVE_WITHIN_S = 3 * STATUS_EVERY_S  # a worker whose status is older than this is not reporting (streams.model_cli)


class WorkerSettings(BaseSettings):
    """Everything a tagstream worker reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="TAGSTREAM_", extra="ignore")

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port].")
    redis_url: RedisUrl = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL: redis://, rediss:// or unix:// (may hold a password, hence secret).",
    )
    redis_prefix: str = Field("ts", min_length=1, description="Prefix of every Redis key (SPEC.md §3).")
    topic_prefix: str = Field("", description="Prefix of every topic name; tests use a fresh one per test.")
    partitions: int = Field(4, ge=1, description="Partitions of the products, behavior and tag-updates topics.")
    replication_factor: int = Field(
        -1,
        ge=-1,
        description="Replicas of each topic tagstream creates; -1: the cluster's `default.replication.factor` (1 on "
        "the local stack and under docker-compose; set it, or that default, to 3 on a production cluster).",
    )
    app_id: str = Field("tagstream-worker", description="Faust app id = Kafka consumer group of the agents.")
    data_dir: Path = Field(
        Path("~/.local/state/tagstream/faust"),
        description="Faust's data directory parent (`<data_dir>/<app_id>`; Faust keeps only an empty tables dir "
        "there, since tagstream's state is in Redis). Never the current directory.",
    )
    worker_id: str = Field(
        default_factory=lambda: f"worker@{socket.gethostname()}:{os.getpid()}",
        min_length=1,
        max_length=256,
        description="Name of this worker in model events and `tagstream model status`; unique per worker process "
        "(the default names the host and the process id).",
    )
    worker_status_retention_s: float = Field(
        3600.0,
        allow_inf_nan=False,
        description="A worker status in `<prefix>:workers` not reported for this long (s) is removed by the running "
        "workers when they write theirs (a killed worker cannot remove its own), and `tagstream model status` no "
        "longer lists a worker known only by an answer this old. More than 3 × the 5 s status interval: a live worker "
        "writes its status every 5 s, so only one that reports nothing for longer than the retention less 5 s "
        "(stopped, or paused) loses its status, until its next report.",
    )
    user_hash_key: SecretStr = Field(
        SecretStr(DEV_USER_HASH_KEY), description="Key of the HMAC that replaces user ids before Redis or logs."
    )
    model_path: Path | None = Field(None, description="Model bundle directory loaded at start.")
    model_verify_key: SecretStr | None = Field(
        None, description="Base64 Ed25519 public key; when set, unsigned or wrongly signed bundles are refused."
    )
    model_roots: tuple[Path, ...] = Field(
        (),
        description="Directories (a JSON list of absolute paths) a model-updates request's bundle must be inside, "
        "its symbolic links followed: a request naming another directory is refused (`place: ... is outside "
        "TAGSTREAM_MODEL_ROOTS`), so whoever may write the topic cannot make workers load a bundle from anywhere "
        "else on their machines. Empty (the default): any directory the worker can read. TAGSTREAM_MODEL_PATH, the "
        "bundle loaded at start, is the operator's own choice and not checked.",
    )
    model_updates_enabled: bool = Field(
        True, description="Consume model-updates (every worker reads all of it, no consumer group) and hot swap."
    )
    model_catchup_timeout: float = Field(
        60.0, ge=0, description="Longest wait (s) at start for the model-updates backlog before scoring events."
    )
    model_isolated_validation: bool = Field(
        True, description="Validate candidates in a child process (ONNX parsing holds the GIL: no loop stalls)."
    )
    model_validation_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest a model bundle's validation may take in its child process (model_isolated_validation); "
        "a bundle still being validated then (on an unresponsive file system, say) is refused and the child killed.",
    )
    model_canary_atol: float = Field(1e-4, gt=0, description="Largest |score - golden score| a candidate may have.")
    model_latency_budget_1_ms: float = Field(
        50.0, gt=0, description="Budget of a candidate's median predict latency at batch 1 (ms)."
    )
    model_latency_budget_64_ms: float = Field(
        250.0, gt=0, description="Budget of a candidate's median predict latency at batch 64 (ms)."
    )
    model_latency_runs: int = Field(10, ge=1, description="Timed predict runs per batch size when validating.")
    model_golden_set: Path | None = Field(
        None, description="Labelled golden set (catalog JSONL); when set, candidates may not regress on it."
    )
    model_max_quality_drop: float = Field(
        0.02, ge=0, le=1, description="Largest micro-F1 drop on the golden set vs the active model."
    )
    shadow_flush_interval: float = Field(0.5, gt=0, description="Seconds between publishes of buffered shadow diffs.")
    shadow_buffer_max: int = Field(
        20_000, ge=1, description="Most shadow diffs buffered; older ones are dropped (and counted) beyond it."
    )
    retag_on_swap: bool = Field(
        False, description="Re-score the stored catalog after a swap (products of this worker's partitions)."
    )
    retag_rate: float = Field(200.0, gt=0, description="Re-tag rate limit (products per second).")
    retag_batch: int = Field(32, ge=1, description="Products re-scored per step; the loop is yielded between steps.")
    ort_intra_op_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads.")
    ort_inter_op_threads: int = Field(1, ge=1, description="ONNX Runtime inter-op threads.")
    batch_max: int = Field(
        1024,
        ge=1,
        description="Most events processed (and scored) as one micro-batch. Batches reach it only when the worker is "
        "behind; a larger one lets it catch up sooner. At 8,300 events/s, three alternating pairs gave p99 159 / 173 / "
        "563 ms at 1024 against 2,748 / 909 / 635 at 512 (p50 37 / 47 / 60 against 102 / 32 / 43); at 7,500 both "
        "26 / 87 (bench/RESULTS.md, eighteenth session).",
    )
    behaviour_lanes: int = Field(
        2,
        ge=1,
        description="Concurrent lanes of partitions per behaviour batch: one lane computes while another waits for "
        "Redis (lanes touch disjoint products).",
    )
    behaviour_lane_min_events: int = Field(
        128,
        ge=1,
        description="Events per behaviour lane at least: smaller batches run in fewer lanes (each lane makes its own "
        "Redis round trips, which cost more than they overlap in a small batch).",
    )
    score_step: int = Field(
        64,
        ge=1,
        description="Upserts scored per step on the event loop (the loop is yielded between steps; 64: ~3 ms).",
    )
    max_buffered_records: int = Field(
        20_000,
        ge=1,
        description="With fetch_batches: fetching pauses while this many records wait in the agents' buffers "
        "(bounds a backlog's memory: ~10 MB of events).",
    )
    behaviour_ttl_s: int = Field(
        8 * 86_400,
        ge=0,
        description="A product's behaviour counters and unique-user HyperLogLogs expire this long (wall clock) after "
        "its last behaviour event wrote them, so products no one looks at any more do not keep their counters in "
        "Redis for ever; so do the tags and offset fence of a product id no catalog change named yet. At least 7 "
        "days (the longest window: by then every count has left its windows, as long as "
        "event time keeps up with the clock); 0 = never expire.",
    )
    state_cache: int = Field(
        10_000,
        ge=0,
        description="Products whose state the worker keeps between batches (most recently used), so a batch reads "
        "from Redis only the others; every write is fenced on the revision it was computed from, so a kept state "
        "another writer changed is read again. About 7.5 KB per product on the bench mix; at most "
        "TAGSTREAM_STATE_CACHE_MB in all. 0 = read every batch's products.",
    )
    state_cache_mb: float = Field(
        64.0,
        gt=0,
        description="Most memory the kept product states take, estimated from their fields, tags and strings (a "
        "product with a 19,000-character description and 100 attributes takes ~100 KB): the least recently used "
        "beyond it are dropped, whatever TAGSTREAM_STATE_CACHE allows.",
    )
    fetch_min_bytes: int = Field(
        32_768,
        ge=1,
        description="The broker answers a consumer fetch once this many bytes are ready for it, or after "
        "fetch_max_wait_ms: fewer, fuller fetches (1 = a fetch per produce request, ~1,000/s at 8,000 events/s).",
    )
    fetch_max_wait_ms: int = Field(
        8,
        ge=0,
        description="Longest the broker holds a fetch for fetch_min_bytes (ms): what batching fetches may add to an "
        "event's latency at live rates. Each fetch costs ~0.5 ms of CPU however few records it brings: 8 ms instead "
        "of 4 took the Faust loop alone from 0.29-0.35 to 0.19-0.23 cores at 6,600 events/s and the worker from 0.65 "
        "to 0.49 at 1,000/s, at +2 ms p50 there (bench/RESULTS.md, thirteenth session).",
    )
    fetch_idle_wait_ms: int = Field(
        500,
        ge=0,
        description="After a fetch that returned no record, the next one asks for a single byte and the broker holds "
        "it up to this long (ms): an idle worker long-polls instead of fetching every fetch_max_wait_ms (~0.09 cores "
        "of CPU idle), and the first record after a pause is answered at once. 0 = always fetch as when busy.",
    )
    consumer_thread: bool = Field(
        False,
        description="Run the Kafka consumer in a thread with its own event loop, as Faust does (true), instead of "
        "on the worker's event loop (false). In a thread every fetch is handed between the two loops and its records "
        "wait for the GIL while the agents work: at 6,000-9,000 events/s p99 was higher in each of four alternating "
        "pairs (125-2,358 ms against 52-415; bench/RESULTS.md, fourteenth session).",
    )
    event_loop: EventLoop = Field(
        "uvloop",
        description="The worker's event loop: uvloop (libuv: cheaper sockets, callbacks and timers for the consumer, "
        "producer and Redis I/O that all run on the loop) or CPython's asyncio loop. At 6,500 events/s uvloop had "
        "the worker 0.01-0.10 cores less busy in five of five alternating pairs (bench/RESULTS.md, fifteenth session).",
    )
    fetch_max_partition_bytes: int = Field(
        262_144,
        ge=1024,
        description="Most bytes one fetch returns per partition (aiokafka's max_partition_fetch_bytes; a record "
        "larger than this still arrives): bounds how much of a backlog is fetched ahead of the agents. Faust's 1 MB "
        "took the worker's peak RSS on a 300,000-event backlog to 393–434 MB, 256 KB to 362–389 MB at the same "
        "rate; at live rates a fetch holds a few KB either way.",
    )
    fetch_batches: bool = Field(
        True,
        description="Hand the product and behaviour agents all records of a partition that one fetch returned as one "
        "Faust message (False: one Faust message per record, Faust's own path, ~60 µs more per event).",
    )
    max_inflight_batches: int = Field(
        4,
        ge=1,
        description="Batches per agent whose tag updates may still await Kafka's acks=all while the next batch is "
        "processed; a batch's offsets are acknowledged only once its updates are delivered.",
    )
    gc_thresholds: tuple[int, int, int] = Field(
        (10_000, 10, 10),
        description="The worker process's garbage-collector thresholds (`gc.set_threshold`), as a JSON list: a "
        "collection stalls every batch in flight, and CPython's (700, 10, 10) ran a full one about every second at "
        "6,000 events/s (streams/gcwatch.py). Each must be at least 1 (0 would turn collection off).",
    )
    score_delta: float = Field(0.05, ge=0, le=1, description="A score move larger than this re-emits the tags.")
    tick_idle_s: float = Field(
        60.0,
        ge=0,
        allow_inf_nan=False,
        description="A behaviour partition this worker owns that has had no record for this long (s) gets a window "
        "tick (schemas/tick.v1.json): its event time plus the time since the record that raised it was produced (its "
        "Kafka timestamp), when a product's "
        "behaviour tags there are due by then. Its event time moves on and tags whose windows passed turn off, as an "
        "event would do. 0 = no ticks (a quiet partition keeps its tags until its next event).",
    )
    tick_live_s: float = Field(
        3600.0,
        gt=0,
        allow_inf_nan=False,
        description="Ticks only move a partition that was live when its event time last rose: the record that "
        "raised it was produced (its Kafka timestamp) at most this long (s) after the event time it carried. A replay "
        "of older events is produced later than that, and its windows follow the replayed times only.",
    )
    max_event_ahead_ms: int = Field(
        900_000,
        ge=0,
        description="An event whose time (a click's `ts`, a product change's `updated_at`) lies more than this far "
        "(ms) ahead of the worker's clock goes to the dead-letter topic: it would move its partition's watermark "
        "ahead, and with it every product's windows there (one click 23 h ahead turned `trending` off across its "
        "partition for a day); a time in microseconds would move them years ahead. So does one before 2000-01-01 "
        "(a time in seconds). Default 15 minutes: clock skew, not a producer writing local time as UTC. 0 = no "
        "time check.",
    )
    redis_retry_max_backoff: float = Field(5.0, gt=0, description="Longest wait between Redis retries (s).")
    session_timeout: float = Field(
        10.0, gt=3, description="Kafka consumer session timeout (s): how soon a crashed worker's partitions move."
    )
    auto_offset_reset: str = Field("earliest", description="Where a new consumer group starts reading.")
    metadata_max_age_s: float = Field(
        300.0,
        gt=0,
        allow_inf_nan=False,
        description="Kafka consumer metadata max age (s): how soon a running worker sees an input topic deleted or "
        "made again (it then stops with TopicsRecreatedError) or new partitions, at the latest.",
    )
    web_port: int | None = Field(None, description="Faust web port; None disables Faust's web server.")
    dead_letter_all_errors: bool = Field(
        True, description="Dead-letter an event whose processing raised an unexpected error (else crash)."
    )

    @field_validator("model_path", "model_golden_set", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        # docker-compose passes TAGSTREAM_MODEL_PATH through from the host as "" when it is unset there: that is no
        # path, not Path("") == Path(".") (the current directory).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model_path", mode="after")
    @classmethod
    def _absolute_model_path(cls, value: Path | None) -> Path | None:
        # the worker names its first bundle by this path in its answers, as `publish` and `model activate` name
        # theirs: absolute (from the working directory; no file system access, so nothing can block here)
        return value.absolute() if value is not None else None

    @field_validator("replication_factor")
    @classmethod
    def _replicas(cls, value: int) -> int:
        if value == 0:
            raise ValueError("a topic needs at least 1 replica (-1: the cluster's default.replication.factor)")
        return value

    @field_validator("model_roots")
    @classmethod
    def _absolute_roots(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        relative = [str(root) for root in value if not root.is_absolute()]
        if relative:
            raise ValueError(f"every model root must be an absolute path, got {relative}")
        return value

    @field_validator("user_hash_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: object) -> object:
        # The same pass-through as TAGSTREAM_MODEL_PATH: "" is the unset key (the development default, which the
        # worker warns about at start), never an empty HMAC key.
        return DEV_USER_HASH_KEY if isinstance(value, str) and not value.strip() else value

    @field_validator("gc_thresholds")
    @classmethod
    def _positive_thresholds(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 1:
            raise ValueError(f"every garbage-collector threshold must be at least 1, got {list(value)}")
        return value

    @field_validator("worker_status_retention_s")
    @classmethod
    def _retention_above_liveness(cls, value: float) -> float:
        if not value > LIVE_WITHIN_S:
            raise ValueError(
                f"must be more than {LIVE_WITHIN_S:g} s (3 × the {STATUS_EVERY_S:g} s status interval), so that a "
                "worker's status is removed only after several status writes it missed"
            )
        return value

    @field_validator("behaviour_ttl_s")
    @classmethod
    def _ttl_beyond_the_longest_window(cls, value: int) -> int:
        if 0 < value < 7 * 86_400:
            raise ValueError(
                f"must be 0 (never expire) or at least 604800 s (7 days, the longest window), got {value}: counters "
                "still in a window would vanish"
            )
        return value

    def topic(self, name: str) -> str:
        """Full topic name of logical topic `name`."""
        return f"{self.topic_prefix}{name}"
