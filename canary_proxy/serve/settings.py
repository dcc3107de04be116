"""``serve``'s process settings, declared once: the CLI fills them by field name, and the
supervisor hands them to its workers as JSON (the config itself comes from the source)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..address import Address
from ..config import Config, parse_config
from ..proxy.limits import Limits


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings from the CLI: each field is the ``serve`` flag of the same name."""

    listen: Address = Address("0.0.0.0", 8080)  # noqa: RUF009 (Address is frozen)
    admin_listen: Address = Address("0.0.0.0", 9090)  # noqa: RUF009
    workers: int = 1
    drain_delay: float = 5.0
    shutdown_timeout: float = 30.0
    access_log: bool = True
    config_path: str | None = None  # --config
    log_format: str = "json"
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)  # its fields are flags too
    tls_cert: str | None = None  # with tls_key: the public port speaks TLS; reloaded on change
    tls_key: str | None = None
    default_backend: str | None = None  # --default-backend URL: takes what no route matches
    nginx_metrics: bool = False  # --nginx-metrics: ingress-nginx's families for Ingress routes

    def default_backend_config(self) -> Config | None:
        """The default backend as a config of its own: both versions at that URL, weight 0."""
        if not self.default_backend:
            return None
        return parse_config({"stable-url": self.default_backend, "canary-url": self.default_backend})

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Settings:
        """From parsed flags (``vars(args)``), matching field names; the rest keep defaults."""
        limits = Limits(**{f.name: options[f.name] for f in fields(Limits) if f.name in options})
        given = {f.name: options[f.name] for f in fields(cls) if f.name in options}
        return cls(**{**given, "limits": limits})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        raw: dict[str, Any] = json.loads(text)
        # JSON has no tuples: trust_forwarded_from comes back as a list.
        limits: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["limits"].items()}
        return cls(
            **{
                **raw,
                "listen": Address(**raw["listen"]),
                "admin_listen": Address(**raw["admin_listen"]),
                "limits": Limits(**limits),
            }
        )
