# Licensed under a 3-clause BSD style license - see LICENSE
"""HST throughput curves and synthetic photometry."""

import functools
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits

from ..conventions import HST_BANDS
from ..utils.exceptions import CubeSFHError

__all__ = ["FilterCurve", "load_filter", "load_filters", "synthetic_photometry"]

FILTER_PATH = Path(__file__).parent / "data" / "hst_filters.fits"

_INSTRUMENTS = {"WFC3/UVIS": "WFC3_UVIS", "WFPC2": "WFPC2"}


class FilterCurve:
    """
    Total-system throughput of one HST band (photon-counting detector).

    Parameters
    ----------
    band : str
        Filter name, e.g. ``'F555W'``.
    instrument : str
        ``'WFC3/UVIS'`` or ``'WFPC2'``.
    wavelength : `~astropy.units.Quantity`
        Wavelengths of the throughput samples.
    throughput : `~numpy.ndarray`
        Dimensionless total-system throughput.
    source : str, optional
        Provenance.
    """

    def __init__(self, band, instrument, wavelength, throughput, *, source=""):
        self.band = band
        self.instrument = instrument
        self.wavelength = wavelength.to(u.AA)
        self.throughput = np.asarray(throughput, dtype=float)
        self.source = source

    def __repr__(self):
        return f"<FilterCurve {self.instrument} {self.band}, pivot {self.pivot:.1f}>"

    @property
    def pivot(self):
        """Pivot wavelength, sqrt(int T lambda dl / int T / lambda dl) (as PHOTPLAM)."""
        w = self.wavelength.to_value(u.AA)
        t = self.throughput
        return np.sqrt(np.trapezoid(t * w, w) / np.trapezoid(t / w, w)) * u.AA

    def mean_flux_density(self, wavelength, flux):
        """
        Photon-weighted mean f_lambda through this band (the PHOTFLAM convention).

        ``<f> = int f T lambda dl / int T lambda dl``: for a calibrated HST image,
        count rate x PHOTFLAM equals this quantity.

        Parameters
        ----------
        wavelength : `~astropy.units.Quantity`
            Wavelengths of ``flux`` (increasing), covering the band.
        flux : `~numpy.ndarray` or `~astropy.units.Quantity`
            f_lambda, shape ``(..., n_wavelength)``.

        Returns
        -------
        mean : `~numpy.ndarray` or `~astropy.units.Quantity`
            Shape ``flux.shape[:-1]``, same unit as ``flux``.
        """
        self.check_coverage(wavelength)
        return flux @ self.weights(wavelength)

    def check_coverage(self, wavelength):
        """Raise `~cubesfh.CubeSFHError` if ``wavelength`` misses part of the band."""
        w = wavelength.to_value(u.AA)
        fw = self.wavelength.to_value(u.AA)[self.throughput > 1e-3 * self.throughput.max()]
        if w[0] > fw[0] or w[-1] < fw[-1]:
            msg = (f"The spectrum ({w[0]:.0f}-{w[-1]:.0f} A) does not cover the {self.band} "
                   f"band ({fw[0]:.0f}-{fw[-1]:.0f} A); extend its wavelength range.")
            raise CubeSFHError(msg)

    def weights(self, wavelength):
        """
        Weights ``w`` with ``flux @ w`` the mean f_lambda through the band.

        Parameters
        ----------
        wavelength : `~astropy.units.Quantity`
            Pixel centres of the spectra (increasing).

        Returns
        -------
        w : `~numpy.ndarray`
        """
        w = wavelength.to_value(u.AA)
        t = np.interp(w, self.wavelength.to_value(u.AA), self.throughput, left=0.0, right=0.0)
        dl = np.gradient(w)
        k = t * w * dl
        return k / k.sum()


@functools.cache
def load_filter(band, instrument="WFC3/UVIS"):
    """
    Return the shipped throughput curve of ``band``.

    Parameters
    ----------
    band : str
        One of ``F275W, F336W, F438W, F555W, F814W`` (WFC3/UVIS) or ``F814W`` (WFPC2).
    instrument : str, optional
        ``'WFC3/UVIS'`` (default) or ``'WFPC2'``.

    Returns
    -------
    curve : `FilterCurve`
    """
    key = _INSTRUMENTS.get(instrument.upper())
    if key is None:
        msg = (f"No throughput curves for instrument {instrument!r}; "
               f"available: {', '.join(_INSTRUMENTS)}.")
        raise CubeSFHError(msg)
    name = f"{key}_{band.upper()}"
    with fits.open(FILTER_PATH) as hdul:
        if name not in hdul:
            have = [h.name for h in hdul[1:]]
            msg = f"No throughput curve for {instrument} {band}; available: {', '.join(have)}."
            raise CubeSFHError(msg)
        d = hdul[name].data
        return FilterCurve(band.upper(), instrument.upper(),
                           np.array(d["WAVELENGTH"], dtype=float) * u.AA,
                           np.array(d["THROUGHPUT"], dtype=float),
                           source=hdul[name].header.get("SOURCE", ""))


def load_filters(bands=HST_BANDS, instrument="WFC3/UVIS"):
    """Return a list of `FilterCurve` for ``bands`` (default: the five PHANGS-HST bands)."""
    return [load_filter(b, instrument) for b in bands]


def synthetic_photometry(wavelength, flux, *, bands=HST_BANDS, instrument="WFC3/UVIS"):
    """
    Mean f_lambda of spectra through HST bands, as PHOTFLAM x count rate would give.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Wavelengths of ``flux``, covering the bands.
    flux : `~numpy.ndarray` or `~astropy.units.Quantity`
        f_lambda, shape ``(..., n_wavelength)``.
    bands : sequence of str, optional
        Band names (default: the five PHANGS-HST bands).
    instrument : str, optional
        ``'WFC3/UVIS'`` or ``'WFPC2'``.

    Returns
    -------
    phot : `~numpy.ndarray` or `~astropy.units.Quantity`
        Shape ``flux.shape[:-1] + (len(bands),)``, same unit as ``flux``.

    Examples
    --------
    A flat f_lambda spectrum has that f_lambda in every band:

    >>> import numpy as np
    >>> from astropy import units as u
    >>> from cubesfh.templates import synthetic_photometry
    >>> wave = np.arange(1500., 11000., 2.) * u.AA
    >>> flat = np.full(wave.size, 3.0) * u.erg / u.s / u.cm**2 / u.AA
    >>> synthetic_photometry(wave, flat).round(6)  # doctest: +FLOAT_CMP
    <Quantity [3., 3., 3., 3., 3.] erg / (Angstrom s cm2)>
    """
    curves = load_filters(bands, instrument)
    for c in curves:
        c.check_coverage(wavelength)
    w = np.stack([c.weights(wavelength) for c in curves], axis=-1)
    return flux @ w
