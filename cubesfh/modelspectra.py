# Licensed under a 3-clause BSD style license - see LICENSE
"""
The bins' spectra and model spectra, and the figure of one bin's fit.

``cubesfh run --model-spectra FILE`` (``run_pipeline(model_spectra=True)``
then `write_model_spectra`) writes, per bin, the prepared rest-frame
spectrum and its error, the spectrum implied by the CNN's answer
(re-synthesised and fitted, :func:`cubesfh.pipeline.fit_check_bins`), pPXF's
best fit when it ran and the pixels both were judged on, with the same
``BIN_ID`` map as the product. `plot_bin` (``cubesfh show``) draws the figure
an astronomer looks at before believing a map: spectrum, models and
residuals, the HST fluxes against the implied ones, the SFH with its 16-84 %
band, Z(t), and the bin's flags and chi^2.

The layout follows nGIST's ``_spectra``/``_bestfit`` products in spirit
(one row per bin, the fitted pixels marked), as 2-D images that DS9 opens
(axis 1 the wavelength with a linear ``AWAV`` WCS, axis 2 the bin number)
rather than binary-table columns; see :ref:`fitcheck`.
"""

import logging
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits

from .conventions import AGE_BIN_CENTERS, AGE_BIN_EDGES, HST_BANDS
from .utils import CubeSFHError, atomic_write

__all__ = ["MODEL_SPECTRA_TYPE", "plot_bin", "read_model_spectra", "write_model_spectra"]

log = logging.getLogger(__name__)

#: ``PRODTYPE`` of the model-spectra file.
MODEL_SPECTRA_TYPE = "CUBESFH_MODEL_SPECTRA"

_IMAGES = (("SPEC", "flux", "prepared rest-frame spectrum / norm"),
           ("ESPEC", "error", "1-sigma error of SPEC"),
           ("CNN_MODEL", "cnn", "re-synthesised CNN answer, fitted (dust, polynomial)"),
           ("PPXF_MODEL", "ppxf", "pPXF best fit on the same grid"))


def write_model_spectra(maps, path, *, overwrite=False):
    """
    Write the bins' spectra and model spectra (see the module notes).

    Parameters
    ----------
    maps : `~cubesfh.maps.StellarPopulationMaps`
        Made with ``run_pipeline(..., model_spectra=True)``.
    path : str or `~pathlib.Path`
    overwrite : bool, optional

    Returns
    -------
    path : `~pathlib.Path`
    """
    from .maps import _unit_string

    ms = getattr(maps, "model_spectra", None)
    if not ms:
        msg = ("these maps carry no model spectra; run the pipeline with "
               "model_spectra=True (cubesfh run --model-spectra FILE).")
        raise CubeSFHError(msg)
    wave = u.Quantity(ms["wavelength"], u.AA).value
    step = float(wave[1] - wave[0])
    prim = fits.PrimaryHDU()
    h = prim.header
    h["ORIGIN"] = ("cubesfh", "software that wrote the file")
    h["PRODTYPE"] = (MODEL_SPECTRA_TYPE, "cubesfh product type")
    h["NBINS"] = (maps.n_bins, "number of bins (rows of every image)")
    h["MODEL_ID"] = (str(maps.meta.get("model_id", "")), "CNN model identifier")
    h["DATE"] = (str(maps.meta.get("date", "")), "UTC date of the maps")
    h.add_comment("Per bin (row k = bin k of BIN_ID): SPEC, ESPEC, CNN_MODEL, PPXF_MODEL "
                  "(when pPXF ran), GOODPIX (1 = pixel of the chi2), in units of the BINS "
                  "column norm.")
    hdus = [prim, fits.ImageHDU(maps.bin_map, header=maps.wcs.to_header(), name="BIN_ID")]
    for name, key, doc in _IMAGES:
        data = ms.get(key)
        if data is None:
            continue
        hd = fits.Header()
        for k, v, c in (("CTYPE1", "AWAV", "air wavelength, rest frame"),
                        ("CUNIT1", "Angstrom", ""), ("CRPIX1", 1.0, ""),
                        ("CRVAL1", float(wave[0]), ""), ("CDELT1", step, ""),
                        ("CTYPE2", "BIN", "bin number (row 1 = bin 0)"),
                        ("CRPIX2", 1.0, ""), ("CRVAL2", 0.0, ""), ("CDELT2", 1.0, ""),
                        ("BUNIT", "", "normalised: multiply by BINS norm"),
                        ("CONTENT", doc, "")):
            hd[k] = (v, c)
        hdus.append(fits.ImageHDU(np.asarray(data, np.float32), header=hd, name=name))
    if ms.get("good") is not None:
        hdus.append(fits.ImageHDU(np.asarray(ms["good"], np.uint8), name="GOODPIX"))
    cols = [fits.Column(name="bin", format="J", array=np.arange(maps.n_bins, dtype=np.int32))]
    t = maps.table
    for name in ("norm", "cnn_fit_chi2", "cnn_fit_chi2_limit", "ppxf_fit_chi2", "cnn_av_fit",
                 "cnn_phot_chi2", "tension", "flag"):
        if name in t.colnames:
            v = np.asarray(getattr(t[name], "value", t[name]))
            unit = getattr(t[name], "unit", None)
            cols.append(fits.Column(name=name, format="J" if v.dtype.kind in "iu" else "D",
                                    array=v, unit=_unit_string(unit) or None))
    for name in ("phot", "cnn_phot_model"):
        if name == "phot":
            v = np.stack([np.asarray(t[f"phot_{b}"], float) for b in HST_BANDS], axis=1)
        elif name in t.colnames:
            v = np.asarray(t[name], float)
        else:
            continue
        cols.append(fits.Column(name=name, format=f"{len(HST_BANDS)}D", array=v))
    bins = fits.BinTableHDU.from_columns(cols, name="BINS")
    bins.header["BANDS"] = (",".join(HST_BANDS), "order of phot and cnn_phot_model")
    hdus.append(bins)
    with atomic_write(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path)


def read_model_spectra(path):
    """
    Read a file of `write_model_spectra`.

    Returns
    -------
    spectra : dict
        ``wavelength`` (Quantity), ``flux``, ``error``, ``cnn``, ``ppxf``
        (`None` when absent), ``good`` (bool) as ``(n_bins, n_pix)`` arrays,
        ``bin_map`` and ``table`` (the ``BINS`` extension as an
        `~astropy.table.Table`).
    """
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        msg = f"model-spectra file {str(path)!r} not found; write one with --model-spectra."
        raise CubeSFHError(msg)
    with fits.open(path) as h:
        if h[0].header.get("PRODTYPE") != MODEL_SPECTRA_TYPE:
            msg = (f"{path} is not a cubesfh model-spectra file (PRODTYPE "
                   f"{h[0].header.get('PRODTYPE')!r}); write one with --model-spectra.")
            raise CubeSFHError(msg)
        hd = h["SPEC"].header
        n = hd["NAXIS1"]
        wave = (hd["CRVAL1"] + hd["CDELT1"] * (np.arange(n) + 1 - hd["CRPIX1"])) * u.AA
        out = {"wavelength": wave, "bin_map": np.asarray(h["BIN_ID"].data),
               "table": Table.read(h["BINS"])}
        for name, key, _ in _IMAGES:
            out[key] = np.asarray(h[name].data, float) if name in h else None
        out["good"] = (np.asarray(h["GOODPIX"].data) > 0) if "GOODPIX" in h else None
    return out


def _select_bin(maps, bin_number=None, ra=None, dec=None):
    if bin_number is None:
        if ra is None or dec is None:
            msg = "give a bin number (--bin N) or a sky position (--ra RA --dec DEC, degrees)."
            raise CubeSFHError(msg)
        x, y = maps.wcs.world_to_pixel_values(float(ra), float(dec))
        ix, iy = int(np.round(x)), int(np.round(y))
        ny, nx = maps.shape
        if not (0 <= ix < nx and 0 <= iy < ny) or maps.bin_map[iy, ix] < 0:
            msg = (f"no bin at RA {float(ra):.6f}, Dec {float(dec):.6f} (pixel {ix}, {iy}): "
                   "the position is outside the binned field.")
            raise CubeSFHError(msg)
        return int(maps.bin_map[iy, ix])
    b = int(bin_number)
    if not 0 <= b < maps.n_bins:
        msg = f"bin {b} does not exist: the maps have bins 0-{maps.n_bins - 1}."
        raise CubeSFHError(msg)
    return b


def plot_bin(maps, bin_number=None, *, spectra=None, ra=None, dec=None, path=None,
             overwrite=False, dpi=110):
    """
    The fit of one bin: spectrum, models, residuals, HST fluxes, SFH and Z(t).

    Parameters
    ----------
    maps : `~cubesfh.maps.StellarPopulationMaps`
    bin_number : int, optional
        The bin; or give ``ra`` and ``dec`` (degrees) for the bin there.
    spectra : dict or str or `~pathlib.Path`, optional
        The model spectra (`read_model_spectra` or its file); default
        ``maps.model_spectra``. Without them the figure has no spectrum panel.
    path : str or `~pathlib.Path`, optional
        Write the figure there (atomically).
    overwrite : bool, optional
    dpi : int, optional

    Returns
    -------
    fig : `matplotlib.figure.Figure`
    """
    from matplotlib.figure import Figure

    from .maps import decode_flags

    b = _select_bin(maps, bin_number, ra, dec)
    if spectra is None:
        spectra = getattr(maps, "model_spectra", None)
    elif isinstance(spectra, (str, Path)):
        spectra = read_model_spectra(spectra)
    t = maps.table

    def col(name, default=np.nan):
        if name not in t.colnames:
            return default
        v = t[name][b]
        return np.asarray(getattr(v, "value", v), float)

    fig = Figure(figsize=(11.0, 8.0), layout="constrained")
    grid = fig.add_gridspec(3, 3, height_ratios=[2.2, 1.0, 2.0])
    ax_s = fig.add_subplot(grid[0, :])
    ax_r = fig.add_subplot(grid[1, :], sharex=ax_s)
    if spectra is not None and spectra.get("flux") is not None:
        w = u.Quantity(spectra["wavelength"], u.AA).value
        f = spectra["flux"][b]
        good = spectra["good"][b] if spectra.get("good") is not None else np.isfinite(f)
        ax_s.plot(w, f, color="k", lw=0.7, label="data")
        for key, colour, label in (("cnn", "C3", "CNN answer, re-synthesised"),
                                   ("ppxf", "C0", "pPXF best fit")):
            m = spectra.get(key)
            if m is not None and np.isfinite(m[b]).any():
                ax_s.plot(w, m[b], color=colour, lw=0.8, label=label)
                ax_r.plot(w, np.where(good, f - m[b], np.nan), color=colour, lw=0.6)
        if spectra.get("error") is not None:
            e = spectra["error"][b]
            ax_r.fill_between(w, -e, e, color="0.85", lw=0, label="1 sigma")
        for lo, hi in _runs(w, ~good):
            ax_s.axvspan(lo, hi, color="0.92", lw=0)
            ax_r.axvspan(lo, hi, color="0.92", lw=0)
        ax_s.legend(fontsize=7, loc="upper right")
    else:
        ax_s.text(0.5, 0.5, "no model spectra (cubesfh run --model-spectra FILE)",
                  ha="center", va="center", transform=ax_s.transAxes)
    ax_s.set_ylabel("flux / norm", fontsize=8)
    ax_r.set_ylabel("residual", fontsize=8)
    ax_r.set_xlabel("rest-frame wavelength [Å] (grey: not fitted)", fontsize=8)

    # HST fluxes
    ax_p = fig.add_subplot(grid[2, 0])
    from .templates import load_filters

    pivots = np.array([fc.pivot.to_value(u.AA) for fc in load_filters(HST_BANDS)])
    meas = np.array([col(f"phot_{band}") for band in HST_BANDS], float)
    model = col("cnn_phot_model", np.full(len(HST_BANDS), np.nan))
    ax_p.errorbar(pivots, meas, yerr=0.02 * np.abs(meas), fmt="ko", ms=4, label="measured")
    ax_p.plot(pivots, model, "s", color="C3", mfc="none", label="implied by the CNN")
    for x, band in zip(pivots, HST_BANDS):
        ax_p.text(x, ax_p.get_ylim()[0], band, fontsize=6, ha="center", va="bottom")
    ax_p.set_xscale("log")
    ax_p.set_yscale("log")
    ax_p.set_xlabel("pivot wavelength [Å]", fontsize=8)
    ax_p.set_ylabel("HST flux / norm", fontsize=8)
    ax_p.legend(fontsize=6)

    # SFH and Z(t)
    age = AGE_BIN_CENTERS.to_value(u.Gyr)
    edges = AGE_BIN_EDGES.to_value(u.Gyr).copy()  # to_value may return a view
    edges[0] = edges[1] / 3.0
    ax_h = fig.add_subplot(grid[2, 1])
    ax_z = fig.add_subplot(grid[2, 2])
    for prefix, colour, label in (("cnn_", "C3", "CNN"), ("ppxf_", "C0", "pPXF")):
        f = col(prefix + "mass_fraction", None)
        if f is None or not np.isfinite(f).any():
            continue
        ax_h.stairs(f, edges, color=colour, label=label)
        lo, hi = col(prefix + "mass_fraction_p16", None), col(prefix + "mass_fraction_p84", None)
        if lo is not None and hi is not None:
            ax_h.fill_between(age, lo, hi, step="mid", color=colour, alpha=0.2, lw=0)
        z = col(prefix + "zh", None)
        if z is not None:
            ax_z.plot(age, np.where(f > 0.01, z, np.nan), "o-", color=colour, ms=3, label=label)
    for ax in (ax_h, ax_z):
        ax.set_xscale("log")
        ax.set_xlabel("age [Gyr]", fontsize=8)
    ax_h.set_ylabel("living-mass fraction", fontsize=8)
    ax_z.set_ylabel("[Z/H] (bins with > 1 % of the mass)", fontsize=8)
    ax_h.legend(fontsize=6)
    for ax in fig.axes:
        ax.tick_params(labelsize=7)

    flags = decode_flags(int(t["flag"][b])) if "flag" in t.colnames else []
    chi = col("cnn_fit_chi2")
    lim = col("cnn_fit_chi2_limit")
    pchi = col("ppxf_fit_chi2")
    parts = [f"bin {b} ({int(t['n_spaxels'][b])} spaxels, S/N {col('snr'):.0f})",
             f"chi2 CNN {chi:.2f}" + (f" (limit {lim:.2f})" if np.isfinite(lim) else "")]
    if np.isfinite(pchi):
        parts.append(f"pPXF {pchi:.2f}")
    if np.isfinite(col("tension")):
        parts.append(f"HST tension {col('tension'):.1f} sigma")
    parts.append("flags: " + (", ".join(flags) if flags else "none"))
    fig.suptitle("; ".join(parts), fontsize=9)
    if path is not None:
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        with atomic_write(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
    return fig


def _runs(w, mask):
    """(start, end) wavelengths of the runs of True in ``mask``."""
    out = []
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    half = 0.5 * (w[1] - w[0])
    return [(w[s] - half, w[e] + half) for s, e in zip(starts, ends)]
