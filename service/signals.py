"""A wake-up call from the routes to the outbox relay, in this process."""

from __future__ import annotations

import asyncio


class Wakeup:
    """Set by a route after it committed an event; the relay waits on it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        """Tell the relay there is something to publish."""
        self._event.set()

    async def wait(self, timeout: float) -> None:
        """Return when set (clearing it) or after *timeout* seconds, whichever comes first."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return
        finally:
            self._event.clear()
