#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
Light-weighted age offset of the network on the mock galaxy, old versus young bins.

Usage::

    python scripts/mock_age_offset.py [--arms-tau-ism 0.6] [--arms-tau-bc 1.5] [--workdir DIR]
        [--library {bc03,emiles}] [--ao] [--model NET.pt ...]

Writes a 24 x 24 spaxel mock (seed 1; :func:`cubesfh.synthesis.mock_observation`),
runs :func:`cubesfh.pipeline.run_pipeline` with the true kinematics, with and
without the HST images, and prints the median offset (network minus the mean
of the truth map in the bin) of the light-weighted log age for bins whose true
value is above and below 9.4. ``--arms-tau-ism``/``--arms-tau-bc`` change the
dust of the young arms (the default mock has 0.6 / 1.5; the training prior is
tau_ISM ~ N(0.3, 0.08)). ``--library emiles`` builds the galaxy from the
held-out E-MILES library (never used in training), ``--ao`` writes it as a
MUSE WFM-AO cube (laser notch), and ``--model`` runs the given networks
(``.pt`` with their ``.json``; default: the bundled family) one after the
other on the same mock. See ``docs/mock.rst`` and ``docs/evaluation.rst``.
"""

import argparse
import dataclasses
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from cubesfh import Cube, HSTImage
from cubesfh.pipeline import run_pipeline
from cubesfh.synthesis import mock_components, mock_observation
from cubesfh.templates import TemplateLibrary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--arms-tau-ism", type=float, default=None)
    parser.add_argument("--arms-tau-bc", type=float, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--library", choices=("bc03", "emiles"), default="bc03")
    parser.add_argument("--ao", action="store_true", help="a MUSE WFM-AO cube (laser notch)")
    parser.add_argument("--model", nargs="*", default=(), help="networks to run (.pt)")
    args = parser.parse_args(argv)
    library = None
    if args.library == "emiles":
        from cubesfh.synthesis.trainingset import with_young_from_bc03
        from cubesfh.templates import load_heldout_library

        library = with_young_from_bc03(load_heldout_library())
    comps = mock_components(TemplateLibrary.load())
    arms = comps["arms"]
    comps["arms"] = dataclasses.replace(
        arms, tau_ism=arms.tau_ism if args.arms_tau_ism is None else args.arms_tau_ism,
        tau_bc=arms.tau_bc if args.arms_tau_bc is None else args.arms_tau_bc)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cubesfh_mock_"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs = mock_observation(work, shape=(24, 24), seed=1, components=comps,
                               library=library, ao_notch=args.ao, overwrite=True,
                               progress_bar=False)
        with fits.open(obs.truth_path) as h:
            kin = fits.HDUList([fits.PrimaryHDU(),
                                fits.ImageHDU(h["V"].data, h["V"].header, name="V_STARS"),
                                fits.ImageHDU(h["SIGMA"].data, h["SIGMA"].header,
                                              name="SIGMA_STARS")])
            kin.writeto(work / "true_kinematics.fits", overwrite=True)
            truth = h["LOGAGE_LW"].data
        cube = Cube.read(obs.cube_path)
        hst = {b: HSTImage.read(p) for b, p in obs.hst_paths.items()}
        from cubesfh.network import SFHModel

        models = {Path(m).stem: SFHModel.load(m) for m in args.model} or {"bundled": None}
        runs = {f"{label}, {name}": run_pipeline(cube, images, target_snr=35,
                                                 kinematics=work / "true_kinematics.fits",
                                                 model=model, ppxf=False, progress_bar=False)
                for label, model in models.items()
                for name, images in (("all five bands", hst), ("spectrum only", None))}
    print(f"library {args.library}{' (AO notch)' if args.ao else ''}; arms: tau_ISM = "
          f"{comps['arms'].tau_ism}, tau_BC = {comps['arms'].tau_bc}")
    for name, maps in runs.items():
        bins = maps.bin_map
        true = np.array([np.nanmean(truth[bins == i]) for i in range(maps.n_bins)])
        diff = np.asarray(maps.table["cnn_logage_lw"].value) - true
        young = true < 9.4
        print(f"{name:30s}: {maps.n_bins} bins; median LW log-age offset "
              f"{np.nanmedian(diff[~young]):+.3f} dex in {np.count_nonzero(~young)} old bins, "
              f"{np.nanmedian(diff[young]):+.3f} dex in {np.count_nonzero(young)} young bins")


if __name__ == "__main__":
    main()
