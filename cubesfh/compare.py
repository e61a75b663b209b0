# Licensed under a 3-clause BSD style license - see LICENSE
"""
Comparison of the maps with those of another pipeline.

The other product is read in one of these layouts (`read_other`; ``layout='auto'``
tells them apart by their extensions):

``cubesfh``
    another cubesfh maps product (``BIN_ID`` + ``BINS``): its image extensions,
    in the units of their ``BUNIT``.
``phangs-dap``
    a PHANGS-MUSE DAP ``MAPS`` file (``<GALAXY>_MAPS.fits``, one image extension
    per quantity with the celestial WCS of the mosaic: ``V_STARS``,
    ``SIGMA_STARS``, ``FLUX``, ``SNR``, ``STELLAR_MASS_DENSITY``, ``EBV_STARS``,
    ``AGE_LW``, ``AGE_MW``...). Units are taken from each extension's ``BUNIT``;
    where it is missing the unit must be given (``AGE_LW:Gyr`` or
    ``AGE_LW:logyr``), because the release does not record it in a way this
    module could confirm.
``ngist-sfh``
    the star-formation-history table of nGIST (``<RUN>_sfh.fits``, binary table
    ``SFH`` with one row per Voronoi bin: ``AGE`` in Gyr, ``METAL`` and
    ``ALPHA`` in dex), painted on the spaxels with its ``<RUN>_table.fits``
    (``BIN_ID``, ``X``, ``Y`` per spaxel, ``PIXSIZE``, and the cube's WCS in
    its third extension when nGIST wrote it).
``ngist-maps``
    the nGIST map file ``<RUN>_SFH_maps.fits`` (one image per column of the
    ``SFH`` table, with the cube's celestial WCS).
``images``
    any FITS file whose named 2-D image extensions carry a celestial WCS
    (only with explicit quantities).

Each quantity ``OURS=THEIRS[:UNIT]`` is converted to the unit of our map
(log10(age/yr) for ages, dex for [Z/H]; see `parse_quantity`), spaxel by
spaxel on the other's grid, put on our grid (used as it is when the grids are
the same, otherwise reprojected onto our WCS with `reproject.reproject_interp`)
and averaged over each of our bins. The table gives, per quantity, the median
offset (ours - theirs), the robust scatter (1.4826 times the median absolute
deviation) and the number of bins.
"""

import logging
import re
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable
from astropy.wcs import WCS, FITSFixedWarning

from .conventions import Z_SUN
from .profiles import DEFAULT_EXCLUDE
from .utils import CubeSFHError

__all__ = ["LAYOUTS", "MAD_TO_SIGMA", "OtherMaps", "compare_maps", "parse_quantity",
           "plot_comparison", "read_other", "robust_scatter", "write_comparison"]

log = logging.getLogger(__name__)

#: Layouts that `read_other` recognises.
LAYOUTS = ("cubesfh", "phangs-dap", "ngist-sfh", "ngist-maps", "images")

#: Factor from the median absolute deviation to the standard deviation of a Gaussian.
MAD_TO_SIGMA = 1.4826

_DEX_YR = u.dex(u.yr)
_LAYOUT_NAMES = {"cubesfh": "cubesfh maps product", "phangs-dap": "PHANGS DAP MAPS file",
                 "ngist-sfh": "nGIST SFH table", "ngist-maps": "nGIST SFH maps",
                 "images": "FITS images"}
# Default pairs (ours, theirs) of each layout; only those the file has are used.
_PHANGS_DEFAULTS = (("LOGAGE_LW", "AGE_LW"), ("LOGAGE_MW", "AGE_MW"), ("ZH_LW", "Z_LW"),
                    ("ZH_MW", "Z_MW"))
_CUBESFH_DEFAULTS = (("LOGAGE_LW", "LOGAGE_LW"), ("LOGAGE_MW", "LOGAGE_MW"),
                     ("ZH_LW", "ZH_LW"), ("ZH_MW", "ZH_MW"))
_NOT_MAPS = ("BIN_ID", "FLAG", "SFH", "ZH_AGE", "SFH_P16", "SFH_P84")

# Unit spellings accepted after the colon of a quantity (and in BUNIT), lower case
# without spaces -> astropy unit or a metallicity token.
_ALIASES = {
    **dict.fromkeys(("logyr", "log(yr)", "log10(yr)", "log(age/yr)", "log10(age/yr)",
                     "dex(yr)", "logage", "log(year)"), _DEX_YR),
    **dict.fromkeys(("loggyr", "log(gyr)", "log10(gyr)", "log(age/gyr)", "log10(age/gyr)",
                     "dex(gyr)"), u.dex(u.Gyr)),
    **dict.fromkeys(("dex", "[z/h]", "[m/h]", "[fe/h]", "log(z/zsun)", "logzsun",
                     "log(z/z_sun)"), u.dex),
    **dict.fromkeys(("z", "massfraction"), "Z"),
    **dict.fromkeys(("zsun", "z/zsun", "z/z_sun", "solar"), "Zsun"),
}
_UNIT_HELP = ("an age unit (Gyr, Myr, yr), a log age (logyr = log10(age/yr), logGyr), "
              "dex ([Z/H] or [M/H]), Z (metal mass fraction, [Z/H] = log10(Z/z_sun)), "
              "Zsun (Z/Z_sun) or any astropy unit (km/s)")


# ----------------------------------------------------------------------------- units


def _unit_from_text(text):
    """An astropy unit or ``'Z'``/``'Zsun'`` from a unit spelling; `None` if not understood."""
    key = re.sub(r"\s+", "", str(text)).lower()
    if key in _ALIASES:
        return _ALIASES[key]
    try:
        unit = u.Unit(str(text).strip())
    except ValueError:
        try:
            unit = u.Unit(str(text).strip().lower())
        except ValueError:
            return None
    return unit


def _is_age(unit):
    return (isinstance(unit, u.FunctionUnitBase) and unit.physical_unit != u.dimensionless_unscaled
            and unit.physical_unit.is_equivalent(u.yr))


def _is_dex(unit):
    return unit == u.dex or (isinstance(unit, u.FunctionUnitBase)
                             and unit.physical_unit == u.dimensionless_unscaled)


def _unit_text(unit):
    return unit if isinstance(unit, str) else unit.to_string()


def parse_quantity(spec):
    """
    Parse ``OURS=THEIRS[:UNIT]`` into ``(ours, theirs, unit)``.

    ``OURS`` is an image extension of the cubesfh product (``LOGAGE_LW``,
    ``ZH_MW``, ``PPXF_LOGAGE_LW``, ``V_STARS``...), ``THEIRS`` an extension
    (or nGIST column) of the other file; both are upper-cased. ``UNIT`` says
    what ``THEIRS`` holds when the file does not (no ``BUNIT``) or says it
    wrongly: an age unit (``Gyr``, ``Myr``, ``yr``: converted to
    log10(age/yr)), a log age (``logyr`` for log10(age/yr), ``logGyr``),
    ``dex`` ([Z/H] or [M/H]), ``Z`` (metal mass fraction, converted with
    [Z/H] = log10(Z / z_sun)), ``Zsun`` (Z/Z_sun) or any astropy unit.
    ``OURS`` alone means the same name on both sides.

    Parameters
    ----------
    spec : str

    Returns
    -------
    ours, theirs : str
    unit : `~astropy.units.UnitBase`, str or None
        ``'Z'`` or ``'Zsun'`` for the metallicity conversions; `None` when
        not given.

    Raises
    ------
    CubeSFHError
        For an empty name or a unit that is not understood.

    Examples
    --------
    >>> from cubesfh.compare import parse_quantity
    >>> parse_quantity("LOGAGE_LW=AGE_LW:Gyr")
    ('LOGAGE_LW', 'AGE_LW', Unit("Gyr"))
    >>> parse_quantity("zh_lw=Z_LW:Z")
    ('ZH_LW', 'Z_LW', 'Z')
    """
    text = str(spec).strip()
    ours, sep, rest = text.partition("=")
    theirs, colon, unit_text = (rest if sep else ours).partition(":")
    ours, theirs = ours.strip().upper(), theirs.strip().upper()
    if not ours or not theirs or (colon and not unit_text.strip()):
        msg = (f"a quantity is OURS=THEIRS[:UNIT] (e.g. LOGAGE_LW=AGE_LW:Gyr or "
               f"ZH_LW=METAL); got {spec!r}.")
        raise CubeSFHError(msg)
    unit = None
    if colon:
        unit = _unit_from_text(unit_text)
        if unit is None:
            msg = (f"unit {unit_text.strip()!r} of {spec!r} is not understood; give "
                   f"{_UNIT_HELP}.")
            raise CubeSFHError(msg)
    return ours, theirs, unit


def _convert(values, unit, our_unit, *, z_sun, what, fix):
    """Their values to our unit; returns (array, description)."""
    values = np.asarray(values, dtype=float)
    if _is_age(our_unit):
        if unit is None:
            msg = (f"{what} has no unit (no BUNIT) and an age can be in Gyr or in log yr; give "
                   f"it, e.g. {fix}:Gyr or {fix}:logyr (--quantity).")
            raise CubeSFHError(msg)
        if _is_age(unit):
            return (values * unit).to_value(our_unit), f"{unit.to_string()} -> log10(age/yr)"
        if isinstance(unit, u.UnitBase) and unit.is_equivalent(u.yr):
            with np.errstate(divide="ignore", invalid="ignore"):
                linear = (values * unit).to_value(u.yr)
                out = np.where(linear > 0, np.log10(linear), np.nan)
            return out, f"{unit.to_string()} -> log10(age/yr)"
        msg = (f"{what} is in {_unit_text(unit)}, not an age; give its unit, e.g. {fix}:Gyr "
               f"or {fix}:logyr (--quantity), or compare it with another quantity.")
        raise CubeSFHError(msg)
    if _is_dex(our_unit):
        if isinstance(unit, str):  # 'Z' or 'Zsun'
            scale = z_sun if unit == "Z" else 1.0
            with np.errstate(divide="ignore", invalid="ignore"):
                out = np.where(values > 0, np.log10(values / scale), np.nan)
            text = f"Z -> log10(Z/{z_sun:g})" if unit == "Z" else "Z/Z_sun -> log10"
            return out, text
        if unit is None or unit == u.dimensionless_unscaled:
            msg = (f"{what} has no unit that tells [Z/H] from a mass fraction Z; give it, e.g. "
                   f"{fix}:dex ([Z/H], [M/H]), {fix}:Z (mass fraction) or {fix}:Zsun "
                   "(--quantity).")
            raise CubeSFHError(msg)
        if _is_dex(unit):
            return values, "dex"
        msg = (f"{what} is in {_unit_text(unit)}, not a metallicity; give its unit, e.g. "
               f"{fix}:dex, {fix}:Z or {fix}:Zsun (--quantity).")
        raise CubeSFHError(msg)
    if unit is None:
        return values, "as ours (no unit)"
    if isinstance(unit, str) or not unit.is_equivalent(our_unit):
        msg = (f"{what} is in {_unit_text(unit)}, which does not convert to "
               f"{our_unit.to_string() or 'a plain number'}; give its unit after a colon "
               f"({fix}:UNIT) or compare it with another quantity.")
        raise CubeSFHError(msg)
    return (values * unit).to_value(our_unit), _unit_text(unit)


# ----------------------------------------------------------------------------- reading


def _celestial(header):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except Exception:  # a broken WCS: no usable sky position
            return None
    if not wcs.has_celestial:
        return None
    wcs = wcs.celestial
    return wcs if wcs.naxis == 2 else None


class OtherMaps:
    """
    The maps of another pipeline, read by `read_other`.

    Parameters
    ----------
    path : `~pathlib.Path`
    layout : str
        One of `LAYOUTS`.
    names : sequence of str
        The quantities (extensions or table columns) the file offers.
    defaults : sequence of tuple
        ``(ours, theirs)`` pairs compared when no quantity is given.
    loader : callable
        ``loader(name)`` returns ``(data, wcs)``: the 2-D map of ``name`` on
        the other's grid and its celestial WCS (`None`: the grid of our maps).
    units : dict
        Unit of each name (an astropy unit, ``'Z'``, ``'Zsun'``, or `None`
        when unknown).
    bins : tuple, optional
        ``(bin_map, wcs)``: the other's own bins on its grid (-1 outside),
        for the layouts that have them (cubesfh, nGIST SFH table).
    meta : dict, optional
        Notes on the file (e.g. ``weighting``, ``bunit``).
    """

    def __init__(self, path, layout, *, names, defaults, loader, units, bins=None, meta=None):
        self.path = Path(path)
        self.layout = layout
        self.names = tuple(names)
        self.defaults = tuple(defaults)
        self._loader = loader
        self.units = dict(units)
        self.bins = bins
        self.meta = dict(meta or {})

    def __repr__(self):
        return (f"<OtherMaps: {_LAYOUT_NAMES[self.layout]} {self.path.name}, "
                f"{len(self.names)} quantities>")

    def map(self, name):
        """``(data, wcs)`` of one quantity, in the file's own unit."""
        name = str(name).upper()
        if name not in self.names:
            msg = (f"{self.path} has no {name!r} ({_LAYOUT_NAMES[self.layout]}; it has "
                   f"{', '.join(self.names) or 'no usable map'}); choose one of these in "
                   "the quantity (--quantity OURS=THEIRS).")
            raise CubeSFHError(msg)
        return self._loader(name)


def _hdu_summary(hdul):
    """(image 2-D names, table names -> column names) of an open HDU list."""
    images, tables = [], {}
    for hdu in hdul:
        if isinstance(hdu, fits.BinTableHDU):
            tables[hdu.name.upper()] = [c.upper() for c in hdu.columns.names]
        elif hdu.is_image and hdu.header.get("NAXIS", 0) == 2:
            images.append(hdu.name.upper())
    return images, tables


def _image_loader(path):
    def load(name):
        with fits.open(path, memmap=True) as hdul:
            hdu = hdul[name]
            data = np.array(hdu.data, dtype=float)
            wcs = _celestial(hdu.header)
        if wcs is None:
            msg = (f"extension {name} of {path} has no celestial WCS, so it cannot be put "
                   "on the sky; add the WCS of the cube it was measured on to its header.")
            raise CubeSFHError(msg)
        return data, wcs

    return load


def _bunits(hdul, names):
    units, raw = {}, {}
    for name in names:
        text = str(hdul[name].header.get("BUNIT", "")).strip()
        raw[name] = text
        units[name] = _unit_from_text(text) if text else None
        if text and units[name] is None:
            log.warning("BUNIT %r of %s is not understood; give the unit in the quantity.",
                        text, name)
    return units, raw


def _ngist_unit(name):
    base = name.removeprefix("ERR_").removeprefix("FORM_ERR_").removesuffix("_MC")
    if base == "AGE":
        return u.Gyr
    if base in ("METAL", "ALPHA"):
        return u.dex
    if base in ("V", "SIGMA"):
        return u.km / u.s
    if base == "EBV":
        return u.mag
    return u.dimensionless_unscaled


def _ngist_defaults(norm_temp, names):
    kind = "MW" if str(norm_temp).strip().upper() == "MASS" else "LW"
    pairs = ((f"LOGAGE_{kind}", "AGE"), (f"ZH_{kind}", "METAL"))
    return tuple(p for p in pairs if p[1] in names)


def _ngist_table_path(path, table):
    if table is not None:
        return Path(table)
    name = path.name
    for suffix in ("_sfh.fits", "_SFH.fits", "_sfh.fits.gz"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + "_table.fits")
    return path.with_name(path.stem + "_table.fits")


def _read_ngist_sfh(path, hdul, table):
    sfh = hdul["SFH"]
    columns = [c.upper() for c in sfh.columns.names]
    data = {c.upper(): np.asarray(sfh.data[c], dtype=float) for c in sfh.columns.names
            if np.asarray(sfh.data[c]).ndim == 1}
    norm_temp = sfh.header.get("NORM_TEMP", hdul[0].header.get("NORM_TEMP"))
    table_path = _ngist_table_path(path, table)
    if not table_path.is_file():
        msg = (f"{path} is an nGIST SFH table (one row per bin) and needs its bin table "
               f"{table_path.name} (BIN_ID, X, Y of every spaxel) next to it, or give it "
               "(table=, --ngist-table); or compare the <RUN>_SFH_maps.fits file instead.")
        raise CubeSFHError(msg)
    with fits.open(table_path, memmap=False) as th:
        if "TABLE" in th:
            tab = th["TABLE"]
        else:
            tab = next((h for h in th if isinstance(h, fits.BinTableHDU)), None)
        have = [] if tab is None else [c.upper() for c in tab.columns.names]
        missing = [c for c in ("BIN_ID", "X", "Y") if c not in have]
        if missing:
            msg = (f"{table_path} is not an nGIST bin table: it lacks the columns {missing} "
                   "(an nGIST <RUN>_table.fits has ID, BIN_ID, X, Y, ...).")
            raise CubeSFHError(msg)
        bin_id = np.asarray(tab.data["BIN_ID"], dtype=np.int64)
        x = np.asarray(tab.data["X"], dtype=float)
        y = np.asarray(tab.data["Y"], dtype=float)
        pixsize = th[0].header.get("PIXSIZE", tab.header.get("PIXSIZE"))
        wcs = next((w for w in (_celestial(h.header) for h in th[1:]
                                if not isinstance(h, fits.BinTableHDU)) if w is not None), None)
    if pixsize is None or not np.isfinite(pixsize) or pixsize <= 0:
        steps = np.diff(np.unique(np.round(x, 6)))
        pixsize = float(steps.min()) if steps.size else np.nan
    if not np.isfinite(pixsize) or pixsize <= 0:
        msg = f"{table_path} has no PIXSIZE and its X, Y do not give one; add PIXSIZE."
        raise CubeSFHError(msg)
    # X, Y are offsets (arcsec) of the cube's spaxels, growing with column and row
    ix = np.rint((x - np.nanmin(x)) / pixsize).astype(np.int64)
    iy = np.rint((y - np.nanmin(y)) / pixsize).astype(np.int64)
    shape = (int(iy.max()) + 1, int(ix.max()) + 1)
    rows = np.unique(np.abs(bin_id))  # the SFH table has one row per |BIN_ID|, sorted
    n_rows = len(next(iter(data.values()))) if data else 0
    if n_rows != rows.size:
        msg = (f"{path} has {n_rows} rows but {table_path.name} has {rows.size} bins; the two "
               "files are not from the same nGIST run.")
        raise CubeSFHError(msg)
    their_bins = np.full(shape, -1, dtype=np.int64)
    inside = bin_id >= 0  # negative: a masked spaxel, given its nearest bin
    their_bins[iy[inside], ix[inside]] = np.searchsorted(rows, bin_id[inside])
    if wcs is None:
        note = (f"{table_path.name} carries no WCS (written by GIST or an early nGIST): its "
                "grid is taken to be that of the maps")
        log.warning("%s.", note)
    else:
        note = f"grid and WCS of {table_path.name}"

    def load(name):
        values = data[name]
        image = np.full(shape, np.nan)
        ok = their_bins >= 0
        image[ok] = values[their_bins[ok]]
        return image, wcs

    names = [c for c in columns if c in data]
    meta = {"weighting": f"NORM_TEMP = {norm_temp}" if norm_temp else "NORM_TEMP not recorded "
            "(light-weighted assumed)", "table": str(table_path), "grid": note,
            "n_bins_other": int(rows.size), "shape_other": list(shape)}
    return OtherMaps(path, "ngist-sfh", names=names, defaults=_ngist_defaults(norm_temp, names),
                     loader=load, units={n: _ngist_unit(n) for n in names},
                     bins=(their_bins, wcs), meta=meta)


def read_other(path, *, layout="auto", table=None, quantities=None):
    """
    Read the maps of another pipeline.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        A cubesfh maps product, a PHANGS DAP ``MAPS`` file, an nGIST
        ``<RUN>_sfh.fits`` or ``<RUN>_SFH_maps.fits``, or any FITS file with
        2-D image extensions that carry a celestial WCS.
    layout : {'auto', 'cubesfh', 'phangs-dap', 'ngist-sfh', 'ngist-maps', 'images'}, optional
        Force a layout instead of telling it from the extensions.
    table : str or `~pathlib.Path`, optional
        nGIST ``<RUN>_table.fits`` (default: next to ``<RUN>_sfh.fits``).
    quantities : sequence of str, optional
        The quantities that will be compared (``OURS=THEIRS[:UNIT]``): a file
        in no known layout is read as plain images when it has them all.

    Returns
    -------
    other : `OtherMaps`

    Raises
    ------
    CubeSFHError
        If the file is missing, not FITS, or in no layout it could be read as.
    """
    path = Path(path).expanduser()
    if layout != "auto" and layout not in LAYOUTS:
        msg = f"layout must be 'auto' or one of {list(LAYOUTS)}; got {layout!r}."
        raise CubeSFHError(msg)
    if not path.is_file():
        msg = f"the other pipeline's file {str(path)!r} was not found; check the path."
        raise CubeSFHError(msg)
    try:
        hdul = fits.open(path, memmap=True)
    except OSError as exc:
        msg = f"{path} is not a FITS file ({exc}); give the other pipeline's FITS output."
        raise CubeSFHError(msg) from None
    with hdul:
        images, tables = _hdu_summary(hdul)
        prodtype = str(hdul[0].header.get("PRODTYPE", "")).strip().upper()
        wanted = [parse_quantity(q)[1] for q in (quantities or ())]
        if layout == "auto":
            if prodtype == "STELLAR_POPULATION_MAPS" or ("BIN_ID" in images and "BINS" in tables):
                layout = "cubesfh"
            elif "SFH" in tables and {"AGE", "METAL"} <= set(tables["SFH"]):
                layout = "ngist-sfh"
            elif {"AGE", "METAL"} <= set(images):
                layout = "ngist-maps"
            elif "V_STARS" in images and ({"AGE_LW", "AGE_MW", "Z_LW", "Z_MW", "FLUX", "SNR",
                                           "SIGMA_STARS", "STELLAR_MASS_DENSITY"} & set(images)):
                layout = "phangs-dap"
            elif wanted and set(wanted) <= set(images):
                layout = "images"
            else:
                hint = ""
                if any({"BIN_ID", "X", "Y"} <= set(c) for c in tables.values()):
                    hint = (" It looks like an nGIST bin table (<RUN>_table.fits): give the "
                            "<RUN>_sfh.fits next to it instead.")
                present = ", ".join([*images, *tables]) or "none"
                msg = (f"cannot tell the layout of {path} (extensions: {present}).{hint} "
                       "cubesfh compares with a cubesfh maps product (BIN_ID + BINS), a "
                       "PHANGS DAP MAPS file (V_STARS, AGE_LW, ...), an nGIST <RUN>_sfh.fits "
                       "(table SFH with AGE, METAL) or <RUN>_SFH_maps.fits, or with any 2-D "
                       "image extensions that carry a WCS, named in the quantities "
                       "(OURS=THEIRS[:UNIT], --quantity).")
                raise CubeSFHError(msg)
        if layout == "ngist-sfh":
            if "SFH" not in tables:
                msg = f"{path} has no SFH table; it is not an nGIST <RUN>_sfh.fits."
                raise CubeSFHError(msg)
            return _read_ngist_sfh(path, hdul, table)
        if layout in ("phangs-dap", "images", "ngist-maps"):
            if layout == "ngist-maps":
                units = {n: _ngist_unit(n) for n in images}
                meta = {"weighting": "not recorded in the maps file (light-weighted assumed)"}
                defaults = _ngist_defaults(None, images)
            else:
                units, raw = _bunits(hdul, images)
                meta = {"bunit": raw}
                defaults = _PHANGS_DEFAULTS if layout == "phangs-dap" else ()
                defaults = tuple(p for p in defaults if p[1] in images)
            return OtherMaps(path, layout, names=images, defaults=defaults,
                             loader=_image_loader(path), units=units, meta=meta)
    # cubesfh product: read through its own reader (units from the product)
    from .maps import StellarPopulationMaps

    product = StellarPopulationMaps.read(path)
    names = [n for n in product.extension_names
             if n not in _NOT_MAPS and not n.startswith(("PPXF_SFH", "PPXF_ZH_AGE"))]

    def load(name):
        return np.asarray(product[name].value, dtype=float), product.wcs

    units = {n: product[n].unit for n in names}
    return OtherMaps(path, "cubesfh", names=names,
                     defaults=tuple(p for p in _CUBESFH_DEFAULTS if p[1] in names),
                     loader=load, units=units, bins=(product.bin_map, product.wcs),
                     meta={"n_bins_other": product.n_bins})


# ----------------------------------------------------------------------------- comparison


def robust_scatter(values):
    """
    1.4826 times the median absolute deviation from the median (NaN ignored).

    Parameters
    ----------
    values : array-like

    Returns
    -------
    scatter : float
        The standard deviation for Gaussian values; NaN without finite values.

    Examples
    --------
    >>> from cubesfh.compare import robust_scatter
    >>> float(robust_scatter([1.0, 2.0, 3.0, 4.0, 100.0]))
    1.4826
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.nan
    return MAD_TO_SIGMA * float(np.median(np.abs(v - np.median(v))))


def _same_grid(wcs_a, shape_a, wcs_b, shape_b, tol=1e-6):
    """Whether two celestial grids have the same pixels (to ``tol`` pixel)."""
    if tuple(shape_a) != tuple(shape_b):
        return False
    ny, nx = shape_a
    x = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, 0.5 * (nx - 1)])
    y = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, 0.5 * (ny - 1)])
    try:
        world = wcs_a.pixel_to_world_values(x, y)
        back = wcs_b.world_to_pixel_values(*world)
    except Exception:  # incompatible WCS: not the same grid
        return False
    return bool(np.all(np.abs(back[0] - x) < tol) and np.all(np.abs(back[1] - y) < tol))


def _same_bins(ours, theirs):
    """Whether two bin maps on one grid are the same partition (up to the numbering)."""
    if ours.shape != theirs.shape or not np.array_equal(ours >= 0, theirs >= 0):
        return False
    inside = ours >= 0
    pairs = np.unique(np.stack([ours[inside], theirs[inside]]), axis=1)
    return (np.unique(pairs[0]).size == pairs.shape[1]
            and np.unique(pairs[1]).size == pairs.shape[1])


def _on_our_grid(data, wcs, maps, what, order):
    """Their (converted) map on our grid; returns (image, placement)."""
    if wcs is None:
        if data.shape != maps.shape:
            msg = (f"{what} has no WCS and its grid ({data.shape[0]}x{data.shape[1]}) is not "
                   f"that of the maps ({maps.shape[0]}x{maps.shape[1]}); it cannot be put on "
                   "the sky. Give a file that carries the WCS of its cube.")
            raise CubeSFHError(msg)
        return data, "same grid (no WCS)"
    if _same_grid(wcs, data.shape, maps.wcs, maps.shape):
        return data, "same grid"
    from reproject import reproject_interp

    out, footprint = reproject_interp((data, wcs), maps.wcs, shape_out=maps.shape, order=order)
    covered = footprint > 0
    if not np.any(covered & (maps.bin_map >= 0)):
        ra, dec = maps.wcs.wcs.crval
        msg = (f"{what} does not overlap the maps' footprint (around RA {ra:.5f}, Dec "
               f"{dec:.5f}); check that both files are of the same galaxy and field, and "
               "that their WCS are right.")
        raise CubeSFHError(msg)
    return np.where(covered, out, np.nan), f"reprojected ({order})"


def _bin_means(image, bin_map, n_bins):
    """Mean of the finite values in each bin and the share of its spaxels that have one."""
    inside = bin_map >= 0
    b, v = bin_map[inside], image[inside]
    ok = np.isfinite(v)
    total = np.bincount(b, minlength=n_bins).astype(float)
    count = np.bincount(b[ok], minlength=n_bins).astype(float)
    sums = np.bincount(b[ok], weights=v[ok], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / count, np.where(total > 0, count / total, 0.0)


def _our_values(maps, name):
    """Per-bin values and unit of one of our 2-D maps."""
    name = name.upper()
    valid = [n for n in maps.extension_names if n not in _NOT_MAPS
             and not n.startswith(("PPXF_SFH", "PPXF_ZH_AGE"))]
    if name not in valid:
        msg = (f"the maps have no 2-D map {name!r} to compare; choose one of "
               f"{', '.join(valid)} (OURS in OURS=THEIRS).")
        raise CubeSFHError(msg)
    image = maps[name]
    flat = maps.bin_map.ravel()
    bins, first = np.unique(flat, return_index=True)
    keep = bins >= 0
    values = np.full(maps.n_bins, np.nan)
    values[bins[keep]] = np.asarray(image.value, dtype=float).ravel()[first[keep]]
    return values, image.unit


def compare_maps(maps, other, *, quantities=None, layout="auto", table=None, z_sun=Z_SUN,
                 min_coverage=0.5, exclude=DEFAULT_EXCLUDE, order="bilinear",
                 return_bins=False):
    """
    Median offset, robust scatter and number of bins of the maps against another pipeline's.

    Parameters
    ----------
    maps : `~cubesfh.maps.StellarPopulationMaps` or str or `~pathlib.Path`
        The cubesfh product ("ours").
    other : `OtherMaps` or str or `~pathlib.Path`
        The other pipeline's file (see `read_other`).
    quantities : sequence of str, optional
        ``OURS=THEIRS[:UNIT]`` (`parse_quantity`), e.g.
        ``["LOGAGE_LW=AGE_LW:Gyr", "ZH_LW=Z_LW:Z"]``. Default: the layout's
        own pairs that the file has (PHANGS DAP: ``LOGAGE_LW=AGE_LW``,
        ``LOGAGE_MW=AGE_MW``, ``ZH_LW=Z_LW``, ``ZH_MW=Z_MW``; nGIST:
        ``LOGAGE_LW=AGE`` and ``ZH_LW=METAL``, or the ``_MW`` maps when its
        templates were mass-normalised (``NORM_TEMP = MASS``); cubesfh: the
        four mean ages and metallicities).
    layout : str, optional
        Layout of ``other`` (`LAYOUTS`; default: told from the file).
    table : str or `~pathlib.Path`, optional
        nGIST ``<RUN>_table.fits`` when not next to ``<RUN>_sfh.fits``.
    z_sun : float, optional
        Solar metal mass fraction of the ``Z`` conversion, [Z/H] =
        log10(Z / z_sun); default 0.02, the value of our templates
        (`cubesfh.conventions.Z_SUN`).
    min_coverage : float, optional
        A bin counts when at least this share of its spaxels has a value of
        the other's map (edges of its footprint, masked spaxels).
    exclude : int, optional
        Our bins with any of these ``FLAG`` bits are left out (default
        `cubesfh.profiles.DEFAULT_EXCLUDE`; 0 keeps every bin).
    order : str, optional
        Interpolation of `reproject.reproject_interp` when the grids differ
        (``'bilinear'``; ``'nearest-neighbor'`` keeps the other's bin values).
    return_bins : bool, optional
        Also return the per-bin values.

    Returns
    -------
    summary : `~astropy.table.QTable`
        One row per quantity: ``quantity`` (ours), ``other`` (theirs),
        ``n`` (bins compared), ``median_offset`` (ours - theirs),
        ``robust_scatter`` (1.4826 MAD of the offsets), ``unit`` (of the
        offsets: ``dex`` for ages and metallicities), ``conversion`` (what was
        done to their values) and ``placement`` (``same bins``, ``same grid``
        or ``reprojected (...)``). ``meta`` records the files, the layout
        and the options.
    per_bin : `~astropy.table.QTable`
        With ``return_bins=True``: ``bin``, ``flag`` and per quantity ``q``
        (ours), ``q_other`` (theirs, converted and averaged over the bin),
        ``q_coverage`` and ``q_used``.

    Raises
    ------
    CubeSFHError
        For a quantity or unit that is not understood or not in a file, a
        layout that cannot be told, or maps that do not overlap.
    """
    from .maps import StellarPopulationMaps

    if not isinstance(maps, StellarPopulationMaps):
        maps = StellarPopulationMaps.read(maps)
    if not (np.isfinite(z_sun) and z_sun > 0):
        msg = f"z_sun must be a positive mass fraction (e.g. 0.02); got {z_sun!r}."
        raise CubeSFHError(msg)
    if not (0.0 <= min_coverage <= 1.0):
        msg = f"min_coverage must be between 0 and 1 (e.g. 0.5); got {min_coverage!r}."
        raise CubeSFHError(msg)
    if isinstance(quantities, str):
        quantities = [quantities]
    if not isinstance(other, OtherMaps):
        other = read_other(other, layout=layout, table=table, quantities=quantities)
    if quantities:
        specs = [parse_quantity(q) for q in quantities]
    else:
        specs = [(o, t, None) for o, t in other.defaults]
        if not specs:
            msg = (f"{other.path} ({_LAYOUT_NAMES[other.layout]}) has none of the maps compared "
                   f"by default; name them (OURS=THEIRS[:UNIT], --quantity), among "
                   f"{', '.join(other.names) or 'none'}.")
            raise CubeSFHError(msg)
    seen = [s[0] for s in specs]
    twice = sorted({s for s in seen if seen.count(s) > 1})
    if twice:
        msg = f"the quantities name {twice} twice; give each of our maps once."
        raise CubeSFHError(msg)

    flags = np.asarray(maps.table["flag"], dtype=np.int64)
    keep = (flags & int(exclude)) == 0
    per_bin = QTable()
    per_bin["bin"] = np.arange(maps.n_bins, dtype=np.int32)
    per_bin["flag"] = flags.astype(np.int32)
    rows, placements = [], set()
    # their own bins, when they have some and they are ours: compared bin for bin
    same_bins = False
    if other.bins is not None:
        their_bins, their_wcs = other.bins
        on_our_grid = (their_bins.shape == maps.shape if their_wcs is None
                       else _same_grid(their_wcs, their_bins.shape, maps.wcs, maps.shape))
        same_bins = on_our_grid and _same_bins(maps.bin_map, their_bins)
    for ours, theirs, unit in specs:
        mine, our_unit = _our_values(maps, ours)
        data, wcs = other.map(theirs)
        what = f"{theirs} of {other.path.name}"
        fix = f"{ours}={theirs}"
        given = unit if unit is not None else other.units.get(theirs)
        converted, conversion = _convert(data, given, our_unit, z_sun=z_sun, what=what,
                                         fix=fix)
        on_grid, placement = _on_our_grid(converted, wcs, maps, what, order)
        if same_bins and placement.startswith("same grid"):
            placement = "same bins"
        placements.add(placement)
        values, coverage = _bin_means(on_grid, maps.bin_map, maps.n_bins)
        values = np.where(coverage >= min_coverage, values, np.nan)
        used = keep & np.isfinite(mine) & np.isfinite(values)
        diff = mine[used] - values[used]
        n = int(used.sum())
        if n == 0:
            log.warning("%s: no bin has both values (after flags and min_coverage).", ours)
        offset_unit = "dex" if (_is_age(our_unit) or _is_dex(our_unit)) else our_unit.to_string()
        rows.append({"quantity": ours, "other": theirs, "n": n,
                     "median_offset": float(np.median(diff)) if n else np.nan,
                     "robust_scatter": robust_scatter(diff) if n else np.nan,
                     "unit": offset_unit, "conversion": conversion, "placement": placement})
        key = ours.lower()
        per_bin[key] = mine
        per_bin[f"{key}_other"] = values
        per_bin[f"{key}_coverage"] = coverage
        per_bin[f"{key}_used"] = used
    summary = QTable(rows=rows, names=("quantity", "other", "n", "median_offset",
                                       "robust_scatter", "unit", "conversion", "placement"))
    summary["n"].info.description = "bins compared (finite on both sides, not excluded)"
    summary["median_offset"].info.description = "median of ours - theirs over the bins"
    summary["robust_scatter"].info.description = "1.4826 x median absolute deviation of the offsets"
    summary.meta.update({
        "other": str(other.path), "layout": other.layout, "n_bins": int(maps.n_bins),
        "z_sun": float(z_sun), "min_coverage": float(min_coverage), "exclude": int(exclude),
        "interpolation": order, **{k: v for k, v in other.meta.items() if k != "bunit"},
        "comments": ["offsets are ours - theirs, per bin of our maps",
                     "their maps are converted to our units spaxel by spaxel, put on our grid "
                     "and averaged over each of our bins"]})
    log.info("compared %d quantities with %s (%s)", len(rows), other.path, ", ".join(placements))
    return (summary, per_bin) if return_bins else summary


# ----------------------------------------------------------------------------- output


def _density(x, y, bins=40):
    """Number of points in the 2-D histogram cell of each point."""
    if x.size == 0:
        return np.zeros(0)
    counts, xe, ye = np.histogram2d(x, y, bins=bins)
    i = np.clip(np.searchsorted(xe, x, side="right") - 1, 0, counts.shape[0] - 1)
    j = np.clip(np.searchsorted(ye, y, side="right") - 1, 0, counts.shape[1] - 1)
    return counts[i, j]


def plot_comparison(summary, per_bin, quantity, path=None, *, overwrite=False, dpi=120):
    """
    Density-scatter plot of ours against theirs for one quantity, with the 1:1 line.

    Each bin is a point coloured by the number of bins in its cell of a 40x40
    grid (the densest on top); the dashed line is 1:1, the dotted one is
    shifted by the median offset.

    Parameters
    ----------
    summary, per_bin : `~astropy.table.QTable`
        The two tables of `compare_maps` (``return_bins=True``).
    quantity : str
        One of ``summary['quantity']``.
    path : str or `~pathlib.Path`, optional
        Write the figure there (atomically; format from the suffix).
    overwrite : bool, optional
    dpi : int, optional

    Returns
    -------
    fig : `matplotlib.figure.Figure`
    """
    from matplotlib.figure import Figure

    from .utils import atomic_write

    q = str(quantity).upper()
    match = [r for r in summary if r["quantity"] == q]
    if not match:
        msg = f"no quantity {q!r} in the comparison; it has {list(summary['quantity'])}."
        raise CubeSFHError(msg)
    row = match[0]
    key = q.lower()
    used = np.asarray(per_bin[f"{key}_used"], dtype=bool)
    y = np.asarray(per_bin[key], dtype=float)[used]
    x = np.asarray(per_bin[f"{key}_other"], dtype=float)[used]
    dens = _density(x, y)
    order = np.argsort(dens, kind="stable")
    fig = Figure(figsize=(4.6, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    if x.size:
        sc = ax.scatter(x[order], y[order], c=dens[order], s=8, cmap="viridis",
                        edgecolors="none")
        fig.colorbar(sc, ax=ax, label="bins per cell", shrink=0.8)
        lo = float(min(x.min(), y.min()))
        hi = float(max(x.max(), y.max()))
        pad = 0.05 * (hi - lo) if hi > lo else 0.1
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="1:1")
        off = float(row["median_offset"])
        ax.plot([lo, hi], [lo + off, hi + off], "r:", lw=1, label=f"median offset {off:+.3f}")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="upper left")
    unit = row["unit"]
    ax.set_xlabel(f"{Path(summary.meta.get('other', 'other')).name}: {row['other']} "
                  f"(converted)", fontsize=8)
    ax.set_ylabel(f"cubesfh: {q}", fontsize=8)
    ax.set_title(f"{q}: offset {row['median_offset']:+.3f} {unit}, scatter "
                 f"{row['robust_scatter']:.3f} {unit}, N = {row['n']}", fontsize=8)
    ax.tick_params(labelsize=7)
    if path is not None:
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        with atomic_write(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
    return fig


def write_comparison(summary, per_bin, output_dir, *, overwrite=False, plots=True):
    """
    Write a comparison into a folder, each file atomically.

    ``comparison.ecsv`` (the summary), ``comparison_bins.ecsv`` (the per-bin
    values) and, with ``plots``, ``compare_<quantity>.png`` for each
    quantity (`plot_comparison`). Every file is checked before any is
    written, so a refused run leaves the folder as it was.

    Parameters
    ----------
    summary, per_bin : `~astropy.table.QTable`
        From `compare_maps` with ``return_bins=True``.
    output_dir : str or `~pathlib.Path`
    overwrite : bool, optional
        Replace existing files.
    plots : bool, optional

    Returns
    -------
    paths : list of `~pathlib.Path`
    """
    from .utils import atomic_write
    from .utils._io import check_writable

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        msg = f"the output {out} is a file; give a folder for the comparison (--output DIR)."
        raise CubeSFHError(msg)
    table_path, bins_path = out / "comparison.ecsv", out / "comparison_bins.ecsv"
    pngs = [out / f"compare_{q.lower()}.png" for q in summary["quantity"]] if plots else []
    for path in (table_path, bins_path, *pngs):
        check_writable(path, overwrite=overwrite)
    for table, path in ((summary, table_path), (per_bin, bins_path)):
        with atomic_write(path, overwrite=overwrite) as tmp:
            table.write(tmp, format="ascii.ecsv", overwrite=True)
    for q, png in zip(summary["quantity"], pngs):
        plot_comparison(summary, per_bin, q, png, overwrite=overwrite)
    return [table_path, bins_path, *pngs]
