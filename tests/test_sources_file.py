"""The ``--config-dir`` watch: a stat of the directory each poll, its files at each rescan."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from canary_proxy.sources.file import SETTLE, Cache, _settle, list_dir, load_dir, rescan_every, watch_dir

ROUTE = "host: {host}\nstable-url: http://127.0.0.1:1\ncanary-url: http://127.0.0.1:2\ncanary-weight: {w}\n"


def weights(raw: object) -> dict[str, int]:
    routes = getattr(raw, "routes", None) or ()
    return {r.name: r.data["canary-weight"] for r in routes}


async def test_the_watch_sees_renames_and_writes_in_place_and_parses_only_what_changed(
    tmp_path: Path,
) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(ROUTE.format(host=f"{name}.example", w=0))
    cache: Cache = {}
    initial = load_dir(tmp_path, cache=cache)
    kept = cache[str(tmp_path / "b.yaml")][1]
    updates = watch_dir(str(tmp_path), initial=initial, cache=cache, interval=0.01, rescan=0.1)
    async with contextlib.aclosing(updates), asyncio.timeout(5):
        tmp = tmp_path / "a.yaml.tmp"
        tmp.write_text(ROUTE.format(host="a.example", w=50))
        os.replace(tmp, tmp_path / "a.yaml")  # renamed into place: the directory's mtime moves
        assert weights(await anext(updates)) == {"a.yaml": 50, "b.yaml": 0}
        assert cache[str(tmp_path / "b.yaml")][1] is kept  # not read again
        (tmp_path / "b.yaml").write_text(ROUTE.format(host="b.example", w=100))  # in place: the rescan
        assert weights(await anext(updates)) == {"a.yaml": 50, "b.yaml": 100}
        (tmp_path / "a.yaml").unlink()
        assert weights(await anext(updates)) == {"b.yaml": 100}


def test_a_changed_file_is_read_once_it_has_been_quiet_for_the_settle_time(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text("{}")
    old = time.time_ns() - 10**9
    os.utime(tmp_path / "old.yaml", ns=(old, old))
    before = list_dir(tmp_path)
    assert _settle(before, None) == 0.0  # written a second ago: read at once
    (tmp_path / "new.yaml").write_text("{}")  # written just now: it may not be done
    assert 0.0 < _settle(list_dir(tmp_path), before) <= SETTLE
    (tmp_path / "new.yaml").unlink()
    assert _settle(list_dir(tmp_path), before) == 0.0  # nothing to read


def test_a_large_directory_is_rescanned_less_often_but_within_two_seconds() -> None:
    """A rescan stats every file: 2 ms of interval per file keeps it under 0.5 % of a core."""
    assert [rescan_every(n) for n in (0, 250, 500, 1000, 100_000)] == [0.5, 0.5, 1.0, 2.0, 2.0]
    assert rescan_every(1000, 0.1) == 2.0 and rescan_every(2, 0.1) == 0.1  # tests poll faster
