"""The container image, really built with buildah and really run. Slow: marker ``slow``.

No registry is reachable here, so the base image is made the way Debian's own images are:
``debootstrap --variant=minbase`` of bookworm (python3 3.11) from the host's apt mirror,
``podman import``-ed. Its tarball is cached under CACHE, keyed by everything that goes
into it, so only the first run pays for debootstrap (delete the directory to refresh it).
The project and its dependencies are ``pip wheel``-ed on the host and passed into the
build context (``WHEELS_DIR=wheels``), so the build itself needs no network.

Needs root and the Debian packages buildah, podman and debootstrap; a missing one fails
the test with that message. All container state lives in CACHE/containers (vfs driver,
chroot isolation: no daemon, no cgroups).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CANARY_PROXY_TEST_CACHE", "/var/cache/canary-proxy-test"))
STORAGE = (
    *("--root", str(CACHE / "containers")),
    *("--runroot", "/run/canary-proxy-test"),
    *("--storage-driver", "vfs"),
)
SUITE = "bookworm"
INCLUDE = ("python3", "python3-venv")
# Emptied after debootstrap, as Debian's slim images do: package caches, docs, locales.
TRIM = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
RECIPE = 1  # bump to invalidate cached bases when the recipe changes in a way not keyed below
# The app layer (venv) on top of the base; today about 32 MB.
# The app layer is the venv: ~52 MB of it is the official Kubernetes client even as
# bytecode only (see the Dockerfile), the rest ~45 MB (uvloop, aiohttp, pydantic, ...).
MAX_APP_LAYER_BYTES = 120_000_000
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def run(*argv: str, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    return result


def must(*argv: str, timeout: float = 600) -> str:
    result = run(*argv, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(argv)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result.stdout


def buildah(*args: str, timeout: float = 600) -> str:
    return must("buildah", *STORAGE, *args, timeout=timeout)


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    return run("podman", *STORAGE, *args)


@pytest.fixture(scope="module")
def tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the image test must run as root (debootstrap, buildah with vfs storage)")
    missing = [t for t in ("buildah", "podman", "debootstrap", "unshare") if not shutil.which(t)]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: apt-get install buildah podman debootstrap "
            "(.ci/run installs them)"
        )


def apt_mirror() -> str:
    """The Debian mirror apt uses for SUITE (deb822 .sources, then one-line .list files)."""
    override = os.environ.get("CANARY_PROXY_TEST_MIRROR")
    if override:
        return override
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = {
                key.strip(): value.split()
                for key, _, value in (line.partition(":") for line in stanza.splitlines())
                if value and not key.startswith(("#", " "))
            }
            if "deb" in fields.get("Types", []) and SUITE in fields.get("Suites", []):
                return fields["URIs"][0]
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return "http://deb.debian.org/debian"


def debootstrap_base(tarball: Path, mirror: str) -> None:
    root = tarball.with_suffix(".rootfs")
    shutil.rmtree(root, ignore_errors=True)
    must(
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(INCLUDE)}",
        SUITE,
        str(root),
        mirror,
        timeout=1200,
    )
    for directory in TRIM:
        for child in (root / directory).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    partial = tarball.with_suffix(".partial")
    must("tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), ".")
    partial.replace(tarball)
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def base_image(tools: None) -> str:
    mirror = apt_mirror()
    arch = must("dpkg", "--print-architecture").strip()
    inputs = {"suite": SUITE, "variant": "minbase", "include": INCLUDE, "trim": TRIM}
    inputs |= {"mirror": mirror, "arch": arch, "recipe": str(RECIPE)}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"base-{SUITE}-{arch}-{key}.tar"
    if not tarball.exists():
        debootstrap_base(tarball, mirror)
    name = f"localhost/canary-proxy-test-base:{key}"
    if podman("image", "exists", name).returncode != 0:
        result = podman("import", str(tarball), name)
        assert result.returncode == 0, result.stderr
    return name


@pytest.fixture(scope="module")
def image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    context = tmp_path_factory.mktemp("context")
    ignore = shutil.ignore_patterns(
        *(".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"),
        *("build", "*.egg-info", "artifacts", "wheels"),
    )
    shutil.copytree(REPO, context, ignore=ignore, dirs_exist_ok=True)
    # The host's pip reaches PyPI; the build then installs offline from these wheels.
    must(
        sys.executable,
        *("-m", "pip", "wheel", "--quiet", "--wheel-dir", str(context / "wheels")),
        str(context),
    )
    tag = f"localhost/canary-proxy-test:{uuid.uuid4().hex[:12]}"
    buildah(
        *("bud", "--isolation", "chroot", "--pull=false"),
        *("--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", "WHEELS_DIR=wheels"),
        *("--tag", tag, str(context)),
        timeout=1200,
    )
    try:
        yield tag
    finally:
        buildah("rmi", "--force", tag)
        buildah("rmi", "--prune")


@pytest.fixture(scope="module")
def config(image: str) -> dict[str, Any]:
    inspected = json.loads(buildah("inspect", "--type", "image", image))
    oci_config: dict[str, Any] = inspected["OCIv1"]["config"]
    return oci_config


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = buildah("from", "--pull=false", image).strip()
    try:
        yield name
    finally:
        buildah("rm", name)


def in_container(container: str, *cmd: str, volumes: tuple[str, ...] = ()) -> str:
    """``buildah run`` as the image's user, with its environment."""
    mounts = [arg for volume in volumes for arg in ("--volume", volume)]
    return buildah("run", "--isolation", "chroot", *mounts, container, "--", *cmd)


# -- the image -------------------------------------------------------------------------------


def test_image_config(config: dict[str, Any]) -> None:
    uid, _, gid = config["User"].partition(":")
    assert int(uid) > 0 and int(gid) > 0, "must run as a numeric non-root user"
    assert config["Entrypoint"] == ["canary-proxy"]
    assert config["Cmd"] == [
        *("serve", "--configmap", "canary-proxy"),
        *("--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090"),
    ]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}


def test_image_size(image: str, base_image: str, record_property: Any) -> None:
    result = podman("image", "inspect", "--format", "{{.Size}}", image, base_image)
    assert result.returncode == 0, result.stderr
    image_size, base_size = map(int, result.stdout.split())
    record_property("image_bytes", image_size)
    record_property("base_bytes", base_size)
    print(f"image {image_size / 1e6:.0f} MB = base {base_size / 1e6:.0f} MB + app")
    assert image_size - base_size < MAX_APP_LAYER_BYTES


def test_version(container: str) -> None:
    assert in_container(container, "canary-proxy", "--version").strip() == f"canary-proxy {VERSION}"


def test_check_prints_effective_config(container: str, tmp_path: Path) -> None:
    raw = {"stable-url": "http://app-stable:80", "canary-url": "http://app-canary:80"}
    raw["canary-weight"] = "10"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    tmp_path.chmod(0o755)  # readable by the image's non-root user
    out = in_container(
        container,
        *("canary-proxy", "check", "--config", "/config/config.yaml"),
        volumes=(f"{tmp_path}:/config:ro",),
    )
    effective = yaml.safe_load(out)
    assert effective["stable-url"] == "http://app-stable:80"
    assert effective["canary-url"] == "http://app-canary:80"
    assert effective["canary-weight"] == 10


def test_runs_as_image_user_without_build_tools(container: str, config: dict[str, Any]) -> None:
    probe = (
        "import importlib.util as u, os, shutil;"
        "print(os.getuid(), os.getgid(), u.find_spec('pip'), u.find_spec('setuptools'),"
        " shutil.which('pip'), shutil.which('pip3'), os.path.exists('/src'))"
    )
    uid, gid = config["User"].split(":")
    out = in_container(container, "python3", "-c", probe).split()
    assert out == [uid, gid, "None", "None", "None", "None", "False"]


# -- serving from a read-only root filesystem ------------------------------------------------

# What a container runtime does with readOnlyRootFilesystem and an emptyDir on /tmp:
# a private mount namespace, the image's root bind-mounted read-only, /proc and /dev, a
# tmpfs on /tmp; then chroot as the image's user with only the image's environment.
READ_ONLY_ROOT = r"""
set -eu
root=$1 config=$2; shift 2
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o size=16m,mode=1777 tmpfs "$root/tmp"
cp "$config" "$root/tmp/config.yaml"
exec env -i "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.text.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[dict[str, int]]:
    servers = {}
    for version, text in (("stable", "v1"), ("canary", "v2")):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        server.text = text  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[version] = server
    try:
        yield {version: s.server_address[1] for version, s in servers.items()}
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def requests_counted(metrics: str) -> dict[tuple[str, str], float]:
    counted = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "canary_proxy_requests_total":
                counted[sample.labels["version"], sample.labels["code"]] = sample.value
    return counted


def wait_until_ready(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"proxy exited early with {proc.returncode}"
        try:
            if get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready in time")


def test_serves_from_read_only_root(
    container: str, config: dict[str, Any], backends: dict[str, int], tmp_path: Path
) -> None:
    root = buildah("mount", container).strip()
    port, admin = free_port(), free_port()
    raw = {
        "stable-url": f"http://127.0.0.1:{backends['stable']}",
        "canary-url": f"http://127.0.0.1:{backends['canary']}",
        "canary-weight": "0",
        "canary-by-header": "X-Canary",
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    chroot = shutil.which("chroot")
    assert chroot, "chroot (coreutils) not found"
    serve = (
        *("canary-proxy", "serve", "--config", "/tmp/config.yaml", "--workers", "2"),
        *("--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"),
        *("--drain-delay", "200ms", "--shutdown-timeout", "2s"),
    )
    argv = (
        *("unshare", "--mount", "--", "sh", "-c", READ_ONLY_ROOT, "sh", root),
        str(tmp_path / "config.yaml"),
        *config["Env"],
        *(chroot, f"--userspec={config['User']}", root, *serve),
    )
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(f"http://127.0.0.1:{admin}/readyz", proc, time.monotonic() + 30)
        assert get(f"http://127.0.0.1:{port}/") == (200, "v1")
        assert get(f"http://127.0.0.1:{port}/", {"X-Canary": "always"}) == (200, "v2")
        status, metrics = get(f"http://127.0.0.1:{admin}/metrics")
        assert status == 200
        assert requests_counted(metrics) == {("stable", "200"): 1.0, ("canary", "200"): 1.0}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        buildah("umount", container)
    assert "Read-only file system" not in log.read_text()
