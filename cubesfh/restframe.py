# Licensed under a 3-clause BSD style license - see LICENSE
"""
Rest-frame spectra at a common velocity dispersion, ready for the network.

`prepare_spectra` turns the co-added spectra of the spatial bins into the
input of the network (Galceran et al. 2026, section 2.3):

1. **Rest frame.** Each bin is moved to its rest frame with its stellar
   velocity :math:`v`: :math:`\\lambda_{\\rm rest} = \\lambda_{\\rm obs} / (1+z)`
   with :math:`1 + z = 1 + v/c` (``convention='optical'``, default),
   :math:`\\sqrt{(1+\\beta)/(1-\\beta)}` (``'relativistic'``) or
   :math:`\\exp(v/c)` (``'log'``, the convention of pPXF velocities). The flux
   density is multiplied by :math:`1+z`, so that the flux integrated over a
   line or a band is unchanged: :math:`f_{\\rm rest}(\\lambda) = (1+z)
   f_{\\rm obs}(\\lambda (1+z))`.
2. **Common dispersion.** Each spectrum is convolved with a Gaussian in
   velocity (i.e. in :math:`\\ln\\lambda`) of
   :math:`\\sigma_{\\rm broad} = \\sqrt{\\sigma_{\\rm target}^2 - \\sigma^2}`,
   :math:`\\sigma_{\\rm target} = 150` km/s, where :math:`\\sigma` is the
   stellar velocity dispersion of the bin. Bins with
   :math:`\\sigma \\ge \\sigma_{\\rm target}` cannot be brought to the target;
   they are flagged (``SIGMA_TOO_HIGH``) and left as they are.
3. **Resampling** to 4800-7000 A in steps of 1.25 A (1761 pixels,
   `~cubesfh.conventions.OUTPUT_WAVELENGTH`), conserving flux: every output
   pixel is the mean flux density over its extent.
4. **Normalisation** by the mean flux density in 5300-5500 A
   (`~cubesfh.conventions.NORM_WINDOW`); the factor is kept in
   `PreparedSpectra.norm` so that photometry can be normalised the same way.

Steps 2 and 3 are done in one linear operation per bin: the value of output
pixel :math:`k` (extent :math:`[a_k, b_k]`) is
:math:`\\sum_j A_{kj} f_j` with
:math:`A_{kj} = (b_k - a_k)^{-1} \\int_{c_j}^{d_j}\\int_{a_k}^{b_k}
G_{s_k}(\\lambda - x)\\, d\\lambda\\, dx`, the overlap of input pixel
:math:`[c_j, d_j]` (flux density constant over the pixel) with output pixel
:math:`k` after convolution with a Gaussian :math:`G` of width
:math:`s_k = \\lambda_k \\sigma_{\\rm broad} / c` (a Gaussian in velocity, to
first order in :math:`\\sigma/c`). The double integral has a closed form in
terms of the normal distribution, so the convolution is exact for any kernel
width, including widths below a pixel and zero (pure flux-conserving
resampling). All bins are processed together in blocks (vectorised).

**Line-spread function.** :math:`\\sigma` is the *intrinsic* stellar velocity
dispersion, as measured by pPXF after accounting for the MUSE LSF. The
observed spectra already contain the LSF, so the prepared spectra have a
total Gaussian dispersion :math:`\\sigma_{\\rm tot}^2 = 150^2 +
\\sigma_{\\rm LSF}^2(\\lambda)` (km/s): the same as the synthetic training
spectra, which are templates degraded to the MUSE LSF and then broadened by
150 km/s. In the rest frame, however, the LSF of a bin at redshift :math:`z`
is :math:`{\\rm FWHM}_{\\rm LSF}(\\lambda(1+z))/(1+z)` (see
`PreparedSpectra.lsf_fwhm`), narrower in km/s than at :math:`\\lambda`: by
0.1 km/s for a nearby galaxy, but at z = 0.083 the total dispersion at 4800 A
would be 165.4 instead of 169.6 km/s. With ``match_lsf=True`` (default) the
kernel adds the difference in quadrature, pixel by pixel, so the output has
the training resolution at any redshift.

**Variance.** Input pixels are treated as independent: the output variance is
:math:`\\sum_j A_{kj}^2 \\sigma_j^2`, the exact diagonal of the output
covariance. The covariance between neighbouring output pixels that the
convolution and the resampling introduce is neglected, as is the uncertainty
of the normalisation factor.

**Missing data.** NaN pixels (e.g. the laser notch of MUSE AO cubes) get zero
weight and the weights of each output pixel are renormalised; output pixels
whose valid weight is below ``min_coverage`` are NaN and the bin is flagged
``MISSING_PIXELS``.
"""

import enum
import logging
import warnings

import numpy as np
from astropy import constants
from astropy import units as u
from scipy.special import ndtr

from .conventions import NORM_WINDOW, OUTPUT_WAVELENGTH, SIGMA_TARGET
from .lsf import muse_lsf_fwhm
from .utils import CubeSFHError, CubeSFHWarning, progress

__all__ = ["PreparationFlag", "PreparedSpectra", "prepare_spectra", "resample_spectra"]

log = logging.getLogger(__name__)

_C_KMS = constants.c.to_value(u.km / u.s)
_CONVENTIONS = ("optical", "relativistic", "log")
#: Kernel truncation in units of its sigma (the Gaussian beyond 5 sigma holds 6e-7).
_TRUNCATE = 5.0
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
#: Target number of elements of the (bins, pixels, window) work arrays per block.
_BLOCK_ELEMENTS = 2_000_000


class PreparationFlag(enum.IntFlag):
    """Bit flags of `PreparedSpectra.flags`."""

    #: sigma >= sigma_target: not broadened, broader than the training spectra.
    SIGMA_TOO_HIGH = 1
    #: velocity or sigma not finite (or sigma < 0): spectrum not prepared (NaN).
    BAD_KINEMATICS = 2
    #: some output pixels have no valid data (NaN).
    MISSING_PIXELS = 4
    #: mean flux in the normalisation window not positive or not finite (spectrum NaN).
    BAD_NORM = 8


class PreparedSpectra:
    """
    Rest-frame, broadened, resampled and normalised spectra.

    Returned by `prepare_spectra`; not normally created directly.

    Attributes
    ----------
    wavelength : `~astropy.units.Quantity`, shape (n_pix,)
        Rest-frame wavelength grid (air, Angstrom).
    flux : `~numpy.ndarray`, shape (n_spec, n_pix)
        Flux density divided by ``norm`` (mean 1 in the normalisation window).
    variance : `~numpy.ndarray` or `None`, shape (n_spec, n_pix)
        Variance of ``flux``.
    norm : `~astropy.units.Quantity`, shape (n_spec,)
        Mean rest-frame flux density in the normalisation window, in the unit
        of the input spectra.
    flags : `~numpy.ndarray` of int, shape (n_spec,)
        Bitwise OR of `PreparationFlag` values; 0 for a clean spectrum.
    velocity, sigma : `~astropy.units.Quantity`, shape (n_spec,)
        The kinematics used.
    sigma_broad : `~astropy.units.Quantity`, shape (n_spec,)
        Dispersion of the broadening kernel (0 where not broadened).
    redshift : `~numpy.ndarray`, shape (n_spec,)
        :math:`z` derived from ``velocity``.
    sigma_target : `~astropy.units.Quantity`
        Target dispersion (a scalar, or one value per spectrum).
    norm_window : `~astropy.units.Quantity`
        Normalisation window.
    """

    def __init__(self, wavelength, flux, variance, norm, flags, *, velocity, sigma,
                 sigma_broad, redshift, sigma_target, norm_window, lsf=None,
                 lsf_matched=False):
        self.wavelength = wavelength
        self.flux = flux
        self.variance = variance
        self.norm = norm
        self.flags = flags
        self.velocity = velocity
        self.sigma = sigma
        self.sigma_broad = sigma_broad
        self.redshift = redshift
        self.sigma_target = sigma_target
        self.norm_window = norm_window
        self._lsf = lsf
        self.lsf_matched = lsf_matched

    def __len__(self):
        return self.flux.shape[0]

    def __repr__(self):
        return (f"<PreparedSpectra: {len(self)} spectra x {self.wavelength.size} pixels "
                f"({self.wavelength[0]:.2f} - {self.wavelength[-1]:.2f}), "
                f"{int(np.count_nonzero(self.flags))} flagged>")

    def _has(self, flag):
        return (self.flags & flag) != 0

    @property
    def sigma_too_high(self):
        """`True` for spectra with sigma >= sigma_target (not broadened)."""
        return self._has(PreparationFlag.SIGMA_TOO_HIGH)

    @property
    def bad_kinematics(self):
        """`True` for spectra whose velocity or sigma is unusable."""
        return self._has(PreparationFlag.BAD_KINEMATICS)

    @property
    def missing_pixels(self):
        """`True` for spectra with NaN output pixels."""
        return self._has(PreparationFlag.MISSING_PIXELS)

    @property
    def bad_norm(self):
        """`True` for spectra that could not be normalised."""
        return self._has(PreparationFlag.BAD_NORM)

    @property
    def usable(self):
        """
        `True` for complete, normalised spectra (all flags but
        ``SIGMA_TOO_HIGH`` clear); those can be passed to the network.
        """
        fatal = (PreparationFlag.BAD_KINEMATICS | PreparationFlag.MISSING_PIXELS
                 | PreparationFlag.BAD_NORM)
        return ~self._has(fatal)

    @property
    def lsf_fwhm(self):
        """
        Rest-frame FWHM of the instrumental LSF at each output pixel.

        `~astropy.units.Quantity` of shape (n_spec, n_pix) (Angstrom),
        :math:`{\\rm FWHM}_{\\rm LSF}(\\lambda(1+z))/(1+z)`; `None` if
        `prepare_spectra` was called with ``lsf=None``.
        """
        if self._lsf is None:
            return None
        onepz = 1.0 + self.redshift[:, None]
        return u.Quantity(self._lsf(self.wavelength * onepz), u.AA) / onepz

    @property
    def sigma_total(self):
        """
        Total Gaussian dispersion of the prepared spectra in km/s, shape (n_spec, n_pix).

        :math:`\\sqrt{\\max(\\sigma, \\sigma_{\\rm target})^2 + \\sigma_{\\rm LSF}^2}`,
        with the LSF from ``lsf`` (after ``match_lsf``, the larger of the
        rest-frame and the observed one); `None` if ``lsf=None``.
        """
        fwhm = self.lsf_fwhm
        if fwhm is None:
            return None
        from .lsf import fwhm_to_velocity_sigma

        sig_lsf = fwhm_to_velocity_sigma(fwhm, self.wavelength)
        if self.lsf_matched:  # raised to the rest-frame LSF where it was narrower
            rest = fwhm_to_velocity_sigma(u.Quantity(self._lsf(self.wavelength), u.AA),
                                          self.wavelength)
            sig_lsf = np.maximum(sig_lsf, rest)
        sig = np.maximum(self.sigma, self.sigma_target)
        return np.sqrt(sig[:, None] ** 2 + sig_lsf**2)


def _pixel_edges(centers):
    c = np.asarray(centers, dtype=float)
    if c.ndim != 1 or c.size < 2 or not np.all(np.diff(c) > 0):
        msg = "wavelength must be a 1-D, strictly increasing array of at least two pixels."
        raise CubeSFHError(msg)
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])


def _psi(t, s):
    """Antiderivative of Phi(t/s) in t; max(t, 0) where s == 0."""
    if np.all(s > 0):
        z = t / s
        return t * ndtr(z) + s * np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    with np.errstate(invalid="ignore", divide="ignore"):
        z = t / s
        smooth = t * ndtr(z) + s * np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return np.where(s > 0, smooth, np.maximum(t, 0.0))


def _transform(edges_in, flux, variance, valid, lo, hi, s):
    """
    Convolve piecewise-constant spectra with Gaussians and average over new pixels.

    Parameters
    ----------
    edges_in : ndarray (n_in + 1,)
        Input pixel edges, shared by all spectra.
    flux, variance, valid : ndarray (n_spec, n_in)
        Flux density (zero where not ``valid``), its variance (or None), validity.
    lo, hi : ndarray (n_spec, n_out)
        Output pixel edges for each spectrum, same frame as ``edges_in``.
    s : ndarray (n_spec, n_out)
        Gaussian sigma at each output pixel (same units; 0 = no convolution).

    Returns
    -------
    flux_out, variance_out (or None), coverage : ndarray (n_spec, n_out)
    """
    n_in = edges_in.size - 1
    reach = _TRUNCATE * s
    first = np.clip(np.searchsorted(edges_in, lo - reach, side="right") - 1, 0, n_in - 1)
    last = np.clip(np.searchsorted(edges_in, hi + reach, side="left") - 1, 0, n_in - 1)
    width = int(np.max(last - first)) + 1
    # Edges first .. first + width bound the input pixels first .. first + width - 1.
    edge = np.minimum(first[..., None] + np.arange(width + 1), n_in)
    e = edges_in[edge]
    ss = s[..., None]
    # overlap_j = [Psi(b - c_j) - Psi(b - d_j)] - [Psi(a - c_j) - Psi(a - d_j)], d_j = c_{j+1}
    diff = _psi(hi[..., None] - e, ss) - _psi(lo[..., None] - e, ss)
    weight = (diff[..., :-1] - diff[..., 1:]) / (hi - lo)[..., None]
    pix = first[..., None] + np.arange(width)
    weight[pix >= n_in] = 0.0
    pix = np.minimum(pix, n_in - 1)
    rows = np.arange(flux.shape[0])[:, None, None]
    w_valid = weight * valid[rows, pix]
    coverage = w_valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        flux_out = np.einsum("ijk,ijk->ij", w_valid, flux[rows, pix]) / coverage
        var_out = None
        if variance is not None:
            var_out = (np.einsum("ijk,ijk->ij", w_valid * weight, variance[rows, pix])
                       / coverage**2)
    return flux_out, var_out, coverage


def _as_spectra(wavelength, flux, variance):
    """Validate and strip units; returns (lam, flux2d, var2d or None, unit, squeeze)."""
    wavelength = u.Quantity(wavelength)
    if wavelength.unit.physical_type != "length":
        msg = f"wavelength must be a Quantity in length units; got unit {wavelength.unit!r}."
        raise CubeSFHError(msg)
    lam = wavelength.to_value(u.AA)
    unit = getattr(flux, "unit", u.dimensionless_unscaled)
    flux = np.asarray(getattr(flux, "value", flux), dtype=float)
    squeeze = flux.ndim == 1
    flux = np.atleast_2d(flux)
    if flux.ndim != 2 or flux.shape[1] != lam.size:
        msg = (f"flux must have shape (n_spec, {lam.size}) to match wavelength; got "
               f"{flux.shape}.")
        raise CubeSFHError(msg)
    if variance is not None:
        if isinstance(variance, u.Quantity):
            try:
                variance = variance.to_value(unit**2)
            except u.UnitConversionError as exc:
                msg = (f"variance must be in the flux unit squared ({unit**2}); got "
                       f"{variance.unit}.")
                raise CubeSFHError(msg) from exc
        variance = np.atleast_2d(np.asarray(variance, dtype=float))
        if variance.shape != flux.shape:
            msg = f"variance has shape {variance.shape}; expected {flux.shape} like flux."
            raise CubeSFHError(msg)
    return lam, flux, variance, unit, squeeze


def _block_size(n_out, width):
    return max(1, int(_BLOCK_ELEMENTS // max(1, n_out * width)))


@u.quantity_input(wavelength=u.AA, new_wavelength=u.AA)
def resample_spectra(wavelength, flux, new_wavelength, *, variance=None):
    """
    Resample spectra onto new pixels, conserving flux.

    Each output pixel gets the mean flux density of the input over its extent
    (input pixels are treated as constant over their extent; pixel edges lie
    half-way between the centres). The integral of the flux density over any
    range of whole output pixels is therefore conserved.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`, shape (n_in,)
        Increasing input pixel centres.
    flux : `~astropy.units.Quantity` or array, shape (n_in,) or (n_spec, n_in)
        Flux densities.
    new_wavelength : `~astropy.units.Quantity`, shape (n_out,)
        Increasing output pixel centres; the output pixels must lie inside
        the input range.
    variance : `~astropy.units.Quantity` or array, optional
        Variance of ``flux``, propagated assuming independent input pixels.

    Returns
    -------
    flux : `~astropy.units.Quantity` or array, shape (n_out,) or (n_spec, n_out)
    variance : same, only if ``variance`` was given

    Examples
    --------
    >>> import numpy as np
    >>> from astropy import units as u
    >>> from cubesfh.restframe import resample_spectra
    >>> lam = np.arange(5000.0, 5010.0, 1.0) * u.AA
    >>> resample_spectra(lam, np.arange(10.0), [5001.5, 5003.5, 5005.5] * u.AA)
    array([1.5, 3.5, 5.5])
    """
    lam, flux2, var2, unit, squeeze = _as_spectra(wavelength, flux, variance)
    edges_in = _pixel_edges(lam)
    edges_out = _pixel_edges(new_wavelength.to_value(u.AA))
    if edges_out[0] < edges_in[0] or edges_out[-1] > edges_in[-1]:
        msg = (f"new_wavelength pixels span {edges_out[0]:.2f}-{edges_out[-1]:.2f} A, "
               f"outside the input range {edges_in[0]:.2f}-{edges_in[-1]:.2f} A; choose "
               "output pixels inside the input range.")
        raise CubeSFHError(msg)
    valid = np.isfinite(flux2) & (True if var2 is None else np.isfinite(var2))
    f0 = np.where(valid, flux2, 0.0)
    v0 = None if var2 is None else np.where(valid, var2, 0.0)
    n_spec, n_out = flux2.shape[0], edges_out.size - 1
    lo = np.broadcast_to(edges_out[:-1], (n_spec, n_out))
    hi = np.broadcast_to(edges_out[1:], (n_spec, n_out))
    s = np.zeros((n_spec, n_out))
    width = int(np.max(np.diff(edges_out)) / np.min(np.diff(edges_in))) + 3
    step = _block_size(n_out, width)
    out = np.empty((n_spec, n_out))
    vout = None if var2 is None else np.empty((n_spec, n_out))
    for start in range(0, n_spec, step):
        sl = slice(start, start + step)
        f, v, cov = _transform(edges_in, f0[sl], None if v0 is None else v0[sl],
                               valid[sl], lo[sl], hi[sl], s[sl])
        f[~(cov > 0)] = np.nan
        out[sl] = f
        if vout is not None:
            v[~(cov > 0)] = np.nan
            vout[sl] = v
    if squeeze:
        out = out[0]
        vout = None if vout is None else vout[0]
    if isinstance(flux, u.Quantity):
        out = out * unit
    if variance is None:
        return out
    if isinstance(variance, u.Quantity):
        vout = vout * unit**2
    return out, vout


def _one_plus_z(velocity_kms, convention):
    beta = velocity_kms / _C_KMS
    if convention == "optical":
        return 1.0 + beta
    if convention == "relativistic":
        with np.errstate(invalid="ignore"):
            return np.sqrt((1.0 + beta) / (1.0 - beta))
    return np.exp(beta)


@u.quantity_input(wavelength=u.AA, velocity=u.km / u.s, sigma=u.km / u.s)
def prepare_spectra(wavelength, flux, variance, velocity, sigma, *, lsf=muse_lsf_fwhm,
                    sigma_target=SIGMA_TARGET, output_wavelength=OUTPUT_WAVELENGTH,
                    norm_window=NORM_WINDOW, convention="optical", min_coverage=0.5,
                    match_lsf=True, progress_bar=True):
    """
    Move spectra to the rest frame, broaden them to a common dispersion,
    resample them and normalise them.

    See the module docstring (:mod:`cubesfh.restframe`) for the method.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`, shape (n_lam,)
        Observed (air) wavelengths, increasing.
    flux : `~astropy.units.Quantity` or array, shape (n_spec, n_lam) or (n_lam,)
        Observed flux densities (e.g. ``VoronoiBins.spectra``).
    variance : `~astropy.units.Quantity` or array or `None`
        Variance of ``flux`` (same shape), or `None`.
    velocity : `~astropy.units.Quantity`, shape (n_spec,) or scalar
        Line-of-sight stellar velocity of each spectrum (including the
        systemic velocity), in the convention given by ``convention``.
    sigma : `~astropy.units.Quantity`, shape (n_spec,) or scalar
        Intrinsic stellar velocity dispersion (LSF already removed, as
        measured by pPXF).
    lsf : callable or `None`, optional
        Observed-frame LSF FWHM as a function of wavelength (default: MUSE,
        `~cubesfh.lsf.muse_lsf_fwhm`). The LSF is already in the data; it
        describes the resolution of the output (`PreparedSpectra.lsf_fwhm`,
        `PreparedSpectra.sigma_total`) and, with ``match_lsf``, sets the
        redshift correction of the kernel.
    sigma_target : `~astropy.units.Quantity`, optional
        Common dispersion of the output (150 km/s, the network's convention);
        a scalar, or one value per spectrum (a model family with several
        dispersions, see :ref:`network-sigma`).
    output_wavelength : `~astropy.units.Quantity`, optional
        Rest-frame output pixel centres (4800-7000 A at 1.25 A by default).
    norm_window : `~astropy.units.Quantity`, optional
        ``(lo, hi)``: the output is divided by its mean over the output pixels
        whose centres lie in this window.
    convention : {'optical', 'relativistic', 'log'}, optional
        How ``velocity`` maps to redshift: ``1 + v/c``,
        ``sqrt((1 + v/c) / (1 - v/c))`` or ``exp(v/c)`` (pPXF).
    min_coverage : float, optional
        Output pixels whose weight from valid (non-NaN) input pixels is below
        this fraction are set to NaN.
    match_lsf : bool, optional
        The training spectra carry the LSF at their rest wavelength
        ``lambda``; a galaxy at redshift z carries it at ``lambda (1 + z)``,
        where MUSE's resolution in km/s is higher (at z = 0.083 the total
        dispersion at 4800 A is 165.4 instead of 169.6 km/s). With
        ``match_lsf`` (default) the kernel adds, in quadrature, the
        wavelength-dependent difference
        :math:`\\sigma_{\\rm LSF}(\\lambda)^2 - \\sigma_{\\rm LSF}(\\lambda(1+z))^2`
        (in km/s, where positive), so that the output has the training
        resolution at any redshift. Ignored with ``lsf=None``.
    progress_bar : bool, optional
        Show a progress bar over blocks of spectra.

    Returns
    -------
    prepared : `PreparedSpectra`

    Raises
    ------
    CubeSFHError
        If for some spectrum the rest-frame output range is not covered by
        the observed wavelengths (the message gives the velocity and the
        ranges), or the inputs are inconsistent.

    Warns
    -----
    CubeSFHWarning
        If some spectra are flagged (sigma too high, bad kinematics, missing
        pixels or no positive flux in the normalisation window).

    Examples
    --------
    A flat spectrum observed at 1000 km/s with a dispersion of 100 km/s:

    >>> import numpy as np
    >>> from astropy import units as u
    >>> from cubesfh.restframe import prepare_spectra
    >>> lam = np.arange(4700.0, 7200.0, 1.25) * u.AA
    >>> flux = np.full((1, lam.size), 2.0) * u.Unit("1e-20 erg / (s cm2 AA)")
    >>> out = prepare_spectra(lam, flux, None, 1000 * u.km / u.s, 100 * u.km / u.s,
    ...                       progress_bar=False)
    >>> out.flux.shape
    (1, 1761)
    >>> out.norm.round(4)  # (1 + z) * 2
    <Quantity [2.0067] 1e-20 erg / (Angstrom s cm2)>
    >>> out.sigma_broad.round(1)
    <Quantity [111.8] km / s>
    """
    if convention not in _CONVENTIONS:
        msg = f"convention must be one of {_CONVENTIONS}; got {convention!r}."
        raise CubeSFHError(msg)
    lam, flux2, var2, unit, _ = _as_spectra(wavelength, flux, variance)
    n_spec = flux2.shape[0]
    try:
        v = np.broadcast_to(velocity.to_value(u.km / u.s), (n_spec,)).astype(float)
        sig = np.broadcast_to(sigma.to_value(u.km / u.s), (n_spec,)).astype(float)
    except ValueError as exc:
        msg = (f"velocity and sigma must be scalars or have one value per spectrum "
               f"({n_spec}); got shapes {velocity.shape} and {sigma.shape}.")
        raise CubeSFHError(msg) from exc
    try:
        sig_t = np.broadcast_to(u.Quantity(sigma_target, u.km / u.s).to_value(u.km / u.s),
                                (n_spec,)).astype(float)
    except ValueError as exc:
        msg = (f"sigma_target must be a scalar or have one value per spectrum ({n_spec}); got "
               f"shape {np.shape(sigma_target)}.")
        raise CubeSFHError(msg) from exc
    if not np.all(sig_t > 0):
        msg = f"sigma_target must be positive; got {sigma_target}."
        raise CubeSFHError(msg)
    out_lam = u.Quantity(output_wavelength, u.AA).to_value(u.AA)
    edges_out = _pixel_edges(out_lam)
    edges_in = _pixel_edges(lam)
    n_out = out_lam.size
    norm_lo, norm_hi = u.Quantity(norm_window, u.AA).to_value(u.AA)
    in_norm = (out_lam >= norm_lo) & (out_lam <= norm_hi)
    if not in_norm.any():
        msg = (f"norm_window {norm_lo}-{norm_hi} A contains no output pixel "
               f"({out_lam[0]}-{out_lam[-1]} A); choose a window inside output_wavelength.")
        raise CubeSFHError(msg)

    flags = np.zeros(n_spec, dtype=int)
    onepz = _one_plus_z(v, convention)
    bad_kin = ~np.isfinite(v) | ~np.isfinite(sig) | (sig < 0) | ~(onepz > 0)
    flags[bad_kin] |= PreparationFlag.BAD_KINEMATICS
    too_high = ~bad_kin & (sig >= sig_t)
    flags[too_high] |= PreparationFlag.SIGMA_TOO_HIGH
    with np.errstate(invalid="ignore"):
        sig_broad = np.where(bad_kin | too_high, 0.0, np.sqrt(np.maximum(sig_t**2 - sig**2, 0)))

    good = np.flatnonzero(~bad_kin)
    need_lo = edges_out[0] * onepz[good]
    need_hi = edges_out[-1] * onepz[good]
    outside = (need_lo < edges_in[0]) | (need_hi > edges_in[-1])
    if outside.any():
        bad = good[outside]
        k = bad[0]
        msg = (f"{bad.size} of {n_spec} spectra cannot be moved to the rest frame: at velocity "
               f"{v[k]:.1f} km/s (spectrum {k}) the rest-frame range "
               f"{edges_out[0]:.2f}-{edges_out[-1]:.2f} A needs observed wavelengths "
               f"{edges_out[0] * onepz[k]:.2f}-{edges_out[-1] * onepz[k]:.2f} A, but the spectra "
               f"cover only {edges_in[0]:.2f}-{edges_in[-1]:.2f} A. Check the velocities "
               "(km/s, systemic velocity included) or use a smaller output_wavelength range.")
        raise CubeSFHError(msg)

    valid = np.isfinite(flux2)
    if var2 is not None:
        valid &= np.isfinite(var2)
    out = np.full((n_spec, n_out), np.nan)
    vout = None if var2 is None else np.full((n_spec, n_out), np.nan)
    # redshift correction of the LSF: sigma_LSF(rest)^2 - sigma_LSF(observed)^2 (km/s),
    # where positive, added to the kernel of each spectrum block by block
    match = match_lsf and lsf is not None
    if match:
        from .lsf import fwhm_to_velocity_sigma

        def lsf_kms(wave):
            return fwhm_to_velocity_sigma(u.Quantity(lsf(wave * u.AA), u.AA),
                                          wave * u.AA).to_value(u.km / u.s)

        rest_lsf2 = lsf_kms(out_lam) ** 2
    if good.size:
        extra_max = np.max(rest_lsf2) if match else 0.0  # bounds the correction
        s_max = (np.sqrt(np.max(sig_broad[good]) ** 2 + extra_max) / _C_KMS
                 * edges_out[-1] * np.max(onepz[good]))
        width = int((np.max(np.diff(edges_out)) * np.max(onepz[good]) + 2 * _TRUNCATE * s_max)
                    / np.min(np.diff(edges_in))) + 3
        step = _block_size(n_out, width)
        # blocks of similar kernel width keep the work arrays narrow
        order = good[np.argsort(sig_broad[good], kind="stable")]
        blocks = [order[i:i + step] for i in range(0, order.size, step)]
        for sel in progress(blocks, enabled=progress_bar, desc="Preparing spectra",
                            unit="block"):
            zf = onepz[sel][:, None]
            lo = edges_out[:-1] * zf
            hi = edges_out[1:] * zf
            extra2 = (np.clip(rest_lsf2 - lsf_kms(out_lam * zf) ** 2, 0.0, None) if match
                      else 0.0)
            s = out_lam * zf * (np.sqrt(sig_broad[sel][:, None] ** 2 + extra2) / _C_KMS)
            f0 = np.where(valid[sel], flux2[sel], 0.0)
            v0 = None if var2 is None else np.where(valid[sel], var2[sel], 0.0)
            f, var, cov = _transform(edges_in, f0, v0, valid[sel], lo, hi, s)
            missing = ~(cov >= min_coverage)
            f[missing] = np.nan
            out[sel] = f * zf
            if vout is not None:
                var[missing] = np.nan
                vout[sel] = var * zf**2
    flags[~bad_kin & np.isnan(out).any(axis=1)] |= PreparationFlag.MISSING_PIXELS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows -> NaN norm
        norm = np.nanmean(out[:, in_norm], axis=1)
    bad_norm = ~bad_kin & ~(norm > 0)
    flags[bad_norm] |= PreparationFlag.BAD_NORM
    norm = np.where(norm > 0, norm, np.nan)
    flux_n = out / norm[:, None]
    var_n = None if vout is None else vout / norm[:, None] ** 2

    n_flagged = {f.name: int(np.count_nonzero(flags & f)) for f in PreparationFlag}
    if any(n_flagged.values()):
        parts = ", ".join(f"{n} {name}" for name, n in n_flagged.items() if n)
        msg = (f"Of {n_spec} spectra, flagged: {parts}. SIGMA_TOO_HIGH spectra (sigma >= "
               f"{np.max(sig_t):g} km/s) are not broadened and stay broader than the network's "
               "training spectra; the others are incomplete (NaN). See PreparedSpectra.flags.")
        warnings.warn(msg, CubeSFHWarning)

    return PreparedSpectra(
        u.Quantity(output_wavelength, u.AA), flux_n, var_n, norm * unit, flags,
        velocity=v * (u.km / u.s), sigma=sig * (u.km / u.s),
        sigma_broad=sig_broad * (u.km / u.s), redshift=onepz - 1.0,
        sigma_target=(sig_t[0] if np.all(sig_t == sig_t[0]) else sig_t) * (u.km / u.s),
        norm_window=u.Quantity(norm_window, u.AA),
        lsf=lsf, lsf_matched=bool(match_lsf and lsf is not None))
