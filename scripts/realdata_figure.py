#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Run cubesfh on the real MUSE cube of the Abell 478 BCG and make the figures of
``docs/realdata.rst``.

Usage::

    python scripts/realdata_figure.py [--model PATH ...] [--target-snr 20] [--outdir docs/_static]

Prints the numbers quoted in the docs page (JSON) and writes
``realdata_images.png`` (images, bins, centroids, light fractions) and
``realdata_spectrum.png`` (co-added spectrum).
The data are fetched with :func:`cubesfh.datasets.fetch_mpdaf_a478` (pip
download of the mpdaf 3.6 wheel, cached).
"""

import argparse
import json
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np

from cubesfh import datasets as realdata
from cubesfh.conventions import AGE_BIN_CENTERS
from cubesfh.network import SFHModel
from cubesfh.pipeline import run_pipeline
from cubesfh.registration import register
from cubesfh.utils import CubeSFHWarning

REDSHIFT_GUESS = 0.088
#: Rest-frame wavelengths of the strong emission lines of the BCG (air).
LINES = {"H$\\beta$": 4861.3, "[OIII]": 5006.8, "[NI]": 5199.0, "[OI]": 6300.3,
         "H$\\alpha$+[NII]": 6562.8, "[SII]": 6723.0}


def cards_of(report):
    """Registration header cards as a dict."""
    return {c[0]: c[1] for c in report.to_header_cards()}


def radial_flux_ratio(cube, image, edges=(0, 4, 8, 12, 16, 30)):
    """MUSE/HST F814W ratio in annuli (spaxels) around the HST peak, image registered,
    and the median MUSE F814W flux density per spaxel (cube unit)."""
    from cubesfh.registration import _hst_on_grid, _synthetic_images

    muse = _synthetic_images(cube, ["F814W"], instrument="WFPC2", missing="linear",
                             max_memory=None, progress_bar=False)["F814W"][0]
    hst = _hst_on_grid(image, cube.celestial_wcs, cube.spatial_shape,
                       target_fwhm=cube.psf_fwhm, unit=cube.unit)
    ok = np.isfinite(muse) & np.isfinite(hst)
    cy, cx = np.unravel_index(np.argmax(np.where(ok, hst, -np.inf)), hst.shape)
    yy, xx = np.indices(hst.shape)
    r = np.hypot(yy - cy, xx - cx)
    out = {"median MUSE spaxel": round(float(np.median(muse[ok])), 2)}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = ok & (r >= lo) & (r < hi)
        out[f"{lo}-{hi} spaxels"] = round(float(muse[sel].sum() / hst[sel].sum()), 3)
    return out


def continuum_ratios(cube, redshift):
    """Mean flux density of the summed cube in rest-frame windows, relative to 5300-5500 A,
    and the same for the oldest solar and 2.5x solar templates of the library."""
    from cubesfh.templates import TemplateLibrary

    windows = {"4850-5000": (4850, 5000), "6000-6200": (6000, 6200), "7366-7827": (7366, 7827)}
    w = cube.wavelength.to_value(u.AA)
    total = np.nansum(np.asarray(cube.data, dtype=float).reshape(w.size, -1), axis=1)

    def cube_mean(lo, hi):
        return np.nanmean(total[(w >= lo * (1 + redshift)) & (w <= hi * (1 + redshift))])

    lib = TemplateLibrary.load()
    sw = lib.sed_wavelength.to_value(u.AA)
    seds = lib.binned(sed=True)
    out = {"cube": {k: round(float(cube_mean(*v) / cube_mean(5300, 5500)), 3)
                    for k, v in windows.items()}}
    for zi in (3, 4):  # Z = 0.02, 0.05
        sed = seds[zi, -1]

        def sed_mean(lo, hi, sed=sed):
            return sed[(sw >= lo) & (sw <= hi)].mean()

        out[f"oldest template Z={lib.metallicity[zi]:g}"] = {
            k: round(float(sed_mean(*v) / sed_mean(5300, 5500)), 3) for k, v in windows.items()}
    return out


def run(model=None, target_snr=20.0):
    """Run the validation; return (cube, hst, centroids, results dict, spectrum-only maps)."""
    common = {"target_snr": target_snr, "redshift": REDSHIFT_GUESS, "model": model,
              "scheduler": "serial", "progress_bar": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CubeSFHWarning)
        cube, hst = realdata.read_mpdaf_a478()
        images, report = register(cube, {"F814W": hst}, correct=True)
        cen = realdata.centroid_offset(cube, hst)
        # spectrum only, bundled family (sigma ~ 275 km/s: the 300 km/s network) + pPXF
        spec = run_pipeline(cube, None, ppxf=True, **common)
        # the paper's 150 km/s network alone, for comparison (spectra not broadened)
        spec150 = run_pipeline(cube, None, ppxf=True, **dict(common, model=SFHModel.load()))
        # with the WFPC2 F814W image: registration, flux ratio and K-correction in the run
        phot = run_pipeline(cube, {"F814W": hst}, ppxf=True, **common)
        # the same with the image calibrated onto the cube's flux scale (x MUSE/HST)
        ratio = float(cards_of(report)["FRATF814"])
        matched = run_pipeline(cube, {"F814W": realdata.apply_k_correction(hst, ratio)},
                               ppxf=True, **common)
    t = spec.table
    z_fit = (1 + REDSHIFT_GUESS) * (1 + np.nanmedian(t["velocity"].to_value(u.km / u.s))
                                    / 299792.458) - 1
    cards = cards_of(report)
    res = {
        "models": spec.meta.get("models"), "n_bins": len(t),
        "snr": list(np.round(np.asarray(t["snr"]), 1)),
        "n_spaxels": [int(n) for n in t["n_spaxels"]],
        "velocity_kms": list(np.round(t["velocity"].to_value(u.km / u.s), 0)),
        "sigma_kms": list(np.round(t["sigma"].to_value(u.km / u.s), 0)),
        "sigma_target_kms": list(np.round(t["sigma_target"].to_value(u.km / u.s), 0)),
        "redshift_fit": round(z_fit, 5), "flags": [int(f) for f in t["flag"]],
        "register_dra_arcsec": cards.get("REGDRA"), "register_ddec_arcsec": cards.get("REGDDEC"),
        "register_err_arcsec": cards.get("REGERR"), "flux_ratio_muse_hst": cards.get("FRATF814"),
        "flux_fit_slope": cards.get("FSLPF814"), "flux_fit_offset": cards.get("FOFFF814"),
        "flux_ratio_by_radius": radial_flux_ratio(cube, images["F814W"]),
        "continuum_ratios_rest": continuum_ratios(cube, z_fit),
        "centroid_dra_arcsec": round(float(cen["dra"].to_value(u.arcsec)), 3),
        "centroid_ddec_arcsec": round(float(cen["ddec"].to_value(u.arcsec)), 3),
        "k_correction_f814w": list(np.round(np.asarray(phot.table["kcorr_F814W"]), 4)),
        "k_correction_f814w_matched": list(np.round(np.asarray(matched.table["kcorr_F814W"]),
                                                    4)),
    }
    for name, m in (("spec", spec), ("spec_150only", spec150), ("f814w", phot),
                    ("f814w_fluxmatched", matched)):
        for key in ("logage_lw", "logage_mw", "zh_lw", "zh_mw"):
            for who in ("cnn", "ppxf"):
                res[f"{who}_{key}_{name}"] = list(np.round(np.asarray(m.table[f"{who}_{key}"]),
                                                           3))
    return cube, hst, cen, res, spec


def figures(cube, hst, cen, spec, outdir):
    """Write the two figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    t = spec.table
    # 1. images: cube collapsed in F814W, bin map, HST cut-out, centroids
    wave = cube.wavelength.to_value(u.AA)
    sel = (wave > 7000) & (wave < 9300)
    img = np.nanmean(np.asarray(cube.data[sel], dtype=float), axis=0)
    fig = plt.figure(figsize=(13, 4.2))
    ax1 = fig.add_subplot(1, 3, 1, projection=cube.celestial_wcs)
    ax1.imshow(np.arcsinh(img / np.nanpercentile(img, 50)), origin="lower", cmap="gray_r")
    ax1.contour(spec.bin_map, levels=np.arange(-0.5, spec.bin_map.max() + 1), colors="C0",
                linewidths=0.8)
    ax1.plot(*cube.celestial_wcs.world_to_pixel(cen["muse_sky"]), "r+", ms=14)
    ax1.set_title("MUSE 7000-9300 A, bins")
    ax2 = fig.add_subplot(1, 3, 2, projection=hst.wcs)
    x, y = hst.wcs.world_to_pixel(cen["hst_sky"])
    half = 45
    cut = np.arcsinh(np.asarray(hst.data, dtype=float) / 0.05)
    box = cut[int(y) - half:int(y) + half, int(x) - half:int(x) + half]
    ax2.imshow(cut, origin="lower", cmap="gray_r", vmin=np.nanpercentile(box, 1),
               vmax=np.nanpercentile(box, 99.8))
    ax2.set_xlim(x - half, x + half)
    ax2.set_ylim(y - half, y + half)
    ax2.plot(x, y, "r+", ms=14)
    xm, ym = hst.wcs.world_to_pixel(cen["muse_sky"])
    ax2.plot(xm, ym, "bx", ms=10)
    ax2.set_title("WFPC2 F814W (+ HST, x MUSE centroid)")
    ax3 = fig.add_subplot(1, 3, 3)
    tab = spec.table
    for i in range(len(tab)):
        ax3.plot(np.log10(AGE_BIN_CENTERS.to_value(u.yr)), tab["cnn_light_fraction"][i],
                 "C0-o", ms=3, label="CNN" if i == 0 else None)
        ax3.plot(np.log10(AGE_BIN_CENTERS.to_value(u.yr)), tab["ppxf_light_fraction"][i],
                 "C1-s", ms=3, label="pPXF" if i == 0 else None)
    ax3.set_xlabel("log age / yr")
    ax3.set_ylabel("light fraction")
    ax3.legend()
    ax3.set_title("Light fractions per bin (spectrum only)")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9, wspace=0.5)
    fig.savefig(outdir / "realdata_images.png", dpi=90)
    plt.close(fig)

    # 2. co-added spectrum with emission lines
    data = np.asarray(cube.data, dtype=float).reshape(wave.size, -1)
    mean = np.nanmean(data, axis=1)
    z = (1 + REDSHIFT_GUESS) * (1 + np.median(t["velocity"].to_value(u.km / u.s))
                                / 299792.458) - 1
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(wave, mean, lw=0.6, color="k")
    for name, lam in LINES.items():
        ax.axvline(lam * (1 + z), color="C3", lw=0.6, ls=":")
        ax.text(lam * (1 + z), np.nanpercentile(mean, 99.5), name, rotation=90,
                fontsize=7, va="top", ha="right", color="C3")
    ax.axvspan(4800 * (1 + z), 7000 * (1 + z), color="C0", alpha=0.08,
               label="rest 4800-7000 A (network input)")
    ax.axvspan(5300, 5500, color="C2", alpha=0.2, label="S/N window of voronoi_bin (observed)")
    ax.set_xlabel("observed air wavelength (A)")
    ax.set_ylabel(f"mean flux per spaxel ({cube.unit})")
    ax.set_ylim(np.nanpercentile(mean, 0.5) * 0.8, np.nanpercentile(mean, 99.9) * 1.1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "realdata_spectrum.png", dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--model", action="append",
                        help="CNN weights, repeatable (default: the bundled family)")
    parser.add_argument("--target-snr", type=float, default=20.0)
    parser.add_argument("--outdir", type=Path, default=Path("docs/_static"))
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    model = [SFHModel.load(p) for p in args.model] if args.model else None
    cube, hst, cen, res, spec = run(model, args.target_snr)
    print(json.dumps(res, indent=1, default=float))
    if not args.no_figures:
        figures(cube, hst, cen, spec, args.outdir)


if __name__ == "__main__":
    main()
