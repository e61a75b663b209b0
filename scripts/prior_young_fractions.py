# Licensed under a 3-clause BSD style license - see LICENSE
"""
How much young and intermediate-age mass the training prior contains.

Draws the star formation histories of the broad simulator (the family plan of
``cubesfh make-training-set --prior broad``, the mixtures of up to three
components with their secondary mass fractions) without synthesising spectra,
and prints the distribution of the fraction of the formed mass younger than 1
and 5 Gyr, overall and per family, as an RST table for ``docs/synthesis.rst``.

With ``--training-set`` the histories are read from a training set
instead (its ``mass_formed`` per age bin; rows split by family and by the
extended histories of cubesfh 0.4, ``extended`` >= 0).

Usage::

    python scripts/prior_young_fractions.py --n 40000 --seed 1
    python scripts/prior_young_fractions.py --training-set ts_broad_s150.h5 --n 40000
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


def read(path, n):
    """Formed-mass fractions per age bin of the first ``n`` rows of a training set."""
    import h5py

    from cubesfh.conventions import AGE_BIN_EDGES

    with h5py.File(path, "r") as f:
        mass = f["mass_formed"][:n].astype(float)
        families = f["family"][:n]
        extended = f["extended"][:n] if "extended" in f else np.full(len(mass), -1.0)
    return (mass / mass.sum(axis=1, keepdims=True), families, extended,
            AGE_BIN_EDGES.to_value(u.yr))


def table(n, seed, training_set=None):
    if training_set is None:
        mass, families, edges = draw(n, seed)
        extended = np.full(n, -1.0)
    else:
        mass, families, extended, edges = read(training_set, n)
        n = len(mass)
    rows = []
    groups = [("all", np.ones(n, bool))]
    if (extended >= 0).any():
        groups.append(("extended (0.4)", extended >= 0))
        base = extended < 0
    else:
        base = np.ones(n, bool)
    groups += [("GP-SFH", base & (families == 0)), ("skew-normal", base & (families == 1)),
               ("skew-normal + burst", base & (families == 2))]
    for label, sel in groups:
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
    p.add_argument("--training-set", help="read the histories from this HDF5 training set")
    args = p.parse_args(argv)
    print(table(args.n, args.seed, args.training_set))


if __name__ == "__main__":
    main()
