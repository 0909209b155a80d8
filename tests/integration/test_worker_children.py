"""A worker killed with SIGKILL leaves no process behind: its model-validation process (and multiprocessing's
resource tracker) end on their own once their parent is gone."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.integration.conftest import StreamEnv

pytestmark = pytest.mark.integration


def test_a_killed_workers_validation_process_ends_by_itself(stream_env: StreamEnv) -> None:
    worker = stream_env.start_worker(TAGSTREAM_WORKER_ID="w-children")
    parent = psutil.Process(worker.proc.pid)
    deadline = time.monotonic() + 60
    children: list[psutil.Process] = []
    while time.monotonic() < deadline:  # the validation process is started (warmed up) with the worker
        children = parent.children(recursive=True)
        if any("spawn_main" in " ".join(c.cmdline()) for c in children):
            break
        time.sleep(0.2)
    assert any("spawn_main" in " ".join(c.cmdline()) for c in children), [c.cmdline() for c in children]
    worker.kill9()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [(c.pid, c.cmdline()) for c in alive]
