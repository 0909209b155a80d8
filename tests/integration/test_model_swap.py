"""Model hot swap against the real stack: `tagstream worker` processes, model-updates requests and answers.

- a corpus of bad bundles, each refused with its reason in a `model-rejected` answer while the old model keeps
  tagging live events;
- a good model swapped under live load with no event failed or lost, versions switching once per partition;
- rollback, and a worker started later converging to the last activated model;
- shadow scoring whose diffs match an offline comparison of the two models, then promote;
- re-tag of the stored catalog after a swap, emitting a `retag` update naming the new model for every product, tags
  changed or not;
- a worker starting on a model-updates topic that retention emptied;
- `tagstream model ... --wait`: stopped workers, an accepted shadow, answers to earlier requests;
- two workers with default ids on one host, and a shadow stopped for good.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.records_to_delete import RecordsToDelete
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas import ModelUpdate, ProductChange
from serving.decoding import catalog_tags, diff_tags, merge_tags
from serving.validate import validate_bundle
from streams.model import BundleModel, ShadowDiff
from streams.model_cli import build_request, send_request, workers_key
from streams.settings import WorkerSettings
from tests.events import upsert
from tests.integration.conftest import REPO, StreamEnv
from tests.unit.test_validate import (
    TITLES,
    BadCase,
    golden_set_of,
    make_corpus,
    public_b64,
    real_bundle,
    write_golden_jsonl,
)

pytestmark = pytest.mark.integration

ANSWERS = ("model-activated", "model-rejected")


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> dict[str, Path]:
    """Three good signed bundles over the real featurizer (different weights, same layout)."""
    root = tmp_path_factory.mktemp("registry")
    return {name: real_bundle(root / name, seed=seed, signing_key=key) for seed, name in enumerate("abc")}


@pytest.fixture(scope="module")
def models(bundles: dict[str, Path]) -> dict[str, BundleModel]:
    """The same bundles loaded offline (the reference the worker's output is compared with)."""
    return {name: BundleModel.from_validated(validate_bundle(path)) for name, path in bundles.items()}


# --------------------------------------------------------------------------------------------------- helpers


def send(se: StreamEnv, event: ModelUpdate, key: bytes = b"tiny") -> int:
    """Send a model-updates request; returns its offset."""
    return asyncio.run(send_request(se.settings, event, key))


def request(kind: str, path: Path | None = None, version: str | None = None) -> ModelUpdate:
    if path is None:
        return ModelUpdate(kind=kind, model_version=version or "previous", emitted_at=time.time_ns() // 10**6)  # type: ignore[arg-type]
    event, _ = build_request(kind, WorkerSettings(), model=path)
    return event


def answers_of(messages: list[dict[str, Any]], worker: str, after: int = -1) -> list[dict[str, Any]]:
    return [m for m in messages if m["kind"] in ANSWERS and m.get("worker_id") == worker and m["_offset"] > after]


def wait_answers(se: StreamEnv, worker: str, n: int, after: int = -1, timeout: float = 60) -> list[dict[str, Any]]:
    """The first `n` answers of `worker` after offset `after` on model-updates."""
    seen = se.consume("model-updates", lambda m: len(answers_of(m, worker, after)) >= n, timeout=timeout)
    return answers_of(seen, worker, after)[:n]


def start(se: StreamEnv, worker: str, **env: str) -> Any:
    """Start a `tagstream worker` named `worker` (it answers on model-updates under that id)."""
    return se.start_worker(TAGSTREAM_WORKER_ID=worker, **env)


def upserts(prefix: str, n: int, **fields: Any) -> list[dict[str, Any]]:
    return [upsert(f"{prefix}-{i}", TITLES[i % len(TITLES)], **fields) for i in range(n)]


def updates_by_pid(se: StreamEnv, pids: set[str], timeout: float = 60) -> dict[str, list[dict[str, Any]]]:
    """Tag updates of `pids` once every one of them has at least one."""
    seen = se.consume("tag-updates", lambda m: pids <= {u["product_id"] for u in m}, timeout=timeout)
    out: dict[str, list[dict[str, Any]]] = {}
    for u in seen:
        if u["product_id"] in pids:
            out.setdefault(u["product_id"], []).append(u)
    return out


def redis_status(se: StreamEnv, worker: str) -> dict[str, Any] | None:
    raw = se.redis().hget(workers_key(se.settings.redis_prefix), worker)
    return json.loads(raw) if raw else None


def wait_status(se: StreamEnv, worker: str, pred: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = redis_status(se, worker)
        if status is not None and pred(status):
            return status
        time.sleep(0.2)
    pytest.fail(f"status of {worker} never matched; last: {status}")


def cli(se: StreamEnv, *args: str) -> subprocess.Popen[str]:
    """Start `tagstream <args>` with this test's settings (output unbuffered, read from `.stdout`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tagstream.cli", *args],
        env={**os.environ, **se.env, "PYTHONUNBUFFERED": "1"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_cli(se: StreamEnv, *args: str) -> tuple[int, str]:
    """Run `tagstream <args>` to its end: (exit code, output)."""
    proc = cli(se, *args)
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out


def model_tag_names(model: BundleModel, event: dict[str, Any]) -> list[str]:
    return [t.tag for t in model.score([ProductChange.from_dict(event)])[0]]


# --------------------------------------------------------------------------------------------------- tests


def test_bad_bundles_are_refused_with_their_reason_while_the_old_model_keeps_serving(
    make_stream_env: Any, tmp_path: Path, key: Ed25519PrivateKey, bundles: dict[str, Path], models: dict[str, Any]
) -> None:
    corpus: list[BadCase] = make_corpus(tmp_path / "corpus", key)
    assert len(corpus) >= 15
    golden = write_golden_jsonl(tmp_path / "golden.jsonl", golden_set_of(models["a"]))
    se = make_stream_env()
    start(
        se,
        "w-bad",
        TAGSTREAM_MODEL_PATH=str(bundles["a"]),
        TAGSTREAM_MODEL_VERIFY_KEY=public_b64(key),
        TAGSTREAM_MODEL_GOLDEN_SET=str(golden),
    )
    [hello] = wait_answers(se, "w-bad", 1)
    assert hello["kind"] == "model-activated" and hello["model_version"] == bundles["a"].name

    events: list[dict[str, Any]] = []
    first = None
    for i, case in enumerate(corpus):
        event = ModelUpdate(
            kind="activate",
            model_version=case.model_version,
            emitted_at=time.time_ns() // 10**6,
            bundle_uri=str(case.path),
            sha256=case.sha256,
        )
        offset = send(se, event)
        first = offset if first is None else first
        batch = upserts(f"bad{i}", 2)
        se.produce("products", batch)
        events += batch

    got = wait_answers(se, "w-bad", len(corpus), after=first - 1, timeout=120)  # type: ignore[operator]
    by_uri = {a["bundle_uri"]: a for a in got}
    for case in corpus:
        answer = by_uri.get(str(case.path))
        assert answer is not None, f"{case.name}: no answer"
        assert answer["kind"] == "model-rejected", f"{case.name} was accepted"
        ModelUpdate.from_dict({k: v for k, v in answer.items() if not k.startswith("_")}).to_dict()
        text = " | ".join(answer["reasons"])
        assert case.reason in text, f"{case.name}: {text}"

    # Events kept flowing, every one tagged by the old model.
    updates = updates_by_pid(se, {e["product_id"] for e in events})
    for event in events:
        [update] = updates[event["product_id"]]
        assert update["model_version"] == bundles["a"].name
        assert [t["tag"] for t in update["tags"] if t["origin"] == "model"] == model_tag_names(models["a"], event)
    assert redis_status(se, "w-bad")["active"] == bundles["a"].name  # type: ignore[index]
    assert "rejected by w-bad" in se.workers[0].log()


class LoadProducer(threading.Thread):
    """Produces `n` upserts with unique ids at a steady pace from its own event loop; records where each landed."""

    def __init__(self, se: StreamEnv, prefix: str, n: int, chunk: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.se, self.prefix, self.n, self.chunk, self.pause = se, prefix, n, chunk, pause
        self.sent: list[tuple[str, int, int, int]] = []  # pid, partition, offset, acked at (ms)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by the test
            self.error = exc

    async def _run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.se.settings.kafka_bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            topic = self.se.settings.topic("products")
            for start in range(0, self.n, self.chunk):
                events = [
                    upsert(f"{self.prefix}-{i}", TITLES[i % len(TITLES)])
                    for i in range(start, min(self.n, start + self.chunk))
                ]
                futures = [await producer.send(topic, orjson.dumps(e), key=e["product_id"].encode()) for e in events]
                for e, meta in zip(events, await asyncio.gather(*futures), strict=True):
                    self.sent.append((e["product_id"], meta.partition, meta.offset, time.time_ns() // 10**6))
                await asyncio.sleep(self.pause)
        finally:
            await producer.stop()


def test_hot_swap_under_load_rollback_and_a_late_worker_converges(
    make_stream_env: Any, bundles: dict[str, Path]
) -> None:
    a, b, c = (bundles[x].name for x in "abc")
    se = make_stream_env()
    start(se, "w-1", TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    wait_answers(se, "w-1", 1)

    load = LoadProducer(se, "L", n=1500, chunk=25, pause=0.04)
    load.start()
    deadline = time.monotonic() + 30
    while len(load.sent) < 200 and load.is_alive():  # the swap lands under live load
        assert time.monotonic() < deadline, "the load producer did not start"
        time.sleep(0.05)
    offset = send(se, request("activate", bundles["b"]))
    [answer] = wait_answers(se, "w-1", 1, after=offset)
    assert (answer["kind"], answer["model_version"]) == ("model-activated", b)
    load.join(timeout=120)
    assert load.error is None and len(load.sent) == 1500

    # Every produced event is accounted for by exactly its update, none failed.
    wanted = {(p, o) for _, p, o, _ in load.sent}
    seen = se.consume(
        "tag-updates",
        lambda m: wanted <= {(u["source"]["partition"], u["source"]["offset"]) for u in m if u["product_id"][0] == "L"},
        timeout=120,
    )
    by_source = {(u["source"]["partition"], u["source"]["offset"]): u for u in seen if u["product_id"][0] == "L"}
    assert all(by_source[(p, o)]["product_id"] == pid for pid, p, o, _ in load.sent)
    dead = se.consume("dead-letter", lambda m: True, timeout=3)
    assert not dead
    # Per partition the version switches exactly once, from a to b; events acked after the answer carry b.
    for partition in {p for _, p, _, _ in load.sent}:
        versions = [
            by_source[(p, o)]["model_version"] for _, p, o, _ in sorted(load.sent, key=lambda r: r[2]) if p == partition
        ]
        switch = versions.index(b) if b in versions else len(versions)
        assert set(versions[:switch]) <= {a} and set(versions[switch:]) == {b}, versions
    assert {by_source[(p, o)]["model_version"] for _, p, o, at in load.sent if at > answer["emitted_at"]} == {b}
    assert {by_source[(p, o)]["model_version"] for _, p, o, _ in load.sent} == {a, b}

    # Rollback: back to a.
    offset = send(se, request("rollback"), key=b"tagstream-control")
    [answer] = wait_answers(se, "w-1", 1, after=offset)
    assert (answer["kind"], answer["model_version"]) == ("model-activated", a)
    after_rollback = upserts("R", 10)
    se.produce("products", after_rollback)
    updates = updates_by_pid(se, {e["product_id"] for e in after_rollback})
    assert {u["model_version"] for us in updates.values() for u in us} == {a}
    status = wait_status(se, "w-1", lambda s: s["active"] == a)
    assert status["previous"] == b

    # A third model, then a worker started later (from the same configured bundle a) converges to it.
    offset = send(se, request("activate", bundles["c"]))
    [answer] = wait_answers(se, "w-1", 1, after=offset)
    assert answer["model_version"] == c
    start(se, "w-2", TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    [hello] = wait_answers(se, "w-2", 1)
    assert (hello["kind"], hello["model_version"]) == ("model-activated", c)
    assert wait_status(se, "w-2", lambda s: s["active"] == c)["previous"] == a

    # `tagstream model status` shows both workers.
    env = {**os.environ, **se.env}
    out = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "model", "status", "--json"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["w-1"]["active"] == c and report["w-2"]["active"] == c
    assert report["w-2"]["last_answer"]["model_version"] == c


def test_model_rollback_run_again_after_it_was_applied_changes_nothing(
    make_stream_env: Any, bundles: dict[str, Path]
) -> None:
    a, b = bundles["a"].name, bundles["b"].name
    se = make_stream_env()
    start(se, "w-r", TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    wait_answers(se, "w-r", 1)
    offset = send(se, request("activate", bundles["b"]))
    assert wait_answers(se, "w-r", 1, after=offset)[0]["model_version"] == b
    env = {**os.environ, **se.env}

    def rollback() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tagstream.cli", "model", "rollback", "--wait", "30"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    first = rollback()
    assert first.startswith(f"rollback to {a}: the previous model every live worker reports (1)"), first
    assert wait_status(se, "w-r", lambda st: st["active"] == a)["previous"] == b
    # the operator runs it again (a retry): the worker, back on a, stays there instead of returning to b
    again = rollback()
    assert again.startswith(f"rollback to {a}: the newest request on {se.settings.topic('model-updates')}"), again
    assert f"rollback: {a} is already active" in again  # the worker's answer
    status = redis_status(se, "w-r")
    assert status is not None and (status["active"], status["previous"]) == (a, b)


def test_shadow_diffs_match_an_offline_comparison_then_promote(
    make_stream_env: Any, bundles: dict[str, Path], models: dict[str, BundleModel]
) -> None:
    a, b = bundles["a"].name, bundles["b"].name
    se = make_stream_env()
    start(se, "w-s", TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    wait_answers(se, "w-s", 1)
    send(se, request("shadow", bundles["b"]))
    wait_status(se, "w-s", lambda s: s["shadow"] == b)

    events = upserts("S", 30, attributes={"colour": "Red"})
    se.produce("products", events)
    pids = {e["product_id"] for e in events}
    diffs = se.consume("tag-shadow-diffs", lambda m: pids <= {d["product_id"] for d in m}, timeout=60)
    by_pid = {
        d["product_id"]: ShadowDiff.from_dict({k: v for k, v in d.items() if not k.startswith("_")}) for d in diffs
    }
    agreement = []
    for event in events:
        diff = by_pid[event["product_id"]]
        diff.to_dict()  # schema-valid
        active_tags = set(model_tag_names(models["a"], event))
        shadow_tags = set(model_tag_names(models["b"], event))
        assert (diff.active_version, diff.shadow_version) == (a, b)
        assert set(diff.added) == shadow_tags - active_tags
        assert set(diff.removed) == active_tags - shadow_tags
        union = active_tags | shadow_tags
        assert diff.agreement == pytest.approx(len(active_tags & shadow_tags) / len(union) if union else 1.0)
        agreement.append(diff.agreement)
    updates = updates_by_pid(se, pids)
    assert {u["model_version"] for us in updates.values() for u in us} == {a}  # the shadow never tags
    stats = wait_status(se, "w-s", lambda s: (s["shadow_stats"] or {}).get("compared", 0) >= 30)["shadow_stats"]
    assert stats["agreement"] == pytest.approx(sum(agreement) / len(agreement))

    offset = send(se, request("promote", version="shadow"), key=b"tagstream-control")
    [answer] = wait_answers(se, "w-s", 1, after=offset)
    assert (answer["kind"], answer["model_version"]) == ("model-activated", b)
    after = upserts("P", 5)
    se.produce("products", after)
    updates = updates_by_pid(se, {e["product_id"] for e in after})
    assert {u["model_version"] for us in updates.values() for u in us} == {b}
    status = wait_status(se, "w-s", lambda s: s["active"] == b)
    assert status["shadow"] is None and status["previous"] == a


def test_retag_after_a_swap_updates_every_product_naming_the_new_model(
    make_stream_env: Any, bundles: dict[str, Path], models: dict[str, BundleModel]
) -> None:
    b = bundles["b"].name
    se = make_stream_env()
    start(se, "w-r", TAGSTREAM_MODEL_PATH=str(bundles["a"]), TAGSTREAM_RETAG_ON_SWAP="true", TAGSTREAM_RETAG_RATE="500")
    wait_answers(se, "w-r", 1)
    events = [
        upsert(f"T-{i}", TITLES[i % len(TITLES)], attributes={"colour": "Red"} if i % 3 == 0 else {}) for i in range(40)
    ]
    se.produce("products", events)
    pids = {e["product_id"] for e in events}
    updates_by_pid(se, pids)

    expected = set()
    for e in events:
        catalog = catalog_tags(e.get("attributes") or {})
        old = merge_tags(models["a"].score([ProductChange.from_dict(e)])[0], catalog, [])
        new = merge_tags(models["b"].score([ProductChange.from_dict(e)])[0], catalog, [])
        if diff_tags(old, new, se.settings.score_delta)[2]:
            expected.add(e["product_id"])
    assert expected  # different weights: some products change

    offset = send(se, request("activate", bundles["b"]))
    wait_answers(se, "w-r", 1, after=offset)
    seen = se.consume(
        "tag-updates", lambda m: pids <= {u["product_id"] for u in m if u["reason"] == "retag"}, timeout=60
    )
    status = wait_status(se, "w-r", lambda s: (s.get("retag") or {}).get("finished_at") is not None)
    seen = se.consume("tag-updates", lambda m: len(m) >= len(seen), timeout=10)
    retags = [u for u in seen if u["reason"] == "retag"]
    # every product's stored model version changed: each gets one update naming b, its tags changed or not (§1)
    assert {u["product_id"] for u in retags} == pids and len(retags) == len(pids)
    assert all(u["added"] == u["removed"] == [] for u in retags if u["product_id"] not in expected)
    # each re-tag update names the request that made the model active: its own identity (SPEC.md §1)
    assert all(
        u["model_version"] == b and (u["source"]["partition"], u["source"]["offset"]) == (0, offset) for u in retags
    )
    assert status["retag"]["scored"] == status["retag"]["updates"] == 40
    assert status["retag"]["version_only"] == 40 - len(expected)
    r = se.redis()
    last = {u["product_id"]: u for u in seen}
    for pid in pids:
        stored = orjson.loads(r.get(f"{se.settings.redis_prefix}:{{{pid}}}:tags"))
        assert stored["model_version"] == b and last[pid]["tags"] == stored["tags"], pid  # the truth to keep


def test_a_worker_starts_scoring_when_retention_emptied_model_updates(
    make_stream_env: Any, bundles: dict[str, Path]
) -> None:
    se = make_stream_env()
    offset = send(se, request("activate", bundles["b"]))

    async def delete_all() -> None:  # what retention does: the log starts at its end (offset + 1 > 0)
        admin = AIOKafkaAdminClient(bootstrap_servers=se.settings.kafka_bootstrap)
        await admin.start()
        try:
            tp = TopicPartition(se.settings.topic("model-updates"), 0)
            await admin.delete_records({tp: RecordsToDelete(before_offset=offset + 1)})
        finally:
            await admin.close()

    asyncio.run(delete_all())
    start(se, "w-ret", TAGSTREAM_MODEL_PATH=str(bundles["a"]), TAGSTREAM_MODEL_CATCHUP_TIMEOUT="600")
    # The worker announces its model once the (empty) backlog is applied, long before the 600 s catch-up bound.
    [hello] = wait_answers(se, "w-ret", 1, after=offset, timeout=60)
    assert (hello["kind"], hello["model_version"]) == ("model-activated", bundles["a"].name)
    event = upsert("ret-1", TITLES[0])
    se.produce("products", [event])
    [update] = updates_by_pid(se, {"ret-1"}, timeout=60)["ret-1"]
    assert update["model_version"] == bundles["a"].name


def test_wait_skips_stopped_workers_and_sees_an_accepted_shadow(make_stream_env: Any, bundles: dict[str, Path]) -> None:
    a, b = bundles["a"].name, bundles["b"].name
    se = make_stream_env()
    old = start(se, "w-old", TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    wait_answers(se, "w-old", 1)
    wait_status(se, "w-old", lambda s: s["active"] == a)
    old.stop()
    assert old.proc.returncode == 0 and redis_status(se, "w-old") is None  # a clean shutdown removes its status
    # A worker killed ten minutes ago left its status behind (the workers remove it once older than
    # TAGSTREAM_WORKER_STATUS_RETENTION_S, an hour).
    gone = {"active": a, "previous": None, "shadow": None, "reported_at": time.time_ns() // 10**6 - 600_000}
    se.redis().hset(workers_key(se.settings.redis_prefix), "w-gone", json.dumps(gone))
    start(se, "w-new", TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    wait_answers(se, "w-new", 1)
    wait_status(se, "w-new", lambda s: s["active"] == a)

    code, out = run_cli(se, "model", "shadow", "--model", str(bundles["b"]), "--wait", "60")
    assert code == 0, out
    assert f"w-new: shadow {b} running beside {a}" in out and "not waiting for w-gone" in out
    assert "w-old" not in out and "no answer" not in out
    assert redis_status(se, "w-new")["shadow"] == b  # type: ignore[index]

    code, out = run_cli(se, "model", "promote", "--wait", "60")
    assert code == 0, out
    assert f"w-new: model-activated {b}" in out and "no answer" not in out

    code, out = run_cli(se, "model", "status")
    assert code == 0, out
    lines = out.splitlines()
    assert "w-gone (not reporting: stopped?)" in lines and "w-new" in lines
    # stopped cleanly (its status removed): not shown as a worker running a model, only with its last answer
    at = lines.index("w-old (stopped: no status; its last answer within TAGSTREAM_WORKER_STATUS_RETENTION_S)")
    assert lines[at + 1].startswith("  last answer: model-activated")


def cli_behind(se: StreamEnv, worker: Any, earlier: ModelUpdate, key: bytes, *args: str) -> tuple[int, str]:
    """Run `tagstream <args>` while `worker` is paused, right after another operator sent `earlier`: the worker's
    answer to `earlier` lands after the CLI's request. Returns (exit code, output)."""
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        send(se, earlier, key)
        proc = cli(se, *args)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("sent "), first
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, first + out


def test_wait_does_not_take_an_earlier_requests_answer(make_stream_env: Any, bundles: dict[str, Path]) -> None:
    a, b, c = (bundles[x].name for x in "abc")
    se = make_stream_env()
    worker = start(se, "w-e", TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    wait_answers(se, "w-e", 1)
    wait_status(se, "w-e", lambda s: s["active"] == a)
    control = b"tagstream-control"

    # An earlier refusal does not make this activate refused.
    code, out = cli_behind(
        se, worker, request("rollback", version="no-such-version"), control,
        "model", "activate", "--model", str(bundles["b"]), "--wait", "60",
    )  # fmt: skip
    assert code == 0, out
    assert f"w-e: model-activated {b}\n" in out and "w-e: model-rejected no-such-version not counted" in out

    # An earlier activation does not answer this rollback: its own refusal does (the worker reported a as its
    # previous model when the rollback was sent; the activate of c, applied first, made it b)
    code, out = cli_behind(
        se, worker, request("activate", bundles["c"]), b"tiny",
        "model", "rollback", "--version", a, "--wait", "60",
    )  # fmt: skip
    assert code == 1, out
    assert f"w-e: model-rejected {a}: rollback: the previous model is {b}" in out
    assert f"w-e: model-activated {c} not counted" in out

    # rollback to "previous": the answer names the worker's previous model when the request was sent (b)
    code, out = run_cli(se, "model", "rollback", "--wait", "60")
    assert code == 0 and f"w-e: model-activated {b}\n" in out and "not counted" not in out, out


def test_a_retag_cut_short_by_a_crash_is_finished_by_the_next_worker(
    make_stream_env: Any, bundles: dict[str, Path]
) -> None:
    b = bundles["b"].name
    se = make_stream_env()
    slow = {"TAGSTREAM_RETAG_ON_SWAP": "true", "TAGSTREAM_RETAG_RATE": "4", "TAGSTREAM_RETAG_BATCH": "2"}
    first = start(se, "w-1", TAGSTREAM_MODEL_PATH=str(bundles["a"]), **slow)
    wait_answers(se, "w-1", 1)
    events = upserts("K", 40)
    pids = {e["product_id"] for e in events}
    se.produce("products", events)
    updates_by_pid(se, pids)
    offset = send(se, request("activate", bundles["b"]))
    wait_answers(se, "w-1", 1, after=offset)
    se.consume("tag-updates", lambda m: any(u["reason"] == "retag" for u in m), timeout=60)
    first.kill9()  # about 10 s into a re-tag of 40 products at 4 per second
    r = se.redis()

    def at_b() -> set[str]:
        return {
            p for p in pids if orjson.loads(r.get(f"{se.settings.redis_prefix}:{{{p}}}:tags"))["model_version"] == b
        }

    assert at_b() != pids  # the crash cut it short
    start(se, "w-2", TAGSTREAM_MODEL_PATH=str(bundles["a"]), TAGSTREAM_RETAG_ON_SWAP="true")
    deadline = time.monotonic() + 60
    while at_b() != pids and time.monotonic() < deadline:
        time.sleep(0.5)
    assert at_b() == pids


def test_two_workers_with_default_ids_are_told_apart_and_a_stopped_shadow_stays_stopped(
    make_stream_env: Any, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers on one host without TAGSTREAM_WORKER_ID: `model status` and `--wait` see both (their default ids
    differ); `model shadow --off` stops the shadow on both, and a restarted worker does not start it again."""
    a, b = bundles["a"].name, bundles["b"].name
    monkeypatch.delenv("TAGSTREAM_WORKER_ID", raising=False)
    se = make_stream_env()
    workers = [se.start_worker(TAGSTREAM_MODEL_PATH=str(bundles["a"])) for _ in range(2)]
    ids = [f"worker@{socket.gethostname()}:{w.proc.pid}" for w in workers]
    for worker_id in ids:
        wait_answers(se, worker_id, 1)
        wait_status(se, worker_id, lambda s: s["active"] == a)

    code, out = run_cli(se, "model", "shadow", "--model", str(bundles["b"]), "--wait", "60")
    assert code == 0, out
    assert all(f"{w}: shadow {b} running beside {a}" in out for w in ids), out

    code, out = run_cli(se, "model", "shadow", "--off", "--wait", "60")
    assert code == 0, out
    assert all(f"{w}: model-activated {a}: shadow: {b} stopped" in out for w in ids), out
    assert all(redis_status(se, w)["shadow"] is None for w in ids)  # type: ignore[index]
    code, out = run_cli(se, "model", "shadow", "--off", "--wait", "60")  # every live worker would refuse it
    assert code == 2 and "model shadow --off: no live worker runs a shadow model (2 report none): not sent" in out, out

    workers[0].stop()
    restarted = se.start_worker(TAGSTREAM_MODEL_PATH=str(bundles["a"]))
    new_id = f"worker@{socket.gethostname()}:{restarted.proc.pid}"
    [hello] = wait_answers(se, new_id, 1)  # sent once the history is applied
    assert hello["model_version"] == a
    status = wait_status(se, new_id, lambda s: s["active"] == a)
    assert status["shadow"] is None and status["previous"] is None
    out = subprocess.run(
        [sys.executable, "-m", "tagstream.cli", "model", "status", "--json"],
        env={**os.environ, **se.env}, cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report[ids[1]]["active"] == report[new_id]["active"] == a
    assert report[ids[0]].get("active") is None  # stopped cleanly: its status is gone, its answers remain
