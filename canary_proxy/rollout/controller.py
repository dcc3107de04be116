"""The rollout controller's thin loop: sample, re-read the state, ``decide``, write; repeat.

Each tick (once per ``--interval``) samples the metric source, re-reads the state from the
store, and asks ``decide.decide`` what to do (the rules are listed there); it writes the new
state and the canary's percentage in one conflict-safe update. Because every tick starts
from what is stored, a restarted controller resumes where the last one stopped, and a
``promote``/``abort`` written by another process is seen on the next tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..config import ConfigError
from ..router import DEFAULT_ROUTE
from ..routes import parse_route
from .analysis import MetricSource, SourceError, Verdict, Window, unavailable, verdict
from .decide import (
    EXIT_ROLLED_BACK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    STOPPED,
    Decision,
    Settings,
    count_check,
    decide,
    gates,
    held,
    in_mirror_step,
    mirror_percent,
    start,
)
from .plan import PROMOTED_PERCENT, percent_at
from .state import RUNNING, RolloutState, StateError, decode, encode, recorded
from .store import Change, Invalid, Missing, Stale, Store, Stored, Unavailable
from .webhooks import Webhooks

log = logging.getLogger(__name__)


class Controller:
    """Runs ticks against a store and a metric source until the rollout is over or stopped."""

    def __init__(
        self,
        store: Store,
        source: MetricSource,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        webhooks: Webhooks | None = None,
    ) -> None:
        self.store, self.source, self.settings, self.clock = store, source, settings, clock
        self.webhooks = webhooks

    async def run(self, *, restart: bool = False, stop: asyncio.Event | None = None) -> int:
        """The exit code: 0 promoted, 1 rolled back or aborted, 2 unusable state, 3 unavailable;
        or STOPPED once ``stop`` is set, leaving the state for a later run to resume."""
        stop = stop or asyncio.Event()
        try:
            first = await self._begin(restart)
        except (Missing, Unavailable) as exc:
            log.error("%s", exc)
            return EXIT_UNAVAILABLE
        except (Invalid, StateError) as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        if first is not None:
            return first
        await self._sample()  # a scraping source's first sample is its baseline
        last_ok = self.clock()
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.settings.interval
        while not await _stopped(stop, next_tick - loop.time()):
            next_tick = max(next_tick + self.settings.interval, loop.time())
            try:
                outcome = await self._tick()
                last_ok = self.clock()
            except Missing as exc:
                log.error("%s; stopping", exc)
                return EXIT_UNAVAILABLE
            except (Unavailable, Invalid, StateError) as exc:
                # A blip, or a file caught mid-edit: keep the weight and try again next tick.
                outcome = self._unavailable(exc, last_ok)
            if outcome is not None:
                return outcome
        log.info("stopped by signal; the state is kept: run the same command to resume")
        return STOPPED

    async def _begin(self, restart: bool) -> int | None:
        for _ in range(5):  # a concurrent write (e.g. a promote) makes us decide again
            stored = await self.store.load()
            try:
                # Else the proxies would reject every weight we wrote. As a route: the
                # ConfigMap of one route also holds its name, host and path.
                parse_route(stored.data, name=DEFAULT_ROUTE)
            except ConfigError as exc:
                raise Invalid(f"{self.store.description}: invalid config: {'; '.join(exc.errors)}") from None
            current = decode_or_blank(stored.annotations) if restart else decode(stored.annotations)
            decision = start(current, self.settings, now=self.clock(), restart=restart)
            fresh = current.phase is None or restart
            if fresh and decision.outcome is None and self.webhooks is not None:
                refused = await self._pre_rollout(decision)
                if refused is not None:
                    decision = refused
            try:
                if decision.write:
                    await self._commit(stored, decision)
            except Stale:
                continue
            _log(decision, self.store)
            self._notify(current, decision)
            return decision.outcome
        raise Unavailable(f"{self.store.description}: kept changing under us")

    async def _tick(self) -> int | None:
        sampled = await self._sample()
        for _ in range(5):  # a concurrent write (e.g. a promote) makes us decide again
            stored = await self.store.load()
            state = decode(stored.annotations)
            check = self._judge(sampled, state)
            now = self.clock()
            decision = decide(state, self.settings, now=now, check=check)
            decision = await self._gate(state, decision, check, now)
            try:
                if decision.write:
                    await self._commit(stored, decision)
            except Stale:
                continue
            if decision.check is not None and check is not None:
                _log_check(decision.check, state, self.settings, check)
            _log(decision, self.store)
            self._notify(state, decision)
            return decision.outcome
        raise Unavailable(f"{self.store.description}: kept changing under us")

    # -- webhooks -------------------------------------------------------------------------------

    def _payload(self, kind: str, decision: Decision) -> dict[str, Any]:
        assert self.webhooks is not None
        state = decision.state
        return self.webhooks.payload(
            kind, phase=state.phase, step=state.step, weight=decision.percent,
            analysis=state.last_analysis, message=decision.message,
        )  # fmt: skip

    async def _pre_rollout(self, decision: Decision) -> Decision | None:
        """A refused pre-rollout ends the rollout before any traffic moves: no weight written."""
        assert self.webhooks is not None
        if not self.webhooks.has("pre-rollout"):
            return None
        answer = await self.webhooks.gate("pre-rollout", self._payload("pre-rollout", decision))
        if answer.ok:
            return None
        message = f"rolled back before any traffic moved: pre-rollout webhook said no ({answer.detail})"
        state = decision.state.with_(phase="RolledBack", message=message)
        return Decision(state, 0.0, message, EXIT_ROLLED_BACK, warning=True, weight=False)

    async def _gate(
        self, before: RolloutState, decision: Decision, check: Verdict | None, now: float
    ) -> Decision:
        if self.webhooks is None:
            return decision
        for kind in gates(before, decision, self.settings):
            if not self.webhooks.has(kind):
                continue
            answer = await self.webhooks.gate(kind, self._payload(kind, decision))
            if not answer.ok:
                counted = count_check(before, self.settings, check, now)
                return held(counted, decision, self.settings, kind, answer.detail)
        return decision

    def _notify(self, before: RolloutState, decision: Decision) -> None:
        """``event`` on every phase change; ``rollback`` once, when a rollback starts."""
        hooks, after = self.webhooks, decision.state
        if hooks is None or not decision.write or before.phase == after.phase:
            return
        hooks.fire("event", self._payload("event", decision))
        backing = {"RollingBack", "RolledBack", "Aborted"}
        if after.phase in backing and before.phase not in backing:
            hooks.fire("rollback", self._payload("rollback", decision))

    async def _sample(self) -> Window | Verdict:
        try:
            return await self.source.sample(self.settings.window)
        except SourceError as exc:
            return unavailable(str(exc))

    def _judge(self, sampled: Window | Verdict, state: RolloutState) -> Verdict | None:
        if state.phase not in RUNNING:
            return None
        if isinstance(sampled, Verdict):
            return sampled
        if in_mirror_step(state, self.settings):
            judged = verdict(sampled.mirrored(), self.settings.thresholds, relative=True)
            return replace(judged, notes=("canary judged on its mirrored copies", *judged.notes))
        relative = percent_at(self.settings.plan, state.step) < PROMOTED_PERCENT
        return verdict(sampled, self.settings.thresholds, relative=relative)

    async def _commit(self, seen: Stored, decision: Decision) -> None:
        """Write the decision, unless the rollout's keys changed since ``seen`` was read."""
        expected = recorded(seen.annotations)

        def mutate(current: Stored) -> Change:
            if recorded(current.annotations) != expected:
                raise Stale("the rollout state changed since it was read")
            percent = decision.percent if decision.weight else None
            mirror = mirror_percent(decision, self.settings) if decision.weight else None
            return Change(percent, encode(decision.state), drop_command=decision.consumed, mirror=mirror)

        await self.store.update(mutate)

    def _unavailable(self, exc: Exception, last_ok: float) -> int | None:
        """Give up only once the store has been unusable for the whole progress deadline."""
        down = self.clock() - last_ok
        if down >= self.settings.progress_deadline:
            log.error("%s; unusable for %.0fs (--progress-deadline): giving up", exc, down)
            return EXIT_UNAVAILABLE if isinstance(exc, Unavailable) else EXIT_USAGE
        log.warning("%s; retrying next interval (unusable for %.0fs)", exc, down)
        return None


def decode_or_blank(annotations: Any) -> RolloutState:
    """For --restart: the recorded state if readable (to consume its command), else blank."""
    try:
        return decode(annotations)
    except StateError:
        return RolloutState()


async def _stopped(stop: asyncio.Event, delay: float) -> bool:
    """Wait ``delay`` seconds; True if ``stop`` was set meanwhile."""
    try:
        async with asyncio.timeout(max(0.0, delay)):
            await stop.wait()
    except TimeoutError:
        return stop.is_set()
    return True


def _log(decision: Decision, store: Store) -> None:
    state = decision.state
    extra = {
        "store": store.description,
        "phase": state.phase,
        "step": state.step,
        "canary_percent": decision.percent,
    }
    if decision.outcome is not None:
        extra["exit_code"] = decision.outcome
    level = logging.WARNING if decision.warning else logging.DEBUG if decision.routine else logging.INFO
    log.log(level, "%s", decision.message, extra=extra)


def _log_check(line: str, state: RolloutState, s: Settings, check: Verdict) -> None:
    level = logging.WARNING if check.result == "fail" else logging.INFO
    extra = {"check": check.as_dict(), "step": state.step, "canary_percent": percent_at(s.plan, state.step)}
    log.log(level, "%s", line, extra=extra)
