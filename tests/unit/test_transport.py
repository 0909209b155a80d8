"""The consumer's inline message hand-off behaves like awaiting the callback, blocked or not."""

from __future__ import annotations

import asyncio

import pytest

from streams.transport import run_inline_first


async def test_a_callback_that_does_not_block_finishes_inline() -> None:
    seen: list[int] = []

    async def callback() -> None:
        seen.append(1)

    assert run_inline_first(callback()) is None
    assert seen == [1]


async def test_a_blocked_callback_is_finished_by_the_returned_coroutine() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def callback() -> str:
        steps.append("before")
        got = await gate
        steps.append(f"after {got}")
        await asyncio.sleep(0)
        return "done"

    rest = run_inline_first(callback())
    assert rest is not None and steps == ["before"]
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    assert not task.done()
    gate.set_result("open")
    assert await task == "done"
    assert steps == ["before", "after open"]


async def test_errors_propagate_before_and_after_blocking() -> None:
    async def fails_at_once() -> None:
        raise ValueError("bad message")

    with pytest.raises(ValueError, match="bad message"):
        run_inline_first(fails_at_once())

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def fails_later() -> None:
        await gate
        raise KeyError("later")

    rest = run_inline_first(fails_later())
    assert rest is not None
    gate.set_result(None)
    with pytest.raises(KeyError):
        await rest


async def test_cancelling_a_blocked_callback_runs_its_cleanup() -> None:
    cleaned: list[bool] = []

    async def callback() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    rest = run_inline_first(callback())
    assert rest is not None
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]
