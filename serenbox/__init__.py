"""SerenBox: the edge emotion runtime, as one Python package.

`serenbox.classify(image)` gives the emotions of the faces in a photo (serenbox/api.py). It and
its types load on first use, so `import serenbox` stays cheap (no numpy, OpenCV or model).

The repository keeps the design's folders (``device/``, ``converter/``, ``training/``) at its top
level; installed, they are ``serenbox.device``, ``serenbox.converter`` and ``serenbox.training``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

# In a checkout (run from the repository root, or an editable install) the subpackages are this
# folder's siblings; an installed wheel has them inside this folder and skips this.
_HERE = Path(__file__).resolve().parent
if not (_HERE / "device").is_dir() and (_HERE.parent / "device" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # type: ignore[name-defined]

from serenbox.device import __version__  # noqa: E402

if TYPE_CHECKING:
    from serenbox.api import classify
    from serenbox.device.classifier import ModelError
    from serenbox.device.config import ConfigError
    from serenbox.device.images import ImageError
    from serenbox.device.photos import Box, FaceEmotion, PixelBox

__all__ = ["Box", "ConfigError", "FaceEmotion", "ImageError", "ModelError", "PixelBox", "__version__", "classify"]

# name → the module that defines it, imported on first access (PEP 562).
_LAZY = {
    "classify": "serenbox.api",
    "FaceEmotion": "serenbox.device.photos",
    "Box": "serenbox.device.photos",
    "PixelBox": "serenbox.device.photos",
    "ImageError": "serenbox.device.images",
    "ConfigError": "serenbox.device.config",
    "ModelError": "serenbox.device.classifier",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'serenbox' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
