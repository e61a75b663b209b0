# Licensed under a 3-clause BSD style license - see LICENSE
"""
Radial profiles of the stellar-population maps in deprojected elliptical annuli.

A disc of position angle PA (of the major axis, east of north) and inclination
i (0 = face-on) has, at a sky offset (east, north) from its centre, the
deprojected radius

.. math::

    r = \\sqrt{x^2 + (y / \\cos i)^2}, \\quad
    x = \\mathrm{east} \\sin PA + \\mathrm{north} \\cos PA, \\quad
    y = \\mathrm{east} \\cos PA - \\mathrm{north} \\sin PA .

Every spaxel gets its radius; an annulus collects the spaxels whose radius
falls in it, so that a bin counts with the area it has in the annulus. Per
annulus and quantity the profile gives the area-weighted median and 16th/84th
percentiles over the bins, a bootstrap interval of the median (bins drawn
with replacement) and, where the maps have calibrated per-bin intervals, the
uncertainty of the area-weighted mean that they imply; the number of bins
and the flagged share of the area; and a straight-line fit of the medians
against radius (the gradient) in dex per arcsec, per kpc (with a distance)
and per effective radius (with R_e).
"""

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable

from .conventions import AGE_BIN_EDGES
from .flags import BinFlag
from .utils import CubeSFHError

__all__ = ["DEFAULT_EXCLUDE", "FLAGGED_BITS", "OPTIONAL_QUANTITIES", "PROFILE_QUANTITIES",
           "plot_profile", "radial_profile", "write_profile", "younger_fraction"]

#: Quantities of `radial_profile` by default: name -> (BINS column or callable, label).
PROFILE_QUANTITIES = ("logage_lw", "logage_mw", "zh_lw", "zh_mw", "young_1gyr", "young_5gyr",
                      "av_stars", "logmstar_sd")
#: Quantities profiled only when the maps have them: the stellar attenuation
#: (networks with the attenuation head) and log Sigma_star (with a distance).
OPTIONAL_QUANTITIES = ("av_stars", "logmstar_sd")

#: Bins left out of the profiles by default: no usable CNN answer, or one whose
#: spectrum lost more than 25 % or lies outside the training distribution.
DEFAULT_EXCLUDE = int(BinFlag.SPECTRUM_FAILED | BinFlag.KINEMATICS_FAILED
                      | BinFlag.SPECTRUM_INCOMPLETE | BinFlag.OUT_OF_DISTRIBUTION)

#: Bits that count in ``flagged_fraction``: the excluded ones and the "suspect" ones
#: (informational bits such as NO_PHOTOMETRY or SPECTRAL_GAP do not count).
FLAGGED_BITS = DEFAULT_EXCLUDE | int(BinFlag.SKY_SUSPECT | BinFlag.KINEMATICS_SUSPECT)

_FITS_CODES = {"logage_lw": "AGLW", "logage_mw": "AGMW", "zh_lw": "ZHLW", "zh_mw": "ZHMW",
               "young_1gyr": "Y1G", "young_5gyr": "Y5G", "av_stars": "AV",
               "logmstar_sd": "MSD"}

_LABELS = {"logage_lw": "log age (LW) [log yr]", "logage_mw": "log age (MW) [log yr]",
           "zh_lw": "[Z/H] (LW)", "zh_mw": "[Z/H] (MW)",
           "young_1gyr": "mass fraction < 1 Gyr", "young_5gyr": "mass fraction < 5 Gyr",
           "av_stars": "A_V (stars) [mag]", "logmstar_sd": "log Sigma_star [Msun/pc2]"}


def younger_fraction(mass_fraction, age):
    """
    Fraction of the (living) stellar mass younger than ``age``.

    The 16 age bins are summed up to ``age``; the bin that contains it counts
    with the share of its width (in age) below ``age``, i.e. constant star
    formation across the bin, as the templates assume.

    Parameters
    ----------
    mass_fraction : `~numpy.ndarray`, shape (n, 16)
    age : `~astropy.units.Quantity`

    Returns
    -------
    fraction : `~numpy.ndarray`, shape (n,)
    """
    edges = AGE_BIN_EDGES.to_value(u.yr)
    t = u.Quantity(age, u.yr).value
    part = np.clip((t - edges[:-1]) / (edges[1:] - edges[:-1]), 0.0, 1.0)
    return np.asarray(mass_fraction, dtype=float) @ part


def _as_center(center):
    if isinstance(center, SkyCoord):
        return center.icrs
    try:
        ra, dec = center
        return SkyCoord(u.Quantity(ra, u.deg), u.Quantity(dec, u.deg), frame="icrs")
    except (TypeError, ValueError, u.UnitsError):
        msg = (f"center must be a SkyCoord or (ra, dec) in degrees (e.g. (150.1, 2.2)); got "
               f"{center!r}.")
        raise CubeSFHError(msg) from None


def _angle(value, name, lo, hi):
    try:
        q = u.Quantity(value, u.deg).to_value(u.deg)
    except (TypeError, u.UnitsError):
        q = np.nan
    if not (np.isscalar(q) and np.isfinite(q) and lo <= q <= hi):
        msg = f"{name} must be an angle in degrees between {lo:g} and {hi:g}; got {value!r}."
        raise CubeSFHError(msg)
    return float(q)


def _positive(value, unit, name, what):
    """``value`` in ``unit`` as a float, or a `CubeSFHError` unless finite and > 0."""
    try:
        q = float(u.Quantity(value, unit).to_value(unit))
    except (TypeError, ValueError, u.UnitsError):
        q = np.nan
    if not (np.isfinite(q) and q > 0):
        msg = f"{name} must be a positive {what}; got {value!r}."
        raise CubeSFHError(msg)
    return q


def _weighted_percentiles(values, weights, qs):
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cw = np.cumsum(w) - 0.5 * w
    cw /= w.sum()
    return np.interp(np.asarray(qs) / 100.0, cw, v)


def _column(table, name):
    """A BINS column as a plain float array (``None`` if absent)."""
    if name not in table.colnames:
        return None
    return np.asarray(getattr(table[name], "value", table[name]), float)


def _per_bin(maps, name, prefix):
    """Per-bin values of a profile quantity and half the width of their 68 % interval."""
    t = maps.table
    if name in ("young_1gyr", "young_5gyr"):
        col = f"{prefix}mass_fraction"
        frac = _column(t, col)
        if frac is None:
            return None, None
        age = (1.0 if name == "young_1gyr" else 5.0) * u.Gyr
        lo, hi = _column(t, f"{col}_p16"), _column(t, f"{col}_p84")
        half = (None if lo is None or hi is None
                else 0.5 * np.abs(younger_fraction(hi, age) - younger_fraction(lo, age)))
        return younger_fraction(frac, age), half
    values = _column(t, f"{prefix}{name}")
    if values is None:
        return None, None
    p16, p84 = _column(t, f"{prefix}{name}_p16"), _column(t, f"{prefix}{name}_p84")
    return values, (None if p16 is None or p84 is None else 0.5 * (p84 - p16))


def radial_profile(maps, center, *, pa, inclination, width=None, re=None, distance=None,
                   quantities=None, method="cnn", exclude=DEFAULT_EXCLUDE,
                   n_boot=200, seed=0):
    """
    Radial profiles of the maps in deprojected elliptical annuli.

    Parameters
    ----------
    maps : `~cubesfh.maps.StellarPopulationMaps`
    center : `~astropy.coordinates.SkyCoord` or tuple
        Centre of the galaxy, or ``(ra, dec)`` in degrees.
    pa : `~astropy.units.Quantity` or float
        Position angle of the major axis, east of north (degrees).
    inclination : `~astropy.units.Quantity` or float
        Inclination (degrees, 0 = face-on, below 90).
    width : `~astropy.units.Quantity` or float, optional
        Width of the annuli along the major axis (arcsec); default twice the
        spaxel size, at least 0.5 arcsec.
    re : `~astropy.units.Quantity` or float, optional
        Effective radius (arcsec): radii and gradients also in units of it.
    distance : `~astropy.units.Quantity` or float, optional
        Distance (Mpc): radii in kpc and gradients in dex per kpc.
    quantities : sequence of str, optional
        Among `PROFILE_QUANTITIES`: the four mean ages and metallicities, the
        (living) mass fraction younger than 1 and 5 Gyr
        (`younger_fraction`), the stellar attenuation ``av_stars`` (mag) and
        ``logmstar_sd`` (log Sigma_star, :doc:`/physical`). Default: all of
        them that the maps have (the last two are CNN only and need the
        attenuation head, and a distance for Sigma_star).
    method : {'cnn', 'ppxf'}, optional
        Which results to profile.
    exclude : int, optional
        Bins with any of these ``FLAG`` bits are left out (default
        `DEFAULT_EXCLUDE`; 0 keeps every bin). The ``flagged_fraction``
        column gives the share of the annulus' area with any flag bit.
    n_boot : int, optional
        Bootstrap draws for the interval of the median.
    seed : int, optional
        Seed of the bootstrap.

    Returns
    -------
    profile : `~astropy.table.QTable`
        One row per annulus: ``r_in``, ``r_out``, ``r_mid`` (arcsec), with
        ``r_mid_kpc`` and ``r_mid_re`` when given ``distance``/``re``;
        ``n_bins``, ``n_spaxels``, ``flagged_fraction`` (share of the area
        in bins with any of `FLAGGED_BITS`); per quantity ``q``:
        ``q`` (area-weighted median over the bins), ``q_p16``, ``q_p84``
        (their area-weighted spread), ``q_boot_p16``, ``q_boot_p84``
        (bootstrap interval of the median) and, for maps with intervals,
        ``q_err_bins`` (uncertainty of the area-weighted mean from the
        per-bin 68 % intervals, taken as independent). ``meta`` holds the
        geometry and ``gradients``: per quantity the slope of a straight line
        fitted to the bins (each once, at the area-weighted radius of its
        spaxels) in ``per_arcsec`` (dex, or fraction,
        per arcsec), ``per_kpc``, ``per_re``, and ``err_per_arcsec`` from
        bootstrapping the bins.

    Raises
    ------
    CubeSFHError
        For a bad centre, angle, width, distance or quantity, or when no bin
        is left.
    """
    c0 = _as_center(center)
    pa_deg = _angle(pa, "pa", -360.0, 360.0)
    inc_deg = _angle(inclination, "inclination", 0.0, 89.0)
    if method not in ("cnn", "ppxf"):
        msg = f"method must be 'cnn' or 'ppxf'; got {method!r}."
        raise CubeSFHError(msg)
    prefix = f"{method}_"
    if quantities is None:
        quantities = [q for q in PROFILE_QUANTITIES if q not in OPTIONAL_QUANTITIES
                      or f"{prefix}{q}" in maps.table.colnames]
    unknown = [q for q in quantities if q not in PROFILE_QUANTITIES]
    if unknown:
        msg = f"unknown quantities {unknown}; choose among {list(PROFILE_QUANTITIES)}."
        raise CubeSFHError(msg)
    scale = float(np.sqrt(np.abs(np.linalg.det(maps.wcs.celestial.pixel_scale_matrix)))) * 3600
    width_as = (max(0.5, 2.0 * scale) if width is None
                else _positive(width, u.arcsec, "width", "angle in arcsec"))
    d_mpc = None if distance is None else _positive(distance, u.Mpc, "distance", "distance in Mpc")
    kpc_per_arcsec = None if d_mpc is None else d_mpc * 1e3 * np.pi / (180.0 * 3600.0)
    re_as = None if re is None else _positive(re, u.arcsec, "re", "angle in arcsec")

    # --- geometry of every binned spaxel
    bin_map = np.asarray(maps.bin_map)
    yy, xx = np.nonzero(bin_map >= 0)
    bins = bin_map[yy, xx]
    sky = maps.wcs.celestial.pixel_to_world(xx, yy).icrs
    east, north = c0.spherical_offsets_to(sky)
    east, north = east.to_value(u.arcsec), north.to_value(u.arcsec)
    s, c = np.sin(np.radians(pa_deg)), np.cos(np.radians(pa_deg))
    x_major = east * s + north * c
    y_minor = east * c - north * s
    radius = np.hypot(x_major, y_minor / np.cos(np.radians(inc_deg)))

    flags = np.asarray(maps.table["flag"], dtype=np.int64) if "flag" in maps.table.colnames \
        else np.zeros(maps.n_bins, np.int64)
    per_bin = {q: _per_bin(maps, q, prefix) for q in quantities}
    missing = [q for q, (v, _) in per_bin.items() if v is None]
    if missing:
        msg = (f"the maps have no {method} results for {missing} (columns "
               f"{', '.join(prefix + m for m in missing)}); run with --ppxf or choose "
               "method='cnn'.")
        raise CubeSFHError(msg)
    keep_bin = (flags & int(exclude)) == 0
    if not keep_bin.any():
        msg = (f"every bin has one of the excluded flags (exclude={int(exclude)}); pass "
               "exclude=0 to keep them.")
        raise CubeSFHError(msg)

    edges = np.arange(0.0, radius[keep_bin[bins]].max() + width_as, width_as)
    rng = np.random.default_rng(seed)
    rows = []
    for r_in, r_out in zip(edges[:-1], edges[1:]):
        inside = (radius >= r_in) & (radius < r_out)
        if not inside.any():
            continue
        area_all = np.bincount(bins[inside], minlength=maps.n_bins).astype(float)
        flagged = float(area_all[(flags & FLAGGED_BITS) != 0].sum() / area_all.sum())
        area = np.where(keep_bin, area_all, 0.0)
        row = {"r_in": r_in, "r_out": r_out, "r_mid": 0.5 * (r_in + r_out),
               "n_spaxels": int(area.sum()), "flagged_fraction": flagged}
        for q, (values, half) in per_bin.items():
            ok = (area > 0) & np.isfinite(values)
            idx = np.flatnonzero(ok)
            row["n_bins"] = max(row.get("n_bins", 0), int(idx.size))
            if idx.size == 0:
                for k in ("", "_p16", "_p84", "_boot_p16", "_boot_p84", "_err_bins"):
                    row[q + k] = np.nan
                continue
            v, w = values[idx], area[idx]
            row[q + "_p16"], row[q], row[q + "_p84"] = _weighted_percentiles(v, w, (16, 50, 84))
            draws = rng.integers(0, idx.size, (int(n_boot), idx.size))
            boot = [_weighted_percentiles(v[d], w[d], (50,))[0] for d in draws]
            row[q + "_boot_p16"], row[q + "_boot_p84"] = np.percentile(boot, (16, 84))
            if half is not None and np.isfinite(half[idx]).all():
                row[q + "_err_bins"] = float(np.sqrt(np.sum((w * half[idx]) ** 2)) / w.sum())
            else:
                row[q + "_err_bins"] = np.nan
        rows.append(row)
    if not rows:
        msg = "no binned spaxel lies in any annulus; check the centre and the maps."
        raise CubeSFHError(msg)

    table = QTable(rows=rows)
    order = ["r_in", "r_out", "r_mid"]
    if kpc_per_arcsec is not None:
        table["r_mid_kpc"] = table["r_mid"] * kpc_per_arcsec * u.kpc
        order.append("r_mid_kpc")
    if re_as is not None:
        table["r_mid_re"] = table["r_mid"] / re_as
        order.append("r_mid_re")
    for col in ("r_in", "r_out", "r_mid"):
        table[col] = table[col] * u.arcsec
    order += ["n_bins", "n_spaxels", "flagged_fraction"]
    for q in quantities:
        order += [q + k for k in ("", "_p16", "_p84", "_boot_p16", "_boot_p84", "_err_bins")]
    table = table[order]

    # gradients: one straight line through the bins themselves (each once, at the
    # area-weighted radius of its spaxels), so that a large outer bin spread over
    # many annuli counts once; the error from bootstrapping the bins
    kept = keep_bin[bins] & (radius <= edges[-1])
    area_b = np.bincount(bins[kept], minlength=maps.n_bins).astype(float)
    r_b = np.bincount(bins[kept], weights=radius[kept], minlength=maps.n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_b = r_b / area_b
    gradients = {}
    for q in quantities:
        values = per_bin[q][0]
        idx = np.flatnonzero((area_b > 0) & np.isfinite(values) & np.isfinite(r_b))
        if idx.size < 3 or np.ptp(r_b[idx]) == 0:
            continue
        x, y = r_b[idx], values[idx]
        coef = np.polyfit(x, y, 1)
        draws = rng.integers(0, idx.size, (int(n_boot), idx.size))
        slopes = [np.polyfit(x[d], y[d], 1)[0] for d in draws if np.ptp(x[d]) > 0]
        g = {"per_arcsec": float(coef[0]),
             "err_per_arcsec": float(np.std(slopes, ddof=1)) if len(slopes) > 1 else np.nan,
             "intercept": float(coef[1]), "n_bins": int(idx.size)}
        if kpc_per_arcsec is not None:
            g["per_kpc"] = g["per_arcsec"] / kpc_per_arcsec
        if re_as is not None:
            g["per_re"] = g["per_arcsec"] * re_as
        gradients[q] = g
    table.meta.update({
        "center_ra": float(c0.ra.deg), "center_dec": float(c0.dec.deg), "pa": pa_deg,
        "inclination": inc_deg, "width_arcsec": width_as, "method": method,
        "exclude": int(exclude), "n_boot": int(n_boot),
        "distance_mpc": d_mpc, "re_arcsec": re_as,
        "gradients": gradients,
        "comments": ["radii deprojected in elliptical annuli (major-axis radius)",
                     "q: area-weighted median over bins; q_p16/q_p84 their spread; "
                     "q_boot_*: bootstrap interval of the median",
                     "gradients: straight line through the bins (each bin once), "
                     "bootstrap errors; ages, [Z/H] and log Sigma_star in dex, mass "
                     "fractions as fractions, A_V in mag"]})
    return table


def plot_profile(profile, path=None, *, overwrite=False, dpi=120):
    """
    Each quantity of a `radial_profile` against radius, with its bands.

    The line is the median, the dark band the bootstrap interval of the
    median and the light band the 16th-84th percentile spread of the bins;
    the fitted gradient is in each panel's title.

    Parameters
    ----------
    profile : `~astropy.table.QTable`
    path : str or `~pathlib.Path`, optional
        Write the figure there (atomically; PNG, PDF... by the suffix).
    overwrite : bool, optional
        Replace an existing file.
    dpi : int, optional

    Returns
    -------
    fig : `matplotlib.figure.Figure`
    """
    from pathlib import Path

    from matplotlib.figure import Figure

    from .utils import atomic_write

    qs = [q for q in PROFILE_QUANTITIES if q in profile.colnames]
    ncol = 2
    nrow = int(np.ceil(len(qs) / ncol))
    fig = Figure(figsize=(8.0, 2.6 * nrow), layout="constrained")
    use_kpc = "r_mid_kpc" in profile.colnames
    r = (profile["r_mid_kpc"].to_value(u.kpc) if use_kpc
         else profile["r_mid"].to_value(u.arcsec))
    grads = profile.meta.get("gradients", {})
    for k, q in enumerate(qs):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        ax.fill_between(r, profile[q + "_p16"], profile[q + "_p84"], color="0.85",
                        label="16-84 % of bins")
        ax.fill_between(r, profile[q + "_boot_p16"], profile[q + "_boot_p84"], color="0.55",
                        label="median, bootstrap 68 %")
        ax.plot(r, profile[q], "k-", lw=1.5)
        ax.set_ylabel(_LABELS[q], fontsize=8)
        ax.set_xlabel("deprojected radius [kpc]" if use_kpc else "deprojected radius [arcsec]",
                      fontsize=8)
        g = grads.get(q)
        if g:
            slope = g.get("per_kpc") if use_kpc else g["per_arcsec"]
            unit = "kpc" if use_kpc else "arcsec"
            ax.set_title(f"gradient {slope:+.3f} / {unit}", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=6, loc="best")
    if path is not None:
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        with atomic_write(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
    return fig


def write_profile(profile, path, *, overwrite=False):
    """
    Write a `radial_profile` table atomically: ECSV (``.ecsv``, the whole ``meta``)
    or FITS (``.fits``; the gradient of each quantity as header cards ``G<code>``
    per arcsec, ``GE<code>`` its error, ``GK<code>`` per kpc and ``GR<code>``
    per R_e, with the codes ``AGLW``, ``AGMW``, ``ZHLW``, ``ZHMW``, ``Y1G``,
    ``Y5G``, ``AV``, ``MSD`` for the quantities of `PROFILE_QUANTITIES`).

    Parameters
    ----------
    profile : `~astropy.table.QTable`
    path : str or `~pathlib.Path`
    overwrite : bool, optional

    Returns
    -------
    path : `~pathlib.Path`
    """
    from pathlib import Path

    from .utils import atomic_write

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".ecsv", ".fits", ".fit"):
        msg = f"write the profile as .ecsv or .fits; got {path.name!r}."
        raise CubeSFHError(msg)
    out = profile.copy()
    if suffix != ".ecsv":
        grads = out.meta.pop("gradients", {})
        comments = out.meta.pop("comments", [])
        out.meta = {k.upper()[:8]: v for k, v in out.meta.items() if v is not None}
        out.meta["COMMENT"] = list(comments)
        for q, g in grads.items():
            key = _FITS_CODES[q]
            for prefix, name in (("G", "per_arcsec"), ("GE", "err_per_arcsec"),
                                 ("GK", "per_kpc"), ("GR", "per_re")):
                if name in g:
                    out.meta[f"{prefix}{key}"[:8]] = g[name]
    with atomic_write(path, overwrite=overwrite) as tmp:
        out.write(tmp, format="ascii.ecsv" if suffix == ".ecsv" else "fits", overwrite=True)
    return path
