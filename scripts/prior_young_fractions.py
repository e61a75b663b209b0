# Licensed under a 3-clause BSD style license - see LICENSE
"""
How much young and intermediate-age mass the training prior contains.

Draws the star formation histories of the broad simulator (the family plan of
``cubesfh make-training-set --prior broad``, the mixtures of up to three
components with their secondary mass fractions) without synthesising spectra,
and prints the distribution of the fraction of the formed mass younger than 1
and 5 Gyr, overall and per family, as an RST table for ``docs/synthesis.rst``.

Usage::

    python scripts/prior_young_fractions.py --n 40000 --seed 1
"""

import argparse

import numpy as np
from astropy import units as u

from cubesfh.synthesis.trainingset import (
    DEFAULT_MIX,
    N_COMPONENT_PROBABILITIES,
    SECONDARY_MASS_RANGE,
    _draw_mass,
    _family_plan,
)
from cubesfh.templates import TemplateLibrary


def draw(n, seed):
    """Formed-mass fractions per sub-interval (n, n_sub), the families and the edges (yr)."""
    edges = TemplateLibrary.load().age_edges.to_value(u.yr)
    rng = np.random.default_rng(seed)
    families = _family_plan(n, DEFAULT_MIX, seed)
    n_comp = np.minimum(1 + np.searchsorted(np.cumsum(N_COMPONENT_PROBABILITIES),
                                            rng.uniform(size=n), side="right"), 3)
    mix = np.asarray(DEFAULT_MIX, float) / sum(DEFAULT_MIX)
    mass = np.zeros((n, edges.size - 1))
    for c in range(3):
        fam = families if c == 0 else rng.choice(3, size=n, p=mix)
        weight = np.ones(n) if c == 0 else 10 ** rng.uniform(*SECONDARY_MASS_RANGE, n)
        mass += _draw_mass(rng, fam, edges) * np.where(n_comp > c, weight, 0.0)[:, None]
    return mass / mass.sum(axis=1, keepdims=True), families, edges


def younger_than(mass, edges, age_yr):
    """Fraction of the formed mass younger than ``age_yr`` (sub-intervals split linearly)."""
    part = np.clip((age_yr - edges[:-1]) / (edges[1:] - edges[:-1]), 0.0, 1.0)
    return mass @ part


def table(n, seed):
    mass, families, edges = draw(n, seed)
    rows = []
    for label, sel in (("all", np.ones(n, bool)), ("GP-SFH", families == 0),
                       ("skew-normal", families == 1), ("skew-normal + burst", families == 2)):
        for age in (1e9, 5e9):
            y = younger_than(mass[sel], edges, age)
            p16, p50, p84 = np.percentile(y, [16, 50, 84])
            rows.append((label, f"< {age / 1e9:g} Gyr", f"{p50:.2f} ({p16:.2f}-{p84:.2f})",
                         f"{np.mean(y < 0.1):.0%}", f"{np.mean((y >= 0.1) & (y <= 0.6)):.0%}",
                         f"{np.mean(y > 0.6):.0%}"))
    lines = [".. list-table::", "   :header-rows: 1", "",
             "   * - histories", "     - formed mass", "     - median (16-84 %)",
             "     - share < 0.1", "     - share 0.1-0.6", "     - share > 0.6"]
    for row in rows:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    print(table(args.n, args.seed))


if __name__ == "__main__":
    main()
