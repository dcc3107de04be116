"""The one lifecycle of ``serve``'s processes: stop signals, background tasks, and teardown.

The single process, the supervisor and each worker run inside ``Lifecycle``:

- the first SIGTERM or SIGINT sets ``stop`` and is named in the logs (``signal_name``);
- a second SIGINT (Ctrl-C again, in a terminal) sets ``hurry``: skip what is left of the
  drain and stop now; any other repeat is logged and changes nothing. SIGINTs are counted,
  not compared with the signal that came first: in a terminal a worker gets Ctrl-C's SIGINT
  and the supervisor's SIGTERM at once, in either order (uvloop keeps no order among pending
  signals), and that pair is one Ctrl-C;
- SIGUSR1 is the supervisor telling a worker to hurry (its own second Ctrl-C): a signal of
  its own, since two SIGINTs sent at once may reach a process as one;
- leaving it cancels the background tasks and waits for them, then blocks SIGTERM and
  SIGINT (and SIGUSR1): the event loop is about to close and restore the default handlers, and a late
  signal must not turn a clean exit 0 into death by signal (-15).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Coroutine
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HURRY_SIGNAL = signal.SIGUSR1  # supervisor -> worker: skip the rest of the drain


class Lifecycle:
    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.signal: signal.Signals | None = None  # the one that set ``stop``, if one did
        self._interrupts = 0  # SIGINTs so far
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def signal_name(self) -> str:
        return self.signal.name if self.signal is not None else "stop"

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(HURRY_SIGNAL, self._on_hurry)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, (*STOP_SIGNALS, HURRY_SIGNAL))  # see the docstring

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGINT:
            self._interrupts += 1
        if not self.stop.is_set():
            self.signal = sig
            self.stop.set()
        elif sig == signal.SIGINT and self._interrupts >= 2 and not self.hurry.is_set():
            log.warning("second SIGINT: stopping now, without waiting for the drain")
            self.hurry.set()
        else:
            log.info("%s: already stopping", sig.name)

    def _on_hurry(self) -> None:
        if not self.hurry.is_set():
            log.warning("told to hurry: stopping now, without waiting for the drain")
            self.signal = self.signal or signal.SIGINT
            self.stop.set()
            self.hurry.set()

    def start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background until the lifecycle ends (then it is cancelled)."""
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        return task

    async def unless_hurried(self, work: Awaitable[Any]) -> bool:
        """Await ``work`` unless ``hurry`` comes first (then cancel it); True if it finished."""
        job = asyncio.ensure_future(work)
        hurried = asyncio.ensure_future(self.hurry.wait())
        try:
            await asyncio.wait({job, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (job, hurried):
                task.cancel()
            await asyncio.gather(job, hurried, return_exceptions=True)
        if job.cancelled():
            return False
        job.result()  # its exception, if it raised one
        return True
