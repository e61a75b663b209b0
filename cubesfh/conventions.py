# Licensed under a 3-clause BSD style license - see LICENSE
"""
Fixed conventions shared by every pipeline stage and by the bundled CNN.

These numbers define what the network was trained on (Galceran et al. 2026,
sections 2.3 and 3.1); changing any of them requires retraining.
"""

import numpy as np
from astropy import units as u

__all__ = [
    "AGE_BIN_CENTERS",
    "AGE_BIN_EDGES",
    "HST_BANDS",
    "NORM_WINDOW",
    "N_AGE_BINS",
    "OUTPUT_WAVELENGTH",
    "SIGMA_TARGET",
    "SNR_WINDOW",
    "Z_SUN",
]

#: Centres of the 16 age bins of the star formation history.
AGE_BIN_CENTERS = np.array(
    [0.007, 0.021, 0.0425, 0.076, 0.1145, 0.1615, 0.23, 0.345, 0.545, 0.865,
     1.37, 2.17, 3.44, 5.455, 8.645, 14.2]
) * u.Gyr

#: Number of age bins.
N_AGE_BINS = AGE_BIN_CENTERS.size


def _bin_edges(centers):
    c = centers.to_value(u.Gyr)
    inner = np.sqrt(c[1:] * c[:-1])  # geometric means of neighbouring centres
    upper = c[-1] ** 2 / inner[-1]  # last bin symmetric in log age about its centre
    return np.concatenate([[0.0], inner, [upper]]) * u.Gyr


#: Edges of the age bins (17 values): geometric means of neighbouring centres,
#: 0 below the first bin, and the last bin symmetric in log age about 14.2 Gyr
#: (upper edge 18.2 Gyr, inside the BC03 age range).
AGE_BIN_EDGES = _bin_edges(AGE_BIN_CENTERS)

#: Rest-frame wavelength grid of the network input: 4800-7000 A at 1.25 A (1761 pixels).
OUTPUT_WAVELENGTH = (4800.0 + 1.25 * np.arange(1761)) * u.AA

#: Window whose mean flux normalises spectra and photometry.
NORM_WINDOW = (5300.0, 5500.0) * u.AA

#: Default window in which the signal-to-noise ratio for binning is measured.
SNR_WINDOW = (5300.0, 5500.0) * u.AA

#: Common stellar velocity dispersion of all network inputs.
SIGMA_TARGET = 150.0 * u.km / u.s

#: The five PHANGS-HST WFC3/UVIS bands, in the order the network expects.
HST_BANDS = ("F275W", "F336W", "F438W", "F555W", "F814W")

#: Solar metallicity of the BC03 models ([Z/H] = log10(Z / Z_SUN)).
Z_SUN = 0.02
