"""A child process started with `exit_with_parent` ends by itself once its parent is SIGKILLed (which runs no exit
handler to stop it): the model-validation process of a worker, the baseline process of a trainer."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

GRANDCHILD = (
    "import os, sys, time\n"
    "from tagstream.processes import exit_with_parent\n"
    "exit_with_parent(os.getppid(), every_s=0.05)\n"
    "print(os.getpid(), flush=True)\n"
    "time.sleep(120)\n"
)
PARENT = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}])\ntime.sleep(120)\n"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_ends_itself_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.3)  # it keeps running while its parent lives
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child)
    finally:
        parent.kill()
        for proc in psutil.process_iter(["cmdline"]):  # never leave the sleeper behind, whatever failed
            if "exit_with_parent(os.getppid()" in " ".join(proc.info["cmdline"] or []):
                proc.kill()
