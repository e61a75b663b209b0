# Licensed under a 3-clause BSD style license - see LICENSE
"""Memory budgets: parsing ``max_memory=`` values and printing sizes."""

from astropy import units as u

from .exceptions import CubeSFHError

__all__ = ["DEFAULT_MAX_MEMORY", "as_bytes", "format_bytes"]

#: Default memory budget of chunked operations and in-memory loads (1 GB).
DEFAULT_MAX_MEMORY = 1 * u.GB


def as_bytes(value):
    """
    Memory limit as an integer number of bytes.

    Parameters
    ----------
    value : `~astropy.units.Quantity`, str, int or `None`
        Bytes (int), an information Quantity such as ``2 * u.GB`` or a string
        such as ``'2 GB'``; `None` means `DEFAULT_MAX_MEMORY`.

    Returns
    -------
    nbytes : int

    Raises
    ------
    CubeSFHError
        If the value is not an amount of memory or not positive.
    """
    if value is None:
        value = DEFAULT_MAX_MEMORY
    if isinstance(value, str):
        value = u.Quantity(value)
    if isinstance(value, u.Quantity):
        try:
            value = value.to_value(u.byte)
        except u.UnitConversionError:
            msg = (f"max_memory={value} is not an amount of memory; give bytes (int) or a "
                   "Quantity such as 2 * u.GB.")
            raise CubeSFHError(msg) from None
    value = int(value)
    if value <= 0:
        msg = f"max_memory must be positive, got {value} bytes; e.g. max_memory=2 * u.GB."
        raise CubeSFHError(msg)
    return value


def format_bytes(nbytes):
    """A number of bytes for messages: ``'1.23 GB'``, ``'512 bytes'``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} bytes"
