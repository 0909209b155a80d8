"""Per-product locks: batches that share no product run at once; a batch waits only for earlier ones sharing one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager


class Hold:
    """The products one batch holds; `take_free` adds free ones, and all are released together when the batch ends."""

    def __init__(self, locks: ProductLocks) -> None:
        self._locks = locks
        self._released = asyncio.get_running_loop().create_future()
        self._after: dict[str, asyncio.Future[None] | None] = {}  # product -> the hold it queued behind (if any)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._after

    async def _queue(self, product_ids: Iterable[str]) -> None:
        """Queue for these products behind every earlier hold of them, all at once, and wait until those are
        released (holds queue in one order, so none waits for a later one: no deadlock)."""
        tails = self._locks._tails
        for pid in product_ids:
            if pid not in self._after:
                self._after[pid] = tails.get(pid)
                tails[pid] = self._released
        earlier = {f for f in self._after.values() if f is not None and not f.done()}
        if earlier:
            await asyncio.wait(earlier)

    def take_free(self, product_ids: Iterable[str]) -> list[str]:
        """Add the products no other hold has or awaits, without waiting (waiting while holding could deadlock);
        return those this hold now has."""
        tails = self._locks._tails
        taken = []
        for pid in product_ids:
            if pid not in self._after:
                tail = tails.get(pid)
                if tail is not None and not tail.done():
                    continue
                self._after[pid] = None
                tails[pid] = self._released
            taken.append(pid)
        return taken

    def release(self) -> None:
        """Let the holds queued behind this one go on."""
        tails = self._locks._tails
        for pid in self._after:
            if tails.get(pid) is self._released:
                del tails[pid]
        if not self._released.done():
            self._released.set_result(None)


class ProductLocks:
    """First come, first served per product, so a product's effects (and the updates they emit) keep their order
    while batches with disjoint products (a few product changes and a behaviour batch, mostly) need not wait for each
    other."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}  # product -> the latest hold queued for it

    def __len__(self) -> int:
        return len(self._tails)

    @asynccontextmanager
    async def hold(self, product_ids: Iterable[str], within: Hold | None = None) -> AsyncIterator[Hold]:
        """Hold these products for the block, after every earlier hold of any of them. With `within`, a hold the
        caller has already, which must have them all (it is released with its own block, not here)."""
        if within is not None:
            missing = [pid for pid in product_ids if pid not in within]
            if missing:
                raise RuntimeError(f"{len(missing)} product(s) not in the caller's hold, e.g. {missing[0]}")
            yield within
            return
        held = Hold(self)
        try:
            await held._queue(product_ids)
            yield held
        finally:
            held.release()
