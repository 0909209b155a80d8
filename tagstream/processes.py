"""Helpers for the child processes tagstream starts (model validation, the training baseline)."""

from __future__ import annotations

import contextlib
import os
import threading
import time

__all__ = ["background_child", "exit_with_parent"]


def background_child(parent_pid: int, niceness: int) -> None:
    """Set up a helper process tagstream starts: `niceness` below its priority (the parent's own threads win the
    cores, the helper takes the slack) and ended once `parent_pid` is gone (a SIGKILLed parent runs no exit handler
    to stop it)."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no os.nice on this platform
        os.nice(niceness)
    exit_with_parent(parent_pid)


def exit_with_parent(parent_pid: int, every_s: float = 1.0) -> None:
    """End this process (exit status 1) once it is no longer a child of `parent_pid`: at once if it already is not
    (the parent died while this process was starting), else from a daemon thread checking every `every_s`."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
