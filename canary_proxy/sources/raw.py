"""``RawConfig``: one version of a config source, before validation (what every source yields).

A source holds one route (a file with one document, ``--configmap``: ``data``) or several
(a file's documents, ``--config-dir``, ``--configmap-selector``: ``routes``, one
``RawRoute`` each). Either way it yields its whole current content each time it changes;
``ConfigControl`` validates each route on its own, so a bad one never affects the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from ..routes import Origin


@dataclass(frozen=True, slots=True)
class RawRoute:
    """One route of a source that holds several, before validation."""

    name: str  # FILE, FILE#N, or NAMESPACE/NAME; a ``name`` key in ``data`` overrides it
    order: tuple[Any, ...]  # creation order: the earlier of two conflicting routes wins
    digest: str  # of this route's content alone
    data: Mapping[str, Any] | None
    error: ConfigError | None = None
    annotations: Mapping[str, str] | None = None  # a ConfigMap's canary-proxy.io/* (rollout state)
    origin: Origin | None = None  # the Ingress it was read from, in Ingress mode


@dataclass(frozen=True, slots=True)
class RawConfig:
    """One version of the source: the raw mapping, or why it could not be read."""

    digest: str  # of the config alone: two versions with one digest are the same config
    data: Mapping[str, Any] | None
    error: ConfigError | None = None
    # A ConfigMap's rollout state (its ``canary-proxy.io/*`` annotations), which changes
    # without the config; None for a file, whose state the admin port reads beside it.
    annotations: Mapping[str, str] | None = None
    # A source of several routes: each one, and ``data`` is None.
    routes: tuple[RawRoute, ...] | None = None
    # What the source itself reports beside the routes, shown as is in /config (Ingress
    # mode: the Ingresses it could not serve as written, and the annotations it ignores).
    notes: Mapping[str, Any] | None = None
