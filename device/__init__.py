"""SerenBox on-device emotion runtime (no TensorFlow on this path)."""

__version__ = "0.1.0"
