# Licensed under a 3-clause BSD style license - see LICENSE
"""
Adaptive spatial binning of a MUSE cube to a target signal-to-noise ratio.

The spaxels of a `~cubesfh.Cube` are grouped with the Voronoi binning method of
Cappellari & Copin (2003, MNRAS 342, 345; package ``vorbin``) or, if installed,
with PowerBin (Cappellari 2025, MNRAS 544, 1432; package ``powerbin``), so that
every bin reaches (approximately) the same S/N in a wavelength window, by
default 35 per Angstrom in 5300-5500 A. The spectra of the spaxels in each bin
are then averaged, reading the cube in blocks of rows so that it is never held
in memory as a whole.

**Noise model.** The S/N of a bin of :math:`N` spaxels is computed from the per-spaxel signal
:math:`S_i` and noise :math:`\\sigma_i` maps of the cube as

.. math::

    (S/N)_{\\rm bin} = \\frac{\\sum_i S_i}{\\sqrt{\\sum_i \\sigma_i^2}}
                      \\,\\frac{1}{\\beta(N)},

i.e. the noise of different spaxels is assumed to add in quadrature
(independent spaxels). The resampling of the MUSE pipeline correlates the noise
of neighbouring spaxels, so this overestimates the S/N of large bins. An
empirical correction :math:`\\beta(N) = 1 + \\alpha \\log_{10} N` (Garcia-Benito
et al. 2015, A&A 576, A135, eq. 1, who found :math:`\\alpha = 1.07` for CALIFA)
can be switched on with ``covariance=alpha``; it is off by default
(:math:`\\beta = 1`) because :math:`\\alpha` depends on the instrument and the
data reduction and must be calibrated for the data at hand.
"""

import logging
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u

from .conventions import SNR_WINDOW
from .utils import CubeSFHError, CubeSFHWarning, progress

__all__ = ["VoronoiBins", "coadd_spectra", "region_mask", "voronoi_bin"]

log = logging.getLogger(__name__)

_METHODS = ("vorbin", "powerbin")


class VoronoiBins:
    """
    Spatial bins of a cube and the co-added spectrum of each bin.

    Usually created by `voronoi_bin`; can also be built from any bin map with
    `VoronoiBins.from_bin_map`.

    Parameters
    ----------
    bin_map : array-like of int, shape (ny, nx)
        Bin number of every spaxel, ``-1`` for spaxels not in any bin.
    wavelength : `~astropy.units.Quantity`, shape (nlam,)
        Observed wavelengths of the spectra.
    spectra : `~astropy.units.Quantity`, shape (n_bins, nlam)
        Mean spectrum per spaxel of each bin.
    variance : `~astropy.units.Quantity`, shape (n_bins, nlam), or `None`
        Variance of ``spectra`` (the variance of the mean).
    snr : array-like, shape (n_bins,), optional
        Signal-to-noise ratio reached by each bin.
    celestial_wcs : `~astropy.wcs.WCS`, optional
        Celestial WCS of ``bin_map``.
    target_snr : float, optional
        Target S/N that the binning aimed at.
    window : `~astropy.units.Quantity`, optional
        Wavelength window in which the S/N was measured.
    n_contributing : `~numpy.ndarray`, shape (n_bins, nlam), optional
        Number of spaxels with valid data at each wavelength of each bin.

    Attributes
    ----------
    n_bins : int
        Number of bins.
    n_spaxels : `~numpy.ndarray` of int, shape (n_bins,)
        Number of spaxels in each bin.
    x, y : `~numpy.ndarray`, shape (n_bins,)
        Unweighted centroid of each bin in zero-based pixel coordinates
        (``x`` along the columns, ``y`` along the rows of ``bin_map``).
    unit : `~astropy.units.Unit`
        Unit of ``spectra``.
    """

    def __init__(self, bin_map, wavelength, spectra, variance=None, *, snr=None,
                 celestial_wcs=None, target_snr=None, window=None, n_contributing=None):
        bin_map = np.asarray(bin_map)
        if bin_map.ndim != 2 or not np.issubdtype(bin_map.dtype, np.integer):
            msg = ("bin_map must be a 2-D integer array (bin number per spaxel, -1 for "
                   f"spaxels outside all bins); got dtype {bin_map.dtype} and shape "
                   f"{bin_map.shape}.")
            raise CubeSFHError(msg)
        self.bin_map = bin_map
        self.n_bins = int(bin_map.max()) + 1 if bin_map.size else 0
        self.wavelength = u.Quantity(wavelength, u.AA)
        self.spectra = u.Quantity(spectra)
        if self.spectra.shape != (self.n_bins, self.wavelength.size):
            msg = (f"spectra has shape {self.spectra.shape}; expected (n_bins, nlam) = "
                   f"({self.n_bins}, {self.wavelength.size}).")
            raise CubeSFHError(msg)
        self.variance = None if variance is None else u.Quantity(variance)
        self.snr = None if snr is None else np.asarray(snr, dtype=float)
        self.celestial_wcs = celestial_wcs
        self.target_snr = target_snr
        self.window = window
        self.n_contributing = n_contributing

        labels = bin_map.ravel()
        inside = labels >= 0
        yy, xx = np.indices(bin_map.shape)
        self.n_spaxels = np.bincount(labels[inside], minlength=self.n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.x = np.bincount(labels[inside], weights=xx.ravel()[inside],
                                 minlength=self.n_bins) / self.n_spaxels
            self.y = np.bincount(labels[inside], weights=yy.ravel()[inside],
                                 minlength=self.n_bins) / self.n_spaxels

    @classmethod
    def from_bin_map(cls, cube, bin_map, *, max_memory=None, progress_bar=True, **kwargs):
        """
        Co-add the spectra of ``cube`` in the bins of an existing ``bin_map``.

        Parameters
        ----------
        cube : `~cubesfh.Cube`
            The data cube.
        bin_map : array-like of int, shape ``cube.spatial_shape``
            Bin number per spaxel, ``-1`` for excluded spaxels.
        max_memory : `~astropy.units.Quantity` or int, optional
            Memory budget, passed to ``cube.iter_chunks``.
        progress_bar : bool, optional
            Show a progress bar while co-adding.
        **kwargs
            Other attributes passed to `VoronoiBins` (``snr``, ``target_snr``...).

        Returns
        -------
        bins : `VoronoiBins`
        """
        spectra, variance, count = coadd_spectra(cube, bin_map, max_memory=max_memory,
                                                 progress_bar=progress_bar,
                                                 return_count=True)
        kwargs.setdefault("celestial_wcs", getattr(cube, "celestial_wcs", None))
        return cls(np.asarray(bin_map), cube.wavelength, spectra, variance,
                   n_contributing=count, **kwargs)

    @property
    def unit(self):
        return self.spectra.unit

    def __len__(self):
        return self.n_bins

    def __repr__(self):
        snr = ""
        if self.snr is not None and self.n_bins:
            snr = f", median S/N={np.nanmedian(self.snr):.1f}"
        return (f"<VoronoiBins: {self.n_bins} bins over {int(self.n_spaxels.sum())} spaxels"
                f" of a {self.bin_map.shape[0]}x{self.bin_map.shape[1]} map{snr}>")

    def to_map(self, values, *, fill_value=np.nan):
        """
        Paint one value per bin onto the spaxel grid.

        Parameters
        ----------
        values : array-like or `~astropy.units.Quantity`, shape (n_bins,)
            One value per bin (e.g. a velocity or an age).
        fill_value : float, optional
            Value of spaxels outside all bins.

        Returns
        -------
        image : `~numpy.ndarray` or `~astropy.units.Quantity`, shape (ny, nx)
        """
        unit = getattr(values, "unit", None)
        values = np.asarray(getattr(values, "value", values))
        if values.shape[:1] != (self.n_bins,):
            msg = (f"values has shape {values.shape}; give one value per bin "
                   f"(first axis of length {self.n_bins}).")
            raise CubeSFHError(msg)
        dtype = np.result_type(values.dtype, np.asarray(fill_value).dtype)
        image = np.full(self.bin_map.shape + values.shape[1:], fill_value, dtype=dtype)
        inside = self.bin_map >= 0
        image[inside] = values[self.bin_map[inside]]
        return image if unit is None else image * unit


def _bin_snr(index, signal, noise, alpha):
    """S/N of the spaxels ``index`` (additive noise, optional covariance correction)."""
    sn = np.sum(signal[index]) / np.sqrt(np.sum(noise[index] ** 2))
    if alpha:
        sn /= 1.0 + alpha * np.log10(np.size(index))
    return sn


def _strip(quantity, unit=None):
    if isinstance(quantity, u.Quantity):
        return quantity.value if unit is None else quantity.to_value(unit)
    return np.asarray(quantity)


def _read_region_file(path):
    from regions import Regions

    path = Path(path)
    if not path.is_file():
        msg = (f"Region file {str(path)!r} does not exist; check the path given in "
               "regions=.")
        raise CubeSFHError(msg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            regions = Regions.read(str(path), format="ds9")
        except Exception as exc:
            msg = (f"Could not parse the region file {str(path)!r} as a DS9 region file "
                   f"({exc}). Save the regions from DS9 with Region > Save, format 'ds9' "
                   "and coordinate system 'fk5' or 'image'.")
            raise CubeSFHError(msg) from exc
    problems = [str(w.message) for w in caught]
    if problems:
        msg = (f"The region file {str(path)!r} is malformed: " + "; ".join(problems)
               + ". Fix or remove these lines, or save the regions again from DS9 with "
               "Region > Save, format 'ds9' and coordinate system 'fk5' or 'image'.")
        raise CubeSFHError(msg)
    if len(regions) == 0:
        msg = (f"The region file {str(path)!r} contains no regions; draw the regions to "
               "exclude (e.g. circles on foreground stars) and save them again.")
        raise CubeSFHError(msg)
    return list(regions)


def region_mask(regions, shape, celestial_wcs=None):
    """
    Boolean mask of the spaxels whose centres fall inside any of ``regions``.

    Parameters
    ----------
    regions : str, `~pathlib.Path`, `~regions.Region`, `~regions.Regions` or list
        A DS9 region file, one region, or a list of files and regions, in sky
        or pixel coordinates. Every area region counts as an exclusion,
        whatever its DS9 include/exclude flag. Regions without an area
        (points, text, lines) are ignored with a warning.
    shape : tuple of int
        ``(ny, nx)`` of the spaxel grid.
    celestial_wcs : `~astropy.wcs.WCS`, optional
        Celestial WCS of the grid; needed for sky regions.

    Returns
    -------
    mask : `~numpy.ndarray` of bool, shape ``shape``
        `True` inside the regions.

    Raises
    ------
    CubeSFHError
        If a file does not exist or is malformed, or sky regions are given
        without a WCS.
    """
    from regions import PixCoord, PixelRegion, Region, Regions, SkyRegion

    if isinstance(regions, (str, Path, Region)):
        regions = [regions]
    flat = []
    for item in regions:
        if isinstance(item, (str, Path)):
            flat.extend(_read_region_file(item))
        elif isinstance(item, Regions):
            flat.extend(item)
        elif isinstance(item, Region):
            flat.append(item)
        else:
            msg = (f"Cannot use {item!r} as a region; give DS9 region file names or "
                   "regions.Region objects.")
            raise CubeSFHError(msg)

    ny, nx = shape
    yy, xx = np.indices(shape)
    pixels = PixCoord(xx.ravel(), yy.ravel())
    mask = np.zeros(ny * nx, dtype=bool)
    ignored = []
    outside = []
    for region in flat:
        if isinstance(region, SkyRegion):
            if celestial_wcs is None:
                msg = (f"The sky region {region!r} needs the celestial WCS of the cube to be "
                       "converted to pixels; pass celestial_wcs= or use pixel regions.")
                raise CubeSFHError(msg)
            region = region.to_pixel(celestial_wcs)
        area = getattr(region, "area", 0) if isinstance(region, PixelRegion) else 0
        if not np.isfinite(area):
            # e.g. a sky region on the far side of the projection: no spaxel inside
            log.info("Region %r does not project onto the cube; it excludes nothing.", region)
            continue
        if not area > 0:
            ignored.append(type(region).__name__)
            continue
        try:
            inside = region.contains(pixels)
        except (NotImplementedError, AttributeError, TypeError):
            ignored.append(type(region).__name__)
            continue
        inside = np.asarray(inside, dtype=bool).ravel()
        if not inside.any():
            outside.append(region)
        mask |= inside
    if outside:
        msg = (f"{len(outside)} region(s) lie outside the cube and exclude nothing "
               f"(first: {outside[0]!r}); check their coordinates and frame.")
        warnings.warn(msg, CubeSFHWarning)
    if ignored:
        kinds = ", ".join(sorted(set(ignored)))
        msg = (f"Ignored {len(ignored)} region(s) without an area ({kinds}); "
               "only area regions (circle, ellipse, box, polygon...) exclude spaxels.")
        warnings.warn(msg, CubeSFHWarning)
    return mask.reshape(shape)


def coadd_spectra(cube, bin_map, *, max_memory=None, progress_bar=True, return_count=False):
    """
    Mean spectrum per spaxel of every bin, reading the cube in blocks of rows.

    At each wavelength the mean is taken over the spaxels of the bin with
    valid data there (finite flux and variance, not masked); the variance of
    the mean is :math:`\\sum_i \\sigma_i^2 / n^2` for the :math:`n` valid spaxels,
    which assumes independent spaxels. Wavelengths where no spaxel of a bin is
    valid are NaN.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
        The data cube, read chunk by chunk with ``cube.iter_chunks``.
    bin_map : array-like of int, shape ``cube.spatial_shape``
        Bin number per spaxel (0 ... n_bins - 1), ``-1`` for excluded spaxels.
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory budget, passed to ``cube.iter_chunks(max_memory=...)``; the
        cube's own ``max_memory`` when `None`.
    progress_bar : bool, optional
        Show a progress bar over the chunks.
    return_count : bool, optional
        Also return the number of valid spaxels per bin and wavelength.

    Returns
    -------
    spectra : `~astropy.units.Quantity`, shape (n_bins, nlam)
        Mean spectrum per spaxel, in the unit of the cube.
    variance : `~astropy.units.Quantity` or `None`, shape (n_bins, nlam)
        Variance of the mean, in the unit of the cube squared; `None` when the
        cube has no variance.
    count : `~numpy.ndarray` of int, shape (n_bins, nlam)
        Only if ``return_count``.
    """
    from scipy import sparse

    bin_map = np.asarray(bin_map)
    shape = tuple(cube.spatial_shape)
    if bin_map.shape != shape or not np.issubdtype(bin_map.dtype, np.integer):
        msg = (f"bin_map must be an integer array of the cube's spatial shape {shape}; "
               f"got dtype {bin_map.dtype} and shape {bin_map.shape}.")
        raise CubeSFHError(msg)
    n_bins = int(bin_map.max()) + 1
    if n_bins <= 0:
        msg = "bin_map contains no bin (all values are -1); nothing to co-add."
        raise CubeSFHError(msg)
    unit = u.Unit(cube.unit)
    nlam = cube.wavelength.size

    total = np.zeros((n_bins, nlam))
    count = np.zeros((n_bins, nlam))
    total_var = None
    kwargs = {} if max_memory is None else {"max_memory": max_memory}
    chunks = cube.iter_chunks(**kwargs)
    for rows, data, var, mask in progress(chunks, enabled=progress_bar,
                                          desc="Co-adding spectra", unit="chunk"):
        labels = bin_map[rows].ravel()
        use = np.flatnonzero(labels >= 0)
        if use.size == 0:
            continue
        members = sparse.csr_matrix((np.ones(use.size), (labels[use], np.arange(use.size))),
                                    shape=(n_bins, use.size))
        data = _strip(data, unit).reshape(nlam, -1)
        var = None if var is None else _strip(var, unit**2).reshape(nlam, -1)
        mask = None if mask is None else np.asarray(mask).reshape(nlam, -1)
        if var is not None and total_var is None:
            total_var = np.zeros((n_bins, nlam))
        # iter_chunks leaves about two block-sized arrays of max_memory for the caller's
        # temporaries: work through the block in wavelength slabs so that the float64
        # copies (~40 bytes per binned pixel) stay within the size of flux + variance.
        budget = data.nbytes + (0 if var is None else var.nbytes)
        step = max(1, int(budget // (40 * use.size)))
        for l0 in range(0, nlam, step):
            lam = slice(l0, min(nlam, l0 + step))
            flux = data[lam][:, use].T.astype(float)  # (n_use, n_lam_slab)
            good = np.isfinite(flux)
            if mask is not None:
                good &= ~mask[lam][:, use].T
            v = None
            if var is not None:
                v = var[lam][:, use].T.astype(float)
                good &= np.isfinite(v)
                v[~good] = 0.0
                total_var[:, lam] += members @ v
            flux[~good] = 0.0
            total[:, lam] += members @ flux
            count[:, lam] += members @ good.astype(float)
            del flux, good, v  # free the temporaries before the next block is read

    # Turn the sums into means in place: the outputs are as large as the spectra.
    empty = count == 0
    count[empty] = 1.0
    total /= count
    total[empty] = np.nan
    spectra = u.Quantity(total, unit, copy=False)
    variance = None
    if total_var is not None:
        total_var /= count**2
        total_var[empty] = np.nan
        variance = u.Quantity(total_var, unit**2, copy=False)
    count[empty] = 0.0
    count = count.astype(np.int32)
    if return_count:
        return spectra, variance, count
    return spectra, variance


def _run_vorbin(x, y, signal, noise, target_snr, alpha):
    from vorbin.voronoi_2d_binning import voronoi_2d_binning

    def sn_func(index, signal, noise):
        return _bin_snr(index, signal, noise, alpha)

    bin_number, *_ = voronoi_2d_binning(x, y, signal, noise, target_snr, pixelsize=1,
                                        plot=False, quiet=True, sn_func=sn_func)
    return np.asarray(bin_number, dtype=int)


def _run_powerbin(x, y, signal, noise, target_snr, alpha):
    try:
        from powerbin import PowerBin
    except ImportError as exc:
        msg = ("method='powerbin' needs the optional package powerbin (pip install powerbin); "
               "install it or use method='vorbin'.")
        raise CubeSFHError(msg) from exc

    def capacity(index):
        return _bin_snr(np.asarray(index), signal, noise, alpha) ** 2

    result = PowerBin(np.column_stack([x, y]), capacity, float(target_snr) ** 2,
                      pixelsize=1.0, verbose=0)
    return np.asarray(result.bin_num, dtype=int)


def voronoi_bin(cube, *, target_snr=35.0, window=SNR_WINDOW, per="angstrom", min_snr=1.0,
                regions=None, mask=None, covariance=None, method="vorbin", max_memory=None,
                progress_bar=True):
    """
    Bin the spaxels of ``cube`` to a target S/N and co-add their spectra.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
        The data cube.
    target_snr : float, optional
        S/N that every bin should reach, in the convention of
        ``cube.signal_noise`` (per Angstrom in ``window``).
    window : `~astropy.units.Quantity`, optional
        ``(lo, hi)`` wavelength window in which signal and noise are measured.
    per : {'angstrom', 'pixel'}, optional
        S/N per Angstrom (default) or per spectral pixel; see
        `~cubesfh.Cube.signal_noise`.
    min_snr : float or `None`, optional
        Spaxels with an S/N below this are left out of all bins (they carry
        mostly noise and would only add to it; Cappellari & Copin 2003,
        section 2.1). `None` keeps every spaxel with a positive, finite noise.
    regions : str, `~pathlib.Path`, `~regions.Region`, or list of them, optional
        DS9 region file(s) or region objects (sky or pixel) to exclude, e.g.
        foreground stars; see `region_mask`.
    mask : array-like of bool, shape ``cube.spatial_shape``, optional
        Further spaxels to exclude (`True` = exclude).
    covariance : float, optional
        :math:`\\alpha` of the empirical correction for correlated noise,
        S/N divided by :math:`1 + \\alpha \\log_{10} N` for a bin of :math:`N`
        spaxels (Garcia-Benito et al. 2015; 1.07 for CALIFA). Off (`None`) by
        default: the noise of different spaxels is assumed independent.
    method : {'vorbin', 'powerbin'}, optional
        Voronoi binning (Cappellari & Copin 2003) or, if the optional package
        ``powerbin`` is installed, PowerBin (Cappellari 2025).
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory budget for reading the cube (S/N maps and co-adding), passed to
        ``cube.iter_chunks``; default ``cube.max_memory``.
    progress_bar : bool, optional
        Show progress bars while reading the cube.

    Returns
    -------
    bins : `VoronoiBins`
        Bin map, achieved S/N and co-added spectra (mean per spaxel).

    Raises
    ------
    CubeSFHError
        If no spaxel is usable (all-NaN cube, everything excluded), or if the
        target S/N exceeds what all the usable spaxels together reach.

    Notes
    -----
    Spaxels that already reach ``target_snr`` on their own form one-spaxel
    bins. If every usable spaxel does, no binning is needed and each spaxel is
    its own bin.
    """
    if method not in _METHODS:
        msg = f"method must be one of {_METHODS}; got {method!r}."
        raise CubeSFHError(msg)
    target_snr = float(target_snr)
    if not 0 < target_snr < np.inf:
        msg = f"target_snr must be positive and finite; got {target_snr}."
        raise CubeSFHError(msg)
    if min_snr is not None and not np.isfinite(float(min_snr)):
        msg = (f"min_snr must be a finite S/N (or None to keep every spaxel); got {min_snr} "
               "(--min-snr).")
        raise CubeSFHError(msg)
    if covariance is not None and not covariance >= 0:
        msg = f"covariance (alpha of 1 + alpha log10 N) must be >= 0 or None; got {covariance}."
        raise CubeSFHError(msg)
    alpha = float(covariance) if covariance else 0.0
    shape = tuple(cube.spatial_shape)

    # Check the exclusions before reading the cube, so that a bad region file fails fast.
    excluded = np.zeros(shape, dtype=bool)
    if regions is not None:
        excluded |= region_mask(regions, shape, getattr(cube, "celestial_wcs", None))
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != shape or mask.dtype != bool:
            msg = (f"mask must be a boolean array of the cube's spatial shape {shape} "
                   f"(True = exclude); got dtype {mask.dtype} and shape {mask.shape}.")
            raise CubeSFHError(msg)
        excluded |= mask

    kwargs = {} if max_memory is None else {"max_memory": max_memory}
    signal, noise = cube.signal_noise(window, per=per, progress_bar=progress_bar, **kwargs)
    noise_unit = getattr(signal, "unit", None)
    signal = _strip(signal).astype(float)
    noise = _strip(noise, noise_unit).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = signal / noise
    finite = np.isfinite(signal) & np.isfinite(noise) & (noise > 0)
    if not finite.any():
        msg = (f"No spaxel of the cube has a finite signal and noise in the window "
               f"{window}: the data (or the variance) are NaN or masked everywhere there. "
               "Check the cube, its variance (STAT) and DQ extensions, or choose another "
               "window=.")
        raise CubeSFHError(msg)

    use = finite & ~excluded
    if not use.any():
        msg = ("All spaxels with valid data are excluded by regions= or mask=; "
               "check that the regions do not cover the whole field.")
        raise CubeSFHError(msg)
    if min_snr is not None:
        use &= snr >= min_snr
        if not use.any():
            msg = (f"No spaxel reaches min_snr={min_snr} (the highest spaxel S/N is "
                   f"{np.nanmax(np.where(finite & ~excluded, snr, np.nan)):.3g}); lower "
                   "min_snr or pass min_snr=None.")
            raise CubeSFHError(msg)
    log.info("Binning %d of %d spaxels (%d excluded by regions/mask, %d below min_snr=%s).",
             use.sum(), use.size, (finite & excluded).sum(),
             (finite & ~excluded & ~use).sum(), min_snr)

    yy, xx = np.nonzero(use)
    sig, noi = signal[use], noise[use]
    best = _bin_snr(np.arange(sig.size), sig, noi, alpha)
    if not best >= target_snr:
        msg = (f"No bin can reach target_snr={target_snr:g}: all {sig.size} usable spaxels "
               f"together reach only S/N = {best:.3g}. Lower target_snr to at most "
               f"{best:.3g} (or check the noise of the cube).")
        raise CubeSFHError(msg)

    if np.min(sig / noi) >= target_snr or sig.size == 1:
        log.info("Every usable spaxel reaches target_snr=%g: no binning needed.", target_snr)
        labels = np.arange(sig.size)
    else:
        runner = _run_vorbin if method == "vorbin" else _run_powerbin
        with warnings.catch_warnings():
            # vorbin announces its own deprecation in favour of powerbin on import and call
            warnings.filterwarnings("ignore", message=".*VorBin is deprecated",
                                    category=UserWarning)
            labels = runner(xx.astype(float), yy.astype(float), sig, noi, target_snr, alpha)

    labels = np.unique(labels, return_inverse=True)[1].ravel()  # contiguous 0 ... n_bins-1
    bin_map = np.full(shape, -1, dtype=int)
    bin_map[yy, xx] = labels
    n_bins = int(labels.max()) + 1
    achieved = (np.bincount(labels, weights=sig, minlength=n_bins)
                / np.sqrt(np.bincount(labels, weights=noi**2, minlength=n_bins)))
    if alpha:
        achieved /= 1.0 + alpha * np.log10(np.bincount(labels, minlength=n_bins))
    log.info("%d bins, S/N median %.1f (min %.1f, max %.1f; target %g).", n_bins,
             np.median(achieved), achieved.min(), achieved.max(), target_snr)
    return VoronoiBins.from_bin_map(cube, bin_map, max_memory=max_memory,
                                    progress_bar=progress_bar, snr=achieved,
                                    target_snr=target_snr, window=window)
