"""The step plan: ``--steps 5,10,pause,pause:10m,25,100`` -> a tuple of steps. Pure, no I/O.

A number is a percentage of traffic for the canary, whatever the config's
``canary-weight-total``. ``pause`` holds the current weight until ``promote``; ``pause:D``
holds it for the duration D (as Argo Rollouts' ``pause: {}`` and ``pause: {duration}``).
``mirror:D`` copies stable's traffic to the canary (``canary-mirror-percent``) for at least
D while no user is routed to it, and the analysis judges the canary on those copies
(Argo Rollouts' ``setMirrorRoute``, Flagger's ``mirror``); mirror steps come before any
weight. The weights must rise and the plan must end at 100: users only ever move from
stable to the canary, and "promoted" means the canary serves everything.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..values import format_duration, parse_duration

PROMOTED_PERCENT = 100.0


class PlanError(ValueError):
    """An invalid ``--steps`` value; the message says what was expected."""


@dataclass(frozen=True, slots=True)
class SetWeight:
    percent: float  # 0 < percent <= 100

    def __str__(self) -> str:
        return _number(self.percent)


@dataclass(frozen=True, slots=True)
class Pause:
    duration: float | None  # seconds; None: until promote

    def __str__(self) -> str:
        return "pause" if self.duration is None else f"pause:{format_duration(self.duration)}"


@dataclass(frozen=True, slots=True)
class Mirror:
    duration: float  # seconds: at least this long, and until a check passes

    def __str__(self) -> str:
        return f"mirror:{format_duration(self.duration)}"


Step = SetWeight | Pause | Mirror
Plan = tuple[Step, ...]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def parse_step(text: str) -> Step:
    word = text.strip()
    if word == "pause":
        return Pause(None)
    if word.startswith("mirror"):
        try:
            return Mirror(parse_duration(word.removeprefix("mirror").removeprefix(":")))
        except ValueError as exc:
            raise PlanError(f"{word!r}: expected mirror:DURATION with {exc}") from None
    if word.startswith("pause:"):
        try:
            return Pause(parse_duration(word.removeprefix("pause:")))
        except ValueError as exc:
            raise PlanError(f"{word!r}: expected pause:DURATION with {exc}") from None
    try:
        percent = float(word.removesuffix("%"))
    except ValueError:
        raise PlanError(
            f"{word!r}: expected a percentage (0 < N <= 100), pause, pause:DURATION or mirror:DURATION"
        ) from None
    if not 0 < percent <= PROMOTED_PERCENT:
        raise PlanError(f"{word!r}: expected a percentage greater than 0 and at most 100")
    return SetWeight(percent)


def parse_plan(text: str) -> Plan:
    """Parse and validate a comma-separated plan; PlanError names the offending step."""
    words = text.split(",")
    if not text.strip() or any(not w.strip() for w in words):
        raise PlanError(f"{text!r}: expected comma-separated steps such as 5,10,pause,50,100")
    plan = tuple(parse_step(w) for w in words)
    weights = [s.percent for s in plan if isinstance(s, SetWeight)]
    for before, after in itertools.pairwise(weights):
        if after <= before:
            raise PlanError(
                f"{text!r}: weights must rise ({_number(before)} then {_number(after)}): "
                "a user must never move back from the canary to stable"
            )
    first_weight = next((i for i, step in enumerate(plan) if isinstance(step, SetWeight)), len(plan))
    if any(isinstance(step, Mirror) for step in plan[first_weight:]):
        raise PlanError(
            f"{text!r}: mirror steps come before any weight: once users reach the canary, "
            "copies of stable's traffic tell nothing more"
        )
    last = plan[-1]
    if not isinstance(last, SetWeight) or last.percent != PROMOTED_PERCENT:
        raise PlanError(f"{text!r}: the last step must be 100 (the canary serves all traffic)")
    return plan


def mirrors(plan: Plan) -> bool:
    return any(isinstance(step, Mirror) for step in plan)


def format_plan(plan: Plan) -> str:
    """The canonical text of a plan, as recorded in the ``canary-proxy.io/steps`` annotation."""
    return ",".join(str(step) for step in plan)


def percent_at(plan: Plan, index: int) -> float:
    """The canary's percentage while step ``index`` runs: the last weight set at or before it."""
    for step in reversed(plan[: index + 1]):
        if isinstance(step, SetWeight):
            return step.percent
    return 0.0


def previous_weight_index(plan: Plan, index: int) -> int | None:
    """The index of the last weight step before ``index`` with a lower weight, if any."""
    current = percent_at(plan, index)
    for i in range(min(index, len(plan)) - 1, -1, -1):
        step = plan[i]
        if isinstance(step, SetWeight) and step.percent < current:
            return i
    return None


def describe(plan: Plan, index: int) -> str:
    """``step 3/6 (pause, canary at 10%)`` for log lines and ``status``."""
    step = plan[index]
    where = f"step {index + 1}/{len(plan)}"
    if isinstance(step, Mirror):
        return f"{where} ({step}, mirroring to the canary, no users on it)"
    if isinstance(step, Pause):
        return f"{where} ({step}, canary at {_number(percent_at(plan, index))}%)"
    return f"{where} ({_number(step.percent)}%)"
