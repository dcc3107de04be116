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


# -- the help, and the errors a person reads ------------------------------------------------------


def test_help_placeholders_say_what_a_value_is() -> None:
    text = " ".join(cli("serve", "--help").stdout.split())
    for placeholder in (
        "--config FILE",
        "--configmap [NAMESPACE/]NAME",
        "--listen HOST:PORT",
        "--admin-listen HOST:PORT",
        "--workers N|auto",
        "--drain-delay DURATION",
        "--max-header-size SIZE",
        "--max-headers N",
        "--access-log on|off",
        "--trust-forwarded-from CIDR,...",
        "--tls-cert FILE",
    ):
        assert placeholder in text, placeholder
    assert "CONFIG]" not in text and "LISTEN]" not in text  # argparse's own: the flag's name
    rollout = " ".join(cli("rollout", "--help").stdout.split())
    for placeholder in (
        "--steps STEP,...",
        "--interval DURATION",
        "--max-error-rate PERCENT",
        "--config FILE",
    ):
        assert placeholder in rollout, placeholder


def test_serve_and_check_help_describe_and_show_an_example() -> None:
    for command in ("serve", "check"):
        text = cli(command, "--help").stdout
        assert "\nexample:\n" in text and f"  canary-proxy {command} --config " in text, text
        description = text.split("\n\n")[1]
        assert len(description.split()) > 10, description  # a sentence, not just the usage
    admin = " ".join(cli("serve", "--help").stdout.partition("--admin-listen HOST:PORT\n")[2].split())
    assert admin.startswith("the admin port: / (dashboard), /stats, /metrics"), admin


def test_an_address_without_a_port_names_its_flag(tmp_path: Path) -> None:
    result = cli("serve", "--config", "x.yaml", "--listen", "18500")
    assert result.returncode == 2
    assert "argument --listen: '18500': expected HOST:PORT" in result.stderr, result.stderr
    result = cli("serve", "--config", "x.yaml", env={"CANARY_PROXY_ADMIN_LISTEN": "9090"})
    assert result.returncode == 2
    assert "argument --admin-listen: '9090': expected HOST:PORT" in result.stderr, result.stderr


def test_a_yaml_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("stable-url: http://s:80\n canary-url: http://c:80\n")
    for command in ("check", "serve"):
        result = cli(command, "--config", str(path))
        assert result.returncode == 2
        assert plain_lines(result.stderr) == [
            f"error: {path}: invalid YAML: line 2, column 12: mapping values are not allowed here"
        ], result.stderr
        assert "<byte string>" not in result.stderr


async def test_start_up_errors_are_plain_lines_and_later_ones_are_the_json_log(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """The rule of docs/workers.md: a person reads what stops the start; a log collector
    reads everything after it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("stable-url: http://s:80\ncanary-url: http://c:80\ncanary-weight: 101\n")
    result = cli("serve", "--config", str(bad), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == plain_lines(result.stderr) != []  # not one JSON line
    assert all(line.startswith("error: ") for line in result.stderr.splitlines()), result.stderr

    stable, canary = backends
    proxy = await proxy_factory(base_config(stable, canary))
    entry = await proxy.reload(base_config(stable, canary, canary_weight=101), expect_ok=False)
    assert entry["level"] == "error" and entry["errors"], entry  # a JSON log entry
    await proxy.terminate()
    assert all("raw" not in e for e in proxy.logs), proxy.logs  # every stderr line was JSON
