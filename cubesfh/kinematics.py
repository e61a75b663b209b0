# Licensed under a 3-clause BSD style license - see LICENSE
"""
Stellar kinematics (line-of-sight velocity and dispersion) per Voronoi bin.

Two ways to obtain the kinematics that the rest-frame preparation step needs:

* :func:`fit_kinematics` fits every bin with pPXF (Cappellari & Emsellem 2004;
  Cappellari 2017, 2023) on the project's template library, after matching the
  templates to the MUSE line-spread function and masking the gas emission lines.
  The work for one bin is the pure function :func:`fit_spectrum`; the loop over
  bins is separate, so that it can be distributed (e.g. with dask) later.
* :func:`fit_spectrum_kinematics` fits one spectrum on any wavelength grid
  (linear or logarithmic, air or vacuum) with a resolution given as a FWHM or
  as a resolving power R, e.g. a MaNGA or SDSS spectrum.
* :func:`read_kinematics_maps` reads existing maps (PHANGS DAP ``MAPS`` files
  or any pair of 2-D FITS maps with a celestial WCS), reprojects them onto the
  cube grid and averages them per bin.

Both return a `~astropy.table.QTable` with the same columns (see
:func:`fit_kinematics`) and flags from :class:`KinematicsFlag`.
"""

import enum
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy import units as u
from astropy.constants import c as _speed_of_light
from astropy.table import QTable

from ._spectral import gaussian_broadening_matrix
from .lsf import FWHM_TO_SIGMA, muse_lsf_fwhm
from .utils import progress
from .utils.exceptions import CubeSFHError, CubeSFHWarning

__all__ = [
    "EMISSION_LINES",
    "KinematicTemplates",
    "KinematicsFlag",
    "LogRebinnedSpectra",
    "SpectrumFit",
    "SpectrumKinematics",
    "check_kinematics",
    "emission_line_mask",
    "fit_kinematics",
    "fit_spectrum",
    "fit_spectrum_kinematics",
    "log_rebin_spectra",
    "prepare_templates",
    "read_kinematics_maps",
]

log = logging.getLogger(__name__)

_C_KMS = _speed_of_light.to_value(u.km / u.s)
_KMS = u.km / u.s

#: Rest-frame air wavelengths of the gas emission lines masked in the stellar fit.
EMISSION_LINES = {
    "Hdelta": 4101.74 * u.AA,
    "Hgamma": 4340.47 * u.AA,
    "Hbeta": 4861.33 * u.AA,
    "[OIII]4959": 4958.91 * u.AA,
    "[OIII]5007": 5006.84 * u.AA,
    "[NI]5198": 5197.90 * u.AA,
    "[NI]5200": 5200.26 * u.AA,
    "HeI5876": 5875.62 * u.AA,
    "[OI]6300": 6300.30 * u.AA,
    "[OI]6364": 6363.78 * u.AA,
    "[NII]6548": 6548.05 * u.AA,
    "Halpha": 6562.80 * u.AA,
    "[NII]6583": 6583.45 * u.AA,
    "HeI6678": 6678.15 * u.AA,
    "[SII]6716": 6716.44 * u.AA,
    "[SII]6731": 6730.82 * u.AA,
}

#: Interstellar Na I D doublet (air), masked on request (``mask_nad=True``).
_NAD_LINES = {"NaD5890": 5889.95 * u.AA, "NaD5896": 5895.92 * u.AA}

# Allowed range of the fitted velocity about the starting guess, and of sigma.
_VELOCITY_BOUND = 2000.0  # km/s, either side of the start
_SIGMA_BOUNDS = (1.0, 1000.0)  # km/s
# pPXF extends the template range it needs by this much beyond the velocity bounds.
_PPXF_MARGIN = 900.0  # km/s
# A bin needs at least this fraction of the fit-range pixels to be valid.
_MIN_GOOD_FRACTION = 0.2


class KinematicsFlag(enum.IntFlag):
    """
    Quality flags of the per-bin kinematics (bit values, combinable).

    A bin with a non-zero flag has NaN velocities unless the flag is only
    ``AT_BOUND``.
    """

    #: Fit converged inside the allowed parameter range.
    OK = 0
    #: Too few valid pixels (e.g. an all-NaN spectrum) or, for external maps,
    #: no valid map value in the bin: nothing was measured.
    NO_DATA = 1
    #: pPXF raised an error or returned non-finite values for this bin.
    FIT_FAILED = 2
    #: The velocity or the dispersion ended at a bound of the allowed range
    #: (velocity +-2000 km/s about the systemic one, sigma 1-1000 km/s); the
    #: values are kept but are unreliable.
    AT_BOUND = 4
    #: The reduced chi^2 is more than ``chi2_factor`` (3) times the median of
    #: all bins (and above 2): the templates do not describe this spectrum
    #: (a foreground star, an AGN, a sky residual, bad data); values kept.
    CHI2_HIGH = 8
    #: The velocity departs from the median of the bins by more than the
    #: allowed spread (see `check_kinematics`): inconsistent with the velocity
    #: field of the galaxy; values kept.
    VELOCITY_OUTLIER = 16


class SpectrumFit(NamedTuple):
    """Result of :func:`fit_spectrum` for one spectrum (plain floats, km/s)."""

    #: pPXF velocity ``c ln(lambda_obs / lambda_templates)`` relative to the
    #: frame of the log-rebinned spectrum, km/s.
    velocity: float
    #: Intrinsic stellar velocity dispersion, km/s.
    sigma: float
    #: Formal 1-sigma error of ``velocity``, km/s.
    velocity_err: float
    #: Formal 1-sigma error of ``sigma``, km/s.
    sigma_err: float
    #: Reduced chi^2 of the fit.
    chi2: float
    #: `KinematicsFlag` value.
    flag: int
    #: Number of pixels used in the fit.
    n_good: int


@dataclass(frozen=True)
class LogRebinnedSpectra:
    """
    Spectra log-rebinned in the frame of the systemic redshift, ready for pPXF.

    Made by :func:`log_rebin_spectra`.

    Attributes
    ----------
    flux : `~numpy.ndarray`
        Shape (n_spectra, n_pix); zero where not ``valid``.
    noise : `~numpy.ndarray`
        1-sigma noise, same shape; positive everywhere (invalid pixels hold
        a placeholder and are excluded by ``valid``).
    valid : `~numpy.ndarray`
        Boolean, same shape: pixel entirely made of finite data with positive
        variance.
    lam : `~numpy.ndarray`
        Rest-frame (de-redshifted by ``1 + redshift``) wavelength of each
        pixel, Angstrom (geometric pixel centres).
    velscale : float
        Pixel size in km/s.
    redshift : float
        The redshift by which the wavelengths were divided.
    """

    flux: np.ndarray
    noise: np.ndarray
    valid: np.ndarray
    lam: np.ndarray
    velscale: float
    redshift: float


@dataclass(frozen=True)
class KinematicTemplates:
    """
    Templates matched to the data resolution and log-rebinned for pPXF.

    Made by :func:`prepare_templates`.

    Attributes
    ----------
    flux : `~numpy.ndarray`
        Shape (n_pix_templates, n_templates), each template normalised to a
        median of one over the fit range.
    lam : `~numpy.ndarray`
        Rest-frame wavelength of each template pixel, Angstrom.
    velscale : float
        Pixel size of the *data*, km/s; the templates are sampled at
        ``velscale / velscale_ratio``.
    velscale_ratio : int
        Oversampling of the templates with respect to the data.
    redshift : float
        Redshift at which the data line-spread function was evaluated.
    lsf_excess : float
        Largest dispersion (km/s) by which the templates are broader than the
        data in the fit range, where they could not be matched (0 if none).
        The fitted sigma is then underestimated in quadrature by at most
        this amount.
    """

    flux: np.ndarray
    lam: np.ndarray
    velscale: float
    velscale_ratio: int
    redshift: float
    lsf_excess: float


# --------------------------------------------------------------------------- inputs


def _as_redshift(redshift):
    """Return a float redshift from a redshift or a velocity ``cz`` Quantity."""
    if isinstance(redshift, u.Quantity):
        if redshift.unit.is_equivalent(_KMS):
            return float(redshift.to_value(_KMS)) / _C_KMS
        if redshift.unit.is_equivalent(u.dimensionless_unscaled):
            return float(redshift.to_value(u.dimensionless_unscaled))
        msg = (f"redshift has unit {redshift.unit}; give a dimensionless redshift z or a "
               "line-of-sight velocity cz in km/s (e.g. 727 * u.km / u.s).")
        raise CubeSFHError(msg)
    z = float(redshift)
    if not np.isfinite(z) or z <= -1:
        msg = f"redshift={redshift!r} is not a valid redshift; give z > -1 or cz in km/s."
        raise CubeSFHError(msg)
    return z


def _wavelength_range(fit_range):
    fit_range = u.Quantity(fit_range)
    if not fit_range.unit.is_equivalent(u.AA) or fit_range.shape != (2,):
        msg = ("fit_range must be a rest-frame wavelength interval, e.g. "
               "(4800, 7000) * u.AA.")
        raise CubeSFHError(msg)
    lo, hi = fit_range.to_value(u.AA)
    if not lo < hi:
        msg = f"fit_range={fit_range} is empty; give (lower, upper) with lower < upper."
        raise CubeSFHError(msg)
    return float(lo), float(hi)


def _data_arrays(bins, wavelength, spectra, variance):
    """Return wavelength (AA), spectra and variance as float arrays."""
    if bins is not None:
        if any(a is not None for a in (wavelength, spectra, variance)):
            msg = "Give either `bins` or the arrays wavelength=, spectra=, variance=, not both."
            raise CubeSFHError(msg)
        try:
            wavelength, spectra, variance = bins.wavelength, bins.spectra, bins.variance
        except AttributeError as exc:
            msg = (f"`bins` ({type(bins).__name__}) has no {exc.name!r} attribute; pass a "
                   "VoronoiBins object or the arrays wavelength=, spectra=, variance=.")
            raise CubeSFHError(msg) from None
    if wavelength is None or spectra is None:
        msg = "No spectra given: pass a VoronoiBins object or wavelength= and spectra=."
        raise CubeSFHError(msg)
    wave = u.Quantity(wavelength, u.AA).value if isinstance(wavelength, u.Quantity) else (
        np.asarray(wavelength, dtype=float))
    unit = spectra.unit if isinstance(spectra, u.Quantity) else None
    flux = np.atleast_2d(u.Quantity(spectra).value if unit is not None else
                         np.asarray(spectra, dtype=float)).astype(float)
    if variance is None:
        msg = ("No variance given: the fit needs the noise of every bin; pass variance= "
               "(or a VoronoiBins object with .variance).")
        raise CubeSFHError(msg)
    if isinstance(variance, u.Quantity):
        var_unit = unit**2 if unit is not None else variance.unit
        try:
            var = variance.to_value(var_unit)
        except u.UnitConversionError:
            msg = (f"variance unit {variance.unit} does not match the square of the spectra "
                   f"unit {unit}; give the variance in {var_unit}.")
            raise CubeSFHError(msg) from None
    else:
        var = np.asarray(variance, dtype=float)
    var = np.atleast_2d(var).astype(float)
    if wave.ndim != 1 or flux.shape[-1] != wave.size or var.shape != flux.shape:
        msg = (f"Inconsistent shapes: wavelength {wave.shape}, spectra {flux.shape}, "
               f"variance {var.shape}; expected (n_lambda,), (n_bins, n_lambda) and "
               "(n_bins, n_lambda).")
        raise CubeSFHError(msg)
    if not np.all(np.diff(wave) > 0):
        msg = "wavelength must increase monotonically."
        raise CubeSFHError(msg)
    return wave, flux, var


def _template_arrays(templates, templates_wavelength, templates_flux, templates_fwhm,
                     template_set):
    """Return template wavelength (AA), flux (n_templates, n_wave) and FWHM (AA)."""
    if templates_flux is not None or templates_wavelength is not None:
        if templates is not None:
            msg = ("Give either `templates` or the arrays templates_wavelength=, "
                   "templates_flux=, templates_fwhm=, not both.")
            raise CubeSFHError(msg)
        if templates_flux is None or templates_wavelength is None or templates_fwhm is None:
            msg = ("Explicit templates need all of templates_wavelength=, templates_flux= "
                   "and templates_fwhm=.")
            raise CubeSFHError(msg)
        wave, flux, fwhm = templates_wavelength, templates_flux, templates_fwhm
    else:
        if templates is None:
            from .templates import TemplateLibrary

            templates = TemplateLibrary.load()
        if template_set == "binned":
            if not hasattr(templates, "binned"):
                msg = (f"{type(templates).__name__} has no binned() method; use "
                       "template_set='all'.")
                raise CubeSFHError(msg)
            flux = templates.binned()
        elif template_set == "all":
            flux = templates.flux
        else:
            msg = f"template_set={template_set!r} is not one of 'binned', 'all'."
            raise CubeSFHError(msg)
        wave, fwhm = templates.wavelength, templates.fwhm
    wave = u.Quantity(wave, u.AA).value if isinstance(wave, u.Quantity) else (
        np.asarray(wave, dtype=float))
    flux = np.asarray(u.Quantity(flux).value if isinstance(flux, u.Quantity) else flux,
                      dtype=float)
    flux = flux.reshape(-1, flux.shape[-1])
    if wave.ndim != 1 or flux.shape[-1] != wave.size:
        msg = (f"Template wavelength {wave.shape} does not match the last axis of the "
               f"template fluxes {flux.shape}.")
        raise CubeSFHError(msg)
    if not np.all(np.diff(wave) > 0):
        msg = "Template wavelengths must increase monotonically."
        raise CubeSFHError(msg)
    return wave, flux, fwhm


def _fwhm_values(fwhm, wavelength):
    """Evaluate a FWHM given as callable, Quantity or number (AA) at ``wavelength``."""
    if callable(fwhm):
        value = fwhm(wavelength * u.AA)
    else:
        value = fwhm
    value = u.Quantity(value, u.AA).value if isinstance(value, u.Quantity) else (
        np.asarray(value, dtype=float))
    return np.broadcast_to(value, np.shape(wavelength)).astype(float)


# --------------------------------------------------------------------------- building blocks


def emission_line_mask(wavelength, redshift=0.0, *, width=800 * _KMS, lines=None,
                       mask_nad=False):
    """
    Mask of the pixels near gas emission lines.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Observed-frame wavelengths.
    redshift : float or `~astropy.units.Quantity`, optional
        Redshift of the lines (or ``cz`` in velocity units).
    width : `~astropy.units.Quantity`, optional
        Half-width of the masked window around each line, in velocity.
    lines : `~astropy.units.Quantity`, optional
        Rest-frame air wavelengths of the lines; default the values of
        :data:`EMISSION_LINES`.
    mask_nad : bool, optional
        Also mask the Na I D doublet (5890, 5896 A), which interstellar
        absorption can contaminate.

    Returns
    -------
    mask : `~numpy.ndarray`
        Boolean, `True` for pixels within ``width`` of a line.

    Examples
    --------
    >>> from astropy import units as u
    >>> from cubesfh.kinematics import emission_line_mask
    >>> wave = [6540.0, 6548.0, 6555.0, 6563.0, 6570.0, 6583.0, 6590.0] * u.AA
    >>> emission_line_mask(wave, width=100 * u.km / u.s)  # [NII], Halpha, [NII]
    array([False,  True, False,  True, False,  True, False])
    """
    z = _as_redshift(redshift)
    lam = np.asarray(u.Quantity(wavelength, u.AA).value)
    if lines is None:
        lines = u.Quantity(list(EMISSION_LINES.values()))
    lines = np.atleast_1d(u.Quantity(lines, u.AA).value)
    if mask_nad:
        lines = np.concatenate([lines, u.Quantity(list(_NAD_LINES.values())).value])
    dv = u.Quantity(width, _KMS).value
    # Distance in velocity (c ln lambda ratio) to the nearest redshifted line.
    dist = np.abs(np.log(lam[..., None] / (lines * (1.0 + z)))) * _C_KMS
    return np.any(dist <= dv, axis=-1)


def _log_rebin_matrix(lam, velscale=None):
    """
    Sparse matrix that rebins a spectrum sampled at ``lam`` to constant ln-lambda steps.

    Pixel edges are the midpoints between the centres (extrapolated by half a
    pixel at both ends); the output pixels have constant ``velscale`` and
    start at the first input edge. Row ``j`` holds the fraction of output pixel
    ``j`` covered by each input pixel, so ``matrix @ flux`` conserves flux
    density (the same definition as `ppxf.ppxf_util.log_rebin` with
    ``flux=False``) and ``matrix.power(2) @ variance`` is the exact variance
    of independent input pixels.

    Returns
    -------
    matrix : `scipy.sparse.csr_matrix`
        Shape (n_out, n_in).
    ln_lam : `~numpy.ndarray`
        Natural log of the geometric centre of each output pixel.
    velscale : float
        Output pixel size in km/s (by default ``n_out == n_in``).
    """
    from scipy import sparse

    n = lam.size
    edges = np.empty(n + 1)
    edges[1:-1] = 0.5 * (lam[1:] + lam[:-1])
    edges[0] = 1.5 * lam[0] - 0.5 * lam[1]
    edges[-1] = 1.5 * lam[-1] - 0.5 * lam[-2]
    ln_range = np.log(edges[-1]) - np.log(edges[0])
    if velscale is None:
        m = n
        velscale = _C_KMS * ln_range / n
    else:
        velscale = float(velscale)
        m = int(_C_KMS * ln_range / velscale)
    new = edges[0] * np.exp(velscale / _C_KMS * np.arange(m + 1))
    first = np.clip(np.searchsorted(edges, new[:-1], side="right") - 1, 0, n - 1)
    last = np.clip(np.searchsorted(edges, new[1:], side="left") - 1, 0, n - 1)
    counts = last - first + 1
    rows = np.repeat(np.arange(m), counts)
    cols = first[rows] + np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    overlap = (np.minimum(edges[cols + 1], new[rows + 1])
               - np.maximum(edges[cols], new[rows])).clip(0, None)
    weights = overlap / np.diff(new)[rows]
    matrix = sparse.csr_matrix((weights, (rows, cols)), shape=(m, n))
    ln_lam = 0.5 * (np.log(new[1:]) + np.log(new[:-1]))
    return matrix, ln_lam, velscale


def log_rebin_spectra(wavelength, spectra, variance, *, redshift=0.0,
                      fit_range=(4800, 7000) * u.AA, velscale=None):
    """
    De-redshift and log-rebin spectra over a rest-frame fit range.

    The wavelengths are divided by ``1 + redshift`` (which shifts ln lambda
    and leaves velocity widths unchanged), restricted to ``fit_range`` and
    rebinned to pixels of constant ``velscale``, conserving flux density as
    `ppxf.ppxf_util.log_rebin` does. The variance is propagated exactly for
    independent input pixels (the covariance the rebinning introduces between
    neighbouring output pixels is ignored). NaN, infinite or
    non-positive-variance pixels are excluded and every output pixel that
    overlaps one is marked invalid.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Observed wavelengths, shape (n_lambda,), increasing.
    spectra, variance : array-like or `~astropy.units.Quantity`
        Shape (n_spectra, n_lambda) or (n_lambda,).
    redshift : float or `~astropy.units.Quantity`, optional
        Redshift (or ``cz``) defining the rest frame.
    fit_range : `~astropy.units.Quantity`, optional
        Rest-frame wavelength interval kept.
    velscale : float or `~astropy.units.Quantity`, optional
        Output pixel size (km/s); default keeps the number of pixels.

    Returns
    -------
    spectra : `LogRebinnedSpectra`
    """
    wave, flux, var = _data_arrays(None, wavelength, spectra, variance)
    z = _as_redshift(redshift)
    lo, hi = _wavelength_range(fit_range)
    rest = wave / (1.0 + z)
    sel = (rest >= lo) & (rest <= hi)
    covered = min(hi, rest[-1]) - max(lo, rest[0])
    if sel.sum() < 10 or covered < 0.5 * (hi - lo):
        msg = (f"The spectra cover less than half of the rest-frame fit_range {lo:g}-{hi:g} A "
               f"at redshift {z:.5f} (data cover {rest[0]:.1f}-{rest[-1]:.1f} A rest "
               "frame); adjust fit_range or the redshift.")
        raise CubeSFHError(msg)
    flux, var = flux[:, sel], var[:, sel]
    valid = np.isfinite(flux) & np.isfinite(var) & (var > 0)
    if isinstance(velscale, u.Quantity):
        velscale = velscale.to_value(_KMS)
    matrix, ln_lam, velscale = _log_rebin_matrix(rest[sel], velscale)
    f_log = (matrix @ np.where(valid, flux, 0.0).T).T
    v_log = (matrix.power(2) @ np.where(valid, var, 0.0).T).T
    bad = (matrix @ (~valid).astype(float).T).T
    good = (bad < 1e-6) & (v_log > 0)
    noise = np.sqrt(np.where(good, v_log, 0.0))
    # pPXF needs a positive noise everywhere: fill masked pixels with a placeholder.
    fill = np.array([np.max(n[g]) if g.any() else 1.0 for n, g in zip(noise, good, strict=True)])
    noise = np.where(good, noise, fill[:, None])
    return LogRebinnedSpectra(flux=np.where(good, f_log, 0.0), noise=noise, valid=good,
                              lam=np.exp(ln_lam), velscale=velscale, redshift=z)


def prepare_templates(templates=None, *, velscale, redshift=0.0, lsf=muse_lsf_fwhm,
                      fit_range=(4800, 7000) * u.AA, templates_wavelength=None,
                      templates_flux=None, templates_fwhm=None, template_set="binned",
                      velscale_ratio=2):
    """
    Match templates to the data line-spread function and log-rebin them for pPXF.

    Each template is convolved with a Gaussian of wavelength-dependent
    dispersion ``sqrt(FWHM_data**2 - FWHM_templates**2) / 2.355`` where this is
    positive. ``FWHM_data`` is the data LSF evaluated in the observed frame,
    at ``lambda_rest * (1 + redshift)``, and divided by ``1 + redshift`` to
    express it in the rest frame of the templates. Where the data are sharper
    than the templates (for MUSE from ~6850 to ~8800 A observed, by at most
    ~0.06 A FWHM, i.e. <~ 9 km/s in dispersion) nothing can be done by
    convolution: the templates are left as they are, the largest excess is
    stored in ``lsf_excess`` and logged, and the fitted dispersion is biased
    low in quadrature by at most that amount (< 1 km/s for sigma > 40 km/s).

    Parameters
    ----------
    templates : object, optional
        Template library with ``.wavelength``, ``.flux`` (..., n_wave),
        ``.fwhm`` and optionally ``.binned()`` (the default
        ``cubesfh.templates.TemplateLibrary.load()`` when no explicit arrays
        are given).
    velscale : float or `~astropy.units.Quantity`
        Pixel size (km/s) of the log-rebinned data.
    redshift : float or `~astropy.units.Quantity`, optional
        Redshift (or ``cz``) at which the data LSF is evaluated.
    lsf : callable, `~astropy.units.Quantity` or None, optional
        FWHM of the data LSF: a function of observed wavelength returning a
        Quantity, or a constant FWHM. `None` skips the matching (the data are
        assumed to have the template resolution).
    fit_range : `~astropy.units.Quantity`, optional
        Rest-frame interval of the data to be fitted; the templates are kept
        over this interval plus the margin pPXF needs for the allowed
        velocities (+-2900 km/s).
    templates_wavelength, templates_flux, templates_fwhm : optional
        Explicit templates instead of ``templates``: rest-frame wavelengths
        (Quantity or Angstrom), fluxes (..., n_wave) and FWHM (constant,
        array or callable; Quantity or Angstrom).
    template_set : {'binned', 'all'}, optional
        For a library: ``'binned'`` uses ``templates.binned()`` (the 16 age
        bins times all metallicities, 96 templates for the bundled library,
        fast and ample for kinematics); ``'all'`` uses every template in ``templates.flux``.
    velscale_ratio : int, optional
        Template oversampling relative to the data (pPXF ``velscale_ratio``).

    Returns
    -------
    templates : `KinematicTemplates`
    """
    from ppxf import ppxf_util

    wave, flux, fwhm = _template_arrays(templates, templates_wavelength, templates_flux,
                                        templates_fwhm, template_set)
    z = _as_redshift(redshift)
    lo, hi = _wavelength_range(fit_range)
    if isinstance(velscale, u.Quantity):
        velscale = velscale.to_value(_KMS)
    velscale = float(velscale)
    margin = np.exp((_VELOCITY_BOUND + _PPXF_MARGIN + 2 * velscale) / _C_KMS)
    need = (lo / margin, hi * margin)
    if need[0] < wave[0] or need[1] > wave[-1]:
        msg = (f"The templates cover {wave[0]:.1f}-{wave[-1]:.1f} A but the fit range "
               f"{lo:g}-{hi:g} A needs {need[0]:.1f}-{need[1]:.1f} A (with the margin for "
               f"+-{_VELOCITY_BOUND + _PPXF_MARGIN:g} km/s); narrow fit_range.")
        raise CubeSFHError(msg)
    keep = (wave >= need[0] / 1.002) & (wave <= need[1] * 1.002)
    wave, flux = wave[keep], flux[:, keep]

    fwhm_t = _fwhm_values(fwhm, wave)
    if lsf is None:
        fwhm_d = fwhm_t
    else:
        fwhm_d = _fwhm_values(lsf, wave * (1.0 + z)) / (1.0 + z)
    diff2 = fwhm_d**2 - fwhm_t**2
    sig_diff = np.sqrt(np.clip(diff2, 0.0, None)) * FWHM_TO_SIGMA
    in_fit = (wave >= lo) & (wave <= hi)
    excess = np.sqrt(np.clip(-diff2, 0.0, None)) * FWHM_TO_SIGMA / wave * _C_KMS
    lsf_excess = float(np.max(excess[in_fit])) if in_fit.any() else 0.0
    if lsf_excess > 0:
        log.info("Templates are broader than the data LSF by up to %.1f km/s (dispersion) "
                 "in the fit range; left unconvolved there.", lsf_excess)
    if np.any(sig_diff > 0):
        flux = ppxf_util.varsmooth(wave, flux.T, sig_diff).T

    step = np.diff(wave)
    lam_in = wave[[0, -1]] if np.allclose(step, step[0], rtol=1e-6) else wave
    t_log, ln_lam, _ = ppxf_util.log_rebin(lam_in, flux.T,
                                           velscale=velscale / velscale_ratio)
    lam_t = np.exp(ln_lam)
    fit = (lam_t >= lo) & (lam_t <= hi)
    norm = np.median(t_log[fit], axis=0)
    ok = np.isfinite(norm) & (norm > 0) & np.all(np.isfinite(t_log), axis=0)
    if not ok.any():
        msg = ("No usable template: all have non-positive or non-finite flux in the fit "
               "range; check the template library.")
        raise CubeSFHError(msg)
    return KinematicTemplates(flux=t_log[:, ok] / norm[ok], lam=lam_t, velscale=velscale,
                              velscale_ratio=int(velscale_ratio), redshift=z,
                              lsf_excess=lsf_excess)


def fit_spectrum(flux, noise, lam, templates, *, mask=None, start=(0.0, 100.0), degree=8):
    """
    Fit the stellar velocity and dispersion of one log-rebinned spectrum.

    A pure function of its arguments (no state, no I/O, never raises for bad
    data): a spectrum that cannot be fitted is returned with a non-zero
    `KinematicsFlag` and NaN values, which makes it suitable for mapping over
    bins in parallel.

    Parameters
    ----------
    flux, noise : `~numpy.ndarray`
        Log-rebinned spectrum and its 1-sigma noise, shape (n_pix,), as in
        `LogRebinnedSpectra`.
    lam : `~numpy.ndarray`
        Rest-frame wavelength (Angstrom) of each pixel, sampled at
        ``templates.velscale``.
    templates : `KinematicTemplates`
    mask : `~numpy.ndarray`, optional
        Boolean, `True` for pixels to fit (default all finite pixels).
    start : tuple of float, optional
        Starting velocity and dispersion (km/s). The velocity, relative to
        the frame of ``lam``, is fitted within +-2000 km/s (the range the
        templates of `prepare_templates` cover), the dispersion within
        1-1000 km/s.
    degree : int, optional
        Degree of the additive Legendre polynomial (no multiplicative one).

    Returns
    -------
    result : `SpectrumFit`
    """
    from ppxf.ppxf import ppxf

    flux = np.asarray(flux, dtype=float)
    noise = np.asarray(noise, dtype=float)
    good = np.isfinite(flux) & np.isfinite(noise) & (noise > 0)
    if mask is not None:
        good &= np.asarray(mask, dtype=bool)
    n_good = int(good.sum())
    nan = float("nan")
    if n_good < max(_MIN_GOOD_FRACTION * flux.size, 5 * (degree + 3)):
        return SpectrumFit(nan, nan, nan, nan, nan, int(KinematicsFlag.NO_DATA), n_good)
    scale = np.median(np.abs(flux[good]))
    if not scale > 0:
        return SpectrumFit(nan, nan, nan, nan, nan, int(KinematicsFlag.NO_DATA), n_good)
    galaxy = np.where(good, flux, 0.0) / scale
    err = np.where(good, noise, np.max(noise[good])) / scale
    v0 = float(np.clip(start[0], -0.9 * _VELOCITY_BOUND, 0.9 * _VELOCITY_BOUND))
    s0 = float(np.clip(start[1], *_SIGMA_BOUNDS))
    bounds = [[-_VELOCITY_BOUND, _VELOCITY_BOUND], list(_SIGMA_BOUNDS)]
    try:
        # Floating-point warnings of one bad bin are reported through its flag;
        # np.errstate is thread-local, so this is safe under threaded schedulers.
        with np.errstate(all="ignore"):
            pp = ppxf(templates.flux, galaxy, err, templates.velscale, [v0, s0],
                      lam=lam, lam_temp=templates.lam, mask=good, degree=degree,
                      moments=2, bounds=bounds, velscale_ratio=templates.velscale_ratio,
                      linear_method="nnls", quiet=True)
        vel, sig = (float(x) for x in pp.sol[:2])
        vel_err, sig_err = (float(x) for x in pp.error[:2])
        chi2 = float(pp.chi2)
    except Exception as exc:  # any failure of one bin must not stop the cube
        log.debug("pPXF failed: %s: %s", type(exc).__name__, exc)
        return SpectrumFit(nan, nan, nan, nan, nan, int(KinematicsFlag.FIT_FAILED), n_good)
    if not np.all(np.isfinite([vel, sig, vel_err, sig_err, chi2])):
        return SpectrumFit(nan, nan, nan, nan, nan, int(KinematicsFlag.FIT_FAILED), n_good)
    flag = KinematicsFlag.OK
    tol = 1e-3 * templates.velscale
    if (_VELOCITY_BOUND - abs(vel) < tol or sig - _SIGMA_BOUNDS[0] < tol
            or _SIGMA_BOUNDS[1] - sig < tol):
        flag |= KinematicsFlag.AT_BOUND
    return SpectrumFit(vel, sig, vel_err, sig_err, chi2, int(flag), n_good)


# --------------------------------------------------------------------------- the loop


def _fit_mask(log_spectra, *, redshift, mask_emission, mask_width, mask_nad):
    """Pixels to fit common to all bins (emission lines), observed frame."""
    lam_obs = log_spectra.lam * (1.0 + log_spectra.redshift) * u.AA
    good = np.ones(log_spectra.lam.size, dtype=bool)
    if mask_emission:
        good &= ~emission_line_mask(lam_obs, redshift, width=mask_width, mask_nad=mask_nad)
    return good


def _estimate_redshift(wave, flux, var, templates_kw, *, lsf, fit_range, degree,
                       mask_emission, mask_width, mask_nad):
    """
    Systemic redshift from fits of the mean spectrum of all bins.

    A first fit in the frame z = 0 is started from several velocities and the
    best chi^2 kept (unmasked emission lines of a galaxy with cz of several
    hundred km/s can create a false minimum near zero); two more fits in the
    frame of the current estimate, with the emission lines masked there,
    refine it.
    """
    n = np.sum(np.isfinite(flux) & np.isfinite(var), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(np.where(np.isfinite(var), flux, np.nan), axis=0) / n
        mvar = np.nansum(np.where(np.isfinite(flux), var, np.nan), axis=0) / n**2
    msg = ("Could not estimate the systemic redshift from the mean spectrum of the bins; "
           "pass redshift= (z or cz in km/s).")
    z = 0.0
    for iteration in range(3):
        spec = log_rebin_spectra(wave * u.AA, mean, mvar, redshift=z, fit_range=fit_range)
        temp = prepare_templates(velscale=spec.velscale, redshift=z, lsf=lsf,
                                 fit_range=fit_range, **templates_kw)
        good = _fit_mask(spec, redshift=z, mask_emission=mask_emission,
                         mask_width=mask_width, mask_nad=mask_nad) & spec.valid[0]
        starts = (-1500.0, -750.0, 0.0, 750.0, 1500.0) if iteration == 0 else (0.0,)
        fits = [fit_spectrum(spec.flux[0], spec.noise[0], spec.lam, temp, mask=good,
                             start=(v0, 100.0), degree=degree) for v0 in starts]
        fits = [f for f in fits if f.flag == KinematicsFlag.OK]
        if not fits:
            raise CubeSFHError(msg)
        best = min(fits, key=lambda f: f.chi2)
        z = (1.0 + z) * np.exp(best.velocity / _C_KMS) - 1.0
    log.info("Systemic redshift estimated from the mean spectrum: z = %.6f (cz = %.1f km/s)",
             z, z * _C_KMS)
    return z


def _kinematics_table(results, z0):
    """
    The per-bin table of :func:`fit_kinematics` from `SpectrumFit` results.

    pPXF velocities are ``c ln[(1 + z) / (1 + z0)]``; they are converted to
    the usual definitions, ``velocity = c [(1 + z) / (1 + z0) - 1]`` and
    ``velocity_los = cz``.
    """
    res = {name: np.array([getattr(r, name) for r in results])
           for name in SpectrumFit._fields}
    factor = np.exp(res["velocity"] / _C_KMS)
    table = QTable()
    table["bin"] = np.arange(len(results))
    table["velocity"] = _C_KMS * (factor - 1.0) * _KMS
    table["velocity_los"] = _C_KMS * ((1.0 + z0) * factor - 1.0) * _KMS
    table["sigma"] = res["sigma"] * _KMS
    table["velocity_err"] = res["velocity_err"] * factor * _KMS
    table["sigma_err"] = res["sigma_err"] * _KMS
    table["chi2"] = res["chi2"]
    table["n_good"] = res["n_good"].astype(int)
    table["flag"] = res["flag"].astype(np.int16)
    table.meta["redshift"] = z0
    return table


def fit_kinematics(bins=None, *, wavelength=None, spectra=None, variance=None,
                   templates=None, templates_wavelength=None, templates_flux=None,
                   templates_fwhm=None, template_set="binned", redshift=None,
                   lsf=muse_lsf_fwhm, fit_range=(4800, 7000) * u.AA, mask_emission=True,
                   mask_width=800 * _KMS, mask_nad=False, degree=8, progress_bar=True):
    """
    Fit the stellar line-of-sight velocity and dispersion of every bin with pPXF.

    For each bin the spectrum is de-redshifted by the systemic redshift,
    restricted to the rest-frame ``fit_range`` and log-rebinned
    (:func:`log_rebin_spectra`); the templates are convolved to the data
    line-spread function in the observed frame and log-rebinned
    (:func:`prepare_templates`); gas emission lines are masked
    (:func:`emission_line_mask`); and pPXF fits a Gaussian LOSVD (two moments)
    with an additive Legendre polynomial of degree ``degree``
    (:func:`fit_spectrum`). A bin that cannot be fitted is flagged, never
    fatal: the number of such bins is reported in one warning.

    Parameters
    ----------
    bins : `~cubesfh.binning.VoronoiBins`, optional
        Any object with ``.wavelength`` (n_lambda,), ``.spectra`` and
        ``.variance`` (n_bins, n_lambda). Alternatively give the arrays
        ``wavelength``, ``spectra`` and ``variance``.
    wavelength : `~astropy.units.Quantity`, optional
        Observed (air) wavelengths, increasing.
    spectra, variance : `~astropy.units.Quantity` or array-like, optional
        Shape (n_bins, n_lambda); variance in the square of the spectra unit.
        NaN or non-positive-variance pixels are ignored.
    templates : `~cubesfh.templates.TemplateLibrary`, optional
        Template library (default: the bundled library). Any object with
        ``.wavelength``, ``.flux``, ``.fwhm`` (and ``.binned()`` for
        ``template_set='binned'``) works.
    templates_wavelength, templates_flux, templates_fwhm : optional
        Explicit templates instead (see :func:`prepare_templates`).
    template_set : {'binned', 'all'}, optional
        Which library templates to fit; the default ``'binned'`` (16 age bins
        times all metallicities) spans the full range of stellar populations
        at a fraction of the cost of all templates, which is all the
        kinematics need.
    redshift : float or `~astropy.units.Quantity`, optional
        Systemic redshift ``z`` or line-of-sight velocity ``cz`` (km/s). It is
        the reference of the returned ``velocity`` and the starting guess of
        every fit. If `None`, it is estimated from the mean spectrum of all
        bins (starting from z = 0; give it for galaxies with cz >~ 1500 km/s).
    lsf : callable, `~astropy.units.Quantity` or None, optional
        FWHM of the data line-spread function versus observed wavelength
        (default :func:`~cubesfh.lsf.muse_lsf_fwhm`).
    fit_range : `~astropy.units.Quantity`, optional
        Rest-frame wavelength interval fitted (default 4800-7000 A).
    mask_emission : bool, optional
        Mask +-``mask_width`` around the lines of :data:`EMISSION_LINES`
        (Balmer, [OIII], [NI], HeI, [OI], [NII], [SII]) at the systemic
        redshift.
    mask_width : `~astropy.units.Quantity`, optional
        Half-width of each masked window (default 800 km/s, enough for the
        rotation within a typical disc galaxy around the systemic velocity).
    mask_nad : bool, optional
        Also mask Na I D, which interstellar absorption contaminates in dusty
        star-forming regions.
    degree : int, optional
        Degree of the additive Legendre polynomial (default 8, a usual choice
        for stellar kinematics: it absorbs continuum and template-mismatch
        residuals without distorting the absorption-line profiles;
        no multiplicative polynomial).
    progress_bar : bool, optional
        Show a progress bar over the bins.

    Returns
    -------
    table : `~astropy.table.QTable`
        One row per bin with columns

        - ``bin``: bin index;
        - ``velocity``: stellar velocity relative to the systemic redshift
          ``z0``, ``c [(1 + z) / (1 + z0) - 1]`` (km/s);
        - ``velocity_los``: absolute line-of-sight velocity ``cz`` (km/s),
          i.e. ``1 + z = (1 + z0) (1 + velocity / c)``;
        - ``sigma``: intrinsic stellar dispersion (km/s), instrumental
          broadening removed;
        - ``velocity_err``, ``sigma_err``: formal pPXF errors (km/s), exact
          when the variance is right (multiply by ``sqrt(chi2)`` otherwise);
        - ``chi2``: reduced chi^2;
        - ``n_good``: pixels used;
        - ``flag``: `KinematicsFlag` bits (0 = good).

        ``table.meta`` holds ``redshift``, ``velscale``, ``degree``,
        ``fit_range``, ``lsf_excess``, ``n_failed`` and ``problems`` (the
        warnings of `check_kinematics`).

    Raises
    ------
    CubeSFHError
        Inconsistent inputs, a fit range outside the data or the templates.
    """
    wave, flux, var = _data_arrays(bins, wavelength, spectra, variance)
    templates_kw = {"templates": templates, "templates_wavelength": templates_wavelength,
                    "templates_flux": templates_flux, "templates_fwhm": templates_fwhm,
                    "template_set": template_set}
    if templates is None and templates_flux is None and templates_wavelength is None:
        from .templates import TemplateLibrary

        templates_kw["templates"] = TemplateLibrary.load()
    if redshift is None:
        z0 = _estimate_redshift(wave, flux, var, templates_kw, lsf=lsf, fit_range=fit_range,
                                degree=degree, mask_emission=mask_emission,
                                mask_width=mask_width, mask_nad=mask_nad)
    else:
        z0 = _as_redshift(redshift)

    spec = log_rebin_spectra(wave * u.AA, flux, var, redshift=z0, fit_range=fit_range)
    temp = prepare_templates(velscale=spec.velscale, redshift=z0, lsf=lsf,
                             fit_range=fit_range, **templates_kw)
    common = _fit_mask(spec, redshift=z0, mask_emission=mask_emission,
                       mask_width=mask_width, mask_nad=mask_nad)

    n_bins = spec.flux.shape[0]
    results = [fit_spectrum(spec.flux[i], spec.noise[i], spec.lam, temp,
                            mask=common & spec.valid[i], degree=degree)
               for i in progress(range(n_bins), enabled=progress_bar,
                                 desc="Stellar kinematics", unit="bin")]
    table = _kinematics_table(results, z0)

    failed = (table["flag"] & (KinematicsFlag.NO_DATA | KinematicsFlag.FIT_FAILED)) > 0
    n_failed = int(failed.sum())
    n_bound = int(((table["flag"] & KinematicsFlag.AT_BOUND) > 0).sum())
    table.meta["problems"] = check_kinematics(table)
    table.meta.update({"redshift": z0, "velscale": spec.velscale * _KMS, "degree": degree,
                       "fit_range": u.Quantity(fit_range, u.AA),
                       "lsf_excess": temp.lsf_excess * _KMS, "n_failed": n_failed,
                       "n_templates": temp.flux.shape[1]})
    log.info("Stellar kinematics: %d bins fitted, %d failed, %d at a parameter bound.",
             n_bins - n_failed, n_failed, n_bound)
    if n_failed or n_bound:
        msg = (f"Stellar kinematics: {n_failed} of {n_bins} bins could not be fitted "
               f"(flag NO_DATA or FIT_FAILED) and {n_bound} ended at a parameter bound "
               "(flag AT_BOUND); their rows are flagged in the 'flag' column.")
        warnings.warn(msg, CubeSFHWarning)
    return table


def check_kinematics(table, *, chi2_factor=3.0, velocity_spread=6.0, min_spread=300 * _KMS,
                     systemic_tolerance=250 * _KMS, chi2_range=(0.2, 5.0)):
    """
    Flag kinematic fits that are inconsistent with the rest of the cube.

    Called by :func:`fit_kinematics`; the flags are added to ``table['flag']``
    in place and a `~cubesfh.utils.CubeSFHWarning` names each problem:

    * ``CHI2_HIGH``: a reduced chi^2 above ``chi2_factor`` times the median of
      the bins (and above 2). The scale of chi^2 is relative because the
      ``STAT`` of MUSE cubes underestimates the noise of resampled and binned
      data (Weilbacher et al. 2020), so an absolute threshold would flag
      whole cubes; a median outside ``chi2_range`` is reported as a warning
      about the variances instead.
    * ``VELOCITY_OUTLIER``: ``|v - median(v)| > max(velocity_spread x
      1.4826 MAD(v), min_spread) + 3 sigma_v``: a velocity that the velocity
      field of a galaxy (rotation of a few hundred km/s) cannot explain.
    * The median velocity of the bins more than ``systemic_tolerance`` from
      the systemic redshift, or more than a third of the bins at a bound: the
      systemic redshift is probably wrong (a warning; rerun without a
      redshift to estimate it, or give the right one).

    Parameters
    ----------
    table : `~astropy.table.QTable`
        Output of :func:`fit_kinematics` (``velocity``, ``velocity_err``,
        ``chi2``, ``flag``; ``meta['redshift']``).
    chi2_factor : float, optional
    velocity_spread : float, optional
        In units of the robust standard deviation of the velocities.
    min_spread, systemic_tolerance : `~astropy.units.Quantity`, optional
    chi2_range : tuple of float, optional

    Returns
    -------
    problems : list of str
        The warnings issued (empty when all is well).
    """
    flag = np.asarray(table["flag"]).astype(int)
    fitted = (flag & (KinematicsFlag.NO_DATA | KinematicsFlag.FIT_FAILED)) == 0
    problems = []
    n = int(fitted.sum())
    if n == 0:
        return problems
    vel = u.Quantity(table["velocity"], _KMS).value
    verr = u.Quantity(table["velocity_err"], _KMS).value if "velocity_err" in table.colnames \
        else np.zeros(vel.size)
    z0 = float(table.meta.get("redshift", 0.0))
    if "chi2" in table.colnames:
        chi2 = np.asarray(table["chi2"], float)
        med = float(np.nanmedian(chi2[fitted]))
        high = fitted & (chi2 > max(chi2_factor * med, 2.0))
        flag[high] |= KinematicsFlag.CHI2_HIGH
        if high.any():
            problems.append(f"{int(high.sum())} bins have a reduced chi^2 more than "
                            f"{chi2_factor:g} times the median ({med:.2f}) (flag CHI2_HIGH): "
                            "the templates do not fit them (foreground stars, AGN, bad data?)")
        if not chi2_range[0] <= med <= chi2_range[1]:
            problems.append(f"the median reduced chi^2 of the kinematic fits is {med:.2f}, "
                            f"outside {chi2_range[0]:g}-{chi2_range[1]:g}: the cube's "
                            "variances (STAT) are probably mis-scaled; the formal velocity "
                            "errors are off by about sqrt(chi2)")
    vmed = float(np.median(vel[fitted]))
    mad = 1.4826 * float(np.median(np.abs(vel[fitted] - vmed)))
    spread = max(velocity_spread * mad, u.Quantity(min_spread, _KMS).value)
    out = fitted & (np.abs(vel - vmed) > spread + 3 * np.nan_to_num(verr))
    flag[out] |= KinematicsFlag.VELOCITY_OUTLIER
    if out.any():
        problems.append(f"{int(out.sum())} bins have velocities more than {spread:.0f} km/s "
                        f"from the median of the bins (flag VELOCITY_OUTLIER)")
    bound = (flag & KinematicsFlag.AT_BOUND) != 0
    if "sigma" in table.colnames:
        # a dispersion at its lower bound is an unresolved one (a cold disc, a
        # low-resolution spectrum), not a sign of a wrong systemic redshift
        sig = u.Quantity(table["sigma"], _KMS).value
        bound &= ~(np.nan_to_num(sig, nan=np.inf) <= _SIGMA_BOUNDS[0] + 1.0)
    n_bound = int(bound.sum())
    tol = u.Quantity(systemic_tolerance, _KMS).value
    if abs(vmed) > tol or n_bound > n / 3:
        problems.append(f"the bins' median velocity is {vmed:+.0f} km/s from the systemic "
                        f"redshift z = {z0:.5f} and {n_bound} of {n} fits ended at a bound: "
                        "the systemic redshift is probably wrong; rerun without a redshift "
                        "to have it estimated, or give the right one "
                        f"(z ~ {(1 + z0) * (1 + vmed / _C_KMS) - 1:.5f}?)")
    table["flag"] = flag.astype(np.int16)
    for p in problems:
        warnings.warn(f"Stellar kinematics: {p}.", CubeSFHWarning)
    return problems


# --------------------------------------------------------------------------- one spectrum


@dataclass(frozen=True)
class SpectrumKinematics:
    """
    Stellar kinematics of one spectrum, made by :func:`fit_spectrum_kinematics`.

    Attributes
    ----------
    velocity : `~astropy.units.Quantity`
        Velocity relative to the given redshift ``z0``, ``c [(1 + z) / (1 + z0) - 1]``,
        km/s (NaN when the fit failed).
    velocity_los : `~astropy.units.Quantity`
        Line-of-sight velocity ``cz``, with ``1 + z = (1 + z0) (1 + velocity / c)``, km/s.
    sigma : `~astropy.units.Quantity`
        Intrinsic stellar velocity dispersion (instrumental broadening removed), km/s.
    velocity_err, sigma_err : `~astropy.units.Quantity`
        Formal 1-sigma pPXF errors, km/s.
    chi2 : float
        Reduced chi^2 of the fit.
    flag : `KinematicsFlag`
        Quality bits (0 = good).
    n_good : int
        Number of log-rebinned pixels fitted.
    redshift : float
        The redshift ``z0`` the velocity is relative to.
    velscale : `~astropy.units.Quantity`
        Pixel size of the log-rebinned spectrum, km/s.
    lsf_excess : `~astropy.units.Quantity`
        Largest dispersion (km/s) by which the templates remained broader than
        the data in the fit range (0 with ``lsf_mismatch='broaden'``).
    broadening : `~astropy.units.Quantity`
        Largest FWHM (observed frame, Angstrom) of the Gaussian the data were
        convolved with to reach the template resolution (0 if none).
    vacuum : bool
        Whether the input wavelengths were taken as vacuum and converted to air.
    problems : tuple of str
        The warnings issued by `check_kinematics` and the resolution check.
    """

    velocity: u.Quantity
    velocity_los: u.Quantity
    sigma: u.Quantity
    velocity_err: u.Quantity
    sigma_err: u.Quantity
    chi2: float
    flag: KinematicsFlag
    n_good: int
    redshift: float
    velscale: u.Quantity
    lsf_excess: u.Quantity
    broadening: u.Quantity
    vacuum: bool
    problems: tuple


def _truthy(value):
    """Interpret a FITS-like flag (bool, 'T'/'F', 'vac'/'air', 0/1); None if unknown."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("t", "true", "yes", "y", "1", "vac", "vacuum"):
            return True
        if text in ("f", "false", "no", "n", "0", "air"):
            return False
    return None


def _marked_vacuum(spectrum):
    """
    Whether a `~specutils.Spectrum1D` says its wavelengths are in vacuum (None if silent).

    Looked up, in order: ``meta['vacuum']`` (or ``'VACUUM'``, ``'in_vacuum'``),
    ``meta['AIRORVAC']``, the same keys in ``meta['header']``, and the
    spectral ``CTYPE`` of a FITS WCS (``'WAVE'``: vacuum, ``'AWAV'``: air,
    FITS WCS paper III, Greisen et al. 2006).
    """
    meta = getattr(spectrum, "meta", None) or {}
    sources = [meta]
    header = meta.get("header") if hasattr(meta, "get") else None
    if header is not None and hasattr(header, "get"):
        sources.append(header)
    for src in sources:
        for key in ("vacuum", "VACUUM", "in_vacuum", "AIRORVAC", "airorvac"):
            try:
                value = src.get(key)
            except (KeyError, TypeError):
                value = None
            flag = _truthy(value) if value is not None else None
            if flag is not None:
                return flag
    wcs = getattr(spectrum, "wcs", None)
    ctypes = getattr(getattr(wcs, "wcs", None), "ctype", None)
    if ctypes is not None:
        for ctype in ctypes:
            head = str(ctype).upper()[:4]
            if head == "AWAV":
                return False
            if head == "WAVE":
                return True
    return None


def _unitless(value, unit, name):
    """Plain float array of ``value`` in ``unit`` (``unit`` None: taken as is)."""
    if isinstance(value, u.Quantity):
        if unit is None:
            return np.asarray(value.value, dtype=float)
        try:
            return np.asarray(value.to_value(unit), dtype=float)
        except u.UnitConversionError:
            msg = f"{name} has unit {value.unit}, not convertible to {unit}."
            raise CubeSFHError(msg) from None
    return np.asarray(value, dtype=float)


def _spectrum_arrays(spectrum, flux, ivar, noise, mask):
    """
    Return wavelength (AA, increasing), flux, variance, bad-pixel mask, vacuum mark and
    whether the input order was reversed (a decreasing grid, e.g. from frequencies).
    """
    marked = None
    if hasattr(spectrum, "spectral_axis") and hasattr(spectrum, "flux"):
        if any(a is not None for a in (flux, ivar, noise)):
            msg = ("Give either a Spectrum1D (with its uncertainty and mask) or the arrays "
                   "wavelength, flux, ivar=/noise=, not both.")
            raise CubeSFHError(msg)
        marked = _marked_vacuum(spectrum)
        wave_q = u.Quantity(spectrum.spectral_axis)
        flux_q = u.Quantity(spectrum.flux)
        unc = spectrum.uncertainty
        if unc is None:
            msg = ("The Spectrum1D has no uncertainty; the fit needs the noise of every pixel "
                   "(give uncertainty=InverseVariance(...) or StdDevUncertainty(...)).")
            raise CubeSFHError(msg)
        kind = getattr(unc, "uncertainty_type", None)
        arr = np.asarray(unc.array, dtype=float)
        unc_unit = getattr(unc, "unit", None)
        power = {"ivar": -2, "std": 1, "var": 2}.get(kind)
        if power is None:
            msg = (f"Uncertainty of type {type(unc).__name__} is not supported; use "
                   "InverseVariance, StdDevUncertainty or VarianceUncertainty.")
            raise CubeSFHError(msg)
        if unc_unit is not None and flux_q.unit != u.dimensionless_unscaled:
            arr = _unitless(arr * unc_unit, flux_q.unit**power, "The uncertainty")
        var = {"ivar": lambda a: 1.0 / a, "std": np.square, "var": lambda a: a}[kind]
        with np.errstate(divide="ignore", invalid="ignore"):
            var = var(arr)
        flux_v = np.asarray(flux_q.value, dtype=float)
        if spectrum.mask is not None:
            mask = spectrum.mask if mask is None else np.asarray(mask, bool) | spectrum.mask
    else:
        wave_q = spectrum
        if not isinstance(wave_q, u.Quantity):
            msg = ("wavelength must be a Quantity with a unit (e.g. wave * u.AA), or pass a "
                   "specutils Spectrum1D.")
            raise CubeSFHError(msg)
        if flux is None:
            msg = "No flux given: pass fit_spectrum_kinematics(wavelength, flux, ivar=...)."
            raise CubeSFHError(msg)
        if (ivar is None) == (noise is None):
            msg = "Give exactly one of ivar= (inverse variance) or noise= (1-sigma)."
            raise CubeSFHError(msg)
        unit = flux.unit if isinstance(flux, u.Quantity) else None
        flux_v = _unitless(flux, None, "flux")
        with np.errstate(divide="ignore", invalid="ignore"):
            if ivar is not None:
                var = 1.0 / _unitless(ivar, None if unit is None else unit**-2, "ivar")
            else:
                var = np.square(_unitless(noise, unit, "noise"))
    try:
        wave = np.asarray(wave_q.to_value(u.AA, equivalencies=u.spectral()), dtype=float)
    except u.UnitConversionError:
        msg = f"The spectral axis has unit {wave_q.unit}; expected a wavelength (or frequency)."
        raise CubeSFHError(msg) from None
    bad = np.zeros(flux_v.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if (wave.ndim != 1 or flux_v.shape != wave.shape or var.shape != wave.shape
            or bad.shape != wave.shape):
        msg = (f"Inconsistent shapes: wavelength {wave.shape}, flux {flux_v.shape}, "
               f"variance {var.shape}, mask {bad.shape}; one spectrum needs four arrays of "
               "shape (n_lambda,).")
        raise CubeSFHError(msg)
    flipped = wave.size > 1 and bool(np.all(np.diff(wave) < 0))
    if flipped:
        wave, flux_v, var, bad = wave[::-1], flux_v[::-1], var[::-1], bad[::-1]
    if not np.all(np.diff(wave) > 0):
        msg = "The wavelengths must be monotonic."
        raise CubeSFHError(msg)
    return wave, flux_v, var, bad, marked, flipped


def _data_fwhm(lsf, resolution, wave_q):
    """FWHM (AA) of the data LSF on the input grid, or None (template resolution)."""
    if lsf is not None and resolution is not None:
        msg = "Give the instrumental resolution as lsf= (FWHM) or resolution= (R), not both."
        raise CubeSFHError(msg)
    lam = wave_q.to_value(u.AA)
    if resolution is not None:
        if isinstance(resolution, u.Quantity):
            if not resolution.unit.is_equivalent(u.dimensionless_unscaled):
                msg = (f"resolution= is R = lambda / FWHM (dimensionless), got unit "
                       f"{resolution.unit}; give a FWHM as lsf= instead.")
                raise CubeSFHError(msg)
            resolution = resolution.to_value(u.dimensionless_unscaled)
        r = np.asarray(resolution, dtype=float)
        if r.ndim and r.shape != lam.shape:
            msg = (f"resolution has shape {r.shape}; give one R or one per wavelength "
                   f"{lam.shape}.")
            raise CubeSFHError(msg)
        with np.errstate(divide="ignore", invalid="ignore"):
            fwhm = np.where(r > 0, lam / r, np.nan)
        return np.broadcast_to(fwhm, lam.shape).astype(float)
    if lsf is None:
        return None
    value = lsf(wave_q) if callable(lsf) else lsf
    if not isinstance(value, u.Quantity) or not value.unit.is_equivalent(u.AA):
        msg = ("lsf must be the FWHM of the line-spread function as a Quantity in length "
               "units (a number, an array on the wavelength grid or a function of "
               "wavelength returning one), e.g. 2.5 * u.AA; give a spectral resolution "
               "R = lambda / FWHM as resolution= instead.")
        raise CubeSFHError(msg)
    fwhm = np.asarray(value.to_value(u.AA), dtype=float)
    if fwhm.ndim and fwhm.shape != lam.shape:
        msg = f"lsf has shape {fwhm.shape}; give one FWHM or one per wavelength {lam.shape}."
        raise CubeSFHError(msg)
    return np.broadcast_to(fwhm, lam.shape).astype(float)


def fit_spectrum_kinematics(spectrum, flux=None, *, ivar=None, noise=None, mask=None,
                            redshift=0.0, lsf=None, resolution=None, vacuum=None,
                            templates=None, template_set="binned",
                            fit_range=(4800, 7000) * u.AA, degree=8, mask_emission=True,
                            mask_width=800 * _KMS, mask_nad=False, lsf_mismatch="broaden",
                            start_sigma=100 * _KMS):
    """
    Fit the stellar velocity and dispersion of one spectrum on any wavelength grid.

    The spectrum-level counterpart of :func:`fit_kinematics` for spectra that
    are not MUSE bins (e.g. a MaNGA or SDSS spectrum): the wavelengths may be
    linearly or logarithmically sampled, in air or in vacuum, and the
    instrumental resolution is given as a FWHM or as a resolving power. The
    steps and the result are those of :func:`fit_kinematics`:

    1. vacuum wavelengths (``vacuum=True``, or a spectrum marked so) are
       converted to air, the frame of the templates, with the IAU standard of
       Morton (2000) (`cubesfh.templates.build_external.vacuum_to_air`;
       ``n = 1 + 8.34254e-5 + 2.406147e-2 / (130 - s^2) + 1.5998e-4 / (38.9 - s^2)``,
       ``s = 1e4 / lambda_vac`` in 1/micron), and the FWHM scaled alike;
    2. where the data are *sharper* than the templates (FWHM_data <
       FWHM_templates (1 + z0), observed frame), ``lsf_mismatch='broaden'``
       convolves the data with a Gaussian of FWHM ``sqrt(FWHM_t^2 -
       FWHM_data^2)`` (the variance propagated for independent pixels) so that
       the fitted sigma is not biased low; ``'warn'`` leaves them, as
       :func:`prepare_templates` does, and warns with the bias bound
       (``lsf_excess``);
    3. :func:`log_rebin_spectra` over the rest-frame ``fit_range``,
       :func:`prepare_templates` (templates convolved to the data LSF where
       the data are broader), :func:`emission_line_mask` and
       :func:`fit_spectrum` (pPXF, Gaussian LOSVD, additive Legendre
       polynomial of ``degree``);
    4. :func:`check_kinematics` on the result (systemic-offset and
       chi^2-scale warnings; the per-bin comparisons need many bins and do
       not apply to one spectrum).

    Parameters
    ----------
    spectrum : `~specutils.Spectrum1D` or `~astropy.units.Quantity`
        A 1-D spectrum with ``uncertainty`` (`~astropy.nddata.InverseVariance`,
        `~astropy.nddata.StdDevUncertainty` or
        `~astropy.nddata.VarianceUncertainty`) and optionally ``mask``
        (`True` = bad); or the observed wavelengths (any length or frequency
        unit, monotonic), with ``flux`` and ``ivar`` or ``noise``.
    flux : `~astropy.units.Quantity` or array-like, optional
        Flux density on ``spectrum``'s wavelengths (with array input).
    ivar, noise : `~astropy.units.Quantity` or array-like, optional
        Inverse variance or 1-sigma noise (one of them, with array input), in
        the unit of ``flux`` to the power -2 or 1; pixels with ``ivar <= 0`` or
        non-finite values are ignored.
    mask : array-like of bool, optional
        `True` for pixels to leave out (the ``numpy.ma`` and specutils
        convention); combined with ``spectrum.mask``.
    redshift : float or `~astropy.units.Quantity`, optional
        Redshift ``z0`` (or ``cz`` in velocity units): the frame of the fit,
        the reference of ``velocity``, the emission-line mask and the start.
        The velocity is fitted within +-2000 km/s of it.
    lsf : `~astropy.units.Quantity` or callable, optional
        FWHM of the instrumental line-spread function in the frame of the
        input wavelengths: a scalar, an array on the wavelength grid, or a
        function of the input wavelengths (Quantity) returning one.
    resolution : float or array-like, optional
        Spectral resolution ``R = lambda / FWHM`` instead of ``lsf`` (e.g. the
        ``SRES`` of MaNGA), scalar or per pixel; pixels with ``R <= 0`` are
        ignored. With neither ``lsf`` nor ``resolution`` the data are taken to
        have the resolution of the templates (no matching).
    vacuum : bool, optional
        Whether the input wavelengths are in vacuum. `None`: taken from the
        spectrum (``meta['vacuum']``, ``'VACUUM'``, ``'AIRORVAC'``, or a FITS
        WCS ``CTYPE`` ``'WAVE'`` (vacuum) / ``'AWAV'`` (air)); air otherwise.
    templates : `~cubesfh.templates.TemplateLibrary`, optional
        Template library (default the bundled BC03/MILES one, FWHM 2.5 A,
        rest-frame air wavelengths 4600-7300 A).
    template_set : {'binned', 'all'}, optional
        See :func:`prepare_templates`.
    fit_range : `~astropy.units.Quantity`, optional
        Rest-frame interval fitted (default 4800-7000 A; the templates limit it
        to about 4650-7230 A).
    degree : int, optional
        Degree of the additive Legendre polynomial (default 8).
    mask_emission : bool, optional
        Mask +-``mask_width`` around the lines of :data:`EMISSION_LINES`.
    mask_width : `~astropy.units.Quantity`, optional
        Half-width of each masked window (default 800 km/s).
    mask_nad : bool, optional
        Also mask Na I D.
    lsf_mismatch : {'broaden', 'warn'}, optional
        What to do where the templates are broader than the data (see step 2).
    start_sigma : `~astropy.units.Quantity`, optional
        Starting dispersion (the starting velocity is that of ``redshift``).

    Returns
    -------
    result : `SpectrumKinematics`
        ``velocity``, ``velocity_los``, ``sigma`` and their errors (km/s
        Quantities), ``chi2``, ``flag`` (`KinematicsFlag`: ``NO_DATA`` for a
        spectrum with too few valid pixels, ``FIT_FAILED``, ``AT_BOUND``; NaN
        values for the first two), ``lsf_excess``, ``broadening`` and
        ``problems``.

    Raises
    ------
    CubeSFHError
        Missing units, inconsistent shapes, missing noise, a fit range
        outside the data or the templates.

    Warns
    -----
    CubeSFHWarning
        From :func:`check_kinematics` (a velocity more than 250 km/s from
        ``redshift`` or at a bound: the redshift is probably wrong; a reduced
        chi^2 outside 0.2-5), and with ``lsf_mismatch='warn'`` when the
        templates stay broader than the data.

    Examples
    --------
    A MaNGA spectrum (vacuum, log-sampled, resolution ``SRES``)::

        from astropy import units as u
        from astropy.io import fits
        from cubesfh.kinematics import fit_spectrum_kinematics

        with fits.open("MaNGA_test_spectra.fits.gz") as hdul:
            wave = hdul["WAVE"].data * u.AA
            i = 0
            bad = (hdul["MASK"].data[i] & (1024 | 8)) > 0  # DONOTUSE, FORESTAR
            kin = fit_spectrum_kinematics(
                wave, hdul["FLUX"].data[i], ivar=hdul["IVAR"].data[i], mask=bad,
                redshift=hdul["Z"].data[i], resolution=hdul["SRES"].data[i],
                vacuum=True)
        print(kin.velocity, kin.sigma, kin.flag)
    """
    from .templates.build_external import vacuum_to_air

    if lsf_mismatch not in ("broaden", "warn"):
        msg = f"lsf_mismatch={lsf_mismatch!r} is not one of 'broaden', 'warn'."
        raise CubeSFHError(msg)
    wave, flx, var, bad, marked, flipped = _spectrum_arrays(spectrum, flux, ivar, noise, mask)
    z0 = _as_redshift(redshift)
    if flipped:  # per-pixel lsf / resolution arrays follow the input order
        fwhm = _data_fwhm(lsf, resolution, wave[::-1] * u.AA)
        fwhm = None if fwhm is None else fwhm[::-1]
    else:
        fwhm = _data_fwhm(lsf, resolution, wave * u.AA)
    vacuum = bool(marked) if vacuum is None else bool(vacuum)
    if vacuum:
        air = vacuum_to_air(wave * u.AA).to_value(u.AA)
        if fwhm is not None:
            fwhm = fwhm * air / wave
        wave = air
    if templates is None:
        from .templates import TemplateLibrary

        templates = TemplateLibrary.load()
    if fwhm is not None:
        bad = bad | ~(np.isfinite(fwhm) & (fwhm > 0))
    bad = bad | ~(np.isfinite(flx) & np.isfinite(var) & (var > 0))
    lo, hi = _wavelength_range(fit_range)
    obs_fit = (wave >= lo * (1.0 + z0)) & (wave <= hi * (1.0 + z0))
    lsf_fn = None
    broadening = 0.0
    if fwhm is not None and (~bad).any():
        fwhm = np.interp(wave, wave[~bad], fwhm[~bad])  # fill the bad pixels
        if lsf_mismatch == "broaden":
            fwhm_t = _fwhm_values(templates.fwhm, wave / (1.0 + z0)) * (1.0 + z0)
            diff2 = fwhm_t**2 - fwhm**2
            if np.any(diff2[obs_fit] > 0):
                sig = np.sqrt(np.clip(diff2, 0.0, None)) * FWHM_TO_SIGMA
                kernel = gaussian_broadening_matrix(wave, sig)
                flx = kernel @ np.where(bad, 0.0, flx)
                var = kernel.power(2) @ np.where(bad, 0.0, var)
                bad = (kernel @ bad.astype(float)) > 1e-6
                broadening = float(np.sqrt(np.max(np.clip(diff2[obs_fit], 0.0, None))))
                fwhm = np.maximum(fwhm, fwhm_t)
                log.info("Data broadened to the template resolution by up to %.2f A FWHM.",
                         broadening)
        grid, values = wave.copy(), fwhm.copy()

        def lsf_fn(lam):
            return np.interp(lam.to_value(u.AA), grid, values) * u.AA

    flx = np.where(bad, np.nan, flx)
    var = np.where(bad, np.nan, var)
    spec = log_rebin_spectra(wave * u.AA, flx, var, redshift=z0, fit_range=fit_range)
    temp = prepare_templates(templates, velscale=spec.velscale, redshift=z0, lsf=lsf_fn,
                             fit_range=fit_range, template_set=template_set)
    good = _fit_mask(spec, redshift=z0, mask_emission=mask_emission, mask_width=mask_width,
                     mask_nad=mask_nad) & spec.valid[0]
    s0 = u.Quantity(start_sigma, _KMS).value
    res = fit_spectrum(spec.flux[0], spec.noise[0], spec.lam, temp, mask=good,
                       start=(0.0, s0), degree=degree)

    table = _kinematics_table([res], z0)
    problems = check_kinematics(table)
    if lsf_mismatch == "warn" and temp.lsf_excess > 0:
        msg = (f"The templates are broader than the data by up to {temp.lsf_excess:.1f} km/s "
               "(dispersion) in the fit range; sigma is biased low in quadrature by at most "
               "that; use lsf_mismatch='broaden' to broaden the data instead.")
        warnings.warn(msg, CubeSFHWarning)
        problems.append(msg)
    row = table[0]
    return SpectrumKinematics(
        velocity=row["velocity"], velocity_los=row["velocity_los"], sigma=row["sigma"],
        velocity_err=row["velocity_err"], sigma_err=row["sigma_err"], chi2=res.chi2,
        flag=KinematicsFlag(int(row["flag"])), n_good=res.n_good, redshift=z0,
        velscale=spec.velscale * _KMS, lsf_excess=temp.lsf_excess * _KMS,
        broadening=broadening * u.AA, vacuum=vacuum, problems=tuple(problems))


# --------------------------------------------------------------------------- external maps


def _read_map(path, extension):
    """Return (data, header) of one 2-D image extension."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        msg = f"Kinematics map file {path} not found; check the path."
        raise CubeSFHError(msg)
    with fits.open(path) as hdul:
        if extension is None:
            hdu = next((h for h in hdul if h.data is not None and h.data.ndim == 2), None)
            if hdu is None:
                msg = f"{path} has no 2-D image extension; give a 2-D FITS map."
                raise CubeSFHError(msg)
        else:
            names = [h.name for h in hdul]
            if extension.upper() not in names:
                present = ", ".join(n or "''" for n in names)
                images = [h.name for h in hdul if h.data is not None and h.data.ndim == 2]
                word = "SIG" if "SIG" in extension.upper() else "V"
                guess = next((n for n in images if word in n.upper() and "ERR" not in n.upper()
                              and "IVAR" not in n.upper()), None)
                hint = (f" (e.g. {guess} -> {extension.upper()}: hdul[{guess!r}].name = "
                        f"{extension.upper()!r}; check that its velocities are cz, not "
                        "relative to the systemic velocity)" if guess else "")
                msg = (f"{path} has no extension {extension!r} (present: {present}); cubesfh "
                       "reads the stellar kinematics from V_STARS and SIGMA_STARS (the PHANGS "
                       f"DAP names): rename the extensions in the file{hint}, or pass "
                       "velocity_ext=/sigma_ext= to read_kinematics_maps.")
                raise CubeSFHError(msg)
            hdu = hdul[extension]
        if hdu.data is None or hdu.data.ndim != 2:
            msg = (f"Extension {hdu.name!r} of {path} is not a 2-D image (shape "
                   f"{None if hdu.data is None else hdu.data.shape}).")
            raise CubeSFHError(msg)
        return np.array(hdu.data, dtype=float), hdu.header.copy()


def _map_unit(header, default=_KMS):
    bunit = header.get("BUNIT", "").strip()
    if not bunit:
        return default
    unit = None
    for candidate in (bunit, bunit.lower()):  # 'KM/S' is common in DAP-like files
        try:
            unit = u.Unit(candidate)
        except ValueError:
            continue
        if unit.is_equivalent(_KMS):
            break
    if unit is None or not unit.is_equivalent(_KMS):
        msg = f"Kinematics map has BUNIT={bunit!r}, not a velocity; expected km/s."
        raise CubeSFHError(msg)
    return unit


def _on_grid(data, header, celestial_wcs, shape, name):
    """Reproject one map onto the cube grid (or return it when already there)."""
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header).celestial
    if not wcs.has_celestial or wcs.naxis != 2:
        msg = (f"The {name} map has no celestial WCS; add the WCS keywords (CTYPE1/2, "
               "CRVAL, CRPIX, CD or CDELT) so that it can be placed on the cube grid.")
        raise CubeSFHError(msg)
    same = (data.shape == tuple(shape) and wcs.wcs.compare(celestial_wcs.wcs, tolerance=1e-9))
    if same:
        return data
    from reproject import reproject_interp

    out, footprint = reproject_interp((data, wcs), celestial_wcs, shape_out=tuple(shape),
                                      order="bilinear")
    if not np.any(footprint > 0):
        msg = (f"The {name} map does not overlap the cube footprint; check that the map "
               "and the cube are of the same field.")
        raise CubeSFHError(msg)
    return np.where(footprint > 0, out, np.nan)


def _per_bin(values, labels, n_bins):
    """Median per bin ignoring NaNs; returns (medians, number of valid spaxels)."""
    out = np.full(n_bins, np.nan)
    count = np.zeros(n_bins, dtype=int)
    use = (labels >= 0) & (labels < n_bins) & np.isfinite(values)
    if not use.any():  # a map that is NaN over every bin
        return out, count
    lab, val = labels[use], values[use]
    order = np.argsort(lab, kind="stable")
    lab, val = lab[order], val[order]
    uniq, first = np.unique(lab, return_index=True)
    for b, chunk in zip(uniq, np.split(val, first[1:]), strict=True):
        out[b] = np.median(chunk)
        count[b] = chunk.size
    return out, count


def read_kinematics_maps(source, bin_map, celestial_wcs=None, *, systemic_velocity=None,
                         maps_relative=False, velocity_ext="V_STARS",
                         sigma_ext="SIGMA_STARS", velocity_err_ext="V_STARS_ERR",
                         sigma_err_ext="SIGMA_STARS_ERR", n_bins=None):
    """
    Per-bin stellar kinematics from existing maps instead of fitting.

    Reads a PHANGS DAP ``MAPS`` file (extensions ``V_STARS``, ``SIGMA_STARS``
    and, if present, ``V_STARS_ERR``, ``SIGMA_STARS_ERR``) or a pair of 2-D
    FITS maps, reprojects them onto the cube grid when their WCS differs
    (bilinear interpolation, `reproject.reproject_interp`) and takes the
    median of the valid (finite) spaxels of each bin. The error of a bin is
    the median of the error map over the bin: DAP maps repeat the value of
    their own bins on every spaxel, so the errors are not averaged down.

    Parameters
    ----------
    source : str, `~pathlib.Path` or tuple
        A ``MAPS`` file, or ``(velocity_path, sigma_path)``: two FITS files
        whose first 2-D image is the map.
    bin_map : `~numpy.ndarray` or `~cubesfh.binning.VoronoiBins`
        Bin index of each cube spaxel, shape (ny, nx), -1 for excluded
        spaxels; or a VoronoiBins object (its ``.bin_map`` and
        ``.celestial_wcs`` are used).
    celestial_wcs : `~astropy.wcs.WCS`, optional
        Celestial WCS of the cube grid (required with an array ``bin_map``).
    systemic_velocity : `~astropy.units.Quantity`, optional
        Systemic ``cz`` of the galaxy, the reference of the ``velocity``
        column. Default: the median of the per-bin line-of-sight velocities
        (with ``maps_relative=False``).
    maps_relative : bool, optional
        `False` (default): the velocity map holds line-of-sight velocities
        ``cz``. `True`: it holds velocities relative to
        ``systemic_velocity``, which must then be given.
    velocity_ext, sigma_ext, velocity_err_ext, sigma_err_ext : str, optional
        Extension names in a ``MAPS`` file (the error maps are optional).
    n_bins : int, optional
        Number of bins (default ``bin_map.max() + 1``).

    Returns
    -------
    table : `~astropy.table.QTable`
        Same columns as :func:`fit_kinematics` (``chi2`` is NaN), with
        ``n_good`` the number of valid spaxels of each bin and ``flag``
        ``NO_DATA`` where a bin has no valid velocity or dispersion.

    Raises
    ------
    CubeSFHError
        Missing file or extension, a map without celestial WCS, a map that
        does not overlap the cube, or a relative map without
        ``systemic_velocity``.
    """
    if hasattr(bin_map, "bin_map"):
        if celestial_wcs is None:
            celestial_wcs = getattr(bin_map, "celestial_wcs", None)
        bin_map = bin_map.bin_map
    labels = np.asarray(bin_map)
    if labels.ndim != 2:
        msg = f"bin_map must be a 2-D array of bin indices, got shape {labels.shape}."
        raise CubeSFHError(msg)
    labels = labels.astype(int)
    if celestial_wcs is None:
        msg = "celestial_wcs is required to place the maps on the cube grid."
        raise CubeSFHError(msg)
    celestial_wcs = celestial_wcs.celestial
    if n_bins is None:
        n_bins = int(labels.max()) + 1 if labels.size else 0
    if maps_relative and systemic_velocity is None:
        msg = ("maps_relative=True needs systemic_velocity= (the cz the map velocities are "
               "relative to).")
        raise CubeSFHError(msg)

    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            msg = "Give the maps as (velocity_path, sigma_path)."
            raise CubeSFHError(msg)
        maps = {"velocity": _read_map(source[0], None), "sigma": _read_map(source[1], None)}
        origin = [str(p) for p in source]
    else:
        maps = {"velocity": _read_map(source, velocity_ext),
                "sigma": _read_map(source, sigma_ext)}
        from astropy.io import fits

        with fits.open(source) as hdul:
            names = {h.name for h in hdul}
        for key, ext in (("velocity_err", velocity_err_ext), ("sigma_err", sigma_err_ext)):
            if ext and ext.upper() in names:
                maps[key] = _read_map(source, ext)
        origin = str(source)

    values = {}
    counts = {}
    for key, (data, header) in maps.items():
        unit = _map_unit(header)
        data = (data * unit).to_value(_KMS)
        grid = _on_grid(data, header, celestial_wcs, labels.shape, key.replace("_", " "))
        values[key], counts[key] = _per_bin(grid, labels, n_bins)

    v_map = values["velocity"]
    if maps_relative:
        z0 = _as_redshift(u.Quantity(systemic_velocity, _KMS))
        v_rel = v_map
        v_los = _C_KMS * ((1.0 + z0) * (1.0 + v_rel / _C_KMS) - 1.0)
    else:
        v_los = v_map
        if systemic_velocity is None:
            if not np.any(np.isfinite(v_los)):
                msg = ("No bin has a valid velocity in the maps; check that they cover the "
                       "binned region.")
                raise CubeSFHError(msg)
            z0 = float(np.nanmedian(v_los)) / _C_KMS
        else:
            z0 = _as_redshift(u.Quantity(systemic_velocity, _KMS))
        v_rel = _C_KMS * ((1.0 + v_los / _C_KMS) / (1.0 + z0) - 1.0)

    sigma = values["sigma"]
    nan = np.full(n_bins, np.nan)
    no_data = ~(np.isfinite(v_map) & np.isfinite(sigma))
    if n_bins and no_data.all():
        bad = [name for name, v in (("velocity", v_map), ("dispersion", sigma))
               if not np.isfinite(v).any()]
        msg = (f"The kinematics maps {origin} have no valid {' or '.join(bad) or 'value'} in "
               "any bin (NaN over the whole binned field); check the maps, or leave out "
               "--kinematics (kinematics=) to fit the kinematics from the cube.")
        raise CubeSFHError(msg)
    table = QTable()
    table["bin"] = np.arange(n_bins)
    table["velocity"] = np.where(no_data, np.nan, v_rel) * _KMS
    table["velocity_los"] = np.where(no_data, np.nan, v_los) * _KMS
    table["sigma"] = np.where(no_data, np.nan, sigma) * _KMS
    table["velocity_err"] = np.where(no_data, np.nan, values.get("velocity_err", nan)) * _KMS
    table["sigma_err"] = np.where(no_data, np.nan, values.get("sigma_err", nan)) * _KMS
    table["chi2"] = nan
    table["n_good"] = np.minimum(counts["velocity"], counts["sigma"])
    table["flag"] = np.where(no_data, int(KinematicsFlag.NO_DATA), 0).astype(np.int16)
    table.meta.update({"redshift": z0, "source": origin, "n_failed": int(no_data.sum())})
    if no_data.any():
        log.info("%d of %d bins have no valid value in the kinematics maps.",
                 int(no_data.sum()), n_bins)
    return table
