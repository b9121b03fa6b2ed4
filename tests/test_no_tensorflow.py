"""The device path never imports TensorFlow (or Keras), not even indirectly: checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import pytest
import yaml

from tests.test_pipeline import HAPPY, face_patch, scene
from tests.tinymodels import brightness_model, convert_tiny

HEAVY = ("tensorflow", "keras", "tf_keras")

# Runs the real CLI entry point in this fresh interpreter, then reports what got imported.
WRAPPER = textwrap.dedent(
    """
    import json, sys
    from serenbox.device.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
    print("MODULES " + json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
    """
)


def run_device(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER.format(heavy=set(HEAVY)), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = [line for line in proc.stderr.splitlines() if line.startswith("MODULES ")]
    assert report, proc.stderr
    return json.loads(report[-1].removeprefix("MODULES "))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("notf")
    model = convert_tiny(brightness_model(), folder / "model")
    config = folder / "serenbox.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": {"path": str(model)}, "state_dir": str(folder / "state"), "camera": {"source": "demo", "fps": 20}}
        )
    )
    image = folder / "face.png"
    cv2.imwrite(str(image), scene(face_patch(), HAPPY))
    return config, image


def test_run_does_not_import_tensorflow(setup: tuple[Path, Path]) -> None:
    config, _ = setup
    report = run_device("run", "--config", str(config), "--print-events", "--max-frames", "5")
    assert report == {"code": 0, "heavy": []}


def test_classify_does_not_import_tensorflow(setup: tuple[Path, Path]) -> None:
    config, image = setup
    report = run_device("classify", str(image), "--config", str(config))
    assert report == {"code": 0, "heavy": []}


def test_the_python_api_does_not_import_tensorflow(setup: tuple[Path, Path]) -> None:
    config, image = setup
    code = textwrap.dedent(
        f"""
        import json, sys
        import serenbox
        faces = serenbox.classify({str(image)!r}, config={str(config)!r})
        crops = serenbox.classify(open({str(image)!r}, "rb").read(), crop=True, config={str(config)!r})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {set(HEAVY)!r})
        print(json.dumps({{"faces": len(faces), "crops": len(crops), "heavy": heavy}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"faces": 1, "crops": 1, "heavy": []}


def test_no_device_module_imports_tensorflow() -> None:
    # Every module under device/, the MQTT sink included, imported into one fresh interpreter.
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        import serenbox.device as device
        for info in pkgutil.walk_packages(device.__path__, "serenbox.device."):
            if info.name != "serenbox.device.__main__":
                importlib.import_module(info.name)
        print(sorted(m for m in sys.modules if m.split(".")[0] in {set(HEAVY)!r}))
        print(len([m for m in sys.modules if m.startswith("serenbox.device.")]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy, count = proc.stdout.splitlines()
    assert heavy == "[]"
    assert int(count) >= 10  # it really imported the device package's modules
