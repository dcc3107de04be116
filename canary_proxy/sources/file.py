"""Config from a local YAML file, re-read when it changes.

Polls ``stat`` (following symlinks) and compares the bytes, which catches every way a file
is updated: written in place, replaced by a rename, or swapped the way Kubernetes updates a
mounted ConfigMap (an atomic re-point of the ``..data`` symlink, which inotify on the file
itself would miss). A poll of a few hundred ms is far inside the 1 s reload budget and costs
one stat(2).

A directory (``--config-dir``) of a thousand route files is polled the same way, but its
files are not all stat'ed each poll: a stat of each of 1,000 files is 2-6 ms of CPU, 4 times
a second, on a proxy whose every request counts. Each poll stats the directory itself,
whose mtime moves when a file is added, removed or renamed into place (the way atomic
writers, editors and a Kubernetes ConfigMap mount's ``..data`` swap update it); the files
are listed and stat'ed when it moves, and at least once per ``RESCAN`` for a file rewritten
in place, which does not touch the directory; for a large directory, once per
``RESCAN_PER_FILE`` a file (at most ``RESCAN_MAX``), so that rescans stay well under 1 % of
one core whatever the number of files.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from .raw import RawConfig, RawRoute

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25  # seconds; the reload budget is 1 s
SETTLE = 0.05  # seconds between seeing a change and reading it
RESCAN = 0.5  # seconds: a directory's files are stat'ed at least this often (see above)
RESCAN_PER_FILE = 0.002  # ...or this often per file listed: 1,000 files every 2 s
RESCAN_MAX = 2.0


def rescan_every(files: int, least: float = RESCAN) -> float:
    """Seconds between two rescans of a directory of ``files`` files: a rescan costs about
    7 ms of CPU for 1,000 (a stat each, in a thread), which every 0.5 s was 1.5 % of a core
    taken from the requests."""
    return min(max(least, files * RESCAN_PER_FILE), max(least, RESCAN_MAX))


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


Signature = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size
Cache = dict[str, tuple[Signature | None, RawConfig]]
Listing = tuple[tuple[str, Signature], ...]  # a directory's *.yaml files, by name


def load_dir(
    directory: str | Path, *, cache: Cache | None = None, listing: Listing | None = None
) -> RawConfig:
    """Every ``*.yaml`` in ``directory``: each file (or each document of one) is a route,
    named after the file (``FILE`` or ``FILE#N``); ordered by file name, then document.
    With ``cache`` (path -> stat signature and content), only files whose signature moved
    are read and parsed again: one changed route of a thousand costs one parse. ``listing``
    is the directory's files as ``list_dir`` just gave them (not listed again)."""
    folder = Path(directory)
    if listing is None:
        listing = list_dir(folder)
    routes: list[RawRoute] = []
    seen: Cache = {}
    for name, signature in listing:
        path = os.path.join(folder, name)  # a str, not a Path: a Path per file was 6 ms for 1,000
        kept = cache.get(path) if cache is not None else None
        raw = kept[1] if kept is not None and kept[0] == signature else load_file(path)
        seen[path] = (signature, raw)
        if raw.routes is not None:
            routes += raw.routes
        elif raw.error is not None:
            routes.append(RawRoute(name, (name, 1), raw.digest, None, raw.error))
        else:
            routes.append(RawRoute(name, (name, 1), raw.digest, raw.data))
    if cache is not None:
        cache.clear()
        cache.update(seen)  # files that went are forgotten
    digest = hashlib.sha256("".join(f"{r.name}={r.digest};" for r in routes).encode()).hexdigest()
    return RawConfig(digest, None, routes=tuple(routes))


def list_dir(directory: str | Path) -> Listing:
    """The directory's ``*.yaml`` files (symlinks followed; others, and those gone while
    listed, left out) with their stat signatures, by name; none if it cannot be listed (as
    a glob finds none)."""
    found = []
    try:
        entries = os.scandir(directory)
    except OSError:
        return ()
    with entries:
        for entry in entries:
            if not entry.name.endswith(".yaml"):
                continue
            try:
                st = entry.stat()  # follows a symlink, as a ConfigMap mount's files are
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((entry.name, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)))
    return tuple(sorted(found))


def yaml_problem(exc: Exception) -> str:
    """What is wrong and where, as ``line 3, column 7: ...``: PyYAML's own text would name the
    stream ``"<byte string>"`` (the caller names the file) and quote the line twice."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"
    return str(exc)


def _signature(path: str) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


async def changes(paths: Sequence[str], *, interval: float = POLL_INTERVAL) -> AsyncIterator[None]:
    """Yield once each time any of ``paths`` may have changed: the first poll always yields
    (the caller's first read may already be stale), then each time a stat signature moves.
    Callers compare content, so a yield with no real change costs one read."""
    signature: tuple[Signature | None, ...] | None = None
    while True:
        await asyncio.sleep(interval)
        current = tuple(_signature(p) for p in paths)
        if current == signature:
            continue
        # Let a write in place finish before reading, so a half-written file is not rejected.
        await asyncio.sleep(SETTLE)
        signature = tuple(_signature(p) for p in paths)
        yield


async def watch_dir(
    directory: str,
    *,
    initial: RawConfig,
    cache: Cache | None = None,
    interval: float = POLL_INTERVAL,
    rescan: float = RESCAN,
) -> AsyncIterator[RawConfig]:
    """Yield the directory's routes each time a ``*.yaml`` in it is added, changed or removed.
    ``cache`` is the one ``initial`` was loaded with, so its files are not parsed again."""
    last = initial
    cache = {} if cache is None else cache
    listing: Listing | None = None  # the first poll lists: ``initial`` may already be stale
    loop = asyncio.get_running_loop()
    folder: Signature | None = None
    scanned = -math.inf
    while True:
        await asyncio.sleep(interval)
        moved = _signature(directory)
        if moved == folder and loop.time() - scanned < rescan_every(len(listing or ()), rescan):
            continue  # nothing added, removed or renamed, and no rescan due: one stat(2)
        folder, scanned = moved, loop.time()
        # In a thread: a stat per file, a thousand of them, is milliseconds off the event loop.
        current = await asyncio.to_thread(list_dir, directory)
        if current == listing:
            continue
        await asyncio.sleep(_settle(current, listing))
        listing = current
        raw = await asyncio.to_thread(load_dir, directory, cache=cache, listing=current)
        if raw.digest != last.digest:
            last = raw
            yield raw


def _settle(current: Listing, before: Listing | None) -> float:
    """Seconds to wait before reading the files that changed: until each was last modified
    ``SETTLE`` ago, so a write in place is not read half done; at most ``SETTLE``. A file
    written before the poll came (most are: the poll is every 0.25 s) is read at once."""
    previous = dict(before or ())
    changed = [sig[2] for name, sig in current if previous.get(name) != sig]
    if not changed:
        return 0.0  # only removals
    quiet_at = max(changed) + int(SETTLE * 1e9)
    return min(SETTLE, max(0.0, (quiet_at - time.time_ns()) / 1e9))


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
