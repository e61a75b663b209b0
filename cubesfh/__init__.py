# Licensed under a 3-clause BSD style license - see LICENSE
"""
cubesfh: spatially resolved star formation histories and age-metallicity
relations from MUSE data cubes and HST images.

The main entry point for analysis scripts is :class:`~cubesfh.Cube`::

    >>> from cubesfh import Cube  # doctest: +SKIP
    >>> cube = Cube.read("NGC3627_DATACUBE.fits")  # doctest: +SKIP

torch is never imported here: the CNN modules import it when they are used.
"""

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - running from a source tree without build
    __version__ = "0.0.0"

from .utils.exceptions import CubeSFHError, CubeSFHWarning

_LAZY = {"Cube": "cube", "HSTImage": "hst"}


def __getattr__(name):
    # Import the data classes on first use so that ``import cubesfh`` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)

__all__ = ["Cube", "CubeSFHError", "CubeSFHWarning", "HSTImage", "__version__"]
