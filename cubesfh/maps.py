# Licensed under a 3-clause BSD style license - see LICENSE
"""
The stellar-population maps product: per-bin results painted on the cube's sky grid.

`StellarPopulationMaps` gathers, for every Voronoi bin of an observation, the
bin geometry, S/N, stellar kinematics, network inputs and quality flags, the
CNN outputs (mean ages and metallicities, the star formation history and the
metallicity of each of the 16 age bins) and, when it was run, the pPXF
baseline. It writes them as one FITS file whose image extensions all carry the
celestial WCS of the cube, so that they open in DS9 (``ds9 -multiframe``) or
any FITS viewer with the right coordinates; the layout is described on the
:ref:`product` page.

The per-bin table (``BINS``) is the single source of the numbers: every image
is that table painted on the spaxels with the bin map (``BIN_ID``), and
`StellarPopulationMaps.read` rebuilds the object from ``PRIMARY``, ``BIN_ID``
and ``BINS``.
"""

import datetime
import json
import logging
import math
import os
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits, registry
from astropy.table import QTable
from astropy.wcs import WCS, FITSFixedWarning

from .conventions import AGE_BIN_CENTERS, AGE_BIN_EDGES, HST_BANDS, N_AGE_BINS
from .flags import BinFlag
from .utils import CubeSFHError, atomic_write

__all__ = [
    "FLAG_NOT_BINNED",
    "FLAG_PPXF_FAILED",
    "PRODUCT_VERSION",
    "StellarPopulationMaps",
    "decode_flags",
    "disagreement",
    "flag_bits",
]

log = logging.getLogger(__name__)

#: Version of the layout of the FITS product (``PRODVER`` in the primary header).
PRODUCT_VERSION = 1

#: ``FLAG`` bit of spaxels that are in no bin (masked, excluded or too faint):
#: every other map is NaN there. Bits 0-15 are reserved for
#: `~cubesfh.flags.BinFlag`.
FLAG_NOT_BINNED = 1 << 16

#: ``FLAG`` bit of bins that the pPXF baseline could not fit (its maps are NaN).
FLAG_PPXF_FAILED = 1 << 17

_KMS = u.km / u.s
_DEX_YR = u.dex(u.yr)
_PRODUCT_TYPE = "STELLAR_POPULATION_MAPS"

# Short descriptions of the flag bits (header comments, docs).
_FLAG_COMMENTS = {
    "SIGMA_TOO_HIGH": "sigma >= every model's dispersion: not broadened",
    "PHOTOMETRY_NONPOSITIVE": "an HST band <= 0, NaN or not covered",
    "KINEMATICS_FAILED": "kinematic fit failed or missing",
    "KINEMATICS_AT_BOUND": "kinematic fit at a bound",
    "SPECTRUM_FAILED": "rest-frame spectrum not prepared",
    "SPECTRUM_INCOMPLETE": "over 25 % of 4800-7000 A rest has no data",
    "NO_PHOTOMETRY": "no HST images given",
    "OUT_OF_DISTRIBUTION": "CNN ood_score > 1: outside training set",
    "DISAGREE": "|CNN - pPXF| > 2 combined sigma in a mean",
    "KINEMATICS_SUSPECT": "kinematic chi2 or velocity an outlier",
    "SKY_SUSPECT": "negative continuum or low MUSE/HST flux",
    "SPECTRAL_GAP": "pixels missing in 4800-7000 A rest",
    "POOR_FIT": "CNN_CHI2 above the limit for correct answers",
    "PHOT_TENSION": "HST fluxes disagree with the spectrum's answer",
    "NOT_BINNED": "spaxel in no bin: maps are NaN",
    "PPXF_FAILED": "pPXF baseline fit failed",
}

# Flags in the quick-look figure, most serious first, and their colours.
_FLAG_PRIORITY = ("SPECTRUM_FAILED", "KINEMATICS_FAILED", "SPECTRUM_INCOMPLETE",
                  "OUT_OF_DISTRIBUTION", "POOR_FIT", "PHOT_TENSION", "PPXF_FAILED",
                  "DISAGREE", "SKY_SUSPECT", "KINEMATICS_SUSPECT", "SPECTRAL_GAP",
                  "KINEMATICS_AT_BOUND", "SIGMA_TOO_HIGH", "PHOTOMETRY_NONPOSITIVE",
                  "NO_PHOTOMETRY")
_FLAG_COLOURS = ("#4477aa", "#cc3311", "#ee7733", "#ccbb44", "#aa3377", "#66ccee",
                 "#228833", "#bbbbbb", "#000000")

# Versions recorded in the primary header: package -> 8-character keyword.
_VERSION_KEYS = {
    "cubesfh": "CSFH_VER",
    "numpy": "NPY_VER",
    "scipy": "SCPY_VER",
    "astropy": "APY_VER",
    "photutils": "PHOT_VER",
    "reproject": "REPR_VER",
    "vorbin": "VORB_VER",
    "ppxf": "PPXF_VER",
    "torch": "TRCH_VER",
    "matplotlib": "MPL_VER",
}

# Kinematic columns copied from PreparedObservation.kinematics.
_KIN_COLUMNS = ("velocity", "velocity_los", "sigma", "velocity_err", "sigma_err")

# Per-bin result columns: name (without the cnn_/ppxf_ prefix), unit, per age bin?, description.
_RESULT_COLUMNS = (
    ("logage_lw", _DEX_YR, False, "light-weighted (V band) mean log10(age / yr)"),
    ("logage_mw", _DEX_YR, False, "mass-weighted mean log10(age / yr)"),
    ("zh_lw", u.dex, False, "light-weighted (V band) mean [Z/H]"),
    ("zh_mw", u.dex, False, "mass-weighted mean [Z/H]"),
    ("mass_fraction", u.dimensionless_unscaled, True,
     "fraction of the living stellar mass in each age bin"),
    ("zh", u.dex, True, "[Z/H] of the stars of each age bin"),
    ("light_fraction", u.dimensionless_unscaled, True,
     "fraction of the V-band light in each age bin"),
)
_REQUIRED_RESULTS = ("logage_lw", "logage_mw", "zh_lw", "zh_mw", "mass_fraction", "zh")

_MEANS = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")
_MEAN_UNITS = {"logage_lw": _DEX_YR, "logage_mw": _DEX_YR, "zh_lw": u.dex, "zh_mw": u.dex}
_PERCENTILE_DOCS = {"p16": "16th percentile (68% interval)", "p84": "84th percentile (68%)",
                    "p02": "2.5th percentile (95% interval)", "p98": "97.5th percentile (95%)",
                    "err": "half-width of the 68% interval"}
# Optional per-bin uncertainty columns: name (without cnn_/ppxf_), unit, per age bin?,
# description, whether pPXF can have it (Monte Carlo).
_UNCERTAINTY_COLUMNS = tuple(
    (f"{q}_{s}", _MEAN_UNITS[q], False, f"{q} {_PERCENTILE_DOCS[s]}", s in ("p16", "p84"))
    for q in _MEANS for s in ("p16", "p84", "p02", "p98", "err")) + tuple(
    (f"mass_fraction_{s}", u.dimensionless_unscaled, True,
     f"mass_fraction {_PERCENTILE_DOCS[s]}", s in ("p16", "p84"))
    for s in ("p16", "p84", "p02", "p98")) + (
    ("ood_score", u.dimensionless_unscaled, False,
     "out-of-distribution score (>1: outside training set)", False),
    ("ood_latent", u.dimensionless_unscaled, False, "ood_score part: latent distance", False),
    ("ood_recon", u.dimensionless_unscaled, False, "ood_score part: reconstruction", False),
) + tuple(
    (f"av_stars{s}", u.mag, False,
     "effective V-band attenuation of the stellar light" + (f" {_PERCENTILE_DOCS[s[1:]]}"
                                                            if s else ""), False)
    for s in ("", "_p16", "_p84", "_p02", "_p98", "_err")) + (
    ("logmstar_sd_err", u.dex, False, "half-width of the 68% interval of log Sigma_star",
     False),
    ("logmstar_sd_err95", u.dex, False, "half-width of the 95% interval of log Sigma_star",
     False),
    ("log_ml_v_head", u.dex, False, "attenuation head's own log M/L_V (a check)", False),
) + tuple(
    (f"mass_younger_{a}{s}", u.dimensionless_unscaled, False,
     f"living-mass fraction younger than {a}" + (f" {_PERCENTILE_DOCS[s[1:]]}" if s else ""),
     False)
    for a in ("100myr", "1gyr", "5gyr") for s in ("", "_p16", "_p84", "_p02", "_p98"))

# Fit check (cubesfh.pipeline.fit_check_bins): result key, column, unit, per band?,
# description.
_FIT_COLUMNS = (
    ("fit_chi2", "cnn_fit_chi2", None, False,
     "reduced chi2 of the re-synthesised CNN answer (spectrum)"),
    ("fit_chi2_limit", "cnn_fit_chi2_limit", None, False,
     "POOR_FIT limit of cnn_fit_chi2 at the bin's S/N"),
    ("fit_snr", "fit_snr", None, False, "S/N per A of the prepared spectrum, 5300-5500 A"),
    ("av_fit", "cnn_av_fit", u.mag, False, "Calzetti A_V fitted to the HST fluxes"),
    ("phot_model", "cnn_phot_model", None, True,
     "HST fluxes implied by the CNN answer (units of phot_*)"),
    ("phot_resid", "cnn_phot_resid", None, True, "HST measured / implied - 1, per band"),
    ("phot_chi2", "cnn_phot_chi2", None, False, "HST chi2 per dof of the CNN answer"),
    ("phot_chi2_limit", "cnn_phot_chi2_limit", None, False,
     "POOR_FIT limit of cnn_phot_chi2"),
    ("tension", "tension", None, False,
     "max |HST - spectrum-only answer| over bands, in sigma"),
    ("tension_limit", "tension_limit", None, False, "PHOT_TENSION limit of tension"),
    ("tension_z", "tension_z", None, True, "HST - spectrum-only answer per band, in sigma"),
)
_FIT_IMAGES = (
    ("CNN_CHI2", "cnn_fit_chi2", "reduced chi2 of the re-synthesised CNN answer"),
    ("PPXF_CHI2", "ppxf_fit_chi2", "reduced chi2 of the pPXF fit, same pixels and noise"),
    ("AV_FIT", "cnn_av_fit", "Calzetti A_V of the re-synthesis fitted to the HST fluxes"),
    ("PHOT_RESID", "cnn_phot_resid", "HST flux measured / implied by the CNN answer - 1"),
    ("TENSION", "tension", "HST fluxes against the spectrum-only answer (sigma)"),
)
_BAND_CUBES = ("PHOT_RESID",)

# Physical quantities (cubesfh.physical, with a distance): column (without cnn_), unit,
# per age bin?, description.
_PHYSICAL_COLUMNS = (
    ("ml_v", u.solMass / u.solLum, False,
     "dust-free M/L_V, stars + remnants (templates, SFH, Z(t))"),
    ("ml_v_living", u.solMass / u.solLum, False, "dust-free M/L_V, living stars only"),
    ("logmstar_sd", u.dex(u.solMass / u.pc**2), False,
     "log stellar-mass surface density, stars + remnants"),
    ("logmstar_sd_p16", u.dex(u.solMass / u.pc**2), False, "16th percentile of logmstar_sd"),
    ("logmstar_sd_p84", u.dex(u.solMass / u.pc**2), False, "84th percentile of logmstar_sd"),
    ("logmstar_sd_living", u.dex(u.solMass / u.pc**2), False,
     "log stellar-mass surface density, living stars"),
    ("logmstar_sd_deproj", u.dex(u.solMass / u.pc**2), False,
     "logmstar_sd deprojected (times cos i)"),
    ("logmstar", u.dex(u.solMass), False, "log stellar mass of the bin (stars + remnants)"),
    ("sfr_sd", u.solMass / u.yr / u.kpc**2, True,
     "mean SFR surface density per age bin (formed mass)"),
    ("sfr_sd_p16", u.solMass / u.yr / u.kpc**2, True, "16th percentile of sfr_sd"),
    ("sfr_sd_p84", u.solMass / u.yr / u.kpc**2, True, "84th percentile of sfr_sd"),
    ("logsfr_sd_100myr", u.dex(u.solMass / u.yr / u.kpc**2), False,
     "log mean SFR surface density over the last 100 Myr"),
    ("logsfr_sd_100myr_p16", u.dex(u.solMass / u.yr / u.kpc**2), False,
     "16th percentile of logsfr_sd_100myr"),
    ("logsfr_sd_100myr_p84", u.dex(u.solMass / u.yr / u.kpc**2), False,
     "84th percentile of logsfr_sd_100myr"),
)

# Image extensions: extension name, column of BINS, description.
_BASE_IMAGES = (
    ("SNR", "snr", "S/N per Angstrom of the bin (binning window)"),
    ("V_STARS", "velocity", "stellar velocity relative to the systemic velocity"),
    ("SIGMA_STARS", "sigma", "stellar velocity dispersion"),
)
_MEAN_IMAGES = (
    ("LOGAGE_LW", "logage_lw", "light-weighted mean log10(age / yr)"),
    ("LOGAGE_MW", "logage_mw", "mass-weighted mean log10(age / yr)"),
    ("ZH_LW", "zh_lw", "light-weighted mean [Z/H]"),
    ("ZH_MW", "zh_mw", "mass-weighted mean [Z/H]"),
)
_CUBE_IMAGES = (
    ("SFH", "mass_fraction", "living-mass fraction in each of the 16 age bins"),
    ("ZH_AGE", "zh", "[Z/H] of each of the 16 age bins (NaN: no mass)"),
)
# Uncertainty image extensions (with uncertainty columns): extension, column, description.
_INTERVAL_IMAGES = tuple(
    (f"{e}_{p.upper()}", f"{c}_{p}", f"{p[1:]}th percentile of {d}")
    for e, c, d in _MEAN_IMAGES for p in ("p16", "p84")) + (
    ("SFH_P16", "mass_fraction_p16", "16th percentile of the living-mass fraction per age bin"),
    ("SFH_P84", "mass_fraction_p84", "84th percentile of the living-mass fraction per age bin"),
)
# Physical image extensions, written when their column is in BINS: extension, column,
# description. AV_STARS and ML_V need the attenuation head; the rest a distance.
_PHYSICAL_IMAGES = (
    ("AV_STARS", "cnn_av_stars", "effective V-band attenuation of the stellar light"),
    ("AV_STARS_P16", "cnn_av_stars_p16", "16th percentile of AV_STARS"),
    ("AV_STARS_P84", "cnn_av_stars_p84", "84th percentile of AV_STARS"),
    ("ML_V", "cnn_ml_v", "dust-free M/L_V, stars + remnants"),
    ("LOGMSTAR_SD", "cnn_logmstar_sd", "log stellar-mass surface density (stars+remnants)"),
    ("LOGMSTAR_SD_P16", "cnn_logmstar_sd_p16", "16th percentile of LOGMSTAR_SD"),
    ("LOGMSTAR_SD_P84", "cnn_logmstar_sd_p84", "84th percentile of LOGMSTAR_SD"),
    ("LOGMSTAR_SD_DEPROJ", "cnn_logmstar_sd_deproj", "LOGMSTAR_SD deprojected (x cos i)"),
    ("SFR_SD", "cnn_sfr_sd", "mean SFR surface density in each age bin (formed mass)"),
    ("SFR_SD_P16", "cnn_sfr_sd_p16", "16th percentile of SFR_SD"),
    ("SFR_SD_P84", "cnn_sfr_sd_p84", "84th percentile of SFR_SD"),
    ("LOGSFR_SD_100MYR", "cnn_logsfr_sd_100myr", "log mean SFR surface density, last 100 Myr"),
    ("LOGSFR_SD_100MYR_P16", "cnn_logsfr_sd_100myr_p16", "16th percentile of LOGSFR_SD_100MYR"),
    ("LOGSFR_SD_100MYR_P84", "cnn_logsfr_sd_100myr_p84", "84th percentile of LOGSFR_SD_100MYR"),
)
_CUBE_NAMES = ("SFH", "ZH_AGE", "SFH_P16", "SFH_P84", "SFR_SD", "SFR_SD_P16", "SFR_SD_P84")

_COLUMN_DOCS = {
    "bin": "bin number (value of BIN_ID)",
    "x": "centroid column, zero-based pixel",
    "y": "centroid row, zero-based pixel",
    "ra": "right ascension of the centroid",
    "dec": "declination of the centroid",
    "n_spaxels": "number of spaxels in the bin",
    "snr": "S/N per Angstrom reached by the bin",
    "velocity": "stellar velocity relative to the systemic velocity",
    "velocity_los": "line-of-sight stellar velocity (observed)",
    "sigma": "stellar velocity dispersion",
    "velocity_err": "error of velocity",
    "sigma_err": "error of sigma",
    "sigma_target": "common dispersion the spectrum was broadened to (selects the model)",
    "norm": "mean rest-frame flux density in 5300-5500 A per spaxel",
    "gap_fraction": "fraction of 4800-7000 A rest missing (filled by a fit)",
    "v_flux": "mean of the prepared spectrum in 5450-5550 A (V), in units of norm",
    "flag": "quality bitmask (BinFlag bits + PPXF_FAILED)",
    "ppxf_flag": "BaselineFlag of the pPXF fit",
    "ppxf_av": "Calzetti A_V of the pPXF fit",
    "ppxf_chi2": "reduced chi2 of the pPXF fit",
    "ppxf_n_mc": "pPXF Monte-Carlo realisations fitted",
    **{f"ppxf_{q}_err": "pPXF scatter on the synthetic test set (sigma without Monte Carlo)"
       for q in _MEANS},
}


def flag_bits():
    """
    Every bit of the ``FLAG`` extension.

    Returns
    -------
    bits : list of tuple
        ``(bit, value, name, description)`` for the `~cubesfh.flags.BinFlag`
        bits, `FLAG_NOT_BINNED` and `FLAG_PPXF_FAILED`, in bit order.
    """
    out = []
    members = [(int(f.value), f.name) for f in BinFlag if f.value]
    members += [(FLAG_NOT_BINNED, "NOT_BINNED"), (FLAG_PPXF_FAILED, "PPXF_FAILED")]
    for value, name in sorted(members):
        bit = int(value).bit_length() - 1
        out.append((bit, value, name, _FLAG_COMMENTS.get(name, name.lower().replace("_", " "))))
    return out


def decode_flags(value):
    """
    Names of the bits set in one ``FLAG`` value.

    Parameters
    ----------
    value : int
        A value of the ``FLAG`` map or of the ``flag`` column.

    Returns
    -------
    names : list of str
        Empty for a usable bin.

    Examples
    --------
    >>> from cubesfh.maps import decode_flags
    >>> decode_flags(65536 | 1)
    ['SIGMA_TOO_HIGH', 'NOT_BINNED']
    """
    value = int(value)
    return [name for _, bit_value, name, _ in flag_bits() if value & bit_value]


# ----------------------------------------------------------------------------- helpers


def _versions():
    """Versions of cubesfh and of the libraries its results depend on."""
    from . import __version__

    out = {}
    for pkg in _VERSION_KEYS:
        if pkg == "cubesfh":
            out[pkg] = __version__
            continue
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _jsonable(value):
    """Plain JSON types for provenance values (Quantities and paths as strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, u.Quantity):
        return str(value)
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray)
                                       else value)]
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _normalize_meta(meta):
    """Provenance as a JSON-equivalent dict with ``date`` and ``versions`` filled in."""
    meta = dict(meta or {})
    meta.setdefault("date", _now())
    meta.setdefault("versions", _versions())
    meta.setdefault("model_id", "")
    meta.setdefault("model_sha256", "")
    meta["inputs"] = _normalize_inputs(meta.get("inputs"))
    meta.setdefault("parameters", {})
    return json.loads(json.dumps(_jsonable(meta)))


def _normalize_inputs(inputs):
    """Input files as ``{file name: sha256}``."""
    if not inputs:
        return {}
    if isinstance(inputs, dict):
        return {os.fspath(k) if isinstance(k, os.PathLike) else str(k): str(v)
                for k, v in inputs.items()}
    out = {}
    for item in inputs:
        if isinstance(item, dict):
            out[str(item.get("name", item.get("file", "")))] = str(item.get("sha256", ""))
        else:
            name, sha = item
            out[os.fspath(name) if isinstance(name, os.PathLike) else str(name)] = str(sha)
    return out


def _is_log(unit):
    """``dex`` or a logarithmic function unit such as ``dex(yr)``."""
    return isinstance(unit, u.FunctionUnitBase) or (isinstance(unit, u.UnitBase)
                                                     and unit == u.dex)


def _unit_string(unit):
    """
    FITS unit string (``TUNITn``, ``BUNIT``).

    A logarithmic quantity (``dex``, ``dex(yr)``) is a plain number in FITS: its
    unit string is empty (no FITS reader can parse ``dex``, and astropy's does
    not parse the FITS-standard ``log(yr)`` either). The meaning goes into the
    comment (`_log_note`) and, in ``BINS``, the astropy unit into ``TLOGUn``.
    """
    if unit is None or unit == u.dimensionless_unscaled or _is_log(unit):
        return ""
    try:
        return unit.to_string("fits")
    except ValueError:
        return unit.to_string()


def _log_note(unit):
    """What a logarithmic value is, for a comment: 'log10(yr)' or 'dex'."""
    physical = getattr(unit, "physical_unit", u.dimensionless_unscaled)
    if physical == u.dimensionless_unscaled:
        return "dex"
    return f"log10({physical.to_string('fits')})"


def _plot_label(unit):
    """Colour-bar label of a unit: 'log(age/yr)' for dex(yr), no astropy spellings."""
    if unit is None or unit == u.dimensionless_unscaled:
        return ""
    if _is_log(unit):
        physical = getattr(unit, "physical_unit", u.dimensionless_unscaled)
        if physical == u.dimensionless_unscaled:
            return "dex"
        name = "age" if physical.physical_type == "time" else "x"
        return f"log({name}/{physical.to_string()})"
    if unit == u.AA:
        return "Å"
    return unit.to_string()


def _parse_unit(text, *, log_unit=None):
    """Inverse of `_unit_string` (``log_unit``: the ``TLOGUn`` value, if any)."""
    if log_unit:
        return u.Unit(str(log_unit))
    text = (text or "").strip()
    if not text:
        return None
    try:
        return u.Unit(text, format="fits")
    except ValueError:
        pass
    try:
        return u.Unit(text)
    except ValueError:
        return u.Unit(text, parse_strict="silent")


def _plain_values(name, values, unit):
    """Values of a column as a float array in ``unit`` (accepts plain arrays)."""
    unit_in = getattr(values, "unit", None)
    if unit_in is not None and unit is not None:
        if not isinstance(values, u.Quantity):  # e.g. a Table Column with a unit
            values = np.asarray(values) * u.Unit(unit_in)
        try:
            values = values.to_value(unit)
        except u.UnitsError as exc:
            msg = (f"{name} has unit {values.unit}, which cannot be converted to {unit}; "
                   f"give it in {unit}.")
            raise CubeSFHError(msg) from exc
    return np.array(getattr(values, "value", values), dtype=float)


def _keys(result):
    return list(result.colnames) if hasattr(result, "colnames") else list(result.keys())


def _per_bin(result, key, n_bins, *, source, vector, unit=None):
    """One row per bin of ``result[key]`` as a float array, shape checked."""
    values = _plain_values(f"{source}[{key!r}]", result[key], unit)
    expected = (n_bins, N_AGE_BINS) if vector else (n_bins,)
    if values.shape != expected:
        what = "(n_bins, 16)" if vector else "(n_bins,)"
        msg = (f"{source}[{key!r}] has shape {values.shape}; expected {what} = {expected}, "
               "one row per bin in bin-number order.")
        raise CubeSFHError(msg)
    return values


def _fit_results(cnn):
    """The fit-check entries of a CNN result (`~cubesfh.pipeline.fit_check_bins`)."""
    keys = _keys(cnn)
    names = {k for k, *_ in _FIT_COLUMNS} | {"tension_band", "poor_fit", "phot_tension"}
    return {k: cnn[k] for k in keys if k in names}


def _centroids(bin_map, n_bins):
    labels = bin_map.ravel()
    inside = labels >= 0
    yy, xx = np.indices(bin_map.shape)
    n = np.bincount(labels[inside], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.bincount(labels[inside], weights=xx.ravel()[inside], minlength=n_bins) / n
        y = np.bincount(labels[inside], weights=yy.ravel()[inside], minlength=n_bins) / n
    return x, y, n


def _sky(wcs, x, y):
    """Right ascension and declination (deg) of zero-based pixel positions."""
    world = wcs.pixel_to_world_values(x, y)
    lon, lat = (world[1], world[0]) if wcs.wcs.lng == 1 else (world[0], world[1])
    return np.asarray(lon, float) * u.deg, np.asarray(lat, float) * u.deg


def _celestial(wcs):
    if not isinstance(wcs, WCS):
        msg = (f"wcs must be an astropy.wcs.WCS (the cube's celestial WCS, e.g. "
               f"bins.celestial_wcs), got {type(wcs).__name__}.")
        raise CubeSFHError(msg)
    if not wcs.has_celestial:
        msg = ("wcs has no celestial axes; pass the cube's celestial WCS "
               "(cube.celestial_wcs or bins.celestial_wcs).")
        raise CubeSFHError(msg)
    cel = wcs.celestial if wcs.naxis != 2 else wcs.deepcopy()
    if cel.naxis != 2:
        msg = "wcs must have exactly two celestial axes (RA, Dec)."
        raise CubeSFHError(msg)
    return cel


def _header_card(header, key, value, comment=""):
    """
    Append a card, shortening its comment to fit in 80 characters.

    Cards that cannot fit at all (a long HIERARCH key with a number) are
    skipped: their value is also in the ``PROVJSON`` card.
    """
    if isinstance(value, float) and not math.isfinite(value):
        value = str(value)
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    if isinstance(value, str):
        value = value.encode("ascii", "replace").decode("ascii")
    comment = comment.encode("ascii", "replace").decode("ascii")
    for text in (comment, comment[:max(0, 80 - 12 - _value_width(key, value))], ""):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                card = fits.Card(key, value, text)
                str(card)  # formatting raises or warns when the card does not fit
                card.verify("exception")
        except (ValueError, fits.verify.VerifyError, Warning):
            continue
        header.append(card)
        return
    log.debug("provenance card %s does not fit in a FITS card; kept in PROVJSON", key)


def _value_width(key, value):
    """Length of a card image without comment (last line for long strings)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = str(fits.Card(key, value))
    except ValueError:
        return 80
    return len(image[-80:].rstrip())


def _flatten(prefix, value):
    """Flatten nested dicts into (``'A B C'``, value) pairs for HIERARCH keys."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(f"{prefix} {str(k).upper()}".strip(), v)
    else:
        yield prefix, value


def _sigma(table, prefix, col):
    """
    Half-width of the 68 per cent interval of a column, 0 where there is none.

    pPXF without Monte Carlo has a ``ppxf_<name>_err`` column instead: the scatter
    of pPXF on the synthetic test set of the network of the bin's dispersion.
    """
    if prefix + col + "_p16" not in table.colnames:
        if prefix + col + "_err" in table.colnames:
            e = table[prefix + col + "_err"]
            return np.nan_to_num(np.asarray(getattr(e, "value", e), float))
        return np.zeros(len(table))
    hi = np.asarray(getattr(table[prefix + col + "_p84"], "value", table[prefix + col + "_p84"]),
                    float)
    lo = np.asarray(getattr(table[prefix + col + "_p16"], "value", table[prefix + col + "_p16"]),
                    float)
    return (hi - lo) / 2


def _synthetic_ppxf_errors(table):
    """
    ``ppxf_<name>_err``: pPXF's measured scatter on the synthetic test set, where
    pPXF has no Monte-Carlo intervals (per bin, from the bundled network of the
    bin's dispersion; NaN for a dispersion no bundled network has).
    """
    if "sigma_target" not in table.colnames:
        return
    try:
        from .network import bundled_models

        stats = {float(m.sigma_target.value): m.meta.get("metrics", {}).get("comparison", {})
                 .get("ppxf", {}) for m in bundled_models()}
    except Exception:  # no torch or no metrics: leave the errors out
        return
    st = np.asarray(getattr(table["sigma_target"], "value", table["sigma_target"]), float)
    for col in _MEANS:
        if "ppxf_" + col not in table.colnames or "ppxf_" + col + "_p16" in table.colnames:
            continue
        err = np.full(len(table), np.nan)
        for sig, s in stats.items():
            if col in s:
                err[np.isclose(st, sig)] = s[col]["scatter"]
        unit = getattr(table["ppxf_" + col], "unit", None)
        table["ppxf_" + col + "_err"] = err if unit is None else err * unit


def disagreement(table, columns=_MEANS):
    """
    CNN - pPXF difference in units of the combined sigma.

    ``(cnn - ppxf) / sqrt(sigma_cnn**2 + sigma_ppxf**2)`` with each sigma half
    its 68 per cent interval (``(p84 - p16) / 2``; 0 where it has none).

    Parameters
    ----------
    table : `~astropy.table.Table`
        The per-bin table (``cnn_<name>``, ``ppxf_<name>`` and optionally
        ``<prefix><name>_p16``, ``_p84``).
    columns : tuple of str, optional
        One column: its signed ratio. Several: the largest absolute ratio
        (NaN where none is finite).

    Returns
    -------
    ratio : `~numpy.ndarray`
        Per bin; NaN where a value is missing or the combined sigma is 0.
    """
    out = []
    for col in columns:
        if "ppxf_" + col not in table.colnames:
            return np.full(len(table), np.nan)
        a = np.asarray(getattr(table["cnn_" + col], "value", table["cnn_" + col]), float)
        b = np.asarray(getattr(table["ppxf_" + col], "value", table["ppxf_" + col]), float)
        sig = np.hypot(_sigma(table, "cnn_", col), _sigma(table, "ppxf_", col))
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(sig > 0, (a - b) / sig, np.nan))
    if len(out) == 1:
        return out[0]
    stack = np.abs(np.array(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(stack, axis=0)


# ----------------------------------------------------------------------------- I/O classes


class StellarPopulationMapsRead(registry.UnifiedReadWrite):
    """
    Read a stellar-population maps product written by `StellarPopulationMaps.write`.

    The object is rebuilt from the ``PRIMARY`` (provenance), ``BIN_ID`` (bin
    map and WCS) and ``BINS`` (per-bin values) extensions::

      >>> from cubesfh.maps import StellarPopulationMaps
      >>> maps = StellarPopulationMaps.read("NGC0628_maps.fits")  # doctest: +SKIP

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The FITS file.
    format : str, optional
        ``'cubesfh-maps'`` (the default and only format).

    Returns
    -------
    maps : `StellarPopulationMaps`

    Notes
    -----
    """

    def __init__(self, instance, cls):
        super().__init__(instance, cls, "read", registry=None)

    def __call__(self, *args, format=None, **kwargs):
        return self.registry.read(self._cls, *args, format=format or "cubesfh-maps", **kwargs)


class StellarPopulationMapsWrite(registry.UnifiedReadWrite):
    """
    Write the maps to one FITS file, atomically (see :ref:`product`).

    The file is written to a temporary file beside ``path`` that replaces it
    only when complete: an interrupted write never leaves a half-written
    product::

      >>> maps.write("NGC0628_maps.fits", overwrite=True)  # doctest: +SKIP

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Output file.
    overwrite : bool, optional
        Replace an existing file (default `False`: `OSError` if it exists).
    format : str, optional
        ``'cubesfh-maps'`` (the default and only format).

    Notes
    -----
    """

    def __init__(self, instance, cls):
        super().__init__(instance, cls, "write", registry=None)

    def __call__(self, *args, format=None, **kwargs):
        return self.registry.write(self._instance, *args, format=format or "cubesfh-maps",
                                   **kwargs)


# ----------------------------------------------------------------------------- the product


class StellarPopulationMaps:
    """
    Stellar-population maps of a cube: per-bin results on the cube's sky grid.

    Usually made with `from_results` from a
    `~cubesfh.preprocess.PreparedObservation` and the CNN (and pPXF) outputs;
    written with `write`, read back with `read`, looked at with `plot`.

    Parameters
    ----------
    bin_map : array-like of int, shape (ny, nx)
        Bin number of every spaxel, ``-1`` outside all bins.
    table : `~astropy.table.QTable`
        One row per bin, in bin-number order. Required columns:
        ``cnn_logage_lw``, ``cnn_logage_mw`` (``dex(yr)`` or plain numbers,
        log10 of the age in yr), ``cnn_zh_lw``, ``cnn_zh_mw`` (dex), and the
        ``(n_bins, 16)`` columns ``cnn_mass_fraction`` and ``cnn_zh``. The
        same names with the prefix ``ppxf_`` add the pPXF baseline (all six
        or none). Optional columns (filled in when missing): ``bin``, ``x``,
        ``y`` (centroid, zero-based pixels), ``ra``, ``dec``, ``n_spaxels``,
        ``snr``, ``velocity``, ``sigma`` (km/s) and ``flag``; any other
        column is kept and written to ``BINS``.
    wcs : `~astropy.wcs.WCS`
        Celestial WCS of ``bin_map`` (the cube's; a WCS with more axes is
        reduced to its celestial part).
    meta : dict, optional
        Provenance: ``model_id``, ``model_sha256``, ``inputs`` (file name ->
        SHA-256), ``parameters`` (any nested dict), ``date``, ``versions``
        (filled in with the installed versions when missing) and any other
        keys. Stored as plain JSON types.

    Attributes
    ----------
    bin_map : `~numpy.ndarray` of int32
    table : `~astropy.table.QTable`
        The per-bin values (the ``BINS`` extension).
    wcs : `~astropy.wcs.WCS`
        Celestial WCS.
    meta : dict

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.table import QTable
    >>> from astropy.wcs import WCS
    >>> from cubesfh.maps import StellarPopulationMaps
    >>> wcs = WCS(naxis=2)
    >>> wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> wcs.wcs.crval = [150.0, 2.0]
    >>> wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    >>> bin_map = np.array([[0, 0, 1], [-1, 1, 1]])
    >>> t = QTable()
    >>> t["cnn_logage_lw"] = [9.0, 8.0]
    >>> t["cnn_logage_mw"] = [9.8, 9.5]
    >>> t["cnn_zh_lw"] = [0.0, -0.3]
    >>> t["cnn_zh_mw"] = [0.1, -0.2]
    >>> t["cnn_mass_fraction"] = np.full((2, 16), 1 / 16)
    >>> t["cnn_zh"] = np.zeros((2, 16))
    >>> maps = StellarPopulationMaps(bin_map, t, wcs=wcs)
    >>> maps["LOGAGE_LW"]
    <Dex [[ 9.,  9.,  8.],
          [nan,  8.,  8.]] dex(yr)>
    >>> maps["SFH"].shape
    (16, 2, 3)
    """

    read = registry.UnifiedReadWriteMethod(StellarPopulationMapsRead)
    write = registry.UnifiedReadWriteMethod(StellarPopulationMapsWrite)

    def __init__(self, bin_map, table, *, wcs, meta=None):
        bin_map = np.asarray(bin_map)
        if bin_map.ndim != 2 or not np.issubdtype(bin_map.dtype, np.integer):
            msg = ("bin_map must be a 2-D integer array (bin number per spaxel, -1 outside "
                   f"all bins); got dtype {bin_map.dtype} and shape {bin_map.shape}.")
            raise CubeSFHError(msg)
        if bin_map.size == 0 or bin_map.max() < 0:
            msg = "bin_map has no bins (all values are -1); there is nothing to map."
            raise CubeSFHError(msg)
        if bin_map.min() < -1:
            msg = "bin_map has values below -1; use -1 for spaxels outside all bins."
            raise CubeSFHError(msg)
        self.bin_map = bin_map.astype(np.int32)
        self.wcs = _celestial(wcs)
        n = self.n_bins
        table = QTable(table, copy=True)
        if len(table) != n:
            msg = (f"table has {len(table)} rows but bin_map has {n} bins (0..{n - 1}); give "
                   "one row per bin in bin-number order.")
            raise CubeSFHError(msg)
        self.table = self._complete(table)
        self.meta = _normalize_meta(meta)

    # ------------------------------------------------------------------ construction

    def _complete(self, table):
        """Check the result columns, give them units, fill in the optional columns."""
        n = self.n_bins
        for prefix, source in (("cnn_", "CNN"), ("ppxf_", "pPXF")):
            present = [k for k in _REQUIRED_RESULTS if prefix + k in table.colnames]
            if prefix == "ppxf_" and not present:
                continue
            missing = [prefix + k for k in _REQUIRED_RESULTS if k not in present]
            if missing:
                msg = (f"table lacks the {source} columns {missing}; the maps need "
                       f"{[prefix + k for k in _REQUIRED_RESULTS]}.")
                raise CubeSFHError(msg)
            for key, unit, vector, doc in _RESULT_COLUMNS:
                name = prefix + key
                if name not in table.colnames:
                    continue
                values = _per_bin(table, name, n, source="table", vector=vector, unit=unit)
                table[name] = values * unit
                table[name].info.description = f"{source}: {doc}"
            for key, unit, vector, doc, _ in _UNCERTAINTY_COLUMNS:
                name = prefix + key
                if name in table.colnames:
                    values = _per_bin(table, name, n, source="table", vector=vector,
                                      unit=unit)
                    table[name] = values * unit
                    table[name].info.description = f"{source}: {doc}"
        if "bin" in table.colnames:
            if not np.array_equal(np.asarray(table["bin"]), np.arange(n)):
                msg = "table['bin'] must be 0, 1, ..., n_bins - 1 (rows in bin-number order)."
                raise CubeSFHError(msg)
        else:
            table.add_column(np.arange(n, dtype=np.int32), name="bin", index=0)
        x, y, count = _centroids(self.bin_map, n)
        defaults = [("x", x), ("y", y)]
        for i, (name, values) in enumerate(defaults):
            if name not in table.colnames:
                table.add_column(values, name=name, index=1 + i)
        if "ra" not in table.colnames:
            ra, dec = _sky(self.wcs, np.asarray(table["x"], float),
                           np.asarray(table["y"], float))
            table.add_column(ra, name="ra", index=3)
            table.add_column(dec, name="dec", index=4)
        if "n_spaxels" not in table.colnames:
            table.add_column(count.astype(np.int32), name="n_spaxels", index=5)
        for name, unit in (("snr", None), ("velocity", _KMS), ("sigma", _KMS)):
            if name not in table.colnames:
                values = np.full(n, np.nan)
                table[name] = values if unit is None else values * unit
            elif unit is not None:
                table[name] = _plain_values(f"table[{name!r}]", table[name], unit) * unit
        if "flag" not in table.colnames:
            table["flag"] = np.zeros(n, dtype=np.int32)
        for name in table.colnames:
            if not table[name].info.description and name in _COLUMN_DOCS:
                table[name].info.description = _COLUMN_DOCS[name]
        return table

    @classmethod
    def from_results(cls, prepared, cnn, ppxf=None, *, provenance=None):
        """
        Build the maps from the prepared observation and the per-bin results.

        Parameters
        ----------
        prepared : `~cubesfh.preprocess.PreparedObservation`
            Bins (bin map, WCS, S/N), kinematics, normalisations, network
            inputs and flags.
        cnn : dict or `~astropy.table.Table`
            Output of `~cubesfh.network.SFHModel.predict`, one row per bin:
            ``mass_fraction`` (n, 16), ``metallicity`` (or ``zh``) (n, 16,
            [Z/H]), ``logage_lw``, ``logage_mw``, ``zh_lw``, ``zh_mw`` (n,)
            and optionally ``light_fraction``.
        ppxf : dict or `~astropy.table.Table`, optional
            The pPXF baseline (`~cubesfh.baseline.fit_populations`), same keys
            with ``zh`` (NaN for age bins without mass) and optionally
            ``flag`` (`~cubesfh.baseline.BaselineFlag`), ``failed`` (bool),
            ``av`` and ``chi2``. Bins whose fit failed (flag ``NO_DATA`` or
            ``FIT_FAILED``, ``failed`` or non-finite means) get the
            `FLAG_PPXF_FAILED` bit. A table's ``meta`` goes into the
            provenance parameters.
        provenance : dict, optional
            ``model_id``, ``model_sha256``, ``inputs`` (file name -> SHA-256,
            or a list of ``(name, sha256)``), ``parameters`` (dict), ``date``
            and any other keys. Completed with ``prepared.meta`` (cube file
            and checksum, binning parameters).

        Returns
        -------
        maps : `StellarPopulationMaps`
        """
        bins = prepared.bins
        n = int(bins.n_bins)
        if getattr(bins, "celestial_wcs", None) is None:
            msg = ("prepared.bins has no celestial WCS; the maps need the cube's WCS "
                   "(bin the cube with cubesfh.binning.voronoi_bin).")
            raise CubeSFHError(msg)
        t = QTable()
        t["bin"] = np.arange(n, dtype=np.int32)
        t["x"] = np.asarray(bins.x, float)
        t["y"] = np.asarray(bins.y, float)
        ra, dec = _sky(_celestial(bins.celestial_wcs), t["x"], t["y"])
        t["ra"], t["dec"] = ra, dec
        t["n_spaxels"] = np.asarray(bins.n_spaxels, dtype=np.int32)
        t["snr"] = (np.full(n, np.nan) if bins.snr is None
                    else np.asarray(bins.snr, float))
        kin = prepared.kinematics
        for name in _KIN_COLUMNS:
            if kin is not None and name in kin.colnames:
                t[name] = _plain_values(f"kinematics[{name!r}]", kin[name], _KMS) * _KMS
            else:
                t[name] = np.full(n, np.nan) * _KMS
        st = getattr(prepared.spectra, "sigma_target", None)
        t["sigma_target"] = (np.full(n, np.nan) if st is None else np.broadcast_to(
            u.Quantity(st, _KMS).to_value(_KMS), (n,)).astype(float)) * _KMS
        norm = prepared.spectra.norm
        t["norm"] = norm if isinstance(norm, u.Quantity) else np.asarray(norm, float)
        flux = getattr(prepared.spectra, "flux", None)
        if flux is not None and np.shape(flux)[0] == n:
            from .gaps import gap_fraction

            t["gap_fraction"] = gap_fraction(flux) if n else np.zeros(0)
            from .physical import V_WINDOW, v_window_flux

            wave = getattr(prepared.spectra, "wavelength", None)
            if wave is not None and np.shape(flux)[1] == np.size(wave):
                wave = u.Quantity(wave, u.AA)
                if wave.min() <= V_WINDOW[0] and wave.max() >= V_WINDOW[1]:
                    t["v_flux"] = v_window_flux(np.asarray(flux), wave) if n else np.zeros(0)
        phot = prepared.photometry_normalized
        phot = (np.full((n, len(HST_BANDS)), np.nan) if phot is None
                else np.asarray(phot, float))
        if phot.shape != (n, len(HST_BANDS)):
            msg = (f"prepared.photometry_normalized has shape {phot.shape}; expected "
                   f"({n}, {len(HST_BANDS)}).")
            raise CubeSFHError(msg)
        for j, band in enumerate(HST_BANDS):
            t[f"phot_{band}"] = phot[:, j]
            t[f"phot_{band}"].info.description = (
                f"network input: {band} rest-frame flux density / norm")
        kcorr = getattr(prepared, "k_correction", None)
        if kcorr is not None:
            for j, band in enumerate(HST_BANDS):
                t[f"kcorr_{band}"] = np.asarray(kcorr, float)[:, j]
                t[f"kcorr_{band}"].info.description = (
                    f"K-correction applied to {band} (observed -> rest-frame WFC3/UVIS)")
            tau = getattr(prepared, "k_correction_tau", None)
            if tau is not None:
                t["kcorr_tau_v"] = np.asarray(tau, float)
                t["kcorr_tau_v"].info.description = "optical depth of the K-correction SED"
        flags = np.asarray(prepared.flags, dtype=np.int32).copy()

        for source, result, prefix in (("cnn", cnn, "cnn_"), ("ppxf", ppxf, "ppxf_")):
            if result is None:
                continue
            if source == "cnn" and isinstance(result, dict):
                # SFHModel.predict names the youngest cumulative fraction 0.1gyr
                result = {k.replace("0.1gyr", "100myr"): v for k, v in result.items()}
            keys = _keys(result)
            zh_key = "zh" if "zh" in keys else "metallicity"
            wanted = {"logage_lw": "logage_lw", "logage_mw": "logage_mw", "zh_lw": "zh_lw",
                      "zh_mw": "zh_mw", "mass_fraction": "mass_fraction", "zh": zh_key}
            missing = [k for k in wanted.values() if k not in keys]
            if missing:
                msg = (f"{source} lacks {missing}; give the per-bin outputs of "
                       f"{'SFHModel.predict' if source == 'cnn' else 'fit_populations'}.")
                raise CubeSFHError(msg)
            for key, unit, vector, _ in _RESULT_COLUMNS:
                src = wanted.get(key, key)
                if src in keys:
                    t[prefix + key] = _per_bin(result, src, n, source=source, vector=vector,
                                               unit=unit) * unit
            for key, unit, vector, _, in_ppxf in _UNCERTAINTY_COLUMNS:
                if key in keys and (source == "cnn" or in_ppxf):
                    t[prefix + key] = _per_bin(result, key, n, source=source, vector=vector,
                                               unit=unit) * unit
            if source == "cnn" and "ood_score" in keys:
                with np.errstate(invalid="ignore"):
                    ood = np.asarray(t["cnn_ood_score"].value) > 1
                flags[ood] |= int(BinFlag.OUT_OF_DISTRIBUTION)
            if source == "ppxf":
                failed = ~np.isfinite(t["ppxf_logage_lw"].value)
                if "flag" in keys:
                    from .baseline import BaselineFlag

                    pflag = np.asarray(result["flag"], dtype=np.int32)
                    t["ppxf_flag"] = pflag
                    failed |= (pflag & int(BaselineFlag.NO_DATA | BaselineFlag.FIT_FAILED)) > 0
                if "failed" in keys:
                    failed |= np.asarray(result["failed"], dtype=bool)
                for extra, unit in (("av", u.mag), ("chi2", None), ("n_mc", None)):
                    if extra in keys:
                        values = _plain_values(f"ppxf[{extra!r}]", result[extra], unit)
                        t[f"ppxf_{extra}"] = values if unit is None else values * unit
                flags[failed] |= FLAG_PPXF_FAILED
        fit = None if cnn is None else _fit_results(cnn)
        if fit:
            for key, col, unit, per_band, doc in _FIT_COLUMNS:
                if key not in fit:
                    continue
                values = np.asarray(fit[key], float)
                shape = (n, len(HST_BANDS)) if per_band else (n,)
                if values.shape != shape:
                    msg = f"cnn[{key!r}] has shape {values.shape}; expected {shape}."
                    raise CubeSFHError(msg)
                t[col] = values if unit is None else values * unit
                t[col].info.description = doc
            if "tension_band" in fit:
                t["tension_band"] = np.asarray(fit["tension_band"], dtype="U5")
                t["tension_band"].info.description = "HST band of the largest |tension_z|"
            if "poor_fit" in fit:
                flags[np.asarray(fit["poor_fit"], bool)] |= int(BinFlag.POOR_FIT)
            if "phot_tension" in fit:
                flags[np.asarray(fit["phot_tension"], bool)] |= int(BinFlag.PHOT_TENSION)
        if ppxf is not None and "fit_chi2" in _keys(ppxf):
            t["ppxf_fit_chi2"] = np.asarray(ppxf["fit_chi2"], float)
            t["ppxf_fit_chi2"].info.description = ("reduced chi2 of the pPXF fit on the "
                                                   "pixels and noise of cnn_fit_chi2")
        if ppxf is not None:
            _synthetic_ppxf_errors(t)
            with np.errstate(invalid="ignore"):
                flags[disagreement(t) > 2] |= int(BinFlag.DISAGREE)
        t["flag"] = flags

        prov = dict(provenance or {})
        pmeta = dict(getattr(prepared, "meta", None) or {})
        inputs = {}
        cube_name = pmeta.pop("cube", "")
        cube_sha = pmeta.pop("cube_sha", "")
        if cube_name:
            inputs[cube_name] = cube_sha
        inputs.update(_normalize_inputs(prov.pop("inputs", None)))
        parameters = {"preprocess": pmeta}
        if ppxf is not None and getattr(ppxf, "meta", None):
            parameters["ppxf"] = dict(ppxf.meta)
        parameters.update(prov.pop("parameters", None) or {})
        meta = {"date": prov.pop("date", _now()), "model_id": prov.pop("model_id", ""),
                "model_sha256": prov.pop("model_sha256", ""), "inputs": inputs,
                "parameters": parameters, **prov}
        return cls(bins.bin_map, t, wcs=bins.celestial_wcs, meta=meta)

    # ------------------------------------------------------------------ properties

    @property
    def n_bins(self):
        """Number of bins."""
        return int(self.bin_map.max()) + 1

    @property
    def shape(self):
        """Spatial shape ``(ny, nx)`` of the maps."""
        return self.bin_map.shape

    @property
    def has_ppxf(self):
        """Whether the pPXF baseline is included."""
        return "ppxf_logage_lw" in self.table.colnames

    @property
    def has_uncertainty(self):
        """Whether the CNN intervals and OOD score are included (model with heads)."""
        return "cnn_logage_lw_p16" in self.table.colnames

    @property
    def has_ppxf_uncertainty(self):
        """Whether the pPXF Monte-Carlo intervals are included."""
        return self.has_ppxf and "ppxf_logage_lw_p16" in self.table.colnames

    @property
    def extension_names(self):
        """Names of the image extensions, in file order."""
        names = ["BIN_ID", *(e for e, _, _ in _BASE_IMAGES), "FLAG"]
        names += [e for e, _, _ in _MEAN_IMAGES] + [e for e, _, _ in _CUBE_IMAGES]
        if self.has_uncertainty:
            names += [e for e, _, _ in _INTERVAL_IMAGES] + ["OOD_SCORE"]
        names += [e for e, c, _ in _PHYSICAL_IMAGES if c in self.table.colnames]
        names += [e for e, c, _ in _FIT_IMAGES if c in self.table.colnames]
        if self.has_ppxf:
            names += ["PPXF_" + e for e, _, _ in _MEAN_IMAGES + _CUBE_IMAGES]
            if self.has_ppxf_uncertainty:
                names += ["PPXF_" + e for e, _, _ in _INTERVAL_IMAGES]
            names += ["DIFF_" + e for e, _, _ in _MEAN_IMAGES]
            if self.has_uncertainty or self.has_ppxf_uncertainty:
                names += [f"DIFF_{e}_SIG" for e, _, _ in _MEAN_IMAGES]
        return names

    def __repr__(self):
        ny, nx = self.shape
        model = self.meta.get("model_id") or "unknown"
        return (f"<StellarPopulationMaps: {self.n_bins} bins on a {ny}x{nx} grid, CNN model "
                f"{model}, pPXF baseline: {'yes' if self.has_ppxf else 'no'}>")

    # ------------------------------------------------------------------ maps

    def radial_profile(self, center, *, pa, inclination, **kwargs):
        """
        Radial profiles in deprojected elliptical annuli.

        See `cubesfh.profiles.radial_profile` for the parameters (``width``,
        ``re``, ``distance``, ``quantities``, ``method``, ``exclude``,
        ``n_boot``, ``seed``) and the returned `~astropy.table.QTable`.
        """
        from .profiles import radial_profile

        return radial_profile(self, center, pa=pa, inclination=inclination, **kwargs)

    @property
    def has_physical(self):
        """Whether the physical maps (Sigma_star, Sigma_SFR) are included."""
        return "cnn_logmstar_sd" in self.table.colnames

    def add_physical(self, distance, *, inclination=None, imf="chabrier", redshift=None,
                     library=None):
        """
        Add the stellar-mass and SFR surface densities (in place; see :doc:`/physical`).

        Needs the attenuation head's columns (``cnn_av_stars``, the bundled
        networks since 0.5), ``norm`` in an absolute flux-density unit and
        ``v_flux`` (both written by `from_results`).

        Parameters
        ----------
        distance : `~astropy.units.Quantity` or float
            Distance of the galaxy (plain numbers: Mpc).
        inclination : `~astropy.units.Quantity` or float, optional
            Disc inclination (plain numbers: degrees); adds
            ``LOGMSTAR_SD_DEPROJ``.
        imf : {'chabrier', 'salpeter', 'kroupa'}, optional
            IMF of the masses and SFRs (`cubesfh.physical.IMF_FACTORS`).
        redshift : float, optional
            Systemic redshift (default: the one recorded in the provenance);
            checked against the distance, and used for the (1 + z)^4
            surface-brightness dimming.
        library : `~cubesfh.templates.TemplateLibrary`, optional
            Templates of the mass-to-light ratios (default: the shipped BC03
            library, that of the network).

        Returns
        -------
        maps : `StellarPopulationMaps`
            ``self``.

        Raises
        ------
        CubeSFHError
            Bad distance, inclination or IMF; no attenuation head columns;
            spectra not in an absolute flux unit.
        """
        from astropy.wcs.utils import proj_plane_pixel_area

        from .physical import check_distance, check_imf, check_inclination, physical_columns

        params = self.meta.get("parameters", {}) or {}
        if redshift is None:
            redshift = params.get("systemic_redshift", params.get("median_redshift"))
        try:
            redshift = float(redshift) if redshift is not None else None
        except (TypeError, ValueError):
            redshift = None
        if redshift is not None and not np.isfinite(redshift):
            redshift = None
        distance = check_distance(distance, redshift=redshift)
        if inclination is not None:
            inclination = check_inclination(inclination)
        imf = check_imf(imf)
        missing = [c for c in ("cnn_av_stars", "cnn_logmstar_sd_err", "norm", "v_flux")
                   if c not in self.table.colnames]
        if missing:
            msg = (f"the product lacks {missing}: the physical maps need the attenuation "
                   "head of the cubesfh >= 0.5 networks and the bins' flux levels; run the "
                   "pipeline again with this version.")
            raise CubeSFHError(msg)
        cunit = u.Unit(self.wcs.wcs.cunit[0] or "deg")
        area = (proj_plane_pixel_area(self.wcs) * cunit**2).to(u.deg**2)
        cols = physical_columns(self.table, spaxel_area=area, distance=distance,
                                redshift=0.0 if redshift is None else redshift,
                                inclination=inclination, imf=imf, library=library)
        docs = {k: d for k, _, _, d in _PHYSICAL_COLUMNS}
        for name in [c for c in self.table.colnames if c.startswith("cnn_") and
                     c[4:] in docs]:
            del self.table[name]  # a second call replaces the first
        for name, values in cols.items():
            self.table[name] = values
            self.table[name].info.description = f"CNN: {docs.get(name[4:], '')}"
        self.meta["physical"] = {
            "distance_mpc": float(distance.to_value(u.Mpc)), "imf": imf,
            "inclination_deg": (None if inclination is None
                                else float(inclination.to_value(u.deg))),
            "redshift": redshift, "spaxel_area_arcsec2": float(area.to_value(u.arcsec**2)),
            "mass": "stars + remnants (living only: cnn_logmstar_sd_living)",
            "sfr": "formed mass per age bin / bin duration"}
        return self

    def plot_bin(self, bin_number=None, **kwargs):
        """
        The fit of one bin (spectrum, models, residuals, HST, SFH, Z(t), flags).

        See `cubesfh.modelspectra.plot_bin` for the parameters (``spectra``,
        ``ra``, ``dec``, ``path``, ``overwrite``, ``dpi``); the model spectra
        default to ``self.model_spectra`` (``run_pipeline(model_spectra=True)``).
        """
        from .modelspectra import plot_bin

        return plot_bin(self, bin_number, **kwargs)

    def compare(self, other, **kwargs):
        """
        Median offset, robust scatter and N against another pipeline's maps.

        See `cubesfh.compare.compare_maps` for ``other`` (a PHANGS DAP
        ``MAPS`` file, nGIST output or another cubesfh product), the keywords
        (``quantities``, ``layout``, ``table``, ``z_sun``, ``min_coverage``,
        ``exclude``, ``order``, ``return_bins``) and the returned
        `~astropy.table.QTable`.
        """
        from .compare import compare_maps

        return compare_maps(self, other, **kwargs)

    def _paint(self, values, fill=np.nan):
        values = np.asarray(values)
        inside = self.bin_map >= 0
        dtype = np.result_type(values.dtype, np.asarray(fill).dtype)
        image = np.full(self.bin_map.shape + values.shape[1:], fill, dtype=dtype)
        image[inside] = values[self.bin_map[inside]]
        if values.ndim == 2:
            image = np.moveaxis(image, -1, 0)
        return image

    @property
    def flag_map(self):
        """``FLAG`` image: the bins' ``flag`` bits, `FLAG_NOT_BINNED` outside all bins."""
        flags = np.asarray(self.table["flag"], dtype=np.int32)
        return self._paint(flags, fill=np.int32(FLAG_NOT_BINNED)).astype(np.int32)

    def _spec(self, name):
        """(column, description, method) of an image extension."""
        for ext, col, doc in _BASE_IMAGES:
            if name == ext:
                return col, doc, "DATA"
        if self.has_uncertainty:
            for ext, col, doc in _INTERVAL_IMAGES:
                if name == ext:
                    return "cnn_" + col, f"CNN: {doc}", "CNN"
            if name == "OOD_SCORE":
                return "cnn_ood_score", "CNN out-of-distribution score (>1: outside)", "CNN"
        for ext, col, doc in _PHYSICAL_IMAGES:
            if name == ext and col in self.table.colnames:
                return col, f"CNN: {doc}", "CNN"
        for ext, col, doc in _FIT_IMAGES:
            if name == ext and col in self.table.colnames:
                return col, doc, "PPXF" if ext == "PPXF_CHI2" else "CNN"
        if self.has_ppxf_uncertainty:
            for ext, col, doc in _INTERVAL_IMAGES:
                if name == "PPXF_" + ext:
                    return "ppxf_" + col, f"pPXF (Monte Carlo): {doc}", "PPXF"
        if self.has_ppxf and (self.has_uncertainty or self.has_ppxf_uncertainty):
            for ext, col, _ in _MEAN_IMAGES:
                if name == f"DIFF_{ext}_SIG":
                    return col, f"(CNN - pPXF) / combined sigma of {col}", "CNN-PPXF-SIG"
        for prefix, colprefix, method, label in (("", "cnn_", "CNN", "CNN"),
                                                 ("PPXF_", "ppxf_", "PPXF", "pPXF")):
            if method == "PPXF" and not self.has_ppxf:
                continue
            for ext, col, doc in _MEAN_IMAGES + _CUBE_IMAGES:
                if name == prefix + ext:
                    return colprefix + col, f"{label}: {doc}", method
        if self.has_ppxf:
            for ext, col, doc in _MEAN_IMAGES:
                if name == "DIFF_" + ext:
                    return col, f"CNN - pPXF: {doc}", "CNN-PPXF"
        msg = (f"no map named {name!r}; the maps are {', '.join(self.extension_names)}.")
        raise KeyError(msg)

    def __getitem__(self, name):
        """
        One map (or age-bin cube) by extension name, e.g. ``maps['LOGAGE_LW']``.

        Returns a `~astropy.units.Quantity` (``(ny, nx)``, or ``(16, ny, nx)``
        for ``SFH`` and ``ZH_AGE``) with NaN outside the bins; ``BIN_ID`` and
        ``FLAG`` are integer `~numpy.ndarray`.
        """
        name = str(name).upper()
        if name == "BIN_ID":
            return self.bin_map.copy()
        if name == "FLAG":
            return self.flag_map
        col, _, method = self._spec(name)
        if method == "CNN-PPXF-SIG":
            return self._paint(disagreement(self.table, (col,))) * u.dimensionless_unscaled
        if method == "CNN-PPXF":
            diff = (self.table["cnn_" + col].value - self.table["ppxf_" + col].value)
            return self._paint(diff) * u.dex
        column = self.table[col]
        unit = getattr(column, "unit", None)
        values = self._paint(np.asarray(getattr(column, "value", column), dtype=float))
        return values * unit if unit is not None else values * u.dimensionless_unscaled

    def summary(self):
        """
        Short text report: bins, provenance, median values and flags.

        Returns
        -------
        text : str
        """
        ny, nx = self.shape
        t = self.table
        lines = [repr(self),
                 f"  {int(np.count_nonzero(self.bin_map >= 0))} of {ny * nx} spaxels binned, "
                 f"{int(np.count_nonzero(np.asarray(t['flag']) == 0))} bins without flags",
                 f"  made {self.meta.get('date', '?')} with cubesfh "
                 f"{self.meta.get('versions', {}).get('cubesfh', '?')}"]
        for name in self.meta.get("inputs", {}):
            lines.append(f"  input: {name}")
        params = self.meta.get("parameters", {}) or {}
        if "systemic_redshift" in params:
            lines.append(f"  systemic redshift z = {float(params['systemic_redshift']):.5f} "
                         f"({params.get('redshift_source', 'given')})")
        if "sigma_target" in t.colnames:
            st = np.asarray(getattr(t["sigma_target"], "value", t["sigma_target"]), float)
            models = self.meta.get("models") or {}
            for value in np.unique(st[np.isfinite(st)]):
                key = f"{value:g} km/s"
                lines.append(f"  {int(np.count_nonzero(st == value))} bins at sigma = {key}"
                             + (f" (network {models[key]})" if key in models else ""))
        kcols = [c for c in t.colnames if c.startswith("kcorr_F")]
        if kcols:
            parts = [f"{c[6:]} {np.nanmedian(np.asarray(t[c], float)):.3f}" for c in kcols
                     if np.isfinite(np.asarray(t[c], float)).any()]
            if parts:
                lines.append("  K-correction (median): " + ", ".join(parts))
        lines.append("  median (16th-84th percentile) over bins:")
        for _, col, _ in _MEAN_IMAGES:
            rows = [("CNN", t["cnn_" + col].value)]
            if self.has_ppxf:
                rows.append(("pPXF", t["ppxf_" + col].value))
                rows.append(("CNN-pPXF", t["cnn_" + col].value - t["ppxf_" + col].value))
            for label, values in rows:
                v = values[np.isfinite(values)]
                if v.size:
                    p16, p50, p84 = np.percentile(v, [16, 50, 84])
                    lines.append(f"    {col:<10s} {label:<9s} {p50:7.3f} ({p16:.3f} to "
                                 f"{p84:.3f})")
        if self.has_uncertainty or self.has_ppxf_uncertainty:
            lines.append("  median width of the 68% intervals over bins:")
            for _, col, _ in _MEAN_IMAGES:
                for label, prefix in (("CNN", "cnn_"), ("pPXF", "ppxf_")):
                    if prefix + col + "_p16" not in t.colnames:
                        continue
                    w = t[prefix + col + "_p84"].value - t[prefix + col + "_p16"].value
                    w = w[np.isfinite(w)]
                    if w.size:
                        lines.append(f"    {col:<10s} {label:<9s} {np.median(w):7.3f}")
        if "cnn_av_stars" in t.colnames:
            av = np.asarray(getattr(t["cnn_av_stars"], "value", t["cnn_av_stars"]), float)
            av = av[np.isfinite(av)]
            if av.size:
                p16, p50, p84 = np.percentile(av, [16, 50, 84])
                lines.append(f"    {'av_stars':<10s} {'CNN':<9s} {p50:7.3f} ({p16:.3f} to "
                             f"{p84:.3f}) mag")
        if self.has_physical:
            phys = self.meta.get("physical", {}) or {}
            lines.append(f"  physical maps at D = {phys.get('distance_mpc', float('nan')):g} "
                         f"Mpc, {str(phys.get('imf', 'chabrier')).capitalize()} IMF:")
            for col, label in (("cnn_logmstar_sd", "log Sigma_star [Msun/pc2]"),
                               ("cnn_logsfr_sd_100myr", "log Sigma_SFR(100 Myr) [Msun/yr/kpc2]")):
                v = np.asarray(getattr(t[col], "value", t[col]), float)
                v = v[np.isfinite(v)]
                if v.size:
                    p16, p50, p84 = np.percentile(v, [16, 50, 84])
                    lines.append(f"    {label}: {p50:.3f} ({p16:.3f} to {p84:.3f})")
            m = np.asarray(getattr(t["cnn_logmstar"], "value", t["cnn_logmstar"]), float)
            if np.isfinite(m).any():
                lines.append(f"    log total stellar mass of the bins: "
                             f"{np.log10(np.nansum(10**m)):.3f} [Msun]")
        elif "cnn_av_stars" in t.colnames:
            lines.append("  no physical maps (Sigma_star, Sigma_SFR): give a distance "
                         "(cubesfh run --distance MPC, or maps.add_physical(distance))")
        flags = np.asarray(t["flag"], dtype=np.int64)
        if self.has_uncertainty:
            lines.append(f"  {int(np.count_nonzero(flags & BinFlag.OUT_OF_DISTRIBUTION))} bins "
                         "out of the training distribution (OOD_SCORE > 1)")
        if self.has_ppxf and (self.has_uncertainty or self.has_ppxf_uncertainty):
            lines.append(f"  {int(np.count_nonzero(flags & BinFlag.DISAGREE))} bins where CNN "
                         "and pPXF disagree by > 2 sigma (DISAGREE)")
        for _, value, name, _ in flag_bits():
            count = int(np.count_nonzero(flags & value))
            if count:
                lines.append(f"  flag {name}: {count} bins")
        for problem in (self.meta.get("parameters", {}) or {}).get("kinematics_problems", []):
            lines.append(f"  WARNING (kinematics): {problem}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ FITS

    def _image_header(self, unit, doc, method):
        """Celestial WCS of the cube + BUNIT and a description."""
        header = self.wcs.to_header()
        _header_card(header, "BUNIT", _unit_string(unit),
                     f"values are {_log_note(unit)}" if _is_log(unit) else "unit of the values")
        _header_card(header, "METHOD", method, "origin of the values")
        _header_card(header, "CONTENT", doc[:68])
        return header

    def _describe(self, header, name, base):
        """Explanatory cards of the uncertainty extensions."""
        if base.endswith(("_P16", "_P84")):
            p = base[-2:]
            header.add_comment(f"{p}th percentile of the per-bin distribution of "
                               f"{base[:-4]} ({'lower' if p == '16' else 'upper'} end of the "
                               "68% interval).")
            if name.startswith("PPXF_"):
                n_mc = ""
                if "ppxf_n_mc" in self.table.colnames:
                    n_mc = int(np.max(np.asarray(self.table["ppxf_n_mc"])))
                    _header_card(header, "PPXF_NMC", n_mc, "Monte-Carlo realisations per bin")
                header.add_comment("From pPXF fits to Monte-Carlo noise realisations drawn "
                                   "from the bin variance (column ppxf_n_mc).")
            else:
                header.add_comment("From the CNN's calibrated uncertainty heads.")
        elif name == "OOD_SCORE":
            _header_card(header, "OODLIMIT", 1.0, "bins above get FLAG OUT_OF_DISTRIBUTION")
            header.add_comment("CNN out-of-distribution score, combining the latent-space "
                               "distance and the reconstruction error (BINS columns "
                               "cnn_ood_latent, cnn_ood_recon) to the training set; > 1 means "
                               "outside the training distribution: treat the values with care.")
        elif name.startswith("DIFF_") and name.endswith("_SIG"):
            cnn = self.has_uncertainty
            ppxf = self.has_ppxf_uncertainty
            _header_card(header, "CNNSIG", "P84-P16" if cnn else "NONE",
                         "CNN sigma = (P84 - P16) / 2" if cnn else "CNN sigma taken as 0")
            synth = (not ppxf and "ppxf_logage_lw_err" in self.table.colnames
                     and bool(np.isfinite(np.asarray(
                         getattr(self.table["ppxf_logage_lw_err"], "value",
                                 self.table["ppxf_logage_lw_err"]), float)).any()))
            _header_card(header, "PPXFSIG", "MC" if ppxf else ("SYNTH" if synth else "NONE"),
                         "pPXF sigma = (P84 - P16) / 2, Monte Carlo" if ppxf
                         else ("pPXF sigma = its scatter on the synthetic test set" if synth
                               else "pPXF has no uncertainties: sigma taken as 0"))
            header.add_comment("(CNN - pPXF) / sqrt(sigma_CNN**2 + sigma_pPXF**2), sigma = half "
                               "the 68% interval; |value| > 2 sets FLAG DISAGREE.")
            if not ppxf and synth:
                header.add_comment("pPXF was run without Monte Carlo (--ppxf-mc): its sigma "
                                   "is its scatter on the bundled network's synthetic test set.")
            elif not ppxf:
                header.add_comment("pPXF was run without Monte Carlo (--ppxf-mc): its sigma "
                                   "is 0 here, the CNN interval alone sets the scale.")

    def _describe_physical(self, header, name):
        """IMF, mass definition, distance and method cards of the physical extensions."""
        phys = self.meta.get("physical", {}) or {}
        _header_card(header, "IMF", str(phys.get("imf", "chabrier")).capitalize(),
                     "IMF of the masses and SFRs")
        if name.startswith(("AV_STARS", "ML_V")):
            header.add_comment("From the CNN's attenuation head (AV_STARS: -2.5 log10 of the "
                               "attenuated / dust-free stellar light at 5500 A) and the "
                               "templates of the predicted SFH and Z(t) (ML_V).")
            if name == "ML_V":
                _header_card(header, "MASSDEF", "stars+remnants", "mass of ML_V")
            return
        _header_card(header, "DISTANCE", float(phys.get("distance_mpc", np.nan)),
                     "[Mpc] distance used")
        if phys.get("inclination_deg") is not None:
            _header_card(header, "INCLIN", float(phys["inclination_deg"]),
                         "[deg] inclination (DEPROJ only)")
        if name.startswith("LOGMSTAR"):
            _header_card(header, "MASSDEF", "stars+remnants",
                         "living stars only: BINS cnn_logmstar_sd_living")
            header.add_comment("Sigma_star = (M/L_V of the predicted SFH and Z(t)) x (V-band "
                               "surface brightness corrected by AV_STARS); projected on the "
                               "sky" + (" (DEPROJ: x cos i)" if name.endswith("DEPROJ") else
                                        ", no inclination correction") + ".")
        else:
            _header_card(header, "MASSDEF", "formed", "SFR of formed mass (before mass loss)")
            header.add_comment("SFR surface density of the mass formed in each age bin "
                               "(AGEBINS) divided by the bin's duration; no inclination "
                               "correction.")

    def _band_header(self, unit, doc, method):
        """3-D WCS: the celestial axes plus the HST band index (plane k = HST_BANDS[k])."""
        header = self._image_header(unit, doc, method)
        header["WCSAXES"] = 3
        for key, value, comment in (
                ("CTYPE3", "BAND", "HST band index, see BANDnn"),
                ("CRPIX3", 1.0, "pixel coordinate of the reference point"),
                ("CRVAL3", 0.0, "the first plane is band 0"),
                ("CDELT3", 1.0, "one plane per band"),
                ("CUNIT3", "", "band index (no unit)")):
            _header_card(header, key, value, comment)
        for i, band in enumerate(HST_BANDS):
            _header_card(header, f"BAND{i:02d}", band, f"HST band of plane {i}")
        header.add_comment("NaN where the band is missing; see docs 'Checking a fit'.")
        return header

    def _cube_header(self, unit, doc, method):
        """3-D WCS: the celestial axes plus a linear age-bin axis (plane k = age bin k)."""
        header = self._image_header(unit, doc, method)
        header["WCSAXES"] = 3
        for key, value, comment in (
                ("CTYPE3", "AGEBIN", "age bin index, see the AGEBINS extension"),
                ("CNAME3", "Age bin", ""),
                ("CRPIX3", 1.0, "pixel coordinate of the reference point"),
                ("CRVAL3", 0.0, "the first plane is age bin 0"),
                ("CDELT3", 1.0, "one plane per age bin"),
                ("CUNIT3", "", "age bin index (no unit)")):
            _header_card(header, key, value, comment)
        for i, age in enumerate(AGE_BIN_CENTERS.to_value(u.Gyr)):
            _header_card(header, f"AGEC{i:02d}", float(age), f"[Gyr] centre of age bin {i}")
        return header

    def _primary_hdu(self):
        prim = fits.PrimaryHDU()
        h = prim.header
        meta = self.meta
        h["ORIGIN"] = ("cubesfh", "software that wrote the file")
        h["PRODTYPE"] = (_PRODUCT_TYPE, "cubesfh product type")
        h["PRODVER"] = (PRODUCT_VERSION, "version of the product layout")
        h["DATE"] = (str(meta.get("date", "")), "UTC date the maps were made")
        h["NBINS"] = (self.n_bins, "number of Voronoi bins")
        h["HASPPXF"] = (self.has_ppxf, "pPXF baseline and differences included")
        for pkg, key in _VERSION_KEYS.items():
            _header_card(h, key, str(meta.get("versions", {}).get(pkg, "unknown")),
                         f"{pkg} version")
        _header_card(h, "MODEL_ID", str(meta.get("model_id", "")), "CNN model identifier")
        _header_card(h, "MODELSHA", str(meta.get("model_sha256", "")),
                     "SHA-256 of the CNN weights")
        roles = meta.get("input_roles", {}) or {}
        hashed = meta.get("input_hashed", {}) or {}
        for i, (name, sha) in enumerate(meta.get("inputs", {}).items(), start=1):
            if i > 99:
                break
            _header_card(h, f"INFILE{i}", name, "input file")
            if name in roles:
                _header_card(h, f"INROLE{i}", str(roles[name]), f"what INFILE{i} is")
            _header_card(h, f"INSHA{i}", sha, f"SHA-256 of INFILE{i}, see INHASH{i}")
            if name in hashed:
                # a 64-character SHA-256 leaves no room for this in INSHAn's comment
                _header_card(h, f"INHASH{i}", str(hashed[name]),
                             f"bytes of INFILE{i} that INSHA{i} covers")
        for key, value in _flatten("", meta.get("parameters", {})):
            _header_card(h, f"HIERARCH CSFH PAR {key}", value)
        for card in meta.get("header_cards", []):
            # ready-made (key, value, comment) cards, e.g. the registration report
            _header_card(h, str(card[0]), card[1], str(card[2]) if len(card) > 2 else "")
        skip = {"date", "versions", "model_id", "model_sha256", "inputs", "parameters",
                "header_cards", "registration", "input_roles", "input_hashed"}
        for key, value in _flatten("", {k: v for k, v in meta.items() if k not in skip}):
            _header_card(h, f"HIERARCH CSFH {key}", value)
        h["PROVJSON"] = (json.dumps(meta, sort_keys=True), "full provenance (JSON)")
        h.add_comment("Stellar-population maps made by cubesfh (CNN of Galceran et al. 2026"
                      + (", pPXF baseline" if self.has_ppxf else "") + ").")
        h.add_comment("Extensions: " + ", ".join(self.extension_names) + ", AGEBINS, BINS.")
        h.add_comment("All image extensions share the celestial WCS of the MUSE cube.")
        return prim

    def _agebins_hdu(self):
        centres = AGE_BIN_CENTERS.to_value(u.Gyr)
        edges = AGE_BIN_EDGES.to_value(u.Gyr)
        cols = [
            fits.Column(name="index", format="J", array=np.arange(N_AGE_BINS, dtype=np.int32)),
            fits.Column(name="age", format="D", unit="Gyr", array=centres),
            fits.Column(name="age_lower", format="D", unit="Gyr", array=edges[:-1]),
            fits.Column(name="age_upper", format="D", unit="Gyr", array=edges[1:]),
            fits.Column(name="logage", format="D", unit=_unit_string(_DEX_YR),
                        array=np.log10(centres * 1e9)),
        ]
        hdu = fits.BinTableHDU.from_columns(cols, name="AGEBINS")
        for i, doc in enumerate(("plane of SFH / ZH_AGE (CTYPE3 AGEBIN value)",
                                 "centre of the age bin", "lower edge of the age bin",
                                 "upper edge of the age bin", "log10(centre / yr)"), start=1):
            hdu.header[f"TCOMM{i}"] = doc
        return hdu

    def _bins_hdu(self):
        cols, docs, logs = [], [], []
        for name in self.table.colnames:
            column = self.table[name]
            unit = getattr(column, "unit", None)
            values = np.asarray(getattr(column, "value", column))
            kind = values.dtype.kind
            if kind in "iu":
                code = {1: "B", 2: "I", 4: "J", 8: "K"}[values.dtype.itemsize]
                if kind == "u" and values.dtype.itemsize > 1:
                    values = values.astype(np.int64)
                    code = "K"
            elif kind == "f":
                values = values.astype(float)
                code = "D"
            elif kind == "b":
                code = "L"
            else:
                values = values.astype(str)
                code = f"{max(1, values.dtype.itemsize // 4)}A"
            repeat = int(np.prod(values.shape[1:])) if values.ndim > 1 else 1
            dim = (None if values.ndim <= 2
                   else "(" + ",".join(str(s) for s in values.shape[:0:-1]) + ")")
            fmt = code if repeat == 1 or code.endswith("A") else f"{repeat}{code}"
            unit_str = _unit_string(unit) if unit is not None else None
            cols.append(fits.Column(name=name, format=fmt, unit=unit_str or None, dim=dim,
                                    array=values))
            doc = column.info.description or ""
            if _is_log(unit):
                tag = f" [{_log_note(unit)}]"
                doc = doc[:68 - len(tag)] + tag
                logs.append((len(cols), unit.to_string()))
            docs.append(doc)
        hdu = fits.BinTableHDU.from_columns(cols, name="BINS")
        for i, doc in enumerate(docs, start=1):
            if doc:
                hdu.header[f"TCOMM{i}"] = doc[:68]
        for i, text in logs:
            # not a FITS unit: restored by StellarPopulationMaps.read, ignored by others
            hdu.header[f"TLOGU{i}"] = (text, f"astropy logarithmic unit of column {i}")
        hdu.header["COMMENT"] = "One row per Voronoi bin; row k is bin k of BIN_ID."
        return hdu

    def to_hdulist(self):
        """
        The FITS product as an `~astropy.io.fits.HDUList` (layout: :ref:`product`).

        Returns
        -------
        hdulist : `~astropy.io.fits.HDUList`
        """
        hdus = [self._primary_hdu()]
        header = self._image_header(None, "Voronoi bin number, -1 outside all bins", "DATA")
        hdus.append(fits.ImageHDU(self.bin_map, header=header, name="BIN_ID"))
        for name in self.extension_names[1:]:
            if name == "FLAG":
                header = self._image_header(None, "quality bitmask, bits in FLAGBnn",
                                            "DATA")
                for bit, value, flag_name, doc in flag_bits():
                    _header_card(header, f"FLAGB{bit:02d}", flag_name, f"{value}: {doc}")
                hdus.append(fits.ImageHDU(self.flag_map, header=header, name="FLAG"))
                continue
            _, doc, method = self._spec(name)
            image = self[name]
            unit = image.unit
            base = name.removeprefix("PPXF_")
            if name in _BAND_CUBES:
                header = self._band_header(unit, doc, method)
            elif base in _CUBE_NAMES:
                header = self._cube_header(unit, doc, method)
            else:
                header = self._image_header(unit, doc, method)
            self._describe(header, name, base)
            if name in {e for e, _, _ in _PHYSICAL_IMAGES}:
                self._describe_physical(header, name)
            hdus.append(fits.ImageHDU(np.asarray(image.value, dtype=np.float32), header=header,
                                      name=name))
        hdus.append(self._agebins_hdu())
        hdus.append(self._bins_hdu())
        return fits.HDUList(hdus)

    def _write(self, path, *, overwrite=False):
        hdulist = self.to_hdulist()
        with atomic_write(path, overwrite=overwrite) as tmp:
            hdulist.writeto(tmp, overwrite=True)
        log.info("wrote %s (%d bins, %d extensions)", path, self.n_bins, len(hdulist))
        return Path(path)

    @classmethod
    def _read(cls, path):
        path = Path(path).expanduser()
        if not path.is_file():
            msg = f"maps file {str(path)!r} not found; check the path."
            raise FileNotFoundError(msg)
        with fits.open(path, memmap=False) as hdul:
            names = {hdu.name for hdu in hdul}
            missing = [n for n in ("BIN_ID", "BINS") if n not in names]
            if missing:
                msg = (f"{path} has no {' and '.join(missing)} extension: it is not a cubesfh "
                       "stellar-population maps product (write one with "
                       "StellarPopulationMaps.write).")
                raise CubeSFHError(msg)
            primary = hdul[0].header
            raw = primary.get("PROVJSON", "")
            try:
                meta = json.loads(raw) if raw else {}
            except ValueError:
                msg = f"the PROVJSON card of {path} is not valid JSON; provenance not read."
                log.warning(msg)
                meta = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs = WCS(hdul["BIN_ID"].header)
            bin_map = np.asarray(hdul["BIN_ID"].data, dtype=np.int32)
            table = _table_from_hdu(hdul["BINS"])
        return cls(bin_map, table, wcs=wcs, meta=meta)

    # ------------------------------------------------------------------ figure

    def _flag_categories(self):
        """Image of the most serious flag of each bin (0 = none) and the category names."""
        flags = self.flag_map
        present = [(value, name) for _, value, name, _ in flag_bits()
                   if value != FLAG_NOT_BINNED and np.any(flags & value)]
        # the most serious first: the order of _FLAG_PRIORITY, then the bit order
        order = {nm: i for i, nm in enumerate(_FLAG_PRIORITY)}
        present.sort(key=lambda x: order.get(x[1], len(order)))
        present = present[:len(_FLAG_COLOURS) - 1]
        image = np.zeros(flags.shape, float)
        for k, (value, _) in reversed(list(enumerate(present, start=1))):
            image[(flags & value) != 0] = k
        image[(flags & FLAG_NOT_BINNED) != 0] = np.nan
        return image, ["ok"] + [nm for _, nm in present]

    def plot(self, path=None, *, overwrite=False, dpi=100, figsize=None, cmap="viridis",
             diff_cmap="RdBu_r"):
        """
        Quick-look figure: mean ages and metallicities with WCS axes.

        Columns: LW log age, MW log age, LW [Z/H], MW [Z/H]. Rows: the CNN,
        then (with the baseline) pPXF on the same colour scale and the
        difference CNN - pPXF, and last the data: S/N, stellar velocity,
        dispersion and the most serious flag of each bin, by name; with
        uncertainties a row with the OOD score and (with pPXF) the CNN - pPXF
        differences in units of the combined sigma; then the SFH as the mass
        fractions younger than 0.5 Gyr, 0.5-5 Gyr and older, with
        ``CNN_CHI2``; and, where the product has them, ``TENSION``,
        ``AV_STARS``, ``LOGMSTAR_SD`` and ``LOGSFR_SD_100MYR``.

        Parameters
        ----------
        path : str or `~pathlib.Path`, optional
            Write the figure there (format from the suffix, PNG by default),
            atomically.
        overwrite : bool, optional
            Replace an existing ``path``.
        dpi : float, optional
            Resolution of the saved figure.
        figsize : tuple, optional
            Size in inches (default 3.4 per column, 2.9 per row).
        cmap, diff_cmap : str, optional
            Colour maps of the values and of the differences.

        Returns
        -------
        figure : `matplotlib.figure.Figure`
            Made without pyplot (nothing is shown).
        """
        import matplotlib
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure

        rows = [("CNN", [e for e, _, _ in _MEAN_IMAGES])]
        if self.has_ppxf:
            rows.append(("pPXF", ["PPXF_" + e for e, _, _ in _MEAN_IMAGES]))
            rows.append(("CNN - pPXF", ["DIFF_" + e for e, _, _ in _MEAN_IMAGES]))
        rows.append(("data", ["SNR", "V_STARS", "SIGMA_STARS", "FLAG"]))
        names = self.extension_names
        if "OOD_SCORE" in names or "DIFF_LOGAGE_LW_SIG" in names:
            rows.append(("uncertainty", [n for n in ("OOD_SCORE", "DIFF_LOGAGE_LW_SIG",
                                                     "DIFF_LOGAGE_MW_SIG", "DIFF_ZH_LW_SIG")
                                         if n in names]))
        # the SFH in three broad age ranges, and the fit check
        from .profiles import younger_fraction

        frac = np.asarray(getattr(self.table["cnn_mass_fraction"], "value",
                                  self.table["cnn_mass_fraction"]), float)
        y05 = younger_fraction(frac, 0.5 * u.Gyr)
        y5 = younger_fraction(frac, 5.0 * u.Gyr)
        virtual = {"SFH_YOUNG": self._paint(y05), "SFH_MID": self._paint(y5 - y05),
                   "SFH_OLD": self._paint(1.0 - y5)}
        rows.append(("SFH", ["SFH_YOUNG", "SFH_MID", "SFH_OLD"]
                     + [n for n in ("CNN_CHI2",) if n in names]))
        extra = [n for n in ("TENSION", "AV_STARS", "LOGMSTAR_SD", "LOGSFR_SD_100MYR")
                 if n in names]
        if extra:
            rows.append(("fit", extra))
        titles = {"LOGAGE_LW": "log age (LW)", "LOGAGE_MW": "log age (MW)",
                  "ZH_LW": "[Z/H] (LW)", "ZH_MW": "[Z/H] (MW)", "SNR": "S/N per Å",
                  "V_STARS": "V stars", "SIGMA_STARS": "sigma stars",
                  "FLAG": "flagged bins", "OOD_SCORE": "OOD score (>1: outside)",
                  "LOGAGE_LW_SIG": "(CNN-pPXF)/sigma log age (LW)",
                  "LOGAGE_MW_SIG": "(CNN-pPXF)/sigma log age (MW)",
                  "ZH_LW_SIG": "(CNN-pPXF)/sigma [Z/H] (LW)",
                  "SFH_YOUNG": "mass fraction < 0.5 Gyr", "SFH_MID": "mass fraction 0.5-5 Gyr",
                  "SFH_OLD": "mass fraction > 5 Gyr", "CNN_CHI2": "chi2 of the CNN answer",
                  "TENSION": "HST tension (sigma)", "AV_STARS": "A_V stars",
                  "LOGMSTAR_SD": "log Sigma_star", "LOGSFR_SD_100MYR": "log SFR_SD (100 Myr)"}
        nrow, ncol = len(rows), 4
        fig = Figure(figsize=figsize or (3.4 * ncol, 2.9 * nrow), layout="constrained")

        def limits(values, symmetric=False):
            v = np.concatenate([np.ravel(x) for x in values])
            v = v[np.isfinite(v)]
            if not v.size:
                return None, None
            lo, hi = np.percentile(v, [1, 99])
            if symmetric:
                hi = max(abs(lo), abs(hi)) or 1.0
                return -hi, hi
            return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)

        shared = {}
        for j, (ext, _, _) in enumerate(_MEAN_IMAGES):
            vals = [self[ext].value]
            if self.has_ppxf:
                vals.append(self["PPXF_" + ext].value)
            shared[j] = limits(vals)
        for i, (label, names) in enumerate(rows):
            for j, name in enumerate(names):
                ax = fig.add_subplot(nrow, ncol, i * ncol + j + 1, projection=self.wcs)
                cm = cmap
                flag_names = None
                if name == "FLAG":
                    data, flag_names = self._flag_categories()
                    unit, (vmin, vmax), cm = "", (-0.5, len(flag_names) - 0.5), None
                elif name in virtual:
                    data, unit, (vmin, vmax) = virtual[name], "", (0.0, 1.0)
                else:
                    image = self[name]
                    data, unit = image.value, image.unit
                    if name.startswith("DIFF_") or name == "V_STARS":
                        vmin, vmax = limits([data], symmetric=True)
                        cm = diff_cmap
                    elif name == "OOD_SCORE" or name in ("CNN_CHI2", "TENSION"):
                        vmin, vmax = 0.0, max(2.0, limits([data])[1] or 2.0)
                    elif label in ("CNN", "pPXF"):
                        vmin, vmax = shared[j]
                    else:
                        vmin, vmax = limits([data])
                colormap = (ListedColormap(_FLAG_COLOURS[:len(flag_names)]) if cm is None
                            else matplotlib.colormaps[cm])
                colormap = colormap.with_extremes(bad="0.85")
                im = ax.imshow(data, origin="lower", cmap=colormap, vmin=vmin, vmax=vmax,
                               interpolation="nearest")
                base = name.removeprefix("PPXF_").removeprefix("DIFF_")
                prefix = "" if label in ("data", "uncertainty", "SFH", "fit") else f"{label}: "
                ax.set_title(prefix + titles[base], fontsize=9)
                lon, lat = ax.coords[0], ax.coords[1]
                lon.set_axislabel("RA" if i == nrow - 1 else "")
                lat.set_axislabel("Dec" if j == 0 else "")
                lon.set_ticklabel_visible(i == nrow - 1)
                lat.set_ticklabel_visible(j == 0)
                for c in (lon, lat):
                    c.set_ticklabel(size=7)
                cbar = fig.colorbar(im, ax=ax, shrink=0.85)
                unit_label = "" if name == "FLAG" else _plot_label(unit)
                if name == "FLAG":
                    cbar.set_ticks(np.arange(len(flag_names)), labels=flag_names)
                    cbar.ax.tick_params(labelsize=6)
                elif unit_label:
                    cbar.set_label(unit_label, fontsize=8)
                cbar.ax.tick_params(labelsize=7)
        model = self.meta.get("model_id") or ""
        fig.suptitle(f"cubesfh stellar populations ({self.n_bins} bins"
                     + (f", model {model}" if model else "") + ")", fontsize=10)
        if path is not None:
            fmt = Path(path).suffix.lstrip(".").lower() or "png"
            with atomic_write(path, overwrite=overwrite) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi)
        return fig


def _table_from_hdu(hdu):
    """QTable from a BINS table HDU, units parsed as written by `_bins_hdu`."""
    table = QTable()
    header = hdu.header
    for i, col in enumerate(hdu.columns, start=1):
        values = np.array(hdu.data[col.name])
        if values.dtype.byteorder not in ("=", "|"):
            values = values.astype(values.dtype.newbyteorder("="))
        unit = _parse_unit(col.unit, log_unit=header.get(f"TLOGU{i}"))
        table[col.name] = values if unit is None else values * unit
        doc = header.get(f"TCOMM{i}", "")
        if doc:
            table[col.name].info.description = doc
    return table


def _read_maps(path, **kwargs):
    """Reader registered with the astropy I/O registry (format ``'cubesfh-maps'``)."""
    return StellarPopulationMaps._read(path, **kwargs)


def _write_maps(maps, path, *, overwrite=False):
    """Writer registered with the astropy I/O registry (format ``'cubesfh-maps'``)."""
    return maps._write(path, overwrite=overwrite)


with registry.delay_doc_updates(StellarPopulationMaps):
    registry.register_reader("cubesfh-maps", StellarPopulationMaps, _read_maps)
    registry.register_writer("cubesfh-maps", StellarPopulationMaps, _write_maps)
