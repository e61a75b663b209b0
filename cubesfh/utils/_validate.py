# Licensed under a 3-clause BSD style license - see LICENSE
"""Validation of user inputs shared by the pipeline stages."""

import numpy as np
from astropy import units as u

from .exceptions import CubeSFHError

__all__ = ["positive_angle"]


def positive_angle(value, name, *, example="1 * u.arcsec", allow_inf=False):
    """
    ``value`` as a scalar angle Quantity, or a `CubeSFHError` naming ``name``.

    Parameters
    ----------
    value : `~astropy.units.Quantity` or float
        A plain number is taken as arcsec.
    name : str
        Name of the argument, for the error message.
    example : str, optional
        Example value shown in the error message.
    allow_inf : bool, optional
        Accept an infinite angle (e.g. a limit that is switched off).
    """
    try:
        q = u.Quantity(value, u.arcsec)
    except u.UnitsError:
        msg = f"{name} must be an angle (e.g. {example}); got {value!r}."
        raise CubeSFHError(msg) from None
    ok = q.isscalar and q.value > 0 and (allow_inf or np.isfinite(q.value))
    if not ok:
        msg = f"{name} must be a single positive angle; got {value!r}."
        raise CubeSFHError(msg)
    return q
