# Licensed under a 3-clause BSD style license - see LICENSE
"""
Non-parametric star formation histories for the training set (Galceran et al. 2026, sec. 2.1).

All histories are returned as the *mass formed* in each age sub-interval of
the template library (:attr:`~cubesfh.templates.TemplateLibrary.age_edges`),
normalised to a total of 1. Because the templates are constant-SFR spectra of
those sub-intervals, the spectrum of a history is an exact linear combination
of templates.

Families
--------
GP-SFH
    Iyer et al. (2019): the cumulative mass fraction M(t)/M(T) in cosmic time is
    a Gaussian-process interpolation through (0, 0), (t_25, 1/4), (t_50, 1/2),
    (t_75, 3/4), (T, 1) and a point that fixes the present-day specific star
    formation rate, (T - dt, 1 - sSFR dt). The three times are drawn as
    cumulative sums of a Dirichlet(alpha = 1) vector times T; sSFR is uniform in
    1e-12 - 1e-9 / yr. T is the age of the Universe (13.8 Gyr), as in the
    original method; made monotonic after interpolation.
Skew-normal
    SFR(lookback time) proportional to a skew-normal density with location
    ("peak age") ~ N(12, 3) Gyr, scale ("width") ~ N(1, 0.4) Gyr and shape
    ("skewness") ~ U(-0.25, 0.75) (Table 1), on the full template age range
    (0 - 18.2 Gyr; ages beyond the age of the Universe stand for the oldest
    populations the models allow, as in the paper).
Skew-normal + burst
    As above plus a Gaussian burst at a look-back time log-uniform in
    10 - 500 Myr, width (sigma) U(40, 50) Myr and mass fraction U(1, 10) %.
"""

import numpy as np
from scipy import special

__all__ = [
    "AGE_OF_UNIVERSE_GYR",
    "SFHParameters",
    "draw_gp_parameters",
    "draw_skewnormal_parameters",
    "gp_cumulative",
    "gp_sfh",
    "skewnormal_sfh",
]

#: Age of the Universe at z = 0 (Gyr; Planck-like flat LCDM, H0 = 70, Om = 0.3 gives 13.5).
AGE_OF_UNIVERSE_GYR = 13.8

#: Family codes stored in the training set.
FAMILY_GP, FAMILY_SKEW, FAMILY_BURST = 0, 1, 2


class SFHParameters(dict):
    """Per-sample SFH parameters (a dict of arrays, all of length ``n``)."""


def draw_gp_parameters(rng, n, *, alpha=1.0, ssfr_range=(1e-12, 1e-9)):
    """
    Draw GP-SFH parameters.

    Parameters
    ----------
    rng : `numpy.random.Generator`
    n : int
    alpha : float, optional
        Dirichlet concentration (1 in the paper; Iyer et al. recommend 5).
    ssfr_range : tuple of float, optional
        Uniform range of the present-day sSFR (1/yr).

    Returns
    -------
    params : `SFHParameters`
        ``t25, t50, t75`` (cosmic times, Gyr, when 25/50/75 % of the mass had
        formed) and ``ssfr`` (1/yr).
    """
    d = rng.dirichlet(np.full(4, alpha), size=n)
    t = np.cumsum(d, axis=1)[:, :3] * AGE_OF_UNIVERSE_GYR
    ssfr = rng.uniform(*ssfr_range, size=n)
    return SFHParameters(t25=t[:, 0], t50=t[:, 1], t75=t[:, 2], ssfr=ssfr)


def _se_kernel(a, b, length):
    return np.exp(-0.5 * ((a[..., :, None] - b[..., None, :]) / length) ** 2)


def _gp_knots(params):
    """Knot times, values and the end slope of each history."""
    T = AGE_OF_UNIVERSE_GYR
    t25, t50, t75 = (np.asarray(params[k], float) for k in ("t25", "t50", "t75"))
    n = t25.size
    xk = np.stack([np.zeros(n), t25, t50, t75, np.full(n, T)], axis=1)
    yk = np.tile([0.0, 0.25, 0.5, 0.75, 1.0], (n, 1))
    slope = np.asarray(params["ssfr"], float) * 1e9  # d(M/M_T)/dt at T, per Gyr
    return xk, yk, slope


def _gp_mean(times, xk, yk, slope, length, jitter):
    """
    GP posterior mean at ``times`` (``(m,)`` shared or ``(n, m)`` per history).

    Conditioned on the values ``yk`` at ``xk`` and on the derivative ``slope``
    at the last knot; squared-exponential kernel, prior mean t / T.
    """
    T = AGE_OF_UNIVERSE_GYR
    n, m = xk.shape
    ell = np.broadcast_to(np.asarray(length, float), (n,))[:, None, None]
    d = xk[:, :, None] - xk[:, None, :]
    kvv = np.exp(-0.5 * (d / ell) ** 2)
    # covariances with the derivative at x_T = xk[:, -1]
    dT = xk - xk[:, -1:]  # x_i - x_T
    kvd = np.exp(-0.5 * (dT / ell[:, :, 0]) ** 2) * dT / ell[:, :, 0] ** 2  # cov(f(x_i), f'(x_T))
    kdd = 1.0 / ell[:, 0, 0] ** 2
    kfull = np.zeros((n, m + 1, m + 1))
    kfull[:, :m, :m] = kvv
    kfull[:, :m, m] = kvd
    kfull[:, m, :m] = kvd
    kfull[:, m, m] = kdd
    kfull += jitter * np.eye(m + 1)
    resid = np.concatenate([yk - xk / T, (slope - 1.0 / T)[:, None]], axis=1)
    alpha = np.linalg.solve(kfull, resid[..., None])[..., 0]
    ts = np.broadcast_to(times, (n, np.shape(times)[-1]))
    ds = ts[:, :, None] - xk[:, None, :]
    ksv = np.exp(-0.5 * (ds / ell) ** 2)
    dsT = ts - xk[:, -1:]
    ksd = np.exp(-0.5 * (dsT / ell[:, :, 0]) ** 2) * dsT / ell[:, :, 0] ** 2
    return ts / T + np.einsum("nij,nj->ni", ksv, alpha[:, :m]) + ksd * alpha[:, m:]


def gp_cumulative(times, params, *, jitter=1e-7):
    """
    Cumulative mass fraction of GP-SFHs at cosmic ``times``.

    The posterior mean of a Gaussian process (squared-exponential kernel with
    a length scale equal to the median spacing of the knots, at least 0.3 Gyr;
    linear prior mean M/M_T = t/T) conditioned on the values at
    (0, t_25, t_50, t_75, T) and on the present-day slope sSFR at T. A GP
    mean can dip or overshoot between knots; as in Iyer et al. (2019), the
    star formation rate is then set to zero where it would be negative (a
    running maximum of the cumulative curve), and each segment between two
    knots is rescaled linearly in mass so that the curve passes through its
    knots exactly. The result is non-decreasing, 0 at t = 0 and 1 at T.

    Parameters
    ----------
    times : `~numpy.ndarray`
        Cosmic times (Gyr), increasing, within [0, T].
    params : `SFHParameters`
        From `draw_gp_parameters`.
    jitter : float, optional
        Diagonal regularisation of the knot covariance.

    Returns
    -------
    cum : `~numpy.ndarray`
        Shape ``(n, times.size)``.
    """
    xk, yk, slope = _gp_knots(params)
    n, nk = xk.shape
    times = np.asarray(times, float)
    m = times.size
    length = np.maximum(np.median(np.diff(xk, axis=1), axis=1), 0.3)
    allt = np.concatenate([np.broadcast_to(times, (n, m)), xk], axis=1)
    order = np.argsort(allt, axis=1, kind="stable")
    ts = np.take_along_axis(allt, order, axis=1)
    c = _gp_mean(ts, xk, yk, slope, length, jitter)
    c = np.maximum.accumulate(c, axis=1)
    out = np.empty_like(c)
    np.put_along_axis(out, order, c, axis=1)
    ct, ck = out[:, :m], out[:, m:]
    # segment of each time: j such that xk[j] <= t < xk[j+1]
    seg = np.clip((times[None, :, None] >= xk[:, None, 1:]).sum(axis=2), 0, nk - 2)
    lo_c = np.take_along_axis(ck, seg, axis=1)
    hi_c = np.take_along_axis(ck, seg + 1, axis=1)
    lo_y = np.take_along_axis(yk, seg, axis=1)
    hi_y = np.take_along_axis(yk, seg + 1, axis=1)
    lo_x = np.take_along_axis(xk, seg, axis=1)
    hi_x = np.take_along_axis(xk, seg + 1, axis=1)
    span = hi_c - lo_c
    frac_gp = np.divide(ct - lo_c, span, out=np.zeros_like(ct), where=span > 1e-12)
    frac_lin = np.divide(times[None, :] - lo_x, hi_x - lo_x, out=np.ones_like(ct),
                         where=(hi_x - lo_x) > 0)
    frac = np.where(span > 1e-12, frac_gp, frac_lin)
    return np.clip(lo_y + np.clip(frac, 0.0, 1.0) * (hi_y - lo_y), 0.0, 1.0)


def gp_sfh(params, age_edges_yr):
    """
    Mass formed in each age sub-interval by GP-SFHs (total 1).

    Parameters
    ----------
    params : `SFHParameters`
        From `draw_gp_parameters`.
    age_edges_yr : `~numpy.ndarray`
        Sub-interval edges in look-back time (yr), increasing from 0.

    Returns
    -------
    mass : `~numpy.ndarray`
        Shape ``(n, n_age)``.
    """
    T = AGE_OF_UNIVERSE_GYR
    lookback = np.asarray(age_edges_yr, float) / 1e9
    cosmic = np.clip(T - lookback, 0.0, T)[::-1]  # increasing cosmic time
    cum = gp_cumulative(cosmic, params)[:, ::-1]  # back to look-back order
    mass = cum[:, :-1] - cum[:, 1:]
    mass = np.clip(mass, 0.0, None)
    return mass / mass.sum(axis=1, keepdims=True)


def draw_skewnormal_parameters(rng, n, *, burst_fraction=None, with_burst=None):
    """
    Draw skew-normal (and burst) SFH parameters from Table 1 of the paper.

    Parameters
    ----------
    rng : `numpy.random.Generator`
    n : int
    burst_fraction : float, optional
        Probability that a history has a burst (0.4 in the paper). Ignored
        when ``with_burst`` is given.
    with_burst : bool or array of bool, optional
        Force the presence of a burst.

    Returns
    -------
    params : `SFHParameters`
        ``peak`` (Gyr), ``width`` (Gyr), ``skewness``, ``has_burst``,
        ``burst_age`` (Gyr), ``burst_width`` (Gyr), ``burst_fraction``.
    """
    peak = rng.normal(12.0, 3.0, size=n)
    width = np.abs(rng.normal(1.0, 0.4, size=n))
    width = np.maximum(width, 0.05)  # a non-positive width has no meaning
    skew = rng.uniform(-0.25, 0.75, size=n)
    if with_burst is None:
        p = 0.4 if burst_fraction is None else burst_fraction
        has = rng.uniform(size=n) < p
    else:
        has = np.broadcast_to(np.asarray(with_burst, bool), (n,)).copy()
    b_age = 10 ** rng.uniform(np.log10(0.010), np.log10(0.500), size=n)
    b_width = rng.uniform(0.040, 0.050, size=n)
    b_frac = rng.uniform(0.01, 0.10, size=n)
    b_age[~has] = np.nan
    b_width[~has] = np.nan
    b_frac[~has] = 0.0
    return SFHParameters(peak=peak, width=width, skewness=skew, has_burst=has,
                         burst_age=b_age, burst_width=b_width, burst_fraction=b_frac)


def _skewnorm_cdf(x, a):
    """Skew-normal CDF, Phi(x) - 2 T(x, a) (Owen's T; vectorised, unlike scipy.stats)."""
    x, a = np.broadcast_arrays(np.asarray(x, float), np.asarray(a, float))
    return np.clip(special.ndtr(x) - 2.0 * special.owens_t(x, a), 0.0, 1.0)


def skewnormal_sfh(params, age_edges_yr):
    """
    Mass formed in each age sub-interval by skew-normal (+ burst) SFHs (total 1).

    Parameters
    ----------
    params : `SFHParameters`
        From `draw_skewnormal_parameters`.
    age_edges_yr : `~numpy.ndarray`
        Sub-interval edges in look-back time (yr).

    Returns
    -------
    mass : `~numpy.ndarray`
        Shape ``(n, n_age)``.
    """
    e = np.asarray(age_edges_yr, float)[None, :] / 1e9
    peak = np.asarray(params["peak"], float)[:, None]
    width = np.asarray(params["width"], float)[:, None]
    skew = np.asarray(params["skewness"], float)[:, None]
    cdf = _skewnorm_cdf((e - peak) / width, skew)
    main = np.clip(np.diff(cdf, axis=1), 0.0, None)
    tot = main.sum(axis=1, keepdims=True)
    # a peak far outside the template range leaves (almost) nothing inside: put
    # the mass in the closest sub-interval instead of dividing by zero
    empty = tot[:, 0] <= 1e-12
    if np.any(empty):
        idx = np.where(peak[empty, 0] > e[0, -1], main.shape[1] - 1, 0)
        main[empty] = 0.0
        main[empty, idx] = 1.0
        tot = main.sum(axis=1, keepdims=True)
    main /= tot
    frac = np.asarray(params["burst_fraction"], float)[:, None]
    has = np.asarray(params["has_burst"], bool)
    if np.any(has):
        b_age = np.nan_to_num(np.asarray(params["burst_age"], float))[:, None]
        bw = np.nan_to_num(np.asarray(params["burst_width"], float), nan=1.0)[:, None]
        bcdf = special.ndtr((e - b_age) / bw)
        burst = np.clip(np.diff(bcdf, axis=1), 0.0, None)
        burst /= np.maximum(burst.sum(axis=1, keepdims=True), 1e-300)
        main = np.where(has[:, None], (1 - frac) * main + frac * burst, main)
    return main
