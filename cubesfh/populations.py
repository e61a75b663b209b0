# Licensed under a 3-clause BSD style license - see LICENSE
"""
Mean ages and metallicities from binned star formation histories (eqs. 6-7).

Shared by the CNN predictions and the pPXF baseline so that both are reduced
to light- and mass-weighted quantities in exactly the same way.
"""

import functools

import numpy as np
from astropy import units as u

from .conventions import AGE_BIN_CENTERS, Z_SUN

__all__ = ["bin_light_to_mass", "mean_quantities"]

#: Window defining the V-band light (A).
V_WINDOW = (5450.0, 5550.0)


@functools.lru_cache(maxsize=1)
def _bin_tables():
    from .templates import TemplateLibrary

    lib = TemplateLibrary.load()
    w = lib.wavelength.to_value(u.AA)
    sel = (w >= V_WINDOW[0]) & (w <= V_WINDOW[1])
    light = lib.binned()[:, :, sel].mean(axis=2)  # V light per formed mass, constant SFR
    living = lib.binned_living_fraction()
    return np.log10(lib.metallicity / Z_SUN), np.log10(light / living)


def bin_light_to_mass(zh):
    """
    V-band (5450-5550 A) luminosity per unit living stellar mass of each age bin.

    For a constant star formation rate across each bin, interpolated linearly
    in [Z/H] between the library metallicities (clipped to their range).

    Parameters
    ----------
    zh : `~numpy.ndarray`
        [Z/H] of each age bin, shape ``(..., 16)``.

    Returns
    -------
    ratio : `~numpy.ndarray`
        Same shape, in L_sun / A per M_sun.
    """
    zgrid, log_ratio = _bin_tables()
    zh = np.clip(np.asarray(zh, float), zgrid[0], zgrid[-1])
    out = np.empty(zh.shape)
    for i in range(zh.shape[-1]):
        out[..., i] = 10 ** np.interp(zh[..., i], zgrid, log_ratio[:, i])
    return out


def mean_quantities(mass_fraction, zh):
    """
    Light- (V-band) and mass-weighted mean log age and [Z/H] (eqs. 6-7).

    Parameters
    ----------
    mass_fraction : `~numpy.ndarray`
        Living-mass fractions in the 16 age bins, ``(..., 16)``.
    zh : `~numpy.ndarray`
        [Z/H] of each bin, ``(..., 16)``.

    Returns
    -------
    out : dict
        ``logage_lw``, ``logage_mw``, ``zh_lw``, ``zh_mw`` and ``light_fraction``.
    """
    mf = np.asarray(mass_fraction, float)
    zh = np.asarray(zh, float)
    la = np.log10(AGE_BIN_CENTERS.to_value(u.yr))
    light = mf * bin_light_to_mass(zh)
    lf = light / light.sum(axis=-1, keepdims=True)
    mfn = mf / mf.sum(axis=-1, keepdims=True)
    return {
        "logage_mw": (mfn * la).sum(axis=-1),
        "logage_lw": (lf * la).sum(axis=-1),
        "zh_mw": (mfn * zh).sum(axis=-1),
        "zh_lw": (lf * zh).sum(axis=-1),
        "light_fraction": lf,
    }
