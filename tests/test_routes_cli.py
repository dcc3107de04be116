"""``check``, ``routes`` and ``route-for`` on a directory of routes: the real CLI."""

from __future__ import annotations

from pathlib import Path

import yaml

from .test_configmap import cli

SHOP = {"stable-url": "http://127.0.0.1:8001", "canary-url": "http://127.0.0.1:8002"}


def routes_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "routes"
    folder.mkdir()
    (folder / "shop.yaml").write_text(
        yaml.safe_dump_all([
            {**SHOP, "host": "shop.example.com", "canary-weight": 10, "canary-by-header": "X-Canary"},
            {**SHOP, "name": "shop-api", "host": "shop.example.com", "path": "/api", "canary-weight": 50},
        ])
    )  # fmt: skip
    (folder / "twin.yaml").write_text(yaml.safe_dump({**SHOP, "host": "shop.example.com"}))  # conflicts
    return folder


async def test_routes_prints_the_table_and_the_conflict(tmp_path: Path) -> None:
    code, out, err = await cli("routes", "--config-dir", str(routes_dir(tmp_path)))
    assert code == 0, err
    rows = [line.split()[:4] for line in out.splitlines()]
    assert rows == [
        ["NAME", "HOST", "PATH", "TYPE"],
        ["shop.yaml#1", "shop.example.com", "/", "prefix"],
        ["shop-api", "shop.example.com", "/api", "prefix"],
        ["twin.yaml", "(conflict:", "not", "served)"],
    ]
    assert "warning: route twin.yaml conflicts with shop.yaml#1" in err


async def test_route_for_explains_the_route_and_the_version(tmp_path: Path) -> None:
    folder = str(routes_dir(tmp_path))
    code, out, _ = await cli("route-for", "http://shop.example.com/api/cart", "--config-dir", folder)
    assert code == 0
    assert "route: shop-api (host shop.example.com, prefix /api)" in out
    assert "canary with probability 50.00%" in out
    code, out, _ = await cli(
        "route-for", "http://x/cart", "-H", "Host: shop.example.com", "-H", "X-Canary: always",
        "--config-dir", folder,
    )  # fmt: skip
    assert "shop-api (host shop.example.com, prefix /api) does not match" in out
    assert "route: shop.yaml#1" in out and "version: canary, by the header rule" in out
    code, out, _ = await cli("route-for", "http://nowhere.example/", "--config-dir", folder)
    assert code == 0 and "no route for host nowhere.example path /: 404" in out


async def test_check_a_directory_names_each_bad_route(tmp_path: Path) -> None:
    folder = routes_dir(tmp_path)
    (folder / "bad.yaml").write_text("host: a b\nstable-url: x\n")
    code, _, err = await cli("check", "--config-dir", str(folder))
    assert code == 2
    assert "error: bad.yaml: host: invalid value 'a b'" in err
