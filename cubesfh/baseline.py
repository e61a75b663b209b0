# Licensed under a 3-clause BSD style license - see LICENSE
"""
The pPXF full-spectral-fitting baseline (Galceran et al. 2026, section 3.5).

Stellar population fits of the network inputs (rest-frame spectra at the
common resolution, normalised in 5300-5500 A, plus the five HST fluxes) with
pPXF (Cappellari 2017, 2023) on the *same* template library as the training
set, configured as in the paper:

* templates: the 16 age bins x 6 metallicities, each a constant star
  formation rate over the bin, built from the pre-processed sub-interval
  templates of `~cubesfh.synthesis.ForwardModel` (MUSE line-spread function
  plus 150 km/s), so that they have exactly the resolution of the data; the
  kinematics are held fixed (V = 0, no extra broadening);
* regularisation error 1 % (``regul = 100``, second order, over the
  16 x 6 grid), a multiplicative Legendre polynomial of degree 8 and no
  additive polynomial;
* one Calzetti et al. (2000) attenuation (A_V) applied to all templates, in
  a generous range (0-10 mag);
* the five HST fluxes fitted jointly with the spectrum (their nebular
  emission kept, as in the paper); missing bands are dropped;
* the gas emission lines masked in the spectrum (the paper subtracts them).

The pPXF light weights are converted to living stellar masses with the
normalisation and living fraction of each template, and reduced to the 16
mass fractions, the mass-weighted [Z/H] of each bin and the light- and
mass-weighted means with :func:`cubesfh.populations.mean_quantities`, exactly
as the network outputs.

The work for one spectrum is the pure function :func:`fit_population`, which
takes the precomputed `BaselineTemplates` (picklable); the loop over spectra,
:func:`fit_populations`, runs in this process, while
`~cubesfh.pipeline.run_baseline` spreads the bins over dask workers with
:func:`fit_grouped` (templates sent to each worker once).
"""

import enum
import functools
import logging
import time
import warnings
import zlib
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
from astropy import units as u
from astropy.table import QTable

from .conventions import N_AGE_BINS, NORM_WINDOW, SIGMA_TARGET
from .kinematics import EMISSION_LINES, emission_line_mask
from .populations import mean_quantities
from .utils import progress
from .utils.exceptions import CubeSFHError, CubeSFHWarning

__all__ = [
    "BASELINE_MASKED_LINES",
    "BaselineFlag",
    "BaselineTemplates",
    "PopulationFit",
    "age_bin_spectra",
    "fit_grouped",
    "fit_population",
    "fit_populations",
    "mc_columns",
    "templates_at",
]

log = logging.getLogger(__name__)

_KMS = u.km / u.s

#: Gas emission lines masked in the stellar-population fit: those of
#: :data:`cubesfh.kinematics.EMISSION_LINES` plus the auroral [N II] 5755 and
#: [S III] 6312 lines, which the nebular models of young populations predict at
#: up to ~0.5 % of H-alpha.
BASELINE_MASKED_LINES = {
    **EMISSION_LINES,
    "[NII]5755": 5754.59 * u.AA,
    "[SIII]6312": 6312.06 * u.AA,
}

# A spectrum needs at least this fraction of its pixels to be fitted.
_MIN_GOOD_FRACTION = 0.2
# Kinematics held fixed: V = 0 and a dispersion far below one pixel (pPXF
# requires sigma > 0; 1 km/s is 1.5 % of a 64 km/s pixel, an identity kernel).
_START = (0.0, 1.0)


class BaselineFlag(enum.IntFlag):
    """Quality flags of a baseline fit (bit values, combinable)."""

    #: Fitted.
    OK = 0
    #: Fewer than 20 % usable pixels (NaN, non-positive variance, masked):
    #: nothing was fitted, all values are NaN.
    NO_DATA = 1
    #: pPXF raised an error or returned non-finite values: all values are NaN.
    FIT_FAILED = 2
    #: No usable HST flux: the spectrum was fitted alone.
    NO_PHOTOMETRY = 4
    #: A_V ended at the upper bound of the allowed range.
    AV_AT_BOUND = 8


class PopulationFit(NamedTuple):
    """
    Result of :func:`fit_population` for one spectrum (plain numbers).

    All arrays are NaN (and ``flag`` has ``NO_DATA`` or ``FIT_FAILED``) when
    the spectrum could not be fitted.
    """

    #: Fraction of the living stellar mass in each of the 16 age bins (sums to 1).
    mass_fraction: np.ndarray
    #: Living-mass-weighted mean [Z/H] of each age bin; NaN for empty bins.
    zh: np.ndarray
    #: V-band (5450-5550 A) light fraction of each age bin, from
    #: :func:`~cubesfh.populations.mean_quantities`.
    light_fraction: np.ndarray
    #: pPXF weights, shape (16, 6) (age bin, metallicity), normalised to sum
    #: to 1: fractions of the dust-free light in 5300-5500 A.
    light_weights: np.ndarray
    #: Living-mass fractions on the same (16, 6) grid.
    mass_weights: np.ndarray
    #: Light-weighted mean log10(age / yr).
    logage_lw: float
    #: Mass-weighted mean log10(age / yr).
    logage_mw: float
    #: Light-weighted mean [Z/H].
    zh_lw: float
    #: Mass-weighted mean [Z/H].
    zh_mw: float
    #: Calzetti et al. (2000) V-band attenuation, mag.
    av: float
    #: Reduced chi^2 of the final fit (spectrum and photometry).
    chi2: float
    #: chi^2 per photometric band of the final fit (NaN without photometry).
    phot_chi2: float
    #: Factor applied to the input noise (spectrum and photometry) before the
    #: regularised fit (1 if not rescaled).
    noise_scale: float
    #: Number of log-rebinned spectral pixels fitted.
    n_good: int
    #: Number of HST bands fitted.
    n_bands: int
    #: `BaselineFlag` value.
    flag: int
    #: Wall-clock seconds spent on this spectrum.
    seconds: float
    #: Monte-Carlo uncertainties (``n_mc > 0``, else `None`): dict with the 16th
    #: and 84th percentiles over the noise realisations, keys ``<name>_p16``,
    #: ``<name>_p84`` for ``logage_lw``, ``logage_mw``, ``zh_lw``, ``zh_mw``
    #: (floats) and ``mass_fraction`` (16 values), and ``n_mc`` (realisations
    #: fitted successfully).
    mc: dict | None = None
    #: The best-fitting spectrum on the input grid (``templates.wavelength``,
    #: the network's 4800-7000 A), in the units of the normalised input: the
    #: weighted templates on that grid times pPXF's dust and polynomial
    #: (smooth, interpolated from its log grid); `None` when nothing was fitted.
    bestfit: np.ndarray | None = None


def age_bin_spectra(model):
    """
    Spectra of constant star formation across each of the 16 age bins.

    The model's sub-interval spectra summed over each age bin with duration
    weights (:meth:`~cubesfh.templates.TemplateLibrary.bin_matrix`) and
    normalised to a mean of 1 in the normalisation window, on the model's
    (linear) output grid.

    Parameters
    ----------
    model : `~cubesfh.synthesis.ForwardModel`

    Returns
    -------
    spectra : `~numpy.ndarray`
        Shape (16, n_metallicities, n_pix).
    norm : `~numpy.ndarray`
        Mean flux in the window before normalisation, (16, n_metallicities).

    Raises
    ------
    CubeSFHError
        If the model's grid does not cover the normalisation window.
    """
    w = model.wavelength.to_value(u.AA)
    spec = np.einsum("ba,zap->bzp", model.library.bin_matrix(), model.stellar)
    lo, hi = NORM_WINDOW.to_value(u.AA)
    sel = (w >= lo) & (w <= hi)
    if not sel.any():
        msg = (f"The model wavelength grid ({w[0]:.0f}-{w[-1]:.0f} A) does not cover the "
               f"normalisation window {lo:.0f}-{hi:.0f} A; use a ForwardModel with "
               "output_wavelength including it.")
        raise CubeSFHError(msg)
    norm = spec[:, :, sel].mean(axis=2)
    return spec / norm[:, :, None], norm


class BaselineTemplates:
    """
    Templates of the pPXF baseline, prepared once for many spectra.

    From a `~cubesfh.synthesis.ForwardModel`: its pre-processed sub-interval
    spectra (already at the resolution of the network input) are summed over
    each of the 16 age bins with duration weights
    (:meth:`~cubesfh.templates.TemplateLibrary.bin_matrix`, i.e. a constant
    star formation rate across the bin), normalised to a mean of 1 in
    5300-5500 A and log-rebinned. The photometric templates are the mean
    f_lambda of the same combinations of the library SEDs in the HST bands,
    divided by the same normalisation.

    The object holds plain arrays only and can be pickled cheaply
    (about 2 MB) to send to workers.

    Parameters
    ----------
    model : `~cubesfh.synthesis.ForwardModel`, optional
        Default: a new ``ForwardModel()`` (shipped library, five HST bands).

    Attributes
    ----------
    wavelength : `~astropy.units.Quantity`
        Linear grid of the input spectra (that of ``model``, 1761 pixels).
    lam : `~numpy.ndarray`
        Wavelength of each log-rebinned pixel, Angstrom.
    velscale : float
        Size of the log-rebinned pixels, km/s.
    rebin : `scipy.sparse.csr_matrix`
        Linear operator from the linear to the logarithmic grid
        (:func:`ppxf.ppxf_util.log_rebin`, flux-density conserving).
    spectra : `~numpy.ndarray`
        Log-rebinned templates, shape (n_lam, 16, 6), each with mean 1 in
        the normalisation window (on the linear grid).
    photometry : `~numpy.ndarray`
        Mean f_lambda of each template in each band, same normalisation,
        shape (n_bands, 16, 6).
    phot_lam : `~numpy.ndarray`
        Effective wavelength of each band for each template (Angstrom,
        :math:`\\int f T \\lambda^2 d\\lambda / \\int f T \\lambda d\\lambda`),
        shape (n_bands, 16, 6); where pPXF evaluates the attenuation of the
        photometric templates.
    pivot : `~astropy.units.Quantity`
        Pivot wavelength of each band.
    bands : tuple of str
        HST bands, in the order of the photometry.
    norm : `~numpy.ndarray`
        Mean flux of each template in the normalisation window before
        normalisation, shape (16, 6), L_sun / A per solar mass formed.
    living_fraction : `~numpy.ndarray`
        Fraction of the formed mass still in living stars, shape (16, 6).
    zh : `~numpy.ndarray`
        [Z/H] of the six metallicities.
    norm_window : `~astropy.units.Quantity`
        Normalisation window.
    """

    def __init__(self, model=None):
        from ppxf.ppxf_util import log_rebin
        from scipy import sparse

        from .synthesis import ForwardModel
        from .templates import load_filters

        if model is None:
            model = ForwardModel()
        lib = model.library
        w = model.wavelength.to_value(u.AA)
        bm = lib.bin_matrix()  # (16, n_age), duration weights, rows sum to 1
        spec, norm = age_bin_spectra(model)

        matrix, ln_lam, velscale = log_rebin(w, np.eye(w.size))
        matrix[np.abs(matrix) < 1e-12] = 0.0
        self.rebin = sparse.csr_matrix(matrix)
        self.lam = np.exp(ln_lam)
        self.velscale = float(velscale)
        nb, nz = spec.shape[:2]
        self.spectra = np.ascontiguousarray(
            (self.rebin @ spec.reshape(nb * nz, -1).T).reshape(-1, nb, nz))
        # the same templates on the input (linear) grid, for the best fit there
        self.linear_spectra = np.ascontiguousarray(spec.reshape(nb * nz, -1).T)

        sed = np.einsum("ba,zas->bzs", bm, model.sed_stellar)  # (16, nz, n_sed)
        bw = np.asarray(model.band_weights)  # (n_sed, n_bands)
        sed_w = model.sed_wavelength.to_value(u.AA)
        flux = sed @ bw  # (16, nz, n_bands)
        self.phot_lam = np.moveaxis((sed @ (bw * sed_w[:, None])) / flux, -1, 0)
        self.photometry = np.moveaxis(flux / norm[:, :, None], -1, 0)
        self.bands = tuple(model.bands)
        self.pivot = u.Quantity([f.pivot for f in load_filters(self.bands)])
        self.norm = norm
        self.living_fraction = lib.binned_living_fraction().T  # (16, nz)
        self.zh = np.asarray(lib.zh, dtype=float)
        self.wavelength = model.wavelength
        self.norm_window = NORM_WINDOW

    def __repr__(self):
        nb, nz = self.norm.shape
        return (f"<BaselineTemplates: {nb} age bins x {nz} metallicities, "
                f"{self.lam.size} px at {self.velscale:.1f} km/s, bands {','.join(self.bands)}>")

    @property
    def shape(self):
        """Population grid ``(n_age_bins, n_metallicities)``."""
        return self.norm.shape

    def log_rebin(self, spectrum, variance=None):
        """
        Log-rebin a spectrum (and its variance) sampled on :attr:`wavelength`.

        Parameters
        ----------
        spectrum : `~numpy.ndarray`
            Shape ``(n_pix,)``; NaN pixels give NaN in every output pixel they
            touch.
        variance : `~numpy.ndarray`, optional
            Variance, same shape; propagated as the diagonal of the output
            covariance (``sum_j M_kj^2 var_j``).

        Returns
        -------
        flux : `~numpy.ndarray`
        variance : `~numpy.ndarray` or `None`
        """
        spectrum = np.asarray(spectrum, dtype=float)
        bad = ~np.isfinite(spectrum)
        out = self.rebin @ np.where(bad, 0.0, spectrum)
        touched = (abs(self.rebin) @ bad.astype(float)) > 0
        out[touched] = np.nan
        if variance is None:
            return out, None
        variance = np.asarray(variance, dtype=float)
        vbad = ~np.isfinite(variance)
        var = self.rebin.multiply(self.rebin) @ np.where(vbad, 0.0, variance)
        var[touched | ((abs(self.rebin) @ vbad.astype(float)) > 0)] = np.nan
        return out, var

    def to_mass(self, light_weights):
        """
        Living-mass fractions of pPXF light weights.

        Parameters
        ----------
        light_weights : `~numpy.ndarray`
            Weights of the templates, shape ``(..., 16, 6)``.

        Returns
        -------
        mass : `~numpy.ndarray`
            Living-mass fractions, same shape, summing to 1 over the grid.
        """
        mass = np.asarray(light_weights, float) / self.norm * self.living_fraction
        return mass / mass.sum(axis=(-2, -1), keepdims=True)


def _default_templates():
    # the same cached object run_baseline uses for its 150 km/s bins
    return templates_at(SIGMA_TARGET.to_value(_KMS))


@functools.lru_cache(maxsize=4)
def templates_at(sigma_target):
    """
    `BaselineTemplates` at a common dispersion, built once per process.

    The templates of ``ForwardModel(sigma_target=sigma_target)``: what
    `~cubesfh.pipeline.run_baseline` fits the bins broadened to that
    dispersion with. Cached (four dispersions), so that the cubes of a survey
    do not each rebuild them; treat the result as read-only.

    Parameters
    ----------
    sigma_target : float
        Common velocity dispersion in km/s.

    Returns
    -------
    templates : `BaselineTemplates`
    """
    from .synthesis import ForwardModel

    return BaselineTemplates(ForwardModel(sigma_target=float(sigma_target) * _KMS))


def fit_grouped(spectrum, variance, photometry, group, *, templates, **kwargs):
    """
    :func:`fit_population` with the templates of the bin's group.

    The per-bin function of `~cubesfh.pipeline.run_baseline`, whose bins are
    at different common dispersions: ``templates`` maps each group (the
    dispersion in km/s) to its `BaselineTemplates`, so that one
    `~cubesfh.parallel.map_bins` call (and one transfer of the templates to
    each worker) serves all the bins of a cube.

    Parameters
    ----------
    spectrum, variance, photometry
        As in :func:`fit_population`.
    group : hashable
        Key of ``templates``.
    templates : dict
        `BaselineTemplates` of each group.
    **kwargs
        Other options of :func:`fit_population`.

    Returns
    -------
    result : `PopulationFit`
    """
    return fit_population(spectrum, variance, photometry, templates=templates[group], **kwargs)


def _blas_limits(threads):
    """Context limiting the BLAS thread pool (needs threadpoolctl; no-op otherwise)."""
    if threads is None:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=int(threads), user_api="blas")


def _plain(x, name):
    """Plain float array of a normalised (dimensionless) input."""
    if isinstance(x, u.Quantity):
        try:
            return x.to_value(u.dimensionless_unscaled).astype(float)
        except u.UnitConversionError:
            msg = (f"{name} has unit {x.unit}; the baseline fits normalised (dimensionless) "
                   "spectra and photometry: divide them by the mean flux in 5300-5500 A "
                   "(cubesfh.restframe.prepare_spectra does this).")
            raise CubeSFHError(msg) from None
    return np.asarray(x, dtype=float)


def _failed(flag, n_good, n_bands, seconds, shape):
    nan = float("nan")
    return PopulationFit(
        mass_fraction=np.full(N_AGE_BINS, nan), zh=np.full(N_AGE_BINS, nan),
        light_fraction=np.full(N_AGE_BINS, nan), light_weights=np.full(shape, nan),
        mass_weights=np.full(shape, nan), logage_lw=nan, logage_mw=nan, zh_lw=nan,
        zh_mw=nan, av=nan, chi2=nan, phot_chi2=nan, noise_scale=nan, n_good=int(n_good),
        n_bands=int(n_bands), flag=int(flag), seconds=float(seconds))


def fit_population(spectrum, variance, photometry=None, *, templates=None, phot_error=0.02,
                   phot_noise=None, mask=None, regul=100.0, reg_ord=2, mdegree=8, degree=-1,
                   av_start=0.3, av_bounds=(0.0, 10.0), mask_emission=True,
                   mask_width=800 * _KMS, rescale_noise=True, blas_threads=1, n_mc=0,
                   mc_seed=0):
    """
    Fit the stellar populations of one spectrum (and its HST fluxes) with pPXF.

    The inputs are those of the network: a rest-frame spectrum on the grid of
    ``templates.wavelength`` at the common resolution, normalised to a mean of
    1 in 5300-5500 A, and the HST fluxes divided by the same number. The
    function never raises on bad data: a spectrum that cannot be fitted comes
    back with NaN values and a `BaselineFlag`.

    Parameters
    ----------
    spectrum : `~numpy.ndarray` or `~astropy.units.Quantity`
        Normalised spectrum, shape ``(n_pix,)`` (dimensionless). NaN = bad.
    variance : `~numpy.ndarray` or `~astropy.units.Quantity`
        Its variance, same shape. Non-finite or non-positive = bad.
    photometry : `~numpy.ndarray` or `~astropy.units.Quantity`, optional
        Normalised mean f_lambda in ``templates.bands``, shape ``(n_bands,)``;
        NaN (or non-positive) for a missing band. `None`: spectrum only.
    templates : `BaselineTemplates`, optional
        Default: built once from the shipped library and cached.
    phot_error : float, optional
        Relative 1-sigma error of each HST flux (used if ``phot_noise`` is
        `None`).
    phot_noise : `~numpy.ndarray`, optional
        Absolute 1-sigma errors of the fluxes, shape ``(n_bands,)``.
    mask : `~numpy.ndarray`, optional
        Boolean, shape ``(n_pix,)``, `True` for pixels to exclude.
    regul : float, optional
        pPXF regularisation, ``1 / Delta`` (default 100: a 1 % error).
        0 switches regularisation off.
    reg_ord : {1, 2}, optional
        Order of the regularisation (pPXF default 2, minimum curvature).
    mdegree : int, optional
        Degree of the multiplicative Legendre polynomial.
    degree : int, optional
        Degree of the additive polynomial (-1: none).
    av_start : float or `~astropy.units.Quantity`, optional
        Starting A_V (mag).
    av_bounds : tuple, optional
        Allowed range of A_V (mag). The default 0-10 mag is no constraint in
        practice (pPXF's attenuation is 1 for negative A_V).
    mask_emission : bool, optional
        Mask ``mask_width`` either side of the lines of
        :data:`BASELINE_MASKED_LINES`.
    mask_width : `~astropy.units.Quantity`, optional
        Half-width of the masked windows, in velocity.
    rescale_noise : bool, optional
        First fit without regularisation and multiply the noise of the
        spectrum and of the photometry by ``sqrt(chi2/DOF)`` of that fit, so
        that the regularisation acts on a fit with chi2/DOF = 1, as the pPXF
        documentation recommends. Meaningless (and slow, since pPXF iterates
        towards chi2 = 0) for noise-free spectra: switch it off there.
    blas_threads : int or None, optional
        Limit the BLAS thread pool to this many threads during the fit
        (requires ``threadpoolctl``; `None` leaves it alone). The linear
        systems are small, and multi-threaded BLAS only slows them down when
        other processes compete for the cores.
    n_mc : int, optional
        Monte-Carlo uncertainties: after the fit, refit ``n_mc`` copies of the
        spectrum (and photometry) with Gaussian noise drawn from ``variance``
        (and the photometric errors) added, with the same options, and report
        the 16th and 84th percentiles of the mean quantities and of the SFH in
        ``result.mc``. Default 0: none (each realisation costs one fit).
    mc_seed : int, optional
        Seed of the noise realisations, combined with a checksum of the
        spectrum so that each bin gets its own reproducible noise.

    Returns
    -------
    result : `PopulationFit`

    Raises
    ------
    CubeSFHError
        If the arrays do not have the sizes of ``templates`` (a programming
        error, not bad data).
    """
    t0 = time.perf_counter()
    tpl = _default_templates() if templates is None else templates
    shape = tpl.shape
    n_pix = tpl.wavelength.size
    if variance is None:
        msg = ("fit_population needs the variance of the spectrum (for the training-set "
               "noise model: spectrum / (snr**2 * 1.25) at S/N snr per Angstrom).")
        raise CubeSFHError(msg)
    spectrum = _plain(spectrum, "spectrum")
    variance = _plain(variance, "variance")
    if spectrum.shape != (n_pix,) or variance.shape != (n_pix,):
        msg = (f"spectrum {spectrum.shape} and variance {variance.shape} must both have shape "
               f"({n_pix},), the wavelength grid of the templates "
               f"({tpl.wavelength[0]:.2f}-{tpl.wavelength[-1]:.2f}); resample them with "
               "cubesfh.restframe.prepare_spectra.")
        raise CubeSFHError(msg)
    n_bands = len(tpl.bands)
    if phot_noise is not None:
        phot_noise = _plain(phot_noise, "phot_noise")
    if photometry is not None:
        photometry = _plain(photometry, "photometry")
        for arr, name in ((photometry, "photometry"), (phot_noise, "phot_noise")):
            if arr is not None and arr.shape != (n_bands,):
                msg = (f"{name} has shape {arr.shape}; it needs one value per band "
                       f"{tpl.bands} (NaN for a missing band).")
                raise CubeSFHError(msg)

    bad = ~np.isfinite(spectrum) | ~np.isfinite(variance) | ~(variance > 0)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (n_pix,):
            msg = f"mask has shape {mask.shape}; it must have shape ({n_pix},)."
            raise CubeSFHError(msg)
        bad |= mask
    galaxy, var = tpl.log_rebin(np.where(bad, np.nan, spectrum), np.where(bad, np.nan, variance))
    good = np.isfinite(galaxy) & np.isfinite(var) & (var > 0)
    if mask_emission:
        lines = u.Quantity(list(BASELINE_MASKED_LINES.values()))
        good &= ~emission_line_mask(tpl.lam * u.AA, lines=lines, width=mask_width)
    n_good = int(good.sum())

    # photometry: drop missing bands
    flag = BaselineFlag.OK
    phot = None
    n_fit_bands = 0
    if photometry is not None:
        pnoise = (phot_error * np.abs(photometry) if phot_noise is None else phot_noise)
        use = np.isfinite(photometry) & (photometry > 0) & np.isfinite(pnoise) & (pnoise > 0)
        n_fit_bands = int(use.sum())
        if n_fit_bands:
            phot = {"templates": tpl.photometry[use], "galaxy": photometry[use],
                    "noise": pnoise[use], "lam": tpl.phot_lam[use]}
    if phot is None:
        flag |= BaselineFlag.NO_PHOTOMETRY

    if n_good < max(_MIN_GOOD_FRACTION * galaxy.size, 10 * (mdegree + 2)):
        return _failed(flag | BaselineFlag.NO_DATA, n_good, n_fit_bands,
                       time.perf_counter() - t0, shape)

    galaxy = np.where(good, galaxy, 0.0)
    noise = np.sqrt(np.where(good, var, np.nanmax(np.where(good, var, np.nan))))
    av_lo, av_hi = u.Quantity(av_bounds, u.mag).value
    av0 = float(np.clip(u.Quantity(av_start, u.mag).value, av_lo, av_hi))
    common = dict(templates=tpl, galaxy=galaxy, good=good, phot=phot, mdegree=mdegree,
                  degree=degree, av_bounds=(av_lo, av_hi))
    scale = 1.0
    try:
        # Floating-point warnings of one bad spectrum are reported through its
        # flag; np.errstate is thread-local, so this is safe under threads.
        with np.errstate(all="ignore"), warnings.catch_warnings(), _blas_limits(blas_threads):
            warnings.simplefilter("ignore", RuntimeWarning)
            if rescale_noise:
                pp = _run_ppxf(noise=noise, regul=0, reg_ord=reg_ord, av_start=av0,
                               scale=1.0, **common)
                scale = float(np.sqrt(pp.chi2))
                if not (np.isfinite(scale) and scale > 0):
                    scale = 1.0
                scale = max(scale, 1e-6)
                av0 = float(np.clip(pp.dust[0]["sol"][0], av_lo, av_hi))
            pp = _run_ppxf(noise=noise, regul=regul, reg_ord=reg_ord, av_start=av0,
                           scale=scale, **common)
        weights = np.asarray(pp.weights, float).reshape(shape)
        av = float(pp.dust[0]["sol"][0])
        chi2 = float(pp.chi2)
        phot_chi2 = float(pp.phot_chi2) if phot is not None else float("nan")
    except Exception as exc:  # one bad spectrum must never stop a batch
        log.debug("pPXF failed: %s: %s", type(exc).__name__, exc)
        return _failed(flag | BaselineFlag.FIT_FAILED, n_good, n_fit_bands,
                       time.perf_counter() - t0, shape)
    total = weights.sum()
    if not (np.all(np.isfinite(weights)) and total > 0 and np.isfinite(av)
            and np.isfinite(chi2)):
        return _failed(flag | BaselineFlag.FIT_FAILED, n_good, n_fit_bands,
                       time.perf_counter() - t0, shape)
    if av >= av_hi - 1e-3:
        flag |= BaselineFlag.AV_AT_BOUND
    light = weights / total
    mass = tpl.to_mass(light)
    mass_fraction = mass.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        zh = np.where(mass_fraction > 0, (mass @ tpl.zh) / mass_fraction, np.nan)
    mq = mean_quantities(mass_fraction, np.nan_to_num(zh, nan=0.0))
    mc = None
    if n_mc and int(n_mc) > 0:
        options = dict(templates=tpl, phot_error=phot_error, phot_noise=phot_noise, mask=mask,
                       regul=regul, reg_ord=reg_ord, mdegree=mdegree, degree=degree,
                       av_start=av_start, av_bounds=av_bounds, mask_emission=mask_emission,
                       mask_width=mask_width, rescale_noise=rescale_noise,
                       blas_threads=blas_threads)
        mc = _monte_carlo(spectrum, variance, photometry, int(n_mc), int(mc_seed), options)
    return PopulationFit(
        mass_fraction=mass_fraction, zh=zh, light_fraction=np.asarray(mq["light_fraction"]),
        light_weights=light, mass_weights=mass, logage_lw=float(mq["logage_lw"]),
        logage_mw=float(mq["logage_mw"]), zh_lw=float(mq["zh_lw"]), zh_mw=float(mq["zh_mw"]),
        av=av, chi2=chi2, phot_chi2=phot_chi2, noise_scale=scale, n_good=n_good,
        n_bands=n_fit_bands, flag=int(flag), seconds=time.perf_counter() - t0, mc=mc,
        bestfit=_linear_bestfit(tpl, weights, np.asarray(pp.bestfit, float)[:galaxy.size]))


def _linear_bestfit(tpl, weights, bestfit_log):
    """pPXF's best fit on the templates' input grid (see `PopulationFit.bestfit`)."""
    stars_log = tpl.spectra.reshape(tpl.spectra.shape[0], -1) @ weights.ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = bestfit_log / stars_log  # dust x polynomial: smooth
    ok = np.isfinite(factor) & (stars_log > 0)
    w = tpl.wavelength.to_value(u.AA)
    if ok.sum() < 2:
        return None
    return (tpl.linear_spectra @ weights.ravel()) * np.interp(w, tpl.lam[ok], factor[ok])


#: Mean quantities given Monte-Carlo percentiles.
MC_QUANTITIES = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")


def _monte_carlo(spectrum, variance, photometry, n_mc, seed, options):
    """16th/84th percentiles of the fits to ``n_mc`` noisy copies of a spectrum."""
    rng = np.random.default_rng([seed, zlib.crc32(np.ascontiguousarray(spectrum).tobytes())])
    sd = np.sqrt(np.where(np.isfinite(variance) & (variance > 0), variance, 0.0))
    if photometry is not None:
        pnoise = options["phot_noise"]
        pnoise = options["phot_error"] * np.abs(photometry) if pnoise is None else pnoise
        psd = np.where(np.isfinite(pnoise) & (pnoise > 0), pnoise, 0.0)
    fits_ = []
    for _ in range(n_mc):
        spec = spectrum + rng.standard_normal(spectrum.shape) * sd
        phot = (None if photometry is None
                else photometry + rng.standard_normal(photometry.shape) * psd)
        r = fit_population(spec, variance, phot, n_mc=0, **options)
        if not r.flag & (BaselineFlag.NO_DATA | BaselineFlag.FIT_FAILED):
            fits_.append(r)
    out = {"n_mc": len(fits_)}
    for name in MC_QUANTITIES + ("mass_fraction",):
        if len(fits_) >= 2:
            values = np.array([getattr(r, name) for r in fits_], float)
            lo, hi = np.percentile(values, [16, 84], axis=0)
        else:
            shape = (N_AGE_BINS,) if name == "mass_fraction" else ()
            lo = hi = np.full(shape, np.nan)
        out[f"{name}_p16"] = lo if name == "mass_fraction" else float(lo)
        out[f"{name}_p84"] = hi if name == "mass_fraction" else float(hi)
    return out


def _run_ppxf(*, templates, galaxy, noise, good, phot, regul, reg_ord, mdegree, degree,
              av_start, av_bounds, scale):
    """One pPXF call with fixed kinematics, Calzetti dust and optional photometry."""
    from ppxf.ppxf import ppxf

    if phot is not None:
        phot = dict(phot, noise=phot["noise"] * scale)
    ntemp = int(np.prod(templates.shape))
    dust = [{"start": [av_start], "bounds": [list(av_bounds)],
             "component": np.ones(ntemp, dtype=bool)}]
    kwargs = {}
    if regul > 0:
        kwargs = {"regul": regul, "reg_dim": templates.shape, "reg_ord": reg_ord}
    return ppxf(templates.spectra, galaxy, noise * scale, templates.velscale, list(_START),
                moments=-2, degree=degree, mdegree=mdegree, lam=templates.lam, mask=good,
                phot=phot, dust=dust, quiet=True, **kwargs)


def fit_populations(spectra, variances, photometry=None, *, templates=None, phot_error=0.02,
                    phot_noise=None, regul=100.0, reg_ord=2, mdegree=8, degree=-1,
                    av_start=0.3, av_bounds=(0.0, 10.0), mask_emission=True,
                    mask_width=800 * _KMS, rescale_noise=True, blas_threads=1, n_mc=0,
                    mc_seed=0, progress_bar=True):
    """
    Fit many spectra with :func:`fit_population` (one after the other).

    Parameters
    ----------
    spectra, variances : `~numpy.ndarray` or `~astropy.units.Quantity`
        Normalised spectra and variances, shape ``(n, n_pix)``.
    photometry : `~numpy.ndarray` or `~astropy.units.Quantity`, optional
        Normalised HST fluxes, shape ``(n, n_bands)``, NaN where missing.
    phot_noise : `~numpy.ndarray`, optional
        Absolute errors of ``photometry``, same shape.
    progress_bar : bool, optional
        Show a progress bar.
    templates, phot_error, regul, reg_ord, mdegree, degree, av_start, av_bounds, \
mask_emission, mask_width, rescale_noise, blas_threads, n_mc, mc_seed
        As in :func:`fit_population`.

    Returns
    -------
    table : `~astropy.table.QTable`
        One row per spectrum with the fields of `PopulationFit` as columns
        (``av`` in mag; ``mass_fraction``, ``zh``, ``light_fraction`` of shape
        (n, 16); ``light_weights`` and ``mass_weights`` of shape (n, 16, 6)).
        With ``n_mc > 0`` also ``<name>_p16`` and ``<name>_p84`` for
        ``logage_lw``, ``logage_mw``, ``zh_lw``, ``zh_mw`` and
        ``mass_fraction`` (Monte-Carlo percentiles) and ``n_mc``.
        ``meta`` holds the configuration, ``n_failed`` and
        ``seconds_per_spectrum``.

    Warns
    -----
    CubeSFHWarning
        If some spectra could not be fitted (``NO_DATA`` or ``FIT_FAILED``).
    """
    tpl = _default_templates() if templates is None else templates
    spectra = np.atleast_2d(_plain(spectra, "spectra"))
    variances = np.atleast_2d(_plain(variances, "variances"))
    n = spectra.shape[0]
    if variances.shape != spectra.shape:
        msg = (f"variances {variances.shape} must have the shape of spectra {spectra.shape}.")
        raise CubeSFHError(msg)
    nb = len(tpl.bands)
    phot = None
    if photometry is not None:
        phot = np.atleast_2d(_plain(photometry, "photometry"))
        if phot.shape != (n, nb):
            msg = (f"photometry has shape {phot.shape}; expected ({n}, {nb}) for the bands "
                   f"{tpl.bands} (NaN where missing).")
            raise CubeSFHError(msg)
    pnoise = None
    if phot_noise is not None:
        pnoise = np.atleast_2d(_plain(phot_noise, "phot_noise"))
        if pnoise.shape != (n, nb):
            msg = f"phot_noise has shape {pnoise.shape}; expected ({n}, {nb})."
            raise CubeSFHError(msg)
    options = dict(templates=tpl, phot_error=phot_error, regul=regul, reg_ord=reg_ord,
                   mdegree=mdegree, degree=degree, av_start=av_start, av_bounds=av_bounds,
                   mask_emission=mask_emission, mask_width=mask_width,
                   rescale_noise=rescale_noise, blas_threads=blas_threads, n_mc=n_mc,
                   mc_seed=mc_seed)
    t0 = time.perf_counter()
    results = []
    for i in progress(range(n), enabled=progress_bar, desc="pPXF baseline", unit="spectrum"):
        results.append(fit_population(
            spectra[i], variances[i], None if phot is None else phot[i],
            phot_noise=None if pnoise is None else pnoise[i], **options))
    elapsed = time.perf_counter() - t0

    table = QTable()
    for name in PopulationFit._fields:
        if name == "mc":
            continue
        if name == "bestfit":
            npix = tpl.wavelength.size
            col = np.stack([np.full(npix, np.nan) if r.bestfit is None else r.bestfit
                            for r in results]) if results else np.zeros((0, npix))
            table[name] = col
            continue
        col = np.array([getattr(r, name) for r in results])
        if name == "av":
            col = col * u.mag
        table[name] = col
    if n_mc and int(n_mc) > 0:
        for key, values in mc_columns(results).items():
            table[key] = values
    n_failed = int(np.sum((table["flag"] & (BaselineFlag.NO_DATA | BaselineFlag.FIT_FAILED)) > 0))
    table.meta.update({
        "method": "pPXF", "regul": float(regul), "reg_ord": int(reg_ord),
        "mdegree": int(mdegree), "degree": int(degree), "dust": "Calzetti+2000 A_V",
        "av_bounds": tuple(float(x) for x in u.Quantity(av_bounds, u.mag).value),
        "phot_error": float(phot_error), "phot_noise_given": phot_noise is not None,
        "bands": tpl.bands, "mask_emission": bool(mask_emission),
        "mask_width": u.Quantity(mask_width, _KMS), "rescale_noise": bool(rescale_noise),
        "velscale": tpl.velscale * _KMS, "n_failed": n_failed, "n_mc": int(n_mc),
        "seconds_per_spectrum": elapsed / max(n, 1),
    })
    log.info("pPXF baseline: %d spectra in %.1f s (%.2f s per spectrum), %d failed",
             n, elapsed, elapsed / max(n, 1), n_failed)
    if n_failed:
        msg = (f"{n_failed} of {n} spectra could not be fitted (too few valid pixels or a pPXF "
               "failure); their rows are NaN, see the 'flag' column (BaselineFlag).")
        warnings.warn(msg, CubeSFHWarning)
    return table


def mc_columns(results):
    """
    Monte-Carlo percentiles of many `PopulationFit` as per-spectrum arrays.

    Parameters
    ----------
    results : list of `PopulationFit` or `None`
        `None` or a fit without ``mc`` gives NaN (``n_mc`` 0).

    Returns
    -------
    columns : dict of `~numpy.ndarray`
        ``<name>_p16``, ``<name>_p84`` (``(n,)``, ``(n, 16)`` for
        ``mass_fraction``) and ``n_mc``.
    """
    n = len(results)
    out = {}
    for name in MC_QUANTITIES + ("mass_fraction",):
        shape = (n, N_AGE_BINS) if name == "mass_fraction" else (n,)
        for p in ("p16", "p84"):
            out[f"{name}_{p}"] = np.full(shape, np.nan)
    out["n_mc"] = np.zeros(n, dtype=np.int32)
    for i, r in enumerate(results):
        mc = getattr(r, "mc", None)
        if not mc:
            continue
        for key in out:
            out[key][i] = mc[key]
    return out
