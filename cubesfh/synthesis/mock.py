# Licensed under a 3-clause BSD style license - see LICENSE
"""
Mock MUSE + HST observations of a small galaxy with known star formation histories.

:func:`mock_observation` writes, in real file formats, what an observer of a
nearby spiral would have: a MUSE cube (``DATA`` + ``STAT``, ESO keywords,
celestial WCS, air wavelengths 4750-7100 A at 1.25 A, stretched by the extra
(1 + z) beyond 700 km/s), five drizzled
WFC3/UVIS images (``SCI`` in e-/s with ``PHOTFLAM``/``PHOTPLAM``, ``WHT``,
0.04 arcsec pixels on their own WCS) and a truth file holding, for every
spaxel, what the network should recover: light- and mass-weighted ages and
metallicities, the star formation history in the 16 age bins, the
age-metallicity relation, the kinematics and the masses of the components.

The galaxy is the sum of three stellar components, each a spatial mass map
times one population computed with the project's forward model
(:class:`~cubesfh.synthesis.ForwardModel`: chemical evolution of eq. 2,
Charlot & Fall dust, nebular emission):

* **bulge**: old and metal-rich; skew-normal SFH peaked 11.5 Gyr ago,
  eq. 2 enrichment up to Z = 0.04 (2 Z_sun); Sersic n = 2 profile; little dust.
* **disc**: extended GP-SFH (25/50/75 % of the mass formed 3.5/7/10.5 Gyr
  after the Big Bang, sSFR = 3e-11 / yr), enriched to Z = 0.016; exponential
  profile; Charlot & Fall (2000) fiducial dust.
* **arms**: a recent burst (Gaussian in look-back time, 30 +- 40 Myr) at the
  disc's present-day metallicity on two logarithmic spiral arms, a few per
  cent of the local disc mass, with dusty birth clouds and nebular emission.

Each spaxel's spectrum is ``sum_c M_c(x, y) S_c(lambda)`` (``M_c`` the mass
formed by component ``c`` in the spaxel, ``S_c`` its rest-frame spectrum per
solar mass at the template resolution), observed with
:func:`cubesfh.datasets.broaden_and_shift` at the spaxel's velocity and
dispersion, so the truth of every spaxel is that of its mixture of
populations.
"""

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from scipy import special
from scipy.ndimage import gaussian_filter

from ..conventions import AGE_BIN_CENTERS, AGE_BIN_EDGES, HST_BANDS, N_AGE_BINS, SNR_WINDOW, Z_SUN
from ..datasets import (
    HST_SCALE,
    MUSE_SCALE,
    PHOTFLAM,
    _hst_wcs,
    _muse_wavelength,
    _muse_wcs,
    _noise_coefficients,
    _write_hst_image,
    _write_muse_cube,
    broaden_and_shift,
)
from ..io.muse import parse_flux_unit
from ..lsf import FWHM_TO_SIGMA
from ..utils import CubeSFHError, atomic_write, progress
from .model import ForwardModel, metallicity_history
from .sfh import SFHParameters, gp_sfh, skewnormal_sfh

__all__ = [
    "AO_NOTCH",
    "MOCK_COMPONENTS",
    "MockComponent",
    "MockObservation",
    "mock_components",
    "mock_observation",
    "read_mock_truth",
]

log = logging.getLogger(__name__)

#: Names of the stellar components of the mock galaxy (each has its own spatial map).
MOCK_COMPONENTS = ("bulge", "disc", "arms")

#: Flux unit of the generated cube (per spaxel).
FLUX_UNIT = u.Unit(1e-20 * u.erg / u.s / u.cm**2 / u.AA)

# --- geometry (lengths in units of the field radius R_f = half the shorter side) -------
INCLINATION = 45.0 * u.deg  #: inclination of the disc
POSITION_ANGLE = 30.0 * u.deg  #: of the major axis, east of north
_BULGE_RE = 0.18  # effective radius
_BULGE_N = 2.0  # Sersic index
_BULGE_Q = 0.8  # projected axis ratio
_BULGE_CORE = 0.2  # softening radius (in units of the effective radius)
_BULGE_SIGMA_E = 6000.0  # M_sun / pc2 at the effective radius
_DISC_H = 0.45  # exponential scale length
_DISC_SIGMA0 = 1000.0  # central M_sun / pc2
_ARM_FRACTION = 0.05  # young mass / disc mass on the arm crests
_ARM_PITCH = 20.0  # degrees
_ARM_INNER = 0.3  # radius where the arms start
_ARM_POWER = 8  # sharpness of the arms
# --- kinematics ------------------------------------------------------------------------
_VMAX = 150.0  # km/s, flat part of the rotation curve
_R_TURN = 0.15  # turnover radius of the arctan rotation curve
_SIGMA_DISC = 35.0  # km/s in the outer disc
_SIGMA_BULGE = 95.0  # km/s added in the centre (total 130 km/s there)
_R_SIGMA = 0.2  # e-folding radius of the central dispersion excess
# --- HST noise: exposure time (s) and sky + dark background (e-/s per 0.04" pixel) ---
_HST_EXPTIME = {"F275W": 2200.0, "F336W": 1100.0, "F438W": 900.0, "F555W": 700.0,
                "F814W": 800.0}
_HST_BACKGROUND = {"F275W": 0.002, "F336W": 0.004, "F438W": 0.012, "F555W": 0.035,
                   "F814W": 0.03}
_HST_READ_NOISE = 4.4  # e- per drizzled pixel (two exposures of 3.1 e-)
_HST_MARGIN = 1.0  # arcsec of HST field beyond the cube on each side (at least 2 MUSE FWHM)
# --- foreground star -------------------------------------------------------------------
_STAR_AGE = 4e9  # yr: template sub-interval used for the star's spectrum
_STAR_Z = 0.02
_STAR_VELOCITY = 15.0  # km/s (Milky Way star)
_STAR_FLUX = 20.0  # total flux in the S/N window / that of the brightest galaxy spaxel
_OVERSAMPLE = 5  # sub-spaxels per spaxel side for the MUSE maps (0.04 arcsec)
_CHUNK = 256  # spaxels observed at a time


@dataclass(eq=False)
class MockComponent:
    """
    One stellar population of the mock galaxy.

    Parameters
    ----------
    name : str
        ``'bulge'``, ``'disc'`` or ``'arms'`` (selects the spatial map).
    mass : `~numpy.ndarray`
        Mass formed in each age sub-interval of the template library
        (:attr:`~cubesfh.templates.TemplateLibrary.age_edges`, youngest
        first), normalised to 1 solar mass.
    metallicity : `~numpy.ndarray`
        Metal mass fraction Z of the stars formed in each sub-interval.
    tau_ism, tau_bc : float
        Diffuse and birth-cloud optical depths at 5500 A (eq. 1).
    description : str, optional
        One line for the truth-file header.
    """

    name: str
    mass: np.ndarray
    metallicity: np.ndarray
    tau_ism: float
    tau_bc: float
    description: str = ""


@dataclass(eq=False)
class MockObservation:
    """
    Files and truth of a mock observation (returned by `mock_observation`).

    Attributes
    ----------
    cube_path : `~pathlib.Path`
        MUSE cube (read it with ``Cube.read``).
    hst_paths : dict
        Band name -> HST image path (read with ``HSTImage.read``).
    truth_path : `~pathlib.Path`
        Truth file (read it back with `read_mock_truth`).
    truth : dict
        The truth maps, keyed by the lower-case extension names of the truth
        file (see `read_mock_truth`).
    components : dict
        Component name -> `MockComponent` used.
    celestial_wcs : `~astropy.wcs.WCS`
        Celestial WCS of the cube and of the truth maps.
    """

    cube_path: Path
    hst_paths: dict
    truth_path: Path
    truth: dict = field(default_factory=dict, repr=False)
    components: dict = field(default_factory=dict, repr=False)
    celestial_wcs: WCS = field(default=None, repr=False)


# ----------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------

def mock_components(library=None):
    """
    The three stellar populations of the mock galaxy.

    Parameters
    ----------
    library : `~cubesfh.templates.TemplateLibrary`, optional
        Defines the age sub-intervals (default: the shipped library).

    Returns
    -------
    components : dict
        ``'bulge'``, ``'disc'``, ``'arms'`` -> `MockComponent`:

        * bulge: skew-normal SFH (peak 11.5 Gyr ago, width 1.2 Gyr, skewness
          0.5), eq. 2 metallicities from Z = 0.008 to 0.04, tau_ISM = 0.15,
          tau_BC = 0.5;
        * disc: GP-SFH with t_25, t_50, t_75 = 3.5, 7, 10.5 Gyr (cosmic time)
          and sSFR = 3e-11 / yr, eq. 2 metallicities from 0.008 to 0.016,
          tau_ISM = 0.3, tau_BC = 1 (the Charlot & Fall 2000 fiducial values);
        * arms: burst with SFR(t) proportional to a Gaussian of look-back time
          centred at 30 Myr with sigma = 40 Myr (truncated at t = 0), all at
          the disc's present-day Z = 0.016; tau_ISM = 0.6, tau_BC = 1.5.
    """
    if library is None:
        from ..templates import TemplateLibrary

        library = TemplateLibrary.load()
    edges = library.age_edges.to_value(u.yr)

    bulge = skewnormal_sfh(SFHParameters(
        peak=np.array([11.5]), width=np.array([1.2]), skewness=np.array([0.5]),
        has_burst=np.array([False]), burst_age=np.array([np.nan]),
        burst_width=np.array([np.nan]), burst_fraction=np.array([0.0])), edges)
    disc = gp_sfh(SFHParameters(t25=np.array([3.5]), t50=np.array([7.0]),
                                t75=np.array([10.5]), ssfr=np.array([3e-11])), edges)
    cdf = special.ndtr((edges / 1e9 - 0.030) / 0.040)
    arms = np.diff(cdf)[None, :]
    arms /= arms.sum()
    z_disc = 0.016
    return {
        "bulge": MockComponent(
            "bulge", bulge[0], metallicity_history(bulge, np.array([0.04]))[0], 0.15, 0.5,
            "old metal-rich bulge: skew-normal SFH 11.5 Gyr, Z 0.008->0.04"),
        "disc": MockComponent(
            "disc", disc[0], metallicity_history(disc, np.array([z_disc]))[0], 0.3, 1.0,
            "disc: GP-SFH t25/50/75 = 3.5/7/10.5 Gyr, sSFR 3e-11/yr, Z 0.008->0.016"),
        "arms": MockComponent(
            "arms", arms[0], np.full(arms.shape[1], z_disc), 0.6, 1.5,
            "spiral arms: burst 30 +- 40 Myr ago at Z = 0.016"),
    }


def _component_quantities(model, comps, bands, redshift):
    """Spectra, photometry and label ingredients of each component (per M_sun formed)."""
    lib = model.library
    mass = np.stack([c.mass for c in comps])
    z = np.stack([c.metallicity for c in comps])
    tau_ism = np.array([c.tau_ism for c in comps], float)
    tau_bc = np.array([c.tau_bc for c in comps], float)
    native = model.synthesize_native(mass, z, tau_ism, tau_bc, gas_sigma=0 * u.km / u.s)
    # HST fluxes of the observed (redshifted) SEDs: f_obs(l) = f_rest(l / (1 + z)) / (1 + z)
    from ..templates import load_filters

    observed = copy.copy(model)
    shifted = lib.sed_wavelength * (1 + redshift)
    observed.band_weights = np.stack([f.weights(shifted) for f in load_filters(bands)],
                                     axis=1) / (1 + redshift)
    _, phot = observed.synthesize(mass, z, tau_ism, tau_bc)

    # label ingredients, per sub-interval (as in ForwardModel.labels)
    coef = model.coefficients(mass, z)  # (n_comp, n_z, n_age)
    living = np.einsum("cza,za->ca", coef, lib.living_fraction)
    light = np.einsum("cza,za->ca", coef, model.v_light)
    dur = np.diff(lib.age_edges.to_value(u.yr))
    # empty bins take the eq. 2 metallicity through a negligible weight (as in labels())
    wgt = living + 1e-12 * dur[None, :] * living.sum(axis=1, keepdims=True) / dur.sum()
    zh = np.log10(z / Z_SUN)
    bins = np.zeros((N_AGE_BINS, lib.n_age))
    bins[lib.age_bin, np.arange(lib.n_age)] = 1.0
    budget = model.stellar_budget(mass, z, tau_ism, tau_bc)
    return {
        "native": native,
        "photometry": phot,
        "present_total": budget["living"] + budget["remnants"],
        "v_intrinsic": budget["v_intrinsic"],
        "v_attenuated": budget["v_attenuated"],
        "living_bin": living @ bins.T,
        "light_bin": light @ bins.T,
        "zweight_bin": wgt @ bins.T,
        "zh_weighted_bin": (wgt * zh) @ bins.T,
        "living_total": living.sum(axis=1),
    }


def _combined_labels(weights, q):
    """
    Truth of spaxels holding several populations (eqs. 6-7).

    ``weights`` (n, n_comp) are the masses formed by each component. Living
    mass and V-band light per age bin add linearly; the [Z/H] of a bin is the
    living-mass-weighted mean over all the stars of the bin.
    """
    living = weights @ q["living_bin"]
    light = weights @ q["light_bin"]
    mf = living / living.sum(axis=1, keepdims=True)
    lf = light / light.sum(axis=1, keepdims=True)
    zbin = (weights @ q["zh_weighted_bin"]) / (weights @ q["zweight_bin"])
    la = np.log10(AGE_BIN_CENTERS.to_value(u.yr))
    return {
        "logage_lw": lf @ la,
        "logage_mw": mf @ la,
        "zh_lw": np.sum(lf * zbin, axis=1),
        "zh_mw": np.sum(mf * zbin, axis=1),
        "sfh": mf,
        "zh_age": zbin,
        "living": weights @ q["living_total"],
        "present": weights @ q["present_total"],
        "av_stars": -2.5 * np.log10((weights @ q["v_attenuated"]) / (weights @ q["v_intrinsic"])),
    }


# ----------------------------------------------------------------------------
# Spatial structure
# ----------------------------------------------------------------------------

def _disc_coordinates(dx, dy, rf):
    """Deprojected radius (arcsec) and azimuth of sky offsets (arcsec, x west, y north)."""
    pa = POSITION_ANGLE.to_value(u.rad)
    cos_i = np.cos(INCLINATION.to_value(u.rad))
    s = -dx * np.sin(pa) + dy * np.cos(pa)  # along the major axis
    t = -dx * np.cos(pa) - dy * np.sin(pa)  # along the minor axis
    return s, t, np.hypot(s, t / cos_i), np.arctan2(t / cos_i, s)


def _surface_density(dx, dy, rf):
    """Projected mass surface densities (M_sun / pc2) of the three components."""
    s, t, r, phi = _disc_coordinates(dx, dy, rf)
    re = _BULGE_RE * rf
    b_n = special.gammaincinv(2 * _BULGE_N, 0.5)
    rb = np.sqrt(s**2 + (t / _BULGE_Q) ** 2 + (_BULGE_CORE * re) ** 2)
    bulge = _BULGE_SIGMA_E * np.exp(-b_n * ((rb / re) ** (1 / _BULGE_N) - 1))
    disc = _DISC_SIGMA0 * np.exp(-r / (_DISC_H * rf))
    r_safe = np.maximum(r, 1e-3 * rf)
    phase = 2 * (phi - np.log(r_safe / (_ARM_INNER * rf)) / np.tan(np.deg2rad(_ARM_PITCH)))
    pattern = (0.5 * (1 + np.cos(phase))) ** _ARM_POWER
    envelope = special.expit((r - _ARM_INNER * rf) / (0.05 * rf))
    arms = _ARM_FRACTION * disc * pattern * envelope
    return {"bulge": bulge, "disc": disc, "arms": arms}


def _kinematics(dx, dy, rf, v_sys):
    """Line-of-sight velocity and dispersion (km/s) at sky offsets."""
    _, _, r, phi = _disc_coordinates(dx, dy, rf)
    v_rot = _VMAX * 2 / np.pi * np.arctan(r / (_R_TURN * rf))
    velocity = v_sys + v_rot * np.sin(INCLINATION.to_value(u.rad)) * np.cos(phi)
    sigma = _SIGMA_DISC + _SIGMA_BULGE * np.exp(-r / (_R_SIGMA * rf))
    return velocity, sigma


def _muse_mass_maps(shape, names, rf, pc_per_arcsec, psf_fwhm):
    """
    Mass formed per spaxel by each component, seen through the MUSE PSF.

    The surface densities are sampled on sub-spaxels of 0.04 arcsec (over a
    margin of two PSF FWHM around the field, so light from outside is
    scattered in), convolved with the Gaussian PSF and summed back to spaxels.
    """
    ny, nx = shape
    k = _OVERSAMPLE
    pad = int(np.ceil(2 * psf_fwhm / MUSE_SCALE)) + 1
    x0, y0 = (nx - 1) / 2, (ny - 1) / 2
    xs = (np.arange((nx + 2 * pad) * k) + 0.5) / k - 0.5 - pad
    ys = (np.arange((ny + 2 * pad) * k) + 0.5) / k - 0.5 - pad
    dx = ((xs - x0) * MUSE_SCALE)[None, :]
    dy = ((ys - y0) * MUSE_SCALE)[:, None]
    dens = _surface_density(dx, dy, rf)
    area = (MUSE_SCALE / k * pc_per_arcsec) ** 2  # pc2 per sub-spaxel
    sigma = psf_fwhm / (MUSE_SCALE / k) * FWHM_TO_SIGMA
    maps = {}
    for name in names:
        m = gaussian_filter(np.broadcast_to(dens[name], (ys.size, xs.size)) * area, sigma,
                            mode="constant", truncate=5.0)
        m = m.reshape(ny + 2 * pad, k, nx + 2 * pad, k).sum(axis=(1, 3))
        maps[name] = m[pad:pad + ny, pad:pad + nx]
    return maps


def _gaussian_pixel_fractions(shape, x, y, sigma):
    """Fraction of a Gaussian point source (centre x, y, pixels) falling in each pixel."""
    ny, nx = shape
    ex = special.ndtr((np.arange(nx + 1) - 0.5 - x) / sigma)
    ey = special.ndtr((np.arange(ny + 1) - 0.5 - y) / sigma)
    return np.outer(np.diff(ey), np.diff(ex))


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------

def _quantity(value, unit, name, example, *, positive=True):
    try:
        q = u.Quantity(value)
        q = q.to(unit)
    except (u.UnitsError, TypeError, ValueError):
        msg = f"{name}={value!r} must be a Quantity in {unit} units, e.g. {name}={example}."
        raise CubeSFHError(msg) from None
    if not q.isscalar or not np.isfinite(q.value) or (positive and not q.value > 0):
        what = "positive scalar" if positive else "finite scalar"
        msg = f"{name}={value!r} must be a {what}, e.g. {name}={example}."
        raise CubeSFHError(msg)
    return q


def _check_inputs(shape, snr, bands, components, star):
    try:
        ny, nx = (int(n) for n in shape)
    except (TypeError, ValueError):
        msg = f"shape={shape!r} must be a pair of integers (ny, nx), e.g. shape=(40, 40)."
        raise CubeSFHError(msg) from None
    if ny < 4 or nx < 4:
        msg = f"shape={shape!r} is too small; give at least 4 x 4 spaxels, e.g. shape=(40, 40)."
        raise CubeSFHError(msg)
    if not (np.isscalar(snr) and np.isfinite(snr) and snr > 0):
        msg = f"snr={snr!r} must be a positive number (S/N per Angstrom), e.g. snr=50."
        raise CubeSFHError(msg)
    if isinstance(bands, str):
        bands = (bands,)
    bands = tuple(str(b).upper() for b in bands)
    unknown = [b for b in bands if b not in HST_BANDS]
    if unknown or not bands or len(set(bands)) != len(bands):
        msg = f"bands={bands!r} must be distinct names among {HST_BANDS}."
        raise CubeSFHError(msg)
    if isinstance(components, str):
        components = (components,)
    names = tuple(components)  # the keys of a dict
    bad = [n for n in names if n not in MOCK_COMPONENTS]
    if bad or not names or len(set(names)) != len(names):
        msg = (f"components={names!r} must be distinct names among {MOCK_COMPONENTS} (or a "
               "dict of them -> MockComponent); each name selects a spatial map.")
        raise CubeSFHError(msg)
    if star is not False and star is not None and star is not True:
        try:
            sx, sy = (float(v) for v in star)
        except (TypeError, ValueError):
            msg = (f"star={star!r} must be True, False or a pixel position (x, y) in the "
                   "cube, e.g. star=(30.0, 8.0).")
            raise CubeSFHError(msg) from None
        if not (-0.5 <= sx <= nx - 0.5 and -0.5 <= sy <= ny - 0.5):
            msg = f"star={star!r} lies outside the {ny} x {nx} cube; give a position inside it."
            raise CubeSFHError(msg)
        star = (sx, sy)
    return (ny, nx), float(snr), bands, names, star


def _check_component(name, comp, n_age):
    """Validate a user-supplied `MockComponent`; return it with its mass normalised to 1."""
    how = ("build it like those of mock_components(): mass formed and Z per age "
           f"sub-interval of the template library ({n_age} values each)")
    if not isinstance(comp, MockComponent):
        msg = f"components[{name!r}] is a {type(comp).__name__}, not a MockComponent; {how}."
        raise CubeSFHError(msg)
    mass = np.asarray(comp.mass, dtype=float)
    z = np.asarray(comp.metallicity, dtype=float)
    if mass.shape != (n_age,) or z.shape != (n_age,):
        msg = (f"components[{name!r}] has mass of shape {mass.shape} and metallicity of shape "
               f"{z.shape}; {how}.")
        raise CubeSFHError(msg)
    if not (np.all(np.isfinite(mass)) and np.all(mass >= 0) and mass.sum() > 0):
        msg = f"components[{name!r}].mass must be finite, non-negative and not all zero."
        raise CubeSFHError(msg)
    if not (np.all(np.isfinite(z)) and np.all(z > 0)):
        msg = f"components[{name!r}].metallicity must be positive metal fractions Z (e.g. 0.02)."
        raise CubeSFHError(msg)
    if not (comp.tau_ism >= 0 and comp.tau_bc >= 0):
        msg = f"components[{name!r}] needs non-negative tau_ism and tau_bc."
        raise CubeSFHError(msg)
    return dataclasses.replace(comp, name=name, mass=mass / mass.sum(), metallicity=z)


# ----------------------------------------------------------------------------
# Main entry point
# ----------------------------------------------------------------------------

#: Observed wavelengths blocked by the sodium laser notch filter of MUSE WFM-AO
#: (the WFM-AO-E setting; WFM-AO-N blocks a slightly narrower range).
AO_NOTCH = [5780.0, 6050.0] * u.AA


def mock_observation(directory, *, shape=(40, 40), seed=0, snr=50.0, distance=10 * u.Mpc,
                     systemic_velocity=700 * u.km / u.s, muse_psf_fwhm=0.7 * u.arcsec,
                     hst_psf_fwhm=None, bands=HST_BANDS, components=MOCK_COMPONENTS,
                     star=False, noise=True, ao_notch=False, library=None, overwrite=False,
                     progress_bar=True):
    """
    Write a mock MUSE cube, HST images and truth file of a small galaxy.

    The galaxy (bulge, disc and spiral arms, see `mock_components`) is
    scaled to the field: lengths are fractions of the field radius R_f (half
    the shorter side of the cube, 0.2 arcsec spaxels). The disc is inclined
    by 45 degrees with its major axis at position angle 30 degrees.

    * **Spectra.** The mass formed by each component in each spaxel is its
      surface density integrated over 0.04 arcsec sub-spaxels, convolved with
      a Gaussian MUSE PSF and summed to spaxels. Convolving the mass maps
      rather than the cube plane by plane neglects beam smearing of the
      kinematics: each spaxel's spectrum is ``sum_c M_c S_c`` observed at the
      spaxel's own velocity and dispersion with
      :func:`~cubesfh.datasets.broaden_and_shift` (MUSE line-spread function,
      flux-conserving resampling). Nebular lines move and broaden with the
      stars, as in the training set.
    * **Kinematics.** Arctan rotation curve (150 km/s, turnover at 0.15
      R_f) projected on the line of sight, plus ``systemic_velocity``;
      dispersion 35 km/s plus 95 km/s exp(-R / 0.2 R_f) (130 km/s in the
      centre, below the 150 km/s of the network inputs).
    * **Noise.** Gaussian with variance ``a * flux + b`` (photon noise plus a
      floor, ``b = (0.003 F_max)**2``), ``a`` set so that the brightest
      spaxel has S/N ``snr`` per Angstrom in 5300-5500 A (observed; the
      convention of :meth:`cubesfh.Cube.signal_noise`), falling outwards.
      ``STAT`` is exactly this variance.
    * **HST images.** The same surface densities on a north-up 0.04 arcsec
      grid (wider than the cube by 1 arcsec or 2 MUSE PSF FWHM, whichever is
      larger, on each side; pixel centres offset from the cube's), times
      each component's mean flux through the band (observed frame at the
      systemic velocity), convolved with a Gaussian PSF of
      ``hst_psf_fwhm``; converted to e-/s with ``PHOTFLAM``; noise from the
      source counts, sky and read-out for typical PHANGS-HST exposure times.

    Parameters
    ----------
    directory : str or `~pathlib.Path`
        Output folder (created). Files: ``mock_muse_cube.fits``,
        ``mock_hst_<band>.fits``, ``mock_truth.fits``.
    shape : tuple of int, optional
        ``(ny, nx)`` spaxels of the cube.
    seed : int, optional
        Seed of the noise (the galaxy itself is deterministic).
    snr : float, optional
        S/N per Angstrom in 5300-5500 A of the brightest spaxel.
    distance : `~astropy.units.Quantity`, optional
        Distance; sets the physical size of a spaxel, hence the masses. The
        surface brightness does not depend on it.
    systemic_velocity : `~astropy.units.Quantity`, optional
        Systemic line-of-sight velocity.
    muse_psf_fwhm : `~astropy.units.Quantity`, optional
        FWHM of the Gaussian MUSE PSF (header keywords ``PSFFWHM``, ``FWHM``,
        ``SKY_RES``).
    hst_psf_fwhm : `~astropy.units.Quantity` or dict, optional
        FWHM of the HST PSF, one value or one per band; default
        :data:`cubesfh.hst.DEFAULT_PSF_FWHM` (about 0.08 arcsec).
    bands : sequence of str, optional
        HST bands to write (default the five PHANGS-HST bands).
    components : sequence of str or dict, optional
        Components to include (default all three), or a dict name ->
        `MockComponent` to change their populations. ``components=('bulge',)``
        gives a single-population galaxy with the bulge's truth everywhere.
    star : bool or tuple of float, optional
        Add a foreground star (point source in the cube and the images, the
        spectrum of a 4 Gyr solar population at +15 km/s) at a default
        position (`True`) or at pixel ``(x, y)`` of the cube. The truth maps
        describe the galaxy only; extension ``STAR`` of the truth file gives
        the star's fraction of the flux per spaxel, for masking.
    noise : bool, optional
        Add noise to the cube and the images. With `False` the files hold
        the noise-free model (``STAT`` is still the variance the noise would
        have).
    ao_notch : bool, optional
        Write the cube as a MUSE WFM-AO cube: no data (NaN in ``DATA`` and
        ``STAT``) over the sodium laser notch, observed `AO_NOTCH` (5780-6050
        A, the WFM-AO-E filter), in every spaxel.
    library : `~cubesfh.templates.TemplateLibrary`, optional
        The SSP library the galaxy is made of (default: the shipped BC03
        grid). A library the networks never saw, e.g.
        ``with_young_from_bc03(load_heldout_library())``, makes a mock for
        the robustness tests (``scripts/mock_age_offset.py --library emiles``).
    overwrite : bool, optional
        Replace existing files.
    progress_bar : bool, optional
        Show a progress bar.

    Returns
    -------
    obs : `MockObservation`

    Raises
    ------
    CubeSFHError
        For invalid parameters.
    OSError
        If a file exists and ``overwrite`` is `False`.
    """
    from ..hst import DEFAULT_PSF_FWHM
    from ..templates import TemplateLibrary

    shape, snr, bands, names, star = _check_inputs(shape, snr, bands, components, star)
    distance = _quantity(distance, u.Mpc, "distance", "10 * u.Mpc")
    v_sys = _quantity(systemic_velocity, u.km / u.s, "systemic_velocity", "700 * u.km / u.s",
                      positive=False).value
    muse_fwhm = _quantity(muse_psf_fwhm, u.arcsec, "muse_psf_fwhm", "0.7 * u.arcsec").value
    if hst_psf_fwhm is None:
        hst_fwhm = {b: DEFAULT_PSF_FWHM[b] for b in bands}
    elif isinstance(hst_psf_fwhm, dict):
        missing = [b for b in bands if b not in hst_psf_fwhm]
        if missing:
            msg = f"hst_psf_fwhm has no value for {missing}; give one for every band."
            raise CubeSFHError(msg)
        hst_fwhm = {b: _quantity(hst_psf_fwhm[b], u.arcsec, "hst_psf_fwhm", "0.08 * u.arcsec")
                    for b in bands}
    else:
        q = _quantity(hst_psf_fwhm, u.arcsec, "hst_psf_fwhm", "0.08 * u.arcsec")
        hst_fwhm = dict.fromkeys(bands, q)

    directory = Path(directory)
    paths = {"cube": directory / "mock_muse_cube.fits",
             "truth": directory / "mock_truth.fits",
             **{b: directory / f"mock_hst_{b.lower()}.fits" for b in bands}}
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            msg = (f"{', '.join(existing)} already exist(s); pass overwrite=True to replace, or "
                   "choose another directory.")
            raise OSError(msg)
    directory.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    lib = TemplateLibrary.load() if library is None else library
    model = ForwardModel(lib, bands=bands)
    if isinstance(components, dict):
        comps = [_check_component(n, components[n], lib.n_age) for n in names]
    else:
        defaults = mock_components(lib)
        comps = [defaults[n] for n in names]
    redshift = v_sys / 299792.458
    q = _component_quantities(model, comps, bands, redshift)

    ny, nx = shape
    n = ny * nx
    rf = 0.5 * min(ny, nx) * MUSE_SCALE  # field radius, arcsec
    pc_per_arcsec = distance.to_value(u.pc) * np.pi / 648000.0
    lum_to_flux = (1 * u.solLum / (4 * np.pi * distance**2)).to_value(
        u.erg / u.s / u.cm**2) / FLUX_UNIT.to(u.erg / u.s / u.cm**2 / u.AA)

    # --- maps ------------------------------------------------------------------------
    mass_maps = _muse_mass_maps(shape, names, rf, pc_per_arcsec, muse_fwhm)
    weights = np.stack([mass_maps[nm].ravel() for nm in names], axis=1)  # (n, n_comp)
    x0, y0 = (nx - 1) / 2, (ny - 1) / 2
    yy, xx = np.mgrid[0:ny, 0:nx]
    velocity, sigma = _kinematics((xx - x0) * MUSE_SCALE, (yy - y0) * MUSE_SCALE, rf, v_sys)

    # --- spectra -----------------------------------------------------------------------
    wave = _muse_wavelength(redshift)
    model_cube = np.empty((wave.size, n), dtype=np.float32)
    native = q["native"] * lum_to_flux
    starts = range(0, n, _CHUNK)
    for i0 in progress(starts, enabled=progress_bar, desc="mock spectra", total=len(starts)):
        sl = slice(i0, min(n, i0 + _CHUNK))
        model_cube[:, sl] = broaden_and_shift(
            lib.wavelength, weights[sl] @ native, velocity.ravel()[sl] * u.km / u.s,
            sigma.ravel()[sl] * u.km / u.s, wave, template_fwhm=lib.fwhm).T
    win = (wave >= SNR_WINDOW[0]) & (wave <= SNR_WINDOW[1])
    window_flux = model_cube[win].mean(axis=0, dtype=np.float64)
    f_max = float(window_flux.max())

    star_fraction = None
    star_info = None
    if star is not False and star is not None:
        sx, sy = (0.8 * (nx - 1), 0.2 * (ny - 1)) if star is True else star
        zi = int(np.argmin(np.abs(lib.metallicity - _STAR_Z)))
        ai = int(np.argmin(np.abs(np.log10(lib.ages.to_value(u.yr) / _STAR_AGE))))
        star_spec = broaden_and_shift(lib.wavelength, lib.flux[zi, ai][None].astype(float),
                                      [_STAR_VELOCITY] * u.km / u.s, [0.0] * u.km / u.s,
                                      wave, template_fwhm=lib.fwhm)[0]
        scale_star = _STAR_FLUX * f_max / star_spec[win].mean()
        frac = _gaussian_pixel_fractions(shape, sx, sy,
                                         muse_fwhm / MUSE_SCALE * FWHM_TO_SIGMA).ravel()
        star_cube = (scale_star * star_spec)[:, None] * frac[None, :]
        star_fraction = (star_cube[win].mean(axis=0)
                         / (star_cube[win].mean(axis=0) + window_flux)).reshape(shape)
        model_cube += star_cube.astype(np.float32)
        from ..templates import load_filters

        z_star = _STAR_VELOCITY / 299792.458
        sed_w = lib.sed_wavelength * (1 + z_star)
        star_phot = np.array([lib.sed_flux[zi, ai] @ f.weights(sed_w)
                              for f in load_filters(bands)]) * scale_star / (1 + z_star)
        star_info = (sx, sy, star_phot)

    # --- noise -------------------------------------------------------------------------
    a, b = _noise_coefficients(f_max, snr)
    variance = a * np.clip(model_cube, 0, None) + np.float32(b)
    if noise:
        data = model_cube + rng.standard_normal(model_cube.shape, dtype=np.float32) * np.sqrt(
            variance)
    else:
        data = model_cube
    data = data.reshape(wave.size, ny, nx)
    variance = variance.reshape(wave.size, ny, nx)
    if ao_notch:
        lo, hi = AO_NOTCH.to_value(u.AA)
        notch = (wave.to_value(u.AA) >= lo) & (wave.to_value(u.AA) <= hi)
        data = np.array(data, copy=True)  # not a view of the model
        data[notch] = np.nan
        variance[notch] = np.nan

    w3 = _muse_wcs(shape, scale=MUSE_SCALE, wave0=wave[0].to_value(u.AA))
    celestial = w3.celestial
    cards = [
        ("ORIGIN", "cubesfh", "cubesfh.synthesis.mock_observation"),
        ("PRODCATG", "SCIENCE.CUBE.IFS", "ESO Phase 3 product category"),
        ("SKY_RES", muse_fwhm, "[arcsec] spatial resolution (PSF FWHM)"),
        ("WAVELMIN", float(wave[0].to_value(u.nm)), "[nm] minimum wavelength"),
        ("WAVELMAX", float(wave[-1].to_value(u.nm)), "[nm] maximum wavelength"),
        ("SPEC_BIN", float((wave[1] - wave[0]).to_value(u.nm)), "[nm] wavelength bin"),
        ("SPEC_RES", 3000.0, "spectral resolving power (approximate)"),
        ("HIERARCH ESO OBS TARG NAME", "cubesfh-mock", "target name"),
        ("CSFHSEED", int(seed), "seed of the noise"),
        ("CSFHSNR", snr, "S/N per A (5300-5500 A), brightest spaxel"),
        ("CSFHNOIS", bool(noise), "noise added to DATA"),
    ]
    if ao_notch:
        cards += [("HIERARCH ESO INS MODE", "WFM-AO-E", "MUSE mode (laser notch)"),
                  ("CSFHAO", True, "NaN over the AO notch, observed 5780-6050 A")]
    _write_muse_cube(paths["cube"], data, variance, w3, psf_fwhm=muse_fwhm * u.arcsec,
                     object_name="cubesfh mock galaxy", truth_name=paths["truth"].name,
                     extra_cards=cards, overwrite=overwrite)
    del data

    # --- HST images --------------------------------------------------------------------
    hst_paths = {}
    # wide enough for matching the images to the MUSE PSF near the cube's edges
    margin = max(_HST_MARGIN, 2 * muse_fwhm)
    hny = int(np.ceil((ny * MUSE_SCALE + 2 * margin) / HST_SCALE))
    hnx = int(np.ceil((nx * MUSE_SCALE + 2 * margin) / HST_SCALE))
    # galaxy centre (the cube's CRVAL) off the pixel centres of the HST grid
    hw = _hst_wcs((hny, hnx), scale=HST_SCALE,
                  crpix=((hnx - 1) / 2 + 1.3, (hny - 1) / 2 + 0.8))
    hpad = int(np.ceil(3 * max(f.to_value(u.arcsec) for f in hst_fwhm.values()) / HST_SCALE))
    hx = np.arange(-hpad, hnx + hpad)
    hy = np.arange(-hpad, hny + hpad)
    hxx, hyy = np.meshgrid(hx, hy)
    ra, dec = hw.wcs_pix2world(hxx, hyy, 0)
    cx, cy = celestial.wcs_world2pix(ra, dec, 0)
    dens = _surface_density((cx - x0) * MUSE_SCALE, (cy - y0) * MUSE_SCALE, rf)
    hst_area = proj_plane_pixel_area(hw) * 3600.0**2  # arcsec2
    hst_mass = np.stack([dens[nm] * hst_area * pc_per_arcsec**2 for nm in names])
    flux_unit_cgs = FLUX_UNIT.to(u.erg / u.s / u.cm**2 / u.AA)
    for j, band in enumerate(progress(bands, enabled=progress_bar, desc="mock HST images")):
        flam = np.tensordot(q["photometry"][:, j], hst_mass, axes=1) * lum_to_flux
        fwhm_pix = hst_fwhm[band].to_value(u.arcsec) / HST_SCALE
        flam = gaussian_filter(flam, fwhm_pix * FWHM_TO_SIGMA, mode="constant", truncate=5.0)
        flam = flam[hpad:hpad + hny, hpad:hpad + hnx]
        if star_info is not None:
            sra, sdec = celestial.wcs_pix2world(star_info[0], star_info[1], 0)
            hsx, hsy = hw.wcs_world2pix(sra, sdec, 0)
            flam = flam + star_info[2][j] * _gaussian_pixel_fractions(
                (hny, hnx), float(hsx), float(hsy), fwhm_pix * FWHM_TO_SIGMA)
        rate = flam * flux_unit_cgs / PHOTFLAM[band]  # e-/s
        t_exp = _HST_EXPTIME[band]
        if noise:
            var_e = (np.clip(rate, 0, None) + _HST_BACKGROUND[band]) * t_exp + _HST_READ_NOISE**2
            rate = rate + rng.standard_normal(rate.shape) * np.sqrt(var_e) / t_exp
        extra = [("EXPTIME", t_exp, "[s] exposure time"),
                 ("TARGNAME", "CUBESFH-MOCK", "target"),
                 ("ORIGIN", "cubesfh", "mock observation")]
        _write_hst_image(paths[band], rate, hw, band=band, psf_fwhm=hst_fwhm[band],
                         weight=np.full((hny, hnx), t_exp), extra_primary=extra,
                         overwrite=overwrite)
        hst_paths[band] = paths[band]

    # --- truth -------------------------------------------------------------------------
    labels = _combined_labels(weights, q)
    truth = {
        "logage_lw": labels["logage_lw"].reshape(shape),
        "logage_mw": labels["logage_mw"].reshape(shape),
        "zh_lw": labels["zh_lw"].reshape(shape),
        "zh_mw": labels["zh_mw"].reshape(shape),
        "v": velocity * u.km / u.s,
        "sigma": sigma * u.km / u.s,
        "sfh": labels["sfh"].T.reshape((N_AGE_BINS, *shape)),
        "zh_age": labels["zh_age"].T.reshape((N_AGE_BINS, *shape)),
    }
    for nm in names:
        truth[f"mass_{nm}"] = mass_maps[nm] * u.solMass
    truth["mass_living"] = labels["living"].reshape(shape) * u.solMass
    # stars + remnants (cubesfh.templates._remnants), and the effective V-band
    # attenuation of the stellar light (cubesfh.physical)
    truth["mass_present"] = labels["present"].reshape(shape) * u.solMass
    truth["av_stars"] = labels["av_stars"].reshape(shape) * u.mag
    truth["hst_flux"] = (weights @ q["photometry"]).T.reshape((len(bands), *shape)) * (
        lum_to_flux * FLUX_UNIT)
    if star_fraction is not None:
        truth["star"] = star_fraction
    _write_truth(paths["truth"], truth, celestial, bands=bands, comps=comps,
                 header_cards=[
                     ("CSFHCUBE", paths["cube"].name, "cube this truth belongs to"),
                     ("DISTANCE", distance.to_value(u.Mpc), "[Mpc] distance"),
                     ("VSYS", v_sys, "[km/s] systemic velocity"),
                     ("PSFFWHM", muse_fwhm, "[arcsec] MUSE PSF FWHM"),
                     ("INCLIN", INCLINATION.to_value(u.deg), "[deg] disc inclination"),
                     ("PA", POSITION_ANGLE.to_value(u.deg), "[deg] major axis, east of north"),
                     ("RFIELD", rf, "[arcsec] field radius (structure unit)"),
                     ("CSFHSNR", snr, "S/N per A of the brightest spaxel"),
                     ("CSFHSEED", int(seed), "seed of the noise"),
                 ] + ([("STARX", star_info[0], "star x (0-based cube pixel)"),
                       ("STARY", star_info[1], "star y (0-based cube pixel)")]
                      if star_info is not None else []),
                 overwrite=overwrite)
    log.info("mock observation in %s: %d x %d spaxels, %d HST bands, components %s",
             directory, ny, nx, len(bands), ", ".join(names))
    return MockObservation(paths["cube"], hst_paths, paths["truth"], truth,
                           dict(zip(names, comps, strict=True)), celestial)


# ----------------------------------------------------------------------------
# Truth file
# ----------------------------------------------------------------------------

#: BUNIT of the truth extensions; the others are in the units given here.
_TRUTH_UNITS = {
    "LOGAGE_LW": "dex(yr)", "LOGAGE_MW": "dex(yr)", "ZH_LW": "dex", "ZH_MW": "dex",
    "V": "km/s", "SIGMA": "km/s", "SFH": "", "ZH_AGE": "dex", "MASS_LIVING": "solMass",
    "HST_FLUX": "10**(-20)*erg/s/cm**2/Angstrom", "STAR": "", "MASS_PRESENT": "solMass",
    "AV_STARS": "mag",
}
_PLANE_AXES = {"SFH": "AGEBIN", "ZH_AGE": "AGEBIN", "HST_FLUX": "BAND"}
_COMMENTS = {
    "LOGAGE_LW": "V-band light-weighted <log10(age/yr)> (eq. 6)",
    "LOGAGE_MW": "living-mass-weighted <log10(age/yr)> (eq. 6)",
    "ZH_LW": "V-band light-weighted <[Z/H]> (eq. 7)",
    "ZH_MW": "living-mass-weighted <[Z/H]> (eq. 7)",
    "V": "line-of-sight stellar velocity",
    "SIGMA": "stellar velocity dispersion",
    "SFH": "living-mass fraction per age bin (AGE_BINS)",
    "ZH_AGE": "living-mass-weighted [Z/H] per age bin",
    "MASS_LIVING": "living stellar mass per spaxel",
    "MASS_PRESENT": "stellar mass per spaxel, living stars + remnants",
    "AV_STARS": "effective V-band (5500 A) attenuation of the stellar light",
    "HST_FLUX": "noise-free HST mean f_lambda per spaxel, MUSE PSF",
    "STAR": "fraction of the 5300-5500 A flux from the star",
}


def _celestial_header(celestial):
    """Header cards of a celestial WCS with a CD matrix (as in the cube)."""
    cd = celestial.pixel_scale_matrix
    header = celestial.to_header()
    for key in list(header):
        if key.startswith(("PC", "CDELT")):
            del header[key]
    for i in range(2):
        for j in range(2):
            header[f"CD{i + 1}_{j + 1}"] = cd[i, j]
    return header


def _write_truth(path, truth, celestial, *, bands, comps, header_cards, overwrite):
    prim = fits.PrimaryHDU()
    ph = prim.header
    ph["ORIGIN"] = ("cubesfh", "truth of a mock observation")
    for card in header_cards:
        ph[card[0]] = card[1:]
    for i, c in enumerate(comps, start=1):
        ph[f"COMP{i}"] = (c.name, f"stellar component {i}")
        if c.description:
            ph["COMMENT"] = f"{c.name}: {c.description}"
        ph[f"TISM{i}"] = (float(c.tau_ism), f"tau_ISM (5500 A) of {c.name}")
        ph[f"TBC{i}"] = (float(c.tau_bc), f"tau_BC (5500 A) of {c.name}")
    ph["COMMENT"] = ("Truth of the galaxy in each spaxel of the cube; ages/metallicities "
                     "per eqs. 6-7 of Galceran et al. (2026) with V-band light.")
    hdus = [prim]
    for key, value in truth.items():
        name = key.upper()
        array = value.value if isinstance(value, u.Quantity) else np.asarray(value)
        header = _celestial_header(celestial)
        if array.ndim == 3:
            header["WCSAXES"] = 3
            header["CTYPE3"] = (_PLANE_AXES[name], "plane index (0-based)")
            header["CRPIX3"], header["CRVAL3"], header["CD3_3"] = 1.0, 0.0, 1.0
        hdu = fits.ImageHDU(array.astype(np.float32), header=header, name=name)
        hdu.header["BUNIT"] = _TRUTH_UNITS.get(name, "solMass")
        hdu.header["COMMENT"] = _COMMENTS.get(name, f"mass formed by the {key[5:]} component")
        if name == "HST_FLUX":
            for i, band in enumerate(bands, start=1):
                hdu.header[f"BAND{i}"] = (band, f"band of plane {i - 1}")
        hdus.append(hdu)
    edges = AGE_BIN_EDGES.to_value(u.yr)
    table = Table({"AGE": AGE_BIN_CENTERS.to(u.yr), "AGE_LO": edges[:-1] * u.yr,
                   "AGE_HI": edges[1:] * u.yr,
                   "LOGAGE": np.log10(AGE_BIN_CENTERS.to_value(u.yr))})
    bins = fits.table_to_hdu(table)
    bins.name = "AGE_BINS"
    hdus.append(bins)
    with atomic_write(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)


def read_mock_truth(path):
    """
    Read the truth file written by `mock_observation`.

    Extensions (2-D maps on the cube's celestial WCS, 3-D with the plane
    index along the first NumPy axis):

    ========================  ============  =======================================
    extension                 unit          content
    ========================  ============  =======================================
    LOGAGE_LW, LOGAGE_MW      log10(yr)     light-/mass-weighted mean log age
    ZH_LW, ZH_MW              dex           light-/mass-weighted mean [Z/H]
    V, SIGMA                  km/s          stellar velocity and dispersion
    SFH                       (16, ny, nx)  living-mass fraction per age bin
    ZH_AGE                    dex           [Z/H] per age bin (16 planes)
    MASS_<COMPONENT>          solMass       mass formed by each component
    MASS_LIVING               solMass       living stellar mass
    HST_FLUX                  cube unit     noise-free HST flux per spaxel
    STAR                      fraction      (only with a star) its flux fraction
    AGE_BINS                  table         AGE, AGE_LO, AGE_HI (yr), LOGAGE
    ========================  ============  =======================================

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Truth file.

    Returns
    -------
    truth : dict
        Lower-case extension name -> array; `~astropy.units.Quantity` for
        ``v``, ``sigma``, the masses and ``hst_flux``, plain arrays for the
        logarithmic and dimensionless maps; ``'age_bins'`` -> `~astropy.table.Table`.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"truth file {path} not found; mock_observation() writes mock_truth.fits."
        raise FileNotFoundError(msg)
    truth = {}
    with fits.open(path) as hdul:
        if hdul[0].header.get("ORIGIN") != "cubesfh" or "LOGAGE_LW" not in hdul:
            msg = f"{path} is not a truth file written by cubesfh.synthesis.mock_observation."
            raise CubeSFHError(msg)
        for hdu in hdul[1:]:
            if isinstance(hdu, fits.BinTableHDU):
                truth[hdu.name.lower()] = Table.read(hdu)
                continue
            array = np.asarray(hdu.data, dtype=float)
            bunit = str(hdu.header.get("BUNIT", "")).strip()
            if bunit in ("km/s", "solMass", "mag"):
                truth[hdu.name.lower()] = array * u.Unit(bunit)
            elif bunit.endswith("Angstrom"):
                truth[hdu.name.lower()] = array * parse_flux_unit(bunit)
            else:
                truth[hdu.name.lower()] = array
    return truth
