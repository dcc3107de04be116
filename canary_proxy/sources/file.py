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
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from .raw import RawConfig, RawRoute

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
    """One document is one config (one route); several (``---``) are one route each, named
    ``FILE#N`` unless they name themselves (see routes.parse_documents)."""
    digest = hashlib.sha256(content).hexdigest()
    try:
        documents = [doc for doc in yaml.safe_load_all(content) if doc is not None]
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an int of over 4300 digits
        return RawConfig(digest, None, ConfigError([f"{origin}: invalid YAML: {yaml_problem(exc)}"]))
    if len(documents) <= 1:
        data = documents[0] if documents else {}
        if not isinstance(data, dict):
            return RawConfig(digest, None, ConfigError([f"{origin}: expected a mapping of keys to values"]))
        return RawConfig(digest, {str(k): v for k, v in data.items()})
    name = Path(origin).name
    routes = tuple(_route(f"{name}#{n}", (name, n), doc) for n, doc in enumerate(documents, 1))
    return RawConfig(digest, None, routes=routes)


def _route(name: str, order: tuple[Any, ...], doc: Any) -> RawRoute:
    text = json.dumps(doc, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if not isinstance(doc, dict):
        return RawRoute(
            name, order, digest, None, ConfigError([f"{name}: expected a mapping of keys to values"])
        )
    return RawRoute(name, order, digest, {str(k): v for k, v in doc.items()})


Cache = dict[str, tuple[tuple[int, int, int, int] | None, RawConfig]]


def load_dir(directory: str | Path, *, cache: Cache | None = None) -> RawConfig:
    """Every ``*.yaml`` in ``directory``: each file (or each document of one) is a route,
    named after the file (``FILE`` or ``FILE#N``); ordered by file name, then document.
    With ``cache`` (path -> stat signature and content), only files whose signature moved
    are read and parsed again: one changed route of a thousand costs one parse."""
    folder = Path(directory)
    try:
        files = sorted(p for p in folder.glob("*.yaml") if p.is_file())
    except OSError as exc:
        return RawConfig(
            f"oserror:{exc.errno}", None, ConfigError([f"{folder}: cannot read ({exc.strerror})"])
        )
    routes: list[RawRoute] = []
    seen: Cache = {}
    for path in files:
        signature = _signature(str(path))
        kept = cache.get(str(path)) if cache is not None else None
        raw = (
            kept[1]
            if kept is not None and signature is not None and kept[0] == signature
            else load_file(path)
        )
        seen[str(path)] = (signature, raw)
        if raw.routes is not None:
            routes += raw.routes
        elif raw.error is not None:
            routes.append(RawRoute(path.name, (path.name, 1), raw.digest, None, raw.error))
        else:
            routes.append(RawRoute(path.name, (path.name, 1), raw.digest, raw.data))
    if cache is not None:
        cache.clear()
        cache.update(seen)  # files that went are forgotten
    digest = hashlib.sha256("".join(f"{r.name}={r.digest};" for r in routes).encode()).hexdigest()
    return RawConfig(digest, None, routes=tuple(routes))


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


Listing = tuple[tuple[str, tuple[int, int, int, int] | None], ...]


def _listing(directory: str) -> Listing:
    """The directory's ``*.yaml`` files and their stat signatures: one glob and a stat each."""
    return tuple((str(p), _signature(str(p))) for p in sorted(Path(directory).glob("*.yaml")))


async def watch_dir(
    directory: str, *, initial: RawConfig, interval: float = POLL_INTERVAL
) -> AsyncIterator[RawConfig]:
    """Yield the directory's routes each time a ``*.yaml`` in it is added, changed or removed."""
    last = initial
    listing: Listing | None = None
    cache: Cache = {}
    while True:
        await asyncio.sleep(interval)
        # In a thread: a stat per file, a thousand of them, is milliseconds off the event loop.
        if await asyncio.to_thread(_listing, directory) == listing:
            continue
        await asyncio.sleep(SETTLE)  # let a write in place finish
        listing = await asyncio.to_thread(_listing, directory)
        raw = await asyncio.to_thread(load_dir, directory, cache=cache)
        if raw.digest != last.digest:
            last = raw
            yield raw


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
