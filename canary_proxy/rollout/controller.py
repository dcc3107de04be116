"""The rollout controller: one tick = one decision (pure), and the thin loop that runs ticks.

Each tick (once per ``--interval``) the loop samples the metric source, re-reads the state
from the store, and asks ``decide`` what to do; ``decide`` is pure and returns the new state,
the canary's percentage and a log line. The loop writes both in one conflict-safe update.
Because every tick starts from what is stored, a restarted controller resumes where the
last one stopped, and a ``promote``/``abort`` written by another process is seen on the
next tick.

The rules, in the order ``decide`` applies them:

1. A pending command wins: ``abort`` -> weight 0, Aborted; ``promote-full`` -> 100 %,
   Promoted; ``promote`` ends the running step or pause now.
2. While rolling back gradually, step down to the previous weight; at none, RolledBack.
3. The check: a pass resets the consecutive failures, a fail adds one, an inconclusive
   check neither counts nor resets. ``failure_threshold`` consecutive failures roll back
   (weight 0 at once, or stepping down with ``gradual_abort``). Analysis continues in a
   pause: a canary failing while it waits is still rolled back.
4. No conclusive check for ``progress_deadline`` (while a weight step runs) rolls back.
5. A weight step finishes when ``step_duration`` has elapsed and it had a passing check and
   no failure since; the last step (100 %) too, and then the rollout is Promoted. A
   ``mirror:D`` step likewise after D, its checks judging the canary on its mirrored copies.
   A timed pause finishes when its time is up; ``pause`` waits for ``promote``.

A plan with mirror steps also writes ``canary-mirror-percent``: ``mirror_percent`` while a
mirror step runs, 0 from the first weight on and whenever the rollout ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import ConfigError, format_duration, parse_config
from ..runner import Exit
from .analysis import (
    INCONCLUSIVE,
    PASS,
    MetricSource,
    SourceError,
    Thresholds,
    Verdict,
    Window,
    unavailable,
    verdict,
)
from .plan import (
    PROMOTED_PERCENT,
    Mirror,
    Pause,
    Plan,
    describe,
    format_plan,
    mirrors,
    percent_at,
    previous_weight_index,
)
from .state import (
    FINAL,
    RUNNING,
    Phase,
    RolloutState,
    StateError,
    decode,
    encode,
    parse_command,
    recorded,
    timestamp,
)
from .store import Change, Invalid, Missing, Stale, Store, Stored, Unavailable
from .webhooks import Webhooks

log = logging.getLogger(__name__)

EXIT_PROMOTED, EXIT_ROLLED_BACK, EXIT_USAGE, EXIT_UNAVAILABLE = (
    Exit.OK,
    Exit.FAILED,
    Exit.USAGE,
    Exit.UNAVAILABLE,
)
STOPPED = -1  # stopped by a signal; the CLI turns it into 128 + the signal's number
OUTCOME = {"Promoted": EXIT_PROMOTED, "RolledBack": EXIT_ROLLED_BACK, "Aborted": EXIT_ROLLED_BACK}


@dataclass(frozen=True, slots=True)
class Settings:
    """One rollout's parameters. Defaults are the ``rollout`` command's defaults."""

    plan: Plan
    step_duration: float = 60.0  # each weight step lasts at least this long
    interval: float = 15.0  # one tick (and one check) per interval
    window: float = 60.0  # the PromQL range of a check (a scraping source ignores it)
    failure_threshold: int = 2  # consecutive failed checks that roll back
    progress_deadline: float = 600.0  # no conclusive check for this long rolls back
    gradual_abort: bool = False  # roll back through the previous steps, one per tick
    thresholds: Thresholds = field(default_factory=Thresholds)
    mirror_percent: float = 100.0  # canary-mirror-percent during a mirror step


@dataclass(frozen=True, slots=True)
class Decision:
    """What one tick decided: the state and weight to write, and what to log."""

    state: RolloutState
    percent: float  # the canary's share from now on
    message: str  # the log line
    outcome: int | None = None  # the exit code, once the rollout is over
    write: bool = True  # False: nothing to record (the outcome was already recorded)
    warning: bool = False  # log at warning level
    routine: bool = False  # nothing changed (holding): log at debug level
    consumed: str | None = None  # the command annotation this decision handled
    check: str | None = None  # the log line of this tick's check, if one was made
    weight: bool = True  # False: record the state but leave the canary weight as it is


# -- the pure core --------------------------------------------------------------------------


def start(current: RolloutState, s: Settings, *, now: float, restart: bool) -> Decision:
    """The first decision of a controller: begin, resume, or report a finished rollout."""
    steps = format_plan(s.plan)
    if current.phase is None or restart:
        state = _enter(RolloutState(steps=steps), s, 0, now)
        why = "restarted from the first step" if current.phase and restart else "started"
        message = f"rollout {why}: steps {steps}; {describe(s.plan, 0)}"
        return Decision(state.with_(message=message), _percent(state, s), message, consumed=current.command)
    if current.phase in FINAL:
        message = f"rollout already {current.phase}: {current.message} (pass --restart to run it again)"
        return Decision(current, _final_percent(current.phase), message, OUTCOME[current.phase], write=False)
    if current.steps != steps:
        message = (
            f"a rollout with steps {current.steps} is {current.phase}; --steps {steps} differs "
            "(pass the same --steps to resume, or --restart to start over)"
        )
        return Decision(current, 0.0, message, EXIT_USAGE, write=False, warning=True)
    if not 0 <= current.step < len(s.plan):
        message = f"recorded step {current.step} is outside the plan {steps}; pass --restart"
        return Decision(current, 0.0, message, EXIT_USAGE, write=False, warning=True)
    message = f"rollout resumed ({current.phase}) at {describe(s.plan, current.step)}"
    state = current.with_(progress_since=now, message=message)
    return Decision(state, _percent(state, s), message)


def decide(state: RolloutState, s: Settings, *, now: float, check: Verdict | None) -> Decision:
    """One tick. ``check`` is this tick's analysis (None: none was made)."""
    decision = _decide(state, s, now=now, check=check)
    if check is None or state.phase not in RUNNING:
        return decision
    return replace(decision, check=check_line(state, _count(state, s, check, now), s, check))


def _decide(state: RolloutState, s: Settings, *, now: float, check: Verdict | None) -> Decision:
    if state.phase is None or state.phase in FINAL:
        phase = state.phase or "gone"
        message = f"rollout state is {phase} (changed by someone else); stopping"
        outcome = OUTCOME.get(str(state.phase), EXIT_USAGE)
        return Decision(state, _final_percent(phase), message, outcome, write=False, warning=True)
    try:
        action = parse_command(state.command)
    except StateError as exc:
        return Decision(state, _percent(state, s), f"ignored: {exc}", warning=True, consumed=state.command)
    if action is not None:
        return _command(state, s, action, now)
    if state.phase == "RollingBack":
        return _step_down(state, s, now)
    state = _count(state, s, check, now)
    if state.failures >= s.failure_threshold:
        why = f"{state.failures} consecutive failed checks"
        if check is not None and check.reasons:
            why += f"; last: {', '.join(check.reasons)}"
        return _roll_back(state, s, now, why)
    if state.phase == "Progressing" and now - state.progress_since >= s.progress_deadline:
        why = f"no conclusive check for {format_duration(s.progress_deadline)} (--progress-deadline)"
        return _roll_back(state, s, now, why)
    if _step_done(state, s, now):
        return _advance(state, s, now, "step done")
    message = _waiting(state, s, now)
    return Decision(state.with_(message=message), _percent(state, s), message, routine=True)


def _command(state: RolloutState, s: Settings, action: str, now: float) -> Decision:
    used = state.command
    if action == "abort":
        message = f"aborted at {describe(s.plan, state.step)} by request; canary weight 0"
        done = state.with_(phase="Aborted", message=message)
        return Decision(done, 0.0, message, EXIT_ROLLED_BACK, warning=True, consumed=used)
    if state.phase == "RollingBack":
        message = f"ignored {action}: the rollout is rolling back"
        kept = state.with_(message=message)
        return Decision(kept, _percent(state, s), message, warning=True, consumed=used)
    if action == "promote-full":
        message = f"promoted to 100% by request (promote --full) from {describe(s.plan, state.step)}"
        done = state.with_(phase="Promoted", step=len(s.plan) - 1, message=message)
        return Decision(done, PROMOTED_PERCENT, message, EXIT_PROMOTED, consumed=used)
    decision = _advance(state, s, now, "promoted by request")
    return Decision(decision.state, decision.percent, decision.message, decision.outcome, consumed=used)


def _count(state: RolloutState, s: Settings, check: Verdict | None, now: float) -> RolloutState:
    """Fold one check into the counters (and record it)."""
    if check is None:
        return state
    record = {
        "time": timestamp(now),
        "step": state.step,
        "canaryPercent": percent_at(s.plan, state.step),
        **check.as_dict(),
        "limits": s.thresholds.as_dict(),
    }
    state = state.with_(last_analysis=json.dumps(record, separators=(",", ":")))
    if check.result == INCONCLUSIVE:
        return state
    if check.result == PASS:
        return state.with_(passes=state.passes + 1, failures=0, progress_since=now)
    return state.with_(failures=state.failures + 1, progress_since=now)


def _step_done(state: RolloutState, s: Settings, now: float) -> bool:
    step, elapsed = s.plan[state.step], now - state.step_started
    if isinstance(step, Pause):
        return step.duration is not None and elapsed >= step.duration
    duration = step.duration if isinstance(step, Mirror) else s.step_duration
    return elapsed >= duration and state.passes > 0 and state.failures == 0


def _advance(state: RolloutState, s: Settings, now: float, why: str) -> Decision:
    following = state.step + 1
    if following >= len(s.plan):
        message = f"promoted: {why} at {describe(s.plan, state.step)}; the canary serves 100%"
        done = state.with_(phase="Promoted", message=message)
        return Decision(done, PROMOTED_PERCENT, message, EXIT_PROMOTED)
    entered = _enter(state, s, following, now)
    message = f"{why}; now at {describe(s.plan, following)}"
    return Decision(entered.with_(message=message), _percent(entered, s), message)


def _enter(state: RolloutState, s: Settings, index: int, now: float) -> RolloutState:
    phase: Phase = "Paused" if isinstance(s.plan[index], Pause) else "Progressing"
    return state.with_(phase=phase, step=index, step_started=now, progress_since=now, passes=0, failures=0)


def _roll_back(state: RolloutState, s: Settings, now: float, why: str) -> Decision:
    previous = previous_weight_index(s.plan, state.step) if s.gradual_abort else None
    if previous is not None:
        message = f"rolling back ({why}): stepping down to {describe(s.plan, previous)}"
        down = state.with_(phase="RollingBack", step=previous, step_started=now, message=message)
        return Decision(down, percent_at(s.plan, previous), message, warning=True)
    message = f"rolled back ({why}) at {describe(s.plan, state.step)}; canary weight 0"
    done = state.with_(phase="RolledBack", message=message)
    return Decision(done, 0.0, message, EXIT_ROLLED_BACK, warning=True)


def _step_down(state: RolloutState, s: Settings, now: float) -> Decision:
    previous = previous_weight_index(s.plan, state.step)
    if previous is None:
        message = f"rolled back through every step ({state.message}); canary weight 0"
        return Decision(state.with_(phase="RolledBack", message=message), 0.0, message, EXIT_ROLLED_BACK)
    message = f"rolling back: stepping down to {describe(s.plan, previous)}"
    down = state.with_(step=previous, step_started=now, message=message)
    return Decision(down, percent_at(s.plan, previous), message, warning=True)


def _waiting(state: RolloutState, s: Settings, now: float) -> str:
    step, elapsed = s.plan[state.step], now - state.step_started
    where = describe(s.plan, state.step)
    if isinstance(step, Pause):
        until = "promote" if step.duration is None else f"{format_duration(step.duration)} to pass"
        return f"paused at {where} for {elapsed:.0f}s, waiting for {until}"
    duration = step.duration if isinstance(step, Mirror) else s.step_duration
    return (
        f"at {where} for {elapsed:.1f}s of {format_duration(duration)}: "
        f"{state.passes} passing, {state.failures}/{s.failure_threshold} consecutive failed checks"
    )


def _percent(state: RolloutState, s: Settings) -> float:
    return percent_at(s.plan, state.step)


def in_mirror_step(state: RolloutState, s: Settings) -> bool:
    return state.phase in RUNNING and 0 <= state.step < len(s.plan) and isinstance(s.plan[state.step], Mirror)


def mirror_percent(decision: Decision, s: Settings) -> float | None:
    """``canary-mirror-percent`` to write with this decision; None: a plan without mirror
    steps leaves the key alone (it is the user's)."""
    if not mirrors(s.plan):
        return None
    return s.mirror_percent if in_mirror_step(decision.state, s) else 0.0


def _final_percent(phase: str) -> float:
    return PROMOTED_PERCENT if phase == "Promoted" else 0.0


def gates(before: RolloutState, decision: Decision, s: Settings) -> list[str]:
    """The webhooks that must pass before this decision is written: an automatic move into a
    new step asks ``pre-step``, and into 100 % ``confirm-promotion`` first. A human's
    ``promote`` is not gated: they decided."""
    after = decision.state
    if decision.consumed is not None or after.phase not in RUNNING or after.step <= before.step:
        return []
    kinds = ["confirm-promotion"] if decision.percent >= PROMOTED_PERCENT else []
    return [*kinds, "pre-step"]


def held(counted: RolloutState, decision: Decision, s: Settings, kind: str, detail: str) -> Decision:
    """Stay in the current step because a gate said no. ``counted`` is the state before this
    tick with this tick's check folded in, so the check still counts."""
    message = f"holding at {describe(s.plan, counted.step)}: {kind} webhook said no ({detail})"
    kept = counted.with_(message=message)
    return replace(decision, state=kept, percent=_percent(counted, s), message=message, warning=True)


def check_line(before: RolloutState, after: RolloutState, s: Settings, check: Verdict) -> str:
    """The log line of one check: where, verdict, every number compared and the counts."""
    return (
        f"check {check.result} at {describe(s.plan, before.step)}: {check.summary()}; "
        f"consecutive failures {after.failures}/{s.failure_threshold}"
    )


# -- the thin loop ------------------------------------------------------------------------------


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
                parse_config(stored.data)  # the proxies would reject every weight we wrote
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
                counted = _count(before, self.settings, check, now)
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
