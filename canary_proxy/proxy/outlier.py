"""Outlier protection for the canary: too many connect failures eject it for a cool-down.

Envoy's outlier detection, reduced to the one host that matters here. Each connect failure
to the canary is recorded; when ``canary-outlier-failures`` of them fall within WINDOW
seconds, the canary is ejected for ``canary-outlier-cooldown``: its *weighted* share (rules
``weight`` and ``sticky``) goes to stable, counted as rule ``failover``. Header- and
cookie-forced requests still go to the canary: someone asked for it by name, and
``canary-failover`` already retries its connect failures on stable. When the cool-down ends
the canary gets its share back at once; if it still fails, it is ejected again after the
same number of failures. Failures while ejected are not counted. The state is per process:
with ``--workers N`` each worker ejects on its own evidence. Pure: the caller passes the time.
"""

from __future__ import annotations

from collections import deque

WINDOW = 10.0  # seconds in which the failures must fall


class OutlierDetector:
    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.ejected_until = 0.0  # monotonic time; 0 = not ejected

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def failure(self, now: float, *, threshold: int, cooldown: float) -> bool:
        """Record one connect failure; True when it ejects the canary (0 turns this off)."""
        if threshold <= 0 or self.ejected(now):
            return False
        failures = self.failures
        failures.append(now)
        while failures[0] <= now - WINDOW:
            failures.popleft()
        if len(failures) < threshold:
            return False
        failures.clear()
        self.ejected_until = now + cooldown
        return True

    def expired(self, now: float) -> bool:
        """True once, at the first check after a cool-down ended (to log the return)."""
        if self.ejected_until and now >= self.ejected_until:
            self.ejected_until = 0.0
            return True
        return False

    def reset(self) -> None:
        self.failures.clear()
        self.ejected_until = 0.0
