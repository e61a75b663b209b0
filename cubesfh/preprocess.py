# Licensed under a 3-clause BSD style license - see LICENSE
"""
The preprocessing pipeline in one call: cube (+ HST images) to network inputs.

:func:`prepare_observation` chains the stages documented on their own pages:
Voronoi binning (:func:`~cubesfh.binning.voronoi_bin`), stellar kinematics
(:func:`~cubesfh.kinematics.fit_kinematics` or
:func:`~cubesfh.kinematics.read_kinematics_maps`), rest-frame preparation
(:func:`~cubesfh.restframe.prepare_spectra`) and bin photometry
(:func:`~cubesfh.photometry.bin_photometry`), and returns a
:class:`PreparedObservation` holding the normalised spectra (n_bins x 1761) and
photometry (n_bins x 5) exactly as the network takes them.
"""

import datetime
import logging
from pathlib import Path

import numpy as np
from astropy import constants as const
from astropy import units as u
from astropy.io import fits
from astropy.table import QTable

from .conventions import HST_BANDS
from .flags import BinFlag
from .gaps import INCOMPLETE_LIMIT, gap_fraction
from .utils import CubeSFHError, atomic_write
from .utils._io import file_digest

__all__ = ["SKY_RATIO_LIMIT", "PreparedObservation", "check_redshift_coverage",
           "choose_sigma_target", "prepare_observation"]

log = logging.getLogger(__name__)


class PreparedObservation:
    """
    Network-ready inputs of every bin of a cube, with everything that made them.

    Attributes
    ----------
    bins : `~cubesfh.binning.VoronoiBins`
        The bins (bin map, co-added spectra).
    kinematics : `~astropy.table.QTable`
        Per-bin stellar kinematics.
    spectra : `~cubesfh.restframe.PreparedSpectra`
        Rest-frame, 4800-7000 A, normalised spectra at 150 km/s (or the
        ``sigma_target`` of each bin).
    photometry : `~cubesfh.photometry.BinPhotometry` or `None`
        Per-bin HST flux densities (observed frame, cube flux unit per spaxel).
    photometry_normalized : `~numpy.ndarray`
        ``(n_bins, 5)`` in :data:`~cubesfh.conventions.HST_BANDS` order: rest-frame
        f_lambda (observed x (1 + z), times the K-correction if one was
        applied) divided by the spectrum's normalisation; NaN for bands not
        given.
    flags : `~numpy.ndarray`
        ``(n_bins,)`` `~cubesfh.flags.BinFlag` bitmask.
    meta : dict
        Provenance and parameters.
    """

    def __init__(self, *, bins, kinematics, spectra, photometry, photometry_normalized, flags,
                 meta):
        self.bins = bins
        self.kinematics = kinematics
        self.spectra = spectra
        self.photometry = photometry
        self.photometry_normalized = photometry_normalized
        #: ``(n_bins, 5)`` K-correction factors applied to
        #: ``photometry_normalized`` (`~cubesfh.pipeline.k_correct_bins`), or `None`.
        self.k_correction = None
        #: ``(n_bins,)`` optical depth of the SEDs of the K-correction, or `None`.
        self.k_correction_tau = None
        self.flags = flags
        self.meta = meta

    def __repr__(self):
        bands = self.meta.get("bands", ())
        return (f"<PreparedObservation: {self.n_bins} bins, "
                f"{int(np.count_nonzero(self.flags == 0))} usable, bands: "
                f"{', '.join(bands) if bands else 'none'}>")

    @property
    def n_bins(self):
        """Number of bins."""
        return self.bins.n_bins

    def summary(self):
        """One line per flag with the number of bins that carry it."""
        lines = []
        if "redshift" in self.meta:
            lines.append(f"systemic redshift z = {self.meta['redshift']:.5f} "
                         f"({self.meta.get('redshift_source', 'given')})")
        lines.append(f"{self.n_bins} bins, {int(np.count_nonzero(self.flags == 0))} usable")
        for f in BinFlag:
            if f.value == 0:
                continue
            n = int(np.count_nonzero(self.flags & f))
            if n:
                lines.append(f"  {f.name}: {n}")
        meta = getattr(self.kinematics, "meta", {}) or {}
        for problem in meta.get("problems", []):
            lines.append(f"  WARNING (kinematics): {problem}")
        return "\n".join(lines)

    def to_table(self):
        """Per-bin table: position, S/N, kinematics, normalisation, flags, photometry."""
        t = QTable()
        t["bin"] = np.arange(self.n_bins)
        t["x"] = self.bins.x
        t["y"] = self.bins.y
        t["n_spaxels"] = self.bins.n_spaxels
        t["snr"] = self.bins.snr
        for col in ("velocity", "velocity_los", "sigma", "velocity_err", "sigma_err"):
            if col in self.kinematics.colnames:
                t[col] = self.kinematics[col]
        t["sigma_target"] = np.broadcast_to(self.spectra.sigma_target, (self.n_bins,))
        t["norm"] = self.spectra.norm
        t["flag"] = self.flags
        for i, band in enumerate(HST_BANDS):
            t[f"phot_{band}"] = self.photometry_normalized[:, i]
        return t

    def write(self, path, *, overwrite=False):
        """
        Write the inputs to a FITS file (atomically).

        Extensions: ``BIN_ID`` (bin map on the cube's celestial WCS), ``SPECTRA``
        and ``SPECTRA_VAR`` (n_bins x 1761, normalised, with a linear spectral
        WCS on axis 1), ``BINS`` (table from :meth:`to_table`).

        Parameters
        ----------
        path : str or `~pathlib.Path`
        overwrite : bool, optional
        """
        prim = fits.PrimaryHDU()
        for k, v in self.meta.items():
            if isinstance(v, (str, int, float, bool)):
                prim.header[f"HIERARCH CSFH {k.upper()}"[:70]] = v
            elif isinstance(v, (tuple, list)):
                prim.header[f"HIERARCH CSFH {k.upper()}"[:70]] = ",".join(map(str, v))
        bid = fits.ImageHDU(self.bins.bin_map.astype(np.int32),
                            header=self.bins.celestial_wcs.to_header(), name="BIN_ID")
        bid.header["BUNIT"] = ""
        wave = self.spectra.wavelength.to_value(u.AA)
        spec = fits.ImageHDU(self.spectra.flux.astype(np.float32), name="SPECTRA")
        for h in (spec.header,):
            h["CTYPE1"], h["CUNIT1"] = "AWAV", "Angstrom"
            h["CRPIX1"], h["CRVAL1"], h["CDELT1"] = 1.0, wave[0], wave[1] - wave[0]
            h["CTYPE2"] = "BIN"
            h["BUNIT"] = ""
            h["COMMENT"] = ("rest frame, at the dispersion sigma_target of BINS, normalised by "
                            "the 5300-5500 A mean")
        hdus = [prim, bid, spec]
        if self.spectra.variance is not None:
            var = fits.ImageHDU(self.spectra.variance.astype(np.float32), header=spec.header,
                                name="SPECTRA_VAR")
            hdus.append(var)
        hdus.append(fits.table_to_hdu(self.to_table()))
        hdus[-1].name = "BINS"
        with atomic_write(path, overwrite=overwrite) as tmp:
            fits.HDUList(hdus).writeto(tmp)
        return Path(path)


def _band_transmission(band, image, ebv, r_v):
    """Foreground transmission in an image's band (WFC3/UVIS curve for other cameras)."""
    from .extinction import band_transmission

    try:
        return band_transmission(band, ebv, r_v=r_v,
                                 instrument=getattr(image, "instrument", "WFC3/UVIS"))
    except CubeSFHError:
        return band_transmission(band, ebv, r_v=r_v)


def check_redshift_coverage(wavelength, redshift, *, margin=1000.0):
    """
    Check that a cube observed at ``redshift`` holds the rest-frame 4800-7000 A.

    Called by :func:`prepare_observation` before any work, so that a galaxy
    too distant (or too blueshifted) for the cube fails at once with the
    ranges involved rather than after the binning and kinematics.

    Parameters
    ----------
    wavelength : `~astropy.units.Quantity`
        Observed wavelengths of the cube.
    redshift : float or `~astropy.units.Quantity`
        Systemic redshift z, or velocity cz.
    margin : float, optional
        Velocity (km/s) either side of ``redshift`` that the rotation of the
        galaxy may add.

    Raises
    ------
    CubeSFHError
        If the observed range lacks part of the rest-frame window.
    """
    from .conventions import OUTPUT_WAVELENGTH
    from .kinematics import _as_redshift

    z = _as_redshift(redshift)
    c_kms = const.c.to_value(u.km / u.s)
    lam = u.Quantity(wavelength, u.AA).to_value(u.AA)
    rest = OUTPUT_WAVELENGTH.to_value(u.AA)
    lo = rest[0] * (1 + z) * (1 - margin / c_kms)
    hi = rest[-1] * (1 + z) * (1 + margin / c_kms)
    if lo < lam[0] or hi > lam[-1]:
        msg = (f"At redshift z = {z:.5f} (cz = {z * c_kms:.0f} km/s) the rest-frame "
               f"{rest[0]:.0f}-{rest[-1]:.0f} A the network needs is observed at "
               f"{lo:.0f}-{hi:.0f} A (with +-{margin:.0f} km/s for the rotation), but the "
               f"cube covers {lam[0]:.0f}-{lam[-1]:.0f} A. cubesfh can analyse this cube "
               f"only for {lam[0] / rest[0] - 1:.4f} < z < {lam[-1] / rest[-1] - 1:.4f} "
               "(about); check the redshift (z, or cz as a velocity Quantity).")
        if lam[0] > 3 * 9400.0 or lam[-1] < 4600.0 / 3:
            # far outside any optical range: the wavelength unit of the header is wrong
            msg = (f"The cube's wavelengths, {lam[0]:.0f}-{lam[-1]:.0f} A, are not those of "
                   "an optical cube (MUSE: 4600-9400 A): the unit of the wavelength axis is "
                   "probably wrong; check CUNIT3 in the DATA header (CRVAL3 and CD3_3 must "
                   "be in that unit, e.g. CUNIT3 = 'Angstrom' for 4750 and 1.25).")
        elif lam[-1] / lam[0] < rest[-1] / rest[0]:
            # no redshift can help: a spectral slab or a few planes of a cube
            msg = (f"The cube covers only {lam[0]:.0f}-{lam[-1]:.0f} A ({lam.size} "
                   f"wavelength plane{'s' if lam.size != 1 else ''}), too narrow for the "
                   f"rest-frame {rest[0]:.0f}-{rest[-1]:.0f} A the network needs at any "
                   "redshift; give the full MUSE cube, not a spectral slab of it.")
        elif not isinstance(redshift, u.Quantity) and 30.0 <= z < 0.1 * c_kms:
            # --redshift 700: a velocity in km/s given as z
            msg = (f"redshift z = {z:g} looks like a velocity cz in km/s, not a redshift: "
                   f"give z = cz / c = {z / c_kms:.6f} (--redshift {z / c_kms:.6f}), or cz "
                   "as a velocity Quantity (e.g. 700 * u.km / u.s).")
        raise CubeSFHError(msg)


def _check_map_systemic(kin, z_sys, source, *, given, tolerance=500.0):
    """Refuse kinematics maps whose velocities are not around the systemic cz (e.g. maps
    of velocities relative to the systemic velocity, which cubesfh would take as cz)."""
    c_kms = const.c.to_value(u.km / u.s)
    v_los = np.asarray(u.Quantity(kin["velocity_los"], u.km / u.s).value, float)
    if not np.isfinite(v_los).any():
        return
    median = float(np.nanmedian(v_los))
    offset = median - z_sys * c_kms
    if abs(offset) <= tolerance:
        return
    origin = "--redshift (redshift=)" if given else "the redshift estimated from the cube"
    if abs(median) > 0.1 * c_kms and abs(median / 1000.0 - z_sys * c_kms) <= tolerance:
        msg = (f"The velocities of the kinematics maps {source} have a median of {median:.0f} "
               f"km/s, 1000 times the systemic cz = {z_sys * c_kms:.0f} km/s of {origin}: "
               "the maps are in m/s but their header does not say so; set BUNIT = 'm/s' in "
               "the V_STARS and SIGMA_STARS headers (or convert them to km/s).")
        raise CubeSFHError(msg)
    msg = (f"The velocities of the kinematics maps {source} have a median of {median:.0f} "
           f"km/s, {offset:+.0f} km/s from the systemic cz = {z_sys * c_kms:.0f} km/s of "
           f"{origin}: cubesfh needs line-of-sight velocities cz in V_STARS, and maps of "
           "velocities relative to the systemic one would shift every spectrum. Add the "
           "systemic velocity to the map (or check the redshift).")
    raise CubeSFHError(msg)


def choose_sigma_target(sigma, sigma_target=None):
    """
    Common dispersion to which each bin is broadened.

    Parameters
    ----------
    sigma : `~astropy.units.Quantity`
        Stellar velocity dispersion of each bin.
    sigma_target : `~astropy.units.Quantity`, optional
        One value (default 150 km/s) or several (a model family).

    Returns
    -------
    targets : `~astropy.units.Quantity`
        Per bin: the smallest target strictly above its dispersion, or the
        largest target (then the bin is flagged ``SIGMA_TOO_HIGH`` by
        `~cubesfh.restframe.prepare_spectra`). Bins with a non-finite
        dispersion get the smallest target.

    Examples
    --------
    >>> from astropy import units as u
    >>> from cubesfh.preprocess import choose_sigma_target
    >>> choose_sigma_target([90, 150, 275, 320] * u.km / u.s, [150, 300] * u.km / u.s)
    <Quantity [150., 300., 300., 300.] km / s>
    """
    from .conventions import SIGMA_TARGET

    kms = u.km / u.s
    ladder = np.atleast_1d(u.Quantity(SIGMA_TARGET if sigma_target is None else sigma_target,
                                      kms).to_value(kms))
    if ladder.size == 0 or not np.all(ladder > 0):
        msg = f"sigma_target must hold positive dispersions; got {sigma_target}."
        raise CubeSFHError(msg)
    ladder = np.unique(ladder)
    sig = np.atleast_1d(u.Quantity(sigma, kms).to_value(kms))
    with np.errstate(invalid="ignore"):
        idx = np.searchsorted(ladder, np.where(np.isfinite(sig), sig, 0.0), side="right")
    return ladder[np.minimum(idx, ladder.size - 1)] * kms


#: Width (pixels of 1.25 A) of the running median of `_negative_continuum`.
_CONTINUUM_WINDOW = 41

#: A bin is flagged ``SKY_SUSPECT`` when its HST / MUSE flux ratio in F555W exceeds
#: the median ratio of the cube's brighter half of bins by more than this factor
#: (or by 5 robust sigma of their scatter, if that is larger).
SKY_RATIO_LIMIT = 1.6


def _negative_continuum(flux):
    """Bins whose running-median continuum is negative somewhere (rest frame)."""
    from scipy.ndimage import median_filter

    flux = np.asarray(flux, dtype=float)
    out = np.zeros(flux.shape[0], dtype=bool)
    for i, spectrum in enumerate(flux):
        good = np.isfinite(spectrum)
        if good.sum() < _CONTINUUM_WINDOW:
            continue
        cont = median_filter(spectrum[good], size=_CONTINUUM_WINDOW, mode="nearest")
        out[i] = bool(np.any(cont < 0))
    return out


def _low_flux_ratio(bins, photometry):
    """
    Bins whose MUSE flux in F555W (synthetic photometry of the binned spectrum)
    is low against the HST F555W flux of the same bin, relative to the ratio of
    the cube's brighter half of bins. The same band on both sides, so neither
    the stellar population nor the emission lines enter the ratio; a sky
    subtracted in excess (additive) lowers the MUSE side most in faint bins.
    """
    from .registration import _band_weights

    out = np.zeros(bins.n_bins, dtype=bool)
    if photometry is None or "F555W" not in photometry.bands:
        return out
    wave = u.Quantity(bins.wavelength, u.AA).value
    weights, coverage = _band_weights("F555W", wave)
    if coverage < 0.8:
        return out
    spectra = np.asarray(getattr(bins.spectra, "value", bins.spectra), dtype=float)
    finite = np.isfinite(spectra)
    used = np.abs(weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = (finite @ used) / used.sum()
        muse = (np.where(finite, spectra, 0.0) @ weights) / frac
        # units differ (per arcsec2 against per spaxel): a constant factor, which the
        # comparison with the cube's own median ratio removes
        hst = np.asarray(photometry.flux[:, photometry.bands.index("F555W")].value, float)
        ratio = hst / muse
    good = np.isfinite(ratio) & (frac > 0.5) & (hst > 0)
    if good.sum() < 4:
        return out
    bright = good & (muse >= np.median(muse[good]))
    if bright.sum() < 2:
        bright = good
    reference = np.median(ratio[bright])
    if not reference > 0:
        return out
    # PSF-matching residuals scatter the ratio of small bins at sharp features by
    # up to ~40 %; the limit is at least SKY_RATIO_LIMIT and 5 robust sigma of the
    # bright bins' scatter
    rel = ratio[bright] / reference
    spread = 1.4826 * np.median(np.abs(rel - 1.0))
    limit = max(SKY_RATIO_LIMIT, 1.0 + 5.0 * spread)
    out[good] = (ratio[good] > limit * reference) | (muse[good] <= 0)
    return out


def prepare_observation(cube, hst=None, *, target_snr=35.0, min_snr=1.0, regions=None,
                        mask=None, kinematics=None, redshift=None, snr_window=None,
                        sigma_target=None, ebv_galactic=0.0, r_v=3.1, max_memory=None,
                        progress_bar=True):
    """
    Bin a cube, measure its kinematics and build the network inputs of every bin.

    Parameters
    ----------
    cube : `~cubesfh.Cube`
        The MUSE cube.
    hst : dict or list of `~cubesfh.HSTImage`, optional
        HST images (any subset of the five bands); `None` for spectrum only.
    target_snr : float, optional
        Voronoi target S/N per Angstrom in 5300-5500 A (default 35).
    min_snr : float, optional
        Spaxels below this S/N are excluded.
    regions : str, `~pathlib.Path` or list, optional
        DS9 region file(s) of areas to exclude (e.g. foreground stars).
    mask : `~numpy.ndarray`, optional
        Extra spaxels to exclude (`True` = exclude).
    kinematics : str, `~pathlib.Path` or tuple, optional
        External kinematics (a PHANGS DAP MAPS file, or ``(velocity, sigma)``
        FITS maps) instead of fitting them with pPXF.
    redshift : float or `~astropy.units.Quantity`, optional
        Systemic redshift or velocity (the reference and starting guess of the
        kinematic fits). If `None` (default) it is estimated from the cube
        (:func:`~cubesfh.redshift.estimate_redshift`: the brightest spaxels,
        outside ``regions`` and ``mask``, cross-correlated with the templates
        over -0.005 < z < 0.5, then refined with pPXF) and reported in the log
        and ``meta['redshift']``.
    snr_window : `~astropy.units.Quantity`, optional
        Observed-frame window in which the binning measures the S/N (default
        the rest-frame 5300-5500 A of the network at the systemic redshift,
        ``(5300, 5500) * u.AA * (1 + z)``).
    sigma_target : `~astropy.units.Quantity`, optional
        Common velocity dispersion of the prepared spectra (default 150 km/s,
        the paper's). Several values (e.g. ``[150, 300] * u.km / u.s``, the
        dispersions of a model family, see :ref:`network-sigma`) give each
        bin the smallest one above its dispersion; bins above the largest
        are broadened to none and flagged ``SIGMA_TOO_HIGH``.
    ebv_galactic : float, optional
        Milky Way foreground E(B-V) of the sight line (from the dust maps; 0 by
        default). The binned spectra (and variances) and the HST photometry
        are corrected with the Cardelli et al. (1989) curve in the observed
        frame before anything else (see :mod:`cubesfh.extinction`).
    r_v : float, optional
        R_V of the foreground curve (3.1).
    max_memory : `~astropy.units.Quantity` or int, optional
        Memory allowed for reading the cube at once (see `~cubesfh.Cube.iter_chunks`).
    progress_bar : bool, optional
        Show progress bars.

    Returns
    -------
    prepared : `PreparedObservation`
        ``prepared.spectra.sigma_target`` holds the dispersion of each bin.
    """
    from .binning import voronoi_bin
    from .conventions import SNR_WINDOW
    from .kinematics import KinematicsFlag, _as_redshift, fit_kinematics, read_kinematics_maps
    from .restframe import PreparationFlag, prepare_spectra

    if hst:
        from .hst import check_parity

        check_parity(cube.celestial_wcs, hst)  # before any work
    z_estimate = None
    if redshift is None:
        from .binning import region_mask
        from .redshift import estimate_redshift

        exclude = None if mask is None else np.asarray(mask, dtype=bool)
        if regions is not None:
            rmask = region_mask(regions, cube.spatial_shape, cube.celestial_wcs)
            exclude = rmask if exclude is None else exclude | rmask
        z_estimate = estimate_redshift(cube, mask=exclude, max_memory=max_memory,
                                       progress_bar=progress_bar)
        redshift = z_estimate.z
    z_sys = _as_redshift(redshift)
    check_redshift_coverage(cube.wavelength, z_sys)
    if snr_window is None:
        # the rest-frame window of the network, observed at the systemic redshift
        snr_window = SNR_WINDOW * (1.0 + z_sys)
    bins = voronoi_bin(cube, target_snr=target_snr, min_snr=min_snr, regions=regions, mask=mask,
                       window=snr_window, max_memory=max_memory, progress_bar=progress_bar)
    log.info("Voronoi binning: %d bins", bins.n_bins)
    if ebv_galactic:
        from .extinction import galactic_transmission

        trans = galactic_transmission(bins.wavelength, ebv_galactic, r_v=r_v)
        bins.spectra = bins.spectra / trans
        if bins.variance is not None:
            bins.variance = bins.variance / trans**2
        log.info("Milky Way extinction removed: E(B-V) = %.3f, R_V = %.2f (x%.3f to x%.3f)",
                 ebv_galactic, r_v, 1 / trans.max(), 1 / trans.min())
    if kinematics is None:
        kin = fit_kinematics(bins, redshift=redshift, progress_bar=progress_bar)
    else:
        kin = read_kinematics_maps(kinematics, bins)
        _check_map_systemic(kin, z_sys, kinematics, given=z_estimate is None)
    targets = choose_sigma_target(kin["sigma"], sigma_target)
    spectra = prepare_spectra(bins.wavelength, bins.spectra, bins.variance,
                              kin["velocity_los"], kin["sigma"], sigma_target=targets,
                              progress_bar=progress_bar)

    flags = np.zeros(bins.n_bins, dtype=np.int32)
    kf = np.asarray(kin["flag"], dtype=int)
    flags[(kf & (KinematicsFlag.NO_DATA | KinematicsFlag.FIT_FAILED)) != 0] |= \
        BinFlag.KINEMATICS_FAILED
    flags[(kf & KinematicsFlag.AT_BOUND) != 0] |= BinFlag.KINEMATICS_AT_BOUND
    flags[(kf & (KinematicsFlag.CHI2_HIGH | KinematicsFlag.VELOCITY_OUTLIER)) != 0] |= \
        BinFlag.KINEMATICS_SUSPECT
    pf = np.asarray(spectra.flags, dtype=int)
    flags[(pf & PreparationFlag.SIGMA_TOO_HIGH) != 0] |= BinFlag.SIGMA_TOO_HIGH
    flags[(pf & (PreparationFlag.BAD_KINEMATICS | PreparationFlag.BAD_NORM)) != 0] |= \
        BinFlag.SPECTRUM_FAILED
    lost = gap_fraction(spectra.flux)
    gap = ((pf & PreparationFlag.MISSING_PIXELS) != 0) & (lost < 1.0)
    flags[gap] |= BinFlag.SPECTRAL_GAP
    flags[gap & (lost > INCOMPLETE_LIMIT)] |= BinFlag.SPECTRUM_INCOMPLETE

    flags[_negative_continuum(spectra.flux)] |= BinFlag.SKY_SUSPECT

    phot_norm = np.full((bins.n_bins, len(HST_BANDS)), np.nan)
    photometry = None
    bands = ()
    if hst:
        from .photometry import bin_photometry
        from .photometry._binphot import _ordered_images

        photometry = bin_photometry(hst, bins, cube, progress_bar=progress_bar)
        bands = photometry.bands
        one_plus_z = 1.0 + (kin["velocity_los"] / const.c).to_value(u.dimensionless_unscaled)
        norm = spectra.norm.to_value(photometry.flux.unit)
        images = dict(_ordered_images(hst))
        for j, band in enumerate(bands):
            # Milky Way foreground removed with the band-averaged transmission
            trans = (_band_transmission(band, images[band], ebv_galactic, r_v)
                     if ebv_galactic else 1.0)
            phot_norm[:, HST_BANDS.index(band)] = (photometry.flux[:, j].value * one_plus_z
                                                   / norm / trans)
        flags[np.asarray(photometry.flags, dtype=bool)] |= BinFlag.PHOTOMETRY_NONPOSITIVE
    else:
        flags |= BinFlag.NO_PHOTOMETRY

    flags[_low_flux_ratio(bins, photometry)] |= BinFlag.SKY_SUSPECT
    n_sky = int(np.count_nonzero(flags & BinFlag.SKY_SUSPECT))
    if n_sky:
        log.warning("%d of %d bins look over-sky-subtracted (negative continuum or low "
                    "MUSE/HST flux): flagged SKY_SUSPECT", n_sky, bins.n_bins)

    fn = getattr(cube, "filename", None)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "cube": Path(fn).name if fn else "",
        # whole-file SHA-256 (the first 64 MiB of a cube over 4 GiB, see file_digest)
        "cube_sha": file_digest(fn)[0] if fn else "",
        "target_snr": float(target_snr),
        "min_snr": float(min_snr) if min_snr is not None else -1.0,
        "kinematics": "external" if kinematics is not None else "ppxf",
        "bands": tuple(bands),
        "n_bins": int(bins.n_bins),
        "sigma_targets": tuple(float(v) for v in np.unique(targets.to_value(u.km / u.s))),
        "ebv_galactic": float(ebv_galactic), "r_v": float(r_v),
        "redshift": float(z_sys),
        "redshift_source": "given" if z_estimate is None else "estimated",
        "snr_window": tuple(float(v) for v in u.Quantity(snr_window, u.AA).value),
    }
    if z_estimate is not None:
        meta["redshift_err"] = float(z_estimate.z_err)
        meta["redshift_contrast"] = float(z_estimate.contrast)
    from . import __version__

    meta["version"] = __version__
    return PreparedObservation(bins=bins, kinematics=kin, spectra=spectra,
                               photometry=photometry, photometry_normalized=phot_norm,
                               flags=flags, meta=meta)
