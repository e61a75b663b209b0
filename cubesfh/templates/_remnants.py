# Licensed under a 3-clause BSD style license - see LICENSE
"""
Mass in stellar remnants (white dwarfs, neutron stars, black holes).

The template libraries carry the fraction of the formed mass that is still in
living stars (BC03's ``LIV_MSTAR_FRAC``); the present-day stellar mass that
surveys quote (PHANGS, MaNGA, SDSS) also counts the remnants. They are derived
here from the same IMF: the living fraction of a population fixes its
turn-off mass (the mass of the Chabrier IMF below the turn-off equals the
living mass), and every star above the turn-off has left the remnant of the
initial-final mass relation of Renzini & Ciotti (1993), as in BC03 and
Maraston (2005): 0.077 m + 0.48 (white dwarfs, m < 8.5), 1.4 (neutron stars,
8.5-40) and 0.5 m (black holes, m > 40), in solar masses.
"""

import functools

import numpy as np

__all__ = ["chabrier_imf", "remnant_fraction", "remnant_mass"]

#: Mass range of the IMF of the templates (solar masses; BC03).
IMF_RANGE = (0.1, 100.0)


def chabrier_imf(mass):
    """
    The Chabrier (2003, Table 1, single stars) IMF per unit log mass.

    Log-normal (m_c = 0.079, sigma = 0.69) below 1 solar mass and a power law
    of slope -1.3 (Salpeter's) above, continuous at 1 solar mass; not
    normalised.

    Parameters
    ----------
    mass : `~numpy.ndarray`
        Stellar masses in solar masses.

    Returns
    -------
    xi : `~numpy.ndarray`
        dN / dlog10 m.
    """
    m = np.asarray(mass, float)
    lognormal = np.exp(-(np.log10(m) - np.log10(0.079)) ** 2 / (2 * 0.69**2))
    at_one = np.exp(-(np.log10(0.079)) ** 2 / (2 * 0.69**2))
    return np.where(m <= 1.0, lognormal, at_one * m**-1.3)


def remnant_mass(mass):
    """
    Remnant left by a star of initial mass ``mass`` (Renzini & Ciotti 1993).

    Parameters
    ----------
    mass : `~numpy.ndarray`
        Initial masses in solar masses.

    Returns
    -------
    remnant : `~numpy.ndarray`
        Solar masses.
    """
    m = np.asarray(mass, float)
    return np.where(m < 8.5, 0.077 * m + 0.48, np.where(m < 40.0, 1.4, 0.5 * m))


@functools.lru_cache(maxsize=1)
def _tables():
    logm = np.linspace(np.log10(IMF_RANGE[0]), np.log10(IMF_RANGE[1]), 20001)
    m = 10**logm
    xi = chabrier_imf(m)
    dl = logm[1] - logm[0]
    dmass = m * xi * dl  # mass formed per log-mass step
    total = dmass.sum()
    # living mass if every star below m is alive, and the remnants of those above
    below = np.concatenate([[0.0], np.cumsum(dmass)[:-1]]) / total
    rem = (remnant_mass(m) * xi * dl)[::-1]
    above = np.concatenate([[0.0], np.cumsum(rem)[:-1]])[::-1] / total
    return below, above


def remnant_fraction(living_fraction):
    """
    Fraction of the formed mass in remnants, from the living fraction.

    Parameters
    ----------
    living_fraction : array-like
        Fraction of the formed mass in living stars (any shape), as in the
        template libraries (Chabrier IMF, 0.1-100 solar masses).

    Returns
    -------
    remnants : `~numpy.ndarray`
        Same shape. Living + remnants is the present-day stellar mass per
        unit mass formed (0.55-0.58 for a population of 10-13 Gyr).

    Examples
    --------
    >>> from cubesfh.templates._remnants import remnant_fraction
    >>> float(remnant_fraction(1.0))  # no star has died yet
    0.0
    """
    live = np.clip(np.asarray(living_fraction, float), 0.0, 1.0)
    below, above = _tables()
    # below rises with the turn-off mass; the turn-off is where it equals the living mass
    return np.interp(live, below, above)
