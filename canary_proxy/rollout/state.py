"""The recorded rollout state, as ``canary-proxy.io/*`` annotations (string -> string). Pure.

The same flat mapping is stored as ConfigMap annotations or, in file mode, as a JSON file
beside the config, so both stores share this one format:

- ``phase``: Progressing, Paused, RollingBack, Promoted, RolledBack or Aborted
- ``steps``: the plan, canonical (``5,10,pause,25,100``); a restart must match it
- ``step``: the 0-based index of the running step
- ``message``: what the controller last did or is waiting for, for humans
- ``last-analysis``: the last check as JSON, with its numbers and limits
- ``progress``: JSON timers and counters, so a restarted controller resumes mid-step
- ``command``: written by ``promote``/``abort`` (``promote``, ``promote-full``, ``abort``,
  then optionally a nonce); the controller deletes it once handled
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

from ..annotations import (  # the names are shared with the ConfigMap source
    COMMAND,
    KEYS,
    LAST_ANALYSIS,
    MESSAGE,
    PHASE,
    PREFIX,
    PROGRESS,
    STEP,
    STEPS,
    recorded,
)

__all__ = [  # the annotation names are re-exported: a rollout speaks of them as its state
    "ACTIONS",
    "COMMAND",
    "FINAL",
    "KEYS",
    "LAST_ANALYSIS",
    "MESSAGE",
    "PHASE",
    "PHASES",
    "PREFIX",
    "PROGRESS",
    "RUNNING",
    "STEP",
    "STEPS",
    "Action",
    "Phase",
    "RolloutState",
    "StateError",
    "decode",
    "encode",
    "parse_command",
    "parse_timestamp",
    "recorded",
    "timestamp",
]

Phase = Literal["Progressing", "Paused", "RollingBack", "Promoted", "RolledBack", "Aborted"]
PHASES: Final[tuple[Phase, ...]] = (
    "Progressing",
    "Paused",
    "RollingBack",
    "Promoted",
    "RolledBack",
    "Aborted",
)
FINAL: Final[frozenset[str]] = frozenset({"Promoted", "RolledBack", "Aborted"})
RUNNING: Final[frozenset[str]] = frozenset({"Progressing", "Paused"})

Action = Literal["promote", "promote-full", "abort"]
ACTIONS: Final[tuple[Action, ...]] = ("promote", "promote-full", "abort")


class StateError(ValueError):
    """The recorded annotations cannot be read back (edited by hand, or another tool's)."""


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Everything a controller needs to take its next step; rebuilt from the store each tick."""

    phase: Phase | None = None  # None: no rollout has run on this config
    steps: str | None = None
    step: int = 0
    message: str = ""
    step_started: float = 0.0  # unix time the running step began
    progress_since: float = 0.0  # unix time of the last conclusive check (or step start/resume)
    passes: int = 0  # passing checks in the running step
    failures: int = 0  # consecutive failed checks
    last_analysis: str | None = None  # JSON, kept verbatim
    command: str | None = None  # a pending promote/abort, verbatim

    def with_(self, **changes: Any) -> RolloutState:
        return replace(self, **changes)


def parse_command(value: str | None) -> Action | None:
    """``"promote-full 3f2a"`` -> ``"promote-full"``; None if absent; StateError if unknown."""
    if value is None or not value.strip():
        return None
    word = value.split()[0]
    for action in ACTIONS:
        if word == action:
            return action
    raise StateError(f"{COMMAND}: unknown command {value!r}; expected one of {', '.join(ACTIONS)}")


def timestamp(seconds: float) -> str:
    """Unix time -> RFC 3339 UTC with milliseconds, as Kubernetes writes times."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def decode(annotations: Mapping[str, str]) -> RolloutState:
    """The state recorded in ``annotations``; other keys are ignored. StateError if malformed."""
    phase = annotations.get(PHASE)
    if phase is None:
        return RolloutState(command=annotations.get(COMMAND))
    if phase not in PHASES:
        raise StateError(f"{PHASE}: unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    try:
        step = int(annotations.get(STEP, "0"))
        progress = json.loads(annotations.get(PROGRESS) or "{}")
        return RolloutState(
            phase=phase,  # checked against PHASES above
            steps=annotations.get(STEPS),
            step=step,
            message=annotations.get(MESSAGE, ""),
            step_started=parse_timestamp(progress["stepStarted"]),
            progress_since=parse_timestamp(progress["progressSince"]),
            passes=int(progress["passes"]),
            failures=int(progress["failures"]),
            last_analysis=annotations.get(LAST_ANALYSIS),
            command=annotations.get(COMMAND),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"unreadable rollout state ({type(exc).__name__}: {exc})") from None


def encode(state: RolloutState) -> dict[str, str | None]:
    """The annotations to write for ``state`` (None removes a key). Never writes ``command``:
    only ``promote``/``abort`` do, and the controller only ever removes it."""
    if state.phase is None:
        return {key: None for key in KEYS if key != COMMAND}
    progress = {
        "stepStarted": timestamp(state.step_started),
        "progressSince": timestamp(state.progress_since),
        "passes": state.passes,
        "failures": state.failures,
    }
    return {
        PHASE: state.phase,
        STEPS: state.steps,
        STEP: str(state.step),
        MESSAGE: state.message,
        LAST_ANALYSIS: state.last_analysis,
        PROGRESS: json.dumps(progress, separators=(",", ":")),
    }
