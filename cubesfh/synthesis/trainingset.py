# Licensed under a 3-clause BSD style license - see LICENSE
"""
The synthetic training set: draw, simulate and write to HDF5 (resumable).

The set is never committed: :func:`make_training_set` regenerates it
bit-for-bit from its seed (each chunk has its own random stream derived from
the seed and the chunk number, so an interrupted run resumes where it stopped
and produces the same file).
"""

import functools
import logging
import time
from pathlib import Path

import numpy as np
from astropy import units as u

from ..conventions import (
    AGE_BIN_CENTERS,
    AGE_BIN_EDGES,
    HST_BANDS,
    OUTPUT_WAVELENGTH,
    SIGMA_TARGET,
)
from ..utils import CubeSFHError, progress
from .model import (
    ATTENUATION_LAWS,
    C_KMS,
    Z_START,
    ForwardModel,
    dust_transmission,
    metallicity_history,
)
from .sfh import (
    FAMILY_BURST,
    FAMILY_GP,
    FAMILY_SKEW,
    draw_gp_parameters,
    draw_skewnormal_parameters,
    gp_sfh,
    skewnormal_sfh,
)

__all__ = ["CHEMISTRY_PRIORS", "DEFAULT_MIX", "PRIORS", "SNR_VALUES", "TRAINING_SET_FORMAT",
           "make_training_set", "simulate_samples", "training_library", "training_models",
           "with_young_from_bc03"]

log = logging.getLogger(__name__)

#: Training-set composition of the paper (GP-SFH, skew-normal, skew-normal + burst).
DEFAULT_MIX = (150_000, 9_000, 6_000)
#: Default number of samples.
N_DEFAULT = sum(DEFAULT_MIX)
#: S/N per Angstrom (5300-5500 A) of the training spectra, drawn uniformly.
SNR_VALUES = (15.0, 20.0, 35.0, 50.0)
#: Version of the file layout and simulator (bump on incompatible changes).
#: 2 (cubesfh 0.4): attenuation laws, patchy screens, extended histories and
#: the spectral and photometric model systematics of the broad simulator.
TRAINING_SET_FORMAT = 2
#: Total stellar mass formed by every history (M_sun; as in the paper).
TOTAL_MASS = 15e6

_PARAM_COLUMNS = ("t25", "t50", "t75", "ssfr", "peak", "width", "skewness", "burst_age",
                  "burst_width", "burst_fraction")
_LABEL_COLUMNS = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")

#: Priors of the chemical evolution (eq. 2). ``'paper'``: Z_start = 0.008,
#: Z_final uniform in 0.010-0.030 (Galceran et al. 2026; mass-weighted [Z/H]
#: between about -0.35 and 0). ``'wide'``: Z_start uniform in 0.004-0.030 and
#: Z_final uniform between Z_start and 0.050 (mass-weighted [Z/H] up to about
#: +0.35), for the metal-rich centres of massive galaxies.
CHEMISTRY_PRIORS = ("paper", "wide", "broad")

#: Simulator priors. ``'paper'``: the forward model of Galceran et al. (2026),
#: one population per spectrum. ``'broad'``: the simulator of the bundled
#: networks since 0.3, which covers real galaxies (mixtures of populations,
#: A_V up to 2 mag, any attenuation slope, metal-poor to super-solar, gas
#: kinematics and line strengths independent of the stars, extra diffuse /
#: LINER-like emission, flux-calibration tilts, several SSP libraries); every
#: choice is written in :ref:`synthesis-broad`.
PRIORS = ("paper", "broad")

#: Broad prior: probabilities of 1, 2 and 3 components per spectrum.
N_COMPONENT_PROBABILITIES = (0.6, 0.28, 0.12)
#: Broad prior: log10 range of the mass formed by a secondary component,
#: relative to the first one.
SECONDARY_MASS_RANGE = (-2.5, 0.0)
#: Broad prior: probability that a component has the paper's ISM dust,
#: N(0.3, 0.08); otherwise tau_ISM is uniform in ``TAU_ISM_RANGE``.
PAPER_DUST_PROBABILITY = 0.4
TAU_ISM_RANGE = (0.0, 2.0)
#: Broad prior: range of the ISM attenuation exponent (Charlot & Fall: -0.7;
#: Calzetti-like curves are steeper in the optical).
ISM_SLOPE_RANGE = (-1.3, -0.5)
#: Broad prior: gas velocity dispersion (km/s) and stellar dispersion range
#: as a fraction of the target (the width the pipeline adds to the gas lines
#: is sqrt(sigma_target^2 - sigma_star^2)).
GAS_SIGMA_RANGE = (20.0, 100.0)
#: Broad prior: log10 range of the multiplier of the Cloudy line luminosities.
LINE_SCALE_RANGE = (-0.3, 0.3)
#: Broad prior: probability of a diffuse-gas / LINER-like line component and
#: log10 range of its EW(H-alpha) in A.
DIG_PROBABILITY = 0.5
DIG_EW_RANGE = (-0.5, 1.3)
#: Broad prior: 1-sigma flux-calibration tilt, fractional change of the
#: spectrum over 4800-7000 A (the photometry is not tilted).
TILT_SIGMA = 0.03
#: Broad prior: probability and range (km/s) of an extra Gaussian broadening
#: (a mismatched line-spread function or stellar dispersion).
LSF_JITTER_PROBABILITY = 0.5
LSF_JITTER_RANGE = (0.0, 50.0)

#: Broad prior: probabilities of the ISM attenuation laws of each component
#: (`~cubesfh.synthesis.model.ATTENUATION_LAWS`: power law with the drawn
#: slope, Calzetti, SMC-like, Milky Way).
ATTENUATION_LAW_PROBABILITIES = (0.4, 0.2, 0.2, 0.2)
#: Broad prior: probability that a component is seen through two screens
#: (a share of its stars behind each; the PSF and the bins mix lines of
#: sight with different dust columns), and the range of the log ratio of the
#: second screen's optical depth to the first.
PATCHY_PROBABILITY = 0.3
PATCHY_TAU_RANGE = (-1.0, 0.5)
#: Broad prior: probability that the first component has an extended
#: parametric history (constant, declining, rising or delayed, optionally
#: with a late burst) instead of the paper's families; see
#: `extended_history`.
EXTENDED_PROBABILITY = 0.3
#: Training sets: number of principal components of the inter-library
#: spectral differences drawn onto every spectrum
#: (`spectral_systematics_basis`), and the multiplier of their rms amplitudes.
#: With 0.7 the median perturbation (rms over 4800-7000 A, 3.6 % at 150
#: km/s) is that of two training libraries at matched age and [Z/H] (1-5 %
#: per pair and metallicity, up to 20-30 % for some young ages).
SYSTEMATICS_COMPONENTS = 12
SYSTEMATICS_SCALE = 0.7
#: Training sets: 1-sigma offset (mag) of every HST band, drawn per spectrum:
#: the scatter of the synthetic colours between SSP libraries at matched
#: populations (``scripts/library_colour_scatter.py``: F275W 0.07-0.10,
#: F336W 0.07-0.12, F438W 0.02-0.06, F555W <= 0.01, F814W 0.04-0.12 mag) and
#: a 0.02 mag zero-point uncertainty, in quadrature. F555W carries little of
#: it: the photometry is normalised by the spectrum around 5500 A.
PHOT_SYSTEMATIC_MAG = (0.10, 0.10, 0.05, 0.025, 0.08)

# H-beta, [OIII] 4959, 5007, [OI] 6300, 6364, [NII] 6548, H-alpha, [NII] 6584,
# [SII] 6717, 6731 (air, A)
_DIG_LINES = np.array([4861.33, 4958.91, 5006.84, 6300.30, 6363.78, 6548.05, 6562.80,
                       6583.45, 6716.44, 6730.82])


def training_library(name):
    """
    A training library, with the young sub-intervals it lacks taken from BC03.

    The M11 and MaStar grids start at 3-100 Myr (``YNGFILL``; their builder
    fills younger sub-intervals with the youngest native spectrum, which
    would teach the network that a 7 Myr population looks like a 100 Myr
    one). For training, the sub-intervals younger than ``YNGFILL`` are the
    BC03 spectra of the nearest metallicity, scaled to the library's V-band
    light per unit mass at the first native sub-interval (which carries the
    library's IMF normalisation). BC03 itself is returned unchanged.

    Parameters
    ----------
    name : str
        A key of :data:`cubesfh.templates.TRAINING_LIBRARIES`.

    Returns
    -------
    library : `~cubesfh.templates.TemplateLibrary`
    """
    from ..templates import load_library

    lib = load_library(name)
    if name == "bc03":
        return lib
    return with_young_from_bc03(lib)


def training_models(sigma_target=SIGMA_TARGET, libraries=None):
    """
    The forward models of the broad simulator and their model-systematics basis.

    Built once per dispersion and set of libraries (cached; treat them as
    read-only).

    Parameters
    ----------
    sigma_target : `~astropy.units.Quantity`, optional
    libraries : sequence of str, optional
        Names of :data:`cubesfh.templates.TRAINING_LIBRARIES` (default: all).

    Returns
    -------
    models : list of `~cubesfh.synthesis.ForwardModel`
        One per library (`training_library`), in the order given.
    systematics : tuple or None
        `spectral_systematics_basis` of the models; `None` for one library.
    """
    from ..templates import TRAINING_LIBRARIES

    names = tuple(TRAINING_LIBRARIES) if libraries is None else tuple(libraries)
    sigma = float(u.Quantity(sigma_target, u.km / u.s).value)
    return _training_models(sigma, names)


@functools.lru_cache(maxsize=4)
def _training_models(sigma_kms, names):
    models = [ForwardModel(training_library(nm), sigma_target=sigma_kms * u.km / u.s)
              for nm in names]
    return models, (spectral_systematics_basis(models) if len(models) > 1 else None)


def with_young_from_bc03(lib):
    """
    Replace the sub-intervals younger than a library's ``YNGFILL`` by scaled BC03 ones.

    See `training_library`; also used for the held-out library of the
    evaluation, whose grid starts at 63 Myr.

    Parameters
    ----------
    lib : `~cubesfh.templates.TemplateLibrary`

    Returns
    -------
    library : `~cubesfh.templates.TemplateLibrary`
        ``lib`` itself when it lacks no young ages.
    """
    from ..templates import TemplateLibrary, load_library

    young = float(lib.meta.get("YNGFILL", 0.0))
    if young <= 0:
        return lib
    ref = load_library("bc03")
    repl = lib.ages.to_value(u.yr) < young * (1 - 1e-6)
    if not repl.any():
        return lib
    first = int(np.flatnonzero(~repl)[0])
    w = lib.wavelength.to_value(u.AA)
    v = (w > 5450) & (w < 5550)
    flux = np.array(lib.flux, copy=True)
    sed = np.array(lib.sed_flux, copy=True)
    for iz, zv in enumerate(lib.metallicity):
        jz = int(np.argmin(np.abs(np.log10(ref.metallicity / zv))))
        scale = flux[iz, first, v].mean() / ref.flux[jz, first, v].mean()
        flux[iz, repl] = ref.flux[jz, repl] * scale
        sed[iz, repl] = ref.sed_flux[jz, repl] * scale
    meta = lib.meta.copy()
    meta["YNGSRC"] = ("BC03 scaled", "sub-intervals < YNGFILL taken from BC03 for training")
    return TemplateLibrary(wavelength=lib.wavelength, flux=flux,
                           sed_wavelength=lib.sed_wavelength, sed_flux=sed, fwhm=lib.fwhm,
                           age_edges=lib.age_edges, ages=lib.ages, age_bin=lib.age_bin,
                           metallicity=lib.metallicity, living_fraction=lib.living_fraction,
                           nebular_sed=lib.nebular_sed, nebular_lines=lib.nebular_lines,
                           line_wavelength=lib.line_wavelength, line_names=lib.line_names,
                           meta=meta, filename=lib.filename)


def _draw_mass(rng, families, edges, params=None):
    """Mass formed per sub-interval (total 1) for a family code per history."""
    n = families.size
    mass = np.zeros((n, edges.size - 1))
    gp = families == FAMILY_GP
    if gp.any():
        p = draw_gp_parameters(rng, int(gp.sum()))
        mass[gp] = gp_sfh(p, edges)
        if params is not None:
            for k in ("t25", "t50", "t75", "ssfr"):
                params[k][gp] = p[k]
    sk = ~gp
    if sk.any():
        p = draw_skewnormal_parameters(rng, int(sk.sum()),
                                       with_burst=families[sk] == FAMILY_BURST)
        mass[sk] = skewnormal_sfh(p, edges)
        if params is not None:
            for k in ("peak", "width", "skewness", "burst_age", "burst_width",
                      "burst_fraction"):
                params[k][sk] = p[k]
    return mass


#: Extended-history types of `extended_history`.
EXTENDED_TYPES = ("constant", "declining", "rising", "delayed")


def extended_history(rng, n, edges, *, t_universe=None):
    """
    Draw extended star formation histories (mass formed per sub-interval, total 1).

    Real discs formed a large share of their mass in the last few Gyr; the
    paper's families rarely do. Each history is one of `EXTENDED_TYPES`
    (equal probabilities), in cosmic time ``t`` counted from the oldest edge
    (``t_universe``), starting at a time drawn uniformly in the first third
    of the age range (no stars before it):

    * ``constant``: SFR constant;
    * ``declining``: SFR ~ exp(-t / tau), tau log-uniform in 2-20 Gyr;
    * ``rising``: SFR ~ exp(+t / tau), tau log-uniform in 3-20 Gyr;
    * ``delayed``: SFR ~ t exp(-t / tau), tau log-uniform in 1-20 Gyr;

    and in 30 % of them a late burst (a Gaussian in log age centred between
    30 Myr and 3 Gyr, 0.15 dex wide) with 2-30 % of the mass is added.

    Parameters
    ----------
    rng : `numpy.random.Generator`
    n : int
    edges : `~numpy.ndarray`
        Lookback-time edges of the sub-intervals (yr), increasing.
    t_universe : float, optional
        Age of the oldest stars (yr; default the last edge).

    Returns
    -------
    mass : `~numpy.ndarray`
        ``(n, len(edges) - 1)``.
    kind : `~numpy.ndarray`
        ``(n,)`` index into `EXTENDED_TYPES`, plus 10 where a burst was added.
    """
    edges = np.asarray(edges, float)
    t_u = float(edges[-1] if t_universe is None else t_universe)
    mid = 0.5 * (edges[1:] + edges[:-1])
    width = np.diff(edges)
    t = np.clip(t_u - mid, 0.0, None)[None, :] / 1e9  # Gyr since the start
    kind = rng.integers(0, len(EXTENDED_TYPES), n)
    start = rng.uniform(0.0, t_u / 3e9, n)[:, None]
    tau = np.select([kind == 1, kind == 2, kind == 3],
                    [10 ** rng.uniform(np.log10(2), np.log10(20), n),
                     10 ** rng.uniform(np.log10(3), np.log10(20), n),
                     10 ** rng.uniform(0.0, np.log10(20), n)], 1.0)[:, None]
    ts = np.clip(t - start, 0.0, None)
    on = t >= start
    sfr = np.select([kind[:, None] == 0, kind[:, None] == 1, kind[:, None] == 2],
                    [np.ones_like(ts), np.exp(-ts / tau), np.exp(ts / tau)],
                    ts * np.exp(-ts / tau)) * on
    mass = sfr * width[None, :]
    mass /= mass.sum(axis=1, keepdims=True)
    burst = rng.uniform(size=n) < 0.3
    if burst.any():
        k = int(burst.sum())
        centre = rng.uniform(np.log10(3e7), np.log10(3e9), k)[:, None]
        prof = np.exp(-0.5 * ((np.log10(mid)[None, :] - centre) / 0.15) ** 2) * width[None, :]
        prof /= prof.sum(axis=1, keepdims=True)
        frac = rng.uniform(0.02, 0.30, k)[:, None]
        mass[burst] = (1 - frac) * mass[burst] + frac * prof
    return mass, kind + 10 * burst


def spectral_systematics_basis(models, *, n_components=SYSTEMATICS_COMPONENTS):
    """
    Principal components of the spectral differences between SSP libraries.

    For every pair of the forward models' libraries, at every age
    sub-interval and every metallicity of the first library (the nearest
    metallicity of the second, within 0.2 dex), the log ratio of the two
    normalised simple-population spectra on the output grid (at the models'
    velocity dispersion) is one row; the leading right-singular vectors of
    the (uncentred) rows span the ways the libraries disagree, and their
    singular values / sqrt(rows) the size of the disagreement. Sub-intervals
    that one library takes from another (``YNGFILL``) give zero rows and are
    left out.

    Parameters
    ----------
    models : sequence of `~cubesfh.synthesis.ForwardModel`
        At least two, on the same output grid.
    n_components : int, optional

    Returns
    -------
    basis : `~numpy.ndarray`
        ``(n_components, n_pix)`` unit vectors.
    scale : `~numpy.ndarray`
        ``(n_components,)`` rms amplitude of each component (natural log).
    """
    rows = []
    for a in range(len(models)):
        for b in range(a + 1, len(models)):
            ma, mb = models[a], models[b]
            za = np.log10(ma.library.metallicity)
            zb = np.log10(mb.library.metallicity)
            for iz, z in enumerate(za):
                jz = int(np.argmin(np.abs(zb - z)))
                if abs(zb[jz] - z) > 0.2:
                    continue
                fa = ma.stellar[iz]
                fb = mb.stellar[jz]
                fa = fa / fa[:, ma._norm_pixels].mean(axis=1, keepdims=True)
                fb = fb / fb[:, mb._norm_pixels].mean(axis=1, keepdims=True)
                r = np.log(np.clip(fa, 1e-30, None) / np.clip(fb, 1e-30, None))
                keep = np.isfinite(r).all(axis=1) & (np.abs(r).max(axis=1) > 1e-6)
                if keep.any():
                    rows.append(r[keep])
    if not rows:
        msg = "spectral_systematics_basis needs at least two libraries with matched metallicities."
        raise CubeSFHError(msg)
    x = np.concatenate(rows)
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    k = int(min(n_components, vt.shape[0]))
    return vt[:k], sv[:k] / np.sqrt(x.shape[0])


def _draw_chemistry(rng, n, chemistry):
    if chemistry == "paper":
        z_start = np.full(n, Z_START)
        z_final = rng.uniform(0.010, 0.030, n)
    elif chemistry == "wide":
        z_start = rng.uniform(0.004, 0.030, n)
        z_final = z_start + rng.uniform(0.0, 1.0, n) * (0.050 - z_start)
    elif chemistry == "broad":
        z_start = 10 ** rng.uniform(np.log10(0.001), np.log10(0.030), n)
        z_final = z_start + rng.uniform(0.0, 1.0, n) * (0.050 - z_start)
    else:
        msg = f"chemistry={chemistry!r}: choose one of {CHEMISTRY_PRIORS}."
        raise CubeSFHError(msg)
    return z_start, z_final


def _draw_broad_dust(rng, n):
    paper = rng.uniform(size=n) < PAPER_DUST_PROBABILITY
    tau = np.where(paper, np.clip(rng.normal(0.3, 0.08, n), 0.0, None),
                   rng.uniform(*TAU_ISM_RANGE, n))
    tau_bc = 10 ** rng.uniform(np.log10(0.5), np.log10(4.0), n)
    return tau, tau_bc


def simulate_samples(rng, families, model, *, snr=None, snr_values=SNR_VALUES,
                     phot_error=0.02, noise=True, chemistry="paper", prior="paper",
                     systematics=None):
    """
    Draw SFH, chemistry, dust and noise parameters and simulate the observables.

    Parameters
    ----------
    rng : `numpy.random.Generator`
    families : `~numpy.ndarray`
        Family code of each sample (0 GP-SFH, 1 skew-normal, 2 skew-normal + burst).
    model : `~cubesfh.synthesis.ForwardModel`
    snr : float or `~numpy.ndarray`, optional
        S/N per Angstrom; default: drawn uniformly from ``snr_values``.
    snr_values : sequence of float, optional
    phot_error : float, optional
        Relative error of the HST fluxes.
    noise : bool, optional
        Add noise (the noise-free versions are always returned as well).
    chemistry : {'paper', 'wide', 'broad'}, optional
        Prior of the chemical evolution, see `CHEMISTRY_PRIORS`.
    prior : {'paper', 'broad'}, optional
        Simulator (`PRIORS`). With ``'broad'``, ``model`` may be a sequence of
        forward models (one per SSP library, drawn with equal probability per
        spectrum).
    systematics : tuple of `~numpy.ndarray`, optional
        ``(basis, scale)`` of `spectral_systematics_basis`: with the broad
        prior, every spectrum is multiplied by ``exp(sum_k a_k basis_k)``,
        ``a_k ~ N(0, SYSTEMATICS_SCALE * scale_k)``, and every HST band gets an
        offset drawn from `PHOT_SYSTEMATIC_MAG`. Default: none (the
        simulation of one library as it is, e.g. a held-out library);
        `make_training_set` passes them for the training sets.

    Returns
    -------
    out : dict of `~numpy.ndarray`
        ``spectra``, ``photometry`` (noisy), ``spectra_noiseless``,
        ``photometry_noiseless``, the labels of
        :meth:`~cubesfh.synthesis.ForwardModel.labels`, and the per-sample
        parameters (``family``, ``snr``, ``tau_ism``, ``tau_bc``, ``z_final``,
        SFH parameters, NaN where they do not apply).
    """
    families = np.asarray(families)
    if prior == "broad":
        return _simulate_broad(rng, families, model, snr=snr, snr_values=snr_values,
                               phot_error=phot_error, noise=noise, chemistry=chemistry,
                               systematics=systematics)
    if prior != "paper":
        msg = f"prior={prior!r}: choose one of {PRIORS}."
        raise CubeSFHError(msg)
    n = families.size
    edges = model.library.age_edges.to_value(u.yr)
    params = {k: np.full(n, np.nan) for k in _PARAM_COLUMNS}
    mass = _draw_mass(rng, families, edges, params)
    z_start, z_final = _draw_chemistry(rng, n, chemistry)
    tau_ism = np.clip(rng.normal(0.3, 0.08, n), 0.0, None)
    tau_bc = 10 ** rng.uniform(np.log10(0.5), np.log10(4.0), n)
    z = metallicity_history(mass, z_final, z_start=z_start)
    spec0, phot0 = model.synthesize(mass * TOTAL_MASS, z, tau_ism, tau_bc)
    budget = model.stellar_budget(mass * TOTAL_MASS, z, tau_ism, tau_bc)
    out = _observe(rng, model, spec0, phot0, snr, snr_values, noise, phot_error)
    out.update({"family": families.astype(np.int8), "tau_ism": tau_ism, "tau_bc": tau_bc,
                "z_start": z_start, "z_final": z_final, **params})
    out.update(_budget_columns(budget))
    out.update(model.labels(mass, z))
    return out


#: Per-spectrum truths of the physical quantities (:mod:`cubesfh.physical`).
BUDGET_COLUMNS = ("log_mstar", "log_mstar_living", "log_lv_intrinsic", "av_stars")


def _budget_columns(budget):
    """Log present-day masses, log dust-free V light and the effective A_V of the stars."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"log_mstar": np.log10(budget["living"] + budget["remnants"]),
                "log_mstar_living": np.log10(budget["living"]),
                "log_lv_intrinsic": np.log10(budget["v_intrinsic"]),
                "av_stars": -2.5 * np.log10(budget["v_attenuated"] / budget["v_intrinsic"])}


def _observe(rng, model, spec0, phot0, snr, snr_values, noise, phot_error):
    """Normalised noise-free and noisy observables (draws the S/N if not given)."""
    n = spec0.shape[0]
    if snr is None:
        snr = rng.choice(np.asarray(snr_values, float), n)
    snr = np.broadcast_to(np.asarray(snr, float), (n,)).copy()
    spec0, phot0, norm = model.normalize(spec0, phot0)
    if noise:
        spec, phot, _ = model.add_noise(rng, spec0, phot0, snr, phot_error=phot_error)
    else:
        spec, phot = spec0, phot0
    return {"spectra": spec, "photometry": phot, "spectra_noiseless": spec0,
            "photometry_noiseless": phot0, "norm": norm, "snr": snr}


_BROAD_COLUMNS = ("n_components", "library", "ism_slope", "line_sigma", "line_scale",
                  "dig_ew", "tilt", "lsf_jitter", "secondary_light", "ism_law", "patchy",
                  "extended", "systematics_rms", "phot_offset_rms")


def _simulate_broad(rng, families, models, *, snr, snr_values, phot_error, noise, chemistry,
                    systematics=None):
    """The ``'broad'`` simulator (see `PRIORS`); same outputs as `simulate_samples`."""
    from scipy.ndimage import gaussian_filter1d

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    chemistry = "broad" if chemistry == "paper" else chemistry
    n = families.size
    nc = 3
    ref = models[0]
    edges = ref.library.age_edges.to_value(u.yr)
    na = edges.size - 1
    params = {k: np.full(n, np.nan) for k in _PARAM_COLUMNS}
    n_comp = 1 + np.searchsorted(np.cumsum(N_COMPONENT_PROBABILITIES), rng.uniform(size=n),
                                 side="right")
    n_comp = np.minimum(n_comp, nc)
    mix = np.asarray(DEFAULT_MIX, float) / sum(DEFAULT_MIX)
    mass = np.zeros((n, nc, na))
    z = np.zeros((n, nc, na))
    tau_ism = np.zeros((n, nc))
    tau_bc = np.zeros((n, nc))
    z_start = np.zeros((n, nc))
    z_final = np.zeros((n, nc))
    law = np.zeros((n, nc), int)
    patchy = np.zeros((n, nc), bool)
    patch_share = np.ones((n, nc))
    patch_tau = np.ones((n, nc))
    extended = np.full(n, -1.0)
    for c in range(nc):
        fam = families if c == 0 else rng.choice(3, size=n, p=mix)
        m = _draw_mass(rng, fam, edges, params if c == 0 else None)
        if c == 0:
            ext = rng.uniform(size=n) < EXTENDED_PROBABILITY
            if ext.any():
                m[ext], kind = extended_history(rng, int(ext.sum()), edges)
                extended[ext] = kind
                for key in params:  # the family's parameters no longer apply
                    params[key][ext] = np.nan
        w = np.ones(n) if c == 0 else 10 ** rng.uniform(*SECONDARY_MASS_RANGE, n)
        w = np.where(n_comp > c, w, 0.0)
        mass[:, c] = m * w[:, None]
        z_start[:, c], z_final[:, c] = _draw_chemistry(rng, n, chemistry)
        z[:, c] = metallicity_history(m, z_final[:, c], z_start=z_start[:, c])
        tau_ism[:, c], tau_bc[:, c] = _draw_broad_dust(rng, n)
        law[:, c] = rng.choice(len(ATTENUATION_LAWS), size=n, p=ATTENUATION_LAW_PROBABILITIES)
        patchy[:, c] = rng.uniform(size=n) < PATCHY_PROBABILITY
        patch_share[:, c] = np.where(patchy[:, c], rng.uniform(0.2, 0.8, n), 1.0)
        patch_tau[:, c] = 10 ** rng.uniform(*PATCHY_TAU_RANGE, n)
    mass /= mass.sum(axis=(1, 2), keepdims=True)
    library = rng.integers(0, len(models), n)
    ism_slope = rng.uniform(*ISM_SLOPE_RANGE, n)
    sig_t = ref.sigma_target.to_value(u.km / u.s)
    sig_star = rng.uniform(0.2, 1.0, n) * sig_t
    line_sigma = np.sqrt(rng.uniform(*GAS_SIGMA_RANGE, n) ** 2 + sig_t**2 - sig_star**2)
    line_scale = 10 ** rng.uniform(*LINE_SCALE_RANGE, n)
    dig = rng.uniform(size=n) < DIG_PROBABILITY
    dig_ew = np.where(dig, 10 ** rng.uniform(*DIG_EW_RANGE, n), 0.0)
    ratios = 10 ** np.stack([rng.uniform(-0.6, 0.3, n),    # [NII]6584 / H-alpha
                             rng.uniform(-0.5, 0.7, n),    # [OIII]5007 / H-beta
                             rng.uniform(-0.7, 0.0, n),    # [SII]6717+6731 / H-alpha
                             rng.uniform(-1.5, -0.5, n)])  # [OI]6300 / H-alpha
    tilt = rng.normal(0.0, TILT_SIGMA, n)
    jitter = np.where(rng.uniform(size=n) < LSF_JITTER_PROBABILITY,
                      rng.uniform(*LSF_JITTER_RANGE, n), 0.0)

    npix = ref.wavelength.size
    spec0 = np.zeros((n, npix))
    phot0 = np.zeros((n, len(ref.bands)))
    lab = {}
    sec_light = np.zeros(n)
    budget = {k: np.zeros(n) for k in ("living", "remnants", "v_intrinsic", "v_attenuated")}
    for j, model in enumerate(models):
        sel = np.flatnonzero(library == j)
        if sel.size == 0:
            continue
        zg = model.library.metallicity
        z[sel] = np.clip(z[sel], zg.min(), zg.max())
        comp_v = []
        for c in range(nc):
            ok = sel[n_comp[sel] > c]
            if ok.size == 0:
                comp_v.append(np.zeros(0))
                continue
            share = patch_share[ok, c][:, None]
            sp, ph = model.synthesize(mass[ok, c] * share * TOTAL_MASS, z[ok, c],
                                      tau_ism[ok, c], tau_bc[ok, c], ism_slope=ism_slope[ok],
                                      line_sigma=line_sigma[ok], line_scale=line_scale[ok],
                                      ism_law=law[ok, c])
            bud = model.stellar_budget(mass[ok, c] * share * TOTAL_MASS, z[ok, c],
                                       tau_ism[ok, c], tau_bc[ok, c], ism_slope=ism_slope[ok],
                                       ism_law=law[ok, c])
            two = np.flatnonzero(patchy[ok, c])
            if two.size:
                # the rest of the component's stars behind a second screen
                o2 = ok[two]
                sp2, ph2 = model.synthesize(
                    mass[o2, c] * (1 - patch_share[o2, c])[:, None] * TOTAL_MASS, z[o2, c],
                    tau_ism[o2, c] * patch_tau[o2, c], tau_bc[o2, c], ism_slope=ism_slope[o2],
                    line_sigma=line_sigma[o2], line_scale=line_scale[o2], ism_law=law[o2, c])
                sp[two] += sp2
                ph[two] += ph2
                bud2 = model.stellar_budget(
                    mass[o2, c] * (1 - patch_share[o2, c])[:, None] * TOTAL_MASS, z[o2, c],
                    tau_ism[o2, c] * patch_tau[o2, c], tau_bc[o2, c], ism_slope=ism_slope[o2],
                    ism_law=law[o2, c])
                for key in bud:
                    bud[key][two] += bud2[key]
            for key in bud:
                budget[key][ok] += bud[key]
            spec0[ok] += sp
            phot0[ok] += ph
            if c > 0:
                sec_light[ok] += sp[:, model._norm_pixels].mean(axis=1)
        out_j = model.labels(mass[sel], z[sel])
        for k, v in out_j.items():
            lab.setdefault(k, np.zeros((n, *v.shape[1:])))[sel] = v
    sec_light /= spec0[:, ref._norm_pixels].mean(axis=1)

    # diffuse-gas / LINER-like lines, attenuated by the first component's ISM
    w = ref.wavelength.value
    if dig.any():
        k = np.flatnonzero(dig)
        ha = (w > 6500) & (w < 6620)
        cont = np.median(spec0[np.ix_(k, ha)], axis=1)
        f_ha = dig_ew[k] * cont
        tr = dust_transmission(_DIG_LINES, tau_ism[k, 0], slope=ism_slope[k])
        tr = tr / tr[:, [6]]
        f_hb = f_ha / 2.86
        r = ratios[:, k]
        s2 = f_ha * r[2]
        flux = np.stack([f_hb, f_hb * r[1] / 2.98, f_hb * r[1], f_ha * r[3], f_ha * r[3] / 3.0,
                         f_ha * r[0] / 3.0, f_ha, f_ha * r[0], 0.55 * s2, 0.45 * s2], axis=1)
        flux *= tr
        spec0[k] += ref.line_spectra(flux, _DIG_LINES, line_sigma[k])
        phot0[k] += ref.line_photometry(flux, _DIG_LINES)
    # flux-calibration tilt of the spectrum (not of the photometry)
    spec0 *= 1.0 + tilt[:, None] * (w - 5900.0) / 2200.0
    # line-spread-function mismatch
    for i in np.flatnonzero(jitter > 0):
        spec0[i] = gaussian_filter1d(spec0[i], jitter[i] * 5900.0 / C_KMS / 1.25,
                                     mode="nearest")
    # model systematics: inter-library spectral differences and HST colour offsets
    sys_rms = np.zeros(n)
    offsets = np.zeros((n, phot0.shape[1]))
    if systematics is not None:
        basis, scale = systematics
        a = rng.standard_normal((n, len(scale))) * (SYSTEMATICS_SCALE * np.asarray(scale))
        pert = a @ np.asarray(basis)
        spec0 *= np.exp(pert)
        sys_rms = np.sqrt(np.mean(pert**2, axis=1))
        offsets = rng.standard_normal((n, phot0.shape[1])) * np.asarray(PHOT_SYSTEMATIC_MAG)
        phot0 *= 10 ** (-0.4 * offsets)
    out = _observe(rng, ref, spec0, phot0, snr, snr_values, noise, phot_error)
    out.update({"family": families.astype(np.int8), "tau_ism": tau_ism[:, 0],
                "tau_bc": tau_bc[:, 0], "z_start": z_start[:, 0], "z_final": z_final[:, 0],
                **params,
           "n_components": n_comp.astype(float), "library": library.astype(float),
           "ism_slope": ism_slope, "line_sigma": line_sigma, "line_scale": line_scale,
           "dig_ew": dig_ew, "tilt": tilt, "lsf_jitter": jitter,
           "secondary_light": sec_light, "ism_law": law[:, 0].astype(float),
           "patchy": patchy[:, 0].astype(float), "extended": extended,
           "systematics_rms": sys_rms, "phot_offset_rms": np.sqrt(np.mean(offsets**2, axis=1))})
    out.update(_budget_columns(budget))
    out.update(lab)
    return out


def _family_plan(n, mix, seed):
    """Family of every row: counts from ``mix`` scaled to ``n``, order shuffled by ``seed``."""
    mix = np.asarray(mix, float)
    counts = np.floor(mix / mix.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    fam = np.repeat([FAMILY_GP, FAMILY_SKEW, FAMILY_BURST], counts)
    np.random.default_rng([seed, 2**31 - 1]).shuffle(fam)
    return fam


def make_training_set(output, *, n=N_DEFAULT, seed=0, mix=DEFAULT_MIX,
                      chunk_size=5000, snr_values=SNR_VALUES, phot_error=0.02,
                      store_noiseless=True, sigma_target=SIGMA_TARGET, chemistry=None,
                      prior="broad", libraries=None, overwrite=False, progress_bar=True):
    """
    Generate the synthetic training set and write it to an HDF5 file.

    Parameters
    ----------
    output : str or `~pathlib.Path`
        HDF5 file. If it exists and was started with the same settings, the
        missing chunks are generated (resume); otherwise an error is raised
        unless ``overwrite``.
    n : int, optional
        Number of samples (default 165 000).
    seed : int, optional
        Master seed; the file is a deterministic function of it.
    mix : tuple of int, optional
        Relative numbers of GP-SFH, skew-normal and skew-normal + burst histories.
    chunk_size : int, optional
        Samples simulated and written at a time (memory ~ 30 kB per sample).
    snr_values : sequence of float, optional
        S/N per Angstrom values drawn uniformly.
    phot_error : float, optional
        Relative error of the HST fluxes.
    store_noiseless : bool, optional
        Also store the noise-free spectra and photometry (needed to evaluate
        the network at other S/N).
    sigma_target : `~astropy.units.Quantity`, optional
        Common stellar velocity dispersion of the spectra (default 150 km/s,
        as in the paper). A network trained on a set at a larger value
        analyses galaxies whose dispersion exceeds 150 km/s (see
        :ref:`network-sigma`).
    chemistry : {'paper', 'wide', 'broad'}, optional
        Prior of the chemical evolution (`CHEMISTRY_PRIORS`); ``'wide'``
        extends the paper's to super-solar metallicities, ``'broad'`` from
        [Z/H] = -1.3 to +0.4. Default: ``'paper'`` with the paper's simulator,
        ``'broad'`` with the broad one.
    prior : {'paper', 'broad'}, optional
        Simulator (`PRIORS`): the paper's forward model, or the broad one of
        the bundled networks (mixtures, wide dust, gas lines, calibration
        errors, several SSP libraries).
    libraries : sequence of str, optional
        SSP libraries (names of :data:`cubesfh.templates.TRAINING_LIBRARIES`)
        drawn with equal probability per spectrum; only with
        ``prior='broad'`` (default: all of them). The first one defines the
        line profiles of the diffuse gas (all share the same output grid).
    overwrite : bool, optional
        Start again from scratch.
    progress_bar : bool, optional

    Returns
    -------
    path : `~pathlib.Path`
    """
    import h5py

    from .. import __version__

    output = Path(output)
    n = int(n)
    if n < 1:
        msg = f"n={n}: the training set needs at least one sample."
        raise CubeSFHError(msg)
    sigma_target = u.Quantity(sigma_target, u.km / u.s)
    if not sigma_target.value > 0:
        msg = f"sigma_target={sigma_target}: it must be a positive velocity dispersion."
        raise CubeSFHError(msg)
    if prior not in PRIORS:
        msg = f"prior={prior!r}: choose one of {PRIORS}."
        raise CubeSFHError(msg)
    if chemistry is None:
        chemistry = "broad" if prior == "broad" else "paper"
    if chemistry not in CHEMISTRY_PRIORS:
        msg = f"chemistry={chemistry!r}: choose one of {CHEMISTRY_PRIORS}."
        raise CubeSFHError(msg)
    if libraries is None:
        from ..templates import TRAINING_LIBRARIES

        libraries = tuple(TRAINING_LIBRARIES) if prior != "paper" else ("bc03",)
    libraries = tuple(libraries)
    if prior == "paper" and libraries != ("bc03",):
        msg = (f"libraries={libraries!r}: the paper's simulator uses the BC03 library only; "
               "pass prior='broad' (--prior broad) to train over several libraries.")
        raise CubeSFHError(msg)
    if prior == "paper":
        models, systematics = [ForwardModel(sigma_target=sigma_target)], None
    else:
        models, systematics = training_models(sigma_target, libraries)
    model = models[0]
    lib = model.library
    n_chunks = int(np.ceil(n / chunk_size))
    settings = {"seed": int(seed), "n": n, "chunk_size": int(chunk_size),
                "mix": np.asarray(mix, np.int64), "snr_values": np.asarray(snr_values, float),
                "phot_error": float(phot_error), "format": TRAINING_SET_FORMAT,
                "template_sha": str(lib.meta.get("STELSHA", "")),
                "store_noiseless": bool(store_noiseless),
                "sigma_target_kms": float(sigma_target.value), "chemistry": chemistry}
    if prior != "paper":
        settings["prior"] = prior
        settings["libraries"] = np.array(libraries, dtype="S16")
        settings["library_shas"] = np.array([str(m.library.meta.get("STELSHA", ""))
                                             for m in models], dtype="S32")
    if output.exists() and overwrite:
        output.unlink()
    mode = "a" if output.exists() else "w"
    with h5py.File(output, mode) as f:
        if mode == "a":
            # files written before these options had their default values
            f.attrs.setdefault("sigma_target_kms", SIGMA_TARGET.to_value(u.km / u.s))
            f.attrs.setdefault("chemistry", "paper")
            for k, v in settings.items():
                if k not in f.attrs or not np.array_equal(np.asarray(f.attrs[k]), np.asarray(v)):
                    msg = (f"{output} was started with different settings ({k}: "
                           f"{f.attrs.get(k)!r} vs {v!r}); pass overwrite=True (--overwrite) "
                           "to start again or choose another file.")
                    raise CubeSFHError(msg)
        else:
            for k, v in settings.items():
                f.attrs[k] = v
            f.attrs["code_version"] = __version__
            f.attrs["template_file"] = Path(lib.filename).name if lib.filename else ""
            f.attrs["template_library"] = (f"{lib.meta.get('MODELS')}/{lib.meta.get('STELLIB')} "
                                           f"{lib.meta.get('IMF')} from {lib.meta.get('SRCPKG')}")
            f.attrs["description"] = ("cubesfh synthetic training set (Galceran et al. 2026 "
                                      "forward model); spectra normalised by their 5300-5500 A "
                                      "mean, photometry divided by the same number")
            f.attrs["snr_convention"] = "per Angstrom in 5300-5500 A"
            f.attrs["bands"] = np.array(HST_BANDS, dtype="S5")
            f.create_dataset("wavelength", data=OUTPUT_WAVELENGTH.to_value(u.AA))
            f["wavelength"].attrs["unit"] = "Angstrom"
            f.create_dataset("age_bin_centers", data=AGE_BIN_CENTERS.to_value(u.yr))
            f.create_dataset("age_bin_edges", data=AGE_BIN_EDGES.to_value(u.yr))
            f["age_bin_centers"].attrs["unit"] = f["age_bin_edges"].attrs["unit"] = "yr"
            f.create_dataset("family_plan", data=_family_plan(n, mix, seed))
            npix = OUTPUT_WAVELENGTH.size
            nb = len(HST_BANDS)
            shapes = {"spectra": (npix,), "photometry": (nb,), "mass_fraction": (16,),
                      "metallicity": (16,), "mass_formed": (16,), "light_fraction": (16,)}
            if store_noiseless:
                shapes.update({"spectra_noiseless": (npix,), "photometry_noiseless": (nb,)})
            for k, shp in shapes.items():
                f.create_dataset(k, shape=(n, *shp), dtype="f4",
                                 chunks=(min(256, n), *shp))
            extra = _BROAD_COLUMNS if prior != "paper" else ()
            for k in (*_LABEL_COLUMNS, "snr", "tau_ism", "tau_bc", "z_start", "z_final", "norm",
                      *_PARAM_COLUMNS, *extra, *BUDGET_COLUMNS):
                f.create_dataset(k, shape=(n,), dtype="f8")
            f.create_dataset("family", shape=(n,), dtype="i1")
            f.create_dataset("chunk_done", data=np.zeros(n_chunks, dtype=bool))
            f["mass_fraction"].attrs["description"] = ("fraction of the living stellar mass per "
                                                       "age bin")
            f["metallicity"].attrs["description"] = "mean [Z/H] of the stars in each age bin"
        plan = f["family_plan"][:]
        done = f["chunk_done"][:]
        todo = np.flatnonzero(~done)
        if done.any():
            log.info("resuming %s: %d of %d chunks already written", output, done.sum(),
                     n_chunks)
        names = [k for k in f if isinstance(f[k], h5py.Dataset) and f[k].shape[:1] == (n,)
                 and k != "family_plan"]
        t0 = time.perf_counter()
        for c in progress(todo, enabled=progress_bar, desc="training set", unit="chunk"):
            lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
            rng = np.random.default_rng([int(seed), int(c)])
            out = simulate_samples(rng, plan[lo:hi], models if prior != "paper" else model,
                                   snr_values=snr_values, chemistry=chemistry,
                                   phot_error=phot_error, prior=prior,
                                   systematics=systematics)
            for k in names:
                f[k][lo:hi] = out[k]
            f["chunk_done"][c] = True
            f.flush()
        f.attrs["complete"] = bool(f["chunk_done"][:].all())
        log.info("training set: %d chunks in %.1f s", todo.size, time.perf_counter() - t0)
    return output
