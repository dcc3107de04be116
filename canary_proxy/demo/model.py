"""What the demo knows at any moment, for its views: options, the rollout, each version now. Pure."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from ..rollout.plan import Plan
from ..router import CANARY, STABLE

MAX_SPEED: Final = 10.0  # beyond, a check interval is too short to hold a few canary requests
# With --services N, the first N of these, each behind one proxy by its host ``NAME.localhost``.
SERVICE_NAMES: Final = ("shop", "blog")


@dataclass(frozen=True, slots=True)
class DemoOptions:
    bad_canary: str | None = None  # None (healthy), "errors" or "latency"
    fail_at: float = 20.0  # percent of traffic at which a bad canary starts failing
    speed: float = 1.0  # 2 runs twice as fast
    port: int = 0  # the proxy's public port; 0 picks a free one
    admin_port: int = 0
    live: bool | None = None  # None: a live view when stdout is a terminal
    services: int = 1  # stable/canary pairs behind the one proxy, each with its own rollout

    def __post_init__(self) -> None:
        if self.bad_canary not in (None, "errors", "latency"):
            raise ValueError("bad_canary: expected errors or latency")
        if not 0 < self.fail_at <= 100 or not 0 < self.speed <= MAX_SPEED:
            raise ValueError(f"need 0 < fail_at <= 100 and 0 < speed <= {MAX_SPEED:g}")
        if not 1 <= self.services <= len(SERVICE_NAMES):
            raise ValueError(f"services: expected 1 to {len(SERVICE_NAMES)}")


@dataclass
class VersionNow:
    """One version over the last few seconds, from the proxy's /stats."""

    rate: float | None = None  # requests per second
    error_rate: float | None = None  # 5xx share, 0..1
    p50: float | None = None  # seconds
    p99: float | None = None


@dataclass
class CheckRow:
    elapsed: float
    step: str
    result: str
    canary: dict[str, Any]
    stable: dict[str, Any]
    reasons: list[str]
    line: str  # the controller's log line, every number in it


@dataclass
class ServiceModel:
    """One service: its route in the proxy, its rollout, and each of its versions now."""

    name: str  # the route's name and the service's: "default" when it is the only one
    host: str | None = None  # the Host it is routed by; None: any (the only service)
    bad_canary: str | None = None  # its canary's fault: the first service's --bad-canary
    phase: str = "Starting"
    step: str = "-"
    weight: float | None = None  # percent the proxy serves now
    versions: dict[str, VersionNow] = field(
        default_factory=lambda: {STABLE: VersionNow(), CANARY: VersionNow()}
    )
    checks: list[CheckRow] = field(default_factory=list)
    users: Counter[str] = field(default_factory=Counter)
    fault_active: bool = False
    served: dict[str, float] = field(default_factory=dict)  # version -> requests since start
    result: int | None = None  # the rollout's exit code once it is over


@dataclass
class DemoModel:
    options: DemoOptions
    plan: Plan
    started: float = field(default_factory=time.monotonic)
    urls: dict[str, str] = field(default_factory=dict)
    services: list[ServiceModel] = field(default_factory=list)
    events: list[tuple[float, str, bool]] = field(default_factory=list)  # (elapsed, text, warning)

    def __post_init__(self) -> None:
        if not self.services:
            self.services = service_models(self.options)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def several(self) -> bool:
        return len(self.services) > 1

    def about(self, service: ServiceModel, text: str) -> str:
        """A line about one service: with several, it starts with the service's name."""
        return f"{service.name}: {text}" if self.several else text


def service_models(options: DemoOptions) -> list[ServiceModel]:
    """One service is the route ``default`` (a config of today); several are named and
    routed by host, and only the first gets the bad canary."""
    if options.services == 1:
        return [ServiceModel("default", bad_canary=options.bad_canary)]
    return [
        ServiceModel(name, f"{name}.localhost", options.bad_canary if i == 0 else None)
        for i, name in enumerate(SERVICE_NAMES[: options.services])
    ]


def version_now(series: dict[str, Any], version: str, points: int = 3) -> VersionNow:
    """The last ``points`` seconds of one version's /stats series: mean rate, pooled 5xx share,
    and the latest p50/p99."""
    columns = series.get(version, {})
    rates = [r for r in columns.get("requestRate", [])[-points:] if r is not None]
    shares = columns.get("errorRate", [])[-points:]
    served = sum(rates)
    failed = sum(
        (s or 0.0) * (r or 0.0)
        for s, r in zip(shares, columns.get("requestRate", [])[-points:], strict=False)
    )
    latest = {
        key: next((v for v in reversed(columns.get(key, [])[-points:]) if v is not None), None)
        for key in ("p50", "p99")
    }
    return VersionNow(
        rate=served / len(rates) if rates else None,
        error_rate=failed / served if served > 0 else None,
        p50=latest["p50"],
        p99=latest["p99"],
    )
