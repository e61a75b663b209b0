# Licensed under a 3-clause BSD style license - see LICENSE
"""
Line-spread functions: MUSE and the template library.

The MUSE LSF follows the wavelength dependence measured on the MUSE Hubble
Ultra Deep Field (Bacon et al. 2017, A&A 608, A1, eq. 8):
FWHM(lambda) = 5.866e-8 lambda^2 - 9.187e-4 lambda + 6.040 (all in Angstrom),
i.e. ~2.98 A at 4800 A, 2.55 A at 6500 A and 2.48 A at 7000 A.
"""

import numpy as np
from astropy import units as u

__all__ = ["FWHM_TO_SIGMA", "fwhm_to_velocity_sigma", "muse_lsf_fwhm", "template_lsf_fwhm"]

#: Ratio sigma / FWHM of a Gaussian.
FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))

_MUSE_POLY = (5.866e-8, -9.187e-4, 6.040)

#: Resolution of the BC03 models computed with the MILES library (FWHM, Angstrom),
#: valid over 3525-7500 A (Bruzual & Charlot 2003; Sanchez-Blazquez et al. 2006).
TEMPLATE_FWHM = 2.5 * u.AA


@u.quantity_input(wavelength=u.AA)
def muse_lsf_fwhm(wavelength):
    """
    FWHM of the MUSE line-spread function at ``wavelength``.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Observed-frame wavelength(s).

    Returns
    -------
    fwhm : `~astropy.units.Quantity`
        FWHM in Angstrom, same shape as ``wavelength``.

    Examples
    --------
    >>> from astropy import units as u
    >>> from cubesfh.lsf import muse_lsf_fwhm
    >>> muse_lsf_fwhm(4800 * u.AA).round(2)
    <Quantity 2.98 Angstrom>
    """
    lam = wavelength.to_value(u.AA)
    a, b, c = _MUSE_POLY
    return (a * lam**2 + b * lam + c) * u.AA


@u.quantity_input(wavelength=u.AA)
def template_lsf_fwhm(wavelength):
    """
    FWHM of the template library (BC03/MILES, constant 2.5 A) at ``wavelength``.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Rest-frame wavelength(s).

    Returns
    -------
    fwhm : `~astropy.units.Quantity`
    """
    return np.full(np.shape(wavelength), TEMPLATE_FWHM.to_value(u.AA)) * u.AA


@u.quantity_input(fwhm=u.AA, wavelength=u.AA)
def fwhm_to_velocity_sigma(fwhm, wavelength):
    """
    Convert an instrumental FWHM at ``wavelength`` to a Gaussian sigma in km/s.

    Parameters
    ----------
    fwhm, wavelength : `~astropy.units.Quantity`

    Returns
    -------
    sigma : `~astropy.units.Quantity`
        In km/s.
    """
    from astropy.constants import c

    return (fwhm * FWHM_TO_SIGMA / wavelength * c).to(u.km / u.s)
