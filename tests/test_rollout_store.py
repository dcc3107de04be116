"""The file store: atomic writes that keep the other keys, percent -> weight, stale writes refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from canary_proxy.rollout.analysis import Window
from canary_proxy.rollout.controller import Controller
from canary_proxy.rollout.decide import Decision, Settings
from canary_proxy.rollout.plan import parse_plan
from canary_proxy.rollout.state import COMMAND, RolloutState
from canary_proxy.rollout.store import Change, FileStore, Invalid, Missing, Stale, weight_for

CONFIG = """\
stable-url: http://s:1
canary-url: http://c:1
canary-weight-total: 1000
canary-by-header: X-QA
"""


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    path = tmp_path / "canary.yaml"
    path.write_text(CONFIG)
    path.chmod(0o640)
    return FileStore(path)


@pytest.mark.parametrize(
    ("percent", "total", "weight"), [(5, 100, 5), (5, 1000, 50), (12.5, 100, 12.5), (5, 3, 0.15), (100, 7, 7)]
)
def test_percent_to_weight(percent: float, total: int, weight: float) -> None:
    assert weight_for(percent, total) == weight


async def test_a_write_keeps_the_other_keys_their_order_and_the_mode(store: FileStore) -> None:
    await store.update(lambda current: Change(25, {"canary-proxy.io/phase": "Progressing"}))
    text = store.path.read_text()
    assert list(yaml.safe_load(text)) == [
        "stable-url", "canary-url", "canary-weight-total", "canary-by-header", "canary-weight",
    ]  # fmt: skip
    assert yaml.safe_load(text)["canary-weight"] == 250
    assert oct(store.path.stat().st_mode & 0o777) == "0o640"
    assert json.loads(store.state_path.read_text()) == {"canary-proxy.io/phase": "Progressing"}
    assert sorted(p.name for p in store.path.parent.iterdir()) == [
        "canary.yaml",
        "canary.yaml.rollout.json",
        "canary.yaml.rollout.lock",
    ]  # fmt: skip  (no temp files left behind)


async def test_an_unchanged_weight_does_not_rewrite_the_config(store: FileStore) -> None:
    await store.update(lambda current: Change(25))
    before = store.path.stat().st_mtime_ns, store.path.stat().st_ino
    await store.update(lambda current: Change(25, {"canary-proxy.io/message": "x"}))
    assert (store.path.stat().st_mtime_ns, store.path.stat().st_ino) == before


async def test_a_command_is_dropped_only_if_unchanged(store: FileStore) -> None:
    await store.update(lambda current: Change(annotations={COMMAND: "promote a1"}))
    await store.update(lambda current: Change(drop_command="promote OLD"))
    assert (await store.load()).annotations[COMMAND] == "promote a1"
    await store.update(lambda current: Change(drop_command="promote a1"))
    assert COMMAND not in (await store.load()).annotations


async def test_missing_and_invalid(tmp_path: Path, store: FileStore) -> None:
    with pytest.raises(Missing):
        await FileStore(tmp_path / "nope.yaml").load()
    store.state_path.write_text("[1, 2]")
    with pytest.raises(Invalid, match="expected a JSON object"):
        await store.load()
    store.path.write_text("- a list\n")
    with pytest.raises(Invalid, match="mapping"):
        await store.load()


class NoSource:
    async def sample(self, window: float) -> Window:
        raise AssertionError("not used")


async def test_the_controller_refuses_to_write_over_a_concurrent_change(store: FileStore) -> None:
    controller = Controller(store, NoSource(), Settings(plan=parse_plan("10,100")))
    seen = await store.load()
    await store.update(lambda current: Change(annotations={COMMAND: "abort x"}))  # e.g. `abort`
    decision = Decision(RolloutState(phase="Progressing", steps="10,100"), 10.0, "advance")
    with pytest.raises(Stale):
        await controller._commit(seen, decision)
    assert (await store.load()).percent == 0  # nothing was written


async def test_the_mirror_percent_is_written_only_when_it_changes(store: FileStore) -> None:
    await store.update(lambda current: Change(0, mirror=100))
    assert yaml.safe_load(store.path.read_text())["canary-mirror-percent"] == 100
    before = store.path.stat().st_mtime_ns, store.path.stat().st_ino
    await store.update(lambda current: Change(0, {"canary-proxy.io/message": "x"}, mirror=100))
    assert (store.path.stat().st_mtime_ns, store.path.stat().st_ino) == before
    await store.update(lambda current: Change(5, mirror=0))
    assert yaml.safe_load(store.path.read_text())["canary-mirror-percent"] == 0
    await store.update(lambda current: Change(10))  # None: the key stays as it is
    assert yaml.safe_load(store.path.read_text())["canary-mirror-percent"] == 0
