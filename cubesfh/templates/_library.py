# Licensed under a 3-clause BSD style license - see LICENSE
"""The SSP template library (BC03 + MILES, Chabrier IMF) shipped with cubesfh."""

import functools
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from ..conventions import AGE_BIN_CENTERS, N_AGE_BINS, Z_SUN
from ..utils.exceptions import CubeSFHError

__all__ = ["DEFAULT_LIBRARY_PATH", "TRAINING_LIBRARIES", "TemplateLibrary", "load_library"]

_DATA_DIR = Path(__file__).parent / "data"
DEFAULT_LIBRARY_PATH = _DATA_DIR / "ssp_bc03_miles_chabrier.fits"

#: Template libraries shipped for training, name -> file in ``cubesfh/templates/data``;
#: the default BC03 library comes first. The extra ones are built by
#: :mod:`cubesfh.templates.build_external`. The held-out evaluation library is not
#: here: see :func:`cubesfh.templates.load_heldout_library`.
TRAINING_LIBRARIES = {
    "bc03": DEFAULT_LIBRARY_PATH.name,
    "m11_miles": "ssp_m11_miles.fits",
    "mastar": "ssp_mastar.fits",
}

#: Unit of the template fluxes: luminosity density per solar mass formed.
FLUX_UNIT = u.solLum / u.AA / u.solMass


class TemplateLibrary:
    """
    Stellar population templates used by every stage of cubesfh.

    One library serves the stellar kinematics, the synthetic training set, the
    mock observations and the pPXF baseline, so that the CNN and the baseline
    see exactly the same stellar populations. Each template is the spectrum of a
    constant star formation rate over a short sub-interval of one of the 16 age
    bins (:data:`cubesfh.conventions.AGE_BIN_EDGES`), per solar mass formed, at
    one of six metallicities. A star formation history that is constant inside
    each sub-interval is therefore an exact linear combination of templates.

    Use :meth:`load` rather than the constructor.

    Attributes
    ----------
    wavelength : `~astropy.units.Quantity`
        Rest-frame air wavelengths of the optical spectra, 4600-7300 A in
        uniform 0.9 A steps.
    flux : `~numpy.ndarray`
        Optical spectra, shape ``(n_metallicity, n_age, n_wavelength)``, in
        :attr:`flux_unit`.
    sed_wavelength : `~astropy.units.Quantity`
        Centres of the 10 A pixels of the low-resolution spectra, 1205-10995 A.
    sed_flux : `~numpy.ndarray`
        Pixel-mean spectra for synthetic photometry, shape
        ``(n_metallicity, n_age, n_sed)``.
    fwhm : `~astropy.units.Quantity`
        Spectral resolution of :attr:`flux` (constant FWHM).
    ages : `~astropy.units.Quantity`
        Representative age of each sub-interval (geometric mean of its edges;
        half the upper edge for the first one).
    age_edges : `~astropy.units.Quantity`
        Sub-interval edges, ``n_age + 1`` values.
    age_bin : `~numpy.ndarray`
        Index (0-15) of the age bin that contains each sub-interval.
    metallicity : `~numpy.ndarray`
        Metal mass fractions Z.
    living_fraction : `~numpy.ndarray`
        Fraction of the formed mass that is in living stars, shape
        ``(n_metallicity, n_age)``.
    nebular_sed : `~numpy.ndarray`
        Nebular continuum (Cloudy) of the youngest sub-intervals on the SED grid,
        shape ``(n_metallicity, n_nebular, n_sed)``; older sub-intervals emit none.
    nebular_lines : `~numpy.ndarray`
        Nebular line luminosities per solar mass formed (L_sun / M_sun), shape
        ``(n_metallicity, n_nebular, n_lines)``.
    line_wavelength : `~astropy.units.Quantity`
        Wavelengths of the nebular lines.
    line_names : list of str
        Cloudy names of the nebular lines.
    meta : `~astropy.io.fits.Header`
        Provenance (primary header of the library file).
    """

    flux_unit = FLUX_UNIT

    def __init__(self, *, wavelength, flux, sed_wavelength, sed_flux, fwhm, age_edges, ages,
                 age_bin, metallicity, living_fraction, nebular_sed, nebular_lines,
                 line_wavelength, line_names, meta=None, filename=None):
        self.wavelength = wavelength
        self.flux = flux
        self.sed_wavelength = sed_wavelength
        self.sed_flux = sed_flux
        self.fwhm = fwhm
        self.age_edges = age_edges
        self.ages = ages
        self.age_bin = age_bin
        self.metallicity = metallicity
        self.living_fraction = living_fraction
        self.nebular_sed = nebular_sed
        self.nebular_lines = nebular_lines
        self.line_wavelength = line_wavelength
        self.line_names = line_names
        self.meta = meta if meta is not None else fits.Header()
        self.filename = filename

    def __repr__(self):
        return (f"<TemplateLibrary {self.meta.get('MODELS', '?')}/{self.meta.get('STELLIB', '?')} "
                f"{self.meta.get('IMF', '?')}: {self.n_metallicity} metallicities x "
                f"{self.n_age} ages, {self.wavelength.size} px "
                f"{self.wavelength[0].value:.0f}-{self.wavelength[-1].value:.0f} A>")

    @classmethod
    def load(cls, path=None):
        """
        Read a template library file (by default the one shipped with cubesfh).

        The default library is read once and cached; treat its arrays as
        read-only.

        Parameters
        ----------
        path : str or `~pathlib.Path`, optional
            A file written by :mod:`cubesfh.templates.build`.

        Returns
        -------
        library : `TemplateLibrary`
        """
        if path is None:
            return _load_default()
        return _read(Path(path))

    @property
    def n_age(self):
        """Number of age sub-intervals."""
        return self.ages.size

    @property
    def n_metallicity(self):
        """Number of metallicities."""
        return self.metallicity.size

    @property
    def zh(self):
        """Total metallicity [Z/H] = log10(Z / Z_sun) of each metallicity."""
        return np.log10(self.metallicity / Z_SUN)

    @property
    def n_nebular(self):
        """Number of (youngest) sub-intervals with nebular emission."""
        return self.nebular_sed.shape[1]

    @property
    def age_bin_centers(self):
        """The 16 age-bin centres (`~astropy.units.Quantity`)."""
        return AGE_BIN_CENTERS

    def bin_matrix(self):
        """
        Matrix summing the sub-intervals of each age bin, weighted by duration.

        Returns
        -------
        matrix : `~numpy.ndarray`
            Shape ``(16, n_age)``; row ``i`` holds the fraction of bin ``i``'s
            duration covered by each sub-interval (rows sum to 1).
        """
        widths = np.diff(self.age_edges.to_value(u.yr))
        m = np.zeros((N_AGE_BINS, self.n_age))
        m[self.age_bin, np.arange(self.n_age)] = widths
        return m / m.sum(axis=1, keepdims=True)

    def binned(self, *, sed=False):
        """
        Templates of a constant star formation rate over each of the 16 age bins.

        Parameters
        ----------
        sed : bool, optional
            Return the low-resolution SED templates instead of the optical ones.

        Returns
        -------
        flux : `~numpy.ndarray`
            Shape ``(n_metallicity, 16, n_wavelength)``, per solar mass formed.
        """
        flux = self.sed_flux if sed else self.flux
        return np.einsum("ba,zaw->zbw", self.bin_matrix(), flux, optimize=True)

    def binned_living_fraction(self):
        """Living-mass fraction of a constant SFR over each age bin, ``(n_metallicity, 16)``."""
        return self.living_fraction @ self.bin_matrix().T

    def zh_interpolation(self, zh):
        """
        Linear-in-[Z/H] interpolation between the library's metallicities.

        Parameters
        ----------
        zh : array-like
            [Z/H] values (any shape), clipped to the library's range.

        Returns
        -------
        j, t : `~numpy.ndarray`
            Same shape as ``zh``: each value lies a fraction ``t`` of the way
            from metallicity ``j`` to ``j + 1``.
        """
        grid = np.asarray(self.zh, float)
        zh = np.clip(np.asarray(zh, float), grid[0], grid[-1])
        j = np.clip(np.searchsorted(grid, zh, side="right") - 1, 0, grid.size - 2)
        return j, (zh - grid[j]) / (grid[j + 1] - grid[j])

    def binned_at(self, table, zh):
        """
        A per-metallicity, per-age-bin table at the [Z/H] of each age bin.

        Parameters
        ----------
        table : `~numpy.ndarray`
            ``(n_metallicity, 16)``, e.g. `binned_living_fraction`.
        zh : array-like
            ``(n, 16)`` [Z/H] of each age bin.

        Returns
        -------
        values : `~numpy.ndarray`
            ``(n, 16)``, interpolated linearly in [Z/H] (`zh_interpolation`).
        """
        j, t = self.zh_interpolation(zh)
        cols = np.arange(np.shape(table)[1])[None, :]
        return (1 - t) * table[j, cols] + t * table[j + 1, cols]

    @property
    def remnant_fraction(self):
        """
        Fraction of the formed mass in stellar remnants, ``(n_metallicity, n_age)``.

        Derived from :attr:`living_fraction` with the Chabrier IMF and the
        initial-final mass relation of Renzini & Ciotti (1993)
        (``cubesfh.templates._remnants``); living + remnants is the
        present-day stellar mass per unit mass formed.
        """
        from ._remnants import remnant_fraction

        return remnant_fraction(self.living_fraction)

    def binned_remnant_fraction(self):
        """Remnant-mass fraction of a constant SFR over each age bin, ``(n_metallicity, 16)``."""
        return self.remnant_fraction @ self.bin_matrix().T

    def binned_v_light(self):
        """
        Dust-free light in the V window per unit mass formed, ``(n_metallicity, 16)``.

        Mean L_lambda in 5450-5550 A (L_sun / A per solar mass formed) of a
        constant SFR over each age bin, at the template resolution.
        """
        w = self.wavelength.to_value(u.AA)
        v = (w >= 5450.0) & (w <= 5550.0)
        return self.flux[:, :, v].mean(axis=2) @ self.bin_matrix().T


def _read(path):
    if not path.exists():
        msg = (f"Template library {path} not found. Rebuild it with "
               "'python -m cubesfh.templates.build' or reinstall cubesfh.")
        raise FileNotFoundError(msg)
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            # a truncated file makes astropy warn before failing; we raise our own error
            warnings.simplefilter("ignore", AstropyUserWarning)
            hdul = fits.open(fh)
            hdul.readall()
            bad = [h.name for h in hdul if h.verify_datasum() != 1 or h.verify_checksum() != 1]
            if bad:
                msg = (f"{path} failed its FITS checksum in {', '.join(bad)}: the file is "
                       "corrupted or was modified. Reinstall cubesfh or rebuild it with "
                       "'python -m cubesfh.templates.build'.")
                raise CubeSFHError(msg)
            prim = hdul[0].header.copy()
            opt = hdul["FLUX_OPT"]
            sed = hdul["FLUX_SED"]
            n_opt = opt.header["NAXIS1"]
            wave = opt.header["CRVAL1"] + opt.header["CDELT1"] * np.arange(n_opt)
            n_sed = sed.header["NAXIS1"]
            sed_wave = sed.header["CRVAL1"] + sed.header["CDELT1"] * np.arange(n_sed)
            ages = hdul["AGES"].data
            edges = np.append(ages["AGE_LO"], ages["AGE_HI"][-1])
            zt = hdul["METALLICITY"].data
            lines = hdul["LINES"].data
            return TemplateLibrary(
                wavelength=wave * u.AA,
                flux=np.array(opt.data, dtype=np.float32),
                sed_wavelength=sed_wave * u.AA,
                sed_flux=np.array(sed.data, dtype=np.float32),
                fwhm=prim["FWHM"] * u.AA,
                age_edges=edges * u.yr,
                ages=np.array(ages["AGE"], dtype=float) * u.yr,
                age_bin=np.array(ages["AGE_BIN"], dtype=int),
                metallicity=np.array(zt["Z"], dtype=float),
                living_fraction=np.array(hdul["LIVING"].data, dtype=float),
                nebular_sed=np.array(hdul["NEB_SED"].data, dtype=np.float32),
                nebular_lines=np.array(hdul["NEB_LINES"].data, dtype=float),
                line_wavelength=np.array(lines["WAVELENGTH"], dtype=float) * u.AA,
                line_names=[str(s).strip() for s in lines["NAME"]],
                meta=prim,
                filename=str(path),
            )
    except CubeSFHError:
        raise
    except (KeyError, IndexError, OSError, ValueError, TypeError) as exc:
        msg = (f"{path} is not a valid cubesfh template library ({exc}). Rebuild it with "
               "'python -m cubesfh.templates.build'.")
        raise CubeSFHError(msg) from exc


def load_library(name="bc03"):
    """
    One of the shipped training template libraries, read once and cached.

    Parameters
    ----------
    name : str, optional
        A key of :data:`TRAINING_LIBRARIES` (``"bc03"``, ``"m11_miles"``,
        ``"mastar"``).

    Returns
    -------
    library : `TemplateLibrary`
        Treat its arrays as read-only (they are shared by all callers).

    Raises
    ------
    CubeSFHError
        If ``name`` is not a shipped library.
    """
    if name not in TRAINING_LIBRARIES:
        msg = (f"Unknown template library {name!r}; choose one of "
               f"{', '.join(TRAINING_LIBRARIES)} (the held-out E-MILES library is loaded "
               "with cubesfh.templates.load_heldout_library).")
        raise CubeSFHError(msg)
    if name == "bc03":
        return _load_default()
    return _load_cached(_DATA_DIR / TRAINING_LIBRARIES[name])


def _freeze(lib):
    for name in ("flux", "sed_flux", "living_fraction", "nebular_sed", "nebular_lines"):
        getattr(lib, name).flags.writeable = False
    return lib


@functools.lru_cache(maxsize=1)
def _load_default():
    return _freeze(_read(DEFAULT_LIBRARY_PATH))


@functools.lru_cache(maxsize=8)
def _load_cached(path):
    return _freeze(_read(path))
