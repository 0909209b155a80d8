"""The demo replays only once its worker can score: Faust's "Ready" comes before the model is loaded and the
model-updates backlog applied, and a replay started then measured the worker's start-up as event→tag latency."""

from __future__ import annotations

from pathlib import Path

import pytest

from tagstream.demo import wait_for_worker, worker_ready
from tagstream.errors import StackError

# A real worker's log, in the order the review saw it (tagstream demo, worker.log): Ready, then the model, then the
# model-updates backlog.
STARTING = b"[2026-12-01 07:17:25,441] [17856] [INFO] [^---Recovery]: Worker ready \n"
READY = b"[2026-12-01 07:17:25,442] [17856] [INFO] [^Worker]: Ready \n"
LOADED = b"[2026-12-01 07:17:27,559] [17856] [INFO] model 20261201T071720Z-ebd380d0 loaded from /w/models/x \n"
REPLAYING = (
    b"[2026-12-01 07:17:28,169] [17856] [INFO] model-updates: replaying 0 events of demo-86674a-model-updates \n"
)
APPLIED = b"[2026-12-01 07:17:28,170] [17856] [INFO] model-updates backlog applied: active model 20261201T071720Z \n"
NOT_APPLIED = b"[2026-12-01 07:18:28,170] [17856] [WARNING] model-updates backlog not applied within 60s; scoring \n"
# the model loaded before Faust starts (`tagstream worker` may load it first): tagstream's own log format
PRELOADED = b"2026-12-01 07:17:24,076 INFO streams.model: model 20261201T071720Z-ebd380d0 loaded from /w/models/x\n"
NO_MODEL = (
    b"[2026-12-01 07:17:27,559] [17856] [WARNING] no model configured (TAGSTREAM_MODEL_PATH): products get catalog "
    b"and behaviour tags only \n"
)


class FakeWorker:
    """A worker process that is running until `code` is set."""

    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


class GrowingLog:
    """A worker log that gets its next chunk each time the waiter sleeps; records which chunks it had then."""

    def __init__(self, path: Path, chunks: list[bytes]) -> None:
        self.path = path
        self.chunks = list(chunks)
        self.sleeps = 0
        path.write_bytes(b"")

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if self.chunks:
            with self.path.open("ab") as f:
                f.write(self.chunks.pop(0))


def test_the_demo_waits_past_fausts_ready_until_the_model_updates_backlog_is_applied(tmp_path: Path) -> None:
    log = GrowingLog(tmp_path / "worker.log", [STARTING, READY, LOADED, REPLAYING, APPLIED, b"later\n"])
    wait_for_worker(log.path, FakeWorker(), model_updates=True, timeout=90, sleep=log.sleep)  # type: ignore[arg-type]
    # before: the replay began at "Ready", 2.7 s before the worker could score its first batch
    assert log.path.read_bytes().endswith(APPLIED) and log.chunks == [b"later\n"]
    assert not worker_ready(STARTING + READY + LOADED + REPLAYING, model_updates=True)
    assert not worker_ready(LOADED + REPLAYING + APPLIED, model_updates=True)  # Faust not ready yet


@pytest.mark.parametrize(
    ("log", "model_updates", "ready"),
    [
        (LOADED + READY + APPLIED, True, True),  # the model loaded before "Ready": the backlog still counts
        (LOADED + READY, True, False),
        (READY + LOADED + NOT_APPLIED, True, True),  # the worker's bounded wait is over: it scores meanwhile
        (READY + LOADED, False, True),  # TAGSTREAM_MODEL_UPDATES_ENABLED=false: no backlog to wait for
        (READY, False, False),
        (READY + NO_MODEL, False, True),  # no model to load
        (READY + NO_MODEL + APPLIED, True, True),
        (READY + APPLIED, True, False),
        (PRELOADED + READY, False, True),
        (PRELOADED + READY + APPLIED, True, True),
        (b"[...] [INFO] the model 1 loaded from here is not a log line of it\n" + READY, False, False),
    ],
)
def test_worker_ready_reads_the_lines_that_say_the_agents_can_score(
    log: bytes, model_updates: bool, ready: bool
) -> None:
    assert worker_ready(log, model_updates=model_updates) is ready


def test_a_worker_that_never_gets_ready_or_exits_is_one_clear_error(tmp_path: Path) -> None:
    log = GrowingLog(tmp_path / "worker.log", [READY, LOADED])
    now = [0.0]

    def sleep(seconds: float) -> None:
        log.sleep(seconds)
        now[0] += seconds

    with pytest.raises(StackError, match=r"not ready \(its model-updates backlog applied\) within 30 s; see .*worker"):
        wait_for_worker(
            log.path,
            FakeWorker(),  # type: ignore[arg-type]
            model_updates=True,
            timeout=30,
            sleep=sleep,
            clock=lambda: now[0],
        )
    assert 30 <= now[0] <= 31
    worker = FakeWorker()
    worker.code = 1
    with pytest.raises(StackError, match=r"the worker exited \(status 1\) before it was ready; see .*worker\.log"):
        wait_for_worker(log.path, worker, model_updates=True, timeout=30, sleep=sleep)  # type: ignore[arg-type]
