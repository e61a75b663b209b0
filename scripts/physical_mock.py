#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
The physical maps against the project's mock (the numbers of ``docs/physical.rst``).

Usage::

    python scripts/physical_mock.py [--shape 24 24] [--seed 1]

Runs the pipeline (five bands, true kinematics, the mock's distance) and
compares per bin with the truth: log Sigma_star (stars + remnants), its
68 % interval, per region (the component with most of the bin's mass) after
removing the median, the stellar A_V, and Sigma_SFR summed over time against
the formed mass. The mock of ``tests/test_physical_maps.py``. About 30 s.
"""

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None):
    from helpers import true_kinematics_file
    from test_physical_maps import COMPONENTS, _truth

    from cubesfh import Cube, HSTImage
    from cubesfh.conventions import AGE_BIN_EDGES
    from cubesfh.pipeline import run_pipeline
    from cubesfh.synthesis import mock_observation

    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--shape", type=int, nargs=2, default=(24, 24))
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    d = Path(tempfile.mkdtemp())
    obs = mock_observation(d, shape=tuple(a.shape), seed=a.seed, progress_bar=False)
    kin = true_kinematics_file(obs.truth_path, d / "kin.fits")
    distance = fits.getval(obs.truth_path, "DISTANCE") * u.Mpc
    hst = {b: HSTImage.read(path) for b, path in obs.hst_paths.items()}
    maps = run_pipeline(Cube.read(obs.cube_path), hst, target_snr=35, kinematics=kin,
                        distance=distance, progress_bar=False)
    t = maps.table
    log_sd, log_formed, av_true, region = _truth(maps, obs, distance)
    d_sd = t["cnn_logmstar_sd"].value - log_sd
    med = np.nanmedian(d_sd)
    nmad = 1.4826 * np.nanmedian(np.abs(d_sd - med))
    inside = np.mean((t["cnn_logmstar_sd_p16"].value <= log_sd)
                     & (log_sd <= t["cnn_logmstar_sd_p84"].value))
    print(f"{maps.n_bins} bins; log Sigma_star: median |d| {np.nanmedian(np.abs(d_sd)):.3f} "
          f"dex, median {med:+.3f}, NMAD {nmad:.3f}, inside the 68 % interval {inside:.2f}")
    for r in np.unique(region):
        sel = region == r
        print(f"  {COMPONENTS[r]} ({sel.sum()} bins): median d - median "
              f"{np.nanmedian(d_sd[sel]) - med:+.3f} dex, d A_V "
              f"{np.nanmedian(t['cnn_av_stars'].value[sel] - av_true[sel]):+.3f} mag")
    d_av = t["cnn_av_stars"].value - av_true
    print(f"A_V: median |d| {np.nanmedian(np.abs(d_av)):.3f} mag, median {np.nanmedian(d_av):+.3f}")
    dur = np.diff(AGE_BIN_EDGES.to_value(u.yr))
    formed = np.log10((t["cnn_sfr_sd"].to_value(u.solMass / u.yr / u.pc**2) * dur).sum(axis=1))
    print(f"Sigma_SFR x duration against the formed mass: median |d| "
          f"{np.nanmedian(np.abs(formed - log_formed)):.3f} dex")


if __name__ == "__main__":
    main()
