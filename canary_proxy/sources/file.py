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
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import yaml

from ..config import ConfigError
from .raw import RawConfig

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25  # seconds; the reload budget is 1 s
SETTLE = 0.05  # seconds between seeing a change and reading it


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
        return RawConfig(digest, None, ConfigError([f"{origin}: invalid YAML: {yaml_problem(exc)}"]))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return RawConfig(digest, None, ConfigError([f"{origin}: expected a mapping of keys to values"]))
    return RawConfig(digest, {str(k): v for k, v in data.items()})


def yaml_problem(exc: Exception) -> str:
    """What is wrong and where, as ``line 3, column 7: ...``: PyYAML's own text would name the
    stream ``"<byte string>"`` (the caller names the file) and quote the line twice."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"
    return str(exc)


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
