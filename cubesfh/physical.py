# Licensed under a 3-clause BSD style license - see LICENSE
"""
Star formation histories in physical units: stellar-mass and SFR surface densities.

The network gives living-mass fractions and [Z/H] per age bin; with the
templates these fix the mass-to-light ratio of the population, and with the
bin's dust-corrected surface brightness they give:

* ``LOGMSTAR_SD``: log10 of the present-day stellar-mass surface density
  (living stars + remnants; Msun / pc2), with its 68 % interval;
* ``SFR_SD``: the mean star formation rate surface density in each of the 16
  age bins (formed mass, i.e. before stellar mass loss; Msun / yr / kpc2) and
  ``LOGSFR_SD_100MYR``, its mean over the last 100 Myr;
* ``AV_STARS``: the effective V-band attenuation of the stellar light, from
  the attenuation head of the network (`~cubesfh.network.fit_physical_head`);
* ``ML_V``: the dust-free mass-to-light ratio in the V window.

The masses are for the IMF of the templates, Chabrier (2003); `IMF_FACTORS`
converts them. See :doc:`/physical` for the definitions, the
calibration and the measured accuracy.
"""

import logging
import warnings

import numpy as np
from astropy import constants as const
from astropy import units as u

from .conventions import AGE_BIN_EDGES, N_AGE_BINS
from .utils import CubeSFHError, CubeSFHWarning

__all__ = [
    "DISTANCE_KEYWORDS",
    "HUBBLE_CONSTANT",
    "IMF_FACTORS",
    "L_V_SUN",
    "PECULIAR_VELOCITY_ALLOWANCE",
    "V_WINDOW",
    "check_distance",
    "check_imf",
    "check_inclination",
    "distance_from_header",
    "mass_to_light",
    "physical_columns",
    "v_window_flux",
]

log = logging.getLogger(__name__)

#: Rest-frame window of the V-band light (A): the light-weighted means, the
#: mass-to-light ratio and the attenuation all refer to it.
V_WINDOW = (5450.0, 5550.0) * u.AA

#: Mean L_lambda of the Sun in the V band: M_V = 4.81 (Willmer 2018, ApJS
#: 236, 47) and the Vega zero point f_lambda(V) = 3.63e-9 erg/s/cm2/A
#: (Bessell, Castelli & Plez 1998): 4 pi (10 pc)^2 3.63e-9 10^(-0.4 * 4.81).
L_V_SUN = (4 * np.pi * (10 * u.pc) ** 2 * 3.63e-9 * u.erg / u.s / u.cm**2 / u.AA
           * 10 ** (-0.4 * 4.81)).to(u.solLum / u.AA)

#: Mass and SFR multipliers from the templates' Chabrier (2003) IMF to
#: another IMF, after Madau & Dickinson (2014, ARA&A 52, 415, sec. 3.1):
#: Salpeter (0.1-100 Msun) masses are 1/0.61 and SFRs 1/0.63 of Chabrier's;
#: Kroupa (2001) masses 0.66/0.61 and SFRs 0.67/0.63.
IMF_FACTORS = {
    "chabrier": {"mass": 1.0, "sfr": 1.0},
    "salpeter": {"mass": 1 / 0.61, "sfr": 1 / 0.63},
    "kroupa": {"mass": 0.66 / 0.61, "sfr": 0.67 / 0.63},
}

#: Hubble constant used only to check a distance against the redshift.
HUBBLE_CONSTANT = 70.0 * u.km / u.s / u.Mpc

#: Largest difference between c z and H0 D accepted without a warning:
#: peculiar velocities reach ~1500 km/s in the Virgo cluster and its infall
#: region (many PHANGS galaxies), plus 20 % of H0 D for the Hubble constant
#: and distance errors.
PECULIAR_VELOCITY_ALLOWANCE = 1500.0 * u.km / u.s

#: Header keywords searched for a distance (value in Mpc unless the comment
#: or ``DISTUNIT`` says kpc or pc).
DISTANCE_KEYWORDS = ("DISTANCE", "DIST_MPC", "DIST")

_DISTANCE_UNITS = {"mpc": u.Mpc, "kpc": u.kpc, "pc": u.pc}


def check_distance(distance, *, redshift=None):
    """
    A distance as a `~astropy.units.Quantity` in Mpc, checked.

    Parameters
    ----------
    distance : `~astropy.units.Quantity` or float
        Plain numbers are Mpc (as ``cubesfh run --distance``).
    redshift : float, optional
        Systemic redshift of the galaxy: a distance whose Hubble velocity
        differs from c z by more than `PECULIAR_VELOCITY_ALLOWANCE` + 20 %
        gives a `~cubesfh.utils.CubeSFHWarning` naming both.

    Returns
    -------
    distance : `~astropy.units.Quantity`

    Raises
    ------
    CubeSFHError
        A distance that is not a positive, finite length.
    """
    try:
        d = u.Quantity(distance, u.Mpc)
    except (u.UnitsError, TypeError, ValueError) as exc:
        msg = (f"distance={distance!r} is not a length; give it in Mpc (--distance 11.3) or "
               "as a Quantity (11.3 * u.Mpc).")
        raise CubeSFHError(msg) from exc
    if d.ndim or not np.isfinite(d.value) or d.value <= 0:
        msg = f"distance={distance!r}: it must be one positive, finite length (e.g. 11.3 Mpc)."
        raise CubeSFHError(msg)
    if redshift is not None and np.isfinite(redshift):
        cz = (const.c * float(redshift)).to(u.km / u.s)
        hubble = (HUBBLE_CONSTANT * d).to(u.km / u.s)
        allowance = PECULIAR_VELOCITY_ALLOWANCE + 0.2 * hubble
        if abs(cz - hubble) > allowance:
            warnings.warn(
                f"the distance {d:.3g} (Hubble velocity {hubble:.0f} for H0 = "
                f"{HUBBLE_CONSTANT.value:g} km/s/Mpc) disagrees with the measured redshift "
                f"z = {float(redshift):.5f} (cz = {cz:.0f}) by more than peculiar motions "
                f"allow ({allowance:.0f}); check the distance and its unit (Mpc).",
                CubeSFHWarning, stacklevel=2)
    return d.to(u.Mpc)


def check_imf(imf):
    """The name of an IMF of `IMF_FACTORS`, lower case, or a `CubeSFHError`."""
    name = str(imf).lower()
    if name not in IMF_FACTORS:
        msg = f"imf={imf!r}: choose one of {sorted(IMF_FACTORS)}."
        raise CubeSFHError(msg)
    return name


def check_inclination(inclination):
    """
    A disc inclination as an angle `~astropy.units.Quantity`, checked (0 = face-on).

    Plain numbers are degrees; anything but one angle in 0-90 deg is a
    `CubeSFHError`.
    """
    try:
        inc = u.Quantity(inclination, u.deg)
    except (u.UnitsError, TypeError, ValueError):
        inc = None
    if inc is None or not (inc.ndim == 0 and 0 <= inc.value < 90):
        msg = f"inclination={inclination}: it must be one angle in 0-90 deg (0 = face-on)."
        raise CubeSFHError(msg)
    return inc


def distance_from_header(header):
    """
    The distance recorded in a FITS header, or `None`.

    Looks for `DISTANCE_KEYWORDS`; the unit is Mpc unless ``DISTUNIT`` or the
    card's comment names kpc or pc.

    Parameters
    ----------
    header : `~astropy.io.fits.Header` or None

    Returns
    -------
    distance : `~astropy.units.Quantity` or None
    """
    if header is None:
        return None
    for key in DISTANCE_KEYWORDS:
        if key not in header:
            continue
        try:
            value = float(header[key])
        except (TypeError, ValueError):
            continue
        text = f"{header.get('DISTUNIT', '')} {header.comments[key]}".lower()
        unit = u.Mpc
        for name in ("mpc", "kpc", "pc"):  # 'mpc' before 'pc', which it contains
            if name in text.replace("[", " ").replace("]", " ").split():
                unit = _DISTANCE_UNITS[name]
                break
        return (value * unit).to(u.Mpc)
    return None


def mass_to_light(mass_fraction, zh, *, library=None):
    """
    Mass-to-light ratios and formed masses implied by an SFH and Z(t).

    Each age bin is a constant star formation rate over the bin at the
    bin's [Z/H] (interpolated between the template metallicities), as in
    the network's labels.

    Parameters
    ----------
    mass_fraction : array-like
        ``(n, 16)`` living-mass fractions per age bin (the network's SFH).
    zh : array-like
        ``(n, 16)`` [Z/H] per age bin.
    library : `~cubesfh.templates.TemplateLibrary`, optional
        Default: the shipped BC03 library (that of the network and pPXF).

    Returns
    -------
    result : dict of `~numpy.ndarray`
        ``ml_v`` (n,): dust-free M / L_V in solar units, M = living stars +
        remnants, L_V the mean L_lambda in `V_WINDOW` in units of `L_V_SUN`;
        ``ml_v_living`` (n,): the same for living stars only;
        ``formed_per_living`` (n, 16): mass formed in each bin per unit
        living mass of the population (its SFH in formed mass);
        ``present_per_living`` (n,): (living + remnants) / living.
    """
    from .templates import TemplateLibrary

    lib = TemplateLibrary.load() if library is None else library
    f = np.atleast_2d(np.asarray(mass_fraction, float))
    zh = np.atleast_2d(np.asarray(zh, float))
    if f.shape != zh.shape or f.shape[-1] != N_AGE_BINS:
        msg = (f"mass_fraction {f.shape} and zh {zh.shape} must both be (n, {N_AGE_BINS}).")
        raise CubeSFHError(msg)
    tables = {"live": lib.binned_living_fraction(), "rem": lib.binned_remnant_fraction(),
              "light": lib.binned_v_light()}  # (nz, 16) per solar mass formed
    zh = np.where(np.isfinite(zh), zh, 0.0)
    per = {k: lib.binned_at(v, zh) for k, v in tables.items()}
    f = np.clip(f, 0.0, None)
    formed = f / per["live"]  # formed mass per bin per unit living mass
    living = f.sum(axis=1)
    present = (formed * (per["live"] + per["rem"])).sum(axis=1)
    light = (formed * per["light"]).sum(axis=1) / L_V_SUN.to_value(u.solLum / u.AA)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(living > 0, living, np.nan)
        return {"ml_v": present / light, "ml_v_living": living / light,
                "formed_per_living": formed / norm[:, None],
                "present_per_living": present / norm}


def v_window_flux(spectra, wavelength=None):
    """Mean of prepared spectra in `V_WINDOW` (NaN pixels ignored), ``(n,)``."""
    from .conventions import OUTPUT_WAVELENGTH

    w = (OUTPUT_WAVELENGTH if wavelength is None else wavelength).to_value(u.AA)
    sel = (w >= V_WINDOW[0].value) & (w <= V_WINDOW[1].value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.atleast_2d(spectra)[:, sel], axis=1)


def _values(column):
    """Plain float values of a table column (Quantity, logarithmic or plain)."""
    return np.asarray(getattr(column, "value", column), float)


def _age_overlap(limit):
    """Fraction of each age bin younger than ``limit`` (yr), ``(16,)``."""
    e = AGE_BIN_EDGES.to_value(u.yr)
    return np.clip((limit - e[:-1]) / (e[1:] - e[:-1]), 0.0, 1.0)


def physical_columns(table, *, spaxel_area, distance, redshift=0.0, inclination=None,
                     imf="chabrier", library=None):
    """
    Per-bin physical quantities from the CNN columns of a product table.

    Parameters
    ----------
    table : `~astropy.table.QTable`
        The ``BINS`` table of `~cubesfh.maps.StellarPopulationMaps` with
        ``cnn_mass_fraction``, ``cnn_zh``, ``norm`` (rest-frame flux density
        per spaxel in the normalisation window, an absolute flux unit),
        ``v_flux`` (the prepared spectrum's mean in `V_WINDOW`, in units of
        ``norm``), ``n_spaxels``, and the attenuation head's ``cnn_av_stars``
        and ``cnn_logmstar_sd_err`` (calibrated half-width of the 68 %
        interval of log Sigma_star, dex).
    spaxel_area : `~astropy.units.Quantity`
        Solid angle of one spaxel.
    distance : `~astropy.units.Quantity`
        Distance of the galaxy (for the masses of the bins; the surface
        densities do not depend on it).
    redshift : float, optional
        Systemic redshift, for the (1 + z)^4 surface-brightness dimming.
    inclination : `~astropy.units.Quantity`, optional
        Disc inclination: adds the deprojected ``cnn_logmstar_sd_deproj``
        (times cos i).
    imf : {'chabrier', 'salpeter', 'kroupa'}, optional
        IMF of the masses and SFRs (`IMF_FACTORS`).
    library : `~cubesfh.templates.TemplateLibrary`, optional

    Returns
    -------
    columns : dict of `~astropy.units.Quantity`
        ``cnn_ml_v``, ``cnn_ml_v_living``, ``cnn_logmstar_sd`` (+ ``_p16``,
        ``_p84``, ``_living``), ``cnn_logmstar`` (log mass of the bin),
        ``cnn_sfr_sd`` (n, 16) (+ ``_p16``, ``_p84``),
        ``cnn_logsfr_sd_100myr`` (+ ``_p16``, ``_p84``), and with an
        inclination ``cnn_logmstar_sd_deproj``.
    """
    fac = IMF_FACTORS[check_imf(imf)]
    distance = check_distance(distance)
    n = len(table)
    norm = u.Quantity(table["norm"])
    try:
        norm = norm.to(u.erg / u.s / u.cm**2 / u.AA)
    except u.UnitsError as exc:
        msg = (f"the spectra are in {norm.unit!s}, not an absolute flux density; the "
               "physical maps need a flux-calibrated cube (BUNIT in erg/s/cm2/A).")
        raise CubeSFHError(msg) from exc
    area = u.Quantity(spaxel_area, u.sr)
    # rest-frame V-band surface brightness -> luminosity per pc2 (4 pi I (1 + z)^4)
    flux_v = norm * np.asarray(table["v_flux"], float)
    sb = 4 * np.pi * u.sr * flux_v / area * (1 + float(redshift)) ** 4
    lum_sd = (sb / L_V_SUN).to_value(u.pc**-2)  # L_V,sun per pc2 (observed, attenuated)
    ml = mass_to_light(np.asarray(table["cnn_mass_fraction"], float),
                       _values(table["cnn_zh"]), library=library)
    av = _values(table["cnn_av_stars"])
    with np.errstate(divide="ignore", invalid="ignore"):
        lum_int = lum_sd * 10 ** (0.4 * av)
        log_sd = np.log10(ml["ml_v"] * lum_int * fac["mass"])
        log_sd_liv = np.log10(ml["ml_v_living"] * lum_int * fac["mass"])
    sig = _values(table["cnn_logmstar_sd_err"])
    out = {}
    dex_sd = u.dex(u.solMass / u.pc**2)
    out["cnn_ml_v"] = ml["ml_v"] * fac["mass"] * u.solMass / u.solLum
    out["cnn_ml_v_living"] = ml["ml_v_living"] * fac["mass"] * u.solMass / u.solLum
    out["cnn_logmstar_sd"] = log_sd * dex_sd
    out["cnn_logmstar_sd_p16"] = (log_sd - sig) * dex_sd
    out["cnn_logmstar_sd_p84"] = (log_sd + sig) * dex_sd
    out["cnn_logmstar_sd_living"] = log_sd_liv * dex_sd
    pc2 = (area.to_value(u.rad**2) * distance.to_value(u.pc) ** 2
           * np.asarray(table["n_spaxels"], float))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["cnn_logmstar"] = (log_sd + np.log10(pc2)) * u.dex(u.solMass)
    if inclination is not None:
        inc = check_inclination(inclination)
        out["cnn_logmstar_sd_deproj"] = (log_sd + np.log10(np.cos(inc.to_value(u.rad)))) * dex_sd
    # SFR surface density per age bin: formed mass / duration, Msun / yr / kpc2
    living_sd = 10**log_sd_liv / fac["mass"] * 1e6  # Msun / kpc2, Chabrier
    dur = np.diff(AGE_BIN_EDGES.to_value(u.yr))
    formed = ml["formed_per_living"]  # (n, 16) per unit living mass
    sfr = living_sd[:, None] * formed / dur[None, :] * fac["sfr"]
    unit = u.solMass / u.yr / u.kpc**2
    f = np.asarray(table["cnn_mass_fraction"], float)
    scale = 10**sig
    have_p = "cnn_mass_fraction_p16" in table.colnames
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio16 = (np.asarray(table["cnn_mass_fraction_p16"], float) / f if have_p
                   else np.full_like(f, np.nan))
        ratio84 = (np.asarray(table["cnn_mass_fraction_p84"], float) / f if have_p
                   else np.full_like(f, np.nan))
    ratio16 = np.where(f > 0, ratio16, 0.0)
    ratio84 = np.where(f > 0, ratio84, np.nan)
    out["cnn_sfr_sd"] = sfr * unit
    out["cnn_sfr_sd_p16"] = sfr * ratio16 / scale[:, None] * unit
    out["cnn_sfr_sd_p84"] = sfr * ratio84 * scale[:, None] * unit
    # mean over the last 100 Myr (a share of the bin that straddles 100 Myr)
    w100 = _age_overlap(1e8)
    mass100 = (sfr * dur[None, :] * w100[None, :]).sum(axis=1)
    sfr100 = mass100 / 1e8
    cum = np.asarray(table["cnn_mass_younger_0.1gyr"], float) if (
        "cnn_mass_younger_0.1gyr" in table.colnames) else None
    with np.errstate(divide="ignore", invalid="ignore"):
        if cum is not None and "cnn_mass_younger_0.1gyr_p16" in table.colnames:
            r16 = np.asarray(table["cnn_mass_younger_0.1gyr_p16"], float) / cum
            r84 = np.asarray(table["cnn_mass_younger_0.1gyr_p84"], float) / cum
        else:
            r16 = r84 = np.full(n, np.nan)
        dex_sfr = u.dex(unit)
        out["cnn_logsfr_sd_100myr"] = np.log10(sfr100) * dex_sfr
        out["cnn_logsfr_sd_100myr_p16"] = (np.log10(sfr100 * r16) - sig) * dex_sfr
        out["cnn_logsfr_sd_100myr_p84"] = (np.log10(sfr100 * r84) + sig) * dex_sfr
    return out
