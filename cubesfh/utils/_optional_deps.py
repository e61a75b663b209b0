# Licensed under a 3-clause BSD style license - see LICENSE
"""Flags for optional or heavy dependencies, checked without importing them."""

import importlib.util

__all__ = ["HAS_DISTRIBUTED", "HAS_POWERBIN", "HAS_TORCH"]


def _has(name):
    return importlib.util.find_spec(name) is not None


HAS_TORCH = _has("torch")
HAS_DISTRIBUTED = _has("distributed")
HAS_POWERBIN = _has("powerbin")
