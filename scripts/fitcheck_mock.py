#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE
"""
The fit check on the project's mock (the numbers of ``docs/fitcheck.rst``).

Usage::

    python scripts/fitcheck_mock.py [--shape 16 16] [--seed 2]

Runs the pipeline with pPXF (serial) on the mock with its true kinematics and
prints the median chi^2 of the CNN re-synthesis and of pPXF on the same pixels,
the share of bins flagged POOR_FIT and PHOT_TENSION; then with F336W x 2.5 in
half of the field, F275W in counts read as counts/s, and F438W shifted by 1
arcsec (registration off, then on), the share of bins flagged PHOT_TENSION.
The same cases as ``tests/test_fitcheck.py``. About 3 minutes.
"""

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None):
    import test_fitcheck as T
    from helpers import true_kinematics_file

    from cubesfh.flags import BinFlag
    from cubesfh.synthesis import mock_observation

    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--shape", type=int, nargs=2, default=(16, 16))
    p.add_argument("--seed", type=int, default=2)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    d = Path(tempfile.mkdtemp())
    obs = mock_observation(d, shape=tuple(a.shape), seed=a.seed, progress_bar=False)
    kin = true_kinematics_file(obs.truth_path, d / "kin.fits")
    ref = T._run(obs, kin, ppxf=True, scheduler="serial")
    t = ref.table
    cnn, ppxf = np.asarray(t["cnn_fit_chi2"]), np.asarray(t["ppxf_fit_chi2"])
    f = np.asarray(t["flag"])
    print(f"{ref.n_bins} bins: median chi2 CNN {np.nanmedian(cnn):.3f}, pPXF "
          f"{np.nanmedian(ppxf):.3f}, median ratio {np.nanmedian(cnn / ppxf):.3f}; POOR_FIT "
          f"{np.mean(f & BinFlag.POOR_FIT > 0):.3f}, PHOT_TENSION "
          f"{np.mean(f & BinFlag.PHOT_TENSION > 0):.3f}")
    base = dict(obs.hst_paths)

    def hits(paths, **kw):
        m = T._run(obs, kin, hst_paths=paths, **kw)
        return m, (np.asarray(m.table["flag"]) & BinFlag.PHOT_TENSION) > 0

    paths = dict(base, F336W=T._scaled_image(base["F336W"], d / "a.fits", 2.5, half=True))
    m, h = hits(paths, register=False)
    r = np.asarray(m.table["phot_F336W"]) / np.asarray(t["phot_F336W"])
    named = np.mean(np.asarray(m.table["tension_band"])[h & (r > 2)] == "F336W")
    print(f"F336W x 2.5 in half the field: {(r > 2).sum()} bins doubled, flagged "
          f"{h[r > 2].mean():.2f}; {(r < 1.15).sum()} untouched, flagged "
          f"{h[r < 1.15].mean():.2f}; F336W named in {named:.2f}")
    exptime = fits.getval(base["F275W"], "EXPTIME")
    paths = dict(base, F275W=T._scaled_image(base["F275W"], d / "b.fits", exptime))
    print(f"F275W in counts: flagged {hits(paths, register=False)[1].mean():.2f}")
    paths = dict(base, F438W=T._scaled_image(base["F438W"], d / "c.fits", 1.0,
                                             shift_arcsec=1.0))
    print(f"F438W shifted 1 arcsec: flagged {hits(paths, register=False)[1].mean():.2f} "
          f"(registration off), {hits(paths, register=True)[1].mean():.2f} (on)")


if __name__ == "__main__":
    main()
