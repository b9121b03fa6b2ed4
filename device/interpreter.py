"""The TFLite interpreter, from whichever runtime this machine has.

ai-edge-litert is the maintained runtime (numpy 2); tflite-runtime 2.14 is its last
release for older Pi images (numpy<2); tensorflow.lite is used only when already
installed (a developer machine) and is never required on a SerenBox.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from serenbox.device.logs import native_stderr_to_log

log = logging.getLogger(__name__)

_RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite")


class RuntimeMissing(RuntimeError):
    pass


def interpreter_class() -> tuple[type, str]:
    """The Interpreter class and the name of the runtime it came from."""
    for name in _RUNTIMES:
        if name == "tensorflow.lite" and importlib.util.find_spec("tensorflow") is None:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.Interpreter, name.split(".")[0]
    raise RuntimeMissing("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime where numpy<2)")


def load_interpreter(model_path: str, num_threads: int = 1) -> Any:
    cls, _ = interpreter_class()
    # The runtime's C++ announces its XNNPACK delegate on stderr while it builds and plans the
    # graph; caught here, that line is logged at DEBUG instead of landing raw in the journal.
    with native_stderr_to_log(log, "tflite"):
        interpreter = cls(model_path=str(model_path), num_threads=num_threads)
        interpreter.allocate_tensors()
    return interpreter


def runtime_version() -> str:
    _, name = interpreter_class()
    try:
        from importlib.metadata import version

        return f"{name} {version(name.replace('_', '-'))}"
    except Exception:
        return name
