# Licensed under a 3-clause BSD style license - see LICENSE
"""
HST photometry of the spatial bins of a MUSE cube.

Each HST image is converted to surface brightness, convolved to the cube's
PSF with a photutils matching kernel (:func:`match_psf`), reprojected onto
the spaxel grid conserving flux (:func:`reproject_to_cube`) and averaged in
every bin (:func:`bin_photometry`). For a redshifted galaxy,
:func:`k_correction` turns the observed-frame band fluxes into the rest-frame
ones the network was trained on.
"""

from ._binphot import BinPhotometry, bin_photometry
from ._kcorr import (
    K_CORRECT_MIN_Z,
    attenuation,
    bin_k_factors,
    fit_attenuation,
    history_sed,
    k_correction,
    k_correction_filters,
    sed_attenuation,
    sed_k_factors,
)
from ._psf import DEFAULT_WINDOW, gaussian_psf, make_matching_kernel, match_psf
from ._reproject import cutout_to_grid, grid_overlap, reproject_to_cube

__all__ = [
    "DEFAULT_WINDOW",
    "K_CORRECT_MIN_Z",
    "BinPhotometry",
    "attenuation",
    "bin_k_factors",
    "bin_photometry",
    "cutout_to_grid",
    "fit_attenuation",
    "gaussian_psf",
    "grid_overlap",
    "history_sed",
    "k_correction",
    "k_correction_filters",
    "make_matching_kernel",
    "match_psf",
    "reproject_to_cube",
    "sed_attenuation",
    "sed_k_factors",
]
