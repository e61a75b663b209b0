# Licensed under a 3-clause BSD style license - see LICENSE
"""
From a cube (and HST images) to stellar-population maps in one call.

:func:`run_pipeline` = :func:`~cubesfh.preprocess.prepare_observation`
(binning, kinematics, rest frame, bin photometry) + the bundled CNN
(:class:`~cubesfh.network.SFHModel`) + optionally the pPXF baseline
(:mod:`cubesfh.baseline`, through dask) -> :class:`~cubesfh.maps.StellarPopulationMaps`.
Each stage is also callable on its own.
"""

import datetime
import logging
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from .conventions import HST_BANDS
from .flags import BinFlag
from .utils import sha256_file

__all__ = ["predict_bins", "run_baseline", "run_pipeline"]

log = logging.getLogger(__name__)

#: Flags that make a bin's spectrum unusable by the network or the baseline.
UNUSABLE = BinFlag.SPECTRUM_FAILED | BinFlag.KINEMATICS_FAILED


def predict_bins(prepared, *, model=None):
    """
    Run the CNN on the usable bins of a prepared observation.

    Bins whose spectrum could not be prepared get NaN. Bands that are missing
    or non-positive in a bin are masked for that bin (the network takes any
    subset of bands); such bins keep their photometry flag.

    Parameters
    ----------
    prepared : `~cubesfh.preprocess.PreparedObservation`
    model : `~cubesfh.network.SFHModel`, optional
        Default: the bundled model.

    Returns
    -------
    result : dict of `~numpy.ndarray`
        Per-bin ``mass_fraction``, ``metallicity``, ``logage_lw``,
        ``logage_mw``, ``zh_lw``, ``zh_mw``, ``light_fraction``.
    """
    from .network import SFHModel

    model = SFHModel.load() if model is None else model
    n = prepared.n_bins
    ok = (prepared.flags & UNUSABLE) == 0
    keys = ("mass_fraction", "metallicity", "light_fraction")
    out = {k: np.full((n, 16), np.nan) for k in keys}
    out.update({k: np.full(n, np.nan) for k in ("logage_lw", "logage_mw", "zh_lw", "zh_mw")})
    if ok.any():
        res = model.predict(prepared.spectra.flux[ok], prepared.photometry_normalized[ok])
        for k in out:
            out[k][ok] = res[k]
    return out


def run_baseline(prepared, *, scheduler=None, n_workers=None, cache_dir=None, progress_bar=True):
    """
    Fit the pPXF population baseline to every usable bin, through dask.

    Parameters
    ----------
    prepared : `~cubesfh.preprocess.PreparedObservation`
    scheduler : str or `distributed.Client`, optional
        Existing dask scheduler address or client; default: a local cluster.
        ``'serial'`` runs without dask.
    n_workers : int, optional
        Workers of the local cluster.
    cache_dir : str or `~pathlib.Path`, optional
        Finished bins are kept there; an interrupted run resumes.
    progress_bar : bool, optional

    Returns
    -------
    result : dict of `~numpy.ndarray`
        Same keys as :func:`predict_bins` plus ``failed`` (bool).
    """
    from .baseline import BaselineFlag, BaselineTemplates, fit_population
    from .parallel import map_bins

    n = prepared.n_bins
    ok = np.flatnonzero((prepared.flags & UNUSABLE) == 0)
    templates = BaselineTemplates()
    spec = prepared.spectra
    var = spec.variance if spec.variance is not None else np.full_like(spec.flux, np.nan)
    items = [(spec.flux[i], var[i], prepared.photometry_normalized[i]) for i in ok]
    results = map_bins(fit_population, items, kwargs={"templates": templates},
                       scheduler=scheduler, n_workers=n_workers, cache_dir=cache_dir,
                       cache_tag="ppxf", progress_bar=progress_bar, desc="pPXF bins")
    out = {k: np.full((n, 16), np.nan) for k in ("mass_fraction", "metallicity",
                                                  "light_fraction")}
    out.update({k: np.full(n, np.nan) for k in ("logage_lw", "logage_mw", "zh_lw", "zh_mw")})
    out["failed"] = np.ones(n, bool)
    for i, r in zip(ok, results):
        if r is None or (r.flag & (BaselineFlag.NO_DATA | BaselineFlag.FIT_FAILED)):
            continue
        out["mass_fraction"][i] = r.mass_fraction
        out["metallicity"][i] = r.zh
        out["light_fraction"][i] = r.light_fraction
        for k in ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
            out[k][i] = getattr(r, k)
        out["failed"][i] = False
    return out


def run_pipeline(cube, hst=None, *, target_snr=35.0, min_snr=1.0, regions=None, mask=None,
                 kinematics=None, redshift=None, ppxf=False, model=None, scheduler=None,
                 n_workers=None, cache_dir=None, register=True, max_offset=None,
                 snr_window=None, max_memory=None, progress_bar=True):
    """
    Bin a cube, run the CNN (and optionally pPXF) and return the maps.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
    hst : dict or list of `~cubesfh.HSTImage`, optional
        Any subset of F275W, F336W, F438W, F555W, F814W; `None` for spectrum only.
    target_snr, min_snr, regions, mask, kinematics, redshift, snr_window, max_memory
        See :func:`~cubesfh.preprocess.prepare_observation`.
    ppxf : bool, optional
        Also run the pPXF baseline on the same bins.
    model : `~cubesfh.network.SFHModel`, optional
        Default: the bundled model.
    scheduler, n_workers, cache_dir
        See :func:`run_baseline`.
    register : bool, optional
        Measure the MUSE-HST offset and flux ratios (:func:`cubesfh.registration.register`)
        and correct the images' astrometry (default). `False` uses the images as they are.
    max_offset : `~astropy.units.Quantity`, optional
        Largest MUSE-HST offset accepted (default 2 arcsec); a larger one stops the run.
    progress_bar : bool, optional

    Returns
    -------
    maps : `~cubesfh.maps.StellarPopulationMaps`
        ``maps.meta["registration"]`` holds the registration report when it ran.
    """
    from .maps import StellarPopulationMaps
    from .network import SFHModel
    from .preprocess import prepare_observation

    timings = {}
    report = None
    if hst and register:
        from .registration import DEFAULT_MAX_OFFSET
        from .registration import register as register_images

        t0 = time.perf_counter()
        hst, report = register_images(cube, hst, correct=True,
                                      max_offset=(DEFAULT_MAX_OFFSET if max_offset is None
                                                  else max_offset),
                                      max_memory=max_memory)
        timings["registration"] = time.perf_counter() - t0
        log.info("registration:\n%s", report.summary())
    t0 = time.perf_counter()
    prepared = prepare_observation(cube, hst, target_snr=target_snr, min_snr=min_snr,
                                   regions=regions, mask=mask, kinematics=kinematics,
                                   redshift=redshift, snr_window=snr_window,
                                   max_memory=max_memory, progress_bar=progress_bar)
    timings["preprocess"] = time.perf_counter() - t0
    model = SFHModel.load() if model is None else model
    t0 = time.perf_counter()
    cnn = predict_bins(prepared, model=model)
    timings["cnn"] = time.perf_counter() - t0
    base = None
    if ppxf:
        t0 = time.perf_counter()
        base = run_baseline(prepared, scheduler=scheduler, n_workers=n_workers,
                            cache_dir=cache_dir, progress_bar=progress_bar)
        timings["ppxf"] = time.perf_counter() - t0
    prov = provenance(cube, hst, model, {
        "target_snr": target_snr, "min_snr": min_snr, "regions": str(regions or ""),
        "kinematics": str(kinematics or "ppxf"), "redshift": str(redshift),
        "ppxf": bool(ppxf)})
    prov["timings"] = timings
    if report is not None:
        prov["registration"] = report.summary()
        prov["header_cards"] = [list(c) for c in report.to_header_cards()]
    return StellarPopulationMaps.from_results(prepared, cnn, base, provenance=prov)


def provenance(cube, hst, model, parameters):
    """Provenance dictionary recorded in the FITS product."""
    versions = {}
    for dep in ("cubesfh", "numpy", "astropy", "photutils", "reproject", "vorbin", "ppxf",
                "regions", "torch", "dask"):
        try:
            versions[dep] = metadata.version(dep)
        except metadata.PackageNotFoundError:
            versions[dep] = "not installed"
    inputs = {}
    fn = getattr(cube, "filename", None)
    if fn:
        inputs["cube"] = {"name": Path(fn).name, "sha256": sha256_file(fn, nbytes=1 << 26)}
    images = hst.values() if isinstance(hst, dict) else (hst or [])
    for im in images:
        f = getattr(im, "filename", None)
        if f:
            inputs[im.band] = {"name": Path(f).name, "sha256": sha256_file(f)}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions,
        "model_id": model.model_id,
        "model_sha256": model.meta["weights_sha256"],
        "inputs": inputs,
        "bands_used": [b for b in HST_BANDS if b in {getattr(i, "band", None)
                                                     for i in images}],
        "parameters": parameters,
        "checksum_note": "cube sha256 over its first 64 MiB",
    }
