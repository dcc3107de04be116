"""``RawConfig``: one version of a config source, before validation (what every source yields)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError


@dataclass(frozen=True, slots=True)
class RawConfig:
    """One version of the source: the raw mapping, or why it could not be read."""

    digest: str  # of the config alone: two versions with one digest are the same config
    data: Mapping[str, Any] | None
    error: ConfigError | None = None
    # A ConfigMap's rollout state (its ``canary-proxy.io/*`` annotations), which changes
    # without the config; None for a file, whose state the admin port reads beside it.
    annotations: Mapping[str, str] | None = None
