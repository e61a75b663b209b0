# Licensed under a 3-clause BSD style license - see LICENSE
"""
The held-out template library: E-MILES (Vazdekis et al. 2016), for evaluation only.

It is never shipped and never used for training: the CNN is evaluated on mock
spectra made with a stellar population library it has not seen. The SSPs are
the E-MILES spectra (Padova 2000 isochrones, unimodal IMF of slope 1.30, i.e.
Kroupa-like, base [alpha/Fe]) redistributed in the ``ppxf`` source
distribution, with the MILES table of stellar masses; they are put on the 37
age sub-intervals of the BC03 library by the same code as the training
libraries (:func:`cubesfh.templates.build_external.build_library`).
"""

import functools
import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from ._library import TemplateLibrary

# build_external is imported inside the functions, so that
# ``python -m cubesfh.templates.build_external`` does not find it already imported.

__all__ = ["HELDOUT_LIBRARY", "PPXF_VERSION", "load_heldout_library"]

PPXF_VERSION = "8.2.6"
HELDOUT_LIBRARY = "emiles"
_SSP_RE = re.compile(r"miles_models/Eun1\.30Z([mp])([0-9.]+)T([0-9.]+)_iPp0\.00_baseFe"
                     r"_linear_FWHM_variable\.fits$")
_MASS_FILE = "miles_models/Vazdekis2012_ssp_mass_Padova00_UN_baseFe_v10.0.txt"
#: FWHM (A) of E-MILES in the MILES range 3540-7410 A (Falcon-Barroso et al. 2011).
EMILES_FWHM = 2.51


def _default_cache():
    root = os.environ.get("CUBESFH_CACHE")
    root = Path(root) if root else Path.home() / ".cache" / "cubesfh"
    return root / "sources"


def _read_sdist(sdist):
    from astropy.io import fits

    from ..utils import CubeSFHError

    ssps, contents, mass_text = [], {}, None
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf:
            if not member.isfile():
                continue
            m = _SSP_RE.search(member.name)
            if m is None and not member.name.endswith(_MASS_FILE):
                continue
            data = tf.extractfile(member).read()
            if m is None:
                mass_text = data.decode()
                continue
            contents[member.name] = data
            zh = (-1.0 if m.group(1) == "m" else 1.0) * float(m.group(2))
            with fits.open(io.BytesIO(data)) as hdul:
                h = hdul[0].header
                flux = hdul[0].data.astype(float)  # L_sun / A per M_sun formed
                wave = h["CRVAL1"] + h["CDELT1"] * (np.arange(flux.size) + 1 - h["CRPIX1"])
            ssps.append((float(m.group(3)) * 1e9, 0.02 * 10.0**zh, wave, flux, EMILES_FWHM))
    if not ssps or mass_text is None:
        msg = (f"{Path(sdist).name} lacks the E-MILES SSP files or their mass table; delete "
               f"it and let load_heldout_library fetch ppxf=={PPXF_VERSION} again.")
        raise CubeSFHError(msg)
    return ssps, contents, mass_text


def _living_from_mass_table(text, ssps):
    """``living(Z, weights)``: mass in living stars (column M*) of the unimodal 1.30 IMF."""
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("UN")]
    tab = np.array([[float(v) for v in r[1:8]] for r in rows if abs(float(r[1]) - 1.3) < 1e-3])
    zh_tab, age_tab, mstar = tab[:, 1], tab[:, 2], tab[:, 5]

    def living(z, weights):
        zh = np.log10(z / 0.02)
        zsel = np.unique(zh_tab)[np.argmin(np.abs(np.unique(zh_tab) - zh))]
        ages = np.sort([s[0] for s in ssps if s[1] == z]) / 1e9
        sel = zh_tab == zsel
        live = np.interp(np.log10(ages), np.log10(age_tab[sel]), mstar[sel])
        return weights @ live

    return living


@functools.lru_cache(maxsize=2)
def _build(sdist):
    from .build_external import _file_digest, _finish, _provenance, build_library

    bc03 = TemplateLibrary.load()
    ssps, contents, mass_text = _read_sdist(sdist)
    meta = _provenance(HELDOUT_LIBRARY, sdist, _file_digest(contents), len(contents),
                       srcpkg=f"ppxf=={PPXF_VERSION}",
                       extra=[("MODELS", ("E-MILES", "Vazdekis et al. (2016), Padova00")),
                              ("STELLIB", ("MILES", "MILES in 3540-7410 A")),
                              ("IMF", ("Kroupa-like", "unimodal, slope 1.30")),
                              ("STELFILE", ("miles_models/Eun1.30*.fits", "SSP files")),
                              ("NORMSRC", "files: L_sun/A per Msun formed"),
                              ("LIVSRC", ("MILES mass table (M*)", "Vazdekis2012 Padova00 masses")),
                              ("HELDOUT", (True, "evaluation only; never train on it"))])
    lib = build_library(ssps, bc03, fwhm=EMILES_FWHM, vacuum=False,
                        living=_living_from_mass_table(mass_text, ssps), meta=meta)
    _finish(lib, bc03)
    for name in ("flux", "sed_flux", "living_fraction", "nebular_sed", "nebular_lines"):
        getattr(lib, name).flags.writeable = False
    return lib


def load_heldout_library(cache_dir=None, *, timeout=900):
    """
    The held-out E-MILES library on the grid of the BC03 one (evaluation only).

    The ``ppxf`` source distribution (~25 MB) is fetched once with
    ``python -m pip download --no-deps --no-binary :all: ppxf==8.2.6`` into
    ``cache_dir``; the library is then built in memory (a few seconds) and
    cached for the session. Treat its arrays as read-only.

    Parameters
    ----------
    cache_dir : str or `~pathlib.Path`, optional
        Folder for the sdist; default ``$CUBESFH_CACHE/sources`` or
        ``~/.cache/cubesfh/sources``.
    timeout : float, optional
        Seconds allowed for the download.

    Returns
    -------
    library : `~cubesfh.templates.TemplateLibrary`
        Six metallicities ([Z/H] = -1.71 to +0.22), the 37 sub-intervals,
        FWHM 2.51 A; ``meta["HELDOUT"]`` is True.

    Raises
    ------
    CubeSFHError
        If pip cannot download the sdist or it lacks the SSP files.
    """
    from ..utils._fetch import pip_download

    cache = Path(cache_dir) if cache_dir is not None else _default_cache()
    sdist = pip_download("ppxf", PPXF_VERSION, "ppxf-*.tar.gz", cache, binary=False,
                         timeout=timeout)
    return _build(Path(sdist).resolve())
