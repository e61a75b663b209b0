# Licensed under a 3-clause BSD style license - see LICENSE
"""
Spectral gaps (the MUSE AO laser notch): how far the CNN maps move.

Two tests, each comparing the CNN on spectra with the notch against the same
spectra without it, for the template completion of :mod:`cubesfh.gaps` and for
the constant 1.0 that cubesfh 0.3 used:

1. the project's mock galaxy (``cubesfh make-mock``, BC03, 40 x 40 spaxels)
   and the same mock as a MUSE WFM-AO cube (``make-mock --ao``: NaN over the
   laser notch, observed 5780-6050 A, in every spaxel of DATA and STAT), at
   the true kinematics, with and without the five HST bands;
2. N spectra of the held-out E-MILES library (the leave-one-library-out set of
   ``cubesfh evaluate --heldout``, seed 2026), with the notch (observed
   5780-6050 A) at a redshift drawn uniformly in 0-0.03 per spectrum.

Usage::

    python scripts/evaluate_gaps.py --n 2000 --output docs/_static/metrics_gaps.json

writes the JSON and an RST table beside it (``.rst``), included by
``docs/evaluation.rst``. About 2 minutes on 2 cores (the first run downloads
the ppxf sdist for E-MILES with pip).
"""

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

QUANTITIES = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")


def _shift_stats(pred, ref, truth=None):
    out = {}
    for q in QUANTITIES:
        d = pred[q] - ref[q]
        r = {"median_shift": float(np.nanmedian(d)), "rms_shift": float(np.sqrt(np.nanmean(d**2)))}
        if truth is not None:
            r["scatter_ref"] = float(np.std(ref[q] - truth[q]))
            r["scatter"] = float(np.std(pred[q] - truth[q]))
            if f"{q}_p16" in pred:
                r["coverage68_ref"] = float(np.mean((truth[q] >= ref[f"{q}_p16"])
                                                    & (truth[q] <= ref[f"{q}_p84"])))
                r["coverage68"] = float(np.mean((truth[q] >= pred[f"{q}_p16"])
                                                & (truth[q] <= pred[f"{q}_p84"])))
        out[q] = r
    return out


def mock_pair():
    """The project's mock galaxy and its AO version, prepared at the true kinematics."""
    from astropy.io import fits

    from cubesfh import Cube, CubeSFHWarning, HSTImage
    from cubesfh.conventions import HST_BANDS
    from cubesfh.preprocess import prepare_observation
    from cubesfh.synthesis import mock_observation

    prepared = []
    with tempfile.TemporaryDirectory() as tmp:
        for ao in (False, True):
            d = Path(tmp) / ("ao" if ao else "full")
            obs = mock_observation(d, ao_notch=ao, progress_bar=False)
            with fits.open(obs.truth_path) as h:
                fits.HDUList([fits.PrimaryHDU(),
                              fits.ImageHDU(h["V"].data, h["V"].header, name="V_STARS"),
                              fits.ImageHDU(h["SIGMA"].data, h["V"].header, name="SIGMA_STARS")]
                             ).writeto(d / "kin.fits")
            hst = {b: HSTImage.read(obs.hst_paths[b]) for b in HST_BANDS}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CubeSFHWarning)
                prepared.append(prepare_observation(Cube.read(obs.cube_path), hst,
                                                    kinematics=str(d / "kin.fits"),
                                                    target_snr=35, progress_bar=False))
    return prepared


def own_mock():
    from cubesfh import pipeline
    from cubesfh.gaps import gap_fraction

    full, ao = mock_pair()
    result = {"n_bins": int(ao.n_bins),
              "gap_fraction_median": float(np.median(gap_fraction(ao.spectra.flux)))}
    ones = _replace_flux(ao, np.where(np.isfinite(ao.spectra.flux), ao.spectra.flux, 1.0))
    for phot in (True, False):
        ref = pipeline.predict_bins(full, photometry=phot)
        key = "five_bands" if phot else "spectrum_only"
        result[key] = {"template_fill": _shift_stats(pipeline.predict_bins(ao, photometry=phot),
                                                     ref),
                       "fill_1": _shift_stats(pipeline.predict_bins(ones, photometry=phot),
                                              ref)}
    return result


def _replace_flux(prepared, flux):
    import copy

    spectra = copy.copy(prepared.spectra)
    spectra.flux = flux
    out = copy.copy(prepared)
    out.spectra = spectra
    return out


def heldout(n):
    from cubesfh.gaps import fill_gaps
    from cubesfh.network import SFHModel
    from cubesfh.synthesis import ForwardModel
    from cubesfh.synthesis.trainingset import _family_plan, simulate_samples, with_young_from_bc03
    from cubesfh.templates import load_heldout_library

    model = SFHModel.load()
    fm = ForwardModel(with_young_from_bc03(load_heldout_library()),
                      sigma_target=model.sigma_target)
    rng = np.random.default_rng([2026, 11])
    sim = simulate_samples(rng, _family_plan(n, (150_000, 9_000, 6_000), 2026), fm,
                           snr_values=(15, 20, 35, 50), prior="broad")
    spec = sim["spectra"].astype(float)
    w = fm.wavelength.value
    z = np.random.default_rng(7).uniform(0.0, 0.03, n)
    gap = (w >= 5780.0 / (1 + z)[:, None]) & (w <= 6050.0 / (1 + z)[:, None])
    filled, _ = fill_gaps(np.where(gap, np.nan, spec), model.sigma_target.value)
    ref = model.predict(spec, sim["photometry"])
    return {"n": int(n), "model_id": model.model_id,
            "gap_fraction_median": float(np.median(gap.mean(axis=1))),
            "template_fill": _shift_stats(model.predict(filled, sim["photometry"]), ref, sim),
            "fill_1": _shift_stats(model.predict(np.where(gap, 1.0, spec), sim["photometry"]),
                                   ref, sim)}


def to_rst(m):
    names = {"logage_lw": "LW log age", "logage_mw": "MW log age", "zh_lw": "LW [Z/H]",
             "zh_mw": "MW [Z/H]"}
    lines = [".. list-table::", "   :header-rows: 1", "",
             "   * - test", "     - quantity", "     - median shift (template fill)",
             "     - rms shift (template fill)", "     - median shift (constant 1.0)",
             "     - rms shift (constant 1.0)"]
    rows = [("own mock, five bands", m["own_mock"]["five_bands"]),
            ("own mock, spectrum only", m["own_mock"]["spectrum_only"]),
            ("held-out E-MILES", m["heldout"])]
    for label, block in rows:
        for q in QUANTITIES:
            t, o = block["template_fill"][q], block["fill_1"][q]
            lines += [f"   * - {label}", f"     - {names[q]}",
                      f"     - {t['median_shift']:+.3f}", f"     - {t['rms_shift']:.3f}",
                      f"     - {o['median_shift']:+.3f}", f"     - {o['rms_shift']:.3f}"]
    lines += ["", ".. list-table::", "   :header-rows: 1", "",
              "   * - held-out E-MILES", "     - scatter without gap",
              "     - scatter, template fill", "     - scatter, constant 1.0",
              "     - 68 % coverage without gap", "     - 68 % coverage, template fill"]
    h = m["heldout"]
    for q in QUANTITIES:
        t, o = h["template_fill"][q], h["fill_1"][q]
        lines += [f"   * - {names[q]}", f"     - {t['scatter_ref']:.3f}",
                  f"     - {t['scatter']:.3f} ({t['scatter'] / t['scatter_ref'] - 1:+.0%})",
                  f"     - {o['scatter']:.3f} ({o['scatter'] / o['scatter_ref'] - 1:+.0%})",
                  f"     - {t['coverage68_ref']:.1%}", f"     - {t['coverage68']:.1%}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="held-out spectra (default 2000)")
    p.add_argument("--output", default="metrics_gaps.json")
    args = p.parse_args(argv)
    m = {"own_mock": own_mock(), "heldout": heldout(args.n)}
    out = Path(args.output)
    out.write_text(json.dumps(m, indent=1) + "\n")
    out.with_suffix(".rst").write_text(to_rst(m))
    print(out.with_suffix(".rst").read_text())


if __name__ == "__main__":
    main()
