"""Config from a local YAML file, re-read when it changes.

Polls ``stat`` (following symlinks) and compares the bytes, which catches every way a file
is updated: written in place, replaced by a rename, or swapped the way Kubernetes updates a
mounted ConfigMap (an atomic re-point of the ``..data`` symlink, which inotify on the file
itself would miss). A poll of a few hundred ms is far inside the 1 s reload budget and costs
one stat(2).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25  # seconds; the reload budget is 1 s
SETTLE = 0.05  # seconds between seeing a change and reading it


@dataclass(frozen=True, slots=True)
class RawConfig:
    """One version of the source: the raw mapping, or why it could not be read."""

    digest: str  # of the config alone: two versions with one digest are the same config
    data: Mapping[str, Any] | None
    error: ConfigError | None = None
    # A ConfigMap's rollout state (its ``canary-proxy.io/*`` annotations), which changes
    # without the config; None for a file, whose state the admin port reads beside it.
    annotations: Mapping[str, str] | None = None


def load_file(path: str | Path) -> RawConfig:
    """Read and YAML-parse ``path``. Never raises: problems come back as ``error``."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        return RawConfig(f"oserror:{exc.errno}", None, ConfigError([f"{path}: cannot read ({exc.strerror})"]))
    return parse_yaml(content, origin=str(path))


def parse_yaml(content: bytes, *, origin: str) -> RawConfig:
    digest = hashlib.sha256(content).hexdigest()
    try:
        data = yaml.safe_load(content)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an int of over 4300 digits
        return RawConfig(digest, None, ConfigError([f"{origin}: invalid YAML ({exc})"]))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return RawConfig(digest, None, ConfigError([f"{origin}: expected a mapping of keys to values"]))
    return RawConfig(digest, {str(k): v for k, v in data.items()})


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


async def changes(paths: Sequence[str], *, interval: float = POLL_INTERVAL) -> AsyncIterator[None]:
    """Yield once each time any of ``paths`` may have changed: the first poll always yields
    (the caller's first read may already be stale), then each time a stat signature moves.
    Callers compare content, so a yield with no real change costs one read."""
    signature: tuple[tuple[int, int, int, int] | None, ...] | None = None
    while True:
        await asyncio.sleep(interval)
        current = tuple(_signature(p) for p in paths)
        if current == signature:
            continue
        # Let a write in place finish before reading, so a half-written file is not rejected.
        await asyncio.sleep(SETTLE)
        signature = tuple(_signature(p) for p in paths)
        yield


async def watch_file(
    path: str, *, initial: RawConfig, interval: float = POLL_INTERVAL
) -> AsyncIterator[RawConfig]:
    """Yield the file's content each time it changes after ``initial`` (the caller's first read)."""
    last = initial
    async for _ in changes([path], interval=interval):
        raw = await asyncio.to_thread(load_file, path)
        if raw.digest != last.digest:
            last = raw
            yield raw
