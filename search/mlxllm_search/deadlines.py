"""The search's own wall-clock budget (--search-seconds) as deadlines: the end of the exploration, and the end of
the search, the confirmations' reserve between them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadlines:
    """Wall-clock ends (epoch seconds, so that spawned workers agree) of the exploration and of the search."""

    explore: float | None = None  # when trials stop starting and training; None: no time budget
    end: float | None = None  # when the confirmations stop too

    @classmethod
    def start(cls, search_seconds: float | None, reserve_s: float, since: float | None = None) -> Deadlines:
        """Deadlines `search_seconds` after `since` (time.time(); default now), the last reserve_s kept back."""
        if search_seconds is None:
            return cls()
        now = time.time() if since is None else since
        return cls(now + search_seconds - reserve_s, now + search_seconds)

    def left(self, confirming: bool = False) -> float:
        """Seconds to the exploration's deadline (`confirming`: to the search's end); inf without a budget."""
        end = self.end if confirming else self.explore
        return math.inf if end is None else end - time.time()
