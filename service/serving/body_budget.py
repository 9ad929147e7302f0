"""One budget for the request bodies the server holds in memory at the same time.

Uploads stream to disk, but an /infer body and the JSON body of any other route are held whole,
then decoded (parsed JSON costs about ten times its bytes). Each such request takes a lease and
grows it by what it will hold, up front when the length is declared and chunk by chunk otherwise.
A lease that does not fit waits a bounded time for others to finish, then is refused with
ServerBusy (429 with Retry-After), so many clients sending large bodies together cannot push the
server's memory past the budget. A lease alone larger than the whole budget could never fit:
TooLarge (413) at once.

Leases grow and end on the event loop only (the middleware and the /infer route), so the count
needs no lock; waiting is a short sleep loop that never blocks the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import ServerBusy, TooLarge

BUDGET_SETTING = "ENGINE_SERVICE_MAX_INFLIGHT_BODY_BYTES"
_POLL_S = 0.02


class BodyBudget:
    """Bytes of request bodies (times their decoding cost) held at once, across all requests."""

    def __init__(self, max_bytes: int, *, wait_s: float = 5.0) -> None:
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self.held_bytes = 0

    @contextmanager
    def lease(self) -> Iterator[BodyLease]:
        """A lease that starts empty and gives back everything it grew when the block ends."""
        lease = BodyLease(self)
        try:
            yield lease
        finally:
            self.held_bytes -= lease.bytes
            lease.bytes = 0

    async def _take(self, nbytes: int, lease_total: int) -> None:
        if lease_total > self.max_bytes:
            raise TooLarge(
                f"This request would hold about {lease_total} bytes in memory once decoded; the server "
                f"holds at most {self.max_bytes} for all request bodies together ({BUDGET_SETTING}). "
                "Send a smaller batch, or a binary body (npz, raw) instead of JSON.",
                details={"limit": "max_inflight_body_bytes", "max": self.max_bytes},
            )
        deadline = time.monotonic() + self.wait_s
        while self.held_bytes + nbytes > self.max_bytes:
            if time.monotonic() >= deadline:
                raise ServerBusy(
                    f"The server is holding {self.held_bytes} bytes of other requests' bodies and this one "
                    f"needs {nbytes} more; the budget is {self.max_bytes} bytes ({BUDGET_SETTING}). Retry "
                    "in a moment, or send smaller requests.",
                    details={"limit": "max_inflight_body_bytes", "max": self.max_bytes},
                )
            await asyncio.sleep(_POLL_S)
        self.held_bytes += nbytes


class BodyLease:
    """What one request holds of a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.bytes = 0

    async def ensure(self, total: int) -> None:
        """Hold at least ``total`` bytes in all: waits for room, then ServerBusy or TooLarge."""
        more = total - self.bytes
        if more <= 0:
            return
        await self._budget._take(more, total)
        self.bytes += more
