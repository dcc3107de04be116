"""Config control: one ``load(raw) -> Config`` for ``check``, ``serve``'s start and every reload.

``ConfigControl`` validates each raw config a source offers and swaps in the good ones; an
invalid update never replaces the last good config (it is logged with the reason and
counted once per distinct content).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import Config, ConfigError, parse_config
from .metrics import Metrics
from .router import DEFAULT_ROUTE
from .sources.raw import RawConfig
from .tls import validate_upstream_ca

log = logging.getLogger(__name__)

OnChange = Callable[[Config, dict[str, Any]], None]


def load(raw: RawConfig) -> Config:
    """The config in ``raw``, fully validated; ConfigError lists every problem."""
    if raw.error is not None:
        raise raw.error
    assert raw.data is not None
    config = parse_config(raw.data)
    validate_upstream_ca(config.upstream_ca)  # the one key that names a file
    return config


@dataclass(frozen=True, slots=True)
class RolloutNotes:
    """A rollout state that came with the config: a ConfigMap's ``canary-proxy.io/*`` annotations."""

    store: str  # where it is kept, as ``status`` names it: "configmap shop/canary-proxy"
    annotations: Mapping[str, str]


class ConfigControl:
    """Validates each raw config the source offers; swaps in good ones, counts bad ones once.

    An offer with the digest of the one before -- a ConfigMap whose rollout annotations alone
    changed -- only updates ``rollout_notes``: it is no reload, and is neither logged nor
    counted.
    """

    def __init__(self, metrics: Metrics, on_change: list[OnChange]) -> None:
        self.metrics = metrics
        self.on_change = on_change
        self.current: Config | None = None
        self.current_raw: dict[str, Any] | None = None
        self.rollout_notes: RolloutNotes | None = None  # ConfigMap mode: for the dashboard
        self._last: tuple[str, bool] | None = None  # the last offer's digest, and if it was taken

    def offer(self, raw: RawConfig, *, origin: str) -> bool:
        if raw.annotations is not None:
            # A ConfigMap source's origin is "configmap NS/NAME", as its rollout store names it.
            self.rollout_notes = RolloutNotes(origin, raw.annotations)
        if self._last is not None and self._last[0] == raw.digest:
            return self._last[1]
        accepted = self._take(raw, origin=origin)
        self._last = (raw.digest, accepted)
        return accepted

    def _take(self, raw: RawConfig, *, origin: str) -> bool:
        try:
            config = load(raw)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("failure").inc()
            log.error(
                "rejected new config from %s, keeping the last good one: %s",
                origin,
                "; ".join(exc.errors),
                extra={"errors": exc.errors},
            )
            return False
        assert raw.data is not None
        changed = config != self.current
        self.current = config
        self.current_raw = dict(raw.data)
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_success.set(time.time())
        self.metrics.weight_ratio.labels(DEFAULT_ROUTE).set(config.weight_ratio)
        if changed:
            for callback in self.on_change:
                callback(config, self.current_raw)
        effective = config.effective()
        log.info(
            "config loaded from %s: canary-weight %s/%s",
            origin,
            effective["canary-weight"],
            config.canary_weight_total,
            extra={"effective": effective},
        )
        return True

    async def follow(self, updates: AsyncIterator[RawConfig], *, origin: str) -> None:
        async for raw in updates:
            self.offer(raw, origin=origin)
