"""The ``canary-proxy.io/*`` annotations a rollout records on its ConfigMap (names only). Pure.

Shared by the rollout (which writes and decodes them: ``rollout.state``), the ConfigMap
source (which passes them along with the config) and ``get`` (which prints them), so that a
config source does not depend on the rollout package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

PREFIX: Final = "canary-proxy.io/"
PHASE: Final = PREFIX + "phase"
STEPS: Final = PREFIX + "steps"
STEP: Final = PREFIX + "step"
MESSAGE: Final = PREFIX + "message"
LAST_ANALYSIS: Final = PREFIX + "last-analysis"
PROGRESS: Final = PREFIX + "progress"
COMMAND: Final = PREFIX + "command"
KEYS: Final = (PHASE, STEPS, STEP, MESSAGE, LAST_ANALYSIS, PROGRESS, COMMAND)


def recorded(annotations: Mapping[str, str]) -> dict[str, str]:
    """Just the rollout's keys: what a write compares to detect a concurrent change."""
    return {key: annotations[key] for key in KEYS if key in annotations}
