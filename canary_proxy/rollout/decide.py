"""One tick of the rollout controller = one decision. No I/O: ``controller`` runs the ticks.

``decide`` takes the recorded state, the settings, the time and this tick's check, and
returns the new state, the canary's percentage and a log line; ``start`` makes a
controller's first decision (begin, resume, or report a finished rollout).

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

import json
from dataclasses import dataclass, field, replace

from ..runner import Exit
from ..values import format_duration
from .analysis import (
    INCONCLUSIVE,
    PASS,
    Thresholds,
    Verdict,
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
    parse_command,
    timestamp,
)

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
    return replace(decision, check=check_line(state, count_check(state, s, check, now), s, check))


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
    state = count_check(state, s, check, now)
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


def count_check(state: RolloutState, s: Settings, check: Verdict | None, now: float) -> RolloutState:
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
