# Licensed under a 3-clause BSD style license - see LICENSE
"""Warning and exception classes used throughout cubesfh."""

from astropy.utils.exceptions import AstropyUserWarning

__all__ = ["CubeSFHError", "CubeSFHWarning"]


class CubeSFHWarning(AstropyUserWarning):
    """Base class for all warnings emitted by cubesfh."""


class CubeSFHError(ValueError):
    """Input that cubesfh cannot use; the message names the problem and the fix."""
