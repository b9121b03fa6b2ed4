"""systemd/testbed.sh itself: lint and the usage errors (its checks need root, debootstrap and
minutes; they run as `sudo systemd/testbed.sh amd64|arm64`, see docs/install.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "systemd" / "testbed.sh"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_testbed_is_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", TESTBED], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "which architecture?"),
        (["riscv64"], "unknown argument: riscv64"),
        (["--frobnicate", "amd64"], "unknown argument: --frobnicate"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    # Refused before anything is built or booted.
    proc = subprocess.run(["bash", TESTBED, *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_help_names_both_architectures() -> None:
    proc = subprocess.run(["bash", TESTBED, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert "amd64|arm64" in proc.stdout and "SERENBOX_TESTBED_CACHE" in proc.stdout
