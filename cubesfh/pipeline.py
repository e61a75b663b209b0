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
import functools
import logging
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from astropy import units as u

from .conventions import HST_BANDS
from .flags import BinFlag
from .gaps import fill_gaps
from .maps import _versions
from .photometry._kcorr import K_CORRECT_MIN_Z, bin_k_factors, k_correction_filters
from .utils import CubeSFHError
from .utils._io import file_digest

__all__ = ["PHYSICAL_KEYS", "UNCERTAINTY_KEYS", "UNCERTAINTY_VECTOR_KEYS", "add_physical_maps",
           "fit_check_bins", "k_correct_bins", "predict_bins", "run_baseline", "run_pipeline"]

log = logging.getLogger(__name__)

#: Flags that make a bin's spectrum unusable by the network or the baseline.
UNUSABLE = BinFlag.SPECTRUM_FAILED | BinFlag.KINEMATICS_FAILED


def _as_models(model):
    """A list of models sorted by training dispersion (default: the bundled family)."""
    from .network import SFHModel, bundled_models

    if model is None:
        models = bundled_models()
    elif isinstance(model, SFHModel):
        models = [model]
    else:
        models = list(model)
        if not models or not all(isinstance(m, SFHModel) for m in models):
            msg = ("model must be an SFHModel or a sequence of them (one per velocity "
                   f"dispersion); got {model!r}.")
            raise CubeSFHError(msg)
    models = sorted(models, key=lambda m: m.sigma_target.value)
    sig = [m.sigma_target.value for m in models]
    if len(set(sig)) != len(sig):
        msg = f"two models were trained at the same velocity dispersion ({sig} km/s); give one."
        raise CubeSFHError(msg)
    return models


def _bin_targets(prepared):
    """Per-bin common dispersion of the prepared spectra, in km/s."""
    st = u.Quantity(prepared.spectra.sigma_target, u.km / u.s).to_value(u.km / u.s)
    return np.broadcast_to(st, (prepared.n_bins,))


def predict_bins(prepared, *, model=None, photometry=True):
    """
    Run the CNN on the usable bins of a prepared observation.

    Bins whose spectrum could not be prepared get NaN. Bands that are missing
    or non-positive in a bin are masked for that bin (the network takes any
    subset of bands); such bins keep their photometry flag. Each bin goes to
    the model trained at its dispersion (``prepared.spectra.sigma_target``).

    Parameters
    ----------
    prepared : `~cubesfh.preprocess.PreparedObservation`
    model : `~cubesfh.network.SFHModel` or list of them, optional
        Default: the bundled family (`~cubesfh.network.bundled_models`).
    photometry : bool, optional
        `False` ignores the HST photometry (spectrum-only predictions).

    Raises
    ------
    CubeSFHError
        If some usable bin was prepared at a dispersion that no model was
        trained at (prepare with the models' dispersions).

    Returns
    -------
    result : dict of `~numpy.ndarray`
        Per-bin ``mass_fraction``, ``metallicity``, ``logage_lw``,
        ``logage_mw``, ``zh_lw``, ``zh_mw``, ``light_fraction``. When a model
        has uncertainty heads, also the keys of `UNCERTAINTY_KEYS`
        (``<name>_p16``, ``_p84``, ``_p02``, ``_p98``, ``_err``, ``ood_score``,
        ``ood_latent``, ``ood_recon``), `UNCERTAINTY_VECTOR_KEYS`
        (``mass_fraction_p16`` ... (n, 16)) and ``ood`` (bool); NaN (``ood``
        `False`) for bins not predicted or predicted by a model without heads.
    """

    models = _as_models(model)
    n = prepared.n_bins
    ok = (prepared.flags & UNUSABLE) == 0
    targets = _bin_targets(prepared)
    keys = ("mass_fraction", "metallicity", "light_fraction")
    out = {k: np.full((n, 16), np.nan) for k in keys}
    out.update({k: np.full(n, np.nan) for k in ("logage_lw", "logage_mw", "zh_lw", "zh_mw")})
    out["model_index"] = np.full(n, -1, dtype=np.int16)
    with_heads = any(getattr(m, "has_uncertainty", False) for m in models)
    if with_heads:
        out.update({k: np.full(n, np.nan) for k in UNCERTAINTY_KEYS})
        out.update({k: np.full((n, 16), np.nan) for k in UNCERTAINTY_VECTOR_KEYS})
        out["ood"] = np.zeros(n, bool)
    with_physical = any(getattr(m, "has_physical_head", False) for m in models)
    if with_physical:
        out.update({k: np.full(n, np.nan) for k in PHYSICAL_KEYS})
    done = np.zeros(n, bool)
    for j, m in enumerate(models):
        sel = ok & np.isclose(targets, m.sigma_target.value)
        if sel.any():
            flux = prepared.spectra.flux[sel]
            if not np.isfinite(flux).all() and not getattr(m, "handles_gaps", False):
                # missing pixels (AO notch, masks) for a network without a validity
                # channel (cubesfh <= 0.3 and models trained like them): completed from
                # the bin's own valid pixels by a template fit, never a constant (see
                # cubesfh.gaps). Networks with the channel take them as missing.
                var = prepared.spectra.variance
                flux, _ = fill_gaps(flux, targets[sel],
                                    variance=None if var is None else var[sel])
            res = m.predict(flux, prepared.photometry_normalized[sel] if photometry else None)
            for k in keys + ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
                out[k][sel] = res[k]
            if with_heads and getattr(m, "has_uncertainty", False):
                for k in UNCERTAINTY_KEYS + UNCERTAINTY_VECTOR_KEYS + ("ood",):
                    if k in res:
                        out[k][sel] = res[k]
            if with_physical:
                for k in PHYSICAL_KEYS:
                    if k in res:
                        out[k][sel] = res[k]
            for k, v in res.items():
                # cumulative young fractions (and their intervals): 0.1 Gyr -> 100myr
                if k.startswith("mass_younger_"):
                    name = k.replace("0.1gyr", "100myr")
                    out.setdefault(name, np.full(n, np.nan))[sel] = v
            out["model_index"][sel] = j
            done |= sel
    if np.any(ok & ~done):
        have = sorted({float(t) for t in targets[ok & ~done]})
        msg = (f"{int(np.sum(ok & ~done))} bins were prepared at sigma = {have} km/s, but the "
               f"models were trained at {[m.sigma_target.value for m in models]} km/s. Prepare "
               "the observation with sigma_target set to the models' dispersions.")
        raise CubeSFHError(msg)
    out["models"] = [m.model_id for m in models]
    return out


def k_correct_bins(prepared, instruments=None, *, model=None, dust=True, iterations=3,
                   tolerance=0.005):
    """
    K-correct the HST photometry of a prepared observation to the rest frame.

    The network was trained on rest-frame WFC3/UVIS band fluxes, while an
    image of a galaxy at redshift z samples the band at rest-frame
    wavelengths ``lambda / (1 + z)``. For every usable bin this takes the
    star formation history and metallicities predicted from the *spectrum
    alone* (the same network, photometry ignored), builds its SED on the
    template library (attenuated, with ``dust``, to match the bin's colours)
    and multiplies the bin's network photometry by its K-correction
    (:func:`~cubesfh.photometry.bin_k_factors`: observed band of the image's
    camera -> rest-frame WFC3/UVIS band), in place; then it predicts again
    with the corrected photometry and repeats.

    Parameters
    ----------
    prepared : `~cubesfh.preprocess.PreparedObservation`
        Modified in place: ``photometry_normalized`` is multiplied by the
        factors, which are also stored as ``prepared.k_correction``.
    instruments : dict, optional
        Camera of each band's image (``{'F814W': 'WFPC2'}``); default
        WFC3/UVIS. A camera without bundled throughputs uses the WFC3/UVIS
        curve.
    model : `~cubesfh.network.SFHModel` or list of them, optional
        Default: the bundled family.
    dust : bool, optional
        Attenuate each SED by the optical depth that best matches the bin's
        HST colours (:func:`~cubesfh.photometry.fit_attenuation`; bins with
        fewer than two bands get none), stored as ``prepared.k_correction_tau``.
    iterations, tolerance : int, float, optional
        Repeat prediction and correction at most ``iterations`` times, until
        no factor changes by more than ``tolerance``.

    Returns
    -------
    factors : `~numpy.ndarray`
        ``(n_bins, 5)`` in `~cubesfh.conventions.HST_BANDS` order; NaN for
        bands without data and bins without a usable spectrum.
    """
    n = prepared.n_bins
    phot = prepared.photometry_normalized.copy()
    z = np.asarray(prepared.spectra.redshift, float)
    filters, rest_filters = k_correction_filters(instruments)
    factors = np.full((n, len(HST_BANDS)), np.nan)
    tau = np.zeros(n)
    for it in range(iterations + 1):
        # it = 0: SFH from the spectrum alone; then from spectrum + corrected photometry
        current = np.where(np.isfinite(factors), phot * factors, phot)
        prepared.photometry_normalized = current
        pred = predict_bins(prepared, model=model, photometry=it > 0)
        mf, zh = pred["mass_fraction"], pred["metallicity"]
        ok = np.all(np.isfinite(mf), axis=1) & (np.nansum(mf, axis=1) > 0) & np.isfinite(z)
        new = np.full_like(factors, np.nan)
        if ok.any():
            new[ok], tau[ok] = bin_k_factors(mf[ok], zh[ok], current[ok], z[ok], filters,
                                             rest_filters, dust=dust)
            new[ok] = np.where(np.isfinite(phot[ok]), new[ok], np.nan)
        change = np.nanmax(np.abs(new / factors - 1)) if it else np.inf
        factors = new
        log.debug("K-correction iteration %d: largest change %.4f", it, change)
        if change < tolerance:
            break
    prepared.photometry_normalized = np.where(np.isfinite(factors), phot * factors, phot)
    prepared.k_correction = factors
    prepared.k_correction_tau = tau
    done = np.isfinite(factors)
    if done.any():
        log.info("K-corrections (median per band): %s", ", ".join(
            f"{b} {np.nanmedian(factors[:, j]):.3f}" for j, b in enumerate(HST_BANDS)
            if done[:, j].any()))
    return factors


@functools.lru_cache(maxsize=4)
def _forward_model(sigma_kms):
    from .synthesis import ForwardModel

    return ForwardModel(sigma_target=sigma_kms * u.km / u.s)


def fit_check_bins(prepared, cnn, ppxf=None, *, model=None, tension=True, keep_models=False):
    """
    Re-synthesise every bin's CNN answer and hold it against its spectrum and HST fluxes.

    For each usable bin, the spectrum and HST fluxes implied by the CNN's
    SFH and Z(t) are built on the templates at the bin's dispersion and
    fitted with what the network does not give (a Calzetti screen from the
    HST colours, a multiplicative polynomial of degree 8, the gas lines
    masked; :func:`cubesfh.synthesis.resynthesis.fit_check`). With
    ``tension``, the answer from the spectrum alone is re-synthesised the
    same way and its implied HST fluxes compared with the measured ones.
    The limits of ``POOR_FIT`` and ``PHOT_TENSION`` come from the
    calibration stored with each model (``fit_check`` in its metadata; see
    :ref:`fitcheck`).

    Parameters
    ----------
    prepared : `~cubesfh.preprocess.PreparedObservation`
        With the variance of the spectra (no chi^2 without it).
    cnn : dict
        Output of `predict_bins` (``mass_fraction``, ``metallicity``,
        ``model_index``).
    ppxf : dict, optional
        Output of `run_baseline`: with ``bestfit``, pPXF's chi^2 on the same
        pixels and noise is added to it as ``fit_chi2``.
    model : `~cubesfh.network.SFHModel` or list of them, optional
        The models of `predict_bins` (their calibrations; default: bundled).
    tension : bool, optional
        Also the spectrum-photometry tension (one more network pass).
    keep_models : bool, optional
        Also return the model spectra (``model_spectra``: ``cnn``, ``ppxf``,
        ``good``), for :func:`~cubesfh.maps.write_model_spectra`.

    Returns
    -------
    fit : dict of `~numpy.ndarray`
        Per bin: ``fit_chi2``, ``fit_chi2_limit``, ``fit_snr``, ``av_fit``,
        ``phot_model`` and ``phot_resid`` (n, 5), ``phot_chi2``,
        ``phot_chi2_limit``, ``poor_fit`` (bool: either chi^2 above its
        limit), and with ``tension``: ``tension``, ``tension_z`` (n, 5),
        ``tension_band``, ``tension_limit``, ``phot_tension`` (bool). NaN
        (`False`) for bins not fitted. `None` when the spectra have no
        variance.
    """
    from .synthesis.resynthesis import calibrated_limit, fit_check, fit_chi2

    spec = prepared.spectra
    if spec.variance is None:
        log.info("no variance: the fit check (CNN_CHI2, TENSION) is skipped")
        return None
    models = _as_models(model)
    n = prepared.n_bins
    nb = len(HST_BANDS)
    index = np.asarray(cnn.get("model_index", np.zeros(n, int)))
    ok = (index >= 0) & np.all(np.isfinite(cnn["mass_fraction"]), axis=1)
    out = {k: np.full(n, np.nan) for k in ("fit_chi2", "fit_chi2_limit", "fit_snr", "av_fit",
                                            "phot_chi2", "phot_chi2_limit")}
    out.update({k: np.full((n, nb), np.nan) for k in ("phot_model", "phot_resid")})
    out["poor_fit"] = np.zeros(n, bool)
    phot = prepared.photometry_normalized
    have_phot = phot is not None and np.isfinite(phot).any()
    if tension and have_phot:
        out.update({"tension": np.full(n, np.nan), "tension_limit": np.full(n, np.nan),
                    "tension_z": np.full((n, nb), np.nan), "phot_tension": np.zeros(n, bool),
                    "tension_band": np.full(n, "", dtype="U5")})
        alone = predict_bins(prepared, model=models, photometry=False)
    good_all = np.zeros(spec.flux.shape, bool)
    cnn_models = np.full(spec.flux.shape, np.nan) if keep_models else None
    for j, m in enumerate(models):
        sel = np.flatnonzero(ok & (index == j))
        if sel.size == 0:
            continue
        fm = _forward_model(float(m.sigma_target.to_value(u.km / u.s)))
        res = fit_check(spec.flux[sel], spec.variance[sel],
                        None if phot is None else phot[sel], cnn["mass_fraction"][sel],
                        cnn["metallicity"][sel], forward_model=fm)
        out["fit_chi2"][sel] = res["chi2"]
        out["fit_snr"][sel] = res["snr"]
        for k in ("av_fit", "phot_chi2", "phot_model", "phot_resid"):
            out[k][sel] = res[k]
        good_all[sel] = res["good"]
        if keep_models:
            cnn_models[sel] = res["model"]
        cal = m.meta.get("fit_check")
        if cal:
            out["fit_chi2_limit"][sel] = calibrated_limit(cal["chi2"], res["snr"])
            out["phot_chi2_limit"][sel] = float(cal["phot_chi2"]["limit"])
            with np.errstate(invalid="ignore"):
                out["poor_fit"][sel] = ((res["chi2"] > out["fit_chi2_limit"][sel])
                                        | (res["phot_chi2"] > out["phot_chi2_limit"][sel]))
        if "tension" in out:
            a = fit_check(spec.flux[sel], spec.variance[sel], phot[sel],
                          alone["mass_fraction"][sel], alone["metallicity"][sel],
                          forward_model=fm)
            z = a["phot_z_loo"]
            out["tension_z"][sel] = z
            absz = np.where(np.isfinite(z), np.abs(z), -1.0)
            worst = np.argmax(absz, axis=1)
            has = absz.max(axis=1) >= 0
            out["tension"][sel] = np.where(has, absz.max(axis=1), np.nan)
            out["tension_band"][sel] = np.where(has, np.asarray(HST_BANDS)[worst], "")
            if cal and "tension" in cal:
                limit = float(cal["tension"]["limit"])
                out["tension_limit"][sel] = limit
                with np.errstate(invalid="ignore"):
                    out["phot_tension"][sel] = out["tension"][sel] > limit
    if ppxf is not None and "bestfit" in ppxf:
        ppxf["fit_chi2"] = fit_chi2(spec.flux, spec.variance, ppxf["bestfit"], good_all)
        ppxf["fit_chi2"][~good_all.any(axis=1)] = np.nan
    if keep_models:
        out["model_spectra"] = {"cnn": cnn_models, "good": good_all,
                                "ppxf": None if ppxf is None else ppxf.get("bestfit")}
    return out


#: Per-bin uncertainty outputs of models with uncertainty heads
#: (`~cubesfh.network.SFHModel.has_uncertainty`): scalar and (n, 16) keys.
UNCERTAINTY_KEYS = tuple(f"{q}_{s}" for q in ("logage_lw", "logage_mw", "zh_lw", "zh_mw")
                         for s in ("p16", "p84", "p02", "p98", "err")) + (
    "ood_score", "ood_latent", "ood_recon")
UNCERTAINTY_VECTOR_KEYS = tuple(f"mass_fraction_{s}" for s in ("p16", "p84", "p02", "p98"))
#: Per-bin outputs of models with the attenuation head
#: (`~cubesfh.network.SFHModel.has_physical_head`).
PHYSICAL_KEYS = tuple(f"av_stars{s}" for s in ("", "_p16", "_p84", "_p02", "_p98", "_err")) + (
    "logmstar_sd_err", "logmstar_sd_err95", "log_ml_v_head")


def run_baseline(prepared, *, scheduler=None, n_workers=None, cache_dir=None, n_mc=0,
                 chunk_size=None, progress_bar=True):
    """
    Fit the pPXF population baseline to every usable bin, through dask.

    All the usable bins go to the workers in one
    :func:`~cubesfh.parallel.map_bins` call, whatever their common dispersion:
    the templates of every dispersion (cached per process,
    :func:`~cubesfh.baseline.templates_at`) are sent to each worker once, and
    each task carries only its spectra
    (:func:`~cubesfh.baseline.fit_grouped`). The fits are deterministic: any
    scheduler gives the numbers of ``scheduler='serial'``.

    Parameters
    ----------
    prepared : `~cubesfh.preprocess.PreparedObservation`
    scheduler : str or `distributed.Client`, optional
        Existing dask scheduler address or client; default: a local cluster
        (:func:`~cubesfh.parallel.dask_client`). ``'serial'`` runs without
        dask.
    n_workers : int, optional
        Workers of the local cluster.
    cache_dir : str or `~pathlib.Path`, optional
        Finished bins are kept there; an interrupted run resumes.
    n_mc : int, optional
        Monte-Carlo noise realisations refitted per bin for the uncertainties
        (`~cubesfh.baseline.fit_population`); default 0: none.
    chunk_size : int, optional
        Bins per dask task (default
        :func:`~cubesfh.parallel.default_chunk_size`).
    progress_bar : bool, optional

    Returns
    -------
    result : dict of `~numpy.ndarray`
        Same keys as :func:`predict_bins` plus ``failed`` (bool); with
        ``n_mc > 0`` also ``<name>_p16``, ``<name>_p84`` (Monte-Carlo
        percentiles of the four means and of ``mass_fraction``) and ``n_mc``.

    Raises
    ------
    CubeSFHError
        If the scheduler at a ``scheduler`` address cannot be reached.
    """
    from .baseline import BaselineFlag, fit_grouped, mc_columns, templates_at
    from .parallel import map_bins

    n = prepared.n_bins
    ok = np.flatnonzero((prepared.flags & UNUSABLE) == 0)
    targets = _bin_targets(prepared)
    spec = prepared.spectra
    var = spec.variance if spec.variance is not None else np.full_like(spec.flux, np.nan)
    groups = [float(st) for st in np.unique(targets[ok])]
    # templates at the bins' own dispersion, as the network's inputs
    templates = {st: templates_at(st) for st in groups}
    items = [(spec.flux[i], var[i], prepared.photometry_normalized[i], float(targets[i]))
             for i in ok]
    kwargs = {"templates": templates}
    if n_mc:
        kwargs["n_mc"] = int(n_mc)
    results = [None] * ok.size
    if items:
        results = map_bins(fit_grouped, items, kwargs=kwargs, scheduler=scheduler,
                           n_workers=n_workers, chunk_size=chunk_size, cache_dir=cache_dir,
                           cache_tag="ppxf5-" + "-".join(f"{st:g}" for st in groups)
                           + (f"mc{int(n_mc)}" if n_mc else ""),
                           progress_bar=progress_bar, desc="pPXF bins")
    out = {k: np.full((n, 16), np.nan) for k in ("mass_fraction", "metallicity",
                                                  "light_fraction")}
    out.update({k: np.full(n, np.nan) for k in ("logage_lw", "logage_mw", "zh_lw", "zh_mw")})
    out["failed"] = np.ones(n, bool)
    # the best fits on the network's grid, for the fit check (same pixels and noise)
    out["bestfit"] = np.full(spec.flux.shape, np.nan)
    wave = u.Quantity(spec.wavelength, u.AA).value
    for i, r in zip(ok, results):
        if r is None or (r.flag & (BaselineFlag.NO_DATA | BaselineFlag.FIT_FAILED)):
            continue
        if getattr(r, "bestfit", None) is not None and np.shape(r.bestfit) == wave.shape:
            out["bestfit"][i] = r.bestfit
        out["mass_fraction"][i] = r.mass_fraction
        out["metallicity"][i] = r.zh
        out["light_fraction"][i] = r.light_fraction
        for k in ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
            out[k][i] = getattr(r, k)
        out["failed"][i] = False
    if n_mc:
        full = [None] * n
        for i, r in zip(ok, results):
            if r is not None and not out["failed"][i]:
                full[i] = r
        out.update(mc_columns(full))
    return out


def run_pipeline(cube, hst=None, *, target_snr=35.0, min_snr=1.0, regions=None, mask=None,
                 kinematics=None, redshift=None, ppxf=False, model=None, scheduler=None,
                 n_workers=None, cache_dir=None, register=True, max_offset=None,
                 k_correct="auto", snr_window=None, ebv_galactic=0.0, r_v=3.1, max_memory=None,
                 ppxf_mc=0, distance=None, inclination=None, imf="chabrier", fit_check=True,
                 model_spectra=False, progress_bar=True):
    """
    Bin a cube, run the CNN (and optionally pPXF) and return the maps.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
    hst : dict or list of `~cubesfh.HSTImage`, optional
        Any subset of F275W, F336W, F438W, F555W, F814W; `None` for spectrum only.
    target_snr, min_snr, regions, mask, kinematics, redshift, snr_window, max_memory
        See :func:`~cubesfh.preprocess.prepare_observation`.
    ebv_galactic, r_v : float, optional
        Milky Way foreground E(B-V) and R_V, removed from the spectra and the
        photometry (:mod:`cubesfh.extinction`; default none).
    ppxf : bool, optional
        Also run the pPXF baseline on the same bins.
    model : `~cubesfh.network.SFHModel` or list of them, optional
        Default: the bundled family (`~cubesfh.network.bundled_models`): the
        150 km/s network of the paper and a 300 km/s one. Each bin is
        broadened to the smallest of the models' dispersions above its own
        (:func:`~cubesfh.preprocess.choose_sigma_target`) and analysed by that
        model; the pPXF baseline uses templates at the same dispersion.
    scheduler, n_workers, cache_dir
        See :func:`run_baseline`.
    ppxf_mc : int, optional
        Monte-Carlo realisations per bin for the pPXF uncertainties
        (``n_mc`` of :func:`run_baseline`; default 0: none).
    register : bool, optional
        Measure the MUSE-HST offset and flux ratios (:func:`cubesfh.registration.register`)
        and correct the images' astrometry (default). `False` uses the images as they are.
    max_offset : `~astropy.units.Quantity`, optional
        Largest MUSE-HST offset accepted (default 2 arcsec); a larger one stops the run.
    k_correct : {'auto', True, False}, optional
        K-correct the HST photometry to the rest frame (:func:`k_correct_bins`);
        ``'auto'`` (default) does so when the median redshift of the bins
        exceeds `K_CORRECT_MIN_Z` = 0.01. The factors are in the product's
        ``kcorr_<band>`` columns.
    distance : `~astropy.units.Quantity` or float, optional
        Distance of the galaxy (plain numbers: Mpc); default: a ``DISTANCE``
        (or ``DIST_MPC``) keyword of the cube's primary header, else none.
        With a distance and a flux-calibrated cube, the physical maps
        (stellar-mass and SFR surface densities, :doc:`/physical`) are added;
        without one they are absent and the summary says how to get them.
    inclination : `~astropy.units.Quantity` or float, optional
        Disc inclination (plain numbers: degrees) for the deprojected
        ``LOGMSTAR_SD_DEPROJ``.
    imf : {'chabrier', 'salpeter', 'kroupa'}, optional
        IMF of the masses and SFRs (`cubesfh.physical.IMF_FACTORS`).
    fit_check : bool, optional
        Re-synthesise every bin's answer and fit it to its spectrum and HST
        fluxes (`fit_check_bins`: ``CNN_CHI2``, ``PPXF_CHI2``, ``AV_FIT``,
        ``PHOT_RESID``, ``TENSION``, flags ``POOR_FIT`` and
        ``PHOT_TENSION``; :ref:`fitcheck`). Default on.
    model_spectra : bool, optional
        Keep the bins' spectra and model spectra as ``maps.model_spectra``
        (for :func:`~cubesfh.maps.write_model_spectra` and
        :meth:`~cubesfh.maps.StellarPopulationMaps.plot_bin`).
    progress_bar : bool, optional

    Returns
    -------
    maps : `~cubesfh.maps.StellarPopulationMaps`
        ``maps.meta["registration"]`` holds the registration report when it ran.
    """
    from .maps import StellarPopulationMaps
    from .preprocess import prepare_observation

    timings = {}
    report = None
    # bad physical-map options stop the run before any work
    from .physical import check_distance, check_imf, check_inclination, distance_from_header

    imf = check_imf(imf)
    if distance is not None:
        distance = check_distance(distance)
    else:
        distance = distance_from_header(getattr(cube, "meta", None))
        if distance is not None:
            log.info("distance %s from the cube header", distance)
    if inclination is not None:
        inclination = check_inclination(inclination)
    if hst:
        from .hst import check_parity

        check_parity(cube.celestial_wcs, hst)
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
    models = _as_models(model)
    t0 = time.perf_counter()
    prepared = prepare_observation(cube, hst, target_snr=target_snr, min_snr=min_snr,
                                   regions=regions, mask=mask, kinematics=kinematics,
                                   redshift=redshift, snr_window=snr_window,
                                   sigma_target=u.Quantity([m.sigma_target for m in models]),
                                   ebv_galactic=ebv_galactic, r_v=r_v,
                                   max_memory=max_memory, progress_bar=progress_bar)
    timings["preprocess"] = time.perf_counter() - t0
    if k_correct not in ("auto", True, False):
        msg = f"k_correct must be 'auto', True or False; got {k_correct!r}."
        raise CubeSFHError(msg)
    z_med = float(np.nanmedian(prepared.spectra.redshift)) if prepared.n_bins else 0.0
    kcorr_done = False
    if prepared.photometry is not None and (k_correct is True or (
            k_correct == "auto" and z_med > K_CORRECT_MIN_Z)):
        from .photometry._binphot import _ordered_images

        t0 = time.perf_counter()
        k_correct_bins(prepared, {b: im.instrument for b, im in _ordered_images(hst)},
                       model=models)
        timings["k_correction"] = time.perf_counter() - t0
        kcorr_done = True
    t0 = time.perf_counter()
    cnn = predict_bins(prepared, model=models)
    timings["cnn"] = time.perf_counter() - t0
    base = None
    if ppxf:
        t0 = time.perf_counter()
        base = run_baseline(prepared, scheduler=scheduler, n_workers=n_workers,
                            cache_dir=cache_dir, n_mc=ppxf_mc, progress_bar=progress_bar)
        timings["ppxf"] = time.perf_counter() - t0
    fit = None
    if fit_check:
        t0 = time.perf_counter()
        fit = fit_check_bins(prepared, cnn, base, model=models, keep_models=model_spectra)
        timings["fit_check"] = time.perf_counter() - t0
        if fit is not None:
            cnn.update({k: v for k, v in fit.items() if k != "model_spectra"})
    prov = provenance(cube, hst, models, {
        "target_snr": target_snr, "min_snr": min_snr, "regions": str(regions or ""),
        "kinematics": str(kinematics or "ppxf"), "redshift": str(redshift),
        "systemic_redshift": float(prepared.meta.get("redshift", np.nan)),
        "redshift_source": str(prepared.meta.get("redshift_source", "given")),
        "kinematics_problems": list(prepared.kinematics.meta.get("problems", [])),
        "ppxf": bool(ppxf), "ppxf_mc": int(ppxf_mc), "k_correct": str(k_correct),
        "k_corrected": kcorr_done,
        "ebv_galactic": float(ebv_galactic), "r_v": float(r_v),
        "median_redshift": z_med})
    prov["timings"] = timings
    if report is not None:
        prov["registration"] = report.summary()
        prov["header_cards"] = [list(c) for c in report.to_header_cards()]
    maps = StellarPopulationMaps.from_results(prepared, cnn, base, provenance=prov)
    add_physical_maps(maps, distance, inclination=inclination, imf=imf)
    if model_spectra:
        spec = prepared.spectra
        kept = (fit or {}).get("model_spectra") or {}
        maps.model_spectra = {
            "wavelength": u.Quantity(spec.wavelength, u.AA),
            "flux": np.asarray(spec.flux, float),
            "error": (None if spec.variance is None
                      else np.sqrt(np.clip(np.asarray(spec.variance, float), 0, None))),
            "cnn": kept.get("cnn"), "ppxf": kept.get("ppxf"), "good": kept.get("good")}
    return maps


def add_physical_maps(maps, distance, *, inclination=None, imf="chabrier"):
    """
    Add the physical maps when they can be made; log or warn why not otherwise.

    `~cubesfh.maps.StellarPopulationMaps.add_physical` with the checks of
    the pipeline: no distance, a network without the attenuation head, or
    spectra not in an absolute flux unit leave the maps without them (the
    last two with a `~cubesfh.utils.CubeSFHWarning` naming the reason).

    Returns
    -------
    added : bool
    """
    import warnings

    from .utils import CubeSFHWarning

    if distance is None:
        log.info("no distance: the physical maps (Sigma_star, Sigma_SFR) are not made; "
                 "give --distance MPC (or distance=) to add them")
        return False
    if "cnn_av_stars" not in maps.table.colnames:
        warnings.warn("the physical maps are not made: the network has no attenuation head "
                      "(cubesfh >= 0.5 networks have one).", CubeSFHWarning, stacklevel=2)
        return False
    norm = maps.table["norm"]
    unit = getattr(norm, "unit", None)
    if unit is None or not unit.is_equivalent(u.erg / u.s / u.cm**2 / u.AA):
        warnings.warn(f"the physical maps are not made: the cube's flux unit "
                      f"({unit if unit is not None else 'none'}) is not an absolute flux "
                      "density (BUNIT such as 1e-20 erg/s/cm2/Angstrom is needed).",
                      CubeSFHWarning, stacklevel=2)
        return False
    maps.add_physical(distance, inclination=inclination, imf=imf)
    return True


def provenance(cube, hst, model, parameters):
    """Provenance dictionary recorded in the FITS product (``model``: one or a list)."""
    from .network import SFHModel

    models = [model] if isinstance(model, SFHModel) else list(model)
    versions = _versions()
    for dep in ("regions", "specutils", "dask"):
        try:
            versions[dep] = metadata.version(dep)
        except metadata.PackageNotFoundError:
            versions[dep] = "not installed"
    inputs, roles, hashed = {}, {}, {}

    def add(role, path):
        digest, what = file_digest(path)
        key = Path(path).name
        if key in inputs and inputs[key] != digest:
            key = str(path)  # two different files of the same name
        inputs[key], roles[key], hashed[key] = digest, role, what

    fn = getattr(cube, "filename", None)
    if fn:
        add("cube", fn)
    images = hst.values() if isinstance(hst, dict) else (hst or [])
    for im in images:
        f = getattr(im, "filename", None)
        if f:
            add(im.band, f)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions,
        "model_id": models[0].model_id,
        "model_sha256": models[0].meta["weights_sha256"],
        "models": {f"{m.sigma_target.value:g} km/s": m.model_id for m in models},
        "inputs": inputs,
        "input_roles": roles,
        "input_hashed": hashed,
        "bands_used": [b for b in HST_BANDS if b in {getattr(i, "band", None)
                                                     for i in images}],
        "parameters": parameters,
    }
