"""Listen addresses: ``HOST:PORT`` parsed once, a started server's bound address, and the
error that names the flag of an address that cannot be bound."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces). ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("HOST:PORT, e.g. 0.0.0.0:8080, [::1]:8080 or :8080")
    host = host.strip("[]") or "0.0.0.0"
    return Address(host, int(port))


def bound_address(server: Any) -> Address:
    """The address a started server listens on (port 0 resolved)."""
    sockname = server.sockets[0].getsockname()
    return Address(sockname[0], sockname[1])


class ListenError(Exception):
    """An address that cannot be bound (in use, or not this host's), named by its flag:
    ``--listen 127.0.0.1:8080: address already in use``."""

    def __init__(self, flag: str, address: Address, exc: OSError) -> None:
        # asyncio rewrites strerror to repeat the address: take the errno's own text.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(f"{flag} {address}: {reason[:1].lower()}{reason[1:]}")
