"""Config files: ml_collections `.py` files with a `get_config()` (configs/*.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def load_config_file(path) -> ml_collections.ConfigDict:
    """`get_config()` of an ml_collections config .py file (configs/*.py)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {str(path)!r} has no get_config()")
    return module.get_config()
