"""Where a rollout's weight and state live: a ConfigMap, or a config file with a JSON file beside it.

Both stores hold the same two flat mappings -- the config (``data``) and the rollout's
``canary-proxy.io/*`` keys (``annotations``) -- and offer one conflict-safe
read-modify-write, ``update(mutate)``: ``mutate`` sees what is stored *now* and returns the
change, or raises Stale to call the write off. For a ConfigMap that is ``k8s.update_configmap``
(re-read and re-apply on 409, the same path as the ``weight`` command); for a file, an
exclusive ``flock`` around read, mutate and an atomic temp-file-and-rename write.

Picking a store is a table lookup on the command line: ``[NS/]NAME`` or ``--config FILE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from .state import COMMAND

if TYPE_CHECKING:
    from ..k8s import KubeClient

WEIGHT, TOTAL, MIRROR = "canary-weight", "canary-weight-total", "canary-mirror-percent"


# -- errors -------------------------------------------------------------------------------


class StoreError(Exception):
    """A store failure; the subclass says which exit code it means."""


class Missing(StoreError):
    """The ConfigMap or config file does not exist (exit 3)."""


class Unavailable(StoreError):
    """The API server cannot be reached or refuses us (exit 3 if it stays so)."""


class Invalid(StoreError):
    """The reference, kubeconfig or stored content is unusable (exit 2)."""


class Stale(StoreError):
    """Raised by a ``mutate``: the state changed since it was read; decide again."""


# -- what is stored, and a change to it -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    data: Mapping[str, Any]  # the proxy's config, a flat mapping
    annotations: Mapping[str, str]  # at least the rollout's canary-proxy.io/* keys

    @property
    def total(self) -> int:
        """``canary-weight-total``; the CLI validated the config before relying on it."""
        try:
            return max(1, int(float(self.data.get(TOTAL, 100))))
        except (TypeError, ValueError):
            return 100

    @property
    def percent(self) -> float:
        """The canary's current share in percent, whatever the total."""
        try:
            return float(self.data.get(WEIGHT, 0)) * 100 / self.total
        except (TypeError, ValueError):
            return 0.0


@dataclass(frozen=True, slots=True)
class Change:
    percent: float | None = None  # the canary's new share in percent; None: leave the weight
    annotations: Mapping[str, str | None] = field(default_factory=dict)  # None removes a key
    drop_command: str | None = None  # remove the command annotation if it still holds this
    mirror: float | None = None  # the new canary-mirror-percent; None: leave it


def weight_for(percent: float, total: int) -> float:
    """Percent of traffic -> ``canary-weight`` out of ``total``, to 0.0001 of a unit."""
    return round(percent * total / 100, 4)


def apply_change(
    stored: Stored, change: Change, *, as_value: Callable[[float], Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The new (data, annotations). The weight is rewritten only if its value changes, so an
    unchanged config is never rewritten (and never reloaded by the proxies)."""
    data, notes = dict(stored.data), dict(stored.annotations)
    if change.percent is not None:
        weight = weight_for(change.percent, stored.total)
        if abs(stored.percent * stored.total / 100 - weight) > 1e-9 or WEIGHT not in data:
            data[WEIGHT] = as_value(weight)
    if change.mirror is not None and _number(data.get(MIRROR, 0)) != change.mirror:
        data[MIRROR] = as_value(change.mirror)
    for key, value in change.annotations.items():
        if value is None:
            notes.pop(key, None)
        else:
            notes[key] = value
    if change.drop_command is not None and notes.get(COMMAND) == change.drop_command:
        del notes[COMMAND]
    return data, notes


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}".rstrip("0")


def number_value(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


Mutate = Callable[[Stored], Change]


class Store(Protocol):
    description: str  # "configmap shop/canary-proxy" or "file /etc/canary.yaml"

    async def load(self) -> Stored: ...

    async def update(self, mutate: Mutate) -> Stored: ...


# -- ConfigMap --------------------------------------------------------------------------------


class ConfigMapStore:
    """A ConfigMap: the config in ``data``, the rollout state in its annotations."""

    def __init__(self, client: KubeClient, namespace: str, name: str) -> None:
        self._client = client
        self.namespace, self.name = namespace, name
        self.description = f"configmap {namespace}/{name}"

    async def load(self) -> Stored:
        with self._errors():
            state = await self._client.get_configmap(self.namespace, self.name)
        return Stored(state.data, state.annotations)

    async def update(self, mutate: Mutate) -> Stored:
        from ..k8s import update_configmap

        def apply(data: dict[str, str], notes: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
            current = Stored(data, notes)
            new_data, new_notes = apply_change(current, mutate(current), as_value=number_text)
            return {k: str(v) for k, v in new_data.items()}, new_notes

        with self._errors():
            state = await update_configmap(self._client, self.namespace, self.name, apply)
        return Stored(state.data, state.annotations)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        from ..k8s import Conflict, KubeError, NotFound

        try:
            yield
        except NotFound as exc:
            raise Missing(f"{self.description} not found") from exc
        except Conflict as exc:
            raise Stale(f"{self.description}: {exc}") from exc
        except KubeError as exc:
            raise Unavailable(f"{self.description}: {exc}") from exc


@contextlib.asynccontextmanager
async def open_configmap_store(ref: str, *, kubeconfig: str | None) -> AsyncIterator[ConfigMapStore]:
    """A ConfigMapStore for ``[NS/]NAME``; Invalid for a bad name or an unloadable kubeconfig."""
    from ..k8s import KubeClient, load_config, parse_ref

    try:
        namespace, name = parse_ref(ref)
        config = await load_config(kubeconfig)
    except Exception as exc:  # a malformed NAME, or any kubeconfig loader failure
        raise Invalid(str(exc)) from exc
    async with KubeClient(config) as client:
        yield ConfigMapStore(client, namespace or config.namespace, name)


# -- file -------------------------------------------------------------------------------------


class FileStore:
    """A YAML config file, with the rollout state in ``FILE.rollout.json`` beside it.

    Writes are atomic (a temp file in the same directory, fsync, rename), so the proxy's
    ``serve --config FILE`` reloads either the old or the new file, never half of one. The
    other keys of the config are kept, in their order; YAML comments are not. Processes on
    one machine (the controller, ``promote``, ``abort``) serialise on ``FILE.rollout.lock``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + ".rollout.json")
        self.lock_path = self.path.with_name(self.path.name + ".rollout.lock")
        self.description = f"file {self.path}"

    async def load(self) -> Stored:
        return await asyncio.to_thread(self._read)

    async def update(self, mutate: Mutate) -> Stored:
        return await asyncio.to_thread(self._update, mutate)

    def _update(self, mutate: Mutate) -> Stored:
        with self._locked():
            current = self._read()
            data, notes = apply_change(current, mutate(current), as_value=number_value)
            if data != current.data:
                _write_atomic(self.path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
            if notes != current.annotations:
                _write_atomic(self.state_path, json.dumps(notes, indent=2, sort_keys=True) + "\n")
            return Stored(data, notes)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise Unavailable(f"{self.lock_path}: cannot open ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> Stored:
        try:
            text = self.path.read_text()
        except FileNotFoundError as exc:
            raise Missing(f"{self.path}: no such file") from exc
        except OSError as exc:
            raise Unavailable(f"{self.path}: cannot read ({exc.strerror})") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise Invalid(f"{self.path}: invalid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise Invalid(f"{self.path}: expected a mapping of keys to values")
        return Stored({str(k): v for k, v in data.items()}, self._read_state())

    def _read_state(self) -> dict[str, str]:
        try:
            notes = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise Invalid(f"{self.state_path}: unreadable rollout state ({exc}); fix or delete it") from exc
        if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
            raise Invalid(f"{self.state_path}: expected a JSON object of strings; fix or delete it")
        return {str(k): v for k, v in notes.items()}


def _write_atomic(path: Path, text: str) -> None:
    """Write a sibling temp file, fsync it, keep the old file's mode, rename it over ``path``."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
