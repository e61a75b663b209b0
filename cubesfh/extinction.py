# Licensed under a 3-clause BSD style license - see LICENSE
"""
Milky Way foreground extinction.

The network was trained on galaxies with their own dust only; light from a
galaxy seen through the Milky Way is reddened further, by E(B-V) from a few
hundredths of a magnitude (most PHANGS targets) to half a magnitude or more at
low Galactic latitude. :func:`~cubesfh.preprocess.prepare_observation` removes
it from the binned spectra and the HST photometry when given ``ebv_galactic``,
the colour excess of the sight line from the dust maps (Schlegel, Finkbeiner &
Davis 1998, recalibrated by Schlafly & Finkbeiner 2011). cubesfh has no copy
of the maps, and nothing is downloaded: look the value up (e.g. with the
``dustmaps`` package or the IRSA dust service) and pass it.

The curve is that of Cardelli, Clayton & Mathis (1989, ApJ 345, 245) with the
optical coefficients of O'Donnell (1994, ApJ 422, 158), for R_V = 3.1 by
default, valid from 0.3 to 10 inverse microns (1000 A - 3.3 micron).
"""

import numpy as np
from astropy import units as u

from .utils import CubeSFHError

__all__ = ["band_transmission", "ccm89", "galactic_transmission"]

# O'Donnell (1994) optical polynomials in y = x - 1.82, lowest order first
_OPT_A = (1.0, 0.104, -0.609, 0.701, 1.137, -1.718, -0.827, 1.647, -0.505)
_OPT_B = (0.0, 1.952, 2.908, -3.989, -7.985, 11.102, 5.491, -10.805, 3.347)


def ccm89(wavelength, r_v=3.1):
    """
    Extinction curve A(lambda) / A(V) of Cardelli, Clayton & Mathis (1989).

    With the optical (1.1-3.3 inverse micron) coefficients of O'Donnell (1994).

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Vacuum or air wavelengths (the difference is negligible here),
        1000 A to 3.33 micron.
    r_v : float, optional
        A(V) / E(B-V) (default 3.1, the diffuse Milky Way).

    Returns
    -------
    ratio : `~numpy.ndarray`
        A(lambda) / A(V), same shape as ``wavelength``.

    Examples
    --------
    >>> from astropy import units as u
    >>> from cubesfh.extinction import ccm89
    >>> round(float(ccm89(5494.5 * u.AA)), 4)  # V (x = 1.82 per micron): 1
    1.0
    >>> round(float(ccm89(4400 * u.AA)), 3)  # B: about 1 + 1 / R_V
    1.322
    """
    x = 1.0 / np.atleast_1d(u.Quantity(wavelength, u.AA).to_value(u.micron))
    if np.any((x < 0.3) | (x > 10.0)):
        msg = ("ccm89 is defined from 1000 A to 3.33 micron; got wavelengths from "
               f"{1e4 / x.max():.0f} to {1e4 / x.min():.0f} A.")
        raise CubeSFHError(msg)
    a = np.empty_like(x)
    b = np.empty_like(x)
    ir = x < 1.1
    a[ir] = 0.574 * x[ir] ** 1.61
    b[ir] = -0.527 * x[ir] ** 1.61
    opt = (x >= 1.1) & (x < 3.3)
    y = x[opt] - 1.82
    a[opt] = np.polynomial.polynomial.polyval(y, _OPT_A)
    b[opt] = np.polynomial.polynomial.polyval(y, _OPT_B)
    uv = x >= 3.3
    xu = x[uv]
    fa = np.where(xu >= 5.9, -0.04473 * (xu - 5.9) ** 2 - 0.009779 * (xu - 5.9) ** 3, 0.0)
    fb = np.where(xu >= 5.9, 0.2130 * (xu - 5.9) ** 2 + 0.1207 * (xu - 5.9) ** 3, 0.0)
    a[uv] = 1.752 - 0.316 * xu - 0.104 / ((xu - 4.67) ** 2 + 0.341) + fa
    b[uv] = -3.090 + 1.825 * xu + 1.206 / ((xu - 4.62) ** 2 + 0.263) + fb
    out = a + b / r_v
    return out.reshape(np.shape(u.Quantity(wavelength).value))


def galactic_transmission(wavelength, ebv, *, r_v=3.1):
    """
    Fraction of the light transmitted through a foreground screen.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Observed wavelengths.
    ebv : float
        E(B-V) of the sight line (mag).
    r_v : float, optional

    Returns
    -------
    t : `~numpy.ndarray`
        ``10**(-0.4 E(B-V) R_V A(lambda)/A(V))``.
    """
    ebv = float(ebv)
    if not np.isfinite(ebv) or ebv < 0:
        msg = f"ebv_galactic={ebv!r}: give the colour excess E(B-V) >= 0 of the sight line."
        raise CubeSFHError(msg)
    return 10.0 ** (-0.4 * ebv * r_v * ccm89(wavelength, r_v))


def band_transmission(band, ebv, *, instrument="WFC3/UVIS", r_v=3.1):
    """
    Transmission of a screen averaged over an HST band (photon-weighted, flat f_lambda).

    Parameters
    ----------
    band : str
    ebv : float
    instrument : str, optional
    r_v : float, optional

    Returns
    -------
    t : float
    """
    from .templates import load_filter

    filt = load_filter(band, instrument)
    wave = filt.wavelength
    good = (wave > 1000 * u.AA) & (wave < 33000 * u.AA)
    wave = wave[good]
    weights = filt.weights(wave)
    return float(np.sum(weights * galactic_transmission(wave, ebv, r_v=r_v))
                 / np.sum(weights))
