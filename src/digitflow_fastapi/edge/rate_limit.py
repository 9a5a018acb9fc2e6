"""A per-client token bucket (`RATE_LIMIT`, e.g. `100/second`) for this worker, bounded in memory.

Each client (its API key when keys are on, else its address) gets a bucket of `count` tokens
refilled at `count / period` per second; a request takes one token or is refused with 429 and
`Retry-After` (whole seconds until the next token). Buckets live in an LRU of at most
`max_clients`: a bucket idle long enough to have refilled is the same as a new one, so dropping
the least recently seen loses nothing unless more than `max_clients` clients are active at once.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from digitflow_fastapi.responses import OrjsonResponse


class RateLimiter:
    """Token buckets keyed by client, in an LRU of at most `max_clients` entries."""

    def __init__(
        self,
        count: int,
        period_s: float,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = float(count)
        self.rate = count / period_s
        self.max_clients = max_clients
        self.clock = clock
        self.description = f"{count} per {period_s:g} s"
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def wait_s(self, client: Hashable) -> float:
        """Take a token for `client`: 0.0 when allowed, else seconds until a token is there."""
        now = self.clock()
        buckets = self._buckets
        entry = buckets.get(client)
        if entry is None:
            tokens = self.capacity
            if len(buckets) >= self.max_clients:
                buckets.popitem(last=False)
        else:
            level, seen = entry
            tokens = min(self.capacity, level + (now - seen) * self.rate)
            buckets.move_to_end(client)
        if tokens >= 1.0:
            buckets[client] = (tokens - 1.0, now)
            return 0.0
        buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def refusal(self, client: Hashable) -> OrjsonResponse | None:
        """429 with `Retry-After` when `client` is over the limit, else None."""
        wait = self.wait_s(client)
        if wait <= 0.0:
            return None
        return OrjsonResponse(
            {"detail": f"rate limit exceeded (RATE_LIMIT: {self.description} per client)"},
            status_code=429,
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
