"""The CLI contract: check's output and exit codes, serve's start-up errors, env variables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import Backend, ProxyFactory, base_config


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "canary_proxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


def plain_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not JSON log entries: what a person is told directly."""
    lines = []
    for line in stderr.splitlines():
        try:
            json.loads(line)
        except ValueError:
            lines.append(line)
    return lines


def test_check_prints_the_effective_config_as_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("stable-url: http://s:80\ncanary-url: http://c:80\ncanary-weight: 2.5\n")
    result = cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["canary-weight"] == 2.5
    assert effective["sticky-cookie"] == "canary_proxy_bucket"
    assert effective["upstream-timeout"] == "1m"
    assert len(effective) == 21  # every key of the config table


def test_check_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("stable-url: ftp://s\ncanary-weight: lots\ncanary-by-header-pattern: '('\nnope: 1\n")
    result = cli("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    for key in ("stable-url", "canary-url", "canary-weight", "canary-by-header-pattern", "nope"):
        assert f"error: {key}:" in result.stderr, key


def test_check_on_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = cli("check", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_serve_with_an_invalid_or_missing_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stable-url: http://s:1\ncanary-url: http://c:1\ncanary-weight: 200\n")
    result = cli("serve", "--config", str(bad), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    assert result.returncode == 2 and "canary-weight" in result.stderr
    result = cli("serve", "--config", str(tmp_path / "nope.yaml"), "--listen", "127.0.0.1:0")
    assert result.returncode == 2


def test_config_and_configmap_together_exit_2(tmp_path: Path) -> None:
    result = cli("serve", "--config", "x.yaml", "--configmap", "ns/name")
    assert result.returncode == 2


def test_help_shows_defaults_and_variables() -> None:
    result = cli("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "CANARY_PROXY_ADMIN_LISTEN; default: 0.0.0.0:9090" in text
    assert "CANARY_PROXY_DRAIN_DELAY; default: 5s" in text


async def test_flags_read_environment_variables_and_the_command_line_wins(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    stable, canary = backends
    proxy = await proxy_factory(
        base_config(stable, canary),
        env={"CANARY_PROXY_ACCESS_LOG": "off", "CANARY_PROXY_LISTEN": "127.0.0.1:1"},
    )  # --listen 127.0.0.1:0 on the command line beats the variable's port 1
    assert not proxy.url.endswith(":1")
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/") as r:
        assert r.status == 200
    await proxy.terminate()
    assert proxy.access == []  # the variable turned the access log off


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("canary-proxy ")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_names_the_flag_and_the_address_once(tmp_path: Path, workers: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("stable-url: http://127.0.0.1:1\ncanary-url: http://127.0.0.1:2\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag, other in (("--listen", "--admin-listen"), ("--admin-listen", "--listen")):
            result = cli(
                "serve", "--config", str(config), flag, f"127.0.0.1:{port}", other, "127.0.0.1:0",
                "--workers", workers,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr
            errors = plain_lines(result.stderr)
            assert errors == [f"error: {flag} 127.0.0.1:{port}: address already in use"], result.stderr
