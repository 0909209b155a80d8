"""The worker's event-loop choice (`TAGSTREAM_EVENT_LOOP`): which loop the process creates, and bad values."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop
from pydantic import ValidationError

from streams.eventloop import use_event_loop
from streams.settings import WorkerSettings
from tagstream.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_policy() -> Iterator[None]:
    policy = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(policy)


@pytest.mark.parametrize(("kind", "is_uvloop"), [("uvloop", True), ("asyncio", False)])
def test_the_chosen_loop_runs_coroutines(kind: str, is_uvloop: bool) -> None:
    use_event_loop(kind)

    async def which() -> type:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    loop_type = asyncio.run(which())
    assert issubclass(loop_type, uvloop.Loop) is is_uvloop


def test_the_setting_defaults_to_uvloop_and_refuses_other_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAGSTREAM_EVENT_LOOP", raising=False)
    assert WorkerSettings().event_loop == "uvloop"
    monkeypatch.setenv("TAGSTREAM_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match="event_loop"):
        WorkerSettings()
    with pytest.raises(ConfigError, match="'trio'"):
        use_event_loop("trio")
