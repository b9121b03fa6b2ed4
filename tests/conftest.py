"""Project-wide test setup: paths and the ../shared data folder (optional)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FER2013_NPZ = SHARED / "fer2013" / "fer2013.npz"

# Test helper modules (tinymodels, media, mosquitto) import both as `tests.x` and as `x`.
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(scope="session")
def fer2013_npz() -> Path:
    if not FER2013_NPZ.is_file():
        pytest.skip("../shared/fer2013/fer2013.npz is absent (fresh clone)")
    return FER2013_NPZ
