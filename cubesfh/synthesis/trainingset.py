# Licensed under a 3-clause BSD style license - see LICENSE
"""
The synthetic training set: draw, simulate and write to HDF5 (resumable).

The set is never committed: :func:`make_training_set` regenerates it
bit-for-bit from its seed (each chunk has its own random stream derived from
the seed and the chunk number, so an interrupted run resumes where it stopped
and produces the same file).
"""

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
from .model import Z_START, ForwardModel, metallicity_history
from .sfh import (
    FAMILY_BURST,
    FAMILY_GP,
    FAMILY_SKEW,
    draw_gp_parameters,
    draw_skewnormal_parameters,
    gp_sfh,
    skewnormal_sfh,
)

__all__ = ["CHEMISTRY_PRIORS", "DEFAULT_MIX", "SNR_VALUES", "TRAINING_SET_FORMAT",
           "make_training_set", "simulate_samples"]

log = logging.getLogger(__name__)

#: Training-set composition of the paper (GP-SFH, skew-normal, skew-normal + burst).
DEFAULT_MIX = (150_000, 9_000, 6_000)
#: Default number of samples.
N_DEFAULT = sum(DEFAULT_MIX)
#: S/N per Angstrom (5300-5500 A) of the training spectra, drawn uniformly.
SNR_VALUES = (15.0, 20.0, 35.0, 50.0)
#: Version of the file layout (bump on incompatible changes).
TRAINING_SET_FORMAT = 1
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
CHEMISTRY_PRIORS = ("paper", "wide")


def simulate_samples(rng, families, model, *, snr=None, snr_values=SNR_VALUES,
                     phot_error=0.02, noise=True, chemistry="paper"):
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
    chemistry : {'paper', 'wide'}, optional
        Prior of the chemical evolution, see `CHEMISTRY_PRIORS`.

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
    n = families.size
    edges = model.library.age_edges.to_value(u.yr)
    mass = np.zeros((n, model.library.n_age))
    params = {k: np.full(n, np.nan) for k in _PARAM_COLUMNS}
    gp = families == FAMILY_GP
    if gp.any():
        p = draw_gp_parameters(rng, int(gp.sum()))
        mass[gp] = gp_sfh(p, edges)
        for k in ("t25", "t50", "t75", "ssfr"):
            params[k][gp] = p[k]
    sk = ~gp
    if sk.any():
        p = draw_skewnormal_parameters(rng, int(sk.sum()),
                                       with_burst=families[sk] == FAMILY_BURST)
        mass[sk] = skewnormal_sfh(p, edges)
        for k in ("peak", "width", "skewness", "burst_age", "burst_width", "burst_fraction"):
            params[k][sk] = p[k]
    if chemistry == "paper":
        z_start = np.full(n, Z_START)
        z_final = rng.uniform(0.010, 0.030, n)
    elif chemistry == "wide":
        z_start = rng.uniform(0.004, 0.030, n)
        z_final = z_start + rng.uniform(0.0, 1.0, n) * (0.050 - z_start)
    else:
        msg = f"chemistry={chemistry!r}: choose one of {CHEMISTRY_PRIORS}."
        raise CubeSFHError(msg)
    tau_ism = np.clip(rng.normal(0.3, 0.08, n), 0.0, None)
    tau_bc = 10 ** rng.uniform(np.log10(0.5), np.log10(4.0), n)
    if snr is None:
        snr = rng.choice(np.asarray(snr_values, float), n)
    snr = np.broadcast_to(np.asarray(snr, float), (n,)).copy()
    z = metallicity_history(mass, z_final, z_start=z_start)
    spec0, phot0 = model.synthesize(mass * TOTAL_MASS, z, tau_ism, tau_bc)
    spec0, phot0, norm = model.normalize(spec0, phot0)
    if noise:
        spec, phot, _ = model.add_noise(rng, spec0, phot0, snr, phot_error=phot_error)
    else:
        spec, phot = spec0, phot0
    out = {"spectra": spec, "photometry": phot, "spectra_noiseless": spec0,
           "photometry_noiseless": phot0, "norm": norm, "family": families.astype(np.int8),
           "snr": snr, "tau_ism": tau_ism, "tau_bc": tau_bc, "z_start": z_start,
           "z_final": z_final, **params}
    out.update(model.labels(mass, z))
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
                      store_noiseless=True, sigma_target=SIGMA_TARGET, chemistry="paper",
                      overwrite=False, progress_bar=True):
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
    chemistry : {'paper', 'wide'}, optional
        Prior of the chemical evolution (`CHEMISTRY_PRIORS`); ``'wide'``
        extends the paper's to super-solar metallicities.
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
    if chemistry not in CHEMISTRY_PRIORS:
        msg = f"chemistry={chemistry!r}: choose one of {CHEMISTRY_PRIORS}."
        raise CubeSFHError(msg)
    model = ForwardModel(sigma_target=sigma_target)
    lib = model.library
    n_chunks = int(np.ceil(n / chunk_size))
    settings = {"seed": int(seed), "n": n, "chunk_size": int(chunk_size),
                "mix": np.asarray(mix, np.int64), "snr_values": np.asarray(snr_values, float),
                "phot_error": float(phot_error), "format": TRAINING_SET_FORMAT,
                "template_sha": str(lib.meta.get("STELSHA", "")),
                "store_noiseless": bool(store_noiseless),
                "sigma_target_kms": float(sigma_target.value), "chemistry": chemistry}
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
            for k in (*_LABEL_COLUMNS, "snr", "tau_ism", "tau_bc", "z_start", "z_final", "norm",
                      *_PARAM_COLUMNS):
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
            out = simulate_samples(rng, plan[lo:hi], model, snr_values=snr_values,
                                   chemistry=chemistry,
                                   phot_error=phot_error)
            for k in names:
                f[k][lo:hi] = out[k]
            f["chunk_done"][c] = True
            f.flush()
        f.attrs["complete"] = bool(f["chunk_done"][:].all())
        log.info("training set: %d chunks in %.1f s", todo.size, time.perf_counter() - t0)
    return output
