# Licensed under a 3-clause BSD style license - see LICENSE
"""Small shared helpers: warnings, optional dependencies, progress bars, atomic writes."""

from ._io import atomic_write, sha256_file
from ._progress import progress
from ._validate import positive_angle
from .exceptions import CubeSFHError, CubeSFHWarning

__all__ = ["CubeSFHError", "CubeSFHWarning", "atomic_write", "positive_angle", "progress",
           "sha256_file"]
