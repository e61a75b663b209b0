# Licensed under a 3-clause BSD style license - see LICENSE
"""
How much the synthetic HST colours of the training libraries differ at matched
populations: the size of a per-band photometric systematic.

For each training library (BC03, M11, MaStar; the young sub-intervals of M11
and MaStar from BC03 as in training) the 16 age-bin templates of the
`~cubesfh.baseline.BaselineTemplates` (constant star formation across each
bin) give the mean f_lambda in each HST band divided by the mean of the
spectrum in 5300-5500 A, i.e. what the network sees as photometry. At the
[Z/H] values common to all libraries (interpolated linearly in [Z/H]) the
scatter across libraries of 2.5 log10 of that ratio is the colour systematic
of each band; the script prints its median over the age bins younger than
1 Gyr, 1-5 Gyr and older than 5 Gyr as an RST table.

Usage::

    python scripts/library_colour_scatter.py
"""

import numpy as np
from astropy import units as u

from cubesfh.baseline import BaselineTemplates
from cubesfh.conventions import AGE_BIN_CENTERS
from cubesfh.synthesis import ForwardModel
from cubesfh.synthesis.trainingset import training_library
from cubesfh.templates import TRAINING_LIBRARIES


def colours():
    out = {}
    for name in TRAINING_LIBRARIES:
        t = BaselineTemplates(ForwardModel(training_library(name)))
        out[name] = (np.asarray(t.zh, float), 2.5 * np.log10(t.photometry), t.bands)
    return out


def scatter_table():
    per = colours()
    bands = next(iter(per.values()))[2]
    lo = max(z.min() for z, _, _ in per.values())
    hi = min(z.max() for z, _, _ in per.values())
    grid = np.linspace(lo, hi, 5)
    stack = []
    for zh, mag, _ in per.values():  # mag: (n_bands, 16, nz)
        order = np.argsort(zh)
        stack.append(np.stack([[np.interp(grid, zh[order], mag[b, a, order])
                                for a in range(mag.shape[1])] for b in range(mag.shape[0])]))
    stack = np.array(stack)  # (n_lib, n_bands, 16, n_grid)
    spread = stack.std(axis=0, ddof=1)  # (n_bands, 16, n_grid)
    age = AGE_BIN_CENTERS.to_value(u.Gyr)
    groups = (("< 1 Gyr", age < 1), ("1-5 Gyr", (age >= 1) & (age < 5)), ("> 5 Gyr", age >= 5))
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - band"]
    lines += [f"     - {label}" for label, _ in groups]
    for b, band in enumerate(bands):
        lines.append(f"   * - {band}")
        lines += [f"     - {np.median(spread[b, sel]):.3f}" for _, sel in groups]
    note = (f"\nScatter (mag) across {', '.join(per)} of the band flux relative to the "
            f"5300-5500 A mean, at [Z/H] = {', '.join(f'{g:+.2f}' for g in grid)}.\n")
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    print(scatter_table())
