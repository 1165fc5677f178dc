"""Versions of basin and its main dependencies, for model cards and result files."""

from __future__ import annotations

from importlib import metadata


def versions() -> dict[str, str]:
    out = {}
    for dist in ("basin", "torch", "safetensors", "huggingface-hub", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out
