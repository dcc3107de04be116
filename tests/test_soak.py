"""The soak run, shortened for CI: 60 s of mixed traffic, weight changes, a backend restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "loadtests" / "soak.py"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sixty_seconds_of_soak_show_no_growth_and_no_unexpected_error() -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--duration", "60"],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS: no growth in memory or file descriptors" in result.stdout
    assert "errors 0 " in result.stdout
