"""SerenBox: the edge emotion runtime, as one Python package.

The repository keeps the design's folders (``device/``, ``converter/``, ``training/``) at its top
level; installed, they are ``serenbox.device``, ``serenbox.converter`` and ``serenbox.training``.
"""

from __future__ import annotations

from pathlib import Path

# In a checkout (run from the repository root, or an editable install) the subpackages are this
# folder's siblings; an installed wheel has them inside this folder and skips this.
_HERE = Path(__file__).resolve().parent
if not (_HERE / "device").is_dir() and (_HERE.parent / "device" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # type: ignore[name-defined]

from serenbox.device import __version__  # noqa: E402

__all__ = ["__version__"]
