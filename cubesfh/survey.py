# Licensed under a 3-clause BSD style license - see LICENSE
"""
Many cubes in one go: a survey described by a manifest (``cubesfh run-many``).

A manifest (YAML or CSV, see :func:`read_manifest` and :ref:`survey`) lists the
cubes, their HST images and their options. :func:`run_survey` runs
:func:`~cubesfh.pipeline.run_pipeline` on each of them, on one dask cluster
for the whole survey (a local one by default, or an existing scheduler), and
writes:

* one maps product per cube, ``<name>_maps.fits`` (written atomically), whose
  provenance records a hash of the cube's inputs and options
  (:func:`entry_hash`): a rerun skips every cube whose product is up to date,
  and recomputes the others;
* the pPXF fits of each cube's bins in ``cache_dir/<name>/``, so that a cube
  interrupted during its pPXF fits resumes where it stopped;
* a summary table, ``survey_summary.ecsv`` and ``survey_summary.fits``
  (rewritten atomically after every cube): one row per cube with its status
  (``ok`` or ``failed`` and the error message), median ages and
  metallicities, numbers of bins and of flagged bins per flag, and timings.

A cube that fails (unreadable file, no bin reaching the target S/N, ...) is
recorded as failed and the survey goes on with the next one.
"""

import csv
import dataclasses
import datetime
import difflib
import functools
import hashlib
import json
import logging
import re
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import QTable

from .conventions import HST_BANDS
from .utils import CubeSFHError, atomic_write, progress, sha256_file

__all__ = ["OPTIONS", "SUMMARY_COLUMNS", "SurveyEntry", "entry_hash", "read_manifest",
           "run_survey"]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- options


def _as_bool(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "y", "on", "1"):
        return True
    if text in ("false", "no", "n", "off", "0"):
        return False
    msg = f"expected true/false (or yes/no), got {value!r}"
    raise ValueError(msg)


def _is_null(value):
    """None, or a manifest cell that says so ('', 'none', 'null')."""
    return value is None or (isinstance(value, str)
                             and value.strip().lower() in ("", "none", "null"))


def _as_optional_float(value):
    return None if _is_null(value) else float(value)


def _as_int(value):
    f = float(value)
    if f != int(f):
        msg = f"expected an integer, got {value!r}"
        raise ValueError(msg)
    return int(f)


def _as_k_correct(value):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _as_bool(value)


def _split(value):
    """A list from a YAML list or a CSV cell (items separated by ';' or ',')."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if not text:
        return []
    sep = ";" if ";" in text else ("," if "," in text else None)
    return [t.strip() for t in text.split(sep) if t.strip()]


def _as_window(value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = _split(value)
    if len(parts) == 1:
        parts = parts[0].split()
    lo, hi = (float(p) for p in parts)
    if not lo < hi:
        msg = f"expected LO < HI (Angstrom), got {value!r}"
        raise ValueError(msg)
    return [lo, hi]


def _as_path(value):
    return None if _is_null(value) else str(value).strip()


def _as_paths(value):
    return [str(v) for v in _split(value)]


#: Per-cube options of a manifest: name -> (default, description). The
#: defaults are those of ``cubesfh run``.
OPTIONS = {
    "target_snr": (35.0, "Voronoi target S/N per Angstrom in 5300-5500 A"),
    "min_snr": (1.0, "spaxels below this S/N are left out"),
    "mask": ([], "DS9 region files of areas to exclude (list; ';'-separated in CSV)"),
    "kinematics": (None, "PHANGS-DAP MAPS file of V_STARS/SIGMA_STARS (default: fit)"),
    "redshift": (None, "systemic redshift (default: estimated from the cube)"),
    "snr_window": (None, "observed window LO HI in Angstrom for the binning S/N"),
    "ebv": (0.0, "Milky Way foreground E(B-V)"),
    "r_v": (3.1, "R_V of the foreground extinction"),
    "psf_fwhm": (None, "MUSE PSF FWHM in arcsec when the cube header lacks it"),
    "max_memory": (2.0, "memory allowed for reading the cube at once, GB"),
    "ppxf": (False, "also run the pPXF baseline"),
    "ppxf_mc": (0, "pPXF Monte-Carlo realisations per bin"),
    "model": ([], "network weights (.pt), one per dispersion (default: bundled)"),
    "k_correct": ("auto", "K-correct the photometry: auto, yes or no"),
    "register": (True, "measure and correct the MUSE-HST offset"),
    "max_offset": (2.0, "largest MUSE-HST offset accepted, arcsec"),
    "allow_other_instrument": (False, "accept non-WFC3/UVIS images"),
    "distance": (None, "distance in Mpc: adds the physical maps (default: cube header)"),
    "inclination": (None, "disc inclination in degrees (LOGMSTAR_SD_DEPROJ)"),
    "imf": ("chabrier", "IMF of the masses and SFRs: chabrier, salpeter or kroupa"),
}

_PARSERS = {
    "target_snr": float, "min_snr": float, "mask": _as_paths, "kinematics": _as_path,
    "redshift": _as_optional_float, "snr_window": _as_window, "ebv": float, "r_v": float,
    "psf_fwhm": _as_optional_float, "max_memory": float, "ppxf": _as_bool,
    "ppxf_mc": _as_int, "model": _as_paths, "k_correct": _as_k_correct,
    "register": _as_bool, "max_offset": float, "allow_other_instrument": _as_bool,
    "distance": _as_optional_float, "inclination": _as_optional_float,
    "imf": lambda v: str(v).strip().lower(),
}
_PATH_OPTIONS = ("mask", "kinematics", "model")
_ENTRY_KEYS = ("name", "cube", "hst", "output")


@dataclasses.dataclass(frozen=True)
class SurveyEntry:
    """
    One cube of a survey manifest (:func:`read_manifest`).

    Attributes
    ----------
    name : str
        Name of the galaxy (unique in the manifest; names the product).
    cube : `~pathlib.Path`
        MUSE cube.
    hst : dict
        HST images, band -> `~pathlib.Path` (possibly empty).
    options : dict
        Every option of `OPTIONS`, with the manifest's values or the defaults;
        paths absolute.
    output : str
        File name of the product in the output folder.
    origin : str
        Where the entry is in the manifest (for messages), e.g.
        ``'survey.csv, row 3'``.
    """

    name: str
    cube: Path
    hst: dict
    options: dict
    output: str
    origin: str = ""


def _parse_options(raw, origin, base):
    """Typed options of a manifest entry (only those given)."""
    out = {}
    for key, value in raw.items():
        if key not in OPTIONS:
            close = difflib.get_close_matches(str(key), list(OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = (f"{origin}: unknown option {key!r}{hint}; the options are "
                   f"{', '.join(OPTIONS)}, plus name, cube, output and the HST bands "
                   f"{', '.join(HST_BANDS)}.")
            raise CubeSFHError(msg)
        if isinstance(value, str) and not value.strip() and key not in ("mask", "model"):
            continue  # an empty CSV cell: the default
        try:
            parsed = _PARSERS[key](value)
        except (TypeError, ValueError) as exc:
            msg = f"{origin}: option {key}={value!r} is not valid: {exc}."
            raise CubeSFHError(msg) from None
        if key in _PATH_OPTIONS and parsed is not None:
            parsed = ([str(_resolve(p, base)) for p in parsed] if isinstance(parsed, list)
                      else str(_resolve(parsed, base)))
        out[key] = parsed
    return out


def _resolve(path, base):
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else (base / p)


def _safe_name(name, origin):
    name = str(name).strip()
    bad = sorted({c for c in name if not (c.isalnum() or c in "._+-")})
    if not name or bad:
        msg = (f"{origin}: name {name!r} cannot name a file ({'empty' if not name else 'has '}"
               f"{' '.join(repr(c) for c in bad)}); use letters, digits and . _ + -.")
        raise CubeSFHError(msg)
    return name


# CSV column names matched whatever their case (the HST bands are upper-cased later)
_LOWER_COLUMNS = frozenset({"name", "cube", "output", "hst", *OPTIONS})


def _stem(path):
    name = Path(path).name
    for suffix in (".fits.gz", ".fits.fz", ".fits", ".fit", ".fz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _entry(raw, defaults, origin, base):
    raw = dict(raw)
    cube = raw.pop("cube", None)
    if cube is None or not str(cube).strip():
        msg = f"{origin}: no 'cube' given (the path of the MUSE cube)."
        raise CubeSFHError(msg)
    hst = raw.pop("hst", None) or {}
    if isinstance(hst, str):  # "F555W=a.fits;F814W=b.fits"
        pairs = _split(hst)
        if any("=" not in p for p in pairs):
            msg = f"{origin}: hst must be BAND=PATH items, got {hst!r}."
            raise CubeSFHError(msg)
        hst = dict(p.split("=", 1) for p in pairs)
    if not isinstance(hst, dict):
        msg = f"{origin}: hst must map bands to image paths, got {hst!r}."
        raise CubeSFHError(msg)
    hst = {str(k).strip().upper(): v for k, v in hst.items()}
    for key in list(raw):
        band = str(key).upper().removeprefix("HST_")
        if band in HST_BANDS or re.fullmatch(r"F\d{3,4}(W|LP|M|N)", band):
            value = raw.pop(key)
            if value is not None and str(value).strip():
                hst[band] = value
    unknown = [b for b in hst if b not in HST_BANDS]
    if unknown:
        msg = (f"{origin}: unknown HST band(s) {', '.join(unknown)}; the bands are "
               f"{', '.join(HST_BANDS)}.")
        raise CubeSFHError(msg)
    name = raw.pop("name", None)
    name = _safe_name(name if name is not None and str(name).strip() else _stem(cube), origin)
    output = raw.pop("output", None)
    output = str(output).strip() if output is not None and str(output).strip() else \
        f"{name}_maps.fits"
    options = {key: value for key, (value, _) in OPTIONS.items()}
    options.update(defaults)
    options.update(_parse_options(raw, origin, base))
    return SurveyEntry(name=name, cube=_resolve(cube, base),
                       hst={b: _resolve(p, base) for b, p in hst.items()
                            if p is not None and str(p).strip()},
                       options=options, output=output, origin=origin)


def read_manifest(path, *, defaults=None):
    """
    Read a survey manifest (YAML or CSV).

    **YAML** (``.yaml``/``.yml``, needs PyYAML): a mapping with an optional
    ``defaults`` mapping of options for every cube and a ``cubes`` list (or
    just the list), each item a mapping with ``cube`` (required), ``name``,
    ``hst`` (band -> path), ``output`` and any option of `OPTIONS`::

        defaults:
          target_snr: 50
          ppxf: true
        cubes:
          - name: NGC0628
            cube: cubes/NGC0628.fits
            hst: {F555W: hst/ngc628_f555w.fits, F814W: hst/ngc628_f814w.fits}
            redshift: 0.00219

    **CSV** (any other suffix): a header line, then one cube per line.
    Columns ``cube`` (required), ``name``, ``output``, one per HST band
    (``F275W`` ... ``F814W``, or ``hst_F275W`` ...) with the image paths, and
    any option of `OPTIONS`; an empty cell takes the default, lines
    starting with ``#`` are comments, lists (``mask``, ``model``) are
    separated by ``;``::

        name,cube,F555W,F814W,target_snr,ppxf
        NGC0628,cubes/NGC0628.fits,hst/f555w.fits,hst/f814w.fits,50,yes

    Relative paths are relative to the manifest's folder. The name
    defaults to the cube's file name without ``.fits``; it must be unique.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The manifest.
    defaults : dict, optional
        Options for every cube, above the manifest's ``defaults`` and below
        each cube's own values (``cubesfh run-many --set KEY=VALUE``).

    Returns
    -------
    entries : list of `SurveyEntry`

    Raises
    ------
    CubeSFHError
        If the manifest cannot be parsed, an option is unknown or invalid,
        or two cubes have the same name. (Missing cube or image files are
        not checked here: :func:`run_survey` records them as failed cubes.)
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"manifest {str(path)!r} not found."
        raise CubeSFHError(msg)
    base = path.resolve().parent
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    if yaml_file:
        rows, file_defaults = _read_yaml(path)
    else:
        rows, file_defaults = _read_csv(path), {}
    merged = _parse_options(file_defaults, f"{path.name}, defaults", base)
    merged.update(_parse_options(dict(defaults or {}), "defaults given to read_manifest",
                                 Path.cwd()))
    entries = [_entry(raw, merged, origin, base) for origin, raw in rows]
    seen = {}
    for e in entries:
        if e.name in seen:
            msg = (f"{e.origin}: the name {e.name!r} is already used by {seen[e.name]}; give "
                   "each cube its own 'name' (it names the product).")
            raise CubeSFHError(msg)
        seen[e.name] = e.origin
    outputs = [e.output for e in entries]
    if len(set(outputs)) != len(outputs):
        msg = f"{path.name}: two cubes have the same 'output' file name."
        raise CubeSFHError(msg)
    if not entries:
        msg = f"{path.name}: no cubes listed."
        raise CubeSFHError(msg)
    return entries


def _read_yaml(path):
    try:
        import yaml
    except ImportError:
        msg = (f"reading the YAML manifest {path.name} needs PyYAML (pip install pyyaml); "
               "or write the manifest as CSV.")
        raise CubeSFHError(msg) from None
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as exc:
        msg = f"{path.name} is not valid YAML: {exc}".replace("\n", " ")
        raise CubeSFHError(msg) from None
    if isinstance(data, list):
        data = {"cubes": data}
    if not isinstance(data, dict) or not isinstance(data.get("cubes"), list):
        msg = (f"{path.name}: expected a 'cubes' list (and optionally a 'defaults' mapping), "
               "see the manifest format in the cubesfh survey documentation.")
        raise CubeSFHError(msg)
    extra = sorted(set(data) - {"cubes", "defaults"})
    if extra:
        msg = f"{path.name}: unknown top-level key(s) {', '.join(extra)}; use cubes, defaults."
        raise CubeSFHError(msg)
    file_defaults = data.get("defaults") or {}
    if not isinstance(file_defaults, dict):
        msg = f"{path.name}: 'defaults' must be a mapping of options."
        raise CubeSFHError(msg)
    rows = []
    for i, item in enumerate(data["cubes"], start=1):
        origin = f"{path.name}, cube {i}"
        if isinstance(item, str):
            item = {"cube": item}
        if not isinstance(item, dict):
            msg = f"{origin}: expected a mapping with at least 'cube', got {item!r}."
            raise CubeSFHError(msg)
        rows.append((origin, item))
    return rows, file_defaults


def _read_text(path, *, newline=None):
    """The manifest's text: UTF-8, with or without the byte-order mark Excel writes."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as exc:
        msg = (f"{path.name} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#x}); "
               "save the manifest as UTF-8 (in Excel: 'CSV UTF-8').")
        raise CubeSFHError(msg) from None


def _read_csv(path):
    """Rows of a CSV manifest as (origin, mapping of column -> cell)."""
    lines = [line for line in _read_text(path, newline="").splitlines(keepends=True)
             if line.strip() and not line.lstrip().startswith("#")]
    # spreadsheets in many locales save CSV with ';' (or tabs): take the separator of
    # the header line when it has no comma
    header = lines[0] if lines else ""
    delimiter = next((d for d in (",", ";", "\t") if d in header), ",")
    reader = csv.DictReader(lines, skipinitialspace=True, delimiter=delimiter)
    if reader.fieldnames is not None:  # 'Cube', 'Name', 'Target_SNR': case does not matter
        reader.fieldnames = [c.strip().lower() if c.strip().lower() in _LOWER_COLUMNS
                             else c for c in reader.fieldnames]
    if reader.fieldnames is None or "cube" not in [c.strip() for c in reader.fieldnames]:
        msg = (f"{path.name}: the first line must name the columns, with at least 'cube' "
               "(e.g. name,cube,F555W,F814W,target_snr).")
        raise CubeSFHError(msg)
    rows = []
    for i, row in enumerate(reader, start=2):
        origin = f"{path.name}, line {i}"
        if None in row:
            msg = f"{origin}: more cells than columns."
            raise CubeSFHError(msg)
        # a line with fewer cells than columns: the missing trailing cells are empty
        rows.append((origin, {k.strip(): (v.strip() if isinstance(v, str) else "")
                              for k, v in row.items() if k is not None}))
    return rows


# ----------------------------------------------------------------------------- hashing


@functools.lru_cache(maxsize=1)
def _bundled_models_digest():
    from .network import BUNDLED_MODELS  # no torch import

    h = hashlib.sha256()
    for f in sorted(stem.with_suffix(".pt") for stem in BUNDLED_MODELS):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def entry_hash(entry):
    """
    Hash of what makes a cube's product: its inputs' contents and its options.

    Covers the cube (SHA-256 of its first 64 MiB and its size), every HST
    image, the kinematics, region and model files (SHA-256 of their
    contents; the bundled networks when no model is given) and every option
    of the entry, defaults included. Renaming or moving the files, or
    changing the cluster, keeps the hash; changing a pixel or an option
    changes it.

    Parameters
    ----------
    entry : `SurveyEntry`

    Returns
    -------
    digest : str
        24 hexadecimal characters.

    Raises
    ------
    FileNotFoundError
        If an input file is missing.
    """
    def file_id(p, *, nbytes=None):
        p = Path(p)
        if not p.is_file():
            msg = f"{p} not found"
            raise FileNotFoundError(msg)
        return {"sha256": sha256_file(p, nbytes=nbytes), "size": p.stat().st_size}

    opts = dict(entry.options)
    files = {"cube": file_id(entry.cube, nbytes=1 << 26),
             "hst": {b: file_id(p) for b, p in sorted(entry.hst.items())}}
    for key in _PATH_OPTIONS:
        value = opts.pop(key)
        if isinstance(value, list):
            files[key] = [file_id(p) for p in value]
        elif value is not None:
            files[key] = file_id(value)
    if not entry.options["model"]:
        files["model"] = {"bundled": _bundled_models_digest()}
    payload = json.dumps({"files": files, "options": opts, "output": entry.output},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _product_hash(path):
    """The survey hash recorded in a product, or `None`."""
    from astropy.io import fits

    try:
        header = fits.getheader(path, 0)
        meta = json.loads(header.get("PROVJSON", "") or "{}")
    except (OSError, ValueError):
        return None
    survey = meta.get("survey") or {}
    return survey.get("hash")


# ----------------------------------------------------------------------------- one cube

_MEANS = ("logage_lw", "logage_mw", "zh_lw", "zh_mw")
_TIMINGS = ("registration", "preprocess", "k_correction", "cnn", "ppxf")


def _flag_names():
    from .maps import flag_bits

    return [(value, name) for _, value, name, _ in flag_bits() if name != "NOT_BINNED"]


def _summary_columns():
    cols = [("name", "galaxy name (from the manifest)"),
            ("status", "ok or failed"),
            ("resumed", "True when an up-to-date product was found and not recomputed"),
            ("error", "error message of a failed cube (empty when ok)"),
            ("cube", "path of the MUSE cube"),
            ("product", "path of the maps product"),
            ("hash", "hash of the inputs and options (entry_hash)"),
            ("ppxf", "the pPXF baseline was run"),
            ("n_bins", "number of Voronoi bins"),
            ("n_flagged", "bins with at least one flag")]
    cols += [(f"n_flag_{name}", f"bins with the flag {name} ({value})")
             for value, name in _flag_names()]
    for method in ("cnn", "ppxf"):
        for q in _MEANS:
            kind = "log10(age / yr)" if q.startswith("logage") else "[Z/H], dex"
            cols.append((f"{method}_{q}", f"median over bins of {method.upper()} {q} ({kind})"))
    cols.append(("n_warnings", "warnings raised while processing the cube"))
    cols += [(f"t_{t}", f"seconds spent in {t.replace('_', '-')}") for t in _TIMINGS]
    cols += [("t_write", "seconds spent writing the product"),
             ("t_total", "seconds for the whole cube (inputs to product)"),
             ("date", "UTC date the product was made")]
    return cols


#: Columns of the survey summary table: (name, description).
SUMMARY_COLUMNS = tuple(_summary_columns())


def _blank_row(entry, product, digest):
    row = {name: np.nan for name, _ in SUMMARY_COLUMNS}
    row.update(name=entry.name, status="failed", resumed=False, error="",
               cube=str(entry.cube), product=str(product), hash=digest or "",
               ppxf=bool(entry.options["ppxf"]), n_bins=0, n_flagged=0, n_warnings=0,
               date="")
    for _, name in _flag_names():
        row[f"n_flag_{name}"] = 0
    return row


def _fill_from_maps(row, maps):
    t = maps.table
    row["n_bins"] = int(maps.n_bins)
    flags = np.asarray(t["flag"], dtype=np.int64)
    row["n_flagged"] = int(np.count_nonzero(flags))
    for value, name in _flag_names():
        row[f"n_flag_{name}"] = int(np.count_nonzero(flags & value))
    for method in ("cnn", "ppxf"):
        for q in _MEANS:
            col = f"{method}_{q}"
            if col in t.colnames:
                v = np.asarray(getattr(t[col], "value", t[col]), dtype=float)
                v = v[np.isfinite(v)]
                row[col] = float(np.median(v)) if v.size else np.nan
    timings = maps.meta.get("timings") or {}
    for key in _TIMINGS:
        if key in timings:
            row[f"t_{key}"] = float(timings[key])
    survey = maps.meta.get("survey") or {}
    for key in ("t_write", "t_total", "n_warnings"):
        if key in survey:
            row[key] = survey[key]
    row["ppxf"] = bool(maps.has_ppxf)
    row["date"] = str(maps.meta.get("date", ""))
    return row


def _one_line(exc):
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _run_entry(entry, product, digest, *, scheduler, n_workers, cache_dir, progress_bar):
    """Process one cube; return its summary row (never raises on a bad cube)."""
    from .cube import Cube
    from .hst import HSTImage
    from .pipeline import run_pipeline

    t0 = time.perf_counter()
    row = _blank_row(entry, product, digest)
    opts = entry.options
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kw = {"psf_fwhm": opts["psf_fwhm"] * u.arcsec} if opts["psf_fwhm"] else {}
            cube = Cube.read(entry.cube, **kw)
            hst = {b: HSTImage.read(p, band=b,
                                    allow_other_instrument=opts["allow_other_instrument"])
                   for b, p in entry.hst.items()}
            model = None
            if opts["model"]:
                from .network import SFHModel

                model = [SFHModel.load(p) for p in opts["model"]]
            window = opts["snr_window"]
            maps = run_pipeline(
                cube, hst or None, target_snr=opts["target_snr"], min_snr=opts["min_snr"],
                regions=opts["mask"] or None, kinematics=opts["kinematics"],
                redshift=opts["redshift"], ppxf=opts["ppxf"], model=model,
                scheduler=scheduler, n_workers=n_workers,
                cache_dir=None if cache_dir is None else Path(cache_dir) / entry.name,
                register=opts["register"], max_offset=opts["max_offset"] * u.arcsec,
                k_correct=opts["k_correct"],
                snr_window=None if window is None else np.asarray(window) * u.AA,
                ebv_galactic=opts["ebv"], r_v=opts["r_v"],
                max_memory=opts["max_memory"] * u.GB, ppxf_mc=opts["ppxf_mc"],
                distance=opts["distance"], inclination=opts["inclination"], imf=opts["imf"],
                progress_bar=progress_bar)
            t1 = time.perf_counter()
            survey = {"name": entry.name, "hash": digest, "n_warnings": len(caught),
                      "t_total": t1 - t0}
            maps.meta["survey"] = survey
            maps.write(product, overwrite=True)  # atomic: never a half-written product
            survey["t_write"] = time.perf_counter() - t1
        _fill_from_maps(row, maps)
        row["status"] = "ok"
    except Exception as exc:  # one bad cube never stops the survey
        row["error"] = _one_line(exc)
        log.warning("%s: failed: %s", entry.name, row["error"])
        log.debug("%s: traceback:\n%s", entry.name, traceback.format_exc())
    row["n_warnings"] = len(caught)
    for w in caught:
        log.warning("%s: %s: %s", entry.name, w.category.__name__, w.message)
    row["t_total"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- survey


def _summary_table(rows):
    t = QTable()
    for name, doc in SUMMARY_COLUMNS:
        values = [r.get(name) for r in rows]
        if name.startswith("t_"):
            col = np.array([np.nan if v is None else v for v in values], float) * u.s
        elif name in ("status", "error", "cube", "product", "hash", "name", "date"):
            col = np.array([str(v or "") for v in values], dtype=str)
        elif name in ("resumed", "ppxf"):
            col = np.array([bool(v) for v in values], dtype=bool)
        elif name.startswith("n_"):
            col = np.array([int(v) if v is not None and np.isfinite(v) else 0
                            for v in values], dtype=np.int64)
        else:
            col = np.array([np.nan if v is None else v for v in values], float)
        t[name] = col
        t[name].info.description = doc
    return t


def _write_summary(table, stem):
    paths = []
    for suffix, fmt in ((".ecsv", "ascii.ecsv"), (".fits", "fits")):
        path = Path(f"{stem}{suffix}")
        out = table
        if fmt == "fits":  # FITS strings are ASCII, header keywords short
            out = table.copy()
            for name in ("error", "cube", "product", "name"):
                out[name] = [s.encode("ascii", "replace").decode() for s in table[name]]
            out.meta = {key.upper().replace("_", "")[:8]: value
                        for key, value in table.meta.items()
                        if key.startswith("n_") and isinstance(value, int)}
        with atomic_write(path, overwrite=True) as tmp:
            out.write(tmp, format=fmt, overwrite=True)
        paths.append(path)
    return paths


def run_survey(manifest, output_dir, *, defaults=None, scheduler=None, n_workers=None,
               parallel_cubes=False, cache_dir=None, overwrite=False,
               summary="survey_summary", progress_bar=True):
    """
    Run the pipeline on every cube of a manifest; write products and a summary.

    Parameters
    ----------
    manifest : str, `~pathlib.Path` or list of `SurveyEntry`
        A manifest file (:func:`read_manifest`) or its entries.
    output_dir : str or `~pathlib.Path`
        Folder of the products (``<name>_maps.fits`` unless the entry gives
        ``output``) and of the summary; created if needed.
    defaults : dict, optional
        Options for every cube (see :func:`read_manifest`); only with a
        manifest file.
    scheduler : str or `distributed.Client`, optional
        Where the work goes: `None` (default) a ``LocalCluster`` started for
        the whole survey, a scheduler address such as
        ``'tcp://10.0.0.5:8786'``, a client, or ``'serial'`` (no dask).
        Without ``parallel_cubes`` the cluster only runs the pPXF fits of
        cubes with ``ppxf``; no cluster is started when no cube needs one.
    n_workers : int, optional
        Workers of the local cluster (default: the number of cores).
    parallel_cubes : bool, optional
        `False` (default): one cube after the other, the pPXF bins of each
        spread over the cluster. `True`: each cube is one task on the
        cluster (its pPXF fits run serially inside it), so that several
        cubes are processed at once; on a multi-machine cluster the workers
        must see the input files and ``output_dir`` at the same paths.
    cache_dir : str or `~pathlib.Path`, optional
        Folder of the per-bin pPXF caches, one sub-folder per cube (default
        ``output_dir/cache``).
    overwrite : bool, optional
        Recompute every cube, even those whose product is up to date.
    summary : str, optional
        Stem of the summary files in ``output_dir`` (``.ecsv`` and ``.fits``).
    progress_bar : bool, optional

    Returns
    -------
    table : `~astropy.table.QTable`
        The summary, one row per cube in manifest order (columns:
        `SUMMARY_COLUMNS`); ``meta`` has ``n_ok``, ``n_failed``,
        ``n_resumed``, ``seconds`` and the paths of the summary files.

    Raises
    ------
    CubeSFHError
        If the manifest is invalid, or the scheduler cannot be reached. A
        failing cube does not raise: its row has ``status='failed'`` and
        the error message.
    """
    t_start = time.perf_counter()
    if isinstance(manifest, (str, Path)):
        entries = read_manifest(manifest, defaults=defaults)
        manifest_name = str(manifest)
    else:
        entries = list(manifest)
        manifest_name = ""
        if defaults:
            msg = "defaults= only applies when reading a manifest file; set entry options."
            raise CubeSFHError(msg)
    if parallel_cubes and isinstance(scheduler, str) and scheduler == "serial":
        msg = "parallel_cubes=True needs a dask cluster; drop scheduler='serial'."
        raise CubeSFHError(msg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = output_dir / "cache" if cache_dir is None else Path(cache_dir)
    stem = output_dir / summary
    rows = [None] * len(entries)
    todo = []
    for k, entry in enumerate(entries):
        product = output_dir / entry.output
        try:
            digest = entry_hash(entry)
        except OSError as exc:
            row = _blank_row(entry, product, None)
            row["error"] = _one_line(exc)
            log.warning("%s: failed: %s", entry.name, row["error"])
            rows[k] = row
            continue
        if not overwrite and product.is_file() and _product_hash(product) == digest:
            from .maps import StellarPopulationMaps

            try:
                row = _fill_from_maps(_blank_row(entry, product, digest),
                                      StellarPopulationMaps.read(product))
                row.update(status="ok", resumed=True)
                rows[k] = row
                log.info("%s: %s is up to date; skipped", entry.name, product)
                continue
            except (OSError, CubeSFHError, ValueError, KeyError) as exc:
                log.info("%s: %s unreadable (%s); recomputed", entry.name, product, exc)
        todo.append((k, entry, product, digest))

    bar = progress(None, enabled=progress_bar, desc="cubes", total=len(entries), unit="cube")
    bar.update(len(entries) - len(todo))

    def finish(k, row):
        rows[k] = row
        bar.update(1)
        log.info("%s: %s%s (%d bins, %.1f s)", row["name"], row["status"],
                 f" ({row['error']})" if row["error"] else "", row["n_bins"], row["t_total"])
        _write_summary(_summary_table([r for r in rows if r is not None]), stem)

    need_cluster = bool(todo) and (parallel_cubes or any(e.options["ppxf"]
                                                         for _, e, _, _ in todo))
    from .parallel import dask_client

    try:
        with dask_client(scheduler if need_cluster else "serial",
                         n_workers=n_workers) as client:
            target = "serial" if client is None else client
            if parallel_cubes and todo:
                from distributed import as_completed

                futs = {client.submit(_run_entry, entry, product, digest, scheduler="serial",
                                      n_workers=None, cache_dir=cache_dir,
                                      progress_bar=False, pure=False,
                                      key=f"cubesfh-cube-{entry.name}-{digest}"): (k, entry,
                                                                                  product,
                                                                                  digest)
                        for k, entry, product, digest in todo}
                for fut in as_completed(futs, loop=client.loop):
                    k, entry, product, digest = futs[fut]
                    try:
                        row = fut.result()
                    except Exception as exc:  # the worker died (memory), cancelled, ...
                        row = _blank_row(entry, product, digest)
                        row["error"] = _one_line(exc)
                    finish(k, row)
            else:
                for k, entry, product, digest in todo:
                    finish(k, _run_entry(entry, product, digest, scheduler=target,
                                         n_workers=n_workers, cache_dir=cache_dir,
                                         progress_bar=progress_bar))
    finally:
        bar.close()
    table = _summary_table(rows)
    status = np.asarray(table["status"])
    table.meta.update({
        "manifest": manifest_name, "output_dir": str(output_dir),
        "n_cubes": len(rows), "n_ok": int(np.count_nonzero(status == "ok")),
        "n_failed": int(np.count_nonzero(status != "ok")),
        "n_resumed": int(np.count_nonzero(np.asarray(table["resumed"]))),
        "seconds": time.perf_counter() - t_start,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    })
    paths = _write_summary(table, stem)
    table.meta["summary_files"] = [str(p) for p in paths]
    return table
