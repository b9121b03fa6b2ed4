"""systemd/ha_check.sh: lint and usage errors always; the run against Home Assistant itself only
as root with SERENBOX_HA_CHECK=1 (it needs debootstrap, systemd-nspawn and, on a cold cache,
the Debian mirror and PyPI; minutes). See docs/install.md, "Home Assistant check"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HA_CHECK = ROOT / "systemd" / "ha_check.sh"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_ha_check_is_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", HA_CHECK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_unknown_argument_is_one_line_and_exit_2() -> None:
    proc = subprocess.run(["bash", HA_CHECK, "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "unknown argument: --frobnicate" in proc.stderr, proc.stderr


def test_help_names_the_cache() -> None:
    proc = subprocess.run(["bash", HA_CHECK, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert "--prepare" in proc.stdout and "SERENBOX_HA_CACHE" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or os.environ.get("SERENBOX_HA_CHECK") != "1",
    reason="runs Home Assistant in systemd-nspawn: root and SERENBOX_HA_CHECK=1",
)
def test_home_assistant_reads_the_discovery() -> None:
    proc = subprocess.run(
        ["bash", HA_CHECK],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "SERENBOX_HA_PYTHON": sys.executable},
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert not [line for line in lines if line.startswith("FAIL")]
    summary = [line for line in lines if line.startswith("ha_check:") and "checks held" in line]
    assert summary, proc.stdout[-2000:]
    held, total = (int(w) for w in summary[-1].split()[1:4:2])
    assert held == total >= 18, summary[-1]
